"""
The SRPC server in memory (string transports) over the real service layer on
libvirt's test driver: the first-line router, CONNECT inside TLS, method powers
switched off by the query, pings, bytes sent ahead of time, uploads split anywhere,
and the GET side routes.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from hypervisor.api import ACCESS, METHODS, PUBLIC
from hypervisor.auth import Identity
from hypervisor.srpc import codec as wire
from hypervisor.srpc.protocol import MAX_AHEAD, SrpcFactory, SrpcServer
from tests.srpc_support import Backend, output_until
from web.srpc_routes import SrpcRoutes

ADMIN = Identity(username="fleet", method_patterns=("Hypervisor.*",), full_authority=True)
USER = Identity(username="testuser", groups=frozenset({"team-a"}), full_authority=True)


class Recorder(Protocol):
    """
    The HTTP side in router tests: keeps what it gets.
    """

    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class RouterTests(SynchronousTestCase):
    """
    L{ConnectRouter}: CONNECT to SRPC, anything else to HTTP, on as few bytes as
    needed.
    """

    def route(self, chunks: list[bytes]) -> tuple[Any, Any]:
        recorder = Recorder()
        http = Factory.forProtocol(lambda: recorder)
        built: list[Any] = []

        class FakeSrpc:
            def buildProtocol(self, addr: Any, in_tls: bool = False) -> Protocol:
                p = Recorder()
                p.in_tls = in_tls  # type: ignore[attr-defined]
                built.append(p)
                return p

        from hypervisor.srpc.protocol import ConnectRouterFactory

        factory = ConnectRouterFactory(http, FakeSrpc(), in_tls=True)  # type: ignore[arg-type]
        router = factory.buildProtocol(None)
        transport = StringTransport()
        router.makeConnection(transport)
        for chunk in chunks:
            (
                transport.protocol.dataReceived(chunk)
                if hasattr(transport, "protocol")
                else router.dataReceived(chunk)
            )
        return (built[0] if built else None), recorder

    def test_connect_byte_by_byte(self) -> None:
        """
        C{CONNECT } one byte at a time still reaches SRPC, whole, inside TLS.
        """
        line = b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\n\n"
        srpc, http = self.route([bytes([b]) for b in line])
        self.assertIsNotNone(srpc)
        self.assertEqual(srpc.data, line)
        self.assertTrue(srpc.in_tls)
        self.assertEqual(http.data, b"")

    def test_http(self) -> None:
        """
        Other first bytes (even a prefix of CONNECT gone wrong) go to HTTP, whole.
        """
        for data in (b"GET / HTTP/1.1\r\n\r\n", b"CONNEXT / HTTP/1.0\n\n", b"C\r\n"):
            srpc, http = self.route([data[:2], data[2:]])
            self.assertIsNone(srpc)
            self.assertEqual(http.data, data)


class ServerTests(TestCase):
    """
    L{SrpcServer} over the real service layer.
    """

    timeout = 120

    async def backend(self, **kw: Any) -> Backend:
        b = Backend(self, **kw)
        await b.start()
        await b.ensure_vm()
        return b

    async def test_connect_inside_tls(self) -> None:
        """
        Go's fallback: a CONNECT already inside TLS is answered 200 and the calls
        follow on the same TLS (no second handshake); the unsecured endpoint inside
        TLS is the same.
        """
        b = await self.backend()
        for path in (wire.SRPC_TLS_JSON, wire.SRPC_UNSECURED_JSON):
            proto = SrpcServer(b.factory, None, in_tls=True)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.identity = USER
            proto.dataReceived(wire.connect_line(path) + b"Hypervisor.ListVMs\n{}\n")
            out = await output_until(transport, lambda o: o.count(b"\n") >= 5)
            self.assertEqual(out[: len(wire.CONNECTED)], wire.CONNECTED)
            self.assertEqual(out[len(wire.CONNECTED) :], b'\n\n{"IpAddresses":["10.77.0.10"]}\n')
            self.assertFalse(hasattr(transport, "protocol"))
            proto.connectionLost(connectionDone)

    async def test_do_not_use_method_powers(self) -> None:
        """
        C{?doNotUseMethodPowers=true}: a caller granted C{Hypervisor.*} is refused
        admin methods and is no VM owner through its grant.
        """
        b = await self.backend()
        proto = SrpcServer(b.factory, None, in_tls=True)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.identity = ADMIN
        proto.dataReceived(wire.connect_line(wire.SRPC_TLS_JSON, True))
        proto.dataReceived(b"Hypervisor.SetDisabledState\n")
        self.assertTrue(transport.value().endswith(b"access to method denied\n"))
        mark = len(transport.value())
        proto.dataReceived(b'Hypervisor.StopVm\n{"IpAddress":"10.77.0.10"}\n')
        out = await output_until(transport, lambda o: o[mark:].count(b"\n") >= 3)
        self.assertEqual(out[mark:], b'\n\n{"Error":"no access to VM 10.77.0.10"}\n')
        # The same caller without the query has the power.
        proto, transport = b.server(ADMIN)
        proto.dataReceived(b"Hypervisor.SetDisabledState\n")
        self.assertEqual(transport.value(), b"\n")

    async def test_ping_and_pipelining(self) -> None:
        """
        Empty lines are pings; calls sent back to back in one write are answered in
        order; more than MAX_AHEAD bytes sent during a call close the connection.
        """
        b = await self.backend()
        proto, transport = b.server(USER)
        proto.dataReceived(
            b"\n\nHypervisor.ListVMs\n{}\nHypervisor.GetVmInfo\n" b'{"IpAddress":"10.77.0.9"}\n'
        )
        out = await output_until(transport, lambda o: o.count(b"\n") >= 8)
        self.assertEqual(
            out,
            b'\n\n\n\n{"IpAddresses":["10.77.0.10"]}\n\n\n{"Error":"no VM with IP 10.77.0.9"}\n',
        )
        proto, transport = b.server(USER)
        proto.stage = "busy"  # as while a call runs
        proto.dataReceived(b"x" * (MAX_AHEAD + 1))
        self.assertTrue(transport.disconnecting)

    async def test_upload_split_anywhere(self) -> None:
        """
        A CreateVm whose request, image, user data and the next method line arrive
        split at odd places: the VM is created with the bytes, then the next call is
        answered.
        """
        b = await self.backend()
        proto, transport = b.server(USER)
        image = bytes(range(256)) * 4096  # 1 MiB
        user_data = b"#cloud-config\n"
        request = (
            b'{"MemoryInMiB":16,"MilliCPUs":10,"SubnetId":"t","DoNotStart":true,'
            b'"ImageDataSize":%d,"UserDataSize":%d}\n' % (len(image), len(user_data))
        )
        stream = b"Hypervisor.CreateVm\n" + request + image + user_data
        stream += b'Hypervisor.ListVMs\n{"Sort":true}\n'
        for i in range(0, len(stream), 7777):
            proto.dataReceived(stream[i : i + 7777])

        def listed(out: bytes) -> bool:
            return b'"IpAddresses"' in out

        out = await output_until(transport, listed, 60)
        lines = out.split(b"\n")
        self.assertEqual(lines[0], b"")  # CreateVm accepted
        self.assertIn(b'"Final":true', out)
        self.assertIn(b'"IpAddress":"10.77.0.11"', out)
        self.assertTrue(out.endswith(b'\n\n{"IpAddresses":["10.77.0.10","10.77.0.11"]}\n'), out)
        vm = b.manager.vms["10.77.0.11"]
        self.assertEqual(vm.info.OwnerUsers[:1], ["testuser"])


class ManagedLeasesTests(TestCase):
    """
    External leases sent on a GetUpdates stream (fleet-manager's keepalive) are
    registered with RegisterExternalLeases' access rule and end with the stream.
    """

    timeout = 120

    async def test_leases_end_with_the_stream(self) -> None:
        b = Backend(self)
        await b.start(dhcp=True)
        assert b.dhcp is not None
        policy = b.dhcp.policy
        proto, transport = b.server(ADMIN)
        proto.dataReceived(b"Hypervisor.GetUpdates\n")
        await output_until(transport, lambda o: o.count(b"\n") >= 2)
        mark = len(transport.value())
        proto.dataReceived(
            b'{"RegisterExternalLeasesRequest":{"Addresses":[{"IpAddress":"10.77.0.99",'
            b'"MacAddress":"52:54:0a:4d:00:63"}],"Hostnames":["printer"]}}\n'
        )
        out = await output_until(transport, lambda o: o[mark:].count(b"\n") >= 1)
        self.assertEqual(out[mark:], b'{"HealthStatus":"healthy"}\n')
        await output_until(transport, lambda o: bool(policy.external), 5)
        self.assertIn("10.77.0.99", str(policy.external))
        proto.connectionLost(connectionDone)
        await output_until(transport, lambda o: not policy.external, 5)
        self.assertFalse(policy.external)
        # A caller without the power: the keepalive is answered, nothing registered.
        proto, transport = b.server(USER)
        proto.dataReceived(b"Hypervisor.GetUpdates\n")
        await output_until(transport, lambda o: o.count(b"\n") >= 2)
        proto.dataReceived(
            b'{"RegisterExternalLeasesRequest":{"Addresses":[{"IpAddress":"10.77.0.98",'
            b'"MacAddress":"52:54:0a:4d:00:62"}]}}\n'
        )
        out = await output_until(transport, lambda o: o.endswith(b'{"HealthStatus":"healthy"}\n'))
        self.assertTrue(out.endswith(b'{"HealthStatus":"healthy"}\n'))
        self.assertFalse(policy.external)
        proto.connectionLost(connectionDone)


class SlowReaderTests(TestCase):
    """
    A GetUpdates client that stops reading (the transport paused the stream):
    its keepalives are not answered meanwhile (each answer would grow the send
    buffer), they are answered once it reads again, and a flood is cut.
    """

    timeout = 60

    async def test_keepalives_wait_while_paused(self) -> None:
        b = Backend(self)
        await b.start()
        proto, transport = b.server(USER)
        proto.dataReceived(b"Hypervisor.GetUpdates\n")
        await output_until(transport, lambda o: o.count(b"\n") >= 2)
        self.assertIs(transport.producer, proto)
        proto.pauseProducing()  # as the transport does when its buffer is full
        mark = len(transport.value())
        keepalive = b'{"RegisterExternalLeasesRequest":null}\n'
        proto.dataReceived(keepalive * 3)
        await output_until(transport, lambda o: False, 0.2)
        self.assertEqual(transport.value()[mark:], b"")
        proto.resumeProducing()
        self.assertEqual(transport.value()[mark:], b'{"HealthStatus":"healthy"}\n' * 3)
        proto.pauseProducing()
        for _ in range(40):
            proto.dataReceived(keepalive * 1000)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"bytes sent while not reading", transport.value())


class EndpointTests(TestCase):
    """
    The unsecured endpoint with C{-allowUnauthenticatedReads} (plaintext: only the
    unauthenticated reads), and the TLS endpoint when the daemon has no certificate
    (404, so Go clients move on).
    """

    timeout = 60

    async def test_unsecured_reads(self) -> None:
        b = Backend(self, unauthenticated_reads=True)
        await b.start()
        proto, transport = b.server(connect=True)
        proto.dataReceived(wire.connect_line(wire.SRPC_UNSECURED_JSON))
        self.assertEqual(transport.value(), wire.CONNECTED)
        mark = len(transport.value())
        proto.dataReceived(b"Hypervisor.ListVMs\n{}\n")
        out = await output_until(transport, lambda o: o[mark:].count(b"\n") >= 3)
        self.assertEqual(out[mark:], b'\n\n{"IpAddresses":[]}\n')
        for method in (b"SetDisabledState", b"CreateVm", b"GetUpdates", b"GetVmUserData"):
            mark = len(transport.value())
            proto.dataReceived(b"Hypervisor." + method + b"\n")
            self.assertEqual(transport.value()[mark:], b"access to method denied\n", method)
        self.assertFalse(b.manager.disabled)

    async def test_no_tls(self) -> None:
        b = Backend(self)
        await b.start()
        factory = SrpcFactory(b.dispatcher, b.trust, None, b.factory.reactor)
        for path, want in (
            (wire.SRPC_TLS_JSON, wire.NOT_FOUND),
            (wire.SRPC_UNSECURED_JSON, wire.METHOD_NOT_ALLOWED),
        ):
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(wire.connect_line(path))
            self.assertEqual(transport.value(), want)
            self.assertTrue(transport.disconnecting)


class PipelineTests(TestCase):
    """
    A client that sends calls back to back without reading the replies: once the
    transport pauses the connection, no further call is taken (each reply would
    grow the send buffer) until it resumes; more than MAX_AHEAD bytes waiting close
    the connection.
    """

    timeout = 60

    async def test_calls_wait_while_paused(self) -> None:
        b = Backend(self)
        await b.start()
        proto, transport = b.server(USER)
        self.assertIs(transport.producer, proto)
        proto.pauseProducing()
        proto.dataReceived(b"Hypervisor.ListVMs\n{}\n" * 3)
        await output_until(transport, lambda o: False, 0.2)
        self.assertEqual(transport.value(), b"")
        proto.resumeProducing()
        out = await output_until(transport, lambda o: o.count(b"IpAddresses") == 3)
        self.assertEqual(out, b'\n\n{"IpAddresses":[]}\n' * 3)
        proto.pauseProducing()
        proto.dataReceived(b"Hypervisor.ListVMs\n{}\n" * 4000)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)  # unregistered, so TLS can close


class FailedUploadTests(TestCase):
    """
    A CreateVm the service refuses after the upload began: SRPC reads (and drops)
    the rest, as Go's client writes everything before it reads, then answers the
    error; the connection takes the next call.
    """

    timeout = 120

    async def test_drained_then_error(self) -> None:
        b = Backend(self)
        await b.start()
        proto, transport = b.server(USER)
        size = 3 * 1024 * 1024
        request = (
            b'{"MemoryInMiB":999999999,"MilliCPUs":10,"SubnetId":"t","ImageDataSize":%d}\n' % size
        )
        proto.dataReceived(b"Hypervisor.CreateVm\n" + request + b"\x01" * 1000)
        await output_until(transport, lambda o: False, 0.5)
        self.assertEqual(transport.value(), b"\n")  # nothing before the upload is in
        left = size - 1000
        while left:
            n = min(65536, left)
            proto.dataReceived(b"\x01" * n)
            left -= n
        proto.dataReceived(b"Hypervisor.ListVMs\n{}\n")
        out = await output_until(transport, lambda o: b"IpAddresses" in o, 20)
        lines = out.split(b"\n")
        self.assertEqual(lines[0], b"")
        error = json.loads(lines[1])
        self.assertIn("memory", error["Error"].lower())
        self.assertNotIn("Final", error)
        self.assertEqual(lines[2:], [b"", b"", b'{"IpAddresses":[]}', b""])
        self.assertEqual(b.manager.vms, {})


class RoutesTests(SynchronousTestCase):
    """
    C{GET /_goSRPC_/...}.
    """

    def render(self, path: bytes) -> tuple[int, bytes]:
        request = DummyRequest(path.split(b"/")[1:])
        request.path = path
        body = SrpcRoutes().render_GET(request)
        return request.responseCode or 200, body

    def test_list_methods(self) -> None:
        """
        Every method, one a line, sorted; the public ones; the hostname; 404 else.
        """
        code, body = self.render(b"/_goSRPC_/listMethods")
        self.assertEqual(code, 200)
        self.assertEqual(body.decode().split(), sorted(f"Hypervisor.{m}" for m in METHODS))
        code, body = self.render(b"/_goSRPC_/listPublicMethods")
        public = sorted(f"Hypervisor.{m}" for m, a in ACCESS.items() if a == PUBLIC)
        self.assertEqual(body.decode().split(), public)
        self.assertNotIn("Hypervisor.SetDisabledState", body.decode())
        code, body = self.render(b"/_goSRPC_/getHostname")
        self.assertEqual(code, 200)
        self.assertTrue(body.endswith(b"\n") and len(body) > 1)
        self.assertEqual(self.render(b"/_goSRPC_/other")[0], 404)
