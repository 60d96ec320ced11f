"""
Tests for L{hypervisor.dhcp.service}: sockets per serving interface opened at start
(as root), interfaces refreshed by a timer as they come and go, failures to bind
reported and retried, the acknowledgement seam told the server runs, and the status
the DHCP page shows.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.dhcp.interfaces import Discovery
from hypervisor.dhcp.policy import DhcpPolicy, HostInterface, HostView
from hypervisor.dhcp.protocol import DhcpProtocol, DhcpServer
from hypervisor.dhcp.service import RECEIVE_BUFFER, REFRESH_INTERVAL, DhcpService, bind_socket
from hypervisor.manager.acks import DhcpAcknowledgements
from hypervisor.model import Address
from hypervisor.testing import SynchronousRunner
from tests.test_manager_clock import ClockDaemon


class FakePort:
    """
    An adopted datagram port.
    """

    def __init__(self, protocol: DhcpProtocol) -> None:
        self.protocol = protocol
        self.listening = True

    def stopListening(self) -> Any:
        self.listening = False
        return succeed(None)


class FakeReactor(Clock):
    """
    A Clock that adopts datagram ports.
    """

    def __init__(self) -> None:
        super().__init__()
        self.adopted: list[FakePort] = []

    def adoptDatagramPort(self, fd: int, family: int, protocol: DhcpProtocol) -> FakePort:
        assert family == socket.AF_INET
        port = FakePort(protocol)
        self.adopted.append(port)
        return port


INDEXES = {"br0": 10, "br1": 11}


def discovery(*names: str, index: int = 0) -> Discovery:
    """
    A look at the host that finds these bridges (their indexes moved by C{index}, as
    if they had been recreated).
    """
    interfaces = {
        name: HostInterface(
            name, INDEXES[name] + index, "bridge", (ipaddress.IPv4Interface(f"10.{i}.0.1/24"),)
        )
        for i, name in enumerate(names)
    }
    host = HostView(interfaces, frozenset(f"10.{i}.0.1" for i in range(len(names))), "10.0.0.1")
    return Discovery(host, dict(interfaces))


class ServiceTests(SynchronousTestCase):
    """
    The service's sockets and timers.
    """

    def setUp(self) -> None:
        self.daemon = ClockDaemon(self).start().network()
        self.reactor = FakeReactor()
        self.found = discovery("br0")
        self.failing: set[str] = set()
        self.bound: list[str] = []
        self.acks = DhcpAcknowledgements(self.reactor)
        policy = DhcpPolicy(self.daemon.manager, self.reactor)
        self.service = DhcpService(
            DhcpServer(policy),
            self.reactor,
            runner=SynchronousRunner(),
            acks=self.acks,
            discover=lambda bridges_only: self.found,
            bind=self.bind,
        )

    def bind(self, name: str) -> socket.socket:
        if name in self.failing:
            raise OSError(98, "Address already in use")
        self.bound.append(name)
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def start(self) -> None:
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        if self.service.running:
            self.service.stopService()

    def test_start_and_stop(self) -> None:
        """
        Starting opens one socket per serving interface and tells the manager a DHCP
        server runs; stopping closes them and says it no longer does.
        """
        self.assertFalse(self.acks.serving)
        self.start()
        self.assertTrue(self.acks.serving)
        self.assertEqual(sorted(self.service.ports), ["br0"])
        self.assertEqual(self.reactor.adopted[0].protocol.interface, "br0")
        self.service.stopService()
        self.assertFalse(self.acks.serving)
        self.assertFalse(self.reactor.adopted[0].listening)
        self.assertEqual(self.service.ports, {})

    def test_refresh(self) -> None:
        """
        A bridge that appears is served at the next refresh; one that goes away is
        no longer; one recreated (new index) gets a new socket.
        """
        self.start()
        self.found = discovery("br0", "br1")
        self.reactor.advance(REFRESH_INTERVAL)
        self.assertEqual(sorted(self.service.ports), ["br0", "br1"])
        self.found = discovery("br1")
        self.reactor.advance(REFRESH_INTERVAL)
        self.assertEqual(sorted(self.service.ports), ["br1"])
        self.found = discovery("br1", index=9)
        self.reactor.advance(REFRESH_INTERVAL)
        self.assertEqual(self.bound, ["br0", "br1", "br1"])
        self.assertEqual([p.listening for p in self.reactor.adopted], [False, False, True])

    def test_bind_failure_retried(self) -> None:
        """
        An interface whose socket cannot be made is reported, the rest served, and it
        is tried again at the next refresh.
        """
        self.failing = {"br1"}
        self.found = discovery("br0", "br1")
        self.start()
        self.assertEqual(sorted(self.service.ports), ["br0"])
        self.assertIn("Address already in use", self.service.problems["br1"])
        status = {i["name"]: i["state"] for i in self.service.status()["interfaces"]}
        self.assertEqual(status["br0"], "serving")
        self.assertIn("cannot listen on port 67 of br1", status["br1"])
        self.failing = set()
        self.reactor.advance(REFRESH_INTERVAL)
        self.assertEqual(sorted(self.service.ports), ["br0", "br1"])
        self.assertEqual(self.service.problems, {})

    def test_refresh_failure_logged(self) -> None:
        """
        A failed look at the interfaces keeps the sockets as they are.
        """
        self.start()

        def broken(bridges_only: bool) -> Discovery:
            raise OSError(24, "Too many open files")

        self.service.discover = broken
        self.reactor.advance(REFRESH_INTERVAL)
        self.assertEqual(sorted(self.service.ports), ["br0"])

    def test_only(self) -> None:
        """
        A service told to serve some interfaces only (tests) leaves the others alone.
        """
        self.service.only = {"br1"}
        self.found = discovery("br0", "br1")
        self.start()
        self.assertEqual(sorted(self.service.ports), ["br1"])

    def test_status(self) -> None:
        """
        The status lists interfaces and every kind of lease.
        """
        self.start()
        ip = self.daemon.create(Hostname="one", SubnetId="net")
        self.service.register_external_leases([Address("10.5.0.60", "02:00:00:00:00:60")], [])
        status = self.service.status()
        self.assertEqual(status["static"][0]["ip"], ip)
        self.assertEqual(status["static"][0]["hostname"], "one")
        self.assertEqual(status["external"][0]["ip"], "10.5.0.60")
        self.assertEqual(status["interfaces"][0]["addresses"], "10.0.0.1/24")

    def test_watch_unknown_interface(self) -> None:
        """
        WatchDhcp on an interface not served is refused with a sentence.
        """
        from hypervisor.errors import InvalidRequest

        self.start()
        self.assertRaises(InvalidRequest, self.service.watch, "eth9", 0)
        self.service.watch("br0", 0).close()


class SocketTests(SynchronousTestCase):
    """
    The socket recipe itself.
    """

    def test_bind_socket_options(self) -> None:
        """
        The socket is non-blocking, may broadcast, shares the port, has a large
        receive buffer (requests of a boot storm wait instead of being dropped), and is
        bound to the interface (needs root; on loopback, an unprivileged port).
        """
        import os

        if os.geteuid() != 0:
            from tests import support

            support.require(False, "SO_BINDTODEVICE needs root")
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        s = bind_socket("lo", port)
        try:
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST), 1)
            self.assertEqual(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR), 1)
            device = s.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
            self.assertEqual(device.rstrip(b"\0"), b"lo")
            self.assertFalse(s.getblocking())
            # 4 MiB even beyond net.core.rmem_max (SO_RCVBUFFORCE, as root); the kernel
            # reports twice the size it was given.
            self.assertGreaterEqual(
                s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF), RECEIVE_BUFFER
            )
            self.assertEqual(s.getsockname(), ("0.0.0.0", port))
        finally:
            s.close()
