"""
C{bench/floor.py}: its request splitter, and a smoke run (every canned server
answers over TLS with a client certificate, and every import set is measured).
"""

from __future__ import annotations

import contextlib
import io
import re

from twisted.trial.unittest import TestCase

from bench import floor as bench


class SplitTests(TestCase):
    """
    L{bench.split_requests} counts whole requests only.
    """

    def test_whole_partial_and_pipelined(self) -> None:
        """
        A head without its body is not a request yet; two pipelined requests are two;
        what follows the last whole one is kept.
        """
        one = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        self.assertEqual(bench.split_requests(one[:-1]), (0, one[:-1]))
        self.assertEqual(bench.split_requests(one), (1, b""))
        self.assertEqual(bench.split_requests(one + one + b"PO"), (2, b"PO"))
        self.assertEqual(bench.split_requests(b"GET / HTTP/1.1\r\n\r\n"), (1, b""))


class SmokeTests(TestCase):
    """
    bench.floor end to end, briefly.
    """

    timeout = 300

    def test_smoke(self) -> None:
        """
        Both tables come out with a figure in every row.
        """
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            status = bench.main(["--calls", "60", "--runs", "1"])
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        for label in bench.SERVERS.values():
            self.assertRegex(
                text, rf"{re.escape(label)} +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+x +[0-9.]+x"
            )
        for label, _, _ in bench.IMPORT_SETS:
            self.assertRegex(text, rf"{re.escape(label)} +[0-9.]+ +[0-9.]+\n")
