"""
A bounded run of the HTTP adapter fuzz target of C{bench/fuzz_http.py} (issue 9:
"a fuzz target for the request decoder and the HTTP adapter ... bounded in CI; a
longer run in bench/"): generated and mutated raw HTTP requests — request lines,
headers, chunked and content-length bodies, method names, JSON bodies from every
request type of the method table mutated at random, CreateVm uploads, TLS-looking
junk — over plain and TLS sockets, with the admin's certificate, alice's, or none,
to a real daemon (C{python -m hypervisor ... run}, C{qemu:///system}).

The long run: C{python -m bench.fuzz_http --inputs 20000}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from bench import fuzz_http
from tests import realrpc, support

INPUTS = 300


class HttpFuzzTests(SynchronousTestCase):
    """
    C{bench.fuzz_http} with L{INPUTS} inputs (about 15 s).
    """

    def test_fuzz_http_adapter(self) -> None:
        """
        Each of 300 inputs (seed 1, 4 connections at a time) gets a well-formed HTTP
        response with a status in {200, 400, 401, 403, 404, 405, 409, 413, 503, 507}
        — never 500 — or its connection closed (TLS junk: a TLS alert); no complete
        request is left unanswered; the state directory changes only in batches
        with an authorised 200. Afterwards C{/healthz} is 200, the daemon still runs
        and its log holds no traceback.
        """
        support.require_libvirtd()
        daemon = fuzz_http.start_daemon(self)
        report = fuzz_http.run(daemon, fuzz_http.Generator(1), INPUTS, concurrency=4)
        self.assertEqual(report.inputs, INPUTS)
        self.assertEqual(report.violations, [], report.table())
        self.assertEqual(report.outcomes.get("500", 0), 0)
        self.assertGreater(report.outcomes.get("200", 0), 0, report.table())
        self.assertGreater(report.outcomes.get("400", 0), 0, report.table())
        self.assertEqual(daemon.healthz(), 200)
        self.assertIsNone(daemon.process.poll(), "the daemon died")
        excerpt = realrpc.traceback_excerpt(daemon)
        self.assertEqual(excerpt, "", f"the daemon logged a traceback: {excerpt}")
