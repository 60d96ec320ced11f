"""
Tests for L{hypervisor.netguard}, the HTTP channel's reports to it (L{web.channel})
and the TLS sniffer's (L{hypervisor.tls}): deadlines, caps on idle connections,
the descriptor budget and limit, running out of descriptors on accept — in memory
on a C{Clock}, in a subprocess server out of descriptors, and against the real
daemon flooded with raw sockets under a 1024-descriptor limit.
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import ssl as stdlib_ssl
import subprocess
import sys
import textwrap
import time
from typing import Any, Optional

from OpenSSL import crypto
from twisted.internet import protocol, ssl
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionAborted
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from hypervisor import certs, netguard
from hypervisor.netguard import ConnectionGuard, GuardedConnection, Limits, Phase
from hypervisor.tls import SniffingFactory
from tests import support
from web.channel import HypervisorChannel

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class FakeTCP(StringTransport):
    """
    A TCP transport in memory: records aborts and delivers the loss on the clock's
    next turn, as a real one does; C{dataBuffer}/C{offset}/C{_tempDataLen} stand for
    a real transport's unsent output.
    """

    def __init__(self, clock: Clock, peer: Any) -> None:
        super().__init__(peerAddress=peer)
        self.clock = clock
        self.aborted = False
        self.lost = False
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.protocol: Optional[protocol.Protocol] = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def abortConnection(self) -> None:
        if self.aborted or self.lost:
            return
        self.aborted = True
        self.disconnecting = True
        self.clock.callLater(0, self._lose, Failure(ConnectionAborted()))

    def _lose(self, reason: Failure) -> None:
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.protocol.connectionLost(reason)


class _Hang(Resource):
    """
    A resource whose response never finishes (a stream, say).
    """

    isLeaf = True

    def render_GET(self, request: Any) -> Any:
        request.write(b"started\n")
        return NOT_DONE_YET


class _Ok(Resource):
    """
    A resource answering C{ok}.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok"


def make_site(clock: Clock) -> Site:
    """
    A site with C{/} (answers at once) and C{/hang} (never finishes), on
    L{HypervisorChannel}, with no timers of its own.
    """
    root = Resource()
    root.putChild(b"", _Ok())
    root.putChild(b"hang", _Hang())
    site = Site(root, timeout=None, reactor=clock)
    site.protocol = HypervisorChannel
    return site


def tls_options() -> ssl.CertificateOptions:
    """
    Server TLS options with a throw-away self-signed certificate.
    """
    key, cert = certs.make_ca("netguard test")
    return ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
    )


class GuardHarness:
    """
    A guard over the real sniffer and HTTP channel, on a clock, with connections on
    L{FakeTCP}.
    """

    def __init__(
        self,
        limits: Optional[Limits] = None,
        tls: bool = False,
        log_interval: float = netguard.LOG_INTERVAL,
    ) -> None:
        self.clock = Clock()
        self.site = make_site(self.clock)
        self.guard = ConnectionGuard(
            SniffingFactory(self.site, tls_options() if tls else None, clock=self.clock),
            self.clock,
            limits or Limits(max_connections=1000),
            log_interval,
        )
        self.guard.doStart()

    def connect(
        self, host: str = "10.0.0.1", port: int = 40000
    ) -> tuple[Optional[GuardedConnection], FakeTCP]:
        """
        A new connection from C{host}; the protocol is None if refused.
        """
        addr = IPv4Address("TCP", host, port)
        proto = self.guard.buildProtocol(addr)
        transport = FakeTCP(self.clock, addr)
        if proto is not None:
            transport.protocol = proto
            proto.makeConnection(transport)
        return proto, transport


