"""
Tests for the C{hypervisor}, C{vm-control} and C{hyper-control} commands.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.cli.hypervisor import main
from tests.support import REPO


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


class HypervisorCommandTests(SynchronousTestCase):
    """
    Tests for C{hypervisor}.
    """

    def setUp(self) -> None:
        os.environ["HYPERVISOR_FLAGS_DIRECTORY"] = tempfile.mkdtemp()
        self.addCleanup(os.environ.pop, "HYPERVISOR_FLAGS_DIRECTORY")

    def test_help(self) -> None:
        """
        C{hypervisor -h} lists the flags with defaults and each subcommand with a line.
        """
        code, out, _ = run("-h")
        self.assertEqual(code, 0)
        for word in ("--stateDir", "/var/lib/hypervisor", "--portNum", "6976",
                     "--domainType", "run", "stop-vms-on-next-stop", "check-vms",
                     "repair-vm-volume-allocations", "Stop the running daemon"):
            self.assertIn(word, out)

    def test_unknown_flag(self) -> None:
        """
        An unknown flag exits 2 naming it.
        """
        code, _, err = run("-noSuchFlag", "stop")
        self.assertEqual(code, 2)
        self.assertIn("noSuchFlag", err)

    def test_unknown_subcommand(self) -> None:
        """
        An unknown subcommand exits 2 naming it.
        """
        code, _, err = run("restart")
        self.assertEqual(code, 2)
        self.assertIn("restart", err)

    def test_stop_when_not_running(self) -> None:
        """
        C{hypervisor stop} with no daemon exits 1 and says it is not running.
        """
        code, _, err = run("-stateDir", tempfile.mkdtemp(), "stop")
        self.assertEqual(code, 1)
        self.assertIn("not running", err)

    def test_state_dir_in_use(self) -> None:
        """
        C{hypervisor run} on a state directory held by another daemon exits 1 with a
        clear message instead of a traceback.
        """
        from hypervisor.store import StateDirectory

        path = tempfile.mkdtemp()
        holder = StateDirectory(path)
        holder.lock()
        self.addCleanup(holder.unlock)
        result = subprocess.run(
            [sys.executable, "-m", "hypervisor", f"-stateDir={path}",
             f"-logDir={path}/log", "-portNum=0", "-libvirtUri=test:///default", "run"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("in use by another hypervisor", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
