"""
Tests for L{hypervisor.logs.LogFileService}.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.logs import LogFileService


class LogFileServiceTests(SynchronousTestCase):
    """
    The JSON-lines log file.
    """

    def test_json_lines_while_running(self) -> None:
        """
        While running, each event is one JSON object per line in
        C{<logDir>/hypervisor.log} (the directory is created); after stop, nothing
        more is written.
        """
        parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, parent)
        directory = os.path.join(parent, "logs")
        publisher = LogPublisher()
        log = Logger(observer=publisher)
        service = LogFileService(directory, publisher=publisher)
        service.startService()
        log.info("VM {ip} started", ip="10.0.0.2")
        log.error("disk {n} full", n=3)
        service.stopService()
        log.info("after stop")
        with open(os.path.join(directory, "hypervisor.log")) as f:
            lines = f.read().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertEqual([e["log_format"] for e in events], ["VM {ip} started", "disk {n} full"])
        self.assertEqual(events[0]["ip"], "10.0.0.2")
        self.assertEqual(events[1]["log_level"]["name"], "error")

    def test_unwritable_directory(self) -> None:
        """
        An unusable log directory is logged, not fatal: the daemon runs on.
        """
        blocker = tempfile.mktemp()
        open(blocker, "w").close()
        self.addCleanup(os.unlink, blocker)
        publisher = LogPublisher()
        seen: list[dict] = []
        publisher.addObserver(seen.append)
        service = LogFileService(os.path.join(blocker, "logs"), publisher=publisher)
        service.log = Logger(observer=publisher)
        service.startService()
        service.stopService()
        self.assertTrue(any("cannot write logs" in e["log_format"] for e in seen))
