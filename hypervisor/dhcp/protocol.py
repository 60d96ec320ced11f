# -*- test-case-name: tests.test_dhcp_policy -*-
"""
The DHCP server on the wire: one L{DhcpProtocol} per serving interface (each on its
own socket bound to port 67 of that interface) hands every datagram to the one
L{DhcpServer}, which decodes it (L{hypervisor.dhcp.codec}), asks the policy
(L{hypervisor.dhcp.policy.DhcpPolicy}) and sends the reply where RFC 2131 §4.1 says
(L{destination}):

- relayed requests (C{giaddr} set) -> the relay, port 67;
- a NAK -> broadcast (the client may not have a usable address);
- a client with an address (C{ciaddr}: renewals, INFORM) -> unicast to it, port 68;
- a client that set the broadcast flag -> broadcast;
- otherwise -> unicast to C{yiaddr} at C{chaddr}: the ARP entry is set first
  (C{SIOCSARP}, as dnsmasq does), since the client cannot answer ARP yet; if that is
  not possible, broadcast.

Every received datagram also goes to the C{WatchDhcp} watchers. Bad input is dropped
and counted, logged once at debug level; nothing raised from a datagram escapes.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import time
from typing import Any, Callable, Optional, Protocol

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from hypervisor.dhcp import codec
from hypervisor.dhcp.codec import MalformedPacket, MessageType, Packet
from hypervisor.dhcp.policy import ZERO, DhcpPolicy, Reply

SERVER_PORT = 67
CLIENT_PORT = 68
BROADCAST = "255.255.255.255"
SIOCSARP = 0x8955
ATF_COM = 0x02
ARPHRD_ETHER = 1


class IDhcpStats(Protocol):
    """
    What the server counts (L{hypervisor.metrics.DhcpMetrics} in the daemon).
    """

    def received(self, kind: str, interface: str) -> None:
        """
        A datagram of message type C{kind} ("malformed" if it did not decode).
        """

    def replied(self, kind: str, seconds: float) -> None:
        """
        A reply of type C{kind} sent, C{seconds} after its request arrived.
        """

    def dropped(self, reason: str) -> None:
        """
        A request left unanswered, and why.
        """

    def nak(self, reason: str) -> None:
        """
        A NAK, and why.
        """


class NoStats:
    """
    Counts nothing.
    """

    def received(self, kind: str, interface: str) -> None:
        """
        Ignored.
        """

    def replied(self, kind: str, seconds: float) -> None:
        """
        Ignored.
        """

    def dropped(self, reason: str) -> None:
        """
        Ignored.
        """

    def nak(self, reason: str) -> None:
        """
        Ignored.
        """


class IWatchers(Protocol):
    """
    The WatchDhcp subscribers (L{hypervisor.dhcp.watch.PacketWatchers}).
    """

    def publish(self, interface: str, data: bytes) -> None:
        """
        A datagram arrived on C{interface}.
        """


def destination(request: Packet, reply: Packet, kind: MessageType) -> tuple[str, int, bool]:
    """
    Where a reply goes (RFC 2131 §4.1): C{(address, port, needs an ARP entry)}.
    """
    if request.giaddr != ZERO:
        return request.giaddr, SERVER_PORT, False
    if kind == MessageType.NAK:
        return BROADCAST, CLIENT_PORT, False
    if request.ciaddr != ZERO:
        return request.ciaddr, CLIENT_PORT, False
    if request.broadcast or reply.yiaddr == ZERO:
        return BROADCAST, CLIENT_PORT, False
    if request.htype != ARPHRD_ETHER or request.hlen != 6:
        return BROADCAST, CLIENT_PORT, False
    return reply.yiaddr, CLIENT_PORT, True


def arp_request(interface: str, ip: str, mac: bytes) -> bytes:
    """
    The C{struct arpreq} that sets a complete ARP entry C{ip} -> C{mac} on C{interface}.
    """
    protocol_address = struct.pack("=HH4s8s", socket.AF_INET, 0, socket.inet_aton(ip), bytes(8))
    hardware_address = struct.pack("=H14s", ARPHRD_ETHER, mac[:6])
    return (
        protocol_address
        + hardware_address
        + struct.pack("=i", ATF_COM)
        + bytes(16)
        + interface.encode()[:15].ljust(16, b"\0")
    )


def seed_arp(fd: int, interface: str, ip: str, mac: bytes) -> None:
    """
    Set the ARP entry for a client that has no address yet (raises C{OSError}).
    """
    fcntl.ioctl(fd, SIOCSARP, arp_request(interface, ip, mac))


class DhcpProtocol(DatagramProtocol):
    """
    The socket of one interface: hands every datagram to the server.
    """

    def __init__(self, server: "DhcpServer", interface: str) -> None:
        self.server = server
        self.interface = interface

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        Dispatch to the server.
        """
        self.server.datagram_received(self, datagram, addr)

    def send(self, data: bytes, address: tuple[str, int]) -> None:
        """
        Send a reply from this interface's socket (raises C{OSError}).

        Straight to the socket when the transport has one: C{Port.write} checks
        again, per datagram, that the address is an IP address, which the
        server's own destinations always are (a tenth of the reply path's time).
        """
        sock = getattr(self.transport, "socket", None)
        if sock is not None:
            sock.sendto(data, address)
            return
        assert self.transport is not None
        self.transport.write(data, address)

    def fileno(self) -> int:
        """
        The socket's descriptor (for the ARP ioctl).
        """
        fileno = getattr(self.transport, "fileno", None)
        return int(fileno()) if fileno is not None else -1