class DeadlineTests(SynchronousTestCase):
    """
    Deadlines per phase, on a clock.
    """

    def test_first_byte_deadline(self) -> None:
        """
        A connection that sends nothing is aborted (not closed) at the first-byte
        deadline, and not before.
        """
        h = GuardHarness()
        conn, t = h.connect()
        assert conn is not None
        self.assertIs(conn.phase, Phase.WAITING)
        h.clock.advance(netguard.FIRST_BYTE_TIMEOUT - 0.1)
        self.assertFalse(t.aborted)
        h.clock.advance(0.2)
        self.assertTrue(t.aborted)
        self.assertEqual(h.guard.counts["aborted: no first byte"], 1)
        h.clock.advance(0)
        self.assertEqual(h.guard.open_connections, 0)

    def test_headers_deadline_counts_from_first_byte(self) -> None:
        """
        The first byte of a request starts the headers deadline, which replaces the
        first-byte deadline.
        """
        h = GuardHarness()
        conn, t = h.connect()
        assert conn is not None
        h.clock.advance(5)
        conn.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertIs(conn.phase, Phase.HEADERS)
        h.clock.advance(netguard.HEADERS_TIMEOUT - 0.1)
        self.assertFalse(t.aborted)
        h.clock.advance(0.2)
        self.assertTrue(t.aborted)
        self.assertEqual(h.guard.counts["aborted: request headers too slow"], 1)

    def test_slowloris_cut_at_total_header_deadline(self) -> None:
        """
        Header lines arriving every second do not extend the headers deadline: it
        is a total, from the request's first byte.
        """
        h = GuardHarness()
        conn, t = h.connect()
        assert conn is not None
        conn.dataReceived(b"GET / HTTP/1.1\r\n")
        sent = 0.0
        while sent < 60:
            h.clock.advance(1)
            if t.aborted:
                break
            sent += 1
            conn.dataReceived(b"X-Slow: %d\r\n" % sent)
        self.assertTrue(t.aborted)
        self.assertEqual(h.clock.seconds(), netguard.HEADERS_TIMEOUT)
        self.assertEqual(sent, netguard.HEADERS_TIMEOUT - 1)

    def test_complete_request_then_idle_deadline(self) -> None:
        """
        A complete request is answered; the keep-alive connection is then idle and
        aborted at the idle deadline, unless another request comes first.
        """
        h = GuardHarness()
        conn, t = h.connect()
        assert conn is not None
        conn.dataReceived(REQUEST)
        self.assertIn(b"200 OK", t.value())
        self.assertIs(conn.phase, Phase.IDLE)
        h.clock.advance(netguard.IDLE_TIMEOUT - 1)
        conn.dataReceived(REQUEST)
        self.assertEqual(t.value().count(b"200 OK"), 2)
        h.clock.advance(netguard.IDLE_TIMEOUT - 1)
        self.assertFalse(t.aborted)
        h.clock.advance(2)
        self.assertTrue(t.aborted)
        self.assertEqual(h.guard.counts["aborted: idle"], 1)

    def test_pipelined_requests(self) -> None:
        """
        Two requests in one read are both answered and leave the connection idle.
        """
        h = GuardHarness()
        conn, t = h.connect()
        assert conn is not None
        conn.dataReceived(REQUEST + REQUEST)
        self.assertEqual(t.value().count(b"200 OK"), 2)
        self.assertIs(conn.phase, Phase.IDLE)

    def test_busy_request_has_no_deadline(self) -> None:
        """
        A request in progress (a stream that never ends) is never timed out by the
        guard.
        """
        h = GuardHarness()
        conn, t = h.connect()
        assert conn is not None
        conn.dataReceived(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIs(conn.phase, Phase.BUSY)
        h.clock.advance(24 * 3600)
        self.assertFalse(t.aborted)

    def test_close_deadline_extended_while_client_reads(self) -> None:
        """
        A connection the server closes is aborted at the close deadline if output
        is left unsent and the client reads none of it, but kept while the client
        keeps reading.
        """
        h = GuardHarness()
        conns = [h.connect(port=i) for i in range(2)]
        for conn, t in conns:
            assert conn is not None
            t.dataBuffer = b"x" * 100000  # what a real transport has yet to send
            conn.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            self.assertIs(conn.phase, Phase.CLOSING)
            self.assertTrue(t.disconnecting)
        (_, stuck), (_, reading) = conns
        for _ in range(5):
            reading.offset += 1000  # the client reads a little in each period
            h.clock.advance(netguard.CLOSE_TIMEOUT)
        self.assertTrue(stuck.aborted)
        self.assertFalse(reading.aborted)
        h.clock.advance(netguard.CLOSE_TIMEOUT)  # no progress in this period
        self.assertTrue(reading.aborted)
        self.assertEqual(h.guard.counts["aborted: close not drained"], 2)

    def test_deadlines_are_parameters(self) -> None:
        """
        The deadlines come from L{Limits}, so tests and operators can change them.
        """
        h = GuardHarness(Limits(first_byte=0.5, max_connections=100))
        _, t = h.connect()
        h.clock.advance(0.6)
        self.assertTrue(t.aborted)


class TlsTests(SynchronousTestCase):
    """
    The TLS path: handshake deadline, reports through the TLS layer, prompt close.
    """

    def test_handshake_deadline(self) -> None:
        """
        A TLS client that starts a handshake and stalls is aborted at the handshake
        deadline, counted from its first byte.
        """
        h = GuardHarness(tls=True)
        conn, t = h.connect()
        assert conn is not None
        h.clock.advance(3)
        conn.dataReceived(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello's first bytes
        self.assertIs(conn.phase, Phase.HANDSHAKE)
        h.clock.advance(netguard.HANDSHAKE_TIMEOUT - 0.1)
        self.assertFalse(t.aborted)
        h.clock.advance(0.2)
        self.assertTrue(t.aborted)
        self.assertEqual(h.guard.counts["aborted: TLS handshake too slow"], 1)

    def tls_pair(self) -> tuple[GuardHarness, GuardedConnection, FakeTCP, Any, FakeTCP]:
        """
        A server connection and an in-memory TLS client, handshake done.
        """
        h = GuardHarness(tls=True)
        conn, server_t = h.connect()
        assert conn is not None
        received: list[bytes] = []

        class Client(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

        client_factory = TLSMemoryBIOFactory(
            ssl.CertificateOptions(), True, protocol.Factory.forProtocol(Client), clock=h.clock
        )
        client = client_factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 6976))
        client_t = FakeTCP(h.clock, None)
        client_t.protocol = client
        client.makeConnection(client_t)
        self.received = received
        self.pump(conn, server_t, client, client_t)
        return h, conn, server_t, client, client_t

    def pump(self, server: Any, server_t: FakeTCP, client: Any, client_t: FakeTCP) -> None:
        """
        Move bytes both ways until neither side has anything to send.
        """
        for _ in range(50):
            to_server, to_client = client_t.value(), server_t.value()
            client_t.clear()
            server_t.clear()
            if not to_server and not to_client:
                # Let buffered TLS writes (flushed on the next turn) go out.
                server_t.clock.advance(0)
                if not client_t.value() and not server_t.value():
                    return
                continue
            if to_server and not server_t.aborted:
                server.dataReceived(to_server)
            if to_client and not client_t.aborted:
                client.dataReceived(to_client)

    def test_handshake_then_request_then_idle(self) -> None:
        """
        Through TLS, the channel finds the guard: after the handshake the connection
        waits for a request (first-byte deadline), a request makes it busy, its end
        idle.
        """
        h, conn, server_t, client, client_t = self.tls_pair()
        self.assertIs(conn.phase, Phase.WAITING)
        client.write(REQUEST)
        h.clock.advance(0)
        self.pump(conn, server_t, client, client_t)
        self.assertIn(b"200 OK", b"".join(self.received))
        self.assertIs(conn.phase, Phase.IDLE)
        self.assertFalse(server_t.aborted)

    def test_tls_close_does_not_wait_for_client(self) -> None:
        """
        When the server closes a TLS connection it sends close_notify and closes
        TCP at once, without waiting for the client's close_notify; the guard then
        watches the close.
        """
        h, conn, server_t, client, client_t = self.tls_pair()
        client.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        h.clock.advance(0)
        # Deliver the request only; the client never answers anything again.
        conn.dataReceived(client_t.value())
        client_t.clear()
        h.clock.advance(0)
        self.assertTrue(server_t.disconnecting, "TCP close waits for the client")
        self.assertIs(conn.phase, Phase.CLOSING)


class CapTests(SynchronousTestCase):
    """
    Caps on idle connections per source and in total; the connection budget.
    """

    def test_per_source_cap_sheds_oldest(self) -> None:
        """
        One connection over the per-source cap sheds that source's oldest idle
        connection; other sources are untouched.
        """
        h = GuardHarness(Limits(max_idle_per_source=3, max_connections=100))
        other, other_t = h.connect("10.0.0.2")
        mine = [h.connect("10.0.0.1", 40000 + i) for i in range(3)]
        self.assertFalse(any(t.aborted for _, t in mine))
        h.connect("10.0.0.1", 40010)
        self.assertEqual([t.aborted for _, t in mine], [True, False, False])
        self.assertFalse(other_t.aborted)
        self.assertEqual(h.guard.counts["shed: idle connections per source"], 1)

    def test_total_cap_sheds_oldest_overall(self) -> None:
        """
        Over the total cap, the oldest idle connection of any source is shed first.
        """
        h = GuardHarness(Limits(max_idle_total=4, max_connections=100))
        conns = [h.connect(f"10.0.1.{i}") for i in range(4)]
        h.connect("10.0.2.1")
        h.connect("10.0.2.2")
        self.assertEqual([t.aborted for _, t in conns], [True, True, False, False])
        self.assertEqual(h.guard.idle_connections, 4)

    def test_longest_idle_is_shed_first(self) -> None:
        """
        "Oldest" is the connection idle the longest: one that just finished a
        request is younger than one that connected later and sent nothing.
        """
        h = GuardHarness(Limits(max_idle_per_source=2, max_connections=100))
        first, first_t = h.connect(port=1)
        assert first is not None
        first.dataReceived(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")  # busy
        _, silent_t = h.connect(port=2)
        # The first request finishes: that connection becomes idle now.
        first.wrappedProtocol.requests[0].finish()
        self.assertIs(first.phase, Phase.IDLE)
        h.connect(port=3)
        self.assertTrue(silent_t.aborted)
        self.assertFalse(first_t.aborted)

    def test_busy_connections_not_shed(self) -> None:
        """
        Connections with a request in progress do not count against the idle caps
        and are never shed, whatever the number of idle connections.
        """
        h = GuardHarness(Limits(max_idle_per_source=2, max_idle_total=3, max_connections=1000))
        busy = []
        for i in range(5):
            conn, t = h.connect(port=i)
            assert conn is not None
            conn.dataReceived(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append(t)
        idle = [h.connect(port=100 + i)[1] for i in range(10)]
        self.assertFalse(any(t.aborted for t in busy))
        self.assertEqual(sum(t.aborted for t in idle), 8)
        h.clock.advance(3600)
        self.assertFalse(any(t.aborted for t in busy))

    def test_budget_sheds_idle_then_refuses(self) -> None:
        """
        At the connection budget a new connection sheds the oldest idle one; when
        every connection is busy it is refused.
        """
        hang = b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n"
        h = GuardHarness(Limits(max_connections=3))
        busy, busy_t = h.connect(port=1)
        assert busy is not None
        busy.dataReceived(hang)
        _, oldest_idle = h.connect(port=2)
        newer, _ = h.connect(port=3)
        fourth, _ = h.connect(port=4)
        self.assertTrue(oldest_idle.aborted)
        self.assertFalse(busy_t.aborted)
        assert newer is not None and fourth is not None
        newer.dataReceived(hang)
        fourth.dataReceived(hang)
        refused, _ = h.connect(port=5)
        self.assertIsNone(refused)
        self.assertEqual(h.guard.counts["shed: connection budget"], 1)
        self.assertEqual(h.guard.counts["refused: all connections busy"], 1)

    def test_source_keys(self) -> None:
        """
        IPv4 addresses count alone, IPv6 addresses by /64, IPv4-mapped as IPv4.
        """
        self.assertEqual(netguard.source_key(IPv4Address("TCP", "10.1.2.3", 1)), "10.1.2.3")
        self.assertEqual(
            netguard.source_key(IPv6Address("TCP", "2001:db8::1", 1)),
            netguard.source_key(IPv6Address("TCP", "2001:db8::ffff:1", 1)),
        )
        self.assertNotEqual(
            netguard.source_key(IPv6Address("TCP", "2001:db8::1", 1)),
            netguard.source_key(IPv6Address("TCP", "2001:db8:0:1::1", 1)),
        )
        self.assertEqual(netguard.source_key(IPv6Address("TCP", "::ffff:10.1.2.3", 1)), "10.1.2.3")

    def test_budget_follows_descriptor_limit(self) -> None:
        """
        The budget leaves an eighth of the descriptors (at least 64) to the rest of
        the daemon, and is capped.
        """
        self.assertEqual(netguard.descriptor_budget(1024), 896)
        self.assertEqual(netguard.descriptor_budget(256), 192)
        self.assertEqual(netguard.descriptor_budget(1 << 20), netguard.MAX_CONNECTIONS)
        self.assertEqual(netguard.descriptor_budget(40), 16)


class LoggingTests(SynchronousTestCase):
    """
    Shed, aborted and refused connections are logged at most once per interval.
    """

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def guard_lines(self) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e.get("log_namespace") == "hypervisor.netguard" and "summary" in e
        ]

    def test_aborts_logged_once_per_interval(self) -> None:
        """
        A thousand aborts in one interval give one line at once and one summary
        line with the count at the end of the interval.
        """
        h = GuardHarness(Limits(max_idle_per_source=1, max_connections=5000), log_interval=3)
        for i in range(1001):
            h.connect(port=i)
        self.assertEqual(len(self.guard_lines()), 1)
        h.clock.advance(3)
        lines = self.guard_lines()
        self.assertEqual(len(lines), 2)
        self.assertIn("x999", lines[1]["summary"])
        h.clock.advance(3)
        self.assertEqual(len(self.guard_lines()), 2)

    def test_out_of_descriptors_logged_once_per_interval(self) -> None:
        """
        Repeated EMFILE on accept is logged once per interval with a count, and
        each time sheds idle connections.
        """
        h = GuardHarness()
        conns = [h.connect(port=i)[1] for i in range(20)]
        for _ in range(50):
            h.guard.out_of_descriptors(errno.EMFILE)
        self.assertEqual(sum(t.aborted for t in conns), 20)
        h.clock.advance(netguard.LOG_INTERVAL)
        emfile = [e for e in self.events if "EMFILE" in str(e.get("summary", ""))]
        self.assertEqual(len(emfile), 2)
        self.assertIn("EMFILE x49", emfile[1]["summary"])


class NofileLimitTests(SynchronousTestCase):
    """
    L{netguard.raise_nofile_limit}.
    """

    def test_raises_soft_to_hard(self) -> None:
        """
        The soft limit is raised to the hard limit.
        """
        calls: list[tuple[int, int]] = []
        soft = netguard.raise_nofile_limit(lambda r: (1024, 524288), lambda r, v: calls.append(v))
        self.assertEqual(calls, [(524288, 524288)])
        self.assertEqual(soft, 524288)

    def test_ceiling_and_failure(self) -> None:
        """
        An unlimited hard limit raises the soft one to the ceiling; a refused raise
        keeps the old limit (and is logged).
        """
        calls: list[tuple[int, int]] = []
        netguard.raise_nofile_limit(
            lambda r: (1024, resource.RLIM_INFINITY), lambda r, v: calls.append(v)
        )
        self.assertEqual(calls, [(netguard.NOFILE_CEILING, resource.RLIM_INFINITY)])

        def refuse(r: int, v: tuple[int, int]) -> None:
            raise ValueError("not allowed")

        self.assertEqual(netguard.raise_nofile_limit(lambda r: (1024, 4096), refuse), 1024)

    def test_real_process(self) -> None:
        """
        In a process started with a soft limit of 1024 and a hard one of 4096, the
        soft limit ends at 4096.
        """
        support.require(os.path.exists("/usr/bin/prlimit"), "needs prlimit (util-linux)")
        result = subprocess.run(
            [
                "prlimit",
                "--nofile=1024:4096",
                sys.executable,
                "-c",
                "import resource; from hypervisor.netguard import raise_nofile_limit; "
                "raise_nofile_limit(); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
            ],
            cwd=support.REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env=dict(os.environ, PYTHONPATH=support.REPO),
        )
        self.assertEqual(result.stdout.strip(), "4096", result.stderr)


# A server out of descriptors: a guard with no budget of its own (so the process
# does run out), on GuardedPort, under a limit of 64 descriptors.
EMFILE_SERVER = textwrap.dedent("""
    import sys
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from hypervisor.netguard import ConnectionGuard, Limits
    from hypervisor.tls import SniffingFactory
    from tests.test_netguard import make_site
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)],
                                    redirectStandardIO=False)
    site = make_site(reactor)
    guard = ConnectionGuard(SniffingFactory(site, None), reactor,
                            Limits(max_idle_per_source=100000, max_idle_total=100000,
                                   max_connections=100000))
    service = guard.tcp_server(0, interface="127.0.0.1")
    service.startService()
    print(service._port.getHost().port, flush=True)
    reactor.run()
""")


class OutOfDescriptorsTests(SynchronousTestCase):
    """
    L{netguard.GuardedPort} in a real process that runs out of descriptors.
    """

    def start_server(self) -> tuple[subprocess.Popen[str], int, str]:
        support.require(os.path.exists("/usr/bin/prlimit"), "needs prlimit (util-linux)")
        log_path = os.path.join(self.mktemp() + ".log")
        log = open(log_path, "w")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            ["prlimit", "--nofile=64:64", sys.executable, "-c", EMFILE_SERVER],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.kill)
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 30)
        if not ready:
            with open(log_path) as f:
                raise AssertionError(f"the server did not start:\n{f.read()}")
        port = int(process.stdout.readline())
        return process, port, log_path

    def test_emfile_sheds_idle_and_logs_once(self) -> None:
        """
        With every descriptor taken by idle connections, a new connection is still
        served (idle ones are shed to make room) and EMFILE is logged at most once
        per interval, not per connection.
        """
        _, port, log_path = self.start_server()
        idle = []
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            idle.append(s)
        self.addCleanup(lambda: [s.close() for s in idle])
        time.sleep(0.5)
        for attempt in range(3):
            status, body = support.http_get(f"http://127.0.0.1:{port}/", timeout=5)
            self.assertEqual((status, body), (200, "ok"))
        closed = sum(1 for s in idle if _closed(s))
        with open(log_path) as f:
            lines = [line for line in f if "out of file descriptors" in line]
        self.assertGreater(closed, 50, "idle connections were not shed")
        self.assertLessEqual(len(lines), 2, "".join(lines))
        self.assertIn("EMFILE", lines[0])

    def test_emfile_all_busy_refuses_without_spinning(self) -> None:
        """
        With every descriptor taken by busy connections, new connections are closed
        at once (not left hanging), the server does not spin, and the log has one
        line per interval.
        """
        process, port, log_path = self.start_server()
        busy: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in busy])
        refusals_in_a_row = 0
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            except ConnectionError:  # refused so fast that connect() saw the reset
                refusals_in_a_row += 1
                if refusals_in_a_row == 3:
                    break
                continue
            if _answer(s).startswith(b"HTTP/1.1 200"):
                busy.append(s)
                refusals_in_a_row = 0
            else:
                s.close()
                refusals_in_a_row += 1
                if refusals_in_a_row == 3:
                    break
        self.assertEqual(refusals_in_a_row, 3, "the server never ran out")
        started = time.monotonic()
        answers = []
        for _ in range(20):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
            except ConnectionError:  # refused so fast that connect() saw the reset
                answers.append(b"")
                continue
            answers.append(_answer(s))
            s.close()
        self.assertEqual(answers, [b""] * 20)
        self.assertLess(time.monotonic() - started, 5)
        cpu = _cpu_seconds(process.pid)
        time.sleep(1)
        self.assertLess(_cpu_seconds(process.pid) - cpu, 0.5, "the server spins")
        with open(log_path) as f:
            lines = [line for line in f if "out of file descriptors" in line]
        self.assertLessEqual(len(lines), 2, "".join(lines))


