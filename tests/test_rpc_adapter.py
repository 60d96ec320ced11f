"""
The HTTP adapter of the RPC (L{web.rpc.HypervisorRequest}, the site's request
factory) driven in memory: a L{twisted.web.server.Site} with the daemon's request
factory and channel, connected to a L{StringTransport}, fed raw request bytes.

Checked: refusals answered from the headers without reading the body, Content-Length
limits, CreateVm uploads decoded at the first line and streamed into the manager
while the body arrives (with flow control), wrong upload lengths, NDJSON progress
streams and errors after a stream started, GetUpdates streams (a client that does not
read is dropped, not buffered), the method listing and page bodies.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT, Identity, TrustStore
from hypervisor.dispatch import Dispatcher
from hypervisor.manager.updates import MAX_QUEUED
from hypervisor.metrics import Metrics
from hypervisor.model import SetDisabledStateRequest, State, Update
from hypervisor.testing import SynchronousRunner
from hypervisor.upload import UploadStream
from tests.test_dispatch import FakeApi
from tests.test_manager_clock import ALICE, BOB, ClockDaemon, ControlledDomains, fired
from web.channel import HypervisorChannel
from web.root import make_root
from web.rpc import CLOSE_GRACE, RpcEndpoints, request_factory

MiB = 1024 * 1024


class TLSTransport(StringTransport):
    """
    A transport that looks like TLS with a verified client certificate: the
    identity L{hypervisor.tls.peer_identity} caches is already there.
    """

    def __init__(self, identity: Identity) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
        self._hypervisor_identity = identity

    def getPeerCertificate(self) -> None:
        return None


class Page(Resource):
    """
    Status pages stand-in: the same page at every path.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"a page\n"


class Pages:
    """
    What L{make_root} wants of the status pages.
    """

    def resource(self) -> Resource:
        return Page()


class Response:
    """
    A parsed HTTP response (chunked bodies decoded, possibly still incomplete).
    """

    def __init__(self, raw: bytes) -> None:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower().decode()] = value.strip().decode()
        self.complete = True
        if self.headers.get("transfer-encoding") == "chunked":
            body = b""
            self.complete = False
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                if size == 0:
                    self.complete = True
                    break
                body += rest[:size]
                rest = rest[size + 2 :]
            self.body = body
        else:
            self.body = rest

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]


