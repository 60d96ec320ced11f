# -*- test-case-name: tests.test_dhcp_service -*-
"""
The named service C{dhcp}: one UDP socket per serving interface, bound to port 67 of
that interface, adopted into the reactor; the set of interfaces looked at again every
L{REFRESH_INTERVAL} seconds (on a thread: it reads C{/sys} and asks netlink) so that
bridges coming and going are served or dropped.

The socket recipe (reference/environment.md, "DHCP"): bind C{0.0.0.0:67} (a socket
bound to the server's address would not see C{255.255.255.255}), with
C{SO_BROADCAST} and C{SO_BINDTODEVICE} (one socket per interface; several coexist),
made by hand and handed to Twisted with C{adoptDatagramPort} (C{listenUDP} binds
before options can be set). C{SO_REUSEADDR} lets another DHCP server bound the same
way share an interface (broadcasts reach both). A socket that cannot be made is
reported (log, page) and tried again at the next refresh; the daemon runs on.

The first sockets are made in C{privilegedStartService}, before twistd drops root.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hypervisor.dhcp import interfaces as host_interfaces
from hypervisor.dhcp.interfaces import Discovery
from hypervisor.dhcp.policy import DhcpPolicy, HostView
from hypervisor.dhcp.protocol import SERVER_PORT, DhcpProtocol, DhcpServer
from hypervisor.dhcp.watch import PacketWatchers, WatchStream
from hypervisor.diskio import IBlockingRunner
from hypervisor.errors import InvalidRequest
from hypervisor.model import Address, NetbootMachineRequest, Subnet

REFRESH_INTERVAL = 15.0


def bind_socket(name: str, port: int = SERVER_PORT) -> socket.socket:
    """
    A UDP socket on C{0.0.0.0:port} of interface C{name} only (raises C{OSError}).
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
        _large_receive_buffer(s)
        s.setblocking(False)
        s.bind(("0.0.0.0", port))
    except OSError:
        s.close()
        raise
    return s


RECEIVE_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def _large_receive_buffer(s: socket.socket) -> None:
    """
    A receive buffer of L{RECEIVE_BUFFER} bytes (beyond C{net.core.rmem_max} as root):
    the default (about 200 KiB, a few hundred requests) overflows in a boot storm
    whenever the reactor is busy or not scheduled for a fraction of a second, and
    overflowing drops requests that clients then repeat only seconds later.
    """
    try:
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
    except OSError:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        except OSError:
            pass


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC"
    )


