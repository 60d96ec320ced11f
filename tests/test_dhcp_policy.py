"""
The DHCP server in memory: the policy (L{hypervisor.dhcp.policy}) behind the protocol
(L{hypervisor.dhcp.protocol}) on a fake datagram transport, over a real manager on a
C{Clock} (L{tests.test_manager_clock.ClockDaemon}), so VM leases follow CreateVm,
DestroyVm and ChangeVmHostname through the manager's listener interface.

Every case of the issue: DORA, INIT-REBOOT, renew, rebind, every NAK case, dynamic
leases (offer, bind, persistence, exhaustion, expiry, restart), DECLINE, RELEASE,
INFORM, netboot by architecture, unknown MACs, external leases replaced, relayed
requests, option 121, WatchDhcp.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from typing import Any, Optional

from twisted.internet.testing import FakeDatagramTransport
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.auth import ROOT
from hypervisor.dhcp import codec
from hypervisor.dhcp.codec import MessageType, Packet
from hypervisor.dhcp.policy import (
    DECLINE_HOLD,
    DYNAMIC_EXPIRY,
    DYNAMIC_OFFER_HOLD,
    AcknowledgementTimeout,
    DhcpPolicy,
    HostInterface,
    HostView,
    format_boot_image,
)
from hypervisor.dhcp.protocol import DhcpProtocol, DhcpServer, destination
from hypervisor.dhcp.watch import NOT_KEEPING_UP, PacketWatchers
from hypervisor.errors import InvalidRequest
from hypervisor.model import (
    AccessRequest,
    Address,
    ChangeAddressPoolRequest,
    ChangeVmHostnameRequest,
    Subnet,
    UpdateSubnetsRequest,
)
from tests.test_manager_clock import ALICE, ClockDaemon, fired

SERVER = "10.5.0.1"
OTHER_SERVER = "10.5.0.254"
UNKNOWN = "02:00:00:00:00:99"


class Stats:
    """
    Records what the server counts.
    """

    def __init__(self) -> None:
        self.received_log: list[tuple[str, str]] = []
        self.replies: list[str] = []
        self.drops: list[str] = []
        self.naks: list[str] = []
        self.latencies: list[float] = []

    def received(self, kind: str, interface: str) -> None:
        self.received_log.append((kind, interface))

    def replied(self, kind: str, seconds: float) -> None:
        self.replies.append(kind)
        self.latencies.append(seconds)

    def dropped(self, reason: str) -> None:
        self.drops.append(reason)

    def nak(self, reason: str) -> None:
        self.naks.append(reason)


def iface(name: str, *cidrs: str, index: int = 1) -> HostInterface:
    """
    A host interface with these addresses.
    """
    return HostInterface(name, index, "bridge", tuple(ipaddress.IPv4Interface(c) for c in cidrs))


class Harness:
    """
    A manager on a Clock with subnets "net" (10.5.0.0/24, br0), "net2" (10.6.0.0/24,
    br1) and "dyn" (10.7.0.0/24, br2, dynamic range .100-.102), and the DHCP server
    with one protocol per bridge on fake transports.
    """

    def __init__(self, testcase: SynchronousTestCase, **policy: Any) -> None:
        self.testcase = testcase
        self.daemon = ClockDaemon(testcase).start().network()
        self.clock = self.daemon.clock
        self.manager = self.daemon.manager
        api = self.daemon.api
        subnets = [
            Subnet(Id="net2", IpGateway="10.6.0.1", IpMask="255.255.255.0"),
            Subnet(
                Id="dyn",
                IpGateway="10.7.0.1",
                IpMask="255.255.255.0",
                DomainNameServers=["10.7.0.53", "10.7.0.54"],
                DomainName="dyn.example",
                FirstDynamicIP="10.7.0.100",
                LastDynamicIP="10.7.0.102",
            ),
        ]
        assert fired(api.UpdateSubnets(ROOT, UpdateSubnetsRequest(Add=subnets))).Error == ""
        assert (
            fired(
                api.ChangeAddressPool(
                    ROOT,
                    ChangeAddressPoolRequest(
                        AddressesToAdd=[Address("10.6.0.2", "52:54:0a:06:00:02")]
                    ),
                )
            ).Error
            == ""
        )
        self.leases_path = os.path.join(self.daemon.root, "state", "dynamic-leases.json")
        self.policy_settings = policy
        self.watchers = PacketWatchers(max_queued=4)
        self.make_server()

    def make_server(self) -> None:
        """
        (Re)build the policy and the server, as a restart of the DHCP service does.
        """
        self.stats = Stats()
        self.arp: list[tuple[str, str, bytes]] = []
        self.policy = DhcpPolicy(
            self.manager,
            self.clock,
            writer=self.manager.writer,
            leases_path=self.leases_path,
            acks=self.manager.ctx.acks,
            reserved=lambda: [a.IpAddress for a in self.manager.pool.registered],
            **self.policy_settings,
        )
        self.policy.load()
        self.policy.start()
        self.testcase.addCleanup(self.policy.stop)
        interfaces = {
            "br0": iface("br0", "10.5.0.1/24", index=5),
            "br1": iface("br1", "10.6.0.1/24", index=6),
            "br2": iface("br2", "10.7.0.1/24", index=7),
            "eth0": iface("eth0", "10.9.9.9/24", index=2),
        }
        self.policy.set_host(
            HostView(
                interfaces=interfaces,
                my_ips=frozenset(str(a.ip) for i in interfaces.values() for a in i.addresses),
                first_ip="10.9.9.9",
            )
        )
        self.server = DhcpServer(
            self.policy,
            stats=self.stats,
            watchers=self.watchers,
            arp=lambda fd, name, ip, mac: self.arp.append((name, ip, mac)),
        )
        self.protocols: dict[str, DhcpProtocol] = {}
        self.transports: dict[str, FakeDatagramTransport] = {}
        for name in interfaces:
            protocol = DhcpProtocol(self.server, name)
            transport = FakeDatagramTransport()
            protocol.makeConnection(transport)
            self.protocols[name] = protocol
            self.transports[name] = transport

    def send(self, packet: Packet, interface: str = "br0") -> list[tuple[Packet, Any]]:
        """
        Deliver C{packet} on C{interface}; the replies sent (decoded, with their
        destination).
        """
        transport = self.transports[interface]
        before = len(transport.written)
        self.protocols[interface].datagramReceived(codec.encode(packet), ("0.0.0.0", 68))
        self.daemon.settle()
        return [(codec.decode(data), addr) for data, addr in transport.written[before:]]

    def one(self, packet: Packet, interface: str = "br0") -> tuple[Packet, Any]:
        """
        Deliver C{packet}; exactly one reply is expected.
        """
        replies = self.send(packet, interface)
        self.testcase.assertEqual(len(replies), 1, replies)
        return replies[0]

    def none(self, packet: Packet, interface: str = "br0") -> None:
        """
        Deliver C{packet}; no reply is expected.
        """
        self.testcase.assertEqual(self.send(packet, interface), [])

    def create_vm(self, **fields: Any) -> str:
        """
        A VM of ALICE's; its IP.
        """
        return self.daemon.create(**fields)

    def mac_of(self, ip: str, index: int = 0) -> str:
        """
        The MAC of a VM's interface.
        """
        info = self.manager.vms[ip].info
        return (info.Address if index == 0 else info.SecondaryAddresses[index - 1]).MacAddress

    def read_leases(self) -> Optional[list[dict[str, Any]]]:
        """
        C{dynamic-leases.json} as stored, or None.
        """
        try:
            with open(self.leases_path) as f:
                data: list[dict[str, Any]] = json.load(f)
                return data
        except FileNotFoundError:
            return None


def client(
    kind: MessageType,
    mac: str,
    *,
    xid: int = 0x1234,
    flags: int = 0,
    ciaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    requested: Optional[str] = None,
    server: Optional[str] = None,
    prl: Optional[list[int]] = None,
    options: Optional[dict[int, bytes]] = None,
) -> Packet:
    """
    A client's message.
    """
    opts: dict[int, bytes] = {codec.MESSAGE_TYPE: bytes((kind,))}
    if requested is not None:
        opts[codec.REQUESTED_IP] = socket.inet_aton(requested)
    if server is not None:
        opts[codec.SERVER_ID] = socket.inet_aton(server)
    if prl is not None:
        opts[codec.PARAMETER_REQUEST_LIST] = bytes(prl)
    opts.update(options or {})
    return Packet(
        xid=xid,
        flags=flags,
        ciaddr=ciaddr,
        giaddr=giaddr,
        chaddr=codec.mac_bytes(mac) + bytes(10),
        options=opts,
    )


UDHCPC_PRL = [1, 3, 6, 12, 15, 28, 42]
DHCLIENT_PRL = [1, 28, 2, 3, 15, 6, 119, 12, 44, 47, 26, 121, 42]
PXE = {
    codec.VENDOR_CLASS: b"PXEClient:Arch:00007:UNDI:003016",
    codec.CLIENT_ARCHITECTURE: b"\x00\x07",
}


class VmLeaseTests(SynchronousTestCase):
    """
    VM leases: DORA and the client states of RFC 2131.
    """

    def setUp(self) -> None:
        self.h = Harness(self)
        self.ip = self.h.create_vm(Hostname="web1", SubnetId="net")
        self.mac = self.h.mac_of(self.ip)

    def test_dora(self) -> None:
        """
        DISCOVER -> OFFER of the VM's IP with the subnet's configuration, unicast to
        the offered address after the ARP entry is set; REQUEST -> ACK; the manager's
        acknowledgement waiters are told.
        """
        waiter = self.h.manager.ctx.acks.wait(self.mac, 30)
        offer, to = self.h.one(client(MessageType.DISCOVER, self.mac, prl=UDHCPC_PRL))
        self.assertEqual(offer.message_type, MessageType.OFFER)
        self.assertEqual(offer.op, codec.BOOTREPLY)
        self.assertEqual(offer.xid, 0x1234)
        self.assertEqual(offer.yiaddr, self.ip)
        self.assertEqual(offer.siaddr, SERVER)
        self.assertEqual(offer.chaddr, codec.mac_bytes(self.mac) + bytes(10))
        self.assertEqual(to, (self.ip, 68))
        self.assertEqual(self.h.arp, [("br0", self.ip, codec.mac_bytes(self.mac))])
        self.assertEqual(
            list(offer.options),
            [53, 54, 51, 1, 3, 6, 12, 28],
            "53, 54, 51 first, then the PRL's order, only what was asked and exists",
        )
        self.assertEqual(offer.get(codec.SERVER_ID), SERVER)
        self.assertEqual(offer.get(codec.LEASE_TIME), 48 * 3600)
        self.assertEqual(offer.get(codec.SUBNET_MASK), "255.255.255.0")
        self.assertEqual(offer.get(codec.ROUTER), ["10.5.0.1"])
        self.assertEqual(offer.get(codec.DNS_SERVERS), ["10.5.0.1"])
        self.assertEqual(offer.get(codec.HOST_NAME), "web1")
        self.assertEqual(offer.get(codec.BROADCAST_ADDRESS), "10.5.0.255")
        self.assertFalse(fired(waiter) is True)
        ack, to = self.h.one(
            client(MessageType.REQUEST, self.mac, requested=self.ip, server=SERVER, prl=UDHCPC_PRL)
        )
        self.assertEqual(ack.message_type, MessageType.ACK)
        self.assertEqual(ack.yiaddr, self.ip)
        self.assertEqual(to, (self.ip, 68))
        self.assertIs(fired(waiter), True)
        self.assertEqual(self.h.stats.replies, ["offer", "ack"])
        self.assertEqual(self.h.stats.received_log, [("discover", "br0"), ("request", "br0")])

    def test_broadcast_flag(self) -> None:
        """
        A client that sets the broadcast flag is answered by broadcast (no ARP entry).
        """
        _, to = self.h.one(client(MessageType.DISCOVER, self.mac, flags=0x8000))
        self.assertEqual(to, ("255.255.255.255", 68))
        self.assertEqual(self.h.arp, [])

    def test_no_prl_sends_everything_but_121(self) -> None:
        """
        Without a parameter request list every option goes, in code order; option
        121 only to clients that ask for it (RFC 3442).
        """
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac))
        self.assertEqual(list(offer.options), [53, 54, 51, 1, 3, 6, 12, 28, 121])
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac, prl=DHCLIENT_PRL))
        self.assertEqual(
            offer.get(codec.CLASSLESS_ROUTES),
            [("169.254.169.254/32", "10.5.0.1"), ("0.0.0.0/0", "10.5.0.1")],
        )

    def test_init_reboot(self) -> None:
        """
        INIT-REBOOT (no server id, requested IP): the VM's IP is ACKed, any other
        NAKed by broadcast.
        """
        ack, to = self.h.one(client(MessageType.REQUEST, self.mac, requested=self.ip))
        self.assertEqual(ack.message_type, MessageType.ACK)
        nak, to = self.h.one(client(MessageType.REQUEST, self.mac, requested="10.5.0.77"))
        self.assertEqual(nak.message_type, MessageType.NAK)
        self.assertEqual(to, ("255.255.255.255", 68))
        self.assertEqual(nak.yiaddr, "0.0.0.0")
        self.assertEqual(nak.get(codec.SERVER_ID), SERVER)
        self.assertEqual(list(nak.options), [53, 54])
        self.assertEqual(self.h.stats.naks, ["wrong-address"])

    def test_init_reboot_wrong_network(self) -> None:
        """
        A client that moved to another network asks for its old address: NAK.
        """
        nak, _ = self.h.one(client(MessageType.REQUEST, self.mac, requested=self.ip), "br1")
        self.assertEqual(nak.message_type, MessageType.NAK)
        self.assertEqual(self.h.stats.naks, ["wrong-network"])

    def test_renew_and_rebind(self) -> None:
        """
        RENEWING (unicast, ciaddr) and REBINDING (broadcast, ciaddr): ACK unicast to
        ciaddr with ciaddr echoed; a wrong ciaddr is NAKed.
        """
        for flags in (0, 0x8000):
            ack, to = self.h.one(client(MessageType.REQUEST, self.mac, ciaddr=self.ip, flags=flags))
            self.assertEqual(ack.message_type, MessageType.ACK)
            self.assertEqual(ack.ciaddr, self.ip)
            self.assertEqual(ack.yiaddr, self.ip)
            self.assertEqual(to, (self.ip, 68))
        nak, _ = self.h.one(client(MessageType.REQUEST, self.mac, ciaddr="10.5.0.99"))
        self.assertEqual(nak.message_type, MessageType.NAK)

    def test_selecting_wrong_address(self) -> None:
        """
        SELECTING with our server id but another address: NAK.
        """
        nak, _ = self.h.one(
            client(MessageType.REQUEST, self.mac, requested="10.5.0.3", server=SERVER)
        )
        self.assertEqual(nak.message_type, MessageType.NAK)

    def test_other_server(self) -> None:
        """
        A REQUEST naming another server is not ours to answer.
        """
        self.h.none(client(MessageType.REQUEST, self.mac, requested=self.ip, server=OTHER_SERVER))
        self.assertEqual(self.h.stats.drops, ["other-server"])

    def test_request_without_address(self) -> None:
        """
        A REQUEST with no requested IP, no ciaddr: dropped.
        """
        self.h.none(client(MessageType.REQUEST, self.mac))
        self.assertEqual(self.h.stats.drops, ["bad-request"])

    def test_unknown_mac(self) -> None:
        """
        A MAC we did not assign gets nothing, whatever it sends.
        """
        for kind in (MessageType.DISCOVER, MessageType.REQUEST, MessageType.INFORM):
            self.h.none(
                client(kind, UNKNOWN, requested="10.5.0.9", ciaddr="10.5.0.9", server=SERVER)
            )
        self.assertEqual(self.h.stats.drops, ["unknown-client"] * 3)

    def test_wrong_interface(self) -> None:
        """
        A VM's DISCOVER arriving on an interface whose networks do not hold its
        address is not answered (the reference's route check).
        """
        self.h.none(client(MessageType.DISCOVER, self.mac), "br1")
        self.assertEqual(self.h.stats.drops, ["wrong-network"])

    def test_inform(self) -> None:
        """
        INFORM from the VM's address: an ACK with the configuration, no address, no
        lease time, unicast to ciaddr.
        """
        ack, to = self.h.one(client(MessageType.INFORM, self.mac, ciaddr=self.ip))
        self.assertEqual(ack.message_type, MessageType.ACK)
        self.assertEqual(ack.yiaddr, "0.0.0.0")
        self.assertNotIn(codec.LEASE_TIME, ack.options)
        self.assertEqual(ack.get(codec.SUBNET_MASK), "255.255.255.0")
        self.assertEqual(to, (self.ip, 68))
        self.h.none(client(MessageType.INFORM, self.mac, ciaddr="10.5.0.99"))

    def test_decline_of_a_vm_address(self) -> None:
        """
        A VM that finds its address in use (DECLINE) causes an error in the log and
        no reply.
        """
        self.h.none(client(MessageType.DECLINE, self.mac, requested=self.ip, server=SERVER))
        self.assertEqual(self.h.stats.drops, ["decline"])

    def test_secondary_interface(self) -> None:
        """
        A VM's secondary interface gets its own address on its own subnet.
        """
        ip = self.h.create_vm(Hostname="two", SubnetId="net", SecondarySubnetIDs=["net2"])
        mac2 = self.h.mac_of(ip, 1)
        offer, _ = self.h.one(client(MessageType.DISCOVER, mac2), "br1")
        self.assertEqual(offer.yiaddr, "10.6.0.2")
        self.assertEqual(offer.get(codec.SERVER_ID), "10.6.0.1")
        self.assertEqual(offer.get(codec.HOST_NAME), "two")

    def test_leases_follow_the_manager(self) -> None:
        """
        Changes reach the server through the listener: a new host name is served at
        once; a destroyed VM's MAC gets nothing.
        """
        assert (
            fired(
                self.h.daemon.api.ChangeVmHostname(
                    ALICE, ChangeVmHostnameRequest(Hostname="renamed", IpAddress=self.ip)
                )
            ).Error
            == ""
        )
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac))
        self.assertEqual(offer.get(codec.HOST_NAME), "renamed")
        d = self.h.daemon.api.DestroyVm(ALICE, AccessRequest(IpAddress=self.ip))
        self.h.daemon.settle()
        self.h.clock.advance(5)
        self.assertEqual(fired(d).Error, "")
        self.h.none(client(MessageType.DISCOVER, self.mac))

    def test_subnet_change(self) -> None:
        """
        A subnet change (DNS servers) is served at once.
        """
        changed = Subnet(
            Id="net", IpGateway="10.5.0.1", IpMask="255.255.255.0", DomainNameServers=["1.1.1.1"]
        )
        assert (
            fired(
                self.h.daemon.api.UpdateSubnets(ROOT, UpdateSubnetsRequest(Change=[changed]))
            ).Error
            == ""
        )
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac))
        self.assertEqual(offer.get(codec.DNS_SERVERS), ["1.1.1.1"])

    def test_relayed(self) -> None:
        """
        A relayed DISCOVER (giaddr) is answered to the relay on port 67; one whose
        relay is not on the lease's network is not answered.
        """
        offer, to = self.h.one(client(MessageType.DISCOVER, self.mac, giaddr="10.5.0.250"), "eth0")
        self.assertEqual(to, ("10.5.0.250", 67))
        self.assertEqual(offer.giaddr, "10.5.0.250")
        self.assertEqual(offer.get(codec.SERVER_ID), "10.5.0.1")
        self.h.none(client(MessageType.DISCOVER, self.mac, giaddr="10.8.0.1"), "eth0")
        nak, to = self.h.one(
            client(MessageType.REQUEST, self.mac, giaddr="10.5.0.250", requested="10.5.0.77"),
            "eth0",
        )
        self.assertEqual(nak.message_type, MessageType.NAK)
        self.assertEqual(to, ("10.5.0.250", 67))
        self.assertTrue(nak.broadcast)

    def test_relay_agent_information_echoed(self) -> None:
        """
        Option 82 comes back as it was, last.
        """
        relay = bytes([1, 3]) + b"abc"
        offer, _ = self.h.one(
            client(
                MessageType.DISCOVER,
                self.mac,
                giaddr="10.5.0.250",
                options={codec.RELAY_AGENT_INFORMATION: relay},
            ),
            "eth0",
        )
        self.assertEqual(list(offer.options)[-1], codec.RELAY_AGENT_INFORMATION)
        self.assertEqual(offer.options[codec.RELAY_AGENT_INFORMATION], relay)

    def test_max_message_size(self) -> None:
        """
        Replies are padded to 300 bytes and kept within the client's maximum size.
        """
        transport = self.h.transports["br0"]
        self.h.send(client(MessageType.DISCOVER, self.mac, prl=[1]))
        self.assertEqual(len(transport.written[-1][0]), 300)
        big = {codec.MAX_MESSAGE_SIZE: (576).to_bytes(2, "big")}
        self.h.send(client(MessageType.DISCOVER, self.mac, prl=DHCLIENT_PRL, options=big))
        self.assertGreater(len(transport.written[-1][0]), 300)
        self.assertLessEqual(len(transport.written[-1][0]), 576)

    def test_malformed(self) -> None:
        """
        Garbage is counted and dropped; nothing is raised.
        """
        self.h.protocols["br0"].datagramReceived(b"\x01" * 100, ("0.0.0.0", 68))
        self.h.protocols["br0"].datagramReceived(
            codec.encode(client(MessageType.DISCOVER, self.mac))[:243] + b"\x35\x09",
            ("0.0.0.0", 68),
        )
        self.assertEqual(self.h.stats.drops, ["malformed", "malformed"])
        self.assertEqual(self.h.transports["br0"].written, [])

    def test_bad_option_value(self) -> None:
        """
        A requested IP that is not 4 bytes is malformed: dropped.
        """
        packet = client(MessageType.REQUEST, self.mac, options={codec.REQUESTED_IP: b"\1\2"})
        self.h.none(packet)
        self.assertEqual(self.h.stats.drops, ["malformed"])

    def test_replies_and_server_messages_ignored(self) -> None:
        """
        Another server's OFFER (op 2) is not ours to answer.
        """
        packet = client(MessageType.OFFER, self.mac)
        packet.op = codec.BOOTREPLY
        self.h.none(packet)
        self.assertEqual(self.h.stats.drops, ["not-a-request"])

    def test_metadata_route_off(self) -> None:
        """
        With C{-dhcpMetadataRoute=false} no option 121 is sent.
        """
        h = Harness(self, metadata_route=False)
        ip = h.create_vm(SubnetId="net")
        offer, _ = h.one(client(MessageType.DISCOVER, h.mac_of(ip), prl=DHCLIENT_PRL))
        self.assertNotIn(codec.CLASSLESS_ROUTES, offer.options)


class DynamicLeaseTests(SynchronousTestCase):
    """
    Dynamic leases: the reference's timings, persistence, exhaustion, expiry,
    DECLINE, RELEASE, restarts.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def dora(self, mac: str, xid: int = 1) -> str:
        offer, _ = self.h.one(client(MessageType.DISCOVER, mac, xid=xid), "br2")
        ack, _ = self.h.one(
            client(MessageType.REQUEST, mac, xid=xid, requested=offer.yiaddr, server="10.7.0.1"),
            "br2",
        )
        self.assertEqual(ack.message_type, MessageType.ACK)
        return ack.yiaddr

    def test_offer_and_bind(self) -> None:
        """
        An unknown MAC on a dynamic subnet of ours is offered an address of the range
        for 1 min; REQUEST binds it for 2 h (advertised) and writes it to
        C{dynamic-leases.json} in the reference's format.
        """
        mac = "02:00:00:07:00:01"
        offer, _ = self.h.one(client(MessageType.DISCOVER, mac), "br2")
        self.assertEqual(offer.yiaddr, "10.7.0.100")
        self.assertEqual(offer.get(codec.LEASE_TIME), 60)
        self.assertEqual(offer.get(codec.SERVER_ID), "10.7.0.1")
        self.assertEqual(offer.get(codec.DNS_SERVERS), ["10.7.0.53", "10.7.0.54"])
        self.assertEqual(offer.get(codec.DOMAIN_NAME), "dyn.example")
        self.assertIsNone(self.h.read_leases())
        request = client(
            MessageType.REQUEST,
            mac,
            requested="10.7.0.100",
            server="10.7.0.1",
            options={codec.HOST_NAME: b"laptop"},
        )
        ack, _ = self.h.one(request, "br2")
        self.assertEqual(ack.get(codec.LEASE_TIME), 2 * 3600)
        stored = self.h.read_leases()
        assert stored is not None
        self.assertEqual(len(stored), 1)
        self.assertEqual(stored[0]["IpAddress"], "10.7.0.100")
        self.assertEqual(stored[0]["MacAddress"], mac)
        self.assertEqual(stored[0]["ClientHostName"], "laptop")
        self.assertTrue(stored[0]["Expires"].endswith("Z"))

    def test_not_on_other_interfaces(self) -> None:
        """
        Dynamic addresses are only handed out on the interface holding the subnet's
        gateway.
        """
        self.h.none(client(MessageType.DISCOVER, "02:00:00:07:00:01"), "br0")
        self.assertEqual(self.h.stats.drops, ["unknown-client"])

    def test_requested_address_honoured(self) -> None:
        """
        A free requested address in the range is offered.
        """
        offer, _ = self.h.one(
            client(MessageType.DISCOVER, "02:00:00:07:00:01", requested="10.7.0.102"), "br2"
        )
        self.assertEqual(offer.yiaddr, "10.7.0.102")

    def test_exhaustion(self) -> None:
        """
        Three addresses, three clients; the fourth gets nothing.
        """
        ips = [self.dora(f"02:00:00:07:00:0{i}", xid=i) for i in range(1, 4)]
        self.assertEqual(sorted(ips), ["10.7.0.100", "10.7.0.101", "10.7.0.102"])
        self.h.none(client(MessageType.DISCOVER, "02:00:00:07:00:09"), "br2")
        self.assertEqual(self.h.stats.drops, ["exhausted"])
        self.assertEqual(self.dora("02:00:00:07:00:01"), ips[0], "a bound client keeps its lease")

    def test_offer_hold_expires(self) -> None:
        """
        An offer holds its address for 10 s; then the address goes to someone else
        and the first client's REQUEST for it is NAKed.
        """
        first, _ = self.h.one(client(MessageType.DISCOVER, "02:00:00:07:00:01"), "br2")
        self.h.clock.advance(DYNAMIC_OFFER_HOLD + 1)
        second, _ = self.h.one(
            client(MessageType.DISCOVER, "02:00:00:07:00:02", requested=first.yiaddr), "br2"
        )
        self.assertEqual(second.yiaddr, first.yiaddr)
        nak, _ = self.h.one(
            client(
                MessageType.REQUEST,
                "02:00:00:07:00:01",
                requested=first.yiaddr,
                server="10.7.0.1",
            ),
            "br2",
        )
        self.assertEqual(nak.message_type, MessageType.NAK)
        self.assertEqual(self.h.stats.naks, ["offer-expired"])

    def test_bound_lease_expires(self) -> None:
        """
        A bound lease not renewed within 4 h goes away, and the file with it.
        """
        self.dora("02:00:00:07:00:01")
        self.assertIsNotNone(self.h.read_leases())
        self.h.clock.advance(DYNAMIC_EXPIRY + 1)
        self.h.daemon.settle()
        self.assertIsNone(self.h.read_leases())
        self.assertEqual(self.h.policy.dynamic, {})

    def test_renewal_extends(self) -> None:
        """
        A renewal pushes the expiry back.
        """
        ip = self.dora("02:00:00:07:00:01")
        self.h.clock.advance(DYNAMIC_EXPIRY - 60)
        ack, _ = self.h.one(client(MessageType.REQUEST, "02:00:00:07:00:01", ciaddr=ip), "br2")
        self.assertEqual(ack.message_type, MessageType.ACK)
        self.h.clock.advance(120)
        self.assertIn("02:00:00:07:00:01", self.h.policy.dynamic)

    def test_restart_keeps_leases(self) -> None:
        """
        After a restart of the server, the stored lease is served again: INIT-REBOOT
        of the same address is ACKed, a new DISCOVER is offered the same address.
        """
        ip = self.dora("02:00:00:07:00:01")
        self.h.policy.stop()
        self.h.make_server()
        ack, _ = self.h.one(client(MessageType.REQUEST, "02:00:00:07:00:01", requested=ip), "br2")
        self.assertEqual(ack.message_type, MessageType.ACK)
        offer, _ = self.h.one(client(MessageType.DISCOVER, "02:00:00:07:00:01"), "br2")
        self.assertEqual(offer.yiaddr, ip)
        other, _ = self.h.one(client(MessageType.DISCOVER, "02:00:00:07:00:02"), "br2")
        self.assertNotEqual(other.yiaddr, ip)

    def test_init_reboot_without_record(self) -> None:
        """
        INIT-REBOOT for a free address of the range, from a client we have no record
        of (its lease file outlived ours): the address is bound for it.
        """
        ack, _ = self.h.one(
            client(MessageType.REQUEST, "02:00:00:07:00:05", requested="10.7.0.101"), "br2"
        )
        self.assertEqual(ack.message_type, MessageType.ACK)
        self.assertEqual(ack.yiaddr, "10.7.0.101")

    def test_decline(self) -> None:
        """
        DECLINE: the address is out of service for a while; the client is offered
        another one; after the hold the address is free again.
        """
        mac = "02:00:00:07:00:01"
        ip = self.dora(mac)
        self.h.none(client(MessageType.DECLINE, mac, requested=ip, server="10.7.0.1"), "br2")
        self.assertNotIn(mac, self.h.policy.dynamic)
        offer, _ = self.h.one(client(MessageType.DISCOVER, mac, requested=ip), "br2")
        self.assertNotEqual(offer.yiaddr, ip)
        self.h.clock.advance(DECLINE_HOLD + 1)
        self.assertNotIn(ip, self.h.policy.declined)

    def test_release(self) -> None:
        """
        RELEASE frees the lease (and the file).
        """
        mac = "02:00:00:07:00:01"
        ip = self.dora(mac)
        self.h.none(client(MessageType.RELEASE, mac, ciaddr=ip, server="10.7.0.1"), "br2")
        self.assertEqual(self.h.policy.dynamic, {})
        self.assertIsNone(self.h.read_leases())

    def test_release_for_another_server(self) -> None:
        """
        A RELEASE naming another server changes nothing.
        """
        mac = "02:00:00:07:00:01"
        ip = self.dora(mac)
        self.h.none(client(MessageType.RELEASE, mac, ciaddr=ip, server=OTHER_SERVER), "br2")
        self.assertIn(mac, self.h.policy.dynamic)

    def test_other_server_withdraws_offer(self) -> None:
        """
        A client that chose another server frees the address we offered it.
        """
        mac = "02:00:00:07:00:01"
        offer, _ = self.h.one(client(MessageType.DISCOVER, mac), "br2")
        self.h.none(
            client(MessageType.REQUEST, mac, requested="10.7.0.200", server=OTHER_SERVER), "br2"
        )
        self.assertNotIn(mac, self.h.policy.dynamic)

    def test_write_failure_means_no_ack(self) -> None:
        """
        A lease that cannot be written is not acknowledged.
        """
        mac = "02:00:00:07:00:01"
        offer, _ = self.h.one(client(MessageType.DISCOVER, mac), "br2")

        def fail(path: str, data: Optional[bytes], mode: int) -> None:
            raise OSError(28, "No space left on device")

        self.h.manager.writer.write_file = fail
        self.h.none(
            client(MessageType.REQUEST, mac, requested=offer.yiaddr, server="10.7.0.1"), "br2"
        )
        self.assertIn("persist-failed", self.h.stats.drops)
        self.flushLoggedErrors()

    def test_vm_takes_dynamic_address(self) -> None:
        """
        A dynamic lease on an address that becomes a VM's is dropped.
        """
        mac = "02:00:00:07:00:01"
        self.dora(mac)
        assert (
            fired(
                self.h.daemon.api.ChangeAddressPool(
                    ROOT,
                    ChangeAddressPoolRequest(
                        AddressesToAdd=[Address("10.7.0.100", "52:54:0a:07:00:64")]
                    ),
                )
            ).Error
            == ""
        )
        self.h.create_vm(SubnetId="dyn")
        self.assertNotIn(mac, self.h.policy.dynamic)
        self.assertIsNone(self.h.read_leases())

    def test_pool_addresses_not_handed_out(self) -> None:
        """
        Addresses registered in the pool (for VMs to come) are not handed out.
        """
        assert (
            fired(
                self.h.daemon.api.ChangeAddressPool(
                    ROOT,
                    ChangeAddressPoolRequest(
                        AddressesToAdd=[Address("10.7.0.100", "52:54:0a:07:00:64")]
                    ),
                )
            ).Error
            == ""
        )
        offer, _ = self.h.one(client(MessageType.DISCOVER, "02:00:00:07:00:01"), "br2")
        self.assertEqual(offer.yiaddr, "10.7.0.101")

    def test_relayed_dynamic(self) -> None:
        """
        A relayed DISCOVER gets an address of the subnet holding the relay.
        """
        offer, to = self.h.one(
            client(MessageType.DISCOVER, "02:00:00:07:00:01", giaddr="10.7.0.2"), "eth0"
        )
        self.assertEqual(offer.yiaddr, "10.7.0.100")
        self.assertEqual(to, ("10.7.0.2", 67))


class ExternalLeaseTests(SynchronousTestCase):
    """
    RegisterExternalLeases.
    """

    def setUp(self) -> None:
        self.h = Harness(self)

    def test_replaced_as_a_whole(self) -> None:
        """
        The set is replaced: old MACs get nothing, new ones their address and host
        name (the IP when none is given).
        """
        self.h.policy.register_external_leases(
            [Address("10.5.0.50", "02:00:00:05:00:50"), Address("10.5.0.51", "02:00:00:05:00:51")],
            ["printer"],
        )
        offer, _ = self.h.one(client(MessageType.DISCOVER, "02:00:00:05:00:50"))
        self.assertEqual((offer.yiaddr, offer.get(codec.HOST_NAME)), ("10.5.0.50", "printer"))
        offer, _ = self.h.one(client(MessageType.DISCOVER, "02:00:00:05:00:51"))
        self.assertEqual(offer.get(codec.HOST_NAME), "10.5.0.51")
        self.h.policy.register_external_leases([Address("10.5.0.52", "02:00:00:05:00:52")], [])
        self.h.none(client(MessageType.DISCOVER, "02:00:00:05:00:50"))
        offer, _ = self.h.one(client(MessageType.DISCOVER, "02:00:00:05:00:52"))
        self.assertEqual(offer.yiaddr, "10.5.0.52")

    def test_refused(self) -> None:
        """
        A VM's address or MAC, an address outside every subnet, a duplicate: refused,
        and the previous set stays.
        """
        ip = self.h.create_vm(SubnetId="net")
        self.h.policy.register_external_leases([Address("10.5.0.50", "02:00:00:05:00:50")], [])
        bad = [
            [Address(ip, "02:00:00:05:00:60")],
            [Address("10.5.0.61", self.h.mac_of(ip))],
            [Address("192.168.99.1", "02:00:00:05:00:62")],
            [Address("10.5.0.63", "02:00:00:05:00:63"), Address("10.5.0.63", "02:00:00:05:00:64")],
            [Address("", "02:00:00:05:00:65")],
        ]
        for addresses in bad:
            self.assertRaises(InvalidRequest, self.h.policy.register_external_leases, addresses, [])
        self.assertEqual(list(self.h.policy.external), ["02:00:00:05:00:50"])


class NetbootTests(SynchronousTestCase):
    """
    NetbootMachine: PXE clients get siaddr and the boot file for their
    architecture; the call returns after the ACKs it waits for.
    """

    def setUp(self) -> None:
        self.h = Harness(self)
        self.mac = "02:00:00:05:00:70"

    def netboot(self, **kw: Any) -> Any:
        settings: dict[str, Any] = dict(
            address=Address("10.5.0.70", self.mac),
            hostname="installer",
            subnet=None,
            files={"config.json": b"{}"},
            wanted=2,
            wait_timeout=60.0,
            offer_expiration=0.0,
            files_expiration=0.0,
        )
        settings.update(kw)
        d = self.h.policy.netboot_machine(**settings)
        # A call still waiting when the test ends fails as the server stops.
        self.addCleanup(lambda: d.addErrback(lambda f: None))
        return d

    def test_pxe_by_architecture(self) -> None:
        """
        A PXE DISCOVER (vendor class PXEClient, architecture 7) is offered the
        address with C{siaddr} and the boot file C{pxelinux.7} (field and option 67);
        the same MAC without PXE gets no boot file.
        """
        self.netboot()
        offer, _ = self.h.one(
            client(MessageType.DISCOVER, self.mac, prl=[1, 3, 66, 67], options=PXE)
        )
        self.assertEqual(offer.yiaddr, "10.5.0.70")
        self.assertEqual(offer.siaddr, SERVER)
        self.assertEqual(offer.file, b"pxelinux.7")
        self.assertEqual(offer.get(codec.BOOTFILE_NAME), "pxelinux.7")
        self.assertEqual(offer.get(codec.TFTP_SERVER_NAME), SERVER)
        bios = {**PXE, codec.CLIENT_ARCHITECTURE: b"\x00\x00"}
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac, prl=[67], options=bios))
        self.assertEqual(offer.get(codec.BOOTFILE_NAME), "pxelinux.0")
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac, prl=[1, 67]))
        self.assertEqual(offer.file, b"")
        self.assertNotIn(codec.BOOTFILE_NAME, offer.options)
        self.assertEqual(offer.get(codec.HOST_NAME), None)
        self.assertEqual(self.h.policy.netboot_files("10.5.0.70"), {"config.json": b"{}"})

    def test_returns_after_acks(self) -> None:
        """
        The call fires after the wanted number of ACKs; the lease stays until its
        offer expires (at least the wait timeout + 1 s), then the MAC gets nothing.
        """
        d = self.netboot()
        request = client(MessageType.REQUEST, self.mac, requested="10.5.0.70", options=PXE)
        self.h.one(request)
        self.assertFalse(d.called)
        self.h.one(request)
        self.assertIsNone(fired(d))
        self.h.one(client(MessageType.DISCOVER, self.mac))
        self.h.clock.advance(61)
        self.h.none(client(MessageType.DISCOVER, self.mac))
        self.assertEqual(self.h.policy.netboot_files("10.5.0.70"), {})

    def test_no_acks_wanted(self) -> None:
        """
        NumAcknowledgementsToWaitFor 0: the call returns at once, the lease is served.
        """
        d = self.netboot(wanted=0)
        self.assertIsNone(fired(d))
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac))
        self.assertEqual(offer.yiaddr, "10.5.0.70")

    def test_timeout(self) -> None:
        """
        Too few ACKs within the wait timeout: the call fails with a sentence.
        """
        d = self.netboot(wait_timeout=5.0)
        self.h.one(client(MessageType.REQUEST, self.mac, requested="10.5.0.70"))
        self.h.clock.advance(5)
        error = fired(d)
        self.assertIsInstance(error, AcknowledgementTimeout)
        self.assertIn("1 of 2 ACKs", str(error))

    def test_refused(self) -> None:
        """
        A MAC already leased, no subnet, no boot image: refused.
        """
        ip = self.h.create_vm(SubnetId="net")
        self.assertRaises(
            InvalidRequest, self.netboot, address=Address("10.5.0.71", self.h.mac_of(ip))
        )
        self.assertRaises(InvalidRequest, self.netboot, address=Address(ip, "02:00:00:05:00:72"))
        self.assertRaises(
            InvalidRequest, self.netboot, address=Address("192.168.1.1", "02:00:00:05:00:73")
        )
        self.h.policy.network_boot_image = ""
        self.assertRaises(InvalidRequest, self.netboot)

    def test_given_subnet(self) -> None:
        """
        A subnet given with the request is used even if the manager has none.
        """
        subnet = Subnet(Id="lab", IpGateway="10.5.0.1", IpMask="255.255.0.0")
        self.netboot(address=Address("10.5.0.80", self.mac), subnet=subnet)
        offer, _ = self.h.one(client(MessageType.DISCOVER, self.mac, prl=[1]))
        self.assertEqual(offer.get(codec.SUBNET_MASK), "255.255.0.0")

    def test_format_boot_image(self) -> None:
        """
        C{-networkBootImage} is formatted as Go's Sprintf would.
        """
        self.assertEqual(format_boot_image("pxelinux.%d", 7), "pxelinux.7")
        self.assertEqual(format_boot_image("boot-%03d.efi", 9), "boot-009.efi")
        self.assertEqual(format_boot_image("100%%-%d", 0), "100%-0")
        self.assertEqual(format_boot_image("ipxe.efi", 7), "ipxe.efi")


