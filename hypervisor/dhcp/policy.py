# -*- test-case-name: tests.test_dhcp_policy -*-
"""
What the DHCP server answers (RFC 2131 §4.3), and to whom: the decisions, with no
sockets and no clock of their own (the time comes from an injected L{IReactorTime}).

Leases, by MAC address, looked up in this order:

1. B{VM leases}: every interface (primary and secondary) of every VM the manager
   holds, with the VM's host name, from L{hypervisor.manager.manager.Manager.leases};
   kept current through the manager's listener interface (VM created, changed,
   destroyed; subnets changed), never polled.
2. B{Netboot leases} (C{NetbootMachine}): a MAC, an IP and a host name for a while;
   PXE clients (vendor class C{PXEClient...}) get C{siaddr} = our address on the
   subnet and the boot file C{-networkBootImage} formatted with the client's
   architecture (option 93).
3. B{External leases} (C{RegisterExternalLeases}): machines that are not VMs; the set
   is replaced as a whole, in memory only, as the reference does.
4. B{Dynamic leases} on subnets with C{FirstDynamicIP}/C{LastDynamicIP} whose gateway
   is an address of this host on the receiving interface (or, for relayed requests,
   whose network holds the relay's C{giaddr}): offered for 10 s (advertised 1 min),
   bound on REQUEST for 4 h (advertised 2 h), persisted in C{dynamic-leases.json} (the
   reference's format) through the state writer before the ACK goes out, expired by a
   timer, reloaded at start.

A MAC that has none of these gets nothing (dropped as C{unknown-client}, logged once at
debug level).

Messages: DISCOVER -> OFFER. REQUEST naming another server -> silence (and our offer to
that client is withdrawn); REQUEST for the client's address -> ACK, for another
address or from the wrong network -> NAK; REQUEST from a client we know nothing of ->
silence. DECLINE (the address is in use on the network) -> a dynamic address is taken
out of service for L{DECLINE_HOLD} seconds and the client's lease dropped; a conflict
on a VM's address is logged as an error. RELEASE -> a dynamic lease is freed. INFORM
-> an ACK with the configuration and no lease, for a known client at its address.

Reply options (L{lease_options}): subnet mask, router, DNS servers, domain name, host
name, broadcast address, lease time, server identifier; option 121 (RFC 3442) with a
host route to 169.254.169.254 and the default route, both via the gateway, unless
turned off (C{-dhcpMetadataRoute=false}) or the subnet disables metadata; the boot
file for netboot. Options are filtered and ordered by the client's parameter request
list (53, 54 and 51 always first; option 82 echoed last).
"""

from __future__ import annotations

import datetime
import functools
import heapq
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hypervisor import codec as json_codec
from hypervisor.dhcp import codec
from hypervisor.dhcp.codec import MalformedPacket, MessageType, Packet
from hypervisor.errors import HypervisorError, InvalidRequest
from hypervisor.model import Address, Subnet, VmInfo

STATIC_LEASE_TIME = 48 * 3600
DYNAMIC_OFFER_HOLD = 10.0
DYNAMIC_OFFER_TIME = 60
DYNAMIC_EXPIRY = 4 * 3600
DYNAMIC_LEASE_TIME = 2 * 3600
DECLINE_HOLD = 600.0
METADATA_ADDRESS = "169.254.169.254"
MAX_REPLY = 1472  # an Ethernet MTU less the IP and UDP headers
LOGGED_ONCE_LIMIT = 4096

ZERO = "0.0.0.0"

Result = Union[None, "Reply", "Deferred[Optional[Reply]]"]


class AcknowledgementTimeout(HypervisorError):
    """
    NetbootMachine: the machine did not take its lease in time.
    """

    status = 504


class ILeaseSource(Protocol):
    """
    What the DHCP server reads from the manager (the manager's read/observer API).
    """

    def leases(self) -> list[Any]:
        """
        Every VM interface's lease (L{hypervisor.manager.state.Lease}).
        """

    def lease(self, mac: str) -> Optional[Any]:
        """
        The lease of the VM interface with this MAC.
        """

    def subnet_list(self) -> list[Subnet]:
        """
        The subnets.
        """

    def add_listener(self, listener: Any) -> None:
        """
        Be told about VM and subnet changes.
        """

    def remove_listener(self, listener: Any) -> None:
        """
        Stop being told.
        """


class IWriter(Protocol):
    """
    The state writer (L{hypervisor.diskio.StateWriter}).
    """

    def write(self, path: str, data: bytes, mode: int = 0o644) -> "Deferred[None]":
        """
        Replace C{path} atomically.
        """

    def remove(self, path: str) -> "Deferred[None]":
        """
        Remove C{path} durably.
        """


class IAcknowledgements(Protocol):
    """
    The manager's DHCP acknowledgement seam (L{hypervisor.manager.acks}).
    """

    def acknowledged(self, mac: str) -> None:
        """
        A lease was acknowledged to C{mac}.
        """


@dataclass(frozen=True)
class HostInterface:
    """
    One interface of this host as the server sees it.

    @ivar addresses: its IPv4 addresses with their networks.
    """

    name: str
    index: int = 0
    kind: str = "bridge"
    addresses: tuple[ipaddress.IPv4Interface, ...] = ()


@dataclass(frozen=True)
class HostView:
    """
    The host's addresses: the interfaces served, and every IPv4 address of the host.
    """

    interfaces: dict[str, HostInterface] = field(default_factory=dict)
    my_ips: frozenset[str] = frozenset()
    first_ip: str = ""


@dataclass
class Reply:
    """
    A reply to send: the packet, and how large the client lets it be.
    """

    packet: Packet
    kind: MessageType
    max_size: int = codec.MIN_MESSAGE


@dataclass
class ExternalLease:
    """
    A machine that is not a VM (RegisterExternalLeases).
    """

    mac: str
    ip: str
    hostname: str


