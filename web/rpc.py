# -*- test-case-name: tests.test_rpc -*-
"""
JSON RPC on port 6976, an adapter over L{hypervisor.dispatch.Dispatcher}:
C{POST /rpc/Hypervisor.<Method>}, the request JSON in the body (the reference's field
names), the response JSON in the reply.

- C{GET /rpc} lists the methods with their access class.
- Statuses: 200 ok; 400 malformed request (naming the field); 401 no or unverifiable
  certificate; 403 denied; 404 unknown method or VM; 409 wrong state; 413 too large;
  503 disabled, libvirt down or out of descriptors; 507 no capacity; 500 internal
  (logged with a traceback, never shown). The body is always JSON,
  C{{"Error": "..."}} on errors.
- Streams (C{CreateVm} progress, C{GetUpdates}): newline-delimited JSON, one message
  per line, flushed as they happen; an error after the stream started is a last line
  C{{"Error": "..."}}.
- Uploads (C{CreateVm} with C{ImageDataSize}/C{UserDataSize}): the request JSON on
  the first line, then exactly the announced number of raw bytes.

How a call is read (L{HypervisorRequest}, the site's request factory): as soon as
the headers are in, the caller's certificate and the method decide access
(L{Dispatcher.admit}); a refused call is answered at once and its connection closed
without reading a byte of the body. An admitted call's JSON is kept in memory (never
spooled: it is bounded by the method's limit); for uploads the JSON line is decoded
as soon as it arrives, the call starts, and the bytes after it stream into the
method's L{hypervisor.upload.UploadStream} with flow control (the connection stops
being read while the volume writer is behind). Replies written before the body has
fully arrived wait until it has; an error before then is answered at once.

Nothing here decides access, decodes, or maps errors: that is the dispatcher's.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from hypervisor.api import (
    METHODS,
    PROGRESS,
    RAW,
    UNAUTHENTICATED_READS,
    UPDATES,
    encode_reply,
    raw_of,
)
from hypervisor.auth import CertificateRefused, TrustStore
from hypervisor.dispatch import Call, Dispatcher, RequestTooLarge
from hypervisor.errors import HypervisorError, InvalidRequest
from hypervisor.tls import peer_identity
from hypervisor.upload import UploadAborted, UploadStream
from web.headers import SECURITY_HEADERS
from web.limits import MAX_PAGE_BODY, RPC_PREFIX, error_body

CLOSE_GRACE = 2.0
JSON_TYPE = b"application/json"
STREAM_TYPE = b"application/x-ndjson"


def _line(obj: Any) -> bytes:
    return encode_reply(obj) + b"\n"


def network_producer(transport: Any) -> Optional[IPushProducer]:
    """
    The producer that stops reading the connection under C{transport} (the TCP
    connection under TLS and any wrappers), or None.
    """
    seen = 0
    while transport is not None and seen < 8:
        if IPushProducer.providedBy(transport):
            return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


@implementer(IPushProducer)
class UpdatesProducer:
    """
    Writes a GetUpdates stream to the response only while the client keeps up: the
    connection pauses it when its send buffer is full, so updates wait in the
    stream's bounded queue (and a client that stops reading is dropped there)
    instead of piling up in the transport.
    """

    def __init__(self, call: "RpcCall", stream: Any) -> None:
        self.call = call
        self.stream = stream
        self.paused = False
        self.done = False
        self._waiting = False
        self._looping = False

    def pauseProducing(self) -> None:
        """
        The client is behind: stop taking updates from the stream.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The client caught up: write what waits, then keep going.
        """
        self.paused = False
        if self._looping:
            return
        self._looping = True
        try:  # a loop, not recursion: up to MAX_QUEUED updates may be ready at once
            while not (self.paused or self.done or self._waiting):
                self._waiting = True
                self.stream.get().addCallback(self._got)
        finally:
            self._looping = False

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
        self.stream.close()

    def _got(self, update: Any) -> None:
        self._waiting = False
        if self.done:
            return
        request = self.call.request
        if update is None or self.stream.closed:
            self.done = True
            if request.producer is self and request.channel is not None:
                request.unregisterProducer()
            request.finish_reply()
            return
        self.call._write(_line(update))
        if not self._looping and not self.paused:
            self.resumeProducing()


class RpcEndpoints(Resource):
    """
    What C{/rpc} answers besides calls (which L{HypervisorRequest} handles): C{GET}
    or C{HEAD /rpc} lists the methods and their access classes; any other method on
    C{/rpc} or under it is a 405 saying what to do.
    """

    isLeaf = True

    def resource(self) -> IResource:
        """
        The Twisted resource serving C{/rpc}.
        """
        return self

    def render(self, request: Any) -> bytes:
        """
        The listing, or a 405.
        """
        request.setHeader(b"Content-Type", JSON_TYPE)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        if request.path == b"/rpc":
            if request.method in (b"GET", b"HEAD"):
                return self.listing()
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            return error_body(
                "GET /rpc lists the methods; RPC calls are POST /rpc/Hypervisor.<Method>"
            )
        request.setResponseCode(405)
        request.setHeader(b"Allow", b"POST")
        return error_body("RPC calls are POST /rpc/Hypervisor.<Method>")

    @staticmethod
    def listing() -> bytes:
        """
        The methods and their access classes, as JSON.
        """
        return (
            json.dumps(
                [
                    {
                        "Method": "Hypervisor." + name,
                        "Access": spec.access,
                        "UnauthenticatedRead": name in UNAUTHENTICATED_READS,
                        "Reply": spec.kind,
                        "Upload": spec.upload is not None,
                    }
                    for name, spec in sorted(METHODS.items())
                ],
                indent=2,
            ).encode()
            + b"\n"
        )


class RpcCall:
    """
    One RPC over one HTTP request: admission at the headers, the body as it comes,
    the reply once the body is complete.
    """

    log = Logger()

    def __init__(self, request: "HypervisorRequest", name: str, length: Optional[int]) -> None:
        self.request = request
        self.dispatcher = request.dispatcher
        self.name = name
        self.length = length
        self.call: Optional[Call] = None
        self.state = "body"
        self.buffer = io.BytesIO()
        self.received = 0
        self.upload: Optional[UploadStream] = None
        self.processing = False
        self.closed = False
        self.pending: list[bytes] = []
        self.outcome: Optional[tuple[str, Any]] = None
        self.streaming = False

    # Headers: admission -----------------------------------------------------------------

    def admit(self) -> bool:
        """
        Decide access before any of the body is read; answer and close if refused.
        """
        try:
            secure, identity = peer_identity(self.request.channel.transport, self.request.trust)
        except CertificateRefused as e:
            self.dispatcher.classify(None, Failure(e))
            self.refuse(e.status, str(e))
            return False
        try:
            self.call = self.dispatcher.admit(self.name, identity, secure)
        except HypervisorError as e:
            self.refuse(e.status, str(e))
            return False
        spec = self.call.spec
        if spec.kind == RAW:
            # A console streams both ways: HTTP/1.1 request and response cannot.
            self.fail_early(
                InvalidRequest(
                    f"{self.name} streams raw bytes both ways: open the WebSocket "
                    f"/ws/{self.name} instead (web.console)"
                )
            )
            return False
        limit = spec.max_request + (spec.max_upload if spec.upload else 0)
        if self.length is not None and self.length > limit:
            self.fail_early(
                RequestTooLarge(
                    f"request body of {self.length} bytes is over the {limit}-byte limit for "
                    f"{self.name}"
                )
            )
            return False
        self.state = "line" if spec.upload is not None else "body"
        return True

    def refuse(self, status: int, message: str) -> None:
        """
        Answer now, without reading the body, and close the connection.
        """
        self.closed = True
        self.request.answer_and_close(status, message)

    def fail_early(self, error: BaseException) -> None:
        """
        Classify and answer a failure that happened before the body was complete.
        """
        status, message = self.dispatcher.classify(self.call, Failure(error))
        self.refuse(status, message)

    # Body ------------------------------------------------------------------------------------

    def chunk(self, data: bytes) -> None:
        """
        Some of the body.
        """
        if self.closed:
            return
        assert self.call is not None
        if self.state == "upload":
            assert self.upload is not None
            try:
                self.upload.write(data)
            except UploadAborted as e:
                self.fail_early(e)
            return
        limit = self.call.spec.max_request
        if self.state == "line":
            newline = data.find(b"\n")
            if newline < 0:
                self._keep(data, limit)
                return
            self._keep(data[: newline + 1], limit)
            if self.closed:
                return
            self._start_upload(data[newline + 1 :])
            return
        self._keep(data, limit)

    def _keep(self, data: bytes, limit: int) -> None:
        self.received += len(data)
        if self.received > limit:
            what = "request JSON" + (
                " (it must be on the first line)" if self.state == "line" else ""
            )
            self.fail_early(RequestTooLarge(f"{what} is over the {limit}-byte limit"))
            return
        self.buffer.write(data)

    def _start_upload(self, rest: bytes) -> None:
        assert self.call is not None
        line = self.buffer.getvalue()
        try:
            parsed = self.dispatcher.decode(self.call, line)
            size = self.dispatcher.upload_size(self.call, parsed)
            if self.length is not None and self.length - len(line) != size:
                raise InvalidRequest(
                    f"the body has {self.length - len(line)} bytes after the request line, "
                    f"but the request announces {size}"
                )
        except HypervisorError as e:
            self.fail_early(e)
            return
        self.upload = UploadStream(size)
        producer = network_producer(self.request.channel.transport)
        if producer is not None:
            self.upload.register_producer(producer)
        self.state = "upload"
        self._invoke(parsed, self.upload)
        if rest and not self.closed:
            self.chunk(rest)

    def body_complete(self) -> None:
        """
        The whole body arrived: run the call (or finish its upload) and send what
        waits.
        """
        if self.closed:
            return
        assert self.call is not None
        self.processing = True
        if self.state == "upload":
            assert self.upload is not None
            self.upload.finish()
        else:
            try:
                parsed = self.dispatcher.decode(self.call, self.buffer.getvalue())
                if self.state == "line":
                    size = self.dispatcher.upload_size(self.call, parsed)
                    if size:
                        raise InvalidRequest(
                            f"the request announces {size} bytes of data " "but none followed it"
                        )
            except HypervisorError as e:
                self._reply_error(Failure(e))
                return
            self._invoke(parsed, None)
        self._flush()

    def lost(self, reason: Failure) -> None:
        """
        The connection went away.
        """
        self.closed = True
        if self.upload is not None:
            self.upload.fail(UploadAborted("the client went away during the upload"))

    # Running ----------------------------------------------------------------------------------

    def _invoke(self, parsed: Any, upload: Optional[UploadStream]) -> None:
        assert self.call is not None
        d = self.dispatcher.invoke(self.call, parsed, progress=self._progress, upload=upload)
        d.addCallbacks(self._result, self._failed)
        d.addErrback(lambda f: self.log.failure("answering {name}", f, name=self.name))

    def _progress(self, message: Any) -> None:
        self._send(_line(message))

    def _send(self, data: bytes) -> None:
        if self.processing:
            self._write(data)
        else:
            self.pending.append(data)

    def _result(self, result: Any) -> None:
        assert self.call is not None
        if self.call.spec.kind == UPDATES:
            self.outcome = ("updates", result)
        else:
            self.outcome = ("reply", result)
        self.dispatcher.finish(self.call, ok=True)
        if self.processing:
            self._flush()

    def _failed(self, failure: Failure) -> None:
        if not self.processing and not self.closed:
            # The body is still arriving: answer now rather than read the rest.
            status, message = self.dispatcher.classify(self.call, failure)
            self.refuse(status, message)
            return
        self.outcome = ("error", failure)
        if self.processing:
            self._flush()

    def _flush(self) -> None:
        if self.closed and not self.processing:
            return
        pending, self.pending = self.pending, []
        for data in pending:
            self._write(data)
        if self.outcome is None:
            return
        kind, value = self.outcome
        self.outcome = None
        if kind == "reply":
            self._write(_line(value))
            raw = raw_of(value)  # GetVmUserData: Length bytes after the JSON line
            if raw:
                self._write(raw)
            self.request.finish_reply()
        elif kind == "updates":
            self._drain_updates(value)
        else:
            self._reply_error(value)

    def _write(self, data: bytes) -> None:
        request = self.request
        if request.finished or request._disconnected:
            return
        if not self.streaming:
            self.streaming = True
            assert self.call is not None
            if self.call.spec.kind in (PROGRESS, UPDATES):
                request.setHeader(b"Content-Type", STREAM_TYPE)
        request.write(data)

    def _reply_error(self, failure: Failure) -> None:
        status, message = self.dispatcher.classify(self.call, failure)
        request = self.request
        if request.finished or request._disconnected:
            return
        if not self.streaming:
            request.setResponseCode(status)
        self._write(error_body(message))
        request.finish_reply()

    def _drain_updates(self, stream: Any) -> None:
        request = self.request
        request.notifyFinish().addBoth(lambda _: stream.close())
        request.setHeader(b"Content-Type", STREAM_TYPE)
        self.streaming = True
        # The status and headers go now: a stream may wait long for its first message
        # (WatchDhcp sends one per DHCP packet received).
        self._write(b"")
        producer = UpdatesProducer(self, stream)
        request.registerProducer(producer, True)
        if getattr(request.channel, "_waitingForTransport", False):
            producer.pauseProducing()  # the send buffer is full already
        else:
            producer.resumeProducing()


class HypervisorRequest(Request):
    """
    The request class of port 6976: RPC calls are admitted at the headers and
    streamed (L{RpcCall}); page requests carry no body (L{MAX_PAGE_BODY}), refused
    from the headers. Nothing is ever spooled to a temporary file.

    Made per daemon by L{request_factory}, which sets L{dispatcher} and L{trust}.
    """

    dispatcher: Dispatcher
    trust: TrustStore
    rpc: Optional[RpcCall] = None
    refused = False
    too_large = False
    _body_bytes = 0
    _abort: Any = None

    def gotLength(self, length: Optional[int]) -> None:
        """
        The headers are in: decide what to do with the body before any of it is read.
        """
        channel: Any = self.channel
        command = getattr(channel, "_command", b"")
        path = (getattr(channel, "_path", b"") or b"").split(b"?", 1)[0]
        self.content = io.BytesIO()
        if command == b"POST" and path.startswith(RPC_PREFIX):
            try:
                name = unquote_to_bytes(path[len(RPC_PREFIX) :]).decode("utf-8")
            except UnicodeDecodeError:
                self.answer_and_close(
                    400, "the method name is not UTF-8; calls are POST " "/rpc/Hypervisor.<Method>"
                )
                return
            self.rpc = RpcCall(self, name, length)
            self.rpc.admit()
            return
        if length is not None and length > MAX_PAGE_BODY:
            self.answer_and_close(
                413, f"a request body of {length} bytes was sent; " "a page takes no request body"
            )

    def handleContentChunk(self, data: bytes) -> None:
        """
        Body bytes: to the RPC call, or kept (bounded) for pages.
        """
        if self.refused:
            return
        if self.rpc is not None:
            self.rpc.chunk(data)
            return
        self._body_bytes += len(data)
        if self._body_bytes > MAX_PAGE_BODY:
            self.too_large = True
            self.content = io.BytesIO()
            return
        self.content.write(data)  # type: ignore[union-attr]

    def process(self) -> None:
        """
        The body is complete: run the RPC, or serve the page.
        """
        if self.refused:
            return
        if self.rpc is not None:
            self.site = self.channel.site  # type: ignore[attr-defined]
            self.setHeader(b"Content-Type", JSON_TYPE)
            for name, value in SECURITY_HEADERS.items():
                self.setHeader(name, value)
            self.rpc.body_complete()
            return
        if self.too_large:
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", JSON_TYPE)
            for name, value in SECURITY_HEADERS.items():
                self.setHeader(name, value)
            self.write(error_body("a page takes no request body"))
            self.finish()
            return
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        """
        Tell the RPC call (an upload in progress fails).
        """
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        if self.rpc is not None:
            self.rpc.lost(reason)
        super().connectionLost(reason)

    def finish_reply(self) -> None:
        """
        Finish the response unless the connection is gone.
        """
        if not self.finished and not self._disconnected:
            self.finish()

    def answer_and_close(self, status: int, message: str) -> None:
        """
        Answer before the body is read (or while it arrives), then close the
        connection: nothing more of the body is read.
        """
        self.refused = True
        self.requestHeaders.removeHeader(b"Expect")
        transport: Any = self.channel.transport
        body = error_body(message)
        reason = RESPONSES.get(status, b"Error")
        headers = b"".join(
            name + b": " + value + b"\r\n" for name, value in SECURITY_HEADERS.items()
        )
        transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n%s\r\n" % (status, reason, len(body), headers) + body
        )
        self.channel.loseConnection()
        # A client still sending its body may never complete a TLS close: cut the
        # connection underneath after a grace period (cancelled if it closes).
        tcp: Any = network_producer(transport)
        if tcp is not None and hasattr(tcp, "abortConnection"):
            self._abort = self.dispatcher.reactor.callLater(CLOSE_GRACE, tcp.abortConnection)


def request_factory(dispatcher: Dispatcher, trust: TrustStore) -> type[HypervisorRequest]:
    """
    A L{HypervisorRequest} class bound to this daemon's dispatcher and trust store.
    """
    return type(
        "BoundHypervisorRequest", (HypervisorRequest,), {"dispatcher": dispatcher, "trust": trust}
    )
