"""
Tests for L{tap}: the service tree and the twistd plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

import tap
from hypervisor.options import BOOLEAN_NAMES, PARAMETER_NAMES
from tests.support import REPO


class MakeServiceTests(SynchronousTestCase):
    """
    Tests for L{tap.makeService}.
    """

    def test_named_children(self) -> None:
        """
        makeService returns a MultiService with the named children, in start order.
        """
        options = tap.Options(flags_directory=tempfile.mkdtemp())
        options.parseOptions(["-stateDir=/tmp/hv-tap-test", "-portNum=0"])
        service = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertIsInstance(service, MultiService)
        self.assertEqual(
            [s.name for s in service],
            ["logging", "libvirt", "manager", "dhcp", "tftp", "web", "pb", "metadata", "control"],
        )
        self.assertEqual(service.getServiceNamed("libvirt").uri, "qemu:///system")
        self.assertEqual(service.getServiceNamed("control").args[0], "/tmp/hv-tap-test/control")

    def test_tftp_child(self) -> None:
        """
        The tftp child takes -tftpPortNum and -tftpbootDirectory, the DHCP policy's
        NetbootMachine files and the daemon's metrics; -tftpPortNum=0 turns it off.
        """
        options = tap.Options(flags_directory=tempfile.mkdtemp())
        options.parseOptions(
            ["-stateDir=/tmp/hv-tap-test", "-tftpPortNum=6969", "-tftpbootDirectory=/srv/tftp"]
            + ["-tftpMaxBlockSize=1024", "-tftpTransferThreads=3", "-tftpSpinMicroseconds=50"]
        )
        service = tap.makeService(options, reactor=MemoryReactorClock())
        tftp = service.getServiceNamed("tftp")
        dhcp = service.getServiceNamed("dhcp")
        self.assertEqual(
            (tftp.port_number, tftp.directory, tftp.enabled), (6969, "/srv/tftp", True)
        )
        self.assertEqual(tftp.server.backend.files_for, dhcp.policy.netboot_files)
        self.assertIsNotNone(tftp.server.backend.directory)
        self.assertEqual(tftp.server.max_blksize, 1024)
        self.assertEqual(tftp.transfer_threads.limit, 3)
        self.assertEqual(tftp.transfer_threads.spinner.seconds, 50e-6)
        options = tap.Options(flags_directory=tempfile.mkdtemp())
        options.parseOptions(["-stateDir=/tmp/hv-tap-test", "-tftpPortNum=0"])
        tftp = tap.makeService(options, reactor=MemoryReactorClock()).getServiceNamed("tftp")
        self.assertFalse(tftp.enabled)
        self.assertEqual(tftp.server.max_blksize, 65464)
        self.assertEqual(tftp.transfer_threads.spinner.seconds, 200e-6)
        for flag, bad in [("-tftpMaxBlockSize", v) for v in ("7", "65465", "x")] + [
            ("-tftpSpinMicroseconds", v) for v in ("-1", "10001", "x")
        ]:
            with self.assertRaises(UsageError) as e:
                tap.Options(flags_directory=tempfile.mkdtemp()).parseOptions([f"{flag}={bad}"])
            self.assertIn(flag, str(e.exception))
        self.assertIsNone(tftp.server.backend.directory)


class PluginTests(SynchronousTestCase):
    """
    The twistd plugin, run as twistd would.
    """

    def test_twistd_help_lists_flags(self) -> None:
        """
        C{twistd hypervisor --help} lists every flag with its default.
        """
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "hypervisor",
                "--help",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        for name in PARAMETER_NAMES + BOOLEAN_NAMES:
            self.assertIn(f"--{name}", result.stdout)
        flat = " ".join(result.stdout.split())
        for default in ("/var/lib/hypervisor", "6976", "qemu:///system", "10G"):
            self.assertIn(f"[default: {default}]", flat)