class DhcpService(Service):
    """
    The DHCP server's sockets and timers around one L{DhcpServer}.

    @ivar ports: the listening sockets by interface name.
    @ivar problems: why an interface to serve has no socket, by name.
    @ivar discovery: the last look at the host's interfaces.
    @ivar only: when set (tests), the only interfaces ever served.
    """

    log = Logger()

    def __init__(
        self,
        server: DhcpServer,
        reactor: Any,
        *,
        runner: IBlockingRunner,
        acks: Optional[Any] = None,
        bridges_only: bool = False,
        watchers: Optional[PacketWatchers] = None,
        refresh_interval: float = REFRESH_INTERVAL,
        discover: Optional[Callable[[bool], Discovery]] = None,
        bind: Optional[Callable[[str], socket.socket]] = None,
        only: Optional[set[str]] = None,
        port: int = SERVER_PORT,
    ) -> None:
        self.server = server
        self.policy: DhcpPolicy = server.policy
        self.reactor = reactor
        self.runner = runner
        self.acks = acks
        self.bridges_only = bridges_only
        self.watchers = watchers or PacketWatchers()
        self.refresh_interval = refresh_interval
        self.discover = discover or host_interfaces.discover
        self.bind = bind or (lambda name: bind_socket(name, port))
        self.only = only
        self.ports: dict[str, IListeningPort] = {}
        self.indexes: dict[str, int] = {}
        self.problems: dict[str, str] = {}
        self.discovery = Discovery(HostView())
        self._loop: Optional[LoopingCall] = None
        self._refreshing = False
        self._notes: list[str] = []
        self._started = False

    # Service ----------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Load the dynamic leases, take the VM leases, and open the first sockets (as
        root, before privileges are dropped).
        """
        super().privilegedStartService()
        self._start_policy()
        try:
            discovery = self.discover(self.bridges_only)
        except OSError as e:
            self.log.error("DHCP: cannot list this host's interfaces: {e}", e=e)
        else:
            self.apply(discovery)

    def _start_policy(self) -> None:
        if self._started:
            return
        self._started = True
        self.policy.load()
        self.policy.start()
        if self.acks is not None:
            self.acks.serving = True

    def startService(self) -> None:
        """
        Start serving and refreshing the interfaces.
        """
        if not self._started:
            self.privilegedStartService()
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.refresh_interval, now=False).addErrback(
            lambda f: self.log.failure("DHCP interface refresh stopped", f)
        )

    def stopService(self) -> "Deferred[Any]":
        """
        Close the sockets, stop the timers and the watchers.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        self.watchers.close_all()
        self.policy.stop()
        self._started = False
        if self.acks is not None:
            self.acks.serving = False
        stopping = [self._close(name) for name in list(self.ports)]
        return DeferredList(stopping, consumeErrors=True)

    # Interfaces -------------------------------------------------------------------------

    def refresh(self) -> "Deferred[None]":
        """
        Look at the interfaces again (on a thread) and open or close sockets.
        """
        if self._refreshing:
            return succeed(None)
        self._refreshing = True
        d: Deferred[Discovery] = self.runner.run(self.discover, self.bridges_only)

        def done(result: Any) -> None:
            self._refreshing = False
            if isinstance(result, Failure):
                self.log.warn(
                    "DHCP: cannot list this host's interfaces: {why}",
                    why=result.getErrorMessage(),
                )
                return
            if self.running:
                self.apply(result)

        return d.addBoth(done)

    def apply(self, discovery: Discovery) -> None:
        """
        Serve exactly the interfaces C{discovery} found (a recreated interface gets
        a new socket).
        """
        self.discovery = discovery
        self.policy.set_host(discovery.host)
        wanted = {
            name: interface
            for name, interface in discovery.serving.items()
            if self.only is None or name in self.only
        }
        for name in list(self.ports):
            if name not in wanted or wanted[name].index != self.indexes.get(name):
                self._close(name)
        for name in list(self.problems):
            if name not in wanted:
                del self.problems[name]
        for name, interface in sorted(wanted.items()):
            if name not in self.ports:
                self._open(name, interface.index)
        if discovery.notes != self._notes:
            self._notes = list(discovery.notes)
            for note in discovery.notes:
                self.log.info("DHCP: {note}", note=note)

    def _open(self, name: str, index: int) -> None:
        try:
            sock = self.bind(name)
        except OSError as e:
            problem = f"cannot listen on port {SERVER_PORT} of {name}: {e.strerror or e}"
            if self.problems.get(name) != problem:
                self.log.warn(
                    "DHCP: {problem}; tried again in {t:g}s",
                    problem=problem,
                    t=self.refresh_interval,
                )
            self.problems[name] = problem
            return
        try:
            port = self.reactor.adoptDatagramPort(
                sock.fileno(), socket.AF_INET, DhcpProtocol(self.server, name)
            )
        finally:
            sock.close()  # the reactor holds its own duplicate
        self.ports[name] = port
        self.indexes[name] = index
        self.problems.pop(name, None)
        self.log.info("DHCP: serving {name}", name=name)

    def _close(self, name: str) -> "Deferred[Any]":
        port = self.ports.pop(name)
        self.indexes.pop(name, None)
        self.log.info("DHCP: no longer serving {name}", name=name)
        result = port.stopListening()
        return result if isinstance(result, Deferred) else succeed(None)

    # The RPCs ---------------------------------------------------------------------------

    def register_external_leases(self, addresses: list[Address], hostnames: list[str]) -> None:
        """
        RegisterExternalLeases (see L{DhcpPolicy.register_external_leases}).
        """
        self.policy.register_external_leases(addresses, hostnames)

    def netboot_machine(self, request: NetbootMachineRequest) -> "Deferred[None]":
        """
        NetbootMachine (see L{DhcpPolicy.netboot_machine}).
        """
        return self.policy.netboot_machine(
            request.Address,
            request.Hostname,
            request.Subnet,
            request.Files,
            request.NumAcknowledgementsToWaitFor,
            float(request.WaitTimeout),
            float(request.OfferExpiration),
            float(request.FilesExpiration),
        )

    def watch(self, interface: str, max_packets: int) -> WatchStream:
        """
        WatchDhcp: a stream of received packets.

        @raise InvalidRequest: C{interface} is not served.
        """
        if interface and interface not in self.ports:
            served = ", ".join(sorted(self.ports)) or "none"
            raise InvalidRequest(f"interface {interface!r} is not served; served: {served}")
        return self.watchers.subscribe(interface, max_packets)

    # Status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """
        What C{/showDhcpStatus} shows: interfaces, notes, and every kind of lease
        (with expiry times), from memory.
        """
        host = self.discovery.host
        now = self.reactor.seconds()
        served = set(self.discovery.serving) | set(self.ports) | set(self.problems)
        interfaces = []
        for name in sorted(served):
            info = host.interfaces.get(name)
            if name in self.ports:
                state = "serving"
            elif name in self.problems:
                state = self.problems[name]
            else:
                state = "not served"
            interfaces.append(
                {
                    "name": name,
                    "kind": info.kind if info is not None else "",
                    "addresses": ", ".join(str(a) for a in info.addresses) if info else "",
                    "state": state,
                }
            )
        p = self.policy
        static = [
            {
                "mac": mac,
                "ip": lease.IpAddress,
                "hostname": lease.Hostname,
                "subnet": lease.Subnet.Id if lease.Subnet is not None else "",
                "vm": lease.vm_ip,
            }
            for mac, lease in sorted(p.vm_leases.items(), key=lambda kv: kv[1].IpAddress)
        ]
        external = [
            {
                "mac": lease.mac,
                "ip": lease.ip,
                "hostname": lease.hostname,
                "subnet": _subnet_id(p.subnet_of(lease.ip)),
            }
            for lease in sorted(p.external.values(), key=lambda e: e.ip)
        ]
        netboot = [
            {
                "mac": lease.mac,
                "ip": lease.ip,
                "hostname": lease.hostname,
                "subnet": lease.subnet.Id,
                "acks": f"{lease.acked} of {lease.wanted}",
                "expires": _iso(lease.expires),
            }
            for lease in sorted(p.netboot.values(), key=lambda n: n.ip)
        ]
        dynamic = [
            {
                "mac": lease.mac,
                "ip": lease.ip,
                "hostname": lease.client_hostname,
                "subnet": _subnet_id(p.subnet_of(lease.ip)),
                "state": "bound" if lease.bound else "offered",
                "expires": _iso(lease.expires),
                "remaining": max(0, int(lease.expires - now)),
            }
            for lease in sorted(p.dynamic.values(), key=lambda d: d.ip)
        ]
        return {
            "interfaces": interfaces,
            "notes": list(self.discovery.notes),
            "static": static,
            "external": external,
            "netboot": netboot,
            "dynamic": dynamic,
            "bridges_only": self.bridges_only,
        }


def _subnet_id(subnet: Optional[Subnet]) -> str:
    return subnet.Id if subnet is not None else ""