class DhcpServer:
    """
    Decode, decide (the policy), reply; count and watch everything.
    """

    log = Logger()

    def __init__(
        self,
        policy: DhcpPolicy,
        *,
        stats: Optional[IDhcpStats] = None,
        watchers: Optional[IWatchers] = None,
        arp: Callable[[int, str, str, bytes], None] = seed_arp,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.policy = policy
        self.stats: IDhcpStats = stats or NoStats()
        self.watchers = watchers
        self.arp = arp
        self.timer = timer
        self._logged: set[str] = set()
        policy.on_drop = self.stats.dropped
        policy.on_nak = self.stats.nak

    def datagram_received(self, protocol: DhcpProtocol, data: bytes, addr: Any) -> None:
        """
        One datagram on C{protocol}'s interface.
        """
        started = self.timer()
        interface = protocol.interface
        if self.watchers is not None:
            self.watchers.publish(interface, data)
        try:
            packet = codec.decode(data)
        except MalformedPacket as e:
            self.stats.received("malformed", interface)
            self.stats.dropped("malformed")
            self._once("malformed", f"malformed DHCP packet from {addr} on {interface}: {e}")
            return
        kind = packet.message_type
        self.stats.received(kind.label if kind is not None else "bootp", interface)
        try:
            result = self.policy.handle(packet, interface)
        except Exception:
            self.stats.dropped("internal-error")
            self.log.failure("DHCP: handling a {kind} from {mac}", kind=kind, mac=packet.mac)
            return
        # Reply first: isinstance of a Deferred goes through ABCMeta (Awaitable), a
        # few per cent of a request's time.
        if result is None:
            return
        if isinstance(result, Reply):
            self._send(result, protocol, packet, started)
        else:
            result.addCallback(self._send, protocol, packet, started)
            result.addErrback(self._failed, packet)

    def _failed(self, failure: Failure, packet: Packet) -> None:
        self.stats.dropped("internal-error")
        self.log.failure("DHCP: answering {mac}", failure, mac=packet.mac)

    def _send(
        self, reply: Optional[Reply], protocol: DhcpProtocol, request: Packet, started: float
    ) -> None:
        if reply is None:
            return
        try:
            data = codec.encode(reply.packet, reply.max_size, codec.MIN_BOOTP)
        except ValueError as e:
            self.stats.dropped("reply-too-large")
            self._once("encode", f"cannot encode a {reply.kind.label} for {request.mac}: {e}")
            return
        address, port, arp = destination(request, reply.packet, reply.kind)
        if arp:
            try:
                self.arp(protocol.fileno(), protocol.interface, address, request.chaddr[:6])
            except OSError as e:
                self._once(
                    "arp",
                    f"cannot set the ARP entry of {address} on {protocol.interface} "
                    f"({e.strerror}): replies to clients without an address are broadcast",
                )
                address = BROADCAST
        try:
            protocol.send(data, (address, port))
        except OSError as e:
            self.stats.dropped("send-failed")
            self._once(
                f"send:{protocol.interface}",
                f"cannot send a DHCP {reply.kind.label} on {protocol.interface} to "
                f"{address}:{port}: {e}",
            )
            return
        self.stats.replied(reply.kind.label, self.timer() - started)

    def _once(self, key: str, message: str) -> None:
        if key in self._logged:
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged.add(key)
        self.log.debug("DHCP: {message}", message=message)
