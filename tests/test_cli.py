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
from hypervisor.options import NOT_USED_MARK, NOT_USED_YET
from tests.support import REPO
from tests.test_options import help_by_flag


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
        for word in (
            "--stateDir",
            "/var/lib/hypervisor",
            "--portNum",
            "6976",
            "--domainType",
            "run",
            "stop-vms-on-next-stop",
            "check-vms",
            "repair-vm-volume-allocations",
            "Stop the running daemon",
        ):
            self.assertIn(word, out)

    def test_help_names_go_flags_not_used_yet(self) -> None:
        """
        C{hypervisor -h} says which Go flags are accepted for compatibility but not
        used yet: each is marked in its own help line and all are named in the
        description, while flags the daemon uses are not marked.
        """
        code, out, _ = run("-h")
        self.assertEqual(code, 0)
        by_flag = help_by_flag(out)
        for name in NOT_USED_YET:
            self.assertIn(NOT_USED_MARK, by_flag[name], name)
        flat = " ".join(out.split())
        description = flat[flat.index("Flags may be given") :]
        self.assertIn(NOT_USED_MARK, description)
        for name in NOT_USED_YET:
            self.assertIn(f"-{name}", description)
        for used in ("stateDir", "portNum", "libvirtUri", "CAfile", "volumeDirectories"):
            self.assertNotIn(NOT_USED_MARK, by_flag[used], used)

    def test_does_not_import_tap(self) -> None:
        """
        The C{hypervisor} command takes its flags from L{hypervisor.options}: importing
        it (and parsing flags) loads nothing from the C{tap} package.
        """
        result = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\n"
                "from hypervisor.cli import hypervisor as h\n"
                "h.HypervisorCommand().parseOptions(['-portNum=1', 'check-vms'])\n"
                "sys.exit(sorted(m for m in sys.modules if m == 'tap' or "
                "m.startswith('tap.')) and 1 or 0)\n",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        self.assertEqual(result.returncode, 0, result.stderr)

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
            [
                sys.executable,
                "-m",
                "hypervisor",
                f"-stateDir={path}",
                f"-logDir={path}/log",
                "-portNum=0",
                "-dhcpServerOnBridgesOnly",
                "-libvirtUri=test:///default",
                "run",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=REPO),
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertIn("in use by another hypervisor", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
