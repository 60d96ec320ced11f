"""
Tests for L{web.status.StatusPages}, in memory with treq's StubTreq.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from hypervisor.manager.manager import Manager
from hypervisor.store import StateDirectory
from hypervisor.testing import SynchronousRunner
from hypervisor.virt.connection import LibvirtService
from hypervisor.virt.domains import DomainSummary
from web.status import (
    SECURITY_HEADERS,
    PageError,
    StatusPages,
    clean_text,
    format_uptime,
    parse_ip,
    parse_tail,
    parse_window,
    split_query,
    to_utf8,
)


class StatusPagesTests(TestCase):
    """
    The host summary page and the health check.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.libvirt = LibvirtService("qemu:///system", self.clock)
        self.manager = Manager(
            StateDirectory(os.path.join(self.dir, "s")),
            self.libvirt,
            self.clock,
            runner=SynchronousRunner(),
        )
        self.manager.privilegedStartService()
        self.addCleanup(self.manager.state.unlock)
        self.manager.startService()
        self.pages = StatusPages(self.manager, self.libvirt, hostname="hv<1>.example")
        self.treq = StubTreq(self.pages.resource())

    async def get(self, path: str) -> tuple[int, str, object]:
        response = await self.treq.get("http://hv" + path)
        body = await response.text()
        return response.code, body, response.headers

    async def test_index(self) -> None:
        """
        The page shows host name (escaped), start time, uptime, the libvirt URI and
        state, and the domain counts.
        """
        self.clock.advance(3725)
        self.manager.reconciler.domains = {
            "u1": DomainSummary("vm-a", "u1", "running", True, True, "10.0.0.2"),
            "u2": DomainSummary("other", "u2", "shut off", False, False, None),
        }
        self.manager.reconciler.domains_current = True
        code, body, headers = await self.get("/")
        self.assertEqual(code, 200)
        self.assertIn("hv&lt;1&gt;.example", body)
        self.assertNotIn("hv<1>", body)
        self.assertIn("2027-01-15 08:00:00 UTC", body)
        self.assertIn("1h 2m 5s", body)
        self.assertIn("qemu:///system", body)
        self.assertIn("not connected", body)
        self.assertIn("2 (1 running, 1 managed by this hypervisor)", body)
        self.assertIn(self.manager.state.uuid, body)
        self.assertEqual(headers.getRawHeaders("X-Frame-Options"), ["DENY"])
        self.assertEqual(headers.getRawHeaders("X-Content-Type-Options"), ["nosniff"])

    async def test_disabled_banner(self) -> None:
        """
        A disabled hypervisor says so at the top of the page.
        """
        await self.manager.admin.set_disabled_state(True)
        _, body, _ = await self.get("/")
        self.assertIn("disabled", body)

    async def test_healthz(self) -> None:
        """
        /healthz is 503 with the reason while libvirt is down, 200 ok when connected.
        """
        self.libvirt.reason = "connection lost (end of file)"
        self.libvirt.startService = lambda: None  # type: ignore[method-assign]
        self.libvirt.running = True
        code, body, _ = await self.get("/healthz")
        self.assertEqual(code, 503)
        self.assertIn("connection lost (end of file)", body)
        self.libvirt.connected = True
        code, body, _ = await self.get("/healthz")
        self.assertEqual((code, body), (200, "ok\n"))

    async def test_static_css(self) -> None:
        """
        The stylesheet is served locally.
        """
        code, body, headers = await self.get("/static/style.css")
        self.assertEqual(code, 200)
        self.assertIn("font-family", body)

    async def test_unknown_path(self) -> None:
        """
        An unknown path is a 404, not a traceback.
        """
        code, body, _ = await self.get("/nope")
        self.assertEqual(code, 404)
        self.assertNotIn("Traceback", body)

    def test_format_uptime(self) -> None:
        """
        Uptimes read as days, hours, minutes and seconds.
        """
        self.assertEqual(format_uptime(5), "5s")
        self.assertEqual(format_uptime(61), "1m 1s")
        self.assertEqual(format_uptime(90061), "1d 1h 1m 1s")


