"""
The DHCP server in the daemon: C{/showDhcpStatus} (interfaces, static, external,
netboot and dynamic leases with expiry; values from clients escaped), its C{/metrics}
(packets by type and interface, replies, NAKs, drops by reason, latency), and the
C{dhcp} child of C{makeService} configured from the flags.
"""

from __future__ import annotations

import tempfile
from typing import Any

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

import tap
from hypervisor.dhcp import codec
from hypervisor.dhcp.codec import MessageType
from hypervisor.dhcp.interfaces import Discovery
from hypervisor.dhcp.service import DhcpService
from hypervisor.metrics import Metrics
from hypervisor.model import Address
from hypervisor.testing import SynchronousRunner
from tests.test_dhcp_policy import Harness, client, iface
from web.status import StatusPages


class PageTests(TestCase):
    """
    C{/showDhcpStatus} with a DHCP server.
    """

    def setUp(self) -> None:
        self.h = Harness(self)
        self.service = DhcpService(
            self.h.server,
            self.h.clock,
            runner=SynchronousRunner(),
            discover=lambda bridges_only: Discovery(self.h.policy.host),
        )
        self.service.discovery = Discovery(
            self.h.policy.host, {"br0": iface("br0", "10.5.0.1/24", index=5)}
        )
        self.service.problems["br9"] = "cannot listen on port 67 of br9: Address already in use"
        self.pages = StatusPages(self.h.manager, None, hostname="hv", dhcp=self.service)  # type: ignore[arg-type]
        self.treq = StubTreq(self.pages.resource())

    async def page(self) -> str:
        response = await self.treq.get("http://hv/showDhcpStatus")
        self.assertEqual(response.code, 200)
        body: str = await response.text()
        return body

    async def test_every_kind_of_lease(self) -> None:
        """
        The page lists interfaces (with problems), and static, external, netboot and
        dynamic leases; a client's host name is escaped.
        """
        ip = self.h.create_vm(Hostname="web1", SubnetId="net")
        self.h.policy.register_external_leases(
            [Address("10.5.0.50", "02:00:00:05:00:50")], ["printer"]
        )
        d = self.h.policy.netboot_machine(
            Address("10.5.0.70", "02:00:00:05:00:70"), "installer", None, {}, 0, 60, 0, 0
        )
        self.addCleanup(lambda: d.addErrback(lambda f: None))
        mac = "02:00:00:07:00:01"
        offer, _ = self.h.one(client(MessageType.DISCOVER, mac), "br2")
        self.h.one(
            client(
                MessageType.REQUEST,
                mac,
                requested=offer.yiaddr,
                server="10.7.0.1",
                options={codec.HOST_NAME: b"<script>x</script>"},
            ),
            "br2",
        )
        body = await self.page()
        self.assertIn("<code>br0</code>", body)
        self.assertIn("10.5.0.1/24", body)
        self.assertIn("Address already in use", body)
        for text in (ip, "web1", "10.5.0.50", "printer", "10.5.0.70", "installer", "0 of 0"):
            self.assertIn(text, body)
        self.assertIn(offer.yiaddr, body)
        self.assertIn("bound", body)
        self.assertIn("&lt;script&gt;x&lt;/script&gt;", body)
        self.assertNotIn("<script>", body)
        self.assertIn("UTC", body)


class MetricsTests(TestCase):
    """
    The DHCP server's metrics.
    """

    def test_counted(self) -> None:
        """
        Packets by type and interface, replies, NAKs, drops by reason and the reply
        latency reach the Prometheus text.
        """
        h = Harness(self)
        metrics = Metrics()
        h.server.stats = metrics.dhcp
        h.policy.on_drop = metrics.dhcp.dropped
        h.policy.on_nak = metrics.dhcp.nak
        ip = h.create_vm(SubnetId="net")
        mac = h.mac_of(ip)
        h.one(client(MessageType.DISCOVER, mac))
        h.one(client(MessageType.REQUEST, mac, requested="10.5.0.77"))
        h.none(client(MessageType.DISCOVER, "02:00:00:00:00:99"))
        h.protocols["br0"].datagramReceived(b"junk", ("0.0.0.0", 68))
        text = metrics.own_text().decode()
        for line in (
            'hypervisor_dhcp_packets_total{interface="br0",type="discover"} 2.0',
            'hypervisor_dhcp_packets_total{interface="br0",type="request"} 1.0',
            'hypervisor_dhcp_packets_total{interface="br0",type="malformed"} 1.0',
            'hypervisor_dhcp_replies_total{type="offer"} 1.0',
            'hypervisor_dhcp_replies_total{type="nak"} 1.0',
            'hypervisor_dhcp_naks_total{reason="wrong-address"} 1.0',
            'hypervisor_dhcp_drops_total{reason="unknown-client"} 1.0',
            'hypervisor_dhcp_drops_total{reason="malformed"} 1.0',
            "hypervisor_dhcp_reply_seconds_count 2.0",
        ):
            self.assertIn(line, text)


class MakeServiceTests(TestCase):
    """
    The C{dhcp} child of the daemon's service tree.
    """

    def make(self, *flags: str) -> Any:
        options = tap.Options(flags_directory=tempfile.mkdtemp())
        options.parseOptions(["-stateDir=/tmp/hv-dhcp-tap-test", "-portNum=0", *flags])
        return tap.makeService(options, reactor=MemoryReactorClock())

    def test_defaults(self) -> None:
        """
        By default: every broadcast interface, C{pxelinux.%d}, option 121 on, dynamic
        leases in the state directory, the manager's writer and acknowledgement seam.
        """
        top = self.make()
        dhcp = top.getServiceNamed("dhcp")
        manager = top.getServiceNamed("manager")
        self.assertFalse(dhcp.bridges_only)
        self.assertEqual(dhcp.policy.network_boot_image, "pxelinux.%d")
        self.assertTrue(dhcp.policy.metadata_route)
        self.assertEqual(dhcp.policy.leases_path, "/tmp/hv-dhcp-tap-test/dynamic-leases.json")
        self.assertIs(dhcp.policy.writer, manager.writer)
        self.assertIs(dhcp.acks, manager.ctx.acks)
        self.assertIs(dhcp.policy.acks, manager.ctx.acks)
        self.assertIs(dhcp.runner, manager.runner)

    def test_flags(self) -> None:
        """
        The DHCP flags reach the service.
        """
        dhcp = self.make(
            "-dhcpServerOnBridgesOnly", "-networkBootImage=boot-%d.efi", "-dhcpMetadataRoute=false"
        ).getServiceNamed("dhcp")
        self.assertTrue(dhcp.bridges_only)
        self.assertEqual(dhcp.policy.network_boot_image, "boot-%d.efi")
        self.assertFalse(dhcp.policy.metadata_route)
