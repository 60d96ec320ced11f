"""
Tests for L{hypervisor.virt.domains} against the real libvirtd.
"""

from __future__ import annotations

import os

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
        self.assertFalse([n for n in names if "kvm-probe" in n], names)
        print(f"\nKVM probe: usable={usable}: {reason}")