@dataclass
class NetbootLease:
    """
    A machine being netbooted (NetbootMachine).

    @ivar wanted: ACKs the caller waits for; C{acked}: ACKs sent so far.
    @ivar expires: reactor time the lease goes away (OfferExpiration).
    """

    mac: str
    ip: str
    hostname: str
    subnet: Subnet
    expires: float
    wanted: int = 1
    acked: int = 0
    waiter: Optional["Deferred[None]"] = None
    call: Optional[IDelayedCall] = None


@dataclass
class DynamicLease:
    """
    An address from a subnet's dynamic range.

    @ivar bound: acknowledged (persisted); else only offered.
    """

    mac: str
    ip: str
    expires: float
    bound: bool = False
    client_hostname: str = ""


@dataclass
class Choice:
    """
    The lease found for a client: its address, subnet and what goes with it.
    """

    kind: str  # "vm", "netboot", "external", "dynamic"
    ip: str
    hostname: str
    subnet: Subnet
    lease_time: int = STATIC_LEASE_TIME
    netboot: bool = False
    dynamic: Optional[DynamicLease] = None


@dataclass
class DynamicLeaseRecord:
    """
    One entry of C{dynamic-leases.json} (the reference's C{dynamicLeaseType}).
    """

    ClientHostName: str = json_codec.field(omitempty=True, default="")
    Expires: Optional[datetime.datetime] = None
    Address: Address = json_codec.field(embed=True, default_factory=Address)


@dataclass
class _SubnetInfo:
    subnet: Subnet
    network: ipaddress.IPv4Network
    first: int = 0
    last: int = 0
    next: int = 0


def _network(subnet: Subnet) -> Optional[ipaddress.IPv4Network]:
    return _network_of(subnet.IpGateway, subnet.IpMask)


@functools.lru_cache(maxsize=1024)
def _network_of(gateway: str, mask: str) -> Optional[ipaddress.IPv4Network]:
    # Cached: parsing a network costs more than answering the rest of a request.
    try:
        return ipaddress.IPv4Network(f"{gateway}/{mask}", strict=False)
    except ValueError:
        return None


def _in_network(ip: str, network: ipaddress.IPv4Network) -> bool:
    """
    Whether dotted-quad C{ip} is in C{network} (False if it is no address).
    """
    try:
        value = _ip_int(ip)
    except OSError:
        return False
    return value & int(network.netmask) == int(network.network_address)


def _ip_int(text: str) -> int:
    return int.from_bytes(socket.inet_aton(text), "big")


def _int_ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "big"))


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")


_GO_VERB = re.compile(r"%(%|0?[0-9]*d)")


def format_boot_image(template: str, architecture: int) -> str:
    """
    C{-networkBootImage} for a client architecture, as Go's C{fmt.Sprintf} formats
    C{%d} (C{%03d}...) and C{%%}; a name without a verb is used as it is.
    """

    def verb(m: "re.Match[str]") -> str:
        spec = m.group(1)
        if spec == "%":
            return "%"
        return ("%" + spec) % architecture

    return _GO_VERB.sub(verb, template)


def client_architecture(packet: Packet) -> int:
    """
    The client's architecture (option 93, else the C{Arch:NNNNN} of a PXE vendor
    class, else 0 = BIOS).
    """
    raw = packet.options.get(codec.CLIENT_ARCHITECTURE)
    if raw is not None and len(raw) >= 2:
        return int.from_bytes(raw[:2], "big")
    vendor = packet.options.get(codec.VENDOR_CLASS, b"")
    m = re.match(rb"PXEClient:Arch:(\d{5})", vendor)
    return int(m.group(1)) if m else 0


def is_pxe_client(packet: Packet) -> bool:
    """
    Whether the client is PXE firmware (vendor class C{PXEClient...}).
    """
    return packet.options.get(codec.VENDOR_CLASS, b"").startswith(b"PXEClient")


def lease_options(
    subnet: Subnet,
    hostname: str,
    *,
    metadata_route: bool = True,
    boot_file: str = "",
    server: str = "",
) -> dict[int, bytes]:
    """
    The options a lease on C{subnet} comes with (not 53, 54, 51), by code.
    """
    out: dict[int, bytes] = {}
    network = _network(subnet)
    if subnet.IpMask:
        out[codec.SUBNET_MASK] = socket.inet_aton(subnet.IpMask)
    if subnet.IpGateway:
        out[codec.ROUTER] = socket.inet_aton(subnet.IpGateway)
    if subnet.DomainNameServers:
        out[codec.DNS_SERVERS] = b"".join(socket.inet_aton(ip) for ip in subnet.DomainNameServers)
    if hostname:
        out[codec.HOST_NAME] = hostname.encode("utf-8")
    if subnet.DomainName:
        out[codec.DOMAIN_NAME] = subnet.DomainName.encode("utf-8")
    if network is not None:
        out[codec.BROADCAST_ADDRESS] = network.broadcast_address.packed
    if boot_file:
        if server:
            out[codec.TFTP_SERVER_NAME] = server.encode()
        out[codec.BOOTFILE_NAME] = boot_file.encode("utf-8")
    if subnet.IpGateway:
        routes = []
        if metadata_route and not subnet.DisableMetadata:
            routes.append((f"{METADATA_ADDRESS}/32", subnet.IpGateway))
        if routes:
            routes.append(("0.0.0.0/0", subnet.IpGateway))
            out[codec.CLASSLESS_ROUTES] = codec.option_bytes(codec.CLASSLESS_ROUTES, routes)
    return out