def _answer(s: socket.socket, timeout: float = 5.0) -> bytes:
    """
    The first bytes the server sends on C{s}; C{b""} if it closes or resets it.
    """
    s.settimeout(timeout)
    try:
        return s.recv(100)
    except ConnectionResetError:
        return b""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _closed(s: socket.socket) -> bool:
    """
    Whether the server closed or reset C{s} (without blocking; C{s} is left
    non-blocking).
    """
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class LimitedDaemon(support.Daemon):
    """
    The real daemon started under C{prlimit --nofile=1024:1024}: the shipped unit's
    soft limit, with no higher hard limit to raise it to.
    """

    nofile = "1024:1024"

    def __init__(self, testcase: Any, *flags: str) -> None:
        super().__init__(testcase, *flags)
        old = f"-portNum={self.port}"
        self.port = _port_outside_ephemeral_range()
        self.flags = [f"-portNum={self.port}" if f == old else f for f in self.flags]

    def start(self) -> None:
        """
        Start the daemon under prlimit and wait until its pages answer.
        """
        env = dict(os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=self.dir)
        self._output = open(self.output_path, "wb")
        self.process = subprocess.Popen(
            [
                "prlimit",
                f"--nofile={self.nofile}",
                sys.executable,
                "-m",
                "hypervisor",
                *self.flags,
                "run",
            ],
            cwd=support.REPO,
            env=env,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.output()}")
            return support.http_get(self.url + "/healthz", timeout=2)[0] in (200, 503)

        support.wait_for(up, 60, "the daemon's pages")


