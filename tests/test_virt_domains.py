"""
Tests for L{hypervisor.virt.domains} against the real libvirtd.
"""

from __future__ import annotations

import os
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.virt import domains
from tests import support


class KvmProbeTests(SynchronousTestCase):
    """
    The C{-domainType auto} decision, made by starting a real KVM guest.
    """

    def test_probe_decides_and_cleans_up(self) -> None:
        """
        The probe answers with a reason, agrees with whether /dev/kvm exists at all,
        and leaves no probe domain behind.
        """
        support.require_libvirtd()
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        self.addCleanup(conn.close)
        usable, reason = domains.probe_kvm(conn, settle=0.5)
        self.assertTrue(reason)
        if not os.path.exists("/dev/kvm"):
            self.assertFalse(usable)
        names = [d.name() for d in conn.listAllDomains()]
        self.assertNotIn(f"{domains.PROBE_PREFIX}{domains._pid_namespace()}-{os.getpid()}", names)
        print(f"\nKVM probe: usable={usable}: {reason}")

    def test_probe_guest_of_a_dead_daemon_is_destroyed(self) -> None:
        """
        A probe guest whose daemon died (killed during its probe) is destroyed by the
        next probe; the probe of a live process (this one) is left alone.
        """
        support.require_libvirtd()
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        self.addCleanup(conn.close)
        dead = subprocess.Popen(["true"])
        dead.wait()
        namespace = domains._pid_namespace()
        names = [
            f"{domains.PROBE_PREFIX}{namespace}-{dead.pid}",
            f"{domains.PROBE_PREFIX}{namespace}-{os.getpid()}",
        ]
        for name in names:
            xml = domains.KVM_PROBE_XML.format(name=name).replace("type='kvm'", "type='qemu'")
            xml = xml.replace("<cpu mode='host-passthrough'/>", "")
            conn.createXML(xml, 0)
            self.addCleanup(self._destroy, conn, name)
        removed = domains.remove_stale_probes(conn)
        self.assertEqual(removed, [names[0]])
        running = [d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)]
        self.assertNotIn(names[0], running)
        self.assertIn(names[1], running)

    @staticmethod
    def _destroy(conn: object, name: str) -> None:
        import libvirt

        try:
            conn.lookupByName(name).destroy()  # type: ignore[attr-defined]
        except libvirt.libvirtError:
            pass