def select_options(
    request: Packet, first: dict[int, bytes], available: dict[int, bytes]
) -> dict[int, bytes]:
    """
    The reply's options: C{first} (53, 54, 51), then C{available} in the order of the
    client's parameter request list (only those asked for), or all of them in code
    order when it sent no list; option 82 echoed last.
    """
    out = dict(first)
    prl = request.options.get(codec.PARAMETER_REQUEST_LIST)
    if prl is None:
        for code in sorted(available):
            out.setdefault(code, available[code])
    else:
        for code in prl:
            if code in available and code not in out:
                out[code] = available[code]
    relay = request.options.get(codec.RELAY_AGENT_INFORMATION)
    if relay is not None:
        out[codec.RELAY_AGENT_INFORMATION] = relay
    return out


class DhcpPolicy:
    """
    The server's decisions and its lease tables.

    @ivar host: the host's interfaces and addresses (set by the service on refresh).
    @ivar on_drop: called with a reason for every request left unanswered.
    @ivar on_nak: called with a reason for every NAK.
    """

    log = Logger()

    def __init__(
        self,
        source: ILeaseSource,
        clock: IReactorTime,
        *,
        writer: Optional[IWriter] = None,
        leases_path: str = "",
        acks: Optional[IAcknowledgements] = None,
        network_boot_image: str = "pxelinux.%d",
        metadata_route: bool = True,
        reserved: Optional[Callable[[], Iterable[str]]] = None,
    ) -> None:
        self.source = source
        self.clock = clock
        self.writer = writer
        self.leases_path = leases_path
        self.acks = acks
        self.network_boot_image = network_boot_image
        self.metadata_route = metadata_route
        self.reserved = reserved or (lambda: ())
        self.host = HostView()
        self.on_drop: Callable[[str], None] = lambda reason: None
        self.on_nak: Callable[[str], None] = lambda reason: None
        self.vm_leases: dict[str, Any] = {}
        self.external: dict[str, ExternalLease] = {}
        self.netboot: dict[str, NetbootLease] = {}
        self.dynamic: dict[str, DynamicLease] = {}
        self.declined: dict[str, float] = {}
        self.files: dict[str, tuple[dict[str, bytes], float]] = {}
        self._vm_macs: dict[str, list[str]] = {}
        self._by_ip: dict[str, str] = {}  # dynamic IP -> MAC
        self._subnets: list[_SubnetInfo] = []
        self._subnet_ids: dict[str, _SubnetInfo] = {}
        self._expiry: list[tuple[float, str, str]] = []
        self._sweep: Optional[IDelayedCall] = None
        self._logged: set[tuple[str, str]] = set()
        self._options_cache: dict[tuple[str, str, str], dict[int, bytes]] = {}
        # Our address by (interface, gateway, mask): depends on the host view only.
        self._server_cache: dict[tuple[str, str, str], str] = {}
        self._listening = False

    # Life -------------------------------------------------------------------------------

    def load(self) -> None:
        """
        Read C{dynamic-leases.json} (blocking: at start, before the reactor runs);
        expired entries are dropped, a damaged file is reported and ignored.
        """
        if not self.leases_path:
            return
        try:
            with open(self.leases_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            self.log.error("cannot read {path}: {e}", path=self.leases_path, e=e)
            return
        try:
            records = json_codec.decode(list[DynamicLeaseRecord], data, trusted=True)
        except json_codec.DecodeError as e:
            self.log.error(
                "{path} is damaged ({e}): dynamic leases start empty", path=self.leases_path, e=e
            )
            return
        now = self.clock.seconds()
        valid = expired = 0
        for record in records:
            expires = record.Expires.timestamp() if record.Expires is not None else 0.0
            mac = record.Address.MacAddress.lower()
            ip = record.Address.IpAddress
            if expires <= now or not mac or not ip:
                expired += 1
                continue
            self._add_dynamic(DynamicLease(mac, ip, expires, True, record.ClientHostName))
            valid += 1
        if valid or expired:
            self.log.info(
                "read dynamic leases from {path}: {valid} valid, {expired} expired",
                path=self.leases_path,
                valid=valid,
                expired=expired,
            )

    def start(self) -> None:
        """
        Take the VM leases and subnets from the manager and follow its changes.
        """
        if not self._listening:
            self.source.add_listener(self)
            self._listening = True
        self._reload()
        self._schedule_sweep()

    def stop(self) -> None:
        """
        Stop following the manager; cancel timers; fail NetbootMachine waiters.
        """
        if self._listening:
            self.source.remove_listener(self)
            self._listening = False
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        for lease in list(self.netboot.values()):
            self._remove_netboot(lease, "the DHCP server stopped")

    def set_host(self, host: HostView) -> None:
        """
        The host's interfaces or addresses changed.
        """
        self.host = host
        self._options_cache.clear()
        self._server_cache.clear()

    # Listener (IVmListener) ---------------------------------------------------------------

    def vm_changed(self, info: VmInfo) -> None:
        """
        A VM was created or changed: its interfaces' leases follow.
        """
        self._forget_vm(info.Address.IpAddress)
        macs = [info.Address.MacAddress] + [a.MacAddress for a in info.SecondaryAddresses]
        for mac in macs:
            if mac:
                self._add_vm_lease(mac.lower(), info.Address.IpAddress)
        self._options_cache.clear()

    def vm_removed(self, ip: str, info: VmInfo) -> None:
        """
        A VM is gone: so are its leases.
        """
        self._forget_vm(ip)
        self._options_cache.clear()

    def subnets_changed(self, subnets: list[Subnet]) -> None:
        """
        The subnet table changed: every VM lease is taken again (its subnet may have).
        """
        self._reload()

    def _reload(self) -> None:
        self._set_subnets(self.source.subnet_list())
        self.vm_leases.clear()
        self._vm_macs.clear()
        for lease in self.source.leases():
            mac = lease.MacAddress.lower()
            self.vm_leases[mac] = lease
            self._vm_macs.setdefault(lease.vm_ip, []).append(mac)
        conflicts = [d for d in self.dynamic.values() if self._vm_conflict(d.mac, d.ip)]
        for lease in conflicts:
            self._drop_dynamic(lease, "it is now a VM's address")
        if any(lease.bound for lease in conflicts):
            self._persist()
        self._options_cache.clear()

    def _add_vm_lease(self, mac: str, vm_ip: str) -> None:
        lease = self.source.lease(mac)
        if lease is None:
            return
        self.vm_leases[mac] = lease
        self._vm_macs.setdefault(vm_ip, []).append(mac)
        dynamic = self.dynamic.get(mac)
        other = self._by_ip.get(lease.IpAddress)
        stale = [d for d in (dynamic, self.dynamic.get(other or "")) if d is not None]
        for d in stale:
            self._drop_dynamic(d, "it is now a VM's address")
        if any(d.bound for d in stale):
            self._persist()

    def _forget_vm(self, vm_ip: str) -> None:
        for mac in self._vm_macs.pop(vm_ip, []):
            lease = self.vm_leases.get(mac)
            if lease is not None and lease.vm_ip == vm_ip:
                del self.vm_leases[mac]

    def _vm_conflict(self, mac: str, ip: str) -> bool:
        if mac in self.vm_leases:
            return True
        return any(lease.IpAddress == ip for lease in self.vm_leases.values())

    def _set_subnets(self, subnets: list[Subnet]) -> None:
        infos = []
        for subnet in subnets:
            network = _network(subnet)
            if network is None:
                continue
            info = _SubnetInfo(subnet, network)
            if subnet.FirstDynamicIP and subnet.LastDynamicIP:
                try:
                    info.first = _ip_int(subnet.FirstDynamicIP)
                    info.last = _ip_int(subnet.LastDynamicIP)
                except OSError:
                    info.first = info.last = 0
                old = self._subnet_ids.get(subnet.Id)
                info.next = old.next if old is not None and old.next else info.first
            infos.append(info)
        self._subnets = infos
        self._subnet_ids = {info.subnet.Id: info for info in infos}

    def subnet_of(self, ip: str) -> Optional[Subnet]:
        """
        The subnet whose network holds C{ip}.
        """
        info = self._subnet_info_of(ip)
        return info.subnet if info is not None else None

    def _subnet_info_of(self, ip: str) -> Optional[_SubnetInfo]:
        try:
            address = ipaddress.IPv4Address(ip)
        except ValueError:
            return None
        for info in self._subnets:
            if address in info.network:
                return info
        return None

    # Packets -----------------------------------------------------------------------------

    def handle(self, packet: Packet, interface: str) -> Result:
        """
        The reply to C{packet} received on C{interface}: a L{Reply}, None (silence),
        or a Deferred of either (a dynamic lease is written to disk before its ACK).
        """
        if packet.op != codec.BOOTREQUEST:
            self.on_drop("not-a-request")
            return None
        kind = packet.message_type
        try:
            if kind == MessageType.DISCOVER:
                return self._discover(packet, interface)
            if kind == MessageType.REQUEST:
                return self._request(packet, interface)
            if kind == MessageType.DECLINE:
                self._decline(packet, interface)
                return None
            if kind == MessageType.RELEASE:
                self._release(packet, interface)
                return None
            if kind == MessageType.INFORM:
                return self._inform(packet, interface)
        except MalformedPacket as e:
            self._drop("malformed", packet.mac, f"option: {e}")
            return None
        self._drop("unsupported-type", packet.mac, f"message type {kind}")
        return None

    def _drop(self, reason: str, mac: str, detail: str = "") -> None:
        self.on_drop(reason)
        key = (reason, mac)
        if key in self._logged:
            return
        if len(self._logged) >= LOGGED_ONCE_LIMIT:
            self._logged.clear()
        self._logged.add(key)
        self.log.debug(
            "DHCP: no reply to {mac}: {reason}{detail}",
            mac=mac,
            reason=reason,
            detail=f" ({detail})" if detail else "",
        )

    def _discover(self, packet: Packet, interface: str) -> Result:
        mac = packet.mac
        choice = self._choose(packet, interface, requested=packet.get(codec.REQUESTED_IP))
        if choice is None:
            return None
        if not self._on_network(choice.ip, choice.subnet, packet, interface):
            self._drop("wrong-network", mac, f"{choice.ip} is not on {interface}")
            return None
        lease_time = choice.lease_time
        if choice.dynamic is not None and not choice.dynamic.bound:
            lease_time = DYNAMIC_OFFER_TIME
        return self._reply(packet, interface, MessageType.OFFER, choice, lease_time)

    def _request(self, packet: Packet, interface: str) -> Result:
        mac = packet.mac
        server = packet.get(codec.SERVER_ID)
        requested = packet.get(codec.REQUESTED_IP)
        if server is not None:
            if server not in self.host.my_ips:
                self._withdraw_offer(mac)
                self._drop("other-server", mac, f"it chose {server}")
                return None
            requested = requested or packet.ciaddr
        elif requested is None:
            if packet.ciaddr == ZERO:
                self._drop("bad-request", mac, "REQUEST without an address")
                return None
            requested = packet.ciaddr
        choice = self._choose(packet, interface, requested=requested, only_requested=True)
        if choice is None:
            if server is not None and self._dynamic_subnets(packet, interface):
                # It was talking to us, and our offer is gone: say so at once.
                return self._nak(packet, interface, None, "offer-expired", requested)
            return None
        if requested != choice.ip:
            return self._nak(packet, interface, choice, "wrong-address", requested)
        if not self._on_network(choice.ip, choice.subnet, packet, interface):
            return self._nak(packet, interface, choice, "wrong-network", requested)
        return self._ack(packet, interface, choice)

    def _ack(self, packet: Packet, interface: str, choice: Choice) -> Result:
        dynamic = choice.dynamic
        lease_time = choice.lease_time
        if dynamic is None:
            self._acknowledged(packet.mac, choice)
            return self._reply(packet, interface, MessageType.ACK, choice, lease_time)
        # A dynamic lease is bound (or extended) on disk before it is acknowledged.
        dynamic.bound = True
        dynamic.expires = self.clock.seconds() + DYNAMIC_EXPIRY
        hostname = packet.options.get(codec.HOST_NAME, b"").rstrip(b"\0")
        dynamic.client_hostname = hostname.decode("utf-8", "replace")[:253]
        self._expire_at(dynamic.expires, "dynamic", dynamic.mac)
        d = self._persist()

        def written(_: object) -> Optional[Reply]:
            if self.dynamic.get(dynamic.mac) is not dynamic:
                self._drop("released", packet.mac, "the lease went away while it was written")
                return None
            self._acknowledged(packet.mac, choice)
            return self._reply(packet, interface, MessageType.ACK, choice, DYNAMIC_LEASE_TIME)

        def failed(failure: Failure) -> None:
            self._drop("persist-failed", packet.mac, failure.getErrorMessage())
            return None

        return d.addCallbacks(written, failed)

    def _acknowledged(self, mac: str, choice: Choice) -> None:
        if self.acks is not None:
            self.acks.acknowledged(mac)
        if choice.kind == "netboot":
            lease = self.netboot.get(mac)
            if lease is not None:
                lease.acked += 1
                if lease.acked >= lease.wanted and lease.waiter is not None:
                    waiter, lease.waiter = lease.waiter, None
                    waiter.callback(None)

    def _nak(
        self,
        packet: Packet,
        interface: str,
        choice: Optional[Choice],
        reason: str,
        requested: str,
    ) -> Reply:
        self.on_nak(reason)
        self.log.debug(
            "DHCP: NAK to {mac} for {requested}: {reason} (its address is {ip})",
            mac=packet.mac,
            requested=requested,
            reason=reason,
            ip=choice.ip if choice is not None else "none",
        )
        if choice is not None:
            server = self._server_address(choice.subnet, packet, interface)
        else:
            server = packet.get(codec.SERVER_ID) or self.host.first_ip
        reply = Packet(
            op=codec.BOOTREPLY,
            htype=packet.htype,
            hlen=packet.hlen,
            xid=packet.xid,
            flags=packet.flags | (codec.BROADCAST_FLAG if packet.giaddr != ZERO else 0),
            giaddr=packet.giaddr,
            chaddr=packet.chaddr,
            options={
                codec.MESSAGE_TYPE: bytes((MessageType.NAK,)),
                codec.SERVER_ID: socket.inet_aton(server or ZERO),
            },
        )
        relay = packet.options.get(codec.RELAY_AGENT_INFORMATION)
        if relay is not None:
            reply.options[codec.RELAY_AGENT_INFORMATION] = relay
        return Reply(reply, MessageType.NAK)

    def _decline(self, packet: Packet, interface: str) -> None:
        mac = packet.mac
        if not self._for_me(packet):
            self._drop("other-server", mac)
            return None
        address = packet.get(codec.REQUESTED_IP) or packet.ciaddr
        dynamic = self.dynamic.get(mac)
        if dynamic is not None and dynamic.ip == address:
            self.log.warn(
                "DHCP: {mac} found {ip} in use on the network (DECLINE): the address is "
                "kept out of service for {hold:g}s",
                mac=mac,
                ip=address,
                hold=DECLINE_HOLD,
            )
            self._drop_dynamic(dynamic, "declined")
            self.declined[address] = self.clock.seconds() + DECLINE_HOLD
            self._expire_at(self.declined[address], "declined", address)
            if dynamic.bound:
                self._persist()
        elif mac in self.vm_leases or mac in self.external or mac in self.netboot:
            self.log.error(
                "DHCP: {mac} found its address {ip} in use by another machine on the "
                "network (DECLINE): an address conflict to resolve",
                mac=mac,
                ip=address,
            )
        self.on_drop("decline")
        return None

    def _release(self, packet: Packet, interface: str) -> None:
        mac = packet.mac
        if not self._for_me(packet):
            self._drop("other-server", mac)
            return None
        dynamic = self.dynamic.get(mac)
        if dynamic is not None and dynamic.ip == packet.ciaddr:
            self.log.info("DHCP: {mac} released {ip}", mac=mac, ip=dynamic.ip)
            bound = dynamic.bound
            self._drop_dynamic(dynamic, "released")
            if bound:
                self._persist()
        self.on_drop("release")
        return None

    def _inform(self, packet: Packet, interface: str) -> Optional[Reply]:
        mac = packet.mac
        if packet.ciaddr == ZERO:
            self._drop("bad-request", mac, "INFORM without ciaddr")
            return None
        choice = self._choose(packet, interface, requested=None, allow_new=False)
        if choice is None:
            return None
        if choice.ip != packet.ciaddr:
            self._drop("wrong-address", mac, f"INFORM from {packet.ciaddr}, not {choice.ip}")
            return None
        return self._reply(packet, interface, MessageType.ACK, choice, 0)

    def _for_me(self, packet: Packet) -> bool:
        server = packet.get(codec.SERVER_ID)
        return server is None or server in self.host.my_ips

    # Choosing a lease -------------------------------------------------------------------

    def _choose(
        self,
        packet: Packet,
        interface: str,
        requested: Optional[str],
        only_requested: bool = False,
        allow_new: bool = True,
    ) -> Optional[Choice]:
        mac = packet.mac
        vm = self.vm_leases.get(mac)
        if vm is not None:
            if vm.Subnet is None or not vm.IpAddress:
                self._drop("no-subnet", mac, f"VM {vm.vm_ip} has no subnet for {vm.IpAddress}")
                return None
            return Choice("vm", vm.IpAddress, vm.Hostname, vm.Subnet)
        netboot = self.netboot.get(mac)
        if netboot is not None:
            return Choice("netboot", netboot.ip, netboot.hostname, netboot.subnet, netboot=True)
        external = self.external.get(mac)
        if external is not None:
            subnet = self.subnet_of(external.ip)
            if subnet is None:
                self._drop("no-subnet", mac, f"no subnet holds {external.ip}")
                return None
            return Choice("external", external.ip, external.hostname, subnet)
        return self._choose_dynamic(packet, interface, requested, only_requested, allow_new)

    def _dynamic_subnets(self, packet: Packet, interface: str) -> list[_SubnetInfo]:
        """
        The subnets that may hand out dynamic addresses to this client: those with a
        range whose gateway is ours on the receiving interface (reference:
        C{amGateway}), or whose network holds the relay's address.
        """
        out = []
        if packet.giaddr != ZERO:
            relay = ipaddress.IPv4Address(packet.giaddr)
            for info in self._subnets:
                if info.first and relay in info.network:
                    out.append(info)
            return out
        host = self.host.interfaces.get(interface)
        if host is None:
            return out
        mine = {str(a.ip) for a in host.addresses}
        for info in self._subnets:
            if info.first and info.subnet.IpGateway in mine:
                out.append(info)
        return out

    def _choose_dynamic(
        self,
        packet: Packet,
        interface: str,
        requested: Optional[str],
        only_requested: bool,
        allow_new: bool,
    ) -> Optional[Choice]:
        mac = packet.mac
        subnets = self._dynamic_subnets(packet, interface)
        lease = self.dynamic.get(mac)
        if lease is not None:
            info = self._subnet_info_of(lease.ip)
            if info is None or info not in subnets:
                self._drop_dynamic(lease, "its subnet no longer hands out dynamic addresses")
                if lease.bound:
                    self._persist()
                lease = None
            else:
                return self._dynamic_choice(lease, info)
        if not allow_new or not subnets:
            self._drop("unknown-client", mac)
            return None
        for info in subnets:
            ip = self._free_address(info, requested, only_requested)
            if ip is not None:
                lease = DynamicLease(mac, ip, self.clock.seconds() + DYNAMIC_OFFER_HOLD)
                self._add_dynamic(lease)
                return self._dynamic_choice(lease, info)
        if only_requested:
            self._drop("unknown-client", mac, f"{requested} is not free to hand out")
        else:
            self._drop("exhausted", mac, "no free dynamic address")
        return None

    def _dynamic_choice(self, lease: DynamicLease, info: _SubnetInfo) -> Choice:
        return Choice(
            "dynamic", lease.ip, "", info.subnet, lease_time=DYNAMIC_LEASE_TIME, dynamic=lease
        )

    def _taken(self) -> set[str]:
        taken = {lease.IpAddress for lease in self.vm_leases.values()}
        taken.update(e.ip for e in self.external.values())
        taken.update(n.ip for n in self.netboot.values())
        taken.update(self.declined)
        taken.update(self.host.my_ips)
        taken.update(self.reserved())
        return taken

    def _free_address(
        self, info: _SubnetInfo, requested: Optional[str], only_requested: bool
    ) -> Optional[str]:
        taken = self._taken()
        taken.add(info.subnet.IpGateway)
        network = info.network
        if requested is not None:
            try:
                value = _ip_int(requested)
            except OSError:
                value = -1
            if (
                info.first <= value <= info.last
                and requested not in taken
                and requested not in self._by_ip
            ):
                return requested
        if only_requested:
            return None
        # Round robin from where the last search stopped (the reference's nextDynamicIP).
        size = info.last - info.first + 1
        if size <= 0:
            return None
        start = info.next if info.first <= info.next <= info.last else info.first
        for step in range(size):
            value = info.first + (start - info.first + step) % size
            ip = _int_ip(value)
            if ip in taken or ip in self._by_ip:
                continue
            if value in (int(network.network_address), int(network.broadcast_address)):
                continue
            info.next = info.first + (value - info.first + 1) % size
            return ip
        return None

    def _on_network(self, ip: str, subnet: Subnet, packet: Packet, interface: str) -> bool:
        """
        Whether C{ip} belongs where the client is: the relay's network for relayed
        requests, else a network of the receiving interface (when it has addresses;
        the reference's C{checkRouteOnInterface}).
        """
        if packet.giaddr != ZERO:
            network = _network(subnet)
            return network is not None and _in_network(packet.giaddr, network)
        host = self.host.interfaces.get(interface)
        if host is None or not host.addresses:
            return True
        return any(_in_network(ip, a.network) for a in host.addresses)

    def _server_address(self, subnet: Subnet, packet: Packet, interface: str) -> str:
        """
        Our address for this client: ours on its subnet, else on the receiving
        interface, else the host's first (the reference's C{subnet.myIP}).
        """
        key = (interface, subnet.IpGateway, subnet.IpMask)
        server = self._server_cache.get(key)
        if server is None:
            if len(self._server_cache) > 4096:
                self._server_cache.clear()
            server = self._server_cache[key] = self._find_server_address(subnet, interface)
        return server

    def _find_server_address(self, subnet: Subnet, interface: str) -> str:
        network = _network(subnet)
        host = self.host.interfaces.get(interface)
        candidates = list(host.addresses) if host is not None else []
        if network is not None:
            for a in candidates:
                if a.ip in network:
                    return str(a.ip)
            for ip in sorted(self.host.my_ips):
                if ipaddress.IPv4Address(ip) in network:
                    return ip
        if candidates:
            return str(candidates[0].ip)
        return self.host.first_ip

    # Replies ------------------------------------------------------------------------------

    def _reply(
        self,
        packet: Packet,
        interface: str,
        kind: MessageType,
        choice: Choice,
        lease_time: int,
    ) -> Optional[Reply]:
        server = self._server_address(choice.subnet, packet, interface)
        if not server:
            self._drop("no-server-address", packet.mac, "this host has no IPv4 address")
            return None
        boot_file = ""
        if choice.netboot and is_pxe_client(packet):
            boot_file = format_boot_image(self.network_boot_image, client_architecture(packet))
        key = (f"{choice.kind}:{choice.ip}:{choice.hostname}", server, boot_file)
        available = self._options_cache.get(key)
        if available is None:
            available = lease_options(
                choice.subnet,
                choice.hostname,
                metadata_route=self.metadata_route,
                boot_file=boot_file,
                server=server,
            )
            self._options_cache[key] = available
        first = {
            codec.MESSAGE_TYPE: bytes((kind,)),
            codec.SERVER_ID: socket.inet_aton(server),
        }
        if lease_time:
            first[codec.LEASE_TIME] = _u32(lease_time)
        inform = kind == MessageType.ACK and lease_time == 0
        reply = Packet(
            op=codec.BOOTREPLY,
            htype=packet.htype,
            hlen=packet.hlen,
            xid=packet.xid,
            flags=packet.flags,
            ciaddr=packet.ciaddr if kind == MessageType.ACK else ZERO,
            yiaddr=ZERO if inform else choice.ip,
            siaddr=server,
            giaddr=packet.giaddr,
            chaddr=packet.chaddr,
            file=boot_file.encode("utf-8")[:128],
            options=select_options(packet, first, available),
        )
        limit = packet.options.get(codec.MAX_MESSAGE_SIZE)
        max_size = codec.MIN_MESSAGE
        if limit is not None and len(limit) == 2:
            max_size = max(codec.MIN_MESSAGE, min(MAX_REPLY, int.from_bytes(limit, "big")))
        return Reply(reply, kind, max_size)

    # Dynamic leases -------------------------------------------------------------------------

    def _add_dynamic(self, lease: DynamicLease) -> None:
        old = self.dynamic.get(lease.mac)
        if old is not None:
            self._by_ip.pop(old.ip, None)
        self.dynamic[lease.mac] = lease
        self._by_ip[lease.ip] = lease.mac
        self._expire_at(lease.expires, "dynamic", lease.mac)

    def _drop_dynamic(self, lease: DynamicLease, why: str) -> None:
        if self.dynamic.get(lease.mac) is lease:
            del self.dynamic[lease.mac]
            if self._by_ip.get(lease.ip) == lease.mac:
                del self._by_ip[lease.ip]
            self.log.debug(
                "DHCP: dynamic lease {ip} of {mac} dropped: {why}",
                ip=lease.ip,
                mac=lease.mac,
                why=why,
            )

    def _withdraw_offer(self, mac: str) -> None:
        lease = self.dynamic.get(mac)
        if lease is not None and not lease.bound:
            self._drop_dynamic(lease, "the client chose another server")

    def _persist(self) -> "Deferred[None]":
        """
        Write the bound dynamic leases (removing the file when there are none).
        """
        if self.writer is None or not self.leases_path:
            return succeed(None)
        records = [
            DynamicLeaseRecord(
                ClientHostName=lease.client_hostname,
                Expires=datetime.datetime.fromtimestamp(lease.expires, datetime.timezone.utc),
                Address=Address(IpAddress=lease.ip, MacAddress=lease.mac),
            )
            for lease in self.dynamic.values()
            if lease.bound
        ]
        if not records:
            d = self.writer.remove(self.leases_path)
        else:
            records.sort(key=lambda r: r.Address.IpAddress)
            d = self.writer.write(self.leases_path, json_codec.encode(records, indent=4))

        def failed(failure: Failure) -> Failure:
            self.log.error(
                "cannot write {path}: {why}", path=self.leases_path, why=failure.getErrorMessage()
            )
            return failure

        return d.addErrback(failed)

    # Expiry ---------------------------------------------------------------------------------

    def _expire_at(self, when: float, kind: str, key: str) -> None:
        heapq.heappush(self._expiry, (when, kind, key))
        if self._sweep is None or not self._sweep.active() or self._sweep.getTime() > when:
            self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        if self._sweep is not None and self._sweep.active():
            self._sweep.cancel()
        self._sweep = None
        if self._expiry:
            delay = max(0.0, self._expiry[0][0] - self.clock.seconds())
            self._sweep = self.clock.callLater(delay, self.sweep)

    def sweep(self) -> None:
        """
        Drop what expired: dynamic leases, declined addresses, netboot leases and
        their files.
        """
        self._sweep = None
        now = self.clock.seconds()
        persist = False
        while self._expiry and self._expiry[0][0] <= now:
            _, kind, key = heapq.heappop(self._expiry)
            if kind == "dynamic":
                lease = self.dynamic.get(key)
                if lease is not None and lease.expires <= now:
                    persist = persist or lease.bound
                    self._drop_dynamic(lease, "expired")
            elif kind == "declined":
                if self.declined.get(key, now + 1) <= now:
                    del self.declined[key]
            elif kind == "netboot-files":
                entry = self.files.get(key)
                if entry is not None and entry[1] <= now:
                    del self.files[key]
        if persist:
            self._persist()
        self._schedule_sweep()

    # External leases ---------------------------------------------------------------------------

    def register_external_leases(self, addresses: list[Address], hostnames: list[str]) -> None:
        """
        Replace the external leases (RegisterExternalLeases): C{hostnames[i]} goes with
        C{addresses[i]} (default: the IP as text). All or nothing.

        @raise InvalidRequest: an address without IP or MAC, outside every subnet, or
            belonging to a VM; a MAC or IP given twice.
        """
        new: dict[str, ExternalLease] = {}
        ips: set[str] = set()
        vm_ips = {lease.IpAddress: lease.vm_ip for lease in self.vm_leases.values()}
        for i, address in enumerate(addresses):
            if not address.IpAddress or not address.MacAddress:
                raise InvalidRequest(f"Addresses[{i}]: an external lease needs an IP and a MAC")
            mac = address.MacAddress.lower().replace("-", ":")
            ip = address.IpAddress
            if mac in new or ip in ips:
                raise InvalidRequest(f"Addresses[{i}]: {ip} / {mac} is given twice")
            if self.subnet_of(ip) is None:
                known = ", ".join(s.subnet.Id for s in self._subnets) or "none"
                raise InvalidRequest(
                    f"no subnet found for {ip} (Addresses[{i}]); known subnets: {known}"
                )
            if mac in self.vm_leases or ip in vm_ips:
                owner = self.vm_leases[mac].vm_ip if mac in self.vm_leases else vm_ips[ip]
                raise InvalidRequest(
                    f"Addresses[{i}]: {ip} / {mac} belongs to VM {owner}; external leases "
                    "are for machines that are not VMs"
                )
            hostname = hostnames[i] if i < len(hostnames) and hostnames[i] else ip
            new[mac] = ExternalLease(mac, ip, hostname)
            ips.add(ip)
        added = len(set(new) - set(self.external))
        removed = len(set(self.external) - set(new))
        self.external = new
        for lease in list(self.dynamic.values()):
            if lease.mac in new or lease.ip in ips:
                self._drop_dynamic(lease, "it is now an external lease")
        self._options_cache.clear()
        self.log.info(
            "RegisterExternalLeases: {n} external leases ({added} added, {removed} removed)",
            n=len(new),
            added=added,
            removed=removed,
        )

    # Netboot ----------------------------------------------------------------------------------

    def netboot_machine(
        self,
        address: Address,
        hostname: str,
        subnet: Optional[Subnet],
        files: dict[str, bytes],
        wanted: int,
        wait_timeout: float,
        offer_expiration: float,
        files_expiration: float,
    ) -> "Deferred[None]":
        """
        Serve a netboot lease (NetbootMachine): fires once C{wanted} ACKs were sent (at
        once for 0), fails with L{AcknowledgementTimeout} after C{wait_timeout}
        (default 1 min).
        The lease stays for C{offer_expiration} and the files for C{files_expiration}
        (each at least C{wait_timeout} + 1 s), as the reference does.

        @raise InvalidRequest: no IP or MAC, no boot image configured, no subnet, or
            the MAC or IP already has a lease.
        """
        if not address.IpAddress or not address.MacAddress:
            raise InvalidRequest("NetbootMachine needs Address.IpAddress and Address.MacAddress")
        if not self.network_boot_image:
            raise InvalidRequest("no network boot image is configured (-networkBootImage)")
        mac = address.MacAddress.lower().replace("-", ":")
        ip = address.IpAddress
        if subnet is None:
            subnet = self.subnet_of(ip)
            if subnet is None:
                known = ", ".join(s.subnet.Id for s in self._subnets) or "none"
                raise InvalidRequest(f"no subnet found for {ip}; known subnets: {known}")
        elif _network(subnet) is None:
            raise InvalidRequest(f"subnet {subnet.Id!r} has no usable IpGateway/IpMask")
        if mac in self.vm_leases or mac in self.netboot or mac in self.external:
            raise InvalidRequest(f"already have a lease for {mac}")
        if self._vm_conflict(mac, ip) or any(n.ip == ip for n in self.netboot.values()):
            raise InvalidRequest(f"{ip} is already leased to another machine")
        for dynamic in list(self.dynamic.values()):
            if dynamic.mac == mac or dynamic.ip == ip:
                self._drop_dynamic(dynamic, "it is now a netboot lease")
                if dynamic.bound:
                    self._persist()
        wait_timeout = wait_timeout if wait_timeout > 0 else 60.0
        offer_expiration = max(offer_expiration, wait_timeout + 1)
        files_expiration = max(files_expiration, wait_timeout + 1)
        now = self.clock.seconds()
        lease = NetbootLease(
            mac=mac,
            ip=ip,
            hostname=hostname,
            subnet=subnet,
            expires=now + offer_expiration,
            wanted=max(0, wanted),
        )
        waiter: Deferred[None] = Deferred()
        lease.waiter = waiter if wanted > 0 else None
        self.netboot[mac] = lease
        self._options_cache.clear()
        if files:
            self.files[ip] = (dict(files), now + files_expiration)
            self._expire_at(now + files_expiration, "netboot-files", ip)
        lease.call = self.clock.callLater(
            offer_expiration, self._remove_netboot, lease, "its offer expired"
        )
        timer = self.clock.callLater(wait_timeout, self._netboot_timeout, lease)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        if lease.waiter is None:
            waiter.callback(None)  # nothing to wait for (the reference's loop runs 0 times)
        self.log.info(
            "NetbootMachine: {mac} gets {ip} ({hostname}) until {n} ACKs, for at most {t:g}s",
            mac=mac,
            ip=ip,
            hostname=hostname or "-",
            n=lease.wanted,
            t=wait_timeout,
        )
        return waiter.addBoth(done)

    def _netboot_timeout(self, lease: NetbootLease) -> None:
        if lease.waiter is not None:
            waiter, lease.waiter = lease.waiter, None
            waiter.errback(
                AcknowledgementTimeout(
                    f"timed out receiving lease acknowledgement for {lease.mac} "
                    f"({lease.acked} of {lease.wanted} ACKs sent)"
                )
            )

    def _remove_netboot(self, lease: NetbootLease, why: str) -> None:
        if self.netboot.get(lease.mac) is lease:
            del self.netboot[lease.mac]
            self._options_cache.clear()
            self.log.info("netboot lease of {mac} removed: {why}", mac=lease.mac, why=why)
        if lease.call is not None and lease.call.active():
            lease.call.cancel()
        if lease.waiter is not None:
            waiter, lease.waiter = lease.waiter, None
            waiter.errback(AcknowledgementTimeout(f"netboot of {lease.mac} ended: {why}"))

    def netboot_files(self, ip: str) -> dict[str, bytes]:
        """
        The files NetbootMachine registered for C{ip} (for the TFTP server).
        """
        entry = self.files.get(ip)
        if entry is None or entry[1] <= self.clock.seconds():
            return {}
        return entry[0]