def _port_outside_ephemeral_range() -> int:
    """
    A TCP port free on all addresses and below the ephemeral range, so that the
    thousands of client sockets of a flood cannot hold it.
    """
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for port in range(low - 1, 1024, -1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def open_idle(port: int, count: int, sources: int) -> list[socket.socket]:
    """
    C{count} connections that never send a byte, from C{sources} loopback
    addresses (127.0.0.10 and up), round robin.
    """
    sockets = []
    for i in range(count):
        s = socket.socket()
        s.bind((f"127.0.0.{10 + i % sources}", 0))
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        sockets.append(s)
    return sockets


class RealDaemonTests(SynchronousTestCase):
    """
    The real daemon under a 1024-descriptor limit, flooded with raw sockets.
    """

    def start(self) -> LimitedDaemon:
        support.require(
            os.geteuid() == 0 and os.path.exists("/usr/bin/prlimit"), "needs root and prlimit"
        )
        d = LimitedDaemon(self, "-libvirtUri=test:///default", "-domainType=qemu")
        pki = os.path.join(d.dir, "pki")
        d.flags += [
            f"-CAfile={pki}/CA.pem",
            f"-identityCAfile={pki}/none.pem",
            f"-certFile={pki}/server.pem",
            f"-keyFile={pki}/server.key",
        ]
        result = d.command(
            "make-certs", "--user", "admin", "--methods", "*.*", "--out", f"{pki}/users"
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        d.start()
        self.pki = pki
        return d

    def test_idle_flood_and_slowloris(self) -> None:
        """
        Under a 1024-descriptor limit, 1,100 idle connections from 20 sources, a
        slowloris sender and a stalled TLS handshake: /healthz and the control
        socket keep working, at most the total idle cap stays open, the slowloris
        and the handshake are cut at their deadlines, every idle socket is closed by
        the first-byte deadline, `hypervisor stop` works during a second flood, and
        the log has no EMFILE line and only a few rate-limited guard lines.
        """
        d = self.start()
        assert d.process is not None
        with open(f"/proc/{d.process.pid}/limits") as f:
            self.assertIn("1024", [line for line in f if "open files" in line][0])

        flood_started = time.monotonic()
        idle = open_idle(d.port, 1100, 20)
        self.addCleanup(lambda: [s.close() for s in idle])
        flood_ended = time.monotonic()
        flood_seconds = flood_ended - flood_started
        # After the flood, so that they are not the oldest idle connections (which
        # the total cap sheds first) but are cut by their own deadlines.
        slow = socket.socket()
        slow.bind(("127.0.0.2", 0))
        slow.connect(("127.0.0.1", d.port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        slow_started = time.monotonic()
        stalled = socket.socket()
        stalled.bind(("127.0.0.3", 0))
        stalled.connect(("127.0.0.1", d.port))
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01")
        stalled_started = time.monotonic()
        self.addCleanup(slow.close)
        self.addCleanup(stalled.close)
        self.assertEqual(support.http_get(d.url + "/healthz")[0], 200)
        time.sleep(0.5)
        shed_at_once = sum(_closed(s) for s in idle)
        self.assertGreaterEqual(shed_at_once, 1100 - netguard.MAX_IDLE_TOTAL)

        # The control socket answers during the flood.
        result = d.command("stop-vms-on-next-stop", timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)

        slow_cut = stalled_cut = None
        sent = 0
        while time.monotonic() - flood_ended < netguard.FIRST_BYTE_TIMEOUT + 5:
            now = time.monotonic()
            if slow_cut is None:
                if _closed(slow):
                    slow_cut = now - slow_started
                elif now - slow_started > sent:
                    sent += 1
                    try:
                        slow.sendall(b"X-Slow-%d: 1\r\n" % sent)
                    except OSError:
                        slow_cut = now - slow_started
            if stalled_cut is None and _closed(stalled):
                stalled_cut = now - stalled_started
            if all(_closed(s) for s in idle) and slow_cut and stalled_cut:
                break
            time.sleep(0.2)
        all_closed_after = time.monotonic() - flood_ended
        still_open = sum(not _closed(s) for s in idle)
        self.assertEqual(still_open, 0)
        self.assertLess(all_closed_after, netguard.FIRST_BYTE_TIMEOUT + 3)
        assert slow_cut is not None and stalled_cut is not None
        self.assertGreater(slow_cut, netguard.HEADERS_TIMEOUT - 1)
        self.assertLess(slow_cut, netguard.HEADERS_TIMEOUT + 3)
        self.assertGreater(stalled_cut, netguard.HANDSHAKE_TIMEOUT - 1)
        self.assertLess(stalled_cut, netguard.HANDSHAKE_TIMEOUT + 3)

        # A second flood, held while the daemon is stopped through its control socket.
        idle2 = open_idle(d.port, 1100, 20)
        self.addCleanup(lambda: [s.close() for s in idle2])
        self.assertEqual(support.http_get(d.url + "/healthz")[0], 200)
        result = d.command("stop", timeout=60)
        self.assertEqual(
            (result.returncode, result.stdout.strip()), (0, "hypervisor stopped"), result.stderr
        )
        self.assertEqual(d.wait(30), 0)
        output = d.output()
        emfile = [
            line
            for line in output.splitlines()
            if "EMFILE" in line or "out of file descriptors" in line
        ]
        guard = [line for line in output.splitlines() if "connections open" in line]
        print(
            f"\n  flood of 1100 idle sockets opened in {flood_seconds:.2f}s; "
            f"{shed_at_once} shed at once; all closed {all_closed_after:.1f}s after "
            f"the flood ended; slowloris cut after {slow_cut:.1f}s, stalled TLS "
            f"handshake after {stalled_cut:.1f}s; EMFILE lines: {len(emfile)}; "
            f"guard log lines: {len(guard)}"
        )
        self.assertEqual(emfile, [])
        self.assertLessEqual(len(guard), 8, "\n".join(guard))

    def test_tls_close_is_prompt(self) -> None:
        """
        When the server gives up on a TLS connection (a bad request), the TCP
        connection is closed at once, although the client never sends its
        close_notify.
        """
        d = self.start()
        context = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = stdlib_ssl.CERT_NONE
        incoming, outgoing = stdlib_ssl.MemoryBIO(), stdlib_ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing)
        raw = socket.create_connection(("127.0.0.1", d.port), timeout=5)
        self.addCleanup(raw.close)

        def flush() -> None:
            data = outgoing.read()
            if data:
                raw.sendall(data)

        while True:
            try:
                tls.do_handshake()
                break
            except stdlib_ssl.SSLWantReadError:
                flush()
                incoming.write(raw.recv(65536))
        flush()
        tls.write(b"BAD REQUEST LINE\r\n\r\n")
        flush()
        started = time.monotonic()
        raw.settimeout(netguard.CLOSE_TIMEOUT + 5)
        received = b""
        while True:
            try:
                chunk = raw.recv(65536)  # raw TCP: never answer the close_notify
            except ConnectionResetError:
                break  # aborted by a deadline: too late, as the check below says
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
        incoming.write(received)
        try:
            answer = tls.read(65536)
        except stdlib_ssl.SSLError:
            answer = b""
        self.assertLess(elapsed, 2.0, "the TCP connection lingered after close_notify")
        self.assertIn(b"400", answer)


class ServerTests(SynchronousTestCase):
    """
    L{ConnectionGuard.tcp_server}.
    """

    def test_fake_reactor_records_listen(self) -> None:
        """
        On a fake reactor the service listens through C{listenTCP} (recorded, no
        socket), with the guard as the factory and the larger backlog.
        """
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        guard = netguard.guard_factory(SniffingFactory(make_site(Clock()), None), reactor)
        service = guard.tcp_server(6976)
        service.startService()
        [(port, factory, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, factory, backlog), (6976, guard, netguard.LISTEN_BACKLOG))


class RealReactorServerTests(TestCase):
    """
    L{ConnectionGuard.tcp_server} on the real reactor.
    """

    def test_real_reactor_uses_guarded_port(self) -> None:
        """
        On the real reactor the service listens with L{netguard.GuardedPort}.
        """
        from twisted.internet import reactor

        guard = netguard.guard_factory(SniffingFactory(make_site(Clock()), None), reactor)
        service = guard.tcp_server(0, interface="127.0.0.1")
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIsInstance(service._port, netguard.GuardedPort)


class NoDelayTests(TestCase):
    """
    Guarded TCP connections send at once (TCP_NODELAY), over a real socket.
    """

    async def test_accepted_connections_have_no_delay(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.defer import Deferred

        made: Deferred[Any] = Deferred()

        class Server(protocol.Protocol):
            def connectionMade(self) -> None:
                made.callback(self.transport)

        guard = netguard.guard_factory(protocol.Factory.forProtocol(Server), reactor)
        port = reactor.listenTCP(0, guard, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        transport = await made
        tcp = transport.transport  # the guard's transport: the TCP connection
        self.assertTrue(tcp.getTcpNoDelay())
        raw = tcp.getHandle()
        self.assertEqual(raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        tcp.loseConnection()
