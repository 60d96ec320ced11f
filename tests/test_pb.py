"""
The PB service over real TLS connections with real certificates (the fixture of
L{tests.test_rpc_access}: a manager on libvirt's test driver, a dispatcher, a CA,
user certificates), driven by L{hypervisor.client}:

- streams: an observer gets each update only after answering the one before (flow
  control); an observer whose client disconnects is released (stream closed,
  session gone); 100 connect/subscribe/disconnect cycles leave no growth;
- uploads: user data through the remote sink arrive byte for byte (GetVmUserData
  reads them back, the same bytes), an upload announcing more than it sends fails
  cleanly;
- bounds, attacked with real clients: a message over the limit closes the
  connection (a raw TLS socket sending an endless Banana list, with and without a
  certificate); a request over its method's limit is refused (413); more streams
  than allowed per connection are refused (503); the connection cap refuses the
  connection beyond it; a certificate without the CA is refused (401), nothing
  served.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import ssl
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hypervisor.auth import ROOT
from hypervisor.client import CallFailed, HypervisorClient, connect
from hypervisor.model import Address, ChangeAddressPoolRequest
from hypervisor.netguard import Limits
from hypervisor.pb import server as pbserver
from hypervisor.pb.server import MAX_MESSAGE, MAX_STREAMS, make_pb_factory
from hypervisor.tlsreload import ReloadableTLS
from tests import test_rpc_access as matrix
from tests.support import until


class PbTests(TestCase):
    """
    One PB listener over the access-matrix fixture, per test.
    """

    timeout = 120

    setUp = matrix.AccessMatrixTests.setUp
    make_pki = matrix.AccessMatrixTests.make_pki
    _start_https = matrix.AccessMatrixTests.start
    ensure_vm = matrix.AccessMatrixTests.ensure_vm
    connect_hook = matrix.AccessMatrixTests.connect_hook

    async def start_pb(self, limits: Limits = pbserver.LIMITS) -> None:
        await self._start_https()
        tls = ReloadableTLS("", "", "", "", self.trust, self.tls_options)
        self.pb = make_pb_factory(self.dispatcher, tls, reactor, limits=limits)
        self.pb_port = reactor.listenTCP(0, self.pb.factory, interface="127.0.0.1")
        self.addCleanup(self.pb_port.stopListening)

    def user(self, name: str) -> tuple[str, str]:
        return os.path.join(self.root, f"{name}.cert"), os.path.join(self.root, f"{name}.key")

    async def client(self, name: str = "fleet") -> HypervisorClient:
        cert, key = self.user(name)
        c = await connect(
            reactor,
            f"tcp:127.0.0.1:{self.pb_port.getHost().port}",
            cert,
            key,
            ca_file=os.path.join(self.root, "CA.pem"),
            hostname="localhost",
        )
        return c

    def publish(self, n: int) -> "Deferred[None]":
        """
        C{n} changes to the address pool, each an update to every subscriber.
        """
        return ensureDeferred(self._publish(n))

    async def _publish(self, n: int) -> None:
        for i in range(n):
            await self.api.ChangeAddressPool(
                ROOT,
                ChangeAddressPoolRequest(
                    AddressesToAdd=[Address(f"10.8.0.{i + 100}", f"52:54:0a:08:00:{i + 100:02x}")]
                ),
            )

    # Streams -----------------------------------------------------------------------

    async def test_flow_control(self) -> None:
        """
        The next update is sent only once the observer answered the one before.
        """
        await self.start_pb()
        c = await self.client()
        answers: list[Deferred[bool]] = []
        got: list[bytes] = []

        def one(data: bytes) -> Any:
            got.append(data)
            d: Deferred[bool] = Deferred()
            answers.append(d)
            return d

        done = ensureDeferred(c.stream("GetUpdates", b"", one))
        await until(lambda: got, 10, "the first update")
        await self.publish(5)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(len(got), 1, "nothing more before the first answer")
        self.assertIn(b'"HaveVMs":true', got[0])
        for expected in range(2, 7):
            answers[-1].callback(True)
            await until(lambda: len(got) == expected, 10, f"update {expected}")
            await deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(len(got), expected)
        answers[-1].callback(False)  # the observer ends the stream
        self.assertEqual(await done, b"")
        await until(lambda: not self.manager.ctx.hub.streams, 10, "the stream closed")
        await c.close()

    async def test_disconnecting_observer_is_released(self) -> None:
        """
        A client that disconnects while subscribed: its stream is closed, its
        session forgotten, and the server holds no reference to its observer.
        """
        await self.start_pb()
        c = await self.client()
        got: list[bytes] = []
        ensureDeferred(c.stream("GetUpdates", b"", got.append)).addErrback(lambda f: None)
        await until(lambda: got, 10, "the first update")
        self.assertEqual(len(self.manager.ctx.hub.streams), 1)
        [session] = self.pb.sessions.open.values()
        self.assertEqual([s.method for s in session.streams.values()], ["GetUpdates"])
        await c.close()
        await until(lambda: not self.pb.sessions.open, 10, "the session gone")
        await until(lambda: not self.manager.ctx.hub.streams, 10, "the stream closed")
        self.assertEqual(session.streams, {})
        self.assertIsNone(session.broker)
        gc.collect()
        brokers = [o for o in gc.get_objects() if isinstance(o, pbserver.PbBroker)]
        self.assertEqual([b for b in brokers if not b.disconnected], [])

    async def test_cycles_leave_no_growth(self) -> None:
        """
        100 connect/subscribe/disconnect cycles: no session, stream, broker, root or
        remote reference left behind (counted after the first 10, to let caches
        settle), and the hub has no subscriber.
        """
        await self.start_pb()

        async def cycle() -> None:
            c = await self.client()
            got: list[bytes] = []
            ensureDeferred(c.stream("GetUpdates", b"", got.append)).addErrback(lambda f: None)
            await until(lambda: got, 10, "the first update")
            await c.close()

        def count() -> dict[str, int]:
            # trial keeps every warning a test emits (pyOpenSSL's deprecations, two per
            # TLS connection here): the harness's memory, not the daemon's
            self.flushWarnings()
            gc.collect()
            kinds = (pbserver.PbBroker, pbserver.SessionRoot, pbserver.Session)
            counts = {k.__name__: 0 for k in kinds}
            for o in gc.get_objects():
                for k in kinds:
                    if isinstance(o, k):
                        counts[k.__name__] += 1
            counts["objects"] = len(gc.get_objects())
            return counts

        for _ in range(10):
            await cycle()
        await until(lambda: not self.pb.sessions.open, 10, "sessions gone")
        before = count()
        for _ in range(100):
            await cycle()
        await until(lambda: not self.pb.sessions.open, 10, "sessions gone")
        await until(lambda: not self.manager.ctx.hub.streams, 10, "streams closed")
        after = count()
        for kind in ("PbBroker", "SessionRoot", "Session"):
            self.assertLessEqual(after[kind], before[kind] + 1, (kind, before, after))
        # Objects in all: a leak of even one small object per cycle would show as
        # several hundred; allow noise from unrelated caches.
        self.assertLess(after["objects"] - before["objects"], 300, (before, after))

    # Uploads ------------------------------------------------------------------------

    async def test_upload_user_data(self) -> None:
        """
        ReplaceVmUserData through the sink (several writes, flow-controlled), then
        GetVmUserData returns the same bytes; an upload that ends early is refused
        and changes nothing.
        """
        await self.start_pb()
        await self.ensure_vm()
        c = await self.client("alice")
        data = os.urandom(700 * 1024) + b"end"
        request = {"IpAddress": matrix.VM_IP, "Size": len(data)}
        reply = await c.upload("ReplaceVmUserData", request, [data[:1000], data[1000:]])
        self.assertEqual(json.loads(reply).get("Error", ""), "")
        raw_reply, raw = await c.call_json("GetVmUserData", {"IpAddress": matrix.VM_IP})
        self.assertEqual(json.loads(raw_reply)["Length"], len(data))
        self.assertEqual(raw, data)

        short = {"IpAddress": matrix.VM_IP, "Size": len(data) + 10}
        with self.assertRaises(CallFailed) as caught:
            await c.upload("ReplaceVmUserData", short, [b"x" * 100])
        self.assertIn("ended after 100 of", caught.exception.message)
        _, raw = await c.call_json("GetVmUserData", {"IpAddress": matrix.VM_IP})
        self.assertEqual(raw, data)
        with self.assertRaises(CallFailed) as caught:
            await c.call("ReplaceVmUserData", short)
        self.assertIn("use upload()", caught.exception.message)
        await c.close()

    # Bounds -------------------------------------------------------------------------

    async def test_request_over_method_limit(self) -> None:
        """
        A request JSON over its method's limit is refused with 413 and the
        connection stays usable; a PB message over the connection's limit closes it.
        """
        await self.start_pb()
        c = await self.client()
        big = b'{"Filter":{"OwnerUsers":["' + b"x" * (1 << 20) + b'"]}}'
        with self.assertRaises(CallFailed) as caught:
            await c.call_json("ListVMs", big)
        self.assertEqual(caught.exception.status, 413)
        self.assertIsInstance(await c.call("ListVMs", {}), dict)
        huge = b"x" * (MAX_MESSAGE + 1024)
        with self.assertRaises(CallFailed) as caught:
            await c.call_json("ListVMs", huge)
        self.assertEqual(caught.exception.status, 0)  # the connection was closed
        self.assertIn("lost", caught.exception.message)
        await until(lambda: not self.pb.sessions.open, 10, "the session gone")

    def _raw_tls(self, cert: bool) -> tuple[int, float]:
        """
        (Thread) A raw TLS socket sending an endless Banana list of strings; how many
        bytes it sent before the server closed the connection, and how long it took.
        """
        import time

        ctx = ssl.create_default_context(cafile=os.path.join(self.root, "CA.pem"))
        if cert:
            ctx.load_cert_chain(*self.user("fleet"))
        sock = socket.create_connection(("127.0.0.1", self.pb_port.getHost().port), 10)
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        tls.settimeout(20)
        start = time.monotonic()
        sent = 0
        try:
            # Banana: a list header claiming 600000 items, then 1 KiB strings.
            header = bytes([0x40, 0x4F, 0x24, 0x80])  # b128 600000, LIST
            tls.sendall(header)
            item = bytes([0x00, 0x08, 0x82]) + b"y" * 1024  # b128 1024, STRING
            while sent < 64 * 1024 * 1024:
                tls.sendall(item * 16)
                sent += len(item) * 16
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()
        return sent, time.monotonic() - start

    async def test_endless_message_closes(self) -> None:
        """
        A raw TLS client streaming one endless Banana expression is cut off near
        the limit: MAX_MESSAGE with a certificate, a few KiB without one.
        """
        await self.start_pb()
        sent, _ = await deferToThread(self._raw_tls, True)
        self.assertLess(sent, MAX_MESSAGE + 8 * 1024 * 1024)  # the socket buffers some
        sent, _ = await deferToThread(self._raw_tls, False)
        self.assertLess(sent, 8 * 1024 * 1024)
        await until(lambda: not self.pb.sessions.open, 10, "sessions gone")

    async def test_stream_limit(self) -> None:
        """
        More than MAX_STREAMS streams on one connection: the next is refused (503)
        and nothing is subscribed for it.
        """
        await self.start_pb()
        c = await self.client()
        got: list[bytes] = []
        for _ in range(MAX_STREAMS):
            ensureDeferred(c.stream("GetUpdates", b"", got.append)).addErrback(lambda f: None)
        await until(lambda: len(got) == MAX_STREAMS, 10, "the first updates")
        with self.assertRaises(CallFailed) as caught:
            await c.stream("GetUpdates", b"", got.append)
        self.assertEqual(caught.exception.status, 503)
        self.assertIn("too many streams", caught.exception.message)
        self.assertEqual(len(self.manager.ctx.hub.streams), MAX_STREAMS)
        await c.close()
        await until(lambda: not self.manager.ctx.hub.streams, 10, "streams closed")

    async def test_connection_cap(self) -> None:
        """
        With the guard's connection cap at 3 and three busy sessions (streams), a
        fourth connection is refused; after one ends, a new one is served.
        """
        limits = Limits(max_connections=3, max_idle_per_source=3, max_idle_total=3)
        await self.start_pb(limits)
        clients = []
        for _ in range(3):
            c = await self.client()
            got: list[bytes] = []
            ensureDeferred(c.stream("GetUpdates", b"", got.append)).addErrback(lambda f: None)
            await until(lambda: got, 10, "the first update")
            clients.append(c)
        with self.assertRaises(CallFailed):
            await self.client()
        await clients.pop().close()
        await until(lambda: len(self.pb.sessions.open) == 2, 10, "a session gone")
        c = await self.client()
        self.assertEqual((await c.whoami())["Username"], "fleet")
        for c in clients + [c]:
            await c.close()

    async def test_refused_certificates(self) -> None:
        """
        No certificate, or one from a foreign CA: connect fails with 401 and the
        reason; the IdentityCA certificate claiming *.* is served without its grants.
        """
        await self.start_pb()
        port = self.pb_port.getHost().port
        ca = os.path.join(self.root, "CA.pem")
        with self.assertRaises(CallFailed) as caught:
            await connect(
                reactor, f"tcp:127.0.0.1:{port}", None, None, ca_file=ca, hostname="localhost"
            )
        self.assertEqual(caught.exception.status, 401)
        self.assertIn("needs a client certificate", caught.exception.message)
        cert, key = self.user("mallory")
        with self.assertRaises(CallFailed) as caught:
            await connect(
                reactor, f"tcp:127.0.0.1:{port}", cert, key, ca_file=ca, hostname="localhost"
            )
        self.assertEqual(caught.exception.status, 401)
        self.assertIn("does not verify", caught.exception.message)
        c = await self.client("idonly")
        who = await c.whoami()
        self.assertEqual((who["Username"], who["PermittedMethods"]), ("idonly", []))
        with self.assertRaises(CallFailed) as caught:
            await c.call("ChangeOwners", {"OwnerUsers": ["idonly"]})
        self.assertEqual(caught.exception.status, 403)
        await c.close()

    async def test_calls_in_flight_limit(self) -> None:
        """
        MAX_CALLS calls waiting for their answers on one connection: the next is
        refused (503) at once; when they are answered the connection serves again.
        (The service layer's ListSubnets is held back by a stand-in for this test.)
        """
        await self.start_pb()
        held: list[Deferred[Any]] = []
        real = self.api.ListSubnets

        def slow(identity: Any, request: Any) -> "Deferred[Any]":
            d: Deferred[Any] = Deferred()
            d.addCallback(lambda _: real(identity, request))
            held.append(d)
            return d

        self.api.ListSubnets = slow  # type: ignore[method-assign]
        self.addCleanup(setattr, self.api, "ListSubnets", real)
        c = await self.client()
        waiting = [ensureDeferred(c.call("ListSubnets", {})) for _ in range(pbserver.MAX_CALLS)]
        await until(lambda: len(held) == pbserver.MAX_CALLS, 10, "calls held")
        with self.assertRaises(CallFailed) as caught:
            await c.call("GetCapacity", {})
        self.assertEqual(caught.exception.status, 503)
        self.assertIn("too many calls at once", caught.exception.message)
        for d in held:
            d.callback(None)
        for reply in waiting:
            self.assertEqual((await reply)["Subnets"][0]["Id"], "net")
        self.assertIn("NumCPUs", await c.call("GetCapacity", {}))
        await c.close()

    async def test_sinks_held_limit(self) -> None:
        """
        A client keeping references to MAX_SINKS finished upload sinks gets no more
        (503); dropping them lets it upload again.
        """
        await self.start_pb()
        await self.ensure_vm()
        c = await self.client("alice")
        request = json.dumps({"IpAddress": matrix.VM_IP, "Size": 1}).encode()
        sinks = []
        for _ in range(pbserver.MAX_SINKS):
            sink = await c.root.callRemote("upload", "ReplaceVmUserData", [request], None)
            await sink.callRemote("write", b"u")
            await sink.callRemote("finish")
            sinks.append(sink)
        with self.assertRaises(Exception) as caught:
            await c.root.callRemote("upload", "ReplaceVmUserData", [request], None)
        self.assertIn("upload sinks", str(caught.exception))
        del sinks, sink
        gc.collect()  # the client's references go: PB tells the server
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(
            json.loads(await c.upload("ReplaceVmUserData", request, [b"v"])).get("Error", ""), ""
        )
        await c.close()

    def _send_raw(self, payload: bytes, cert: bool = True) -> bytes:
        """
        (Thread) TLS with a certificate, C{payload}, then read until the server
        closes; what the server sent.
        """
        ctx = ssl.create_default_context(cafile=os.path.join(self.root, "CA.pem"))
        if cert:
            ctx.load_cert_chain(*self.user("fleet"))
        sock = socket.create_connection(("127.0.0.1", self.pb_port.getHost().port), 10)
        tls = ctx.wrap_socket(sock, server_hostname="localhost")
        tls.settimeout(30)
        received = b""
        try:
            tls.sendall(payload)
            while True:
                data = tls.recv(65536)
                if not data:
                    break
                received += data
        except (OSError, ssl.SSLError):
            pass
        finally:
            tls.close()
        return received

    async def test_malformed_banana_closes(self) -> None:
        """
        Bytes that are not Banana (an invalid type byte) close the connection
        promptly, with a log line and no unhandled error.
        """
        await self.start_pb()
        await deferToThread(self._send_raw, b"\x01\xff" * 10)
        await until(lambda: not self.pb.sessions.open, 10, "the session gone")
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_refused_session_deadline(self) -> None:
        """
        A connection without a certificate that asks nothing is closed at the
        guard's deadline (here 1 s), its session forgotten.
        """
        await self.start_pb(Limits(first_byte=1.0, handshake=1.0, headers=1.0))
        await deferToThread(self._send_raw, b"", False)
        await until(lambda: not self.pb.sessions.open, 10, "the session gone")

    async def test_other_listener_is_not_local(self) -> None:
        """
        A session of a listener named other than "pb" (the onion service's) is not a
        local caller even though its peer (the local tor) is on loopback; the "pb"
        listener's loopback peers are.
        """
        await self.start_pb()
        onion = make_pb_factory(
            self.dispatcher, self.pb.tls, reactor, sessions=self.pb.sessions, transport="pb-onion"
        )
        port = reactor.listenTCP(0, onion.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        c = await self.client()
        cert, key = self.user("fleet")
        o = await connect(
            reactor,
            f"tcp:127.0.0.1:{port.getHost().port}",
            cert,
            key,
            ca_file=os.path.join(self.root, "CA.pem"),
            hostname="localhost",
        )
        by_transport = {s.transport: s for s in self.pb.sessions.open.values()}
        self.assertEqual(sorted(by_transport), ["pb", "pb-onion"])
        self.assertTrue(getattr(by_transport["pb"].identity, "loopback", True))
        self.assertFalse(getattr(by_transport["pb-onion"].identity, "loopback", False))
        await c.close()
        await o.close()

    async def test_subscription_stop(self) -> None:
        """
        Subscription.stop ends a GetUpdates stream at once, without waiting for
        another update: the hub has no subscriber and done fires with b"".
        """
        await self.start_pb()
        c = await self.client()
        got: list[dict[str, Any]] = []
        subscription = c.subscribe_updates(got.append)
        await until(lambda: got, 10, "the first update")
        self.assertEqual(len(self.manager.ctx.hub.streams), 1)
        self.assertEqual(await subscription.stop(), b"")
        self.assertEqual(self.manager.ctx.hub.streams, [])
        [session] = self.pb.sessions.open.values()
        self.assertEqual((session.streams, session.by_observer), ({}, {}))
        await c.close()

    async def test_refused_client_is_closed_after_the_answer(self) -> None:
        """
        A client whose certificate is refused gets one answer (401, the reason),
        then the connection closes: it cannot keep calling.
        """
        await self.start_pb()
        from twisted.spread import pb

        factory = pb.PBClientFactory()
        cert, key = self.user("mallory")
        from twisted.internet import endpoints

        from hypervisor.cli.client import CertPair, ClientTLSPolicy

        creator = ClientTLSPolicy(
            CertPair(cert, key, [], 0.0), os.path.join(self.root, "CA.pem")
        ).creatorForNetloc(b"localhost", 0)
        endpoint = endpoints.wrapClientTLS(
            creator,
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.pb_port.getHost().port),
        )
        broker = await endpoint.connect(factory)
        root = await factory.getRootObject()
        with self.assertRaises(Exception) as caught:
            await root.callRemote("whoami")
        self.assertIn("401 client certificate 'mallory' does not verify", str(caught.exception))
        # At once, not at the guard's deadline (10 s).
        await until(lambda: broker.disconnected, 3, "the connection closed by the server")
        await until(lambda: not self.pb.sessions.open, 10, "the session gone")
