"""
Tests for L{web.status.StatusPages}, in memory with treq's StubTreq.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from hypervisor.manager.manager import Manager
from hypervisor.store import StateDirectory
from hypervisor.virt.connection import LibvirtService
from hypervisor.virt.domains import DomainSummary
from web.status import StatusPages, format_uptime


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
        self.manager = Manager(StateDirectory(os.path.join(self.dir, "s")),
                               self.libvirt, self.clock)
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
        self.manager.domains = {
            "u1": DomainSummary("vm-a", "u1", "running", True, True, "10.0.0.2"),
            "u2": DomainSummary("other", "u2", "shut off", False, False, None),
        }
        self.manager.domains_current = True
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
        self.manager.state.set_disabled(True)
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
