"""
A smoke run of C{bench/tftp.py} (our server only, a small file, one run): it starts
the server, fetches with atftp at each window size, runs the small-transfer client,
and prints both tables with figures. The real comparison (tftpd-hpa, atftpd) is run
by hand, never in CI.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil

from twisted.trial.unittest import TestCase

from bench import tftp as bench
from tests import support


class SmokeTests(TestCase):
    """
    bench.tftp end to end on our server.
    """

    timeout = 300

    def test_smoke(self) -> None:
        """
        The tables list every window size and the small transfers with numbers.
        """
        support.require(shutil.which("atftp") is not None, "atftp is not installed (Debian atftp)")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = bench.main(
                ["--servers", "ours", "--size-mib", "2", "--runs", "1", "--small", "20"]
                + ["--concurrency", "4"]
            )
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        for window in bench.WINDOWS:
            self.assertRegex(text, rf"\n{window} +[0-9.]+ \([0-9]+-[0-9]+\)\n")
        self.assertNotIn("BAD", text)
        self.assertRegex(text, r"transfers/s +[0-9]+")
        self.assertIsNotNone(re.search(r"p99 transfer ms +[0-9.]+", text))

    def test_throughput_only(self) -> None:
        """
        C{--small 0} measures throughput only: no small-transfer table, exit 0.
        """
        support.require(shutil.which("atftp") is not None, "atftp is not installed (Debian atftp)")
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = bench.main(
                ["--servers", "ours", "--size-mib", "1", "--runs", "1"] + ["--small", "0"]
            )
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        self.assertRegex(text, r"\n1 +[0-9.]+ \([0-9]+-[0-9]+\)\n")
        self.assertNotIn("transfers/s", text)