class HostileRequestTests(TestCase):
    """
    Hostile values and requests, in memory: answered at once with the right status,
    the security headers and no traceback.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.clock = Clock()
        self.libvirt = LibvirtService("qemu:///system", self.clock)
        self.manager = Manager(
            StateDirectory(os.path.join(self.dir, "s")),
            self.libvirt,
            self.clock,
            runner=SynchronousRunner(),
        )
        self.manager.privilegedStartService()
        self.addCleanup(self.manager.state.unlock)
        self.manager.startService()
        self.pages = StatusPages(self.manager, self.libvirt, hostname="hv\ud800")
        self.treq = StubTreq(self.pages.resource())

    async def request(self, method: str, path: str) -> tuple[int, bytes, Any]:
        """
        C{method} C{path}; the status, body and headers (C{Content-Length} included).
        """
        response = await self.treq.request(method, "http://hv" + path)
        headers = response.headers.copy()
        if isinstance(response.length, int):
            headers.setRawHeaders("Content-Length", [str(response.length)])
        return response.code, await response.content(), headers

    def assert_secure(self, headers: Any) -> None:
        """
        The response carries every security header.
        """
        for name, value in SECURITY_HEADERS.items():
            self.assertEqual(headers.getRawHeaders(name), [value], name)

    async def test_surrogate_hostname(self) -> None:
        """
        A host name holding a lone surrogate renders as U+FFFD (200, valid UTF-8).
        """
        code, body, headers = await self.request("GET", "/")
        self.assertEqual(code, 200)
        self.assertIn("hv\ufffd".encode(), body)
        self.assertEqual(headers.getRawHeaders("Content-Length"), [str(len(body))])

    async def test_trace_put_delete_options(self) -> None:
        """
        TRACE, PUT, DELETE, OPTIONS and POST are 405 with C{Allow: GET, HEAD} and the
        security headers.
        """
        for method in ("TRACE", "PUT", "DELETE", "OPTIONS", "POST"):
            code, body, headers = await self.request(method, "/listVMs")
            self.assertEqual(code, 405, method)
            self.assertEqual(headers.getRawHeaders("Allow"), ["GET, HEAD"])
            self.assertIn(b"GET and HEAD only", body)
            self.assert_secure(headers)

    async def test_head(self) -> None:
        """
        HEAD answers like GET without a body (its Content-Length is checked over a
        real connection in tests.test_pages).
        """
        _, _, get_headers = await self.request("GET", "/listVMs")
        code, body, headers = await self.request("HEAD", "/listVMs")
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(
            headers.getRawHeaders("Content-Type"), get_headers.getRawHeaders("Content-Type")
        )
        self.assert_secure(headers)

    async def test_metrics_and_static_headers(self) -> None:
        """
        /metrics, /healthz and static files carry the security headers.
        """
        for path in ("/metrics", "/healthz", "/static/style.css", "/static/none.js"):
            _, _, headers = await self.request("GET", path)
            self.assert_secure(headers)

    async def test_bad_tail(self) -> None:
        """
        C{tail=²} and a 5,000-digit tail are a 400 with a sentence (the VM need not
        exist: the query is checked first).
        """
        for tail in ("%C2%B2", "9" * 5000):
            code, body, _ = await self.request("GET", f"/showVmBootLog?10.0.0.2&tail={tail}")
            self.assertEqual(code, 400)
            self.assertIn(b"is not a number of lines from 1 to 1000000", body)

    async def test_failing_page_finishes(self) -> None:
        """
        A page that raises answers a finished 500 page and logs the failure once.
        """

        def broken() -> float:
            raise ValueError("clock broke")

        self.manager.reactor = type("R", (), {"seconds": staticmethod(broken)})()
        code, body, headers = await self.request("GET", "/showDhcpStatus")
        self.assertEqual(code, 500)
        self.assertIn(b"internal error", body)
        self.assert_secure(headers)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 2)


class QueryParsingTests(TestCase):
    """
    The query helpers of the pages.
    """

    def request(self, uri: bytes) -> DummyRequest:
        """
        A request for C{uri}.
        """
        request = DummyRequest([b""])
        request.uri = uri
        return request

    def test_split_query(self) -> None:
        """
        Positional words and named parameters are split and percent-decoded.
        """
        words, params = split_query(
            self.request(b"/showVM?10.0.0.2&output=json+x%21"),
            "/showVM",
            positional=(1, 1),
            names=("output",),
        )
        self.assertEqual((words, params), (["10.0.0.2"], {"output": "json x!"}))

    def test_split_query_refusals(self) -> None:
        """
        Unknown names, repeated names, too many words and non-UTF-8 text are
        refused with a 400 and a sentence.
        """
        cases = [
            (b"/?a=1", (0, 0), (), "/ has no parameter 'a'; it takes none"),
            (b"/?a", (0, 0), (), "/ has no parameter 'a'; it takes none"),
            (
                b"/x?b=1",
                (0, 0),
                ("output", "state"),
                "/x has no parameter 'b'; it takes output, state",
            ),
            (b"/x?output=1&output=2", (0, 0), ("output",), "give output once"),
            (b"/x?1&2", (0, 1), (), "give at most 1 window"),
            (b"/x", (1, 1), (), "give one window"),
            (b"/x?%ff", (0, 1), (), "the query of /x is not UTF-8"),
            (b"/x?output=%ed%a0%80", (0, 0), ("output",), "not UTF-8"),
        ]
        for uri, positional, names, message in cases:
            with self.assertRaises(PageError) as caught:
                split_query(
                    self.request(uri),
                    uri.partition(b"?")[0].decode(),
                    positional=positional,
                    names=names,
                    word="window",
                )
            self.assertEqual(caught.exception.status, 400)
            self.assertIn(message, caught.exception.message)

    def test_parse_tail(self) -> None:
        """
        Tails are ASCII digits from 1 to 1,000,000.
        """
        self.assertEqual(parse_tail("100"), 100)
        self.assertEqual(parse_tail("1000000"), 1000000)
        for bad in ("0", "-1", "²", "٣", "1e3", " 1", "1000001", "9" * 5000, ""):
            self.assertRaises(PageError, parse_tail, bad)

    def test_parse_window(self) -> None:
        """
        Windows are finite durations up to ten years.
        """
        self.assertEqual(parse_window("1m"), 60)
        for bad in ("nan", "inf", "1e309", "99999999h", "-1s", "soon"):
            self.assertRaises(PageError, parse_window, bad)

    def test_parse_ip(self) -> None:
        """
        IP addresses are normalised; anything else is a 400.
        """
        self.assertEqual(parse_ip("10.0.0.2", "/showVM"), "10.0.0.2")
        self.assertEqual(parse_ip("fe80:0::1", "/showVM"), "fe80::1")
        for bad in ("10.0.0.256", "10.0.0.02", "x", "10.0.0.2\x00", ""):
            self.assertRaises(PageError, parse_ip, bad, "/showVM")

    def test_clean_text(self) -> None:
        """
        Lone surrogates become U+FFFD; other text is untouched; the result encodes.
        """
        self.assertEqual(clean_text("a\ud800b\udfffc"), "a\ufffdb\ufffdc")
        self.assertEqual(clean_text("naïve ☃ 😀"), "naïve ☃ 😀")
        self.assertEqual(to_utf8("x\udc80"), "x\ufffd".encode())
