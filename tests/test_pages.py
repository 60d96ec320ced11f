"""
Every status page rendered (on a loopback port) with VMs in several states:
content, escaping of hostile values, JSON outputs, filters, errors, metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import TestCase

from hypervisor.auth import ROOT
from hypervisor.logs import LogBuffer
from hypervisor.manager import report
from hypervisor.manager.manager import Manager
from hypervisor.manager.vm import Vm
from hypervisor.metrics import Metrics
from hypervisor.model import (
    Address,
    LocalVmInfo,
    State,
    Subnet,
    VmInfo,
    Volume,
    VolumeLocation,
)
from hypervisor.store import StateDirectory
from hypervisor.testing import FakeHost, SynchronousRunner
from hypervisor.virt.connection import LibvirtService
from web.root import make_root
from web.status import (
    SECURITY_HEADERS,
    NotARegularFile,
    StatusPages,
    list_log_files,
    read_tail_in,
)

HOSTILE = "<script>alert(1)</script>"


class PagesFixture(TestCase):
    """
    A daemon's pages on a loopback port, holding four VMs (no tests of its own).
    """

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.libvirt = LibvirtService("qemu:///system", reactor)
        self.volumes = os.path.join(self.root, "volumes")
        os.makedirs(self.volumes)
        self.manager = Manager(
            StateDirectory(os.path.join(self.root, "state")),
            self.libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[self.volumes],
            host=FakeHost(cpus=8, memory_mib=16384),
            runner=SynchronousRunner(),
        )
        self.manager.privilegedStartService()
        self.addCleanup(self.manager.state.unlock)
        self.manager.admin.update_subnets(
            [Subnet(Id="net", IpGateway="10.4.0.1", IpMask="255.255.255.0")], [], []
        )
        self.manager.admin.change_address_pool(
            [Address(f"10.4.0.{i}", f"52:54:0a:04:00:{i:02x}") for i in range(2, 8)], [], {}
        )
        for i, (state, owner) in enumerate(
            [
                (State.RUNNING, "alice"),
                (State.STOPPED, "bob"),
                (State.CRASHED, "alice"),
                (State.RUNNING, "carol"),
            ]
        ):
            self.add_vm(f"10.4.0.{i + 2}", state, owner)
        self.logs = LogBuffer()
        self.metrics = Metrics()
        self.metrics.watch_manager(self.manager)
        self.log_dir = os.path.join(self.root, "logs")
        os.makedirs(self.log_dir)
        with open(os.path.join(self.log_dir, "hypervisor.log"), "w") as f:
            f.write('{"log_format": "hello"}\n')
        self.pages = StatusPages(
            self.manager,
            self.libvirt,
            hostname="hv1",
            metrics=self.metrics,
            logs=self.logs,
            log_dir=self.log_dir,
        )
        from twisted.web.server import Site

        self.port = reactor.listenTCP(0, Site(self.pages.resource()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        from twisted.web.client import HTTPConnectionPool

        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def add_vm(self, ip: str, state: State, owner: str) -> None:
        address = self.manager.pool.allocate(self.manager.subnets.get("net"), ip)
        info = VmInfo(
            Address=address,
            MemoryInMiB=512,
            MilliCPUs=1500,
            State=state,
            OwnerUsers=[owner],
            SubnetId="net",
            Hostname=f"h{ip[-1]}",
            Tags={"Name": HOSTILE if ip.endswith(".2") else f"vm{ip[-1]}"},
            Volumes=[Volume(Size=1 << 30)],
        )
        directory = os.path.join(self.manager.state.vms_path, ip)
        os.makedirs(directory)
        vm = Vm(
            LocalVmInfo(
                VmInfo=info,
                VolumeLocations=[
                    VolumeLocation(self.volumes, os.path.join(self.volumes, ip, "root"))
                ],
            ),
            directory,
        )
        self.manager.table.add(vm)
        self.manager.table.record(vm, vm.local)

    async def get(self, path: str) -> tuple[int, str, Any]:
        """
        GET a page over loopback.
        """
        import treq

        url = f"http://127.0.0.1:{self.port.getHost().port}{path}"
        response = await treq.get(url, pool=self.pool)
        return response.code, await response.text(), response.headers


class PagesTests(PagesFixture):
    """
    The pages of a daemon holding four VMs.
    """

    async def test_security_headers_everywhere(self) -> None:
        """
        Every page carries the reference's security headers.
        """
        for path in (
            "/",
            "/listVMs",
            "/showVM?10.4.0.2",
            "/showDhcpStatus",
            "/logs",
            "/listSubnets",
            "/showVM?nope",
            "/healthz",
        ):
            _, _, headers = await self.get(path)
            self.assertEqual(headers.getRawHeaders("X-Frame-Options"), ["DENY"], path)
            self.assertEqual(headers.getRawHeaders("X-Content-Type-Options"), ["nosniff"])
            self.assertTrue(headers.getRawHeaders("Content-Security-Policy"), path)

    async def test_index(self) -> None:
        """
        The summary shows VMs by state with links, capacity, the pool per subnet and
        links to every page.
        """
        code, body, _ = await self.get("/")
        self.assertEqual(code, 200)
        self.assertIn(">2 running</a>", body)
        self.assertIn("/listVMs?state=crashed", body)
        self.assertIn('id="num-vms">4<', body)
        self.assertIn("6000 of 8000 milliCPUs allocated", body)
        self.assertIn("2.0 GiB allocated to VMs", body)
        self.assertIn("10.4.0.0/24", body)
        for link in (
            "/listVMs",
            "/showDhcpStatus",
            "/logs",
            "/metrics",
            "/healthz",
            "/listSubnets",
            "/listAvailableAddresses",
            "/listRegisteredAddresses",
            "/listVolumeDirectories",
            "/showVolumeDirectories",
            "/rpc",
        ):
            self.assertIn(f'href="{link}', body)

    async def test_list_vms(self) -> None:
        """
        The table lists VMs with totals and owners, escapes hostile tags, and filters.
        """
        code, body, _ = await self.get("/listVMs")
        self.assertEqual(code, 200)
        self.assertEqual(body.count('<tr class="vm">'), 4)
        self.assertNotIn(HOSTILE, body)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", body)
        self.assertIn("TOTAL (4 VMs)", body)
        self.assertIn("CAPACITY", body)
        self.assertIn("USAGE", body)
        self.assertIn('href="/listVMs?primaryOwner=alice"', body)
        _, body, _ = await self.get("/listVMs?state=running")
        self.assertEqual(body.count('<tr class="vm">'), 2)
        _, body, _ = await self.get("/listVMs?primaryOwner=alice")
        self.assertEqual(body.count('<tr class="vm">'), 2)
        code, body, _ = await self.get("/listVMs?state=failed%20to%20start&output=text")
        self.assertEqual((code, body), (200, ""))
        code, body, _ = await self.get("/listVMs?output=text")
        self.assertEqual(body.split(), ["10.4.0.2", "10.4.0.3", "10.4.0.4", "10.4.0.5"])
        code, body, _ = await self.get("/listVMs?output=json&state=running")
        infos = json.loads(body)
        self.assertEqual([i["Address"]["IpAddress"] for i in infos], ["10.4.0.2", "10.4.0.5"])
        self.assertEqual(infos[0]["Tags"]["Name"], HOSTILE)
        code, body, _ = await self.get("/listVMs?state=flying")
        self.assertEqual(code, 400)
        self.assertIn("unknown state", body)
        self.assertNotIn("Traceback", body)
        code, body, _ = await self.get("/listVMs?state=flying&output=json")
        self.assertEqual(code, 400)
        self.assertIn("unknown state", json.loads(body)["Error"])

    async def test_show_vm(self) -> None:
        """
        Every field of a VM, its tags and volumes; JSON; friendly 404 and 400.
        """
        code, body, _ = await self.get("/showVM?10.4.0.2")
        self.assertEqual(code, 200)
        for words in (
            "52:54:0a:04:00:02",
            "h2",
            "<strong>alice</strong> (primary)",
            "1.0 GiB",
            "&lt;script&gt;",
            "/showVM?10.4.0.2&amp;output=json",
            'id="vm-state">running<',
        ):
            self.assertIn(words, body)
        self.assertNotIn(HOSTILE, body)
        code, body, _ = await self.get("/showVM?10.4.0.2&output=json")
        self.assertEqual(json.loads(body)["OwnerUsers"], ["alice"])
        code, body, _ = await self.get("/showVM?10.9.9.9")
        self.assertEqual(code, 404)
        self.assertIn("no VM with IP 10.9.9.9", body)
        code, body, _ = await self.get("/showVM?10.9.9.9&output=json")
        self.assertEqual((code, json.loads(body)["Error"]), (404, "no VM with IP 10.9.9.9"))
        code, body, _ = await self.get("/showVM")
        self.assertEqual(code, 400)

    async def test_boot_log(self) -> None:
        """
        The serial log as text with CRLF turned into LF, and its tail.
        """
        with open(os.path.join(self.manager.state.vms_path, "10.4.0.2", "bootlog"), "wb") as f:
            f.write(b"".join(b"line %d\r\n" % i for i in range(200)))
        code, body, headers = await self.get("/showVmBootLog?10.4.0.2")
        self.assertEqual(code, 200)
        self.assertNotIn("\r", body)
        self.assertEqual(len(body.splitlines()), 200)
        self.assertTrue(headers.getRawHeaders("Content-Type")[0].startswith("text/plain"))
        _, body, _ = await self.get("/showVmBootLog?10.4.0.2&tail=3")
        self.assertEqual(body, "line 197\nline 198\nline 199\n")
        code, _, _ = await self.get("/showVmBootLog?10.4.0.2&tail=x")
        self.assertEqual(code, 400)
        code, _, _ = await self.get("/showVmBootLog?10.4.0.9")
        self.assertEqual(code, 404)

    async def test_json_and_text_lists(self) -> None:
        """
        Subnets, addresses and volume directories in the reference's formats.
        """
        _, body, _ = await self.get("/listSubnets")
        self.assertEqual(json.loads(body)[0]["Id"], "net")
        _, body, _ = await self.get("/listAvailableAddresses")
        self.assertEqual([a["IpAddress"] for a in json.loads(body)], ["10.4.0.6", "10.4.0.7"])
        _, body, _ = await self.get("/listRegisteredAddresses")
        self.assertEqual(len(json.loads(body)), 6)
        _, body, _ = await self.get("/listVolumeDirectories")
        self.assertEqual(body, self.volumes + "\n")
        _, body, _ = await self.get("/showVolumeDirectories")
        entry = json.loads(body)[0]
        self.assertEqual(entry["Directory"], self.volumes)
        self.assertGreater(entry["Size"], 0)

    async def test_dhcp_page(self) -> None:
        """
        Without a DHCP server the DHCP page says so and lists the static lease of each
        VM address it would serve.
        """
        _, body, _ = await self.get("/showDhcpStatus")
        self.assertIn("runs no DHCP server", body)
        self.assertIn("52:54:0a:04:00:05", body)

    async def test_logs(self) -> None:
        """
        Recent log lines, a time window, the dump, and the log files (by listed name
        only).
        """
        log = Logger(observer=self.logs)
        log.info("VM {ip} started", ip="10.4.0.2")
        log.error("disk <full>")
        self.logs.lines.appendleft(
            type(self.logs.lines[0])(
                time=time.time() - 7200, level="info", namespace="x", text="old line"
            )
        )
        _, body, _ = await self.get("/logs")
        self.assertIn("VM 10.4.0.2 started", body)
        self.assertIn("disk &lt;full&gt;", body)
        self.assertIn("/logs/file?hypervisor.log", body)
        _, body, _ = await self.get("/logs/showLast?1m")
        self.assertIn("VM 10.4.0.2 started", body)
        self.assertNotIn("old line", body)
        _, body, _ = await self.get("/logs/dump")
        self.assertIn("old line", body)
        code, body, _ = await self.get("/logs/file?hypervisor.log")
        self.assertEqual((code, body), (200, '{"log_format": "hello"}\n'))
        code, _, _ = await self.get("/logs/file?../state/uuid")
        self.assertEqual(code, 404)
        code, _, _ = await self.get("/logs/showLast?soon")
        self.assertEqual(code, 400)

    async def test_metrics(self) -> None:
        """
        /metrics parses as Prometheus text, counts VMs by state, and changes when a VM
        is added.
        """

        def values(text: str) -> dict[tuple[str, tuple], float]:
            out = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
            return out

        _, body, _ = await self.get("/metrics")
        before = values(body)
        self.assertEqual(before[("hypervisor_vms", (("state", "running"),))], 2)
        self.assertEqual(before[("hypervisor_milli_cpus", (("kind", "allocated"),))], 6000)
        self.assertEqual(before[("hypervisor_libvirt_connected", ())], 0)
        self.add_vm("10.4.0.6", State.RUNNING, "dave")
        _, body, _ = await self.get("/metrics")
        after = values(body)
        self.assertEqual(after[("hypervisor_vms", (("state", "running"),))], 3)
        self.assertEqual(after[("hypervisor_addresses", (("kind", "free"), ("subnet", "net")))], 1)

    async def test_unknown_page(self) -> None:
        """
        An unknown path is a friendly 404 page.
        """
        code, body, _ = await self.get("/no/such/page")
        self.assertEqual(code, 404)
        self.assertIn("no page at", body)
        self.assertNotIn("Traceback", body)

    async def test_empty_daemon(self) -> None:
        """
        With no VMs and no subnets the pages still render and say so.
        """
        for ip in list(self.manager.vms):
            del self.manager.vms[ip]
        _, body, _ = await self.get("/")
        self.assertIn("No VMs yet", body)
        _, body, _ = await self.get("/listVMs")
        self.assertIn("No VMs", body)
        self.assertIn("TOTAL (0 VMs)", body)


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """
    Send C{data} (a whole HTTP request, asking to close) to 127.0.0.1:C{port}; return
    the status, the headers (lower-case names) and the body. Blocking (a thread).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class HostilePagesTests(PagesFixture):
    """
    Hostile stored values and hostile requests: every page answers (never hangs),
    malformed input is a 400/404 with a sentence and no traceback, only GET and HEAD
    are served, and the log directory is read without following links.
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def raw(self, data: bytes) -> tuple[int, dict[str, str], bytes]:
        """
        A raw request over loopback (see L{raw_request}).
        """
        return await deferToThread(raw_request, self.port.getHost().port, data)

    async def fetch(
        self, path: str, method: bytes = b"GET", headers: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        """
        C{method} C{path} (sent as is) over a raw connection.
        """
        return await self.raw(
            method + b" " + path.encode("latin-1") + b" HTTP/1.1\r\n"
            b"Host: hv\r\nConnection: close\r\n" + headers + b"\r\n"
        )

    def tracebacks(self) -> list[dict]:
        """
        The log events logged with a failure since the test started.
        """
        return [
            e
            for e in self.events
            if e.get("log_failure") is not None or "Traceback" in str(e.get("log_format", ""))
        ]

    def make_hostile(self) -> None:
        """
        Give the VMs lone surrogates in a tag, an owner, a group and a hostname (as
        stored before input was validated).
        """
        vm = self.manager.vms["10.4.0.3"]
        vm.info.Tags["Name"] = "bad\ud800name"
        vm.info.Tags["\udfff"] = "x\udc80"
        vm.info.OwnerUsers = ["bob\ud800"]
        vm.info.OwnerGroups = ["g\udbff"]
        vm.info.Hostname = "h\ud800"
        self.manager.ctx.owner_users = frozenset({"root\ud800"})

    async def test_lone_surrogates_render(self) -> None:
        """
        Pages holding lone surrogates (tags, owners, hostname) answer 200 at once,
        with U+FFFD in place of each surrogate, in HTML, text and JSON forms.
        """
        self.make_hostile()
        for path in (
            "/",
            "/listVMs",
            "/showVM?10.4.0.3",
            "/showDhcpStatus",
            "/listVMs?output=json",
            "/listVMs?output=text",
            "/showVM?10.4.0.3&output=json",
            "/listVMs?primaryOwner=bob%EF%BF%BD",
        ):
            code, headers, body = await self.fetch(path)
            self.assertEqual(code, 200, path)
            self.assertEqual(int(headers["content-length"]), len(body), path)
            body.decode("utf-8")
        _, _, body = await self.fetch("/listVMs")
        self.assertIn("bad\ufffdname".encode(), body)
        self.assertIn("bob\ufffd".encode(), body)
        self.assertIn(b'href="/listVMs?primaryOwner=bob%EF%BF%BD"', body)
        _, _, body = await self.fetch("/showVM?10.4.0.3")
        for text in ("h\ufffd", "g\ufffd", "x\ufffd"):
            self.assertIn(text.encode(), body)
        _, _, body = await self.fetch("/showVM?10.4.0.3&output=json")
        # the JSON is escaped ASCII; the codec may already write U+FFFD instead
        self.assertIn(
            ascii(json.loads(body)["Tags"]["Name"]),
            {ascii("bad\ud800name"), ascii("bad\ufffdname")},
        )
        self.assertEqual(self.tracebacks(), [])

    async def test_rendering_failure_is_a_finished_500(self) -> None:
        """
        A page that fails while rendering answers a 500 page (no traceback in it) that
        finishes the request; the failure is logged once, with its traceback.
        """

        def broken() -> tuple[int, int]:
            raise RuntimeError("memory went away")

        self.manager.host.memory = broken  # type: ignore[method-assign]
        code, headers, body = await self.fetch("/")
        self.assertEqual(code, 500)
        self.assertIn(b"internal error; the log has the details", body)
        self.assertNotIn(b"Traceback", body)
        self.assertNotIn(b"memory went away", body)
        self.assertEqual(headers["x-frame-options"], "DENY")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_error_page_failure_still_answers(self) -> None:
        """
        Even when the error page cannot be rendered, the request gets a plain 500.
        """

        def broken(*args: Any, **kwargs: Any) -> str:
            raise RuntimeError("templates gone")

        self.pages._render = broken  # type: ignore[method-assign]
        code, _, body = await self.fetch("/showDhcpStatus")
        self.assertEqual(code, 500)
        self.assertIn(b"internal error", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_malformed_queries(self) -> None:
        """
        Malformed and unknown query parameters of every page are a 400 with a
        sentence, unknown VMs and files a 404; nothing is logged with a traceback.
        """
        cases = {
            "/showVmBootLog?10.4.0.2&tail=%C2%B2": (400, b"is not a number of lines"),
            "/showVmBootLog?10.4.0.2&tail=" + "9" * 5000: (400, b"number of lines"),
            "/showVmBootLog?10.4.0.2&tail=0": (400, b"from 1 to 1000000"),
            "/showVmBootLog?10.4.0.2&tail=-3": (400, b"number of lines"),
            "/showVmBootLog?10.4.0.2&tail=1000001": (400, b"number of lines"),
            "/showVmBootLog?10.4.0.2&tail=%EF%BC%93": (400, b"number of lines"),
            "/showVmBootLog?10.4.0.2&lines=3": (
                400,
                b"has no parameter &#39;lines&#39;; it takes tail",
            ),
            "/showVmBootLog?nope": (400, b"is not an IP address"),
            "/showVmBootLog": (400, b"give one IP address"),
            "/showVmBootLog?10.4.0.99": (404, b"no VM with IP 10.4.0.99"),
            "/showVM?10.4.0.2&10.4.0.3": (400, b"give one IP address"),
            "/showVM?10.4.0.2%00": (400, b"is not an IP address"),
            "/showVM?999.1.1.1": (400, b"is not an IP address"),
            "/showVM?10.4.0.2&output=xml": (400, b"unknown output"),
            "/showVM?10.4.0.2&output=json&output=json": (400, b"give output once"),
            "/showVM?%ff": (400, b"not UTF-8"),
            "/listVMs?output=csv": (400, b"unknown output"),
            "/listVMs?state=%ff": (400, b"not UTF-8"),
            "/listVMs?primaryOwner=bob%ED%A0%80": (400, b"not UTF-8"),
            "/listVMs?sort=ip": (400, b"has no parameter &#39;sort&#39;"),
            "/listVMs?running": (400, b"has no parameter &#39;running&#39;"),
            "/?x=1": (400, b"it takes none"),
            "/listSubnets?x": (400, b"no parameter"),
            "/listAvailableAddresses?x": (400, b"no parameter"),
            "/listRegisteredAddresses?x": (400, b"no parameter"),
            "/listVolumeDirectories?x": (400, b"no parameter"),
            "/showVolumeDirectories?x": (400, b"no parameter"),
            "/showDhcpStatus?x": (400, b"no parameter"),
            "/logs?x": (400, b"no parameter"),
            "/logs/dump?x": (400, b"no parameter"),
            "/metrics?x": (400, b"no parameter"),
            "/healthz?x": (400, b"no parameter"),
            "/logs/showLast?nan": (400, b"out of range"),
            "/logs/showLast?1e309": (400, b"out of range"),
            "/logs/showLast?99999999h": (400, b"out of range"),
            "/logs/showLast?soon": (400, b"bad window"),
            "/logs/showLast?1m&2m": (400, b"give at most 1 window"),
            "/logs/file?nothing": (404, b"no such log file"),
            "/logs/file?hypervisor.log&x=1": (404, b"no such log file"),
            "/logs/file": (404, b"no such log file"),
            "/%ff": (400, b"the path is not UTF-8"),
            "/listVMs/%ed%a0%80": (400, b"the path is not UTF-8"),
            "/no/such/page": (404, b"no page at"),
            "/listVMs/": (404, b"no page at"),
            "/static/nope.css": (404, b"no such file"),
        }
        for path, (status, words) in cases.items():
            code, headers, body = await self.fetch(path)
            self.assertEqual(code, status, path)
            self.assertIn(words, body, path)
            self.assertNotIn(b"Traceback", body)
            self.assertEqual(headers["x-content-type-options"], "nosniff", path)
        code, _, _ = await self.fetch("/\xff\xfe")  # raw bytes: Twisted's own 400
        self.assertEqual(code, 400)
        code, _, body = await self.fetch("/listVMs?output=json&state=flying")
        self.assertIn("unknown state", json.loads(body)["Error"])
        code, _, body = await self.fetch("/showVM?10.4.0.2&output=json&bad=1")
        self.assertEqual(code, 400)
        self.assertIn("no parameter 'bad'", json.loads(body)["Error"])
        code, _, _ = await self.raw(
            b"GET / HTTP/1.1\r\nHost: \xff\xfe\r\n" b"Connection: close\r\n\r\n"
        )
        self.assertEqual(code, 400)
        self.assertEqual(self.tracebacks(), [])

    async def test_methods(self) -> None:
        """
        Methods other than GET and HEAD are a 405 with C{Allow: GET, HEAD}, on pages,
        unknown paths and static files alike; HEAD answers GET's headers without a
        body.
        """
        for method in (
            b"TRACE",
            b"PUT",
            b"DELETE",
            b"OPTIONS",
            b"POST",
            b"PATCH",
            b"PROPFIND",
            b"BREW",
        ):
            for path in ("/", "/listVMs", "/metrics", "/static/style.css", "/nope"):
                code, headers, body = await self.fetch(path, method)
                self.assertEqual(code, 405, (method, path))
                self.assertEqual(headers["allow"], "GET, HEAD")
                self.assertEqual(headers["x-frame-options"], "DENY")
                self.assertIn(b"GET and HEAD only", body)
        for path in (
            "/",
            "/listVMs",
            "/showVM?10.4.0.2",
            "/metrics",
            "/nope",
            "/static/style.css",
            "/showVM?bad",
        ):
            get_code, get_headers, get_body = await self.fetch(path)
            code, headers, body = await self.fetch(path, b"HEAD")
            self.assertEqual((code, body), (get_code, b""), path)
            if path != "/metrics":
                self.assertEqual(headers["content-length"], get_headers["content-length"])
            self.assertEqual(headers["content-type"], get_headers["content-type"])
        self.assertEqual(self.tracebacks(), [])

    async def test_bodies_refused(self) -> None:
        """
        A request body to a page is refused (413) rather than used; a PUT with a body
        is a 405.
        """
        code, _, body = await self.raw(
            b"GET /listVMs HTTP/1.1\r\nHost: hv\r\nConnection: close\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        self.assertEqual(code, 413)
        self.assertIn(b"takes no request body", body)
        code, _, _ = await self.raw(
            b"GET /listVMs HTTP/1.1\r\nHost: hv\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        self.assertEqual(code, 413)
        code, _, _ = await self.raw(
            b"PUT /listVMs HTTP/1.1\r\nHost: hv\r\nConnection: close\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        self.assertEqual(code, 405)
        code, _, _ = await self.raw(
            b"GET /listVMs HTTP/1.1\r\nHost: hv\r\nConnection: close\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertEqual(code, 200)

    async def test_security_headers_on_every_response(self) -> None:
        """
        Every response carries the security headers: /metrics, /healthz, static
        files, errors (400, 404, 405, 413, 500) included.
        """

        def broken(*args: Any) -> Any:
            raise RuntimeError("no totals")

        self.patch(report, "totals", broken)
        for method, path, status in (
            (b"GET", "/metrics", 200),
            (b"GET", "/healthz", 503),
            (b"GET", "/static/style.css", 200),
            (b"GET", "/static/x.css", 404),
            (b"GET", "/nope", 404),
            (b"GET", "/%ff", 400),
            (b"GET", "/?x", 400),
            (b"TRACE", "/", 405),
            (b"GET", "/listVMs", 500),
            (b"HEAD", "/metrics", 200),
        ):
            code, headers, _ = await self.fetch(path, method)
            self.assertEqual(code, status, path)
            for name, value in SECURITY_HEADERS.items():
                self.assertEqual(headers.get(name.decode().lower()), value.decode(), (path, name))
        self.flushLoggedErrors(RuntimeError)

    async def test_log_directory_links_and_odd_names(self) -> None:
        """
        /logs lists only regular files directly in the log directory: a symbolic link
        (to a file outside) and a FIFO are neither listed nor served; a file whose
        name is not UTF-8 is listed (U+FFFD) and served by its percent-encoded name.
        """
        secret = os.path.join(self.root, "secret")
        with open(secret, "w") as f:
            f.write("root-cookie\n")
        os.symlink(secret, os.path.join(self.log_dir, "link.log"))
        os.mkfifo(os.path.join(self.log_dir, "fifo.log"))
        odd = os.path.join(os.fsencode(self.log_dir), b"old-\xff.log")
        with open(odd, "wb") as f:
            f.write(b"odd file\n")
        code, _, body = await self.fetch("/logs")
        self.assertEqual(code, 200)
        self.assertNotIn(b"link.log", body)
        self.assertNotIn(b"fifo.log", body)
        self.assertIn("old-\ufffd.log".encode(), body)
        self.assertIn(b'href="/logs/file?old-%FF.log"', body)
        code, _, body = await self.fetch("/logs/file?old-%FF.log")
        self.assertEqual((code, body), (200, b"odd file\n"))
        for name in ("link.log", "fifo.log", "..%2Fsecret", "%2E%2E", "."):
            code, _, body = await self.fetch("/logs/file?" + name)
            self.assertEqual(code, 404, name)
            self.assertNotIn(b"root-cookie", body)
        code, _, _ = await self.fetch("/logs/showLast?1m")
        self.assertEqual(code, 200)
        self.assertEqual(self.tracebacks(), [])

    async def test_boot_log_link_not_followed(self) -> None:
        """
        A boot log that is a symbolic link is not followed (404 with a sentence).
        """
        secret = os.path.join(self.root, "secret")
        with open(secret, "w") as f:
            f.write("root-cookie\n")
        os.symlink(secret, os.path.join(self.manager.state.vms_path, "10.4.0.2", "bootlog"))
        code, _, body = await self.fetch("/showVmBootLog?10.4.0.2")
        self.assertEqual(code, 404)
        self.assertIn(b"not a regular file", body)
        self.assertNotIn(b"root-cookie", body)

    def test_read_tail_in(self) -> None:
        """
        L{read_tail_in} reads the tail of a regular file directly inside a directory
        and refuses links, FIFOs, directories and names with a slash.
        """
        directory = self.log_dir
        with open(os.path.join(directory, "a"), "wb") as f:
            f.write(b"0123456789")
        os.symlink(os.path.join(directory, "a"), os.path.join(directory, "l"))
        os.mkfifo(os.path.join(directory, "p"))
        os.mkdir(os.path.join(directory, "d"))
        self.assertEqual(read_tail_in(directory, b"a", 4), b"6789")
        self.assertIsNone(read_tail_in(directory, b"missing", 4))
        for name in (b"l", b"p", b"d", b"../logs/a", b"", b".", b".."):
            self.assertRaises(NotARegularFile, read_tail_in, directory, name, 4)
        self.assertEqual([e.name for e in list_log_files(directory)], [b"a", b"hypervisor.log"])

    async def test_root_dispatch_non_utf8(self) -> None:
        """
        Through the web root, a non-UTF-8 path is a 400 page (pages) or a JSON 400
        (under /rpc) without a logged traceback; /rpc still reaches the RPC resource.
        """
        from twisted.web.server import Site
        from twisted.web.static import Data

        class FakeRpc:
            def resource(self) -> Data:
                leaf = Data(b"rpc here\n", "text/plain")
                leaf.isLeaf = True
                return leaf

        port = reactor.listenTCP(0, Site(make_root(self.pages, FakeRpc())), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        async def get(path: bytes) -> tuple[int, dict[str, str], bytes]:
            return await deferToThread(
                raw_request,
                port.getHost().port,
                b"GET " + path + b" HTTP/1.1\r\nHost: hv\r\nConnection: close\r\n\r\n",
            )

        code, _, body = await get(b"/rpc/Hypervisor.ListVMs")
        self.assertEqual((code, body), (200, b"rpc here\n"))
        code, headers, body = await get(b"/rpc/%ff")
        self.assertEqual(code, 400)
        self.assertIn("not UTF-8", json.loads(body)["Error"])
        self.assertEqual(headers["x-frame-options"], "DENY")
        code, _, body = await get(b"/%ff")
        self.assertEqual(code, 400)
        self.assertIn(b"the path is not UTF-8", body)
        code, _, body = await get(b"/listVMs")
        self.assertEqual(code, 200)
        self.assertEqual(self.tracebacks(), [])
