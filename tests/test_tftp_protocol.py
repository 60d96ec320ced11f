"""
Tests for L{hypervisor.tftp.protocol.TftpServer} in memory (fake transfer ports, a
L{Clock}) with the real metrics: requests that are refused (write, malformed, mail
mode, missing file, '..', busy), repeated requests, a whole transfer counted in the
metrics and shown in the status, the block size clamped to the path MTU, stopping.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hypervisor.metrics import TftpMetrics
from hypervisor.tftp import codec
from hypervisor.tftp.backend import TftpBackend
from hypervisor.tftp.protocol import SessionPorts, SessionProtocol, TftpServer, UdpSessionPort

CLIENT = ("10.0.0.5", 40000)


class FakePort:
    """
    A transfer port that records what it sent.
    """

    def __init__(self, client: tuple[str, int], protocol: SessionProtocol, mtu: int) -> None:
        self.client = client
        self.protocol = protocol
        self.mtu = mtu
        self.sent: list[codec.Packet] = []
        self.closed = False

    def send(self, data: bytes) -> None:
        assert not self.closed
        self.sent.append(codec.decode(data))

    def close(self) -> None:
        self.closed = True

    def deliver(self, packet: codec.Packet) -> None:
        self.protocol.datagramReceived(codec.encode(packet), self.client)


class Harness:
    """
    A server with fake ports, files for 10.0.0.5, and metrics.
    """

    def __init__(self, mtu: int = 0, **kwargs: Any) -> None:
        self.clock = Clock()
        self.ports: list[FakePort] = []
        self.replies: list[bytes] = []
        self.registry = CollectorRegistry()
        self.metrics = TftpMetrics(self.registry)
        files = {"10.0.0.5": {"boot": b"B" * 1300, "cfg": b"config"}}

        def open_port(client: tuple[str, int], protocol: SessionProtocol) -> FakePort:
            port = FakePort(client, protocol, mtu)
            self.ports.append(port)
            return port

        self.server = TftpServer(
            TftpBackend(lambda ip: files.get(ip, {})),
            self.clock,
            open_port,  # type: ignore[arg-type]
            stats=self.metrics,
            **kwargs,
        )

    def request(self, packet: Any, client: tuple[str, int] = CLIENT) -> None:
        raw = packet if isinstance(packet, bytes) else codec.encode(packet)
        self.server.request(raw, client, self.replies.append)

    def metric(self, name: str, labels: Optional[dict[str, str]] = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return value or 0.0


def rrq(name: str, **options: str) -> codec.Request:
    return codec.Request(codec.RRQ, name, "octet", dict(options))


class RefusalTests(SynchronousTestCase):
    """
    Requests answered with an ERROR, and packets dropped.
    """

    def test_write_refused(self) -> None:
        """
        A WRQ gets ERROR 2 at once (read-only server); nothing is opened.
        """
        h = Harness()
        h.request(codec.Request(codec.WRQ, "boot"))
        self.assertEqual(
            [codec.decode(r) for r in h.replies],
            [codec.Error(2, "this TFTP server is read-only")],
        )
        self.assertEqual(h.ports, [])
        self.assertEqual(h.metric("hypervisor_tftp_refused_total", {"code": "2"}), 1)

    def test_malformed(self) -> None:
        """
        A malformed request gets ERROR 4 no longer than itself; other malformed
        packets, and ACK/DATA on the server port, are dropped silently; all counted.
        """
        h = Harness()
        raw = b"\x00\x01boot\x00binary\x00"
        h.request(raw)
        (reply,) = h.replies
        self.assertLessEqual(len(reply), len(raw))
        error = codec.decode(reply)
        assert isinstance(error, codec.Error)
        self.assertEqual(error.code, 4)
        h.replies.clear()
        h.request(b"\x00\x09\x00")
        h.request(codec.Ack(1))
        h.request(codec.Data(1, b"x"))
        self.assertEqual(h.replies, [])
        self.assertEqual(h.metric("hypervisor_tftp_drops_total", {"reason": "malformed"}), 2)
        self.assertEqual(h.metric("hypervisor_tftp_drops_total", {"reason": "not a request"}), 2)

    def test_missing_file(self) -> None:
        """
        A missing file gets ERROR 1 at once, from the transfer's own port, which is
        then closed; another client does not see 10.0.0.5's files.
        """
        h = Harness()
        h.request(rrq("boot"), ("10.0.0.6", 1234))
        (port,) = h.ports
        self.assertEqual(port.sent, [codec.Error(1, "file not found")])
        self.assertTrue(port.closed)
        self.assertEqual(h.server.transfers, {})
        self.assertEqual(h.metric("hypervisor_tftp_refused_total", {"code": "1"}), 1)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_dot_dot(self) -> None:
        """
        A name with '..' gets ERROR 2.
        """
        h = Harness()
        h.request(rrq("../../etc/passwd"))
        (port,) = h.ports
        (error,) = port.sent
        assert isinstance(error, codec.Error)
        self.assertEqual(error.code, 2)

    def test_mail_mode(self) -> None:
        """
        Mail mode (writes only) gets ERROR 4.
        """
        h = Harness()
        h.request(codec.Request(codec.RRQ, "boot", "mail"))
        error = codec.decode(h.replies[0])
        assert isinstance(error, codec.Error)
        self.assertEqual(error.code, 4)

    def test_busy(self) -> None:
        """
        Past max_sessions transfers a request gets ERROR 0 (busy).
        """
        h = Harness(max_sessions=1)
        h.request(rrq("boot"))
        h.request(rrq("boot"), ("10.0.0.5", 40001))
        self.assertEqual(len(h.ports), 1)
        error = codec.decode(h.replies[0])
        assert isinstance(error, codec.Error)
        self.assertIn("busy", error.message)

    def test_per_client_limit(self) -> None:
        """
        One address gets at most max_per_client transfers at once; others still get
        theirs, and the address gets more once one ends.
        """
        h = Harness(max_per_client=2)
        h.request(rrq("boot"), ("10.0.0.5", 1))
        h.request(rrq("boot"), ("10.0.0.5", 2))
        h.request(rrq("boot"), ("10.0.0.5", 3))
        self.assertEqual(len(h.ports), 2)
        error = codec.decode(h.replies[0])
        assert isinstance(error, codec.Error)
        self.assertIn("2 transfers to this address", error.message)
        h.request(rrq("nothing"), ("10.0.0.6", 1))
        self.assertEqual(len(h.ports), 3)
        for block in (1, 2, 3):
            h.ports[0].deliver(codec.Ack(block))
        self.assertTrue(h.ports[0].closed)
        h.request(rrq("boot"), ("10.0.0.5", 4))
        self.assertEqual(len(h.ports), 4)


class TransferTests(SynchronousTestCase):
    """
    Whole transfers.
    """

    def test_transfer(self) -> None:
        """
        A transfer with options: a repeated RRQ is ignored, the status shows it in
        progress, the metrics count it started, completed, its bytes and duration by
        file name, and its port is closed.
        """
        h = Harness()
        h.request(rrq("/tftpboot/boot", blksize="1024", tsize="0"))
        h.request(rrq("/tftpboot/boot", blksize="1024", tsize="0"))
        (port,) = h.ports
        self.assertEqual(port.sent, [codec.OptionAck({"blksize": "1024", "tsize": "1300"})])
        self.assertEqual(h.metric("hypervisor_tftp_drops_total", {"reason": "repeated request"}), 1)
        port.deliver(codec.Ack(0))
        (row,) = h.server.status()["transfers"]
        self.assertEqual(
            (row["client"], row["file"], row["size"], row["bytes"]),
            ("10.0.0.5:40000", "/boot", 1300, 0),
        )
        h.clock.advance(0.5)
        port.deliver(codec.Ack(1))
        self.assertEqual(h.server.status()["transfers"][0]["bytes"], 1024)
        port.deliver(codec.Ack(2))
        self.assertEqual(
            b"".join(p.payload for p in port.sent if isinstance(p, codec.Data)), b"B" * 1300
        )
        self.assertTrue(port.closed)
        status = h.server.status()
        self.assertEqual((status["transfers"], status["completed"]), ([], 1))
        self.assertEqual(h.metric("hypervisor_tftp_transfers_started_total"), 1)
        self.assertEqual(h.metric("hypervisor_tftp_transfers_total", {"outcome": "completed"}), 1)
        self.assertEqual(h.metric("hypervisor_tftp_sent_bytes_total"), 1300)
        self.assertEqual(h.metric("hypervisor_tftp_transfer_seconds_count", {"file": "/boot"}), 1)
        self.assertEqual(h.metric("hypervisor_tftp_transfer_seconds_sum", {"file": "/boot"}), 0.5)
        self.assertIn(b"hypervisor_tftp_transfer_seconds_bucket", generate_latest(h.registry))

    def test_timeout_counted(self) -> None:
        """
        A client that stops answering: the transfer fails as a timeout, counted.
        """
        h = Harness(retries=1)
        h.request(rrq("cfg"))
        h.clock.advance(1.0)
        h.clock.advance(1.0)
        self.assertEqual(h.server.transfers, {})
        self.assertEqual(h.metric("hypervisor_tftp_transfers_total", {"outcome": "timeout"}), 1)
        self.assertEqual(h.server.status()["failed"], 1)

    def test_mtu_clamp(self) -> None:
        """
        The block size is clamped to what the transfer's path MTU carries.
        """
        h = Harness(mtu=1500)
        h.request(rrq("boot", blksize="65464"))
        self.assertEqual(h.ports[0].sent, [codec.OptionAck({"blksize": "1468"})])

    def test_stop(self) -> None:
        """
        Stopping ends transfers with an ERROR, closes their ports and refuses more.
        """
        h = Harness()
        h.request(rrq("boot"))
        (port,) = h.ports
        h.server.stop()
        self.assertIsInstance(port.sent[-1], codec.Error)
        self.assertTrue(port.closed)
        h.request(rrq("boot"), ("10.0.0.5", 5))
        self.assertEqual(len(h.ports), 1)
        self.assertEqual(h.metric("hypervisor_tftp_transfers_total", {"outcome": "stopped"}), 1)


class HostileTests(SynchronousTestCase):
    """
    Random bytes at the server port and at a transfer port.
    """

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.lists(st.binary(max_size=80), max_size=8), st.lists(st.binary(max_size=12), max_size=8)
    )
    def test_random_packets(self, requests: list[bytes], to_transfer: list[bytes]) -> None:
        """
        Random packets never raise; replies are never larger than their request
        except an error for a refused read or write request; a transfer fed random
        bytes still ends (completed, or given up after the timeouts) and leaves
        nothing behind.
        """
        h = Harness(retries=1)
        h.request(rrq("boot"))
        for raw in requests:
            before = len(h.replies)
            h.request(raw, ("10.0.0.9", 7))
            for reply in h.replies[before:]:
                self.assertTrue(len(reply) <= len(raw) or raw[:2] in (b"\x00\x01", b"\x00\x02"))
        port = h.ports[0]
        for raw in to_transfer:
            port.protocol.datagramReceived(raw, CLIENT)
        for _ in range(5):
            h.clock.advance(1.0)
        self.assertEqual(h.server.transfers, {})
        self.assertTrue(all(p.closed for p in h.ports))
        self.assertEqual(h.clock.getDelayedCalls(), [])


class Collecting(SessionProtocol):
    """
    A transfer socket's protocol that keeps what it is given (or fails on it).
    """

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.got: list[bytes] = []
        self.errors: list[OSError] = []
        self.fail = fail
        self.deliver = self.collect

    def collect(self, datagram: bytes) -> None:
        if self.fail:
            raise RuntimeError("a bug in a session")
        self.got.append(datagram)

    def failed(self, error: OSError) -> None:
        self.errors.append(error)


class SessionPortsTests(TestCase):
    """
    The reactor's transfer sockets behind one epoll set, on the real reactor and
    real sockets on 127.0.0.1.
    """

    def test_many_sockets_one_reader(self) -> None:
        """
        The reactor watches one descriptor for every transfer socket, and only while
        there is one; each socket's packets reach its own protocol; a socket whose
        reading fails is closed (its transfer told), the others go on.
        """
        from twisted.internet import reactor

        ports = SessionPorts(reactor)
        readers = lambda: [r for r in reactor.getReaders() if r is ports]  # noqa: E731
        clients, protocols, sockets = [], [], []
        for i in range(4):
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            client.bind(("127.0.0.1", 0))
            self.addCleanup(client.close)
            protocol = Collecting(fail=i == 2)
            port = UdpSessionPort(reactor, client.getsockname(), protocol, ports)
            self.addCleanup(port.close)
            client.connect(port.socket.getsockname())
            clients.append(client)
            protocols.append(protocol)
            sockets.append(port)
        self.assertEqual(len(readers()), 1)
        self.assertNotIn(sockets[0], reactor.getReaders())
        for i, client in enumerate(clients):
            client.send(b"packet %d" % i)
            client.send(b"again %d" % i)

        async def go() -> None:
            for _ in range(500):
                if all(len(p.got) == 2 for i, p in enumerate(protocols) if i != 2):
                    break
                await deferLater(reactor, 0.01, lambda: None)
            for i, protocol in enumerate(protocols):
                if i == 2:
                    self.assertEqual((protocol.got, len(protocol.errors)), ([], 1))
                    self.assertTrue(sockets[i].closed)
                else:
                    self.assertEqual(protocol.got, [b"packet %d" % i, b"again %d" % i])
                    self.assertEqual(protocol.errors, [])
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
            self.assertEqual(len(readers()), 1)
            for port in sockets:
                port.close()
            self.assertEqual(readers(), [])
            self.assertEqual(ports.ports, {})

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_socket_closed_elsewhere(self) -> None:
        """
        A socket closed behind the set's back (its descriptor gone from the epoll set
        with it) is still forgotten by L{SessionPorts.remove}, and the reactor stops
        watching the set.
        """
        from twisted.internet import reactor

        ports = SessionPorts(reactor)
        port = UdpSessionPort(reactor, ("127.0.0.1", 9), Collecting(), ports)
        port.socket.close()
        ports.remove(port)
        self.assertEqual(ports.ports, {})
        self.assertNotIn(ports, reactor.getReaders())

    def test_detach(self) -> None:
        """
        A socket handed to a thread is no longer read here, and stays open.
        """
        from twisted.internet import reactor

        ports = SessionPorts(reactor)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.bind(("127.0.0.1", 0))
        self.addCleanup(client.close)
        port = UdpSessionPort(reactor, client.getsockname(), Collecting(), ports)
        detached = port.detach()
        self.addCleanup(detached.close)
        self.assertEqual((ports.ports, port in reactor.getReaders()), ({}, False))
        self.assertNotIn(ports, reactor.getReaders())
        self.assertGreaterEqual(detached.fileno(), 0)
