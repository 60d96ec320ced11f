"""
Every status page rendered (on a loopback port) with VMs in several states:
content, escaping of hostile values, JSON outputs, filters, errors, metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from hypervisor.auth import ROOT
from hypervisor.logs import LogBuffer
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
from hypervisor.testing import FakeHost
from hypervisor.virt.connection import LibvirtService
from web.status import StatusPages

HOSTILE = "<script>alert(1)</script>"


class PagesTests(TestCase):
    """
    The pages of a daemon holding four VMs.
    """

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.libvirt = LibvirtService("qemu:///system", reactor)
        self.volumes = os.path.join(self.root, "volumes")
        os.makedirs(self.volumes)
        self.manager = Manager(StateDirectory(os.path.join(self.root, "state")),
                               self.libvirt, reactor, domain_type="qemu",
                               volume_directories=[self.volumes],
                               host=FakeHost(cpus=8, memory_mib=16384))
        self.manager.privilegedStartService()
        self.addCleanup(self.manager.state.unlock)
        self.manager.update_subnets([Subnet(Id="net", IpGateway="10.4.0.1",
                                            IpMask="255.255.255.0")], [], [])
        self.manager.change_address_pool(
            [Address(f"10.4.0.{i}", f"52:54:0a:04:00:{i:02x}") for i in range(2, 8)],
            [], {})
        for i, (state, owner) in enumerate([(State.RUNNING, "alice"),
                                            (State.STOPPED, "bob"),
                                            (State.CRASHED, "alice"),
                                            (State.RUNNING, "carol")]):
            self.add_vm(f"10.4.0.{i + 2}", state, owner)
        self.logs = LogBuffer()
        self.metrics = Metrics()
        self.metrics.watch_manager(self.manager)
        self.log_dir = os.path.join(self.root, "logs")
        os.makedirs(self.log_dir)
        with open(os.path.join(self.log_dir, "hypervisor.log"), "w") as f:
            f.write('{"log_format": "hello"}\n')
        self.pages = StatusPages(self.manager, self.libvirt, hostname="hv1",
                                 metrics=self.metrics, logs=self.logs, log_dir=self.log_dir)
        from twisted.web.server import Site

        self.port = reactor.listenTCP(0, Site(self.pages.resource()), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        from twisted.web.client import HTTPConnectionPool

        self.pool = HTTPConnectionPool(reactor, persistent=False)

    def add_vm(self, ip: str, state: State, owner: str) -> None:
        address = self.manager.pool.allocate(self.manager.subnets.get("net"), ip)
        info = VmInfo(Address=address, MemoryInMiB=512, MilliCPUs=1500, State=state,
                      OwnerUsers=[owner], SubnetId="net", Hostname=f"h{ip[-1]}",
                      Tags={"Name": HOSTILE if ip.endswith(".2") else f"vm{ip[-1]}"},
                      Volumes=[Volume(Size=1 << 30)])
        directory = os.path.join(self.manager.state.vms_path, ip)
        os.makedirs(directory)
        vm = Vm(LocalVmInfo(VmInfo=info, VolumeLocations=[VolumeLocation(
            self.volumes, os.path.join(self.volumes, ip, "root"))]), directory)
        self.manager.vms[ip] = vm
        self.manager._save(vm)

    async def get(self, path: str) -> tuple[int, str, Any]:
        """
        GET a page over loopback.
        """
        import treq

        url = f"http://127.0.0.1:{self.port.getHost().port}{path}"
        response = await treq.get(url, pool=self.pool)
        return response.code, await response.text(), response.headers

    async def test_security_headers_everywhere(self) -> None:
        """
        Every page carries the reference's security headers.
        """
        for path in ("/", "/listVMs", "/showVM?10.4.0.2", "/showDhcpStatus", "/logs",
                     "/listSubnets", "/showVM?nope", "/healthz"):
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
        for link in ("/listVMs", "/showDhcpStatus", "/logs", "/metrics", "/healthz",
                     "/listSubnets", "/listAvailableAddresses", "/listRegisteredAddresses",
                     "/listVolumeDirectories", "/showVolumeDirectories", "/rpc"):
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
        for words in ("52:54:0a:04:00:02", "h2", "<strong>alice</strong> (primary)",
                      "1.0 GiB", "&lt;script&gt;", "/showVM?10.4.0.2&amp;output=json",
                      'id="vm-state">running<'):
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
        with open(os.path.join(self.manager.state.vms_path, "10.4.0.2", "bootlog"),
                  "wb") as f:
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
        The DHCP page lists one static lease per VM address (no server yet, said so).
        """
        _, body, _ = await self.get("/showDhcpStatus")
        self.assertIn("no DHCP server yet", body)
        self.assertIn("52:54:0a:04:00:05", body)

    async def test_logs(self) -> None:
        """
        Recent log lines, a time window, the dump, and the log files (by listed name
        only).
        """
        log = Logger(observer=self.logs)
        log.info("VM {ip} started", ip="10.4.0.2")
        log.error("disk <full>")
        self.logs.lines.appendleft(type(self.logs.lines[0])(
            time=time.time() - 7200, level="info", namespace="x", text="old line"))
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
        self.assertEqual(after[("hypervisor_addresses", (("kind", "free"),
                                                         ("subnet", "net")))], 1)

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