class AdapterTestCase(SynchronousTestCase):
    """
    A site like the daemon's over a dispatcher (the real service layer on a clock
    unless a test picks a fake one).
    """

    allow_unauthenticated_reads = False

    def setUp(self) -> None:
        self.daemon = ClockDaemon(self).start().network()
        self.clock = self.daemon.clock
        self.use(HypervisorApi(self.daemon.manager))

    def use(self, api: Any) -> None:
        self.api = api
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(
            api,
            self.metrics,
            self.clock,
            allow_unauthenticated_reads=self.allow_unauthenticated_reads,
        )
        self.site = Site(make_root(Pages(), RpcEndpoints()), reactor=self.clock)
        self.site.requestFactory = request_factory(self.dispatcher, TrustStore([], []))
        self.site.protocol = HypervisorChannel  # type: ignore[assignment]

    def connect(self, identity: Optional[Identity] = ALICE) -> tuple[Any, StringTransport]:
        """
        A channel over TLS with C{identity}'s certificate, or over plain HTTP.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.9", 40000))
        transport = (
            TLSTransport(identity)
            if identity is not None
            else StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 40000))
        )
        channel.makeConnection(transport)
        self.addCleanup(self.close, channel)
        return channel, transport

    def close(self, channel: Any) -> None:
        if channel.transport is not None and channel.connected:
            channel.connectionLost(Failure(ConnectionDone()))

    def headers(
        self,
        method: str,
        length: Optional[int],
        *extra: bytes,
        verb: bytes = b"POST",
        path: Optional[bytes] = None,
    ) -> bytes:
        lines = [
            verb + b" " + (path or b"/rpc/Hypervisor." + method.encode()) + b" HTTP/1.1",
            b"Host: hypervisor",
        ]
        if length is not None:
            lines.append(b"Content-Length: %d" % length)
        lines.extend(extra)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def call(
        self, method: str, body: bytes = b"{}", identity: Optional[Identity] = ALICE
    ) -> Response:
        """
        One whole request; the response so far.
        """
        channel, transport = self.connect(identity)
        channel.dataReceived(self.headers(method, len(body)) + body)
        self.daemon.settle()
        return Response(transport.value())

    def create_line(self, image: int = 0, user_data: int = 0, **fields: Any) -> bytes:
        request = {
            "MemoryInMiB": 64,
            "MilliCPUs": 500,  # VmInfo is embedded
            "ImageDataSize": image,
            "UserDataSize": user_data,
        }
        request.update(fields)
        return json.dumps(request).encode() + b"\n"


class RefusalTests(AdapterTestCase):
    """
    Calls refused from the headers: answered at once, body not read, connection
    closed.
    """

    def refused(
        self,
        method: str,
        identity: Optional[Identity],
        status: int,
        *extra: bytes,
        length: int = 1000,
    ) -> Response:
        channel, transport = self.connect(identity)
        channel.dataReceived(self.headers(method, length, *extra))
        response = Response(transport.value())
        self.assertEqual(response.status, status)
        self.assertIn("Error", response.json())
        self.assertEqual(response.headers["connection"], "close")
        self.assertEqual(response.headers["x-content-type-options"], "nosniff")
        self.assertTrue(transport.disconnecting)
        sent = transport.value()
        channel.dataReceived(b"x" * 500)  # the body, if the client sends it anyway
        self.assertEqual(transport.value(), sent)
        self.assertEqual(self.daemon.manager.vms, {})
        return response

    def test_plain_http_refused(self) -> None:
        """
        Plain HTTP may not call CreateVm: 401 before the body, nothing created.
        """
        response = self.refused("CreateVm", None, 401)
        self.assertIn("HTTPS", response.json()["Error"])

    def test_admin_method_denied(self) -> None:
        """
        An authenticated caller without the power gets 403 for an admin method.
        """
        self.refused("SetDisabledState", ALICE, 403)
        self.assertFalse(self.daemon.manager.disabled)

    def test_unknown_method(self) -> None:
        """
        An unknown method is 404.
        """
        self.refused("Nope", ALICE, 404)

    def test_disabled_create(self) -> None:
        """
        CreateVm while the hypervisor is disabled is 503 from the headers, even with
        a large upload announced.
        """
        fired(self.daemon.api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=True)))
        self.refused("CreateVm", ALICE, 503, length=512 * MiB)

    def test_no_100_continue_when_refused(self) -> None:
        """
        A client that waits for "100 Continue" before sending its body gets the
        refusal, not an invitation to send.
        """
        self.refused("CreateVm", None, 401, b"Expect: 100-continue")
        # (refused() checked the first line is the 401)

    def test_aborted_after_grace(self) -> None:
        """
        A refused connection that does not close is aborted after CLOSE_GRACE.
        """
        channel, transport = self.connect(None)
        aborted: list[bool] = []
        transport.abortConnection = lambda: aborted.append(True)  # type: ignore
        channel.dataReceived(self.headers("StopVm", 10))
        self.clock.advance(CLOSE_GRACE)
        self.assertEqual(aborted, [True])

    def test_length_over_limit(self) -> None:
        """
        A Content-Length over the method's limit (its JSON plus its largest upload)
        is 413 from the headers.
        """
        response = self.refused("GetVmInfo", ALICE, 413, length=2 * MiB)
        self.assertIn("limit", response.json()["Error"])
        self.refused("CreateVm", ALICE, 413, length=(1 << 40) + (1 << 20) + 1)

    def test_json_over_limit_while_arriving(self) -> None:
        """
        A body without Content-Length (chunked) whose JSON grows past the limit is
        413 as soon as it does.
        """
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("GetVmInfo", None, b"Transfer-Encoding: chunked"))
        chunk = b"x" * (600 * 1024)
        for _ in range(2):
            channel.dataReceived(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        response = Response(transport.value())
        self.assertEqual(response.status, 413)
        self.assertTrue(transport.disconnecting)

    def test_metrics_of_refusals(self) -> None:
        """
        Refusals are counted once, as denials and errors.
        """
        self.refused("SetDisabledState", ALICE, 403)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "hypervisor_rpc_denied_total", {"method": "SetDisabledState", "reason": "denied"}
            ),
            1,
        )
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "hypervisor_rpc_calls_total", {"method": "SetDisabledState", "outcome": "error"}
            ),
            1,
        )


class UnauthenticatedReadTests(AdapterTestCase):
    """
    -allowUnauthenticatedReads over plain HTTP.
    """

    allow_unauthenticated_reads = True

    def test_read_over_plain_http(self) -> None:
        """
        ListVMs answers over plain HTTP with the flag; StopVm is still refused.
        """
        ip = self.daemon.create()
        response = self.call("ListVMs", b"{}", identity=None)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json()["IpAddresses"], [ip])
        self.assertEqual(self.call("StopVm", b"{}", identity=None).status, 401)


class ReplyTests(AdapterTestCase):
    """
    Request/reply calls, errors, the listing and pages.
    """

    def test_request_reply(self) -> None:
        """
        A call is answered with its response JSON.
        """
        ip = self.daemon.create()
        response = self.call("GetVmInfo", json.dumps({"IpAddress": ip}).encode())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(response.json()["VmInfo"]["State"], "running")

    def test_errors(self) -> None:
        """
        Malformed requests are 400 naming the field, unknown VMs 404, someone
        else's VM 403, a wrong state 409; the body is C{{"Error": ...}}.
        """
        ip = self.daemon.create(DoNotStart=True)
        response = self.call("GetVmInfo", b'{"IpAddress": 7}')
        self.assertEqual(response.status, 400)
        self.assertIn("IpAddress", response.json()["Error"])
        self.assertEqual(self.call("GetVmInfo", b'{"IpAddress": "10.5.0.9"}').status, 404)
        self.assertEqual(
            self.call("StopVm", json.dumps({"IpAddress": ip}).encode(), identity=BOB).status, 403
        )
        self.assertEqual(self.call("RebootVm", json.dumps({"IpAddress": ip}).encode()).status, 409)

    def test_libvirt_down(self) -> None:
        """
        StartVm while libvirt is down is 503 with a sentence, and the VM is unchanged.
        """
        ip = self.daemon.create(DoNotStart=True)
        self.daemon.domains.lose_connection()
        response = self.call("StartVm", json.dumps({"IpAddress": ip}).encode())
        self.assertEqual(response.status, 503)
        self.assertIn("libvirt", response.json()["Error"])
        self.assertEqual(self.daemon.state(ip), State.STOPPED)

    def test_list_methods(self) -> None:
        """
        GET /rpc lists the methods with their access and reply kinds.
        """
        channel, transport = self.connect(None)
        channel.dataReceived(self.headers("", None, verb=b"GET", path=b"/rpc"))
        response = Response(transport.value())
        self.assertEqual(response.status, 200)
        methods = {m["Method"]: m for m in response.json()}
        self.assertEqual(methods["Hypervisor.CreateVm"]["Reply"], "progress-stream")
        self.assertTrue(methods["Hypervisor.CreateVm"]["Upload"])
        self.assertEqual(methods["Hypervisor.SetDisabledState"]["Access"], "admin")
        self.assertTrue(methods["Hypervisor.ListVMs"]["UnauthenticatedRead"])

    def test_page(self) -> None:
        """
        A page is served as usual.
        """
        channel, transport = self.connect(None)
        channel.dataReceived(self.headers("", None, verb=b"GET", path=b"/page"))
        response = Response(transport.value())
        self.assertEqual((response.status, response.body), (200, b"a page\n"))

    def test_page_body_refused(self) -> None:
        """
        A page request with a body is 413 from its Content-Length.
        """
        channel, transport = self.connect(None)
        channel.dataReceived(self.headers("", 5, verb=b"POST", path=b"/page"))
        response = Response(transport.value())
        self.assertEqual(response.status, 413)
        self.assertTrue(transport.disconnecting)

    def test_chunked_page_body_refused(self) -> None:
        """
        A page request with a chunked body is 413 once it is complete (nothing of it
        kept).
        """
        channel, transport = self.connect(None)
        channel.dataReceived(
            self.headers("", None, b"Transfer-Encoding: chunked", verb=b"POST", path=b"/page")
        )
        channel.dataReceived(b"5\r\nhello\r\n0\r\n\r\n")
        response = Response(transport.value())
        self.assertEqual(response.status, 413)


class CreateStreamTests(AdapterTestCase):
    """
    CreateVm: progress streams, uploads.
    """

    def test_progress_stream(self) -> None:
        """
        CreateVm answers newline-delimited JSON: progress messages, then a final line
        with the address.
        """
        response = self.call("CreateVm", self.create_line(MinimumFreeBytes=MiB))
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/x-ndjson")
        self.assertTrue(response.complete)
        lines = response.lines()
        self.assertGreater(len(lines), 1)
        self.assertTrue(all(line.get("ProgressMessage") for line in lines[:-1]))
        self.assertEqual(lines[-1]["Final"], True)
        self.assertEqual(lines[-1]["IpAddress"], "10.5.0.2")

    def test_error_before_stream(self) -> None:
        """
        A CreateVm refused before any progress is an ordinary error status.
        """
        response = self.call("CreateVm", self.create_line(MinimumFreeBytes=0))
        self.assertEqual(response.status, 400)
        self.assertIn("MinimumFreeBytes", response.json()["Error"])

    def test_error_after_stream_started(self) -> None:
        """
        A failure after progress was sent (libvirt refuses the domain once the body
        is in) is the stream's last line, C{{"Error": ...}}, and the VM is gone.
        """
        domains = ControlledDomains(self.clock)
        self.daemon = ClockDaemon(self, domains=domains, clock=self.clock).start().network()
        self.use(HypervisorApi(self.daemon.manager))
        domains.hold = True
        domains.fail_create = RuntimeError("qemu refused")
        channel, transport = self.connect(ALICE)
        body = self.create_line(MinimumFreeBytes=MiB)
        channel.dataReceived(self.headers("CreateVm", len(body)) + body)
        self.daemon.settle()
        response = Response(transport.value())
        self.assertEqual(response.status, 200)
        self.assertFalse(response.complete)
        self.assertTrue(response.lines()[0].get("ProgressMessage"))
        domains.finish_create()
        self.daemon.settle()
        response = Response(transport.value())
        lines = response.lines()
        self.assertEqual(list(lines[-1]), ["Error"])
        self.assertIn("qemu refused", lines[-1]["Error"])
        self.assertTrue(response.complete)
        self.assertEqual(self.daemon.manager.vms, {})

    def test_synchronous_error_before_the_reply(self) -> None:
        """
        A CreateVm that fails before the server answered anything (here at once,
        as the line arrives) is answered with the error status, nothing else.
        """
        self.daemon.domains.fail_create = RuntimeError("qemu refused")
        response = self.call("CreateVm", self.create_line(MinimumFreeBytes=MiB))
        self.assertEqual(response.status, 409)
        self.assertIn("qemu refused", response.json()["Error"])
        self.assertEqual(self.daemon.manager.vms, {})

    def test_upload_streams_into_the_volume(self) -> None:
        """
        The first line is decoded as soon as it arrives and the call starts; the image
        bytes are written into the root volume as they arrive, before the body is
        complete; the reply waits for the whole body; user data follows the image.
        """
        image = os.urandom(256 * 1024)
        user_data = b"#cloud-config\n"
        line = self.create_line(len(image), len(user_data))
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("CreateVm", len(line) + len(image) + len(user_data)))
        channel.dataReceived(line + image[:100])
        self.daemon.settle()
        vm = self.daemon.manager.vms.get("10.5.0.2")
        self.assertIsNotNone(vm)
        root = vm.local.VolumeLocations[0].Filename
        channel.dataReceived(image[100 : 128 * 1024])
        self.daemon.settle()
        with open(root, "rb") as f:
            self.assertEqual(f.read(128 * 1024), image[: 128 * 1024])
        self.assertEqual(transport.value(), b"")  # the reply waits for the body
        channel.dataReceived(image[128 * 1024 :] + user_data)
        self.daemon.settle()
        response = Response(transport.value())
        self.assertEqual(response.status, 200)
        lines = response.lines()
        self.assertEqual(lines[-1]["IpAddress"], "10.5.0.2", lines)
        self.assertTrue(any("uploaded image" in line.get("ProgressMessage", "") for line in lines))
        with open(root, "rb") as f:
            self.assertEqual(f.read(len(image)), image)
        with open(os.path.join(self.daemon.vm_dir("10.5.0.2"), "user-data.raw"), "rb") as f:
            self.assertEqual(f.read(), user_data)
        self.assertEqual(self.daemon.state("10.5.0.2"), State.RUNNING)

    def test_wrong_tail_length(self) -> None:
        """
        A body whose length after the first line differs from what the request
        announces is 400 as soon as the line arrives; nothing is created.
        """
        line = self.create_line(100)
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("CreateVm", len(line) + 50) + line)
        response = Response(transport.value())
        self.assertEqual(response.status, 400)
        self.assertIn("announces 100", response.json()["Error"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.daemon.manager.vms, {})

    def test_announced_data_missing(self) -> None:
        """
        A request announcing data with a body that ends after its line is 400.
        """
        line = self.create_line(100).rstrip(b"\n")
        response = self.call("CreateVm", line)
        self.assertEqual(response.status, 400)
        self.assertEqual(self.daemon.manager.vms, {})

    def test_client_gone_during_upload(self) -> None:
        """
        A connection lost halfway through the upload removes the half-made VM and
        frees its address.
        """
        image = os.urandom(64 * 1024)
        line = self.create_line(len(image))
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("CreateVm", len(line) + len(image)))
        channel.dataReceived(line + image[: 32 * 1024])
        self.daemon.settle()
        self.assertIn("10.5.0.2", self.daemon.manager.vms)
        channel.connectionLost(Failure(ConnectionDone()))
        self.daemon.settle()
        self.assertEqual(self.daemon.manager.vms, {})
        self.assertIn("10.5.0.2", self.daemon.free_ips())
        self.assertEqual(os.listdir(self.daemon.volumes), [])

    def test_upload_failure_answered_at_once(self) -> None:
        """
        If the creation fails while the image is still arriving (the volume's file
        system is full), the client is answered at once (507) and the connection
        closed instead of receiving the rest; nothing is left.
        """
        runner = FullDiskRunner()
        self.daemon = ClockDaemon(self, clock=self.clock, runner=runner).start().network()
        self.use(HypervisorApi(self.daemon.manager))
        line = self.create_line(64 * 1024)
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("CreateVm", len(line) + 64 * 1024))
        channel.dataReceived(line + b"\1" * 1024)
        self.daemon.settle()
        response = Response(transport.value())
        self.assertEqual(response.status, 507)
        self.assertIn("space", response.json()["Error"])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.daemon.manager.vms, {})
        self.assertIn("10.5.0.2", self.daemon.free_ips())


class FullDiskRunner(SynchronousRunner):
    """
    A synchronous runner on whose volume file system writes fail with ENOSPC.
    """

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(fn, "__name__", "") == "_write_all":

            def full(*args: Any) -> None:
                raise OSError(errno.ENOSPC, "No space left on device")

            return super().run(full)
        return super().run(fn, *args, **kwargs)


class SlowReaderApi(FakeApi):
    """
    A service layer whose CreateVm reads its upload only when the test says.
    """

    def CreateVm(
        self, identity: Identity, request: Any, send: Any, upload: Optional[UploadStream] = None
    ) -> "Deferred[Any]":
        self.upload = upload
        self.done: Deferred[Any] = Deferred()
        return self.done

    @inlineCallbacks
    def read_all(self) -> Any:
        got = 0
        while True:
            chunk = yield self.upload.read()
            if not chunk:
                return got
            got += len(chunk)


class FlowControlTests(AdapterTestCase):
    """
    The connection is paused while the upload's consumer is behind.
    """

    def test_paused_above_high_water(self) -> None:
        """
        Bytes arriving faster than the consumer reads pause the connection once more
        than the high-water mark waits; it is resumed when the consumer catches up.
        """
        from hypervisor.upload import HIGH_WATER

        api = SlowReaderApi()
        self.use(api)
        size = HIGH_WATER + 2 * MiB
        line = self.create_line(size)
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("CreateVm", len(line) + size) + line)
        block = b"\0" * MiB
        channel.dataReceived(block * 4)
        self.assertEqual(transport.producerState, "producing")
        for _ in range(5):
            channel.dataReceived(block)
        self.assertEqual(transport.producerState, "paused")
        got = api.read_all()
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(block)
        self.assertEqual(fired(got), size)


class UpdatesTests(AdapterTestCase):
    """
    GetUpdates over HTTP.
    """

    def publish(self, disabled: bool) -> None:
        """
        An update to every subscriber (as SetDisabledState sends, without its disk
        write).
        """
        self.daemon.manager.ctx.hub.publish(Update(HaveDisabled=True, Disabled=disabled))

    def test_stream(self) -> None:
        """
        The first line is the full update; each change is another line; the
        subscription ends when the connection does.
        """
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("GetUpdates", 2) + b"{}")
        response = Response(transport.value())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "application/x-ndjson")
        [first] = response.lines()
        self.assertTrue(first["HaveSubnets"])
        fired(self.daemon.api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=True)))
        lines = Response(transport.value()).lines()
        self.assertEqual(lines[-1], {"HaveDisabled": True, "Disabled": True})
        self.assertEqual(len(self.daemon.manager.ctx.hub.streams), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.daemon.manager.ctx.hub.streams, [])
        import gc

        gc.collect()  # an error left in a Deferred is logged when it is collected
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_not_reading_is_dropped(self) -> None:
        """
        While the client does not read (the connection's send buffer is full and
        pauses the response), updates wait in the bounded stream instead of piling up
        in the transport; past MAX_QUEUED the subscriber is dropped and, once the
        client reads again, its stream ends.
        """
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("GetUpdates", 2) + b"{}")
        hub = self.daemon.manager.ctx.hub
        [stream] = hub.streams
        channel.pauseProducing()  # what the transport does when its buffer is full
        # The update the response was already waiting for may still be written.
        for i in range(MAX_QUEUED + 1):
            self.publish(bool(i % 2))
        self.assertEqual(len(Response(transport.value()).lines()), 2)
        self.assertEqual(len(stream), MAX_QUEUED)
        self.assertFalse(stream.dropped)
        self.publish(True)
        self.assertTrue(stream.dropped)
        self.assertEqual(hub.streams, [])
        channel.resumeProducing()
        response = Response(transport.value())
        self.assertTrue(response.complete)
        self.assertEqual(len(response.lines()), 2)

    def test_send_buffer_full_from_the_start(self) -> None:
        """
        A stream that starts while the connection's send buffer is full waits for
        the client before writing even the first update.
        """
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("GetStatus", None, verb=b"GET", path=b"/page"))
        channel.pauseProducing()
        channel.dataReceived(self.headers("GetUpdates", 2) + b"{}")
        self.assertNotIn(b"HaveSubnets", transport.value())
        channel.resumeProducing()
        self.assertIn(b"HaveSubnets", transport.value())

    def test_slow_client_catches_up(self) -> None:
        """
        A client that pauses and resumes before falling too far behind gets every
        update, in order.
        """
        channel, transport = self.connect(ALICE)
        channel.dataReceived(self.headers("GetUpdates", 2) + b"{}")
        channel.pauseProducing()
        for i in range(MAX_QUEUED):
            self.publish(bool(i % 2))
        channel.resumeProducing()
        lines = Response(transport.value()).lines()
        self.assertEqual(len(lines), 1 + MAX_QUEUED)
        self.assertEqual(
            [line.get("Disabled", False) for line in lines[1:]],
            [bool(i % 2) for i in range(MAX_QUEUED)],
        )
        self.publish(True)
        self.assertEqual(len(Response(transport.value()).lines()), 2 + MAX_QUEUED)


class UserDataStreamTests(AdapterTestCase):
    """
    ReplaceVmUserData (JSON line, then Size raw bytes) and GetVmUserData (JSON line
    with Length, then the raw bytes) over HTTP.
    """

    def test_round_trip(self) -> None:
        created = self.call("CreateVm", self.create_line(MinimumFreeBytes=MiB))
        ip = created.lines()[-1]["IpAddress"]
        self.call("AcknowledgeVm", json.dumps({"IpAddress": ip}).encode())
        data = b"#cloud-config\nhostname: x\n" + bytes(range(256))
        body = json.dumps({"IpAddress": ip, "Size": len(data)}).encode() + b"\n" + data
        replaced = self.call("ReplaceVmUserData", body)
        self.assertEqual(replaced.status, 200, replaced.body)
        got = self.call("GetVmUserData", json.dumps({"IpAddress": ip}).encode())
        self.assertEqual(got.status, 200)
        line, _, rest = got.body.partition(b"\n")
        self.assertEqual(json.loads(line)["Length"], len(data))
        self.assertEqual(rest, data)
        short = self.call(
            "ReplaceVmUserData",
            json.dumps({"IpAddress": ip, "Size": 10}).encode() + b"\nabc",
        )
        self.assertEqual(short.status, 400)
        got = self.call("GetVmUserData", json.dumps({"IpAddress": ip}).encode())
        self.assertEqual(got.body.partition(b"\n")[2], data)
