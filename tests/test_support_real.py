"""
The test helper that removes leftover domains, on the real libvirtd: by name, and by
address prefix within one daemon's directory only (what keeps tests side by side
under C{trial -j} from destroying each other's guests).
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests import support

DOMAIN = """<domain type='qemu'><name>vm-10.250.0.{i}</name><memory unit='MiB'>32</memory>
<os><type arch='x86_64'>hvm</type></os>
<devices><serial type='file'><source path='{directory}/serial.log'/></serial></devices>
</domain>"""


class DestroyDomainsTests(SynchronousTestCase):
    """
    L{support.destroy_domains} on transient domains.
    """

    def test_within_and_by_name(self) -> None:
        """
        Within a daemon's directory only that daemon's domain goes (not the one of
        a directory whose name merely starts the same); by name, the named one.
        """
        support.require_libvirtd()
        import libvirt

        mine = tempfile.mkdtemp(prefix="hv-daemon-")
        other = mine + "x"
        os.makedirs(other)
        for path in (mine, other):
            self.addCleanup(shutil.rmtree, path, True)
        self.addCleanup(support.destroy_domains, prefix="10.250.0")
        conn = libvirt.open(support.QEMU_URI)
        self.addCleanup(conn.close)
        conn.createXML(DOMAIN.format(i=2, directory=mine), 0)
        conn.createXML(DOMAIN.format(i=3, directory=other), 0)

        def left() -> list[str]:
            return sorted(
                d.name() for d in conn.listAllDomains() if d.name().startswith("vm-10.250.0.")
            )

        self.assertEqual(support.destroy_domains(prefix="10.250.0", within=mine), 1)
        self.assertEqual(left(), ["vm-10.250.0.3"])
        self.assertEqual(support.destroy_domains(["vm-10.250.0.3", "vm-10.250.0.9"]), 1)
        self.assertEqual(left(), [])
