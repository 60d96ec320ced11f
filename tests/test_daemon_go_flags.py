"""
The daemon takes every flag of the Go hypervisor (its C{-h} in
C{../shared/reference/go-tools-help/hypervisor.txt}, read here so that drift fails),
with Go's defaults; the logging flags do what Go's do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import flags
from hypervisor.logs import LOG_FILE_NAME, LogFileService
from hypervisor.options import (
    BOOLEAN_NAMES,
    BOOLEANS_DEFAULT_TRUE,
    NOT_USED_YET,
    PARAMETERS,
    Options,
)
from tests.support import REPO
from tests.test_cli_flags import HELP_DIR, parse_help

# Our defaults that differ from Go's on purpose.
DIFFERENT_DEFAULTS = {
    "networkBootImage": "ours picks the boot file by client architecture (pxelinux.%d)",
    "srpcUnixSocketPath": "holds the process id",
}


def go_daemon_flags() -> dict[str, tuple[str, str, str]]:
    with open(os.path.join(HELP_DIR, "hypervisor.txt")) as f:
        return parse_help(f.read())[0]


class GoDaemonFlagsTests(SynchronousTestCase):
    """
    Names and defaults against the Go daemon's -h.
    """

    def setUp(self) -> None:
        os.environ["HYPERVISOR_FLAGS_DIRECTORY"] = tempfile.mkdtemp()
        self.addCleanup(os.environ.pop, "HYPERVISOR_FLAGS_DIRECTORY")

    def test_every_go_flag_with_its_default(self) -> None:
        """
        Each Go flag is accepted; its default is Go's (sizes, durations and numbers
        compared as values; true booleans are true).
        """
        go = go_daemon_flags()
        self.assertEqual(len(go), 32)
        options = Options()
        options.parseOptions([])
        coerce = {name: c for name, _, c, _ in PARAMETERS}
        for name, (kind, _, default) in go.items():
            if kind == "bool":
                self.assertIn(name, BOOLEAN_NAMES)
                self.assertEqual(options[name], default == "true", name)
                self.assertEqual(name in BOOLEANS_DEFAULT_TRUE, default == "true", name)
                continue
            self.assertIn(name, coerce, name)
            if name in DIFFERENT_DEFAULTS:
                continue
            text = default.strip('"') or ("0" if kind in ("uint", "int") else "")
            if kind == "duration" and not text:
                text = "0s"
            expected = coerce[name](text) if text else coerce[name]("")
            self.assertEqual(options[name], expected, name)

    def test_go_flags_parse(self) -> None:
        """
        The Go daemon's flags, as a Go flags file would give them, parse and round
        trip through L{Options.go_flags}.
        """
        argv = [
            "-logbufLines=5",
            "-logQuota=1MiB",
            "-logFileMaxSize=64KiB",
            "-idleMarkTimeout=1m",
            "-alsoLogToStderr",
            "-logAtStartup=false",
            "-srpcTrustVmOwners=false",
            "-initialLogDebugLevel=1",
            "-srpcProxy=proxy:1",
            "-testMemoryAvailable=0",
        ]
        o = Options()
        o.parseOptions(argv)
        self.assertEqual(
            (o["logbufLines"], o["logQuota"], o["logFileMaxSize"]), (5, 1 << 20, 64 << 10)
        )
        self.assertEqual((o["idleMarkTimeout"], o["alsoLogToStderr"]), (60.0, True))
        self.assertEqual((o["logAtStartup"], o["srpcTrustVmOwners"]), (False, False))
        again = Options()
        again.parseOptions(o.go_flags())
        for name in (
            "logbufLines",
            "logQuota",
            "logFileMaxSize",
            "idleMarkTimeout",
            "logAtStartup",
        ):
            self.assertEqual(again[name], o[name], name)
        bad = Options()
        with self.assertRaises(Exception) as e:
            bad.parseOptions(["-logbufLines=-3"])
        self.assertIn("logbufLines", str(e.exception))

    def test_not_applicable_are_marked(self) -> None:
        """
        The Go flags that do not apply here are in the not-used set (so -h marks them).
        """
        for name in (
            "srpcTrustVmOwners",
            "srpcUnixSocketPath",
            "srpcProxy",
            "alsoLogToStderr",
            "addHypervisorSubnet",
        ):
            self.assertIn(name, NOT_USED_YET)
        for name in ("logbufLines", "logQuota", "logFileMaxSize", "idleMarkTimeout"):
            self.assertNotIn(name, NOT_USED_YET)


class LoggingFlagsTests(SynchronousTestCase):
    """
    C{-logFileMaxSize}, C{-logQuota}, C{-logAtStartup}, C{-idleMarkTimeout}.
    """

    def test_rotation_and_quota(self) -> None:
        """
        Files rotate at the maximum size and the total stays within the quota.
        """
        directory = tempfile.mkdtemp(prefix="i13-logs-")
        publisher = LogPublisher()
        service = LogFileService(directory, publisher=publisher, rotate_length=4096, quota=4 * 4096)
        service.startService()
        for i in range(400):
            publisher({"log_format": "line {i} " + "x" * 100, "i": i, "log_time": 0.0})
        service.stopService()
        names = sorted(os.listdir(directory))
        self.assertIn(LOG_FILE_NAME, names)
        self.assertEqual(len(names), 4, names)
        total = sum(os.path.getsize(os.path.join(directory, n)) for n in names)
        self.assertLessEqual(total, 4 * 4096 + 1024)

    def test_startup_line_and_idle_mark(self) -> None:
        """
        A line at startup; a MARK after the idle time without events, not before,
        and again after another idle period.
        """
        publisher = LogPublisher()
        seen: list[str] = []
        publisher.addObserver(lambda e: seen.append(e.get("log_format", "")))  # type: ignore[arg-type]
        clock = Clock()
        service = LogFileService(
            tempfile.mkdtemp(prefix="i13-logs-"),
            publisher=publisher,
            log_at_startup=True,
            mark_after=60.0,
            clock=clock,
        )
        # The service logs through its class's Logger: point it at this publisher.
        original = LogFileService.log
        LogFileService.log = Logger(observer=publisher)
        self.addCleanup(setattr, LogFileService, "log", original)
        service.startService()
        self.assertTrue(any(f.startswith("hypervisor starting") for f in seen), seen)
        clock.advance(30)
        publisher({"log_format": "busy", "log_time": 0.0})
        clock.advance(45)
        self.assertNotIn("MARK", seen)
        clock.advance(20)
        self.assertEqual(seen.count("MARK"), 1)
        clock.advance(60)
        self.assertEqual(seen.count("MARK"), 2)
        service.stopService()
        clock.advance(600)
        self.assertEqual(seen.count("MARK"), 2)


class TestMemoryAvailableTests(SynchronousTestCase):
    """
    C{hypervisor -testMemoryAvailable N}.
    """

    def run_hypervisor(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hypervisor", *args],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO, HYPERVISOR_FLAGS_DIRECTORY=tempfile.mkdtemp()),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_allocates_and_exits(self) -> None:
        """
        16 MiB can be allocated (exit 0); an impossible amount is a clear error
        (exit 1), not a traceback.
        """
        r = self.run_hypervisor("-testMemoryAvailable=16")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "allocated 16 MiB"), r.stderr)
        r = self.run_hypervisor(f"-testMemoryAvailable={1 << 40}")
        self.assertEqual(r.returncode, 1)
        self.assertIn("cannot allocate", r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        self.assertEqual(flags.parse_size("1MiB"), 1 << 20)