class DestinationTests(SynchronousTestCase):
    """
    L{destination}: RFC 2131 §4.1.
    """

    def test_table(self) -> None:
        """
        Relay, NAK, ciaddr, broadcast flag, unicast to yiaddr with ARP.
        """
        reply = Packet(yiaddr="10.0.0.5")
        cases = [
            (Packet(giaddr="10.0.0.1"), MessageType.OFFER, ("10.0.0.1", 67, False)),
            (Packet(ciaddr="10.0.0.5"), MessageType.NAK, ("255.255.255.255", 68, False)),
            (Packet(ciaddr="10.0.0.5"), MessageType.ACK, ("10.0.0.5", 68, False)),
            (Packet(flags=0x8000), MessageType.OFFER, ("255.255.255.255", 68, False)),
            (Packet(), MessageType.OFFER, ("10.0.0.5", 68, True)),
            (Packet(htype=6), MessageType.OFFER, ("255.255.255.255", 68, False)),
        ]
        for request, kind, expected in cases:
            self.assertEqual(destination(request, reply, kind), expected)

    def test_arp_failure_broadcasts(self) -> None:
        """
        When the ARP entry cannot be set, the reply is broadcast.
        """
        h = Harness(self)
        ip = h.create_vm(SubnetId="net")

        def refuse(fd: int, name: str, ip: str, mac: bytes) -> None:
            raise OSError(1, "Operation not permitted")

        h.server.arp = refuse
        _, to = h.one(client(MessageType.DISCOVER, h.mac_of(ip)))
        self.assertEqual(to, ("255.255.255.255", 68))


