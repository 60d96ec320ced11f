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
            ["logging", "libvirt", "manager", "dhcp", "web", "metadata", "control"],
        )
        self.assertEqual(service.getServiceNamed("libvirt").uri, "qemu:///system")
        self.assertEqual(service.getServiceNamed("control").args[0], "/tmp/hv-tap-test/control")


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