class WatchTests(SynchronousTestCase):
    """
    WatchDhcp streams.
    """

    def test_stream(self) -> None:
        """
        Every datagram goes to subscribers with its interface; the interface filter
        and MaxPackets apply; the stream then ends.
        """
        h = Harness(self)
        everything = h.watchers.subscribe()
        only_br1 = h.watchers.subscribe("br1", max_packets=1)
        first = client(MessageType.DISCOVER, UNKNOWN)
        h.send(first, "br0")
        h.send(first, "br1")
        got = fired(everything.get())
        self.assertEqual((got.Interface, got.Packet), ("br0", codec.encode(first)))
        self.assertEqual(fired(everything.get()).Interface, "br1")
        self.assertEqual(fired(only_br1.get()).Interface, "br1")
        self.assertIsNone(fired(only_br1.get()))
        self.assertTrue(only_br1.closed)
        self.assertEqual(h.watchers.streams, [everything])

    def test_slow_subscriber_dropped(self) -> None:
        """
        A subscriber that does not read is dropped with the reference's error once
        its queue is full; memory stays bounded.
        """
        h = Harness(self)
        stream = h.watchers.subscribe()
        for i in range(10):
            h.send(client(MessageType.DISCOVER, UNKNOWN, xid=i))
        self.assertTrue(stream.closed)
        self.assertEqual(fired(stream.get()).Error, NOT_KEEPING_UP)
        self.assertIsNone(fired(stream.get()))
        self.assertEqual(h.watchers.streams, [])
        self.flushLoggedErrors()

    def test_waiting_reader(self) -> None:
        """
        A reader waiting for a packet gets it when it comes.
        """
        h = Harness(self)
        stream = h.watchers.subscribe()
        d = stream.get()
        self.assertFalse(d.called)
        h.send(client(MessageType.DISCOVER, UNKNOWN))
        self.assertEqual(fired(d).Interface, "br0")
        stream.close()
        self.assertIsNone(fired(stream.get()))
