# -*- test-case-name: tests.test_srpc_protocol -*-
"""
SRPC's server side on port 6976: Twisted protocols over the wire rules of
L{hypervisor.srpc.codec} and the transport-neutral steps of
L{hypervisor.dispatch.Dispatcher} (admit, decode, upload_size, invoke, classify),
the same ones the HTTPS adapter (L{web.rpc}) uses.

- L{ConnectRouterFactory}: the first-line hook of L{hypervisor.tls.SniffingFactory}.
  A connection (plain, or inside TLS) whose first bytes are C{CONNECT } goes to
  L{SrpcServer}; anything else to the HTTP site. It waits for at most eight bytes.
- L{SrpcServer}, one per connection:

  1. the CONNECT head (at most L{codec.MAX_HEAD} bytes, within the guard's headers
     deadline): C{/_SRPC_/TLS/JSON} is answered C{200 Connected to Go SRPC} and TLS
     starts as server on the same connection (client certificates verified by the
     same L{TrustStore} as HTTPS, in L{hypervisor.tls.peer_identity}); inside TLS
     (Go's fallback) the same CONNECT is answered 200 and the calls follow;
     C{/_SRPC_/unsecured/JSON} is served (200) only with
     C{-allowUnauthenticatedReads}, else 405 as Go does, and then admits only the
     unauthenticated reads; the gob endpoints and anything else get 404 and are
     closed, so Go clients move on to JSON. C{?doNotUseMethodPowers=true} drops the
     caller's method grants and hypervisor ownership for the connection.
  2. calls, one after another: the method line is answered before anything else is
     read (C{"\\n"}, or C{access to method denied}, C{unknown service: X},
     C{Hypervisor: unknown method: X}); an empty line is a ping; the
     C{.LocalUpgradeToUnix} call of same-host Go clients gets C{unknown service: }
     so they stay on TCP.
  3. request/reply: one JSON line (bounded by the method's limit) -> C{"\\n"} +
     JSON in one write; a service-layer error goes in the reply's C{Error} field as
     the Go hypervisor does; a malformed request gets an error line and the
     connection is closed (as Go's server does after a handler error).
  4. uploads (CreateVm's image and user data): the bytes after the request line go
     into the call's L{UploadStream} as they arrive, reading paused while the volume
     writer is behind; if the service gives up early the rest is read and dropped
     (the Go client writes everything before it reads), then the error is sent.
     Messages wait until the upload has fully arrived.
  5. progress streams (CreateVm): bare JSON lines, the last C{Final} or with an
     C{Error}; the connection then takes the next call (AcknowledgeVm).
  6. replies with raw bytes after them (L{hypervisor.api.with_raw}: GetVmUserData
     and the like): the JSON as a bare message in its own TLS record, the bytes in
     later records, so that Go's JSON read-ahead cannot swallow them.
  7. GetUpdates: no request; the first Update is full, the next ones incremental,
     each with C{HealthStatus}; every C{GetUpdatesRequest} the client sends (the
     fleet-manager keepalive) is answered with an Update, and a non-null
     C{RegisterExternalLeasesRequest} in it is applied with RegisterExternalLeases'
     access rule; those leases are removed when the stream ends (reference §1.9:
     "managed" external leases). WatchDhcp: its request, then its packets.
  8. consoles (ConnectToVmSerialPort, ConnectToVmConsole): the response as a bare
     message in its own TLS record (Go's read-ahead), then the connection carries raw
     bytes both ways to the VM's L{hypervisor.console.pipe.VmPipe} until either side
     closes (the serial port's end is C{"VM serial port closed\n"}, then the
     connection is closed, as Go's server does); an error answer keeps the
     connection for the next call, as Go's does.

Deadlines and caps are the connection guard's (L{hypervisor.netguard}): the CONNECT
head, and every method line with its request JSON, are C{HEADERS} (due within its
deadline), the TLS handshake C{HANDSHAKE}, a call in progress (its upload included)
C{BUSY}, between calls C{IDLE}. Bytes a client sends while a call runs (it
should not) are kept up to L{MAX_AHEAD}, beyond which the connection is closed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IHandshakeListener,
    IProtocolFactory,
    IProtocolNegotiationFactory,
    IPushProducer,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from zope.interface import implementer

from hypervisor.api import PROGRESS, RAW, UPDATES, encode_reply, raw_of
from hypervisor.auth import ANONYMOUS, CertificateRefused, Identity, TrustStore
from hypervisor.dispatch import Call, Dispatcher
from hypervisor.errors import HypervisorError, InvalidRequest, NotFound
from hypervisor.metrics import Metrics
from hypervisor.model import RegisterExternalLeasesRequest, Update
from hypervisor.netguard import Phase, find_guard
from hypervisor.srpc import codec as wire
from hypervisor.srpc.codec import (
    ACCESS_DENIED,
    BAD_REQUEST,
    CONNECTED,
    GOB_PLAIN,
    GOB_TLS,
    MAX_HEAD,
    MAX_METHOD_LINE,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    SRPC_TLS_JSON,
    SRPC_UNSECURED_JSON,
    FramingError,
    GetUpdatesRequest,
    LineReader,
)
from hypervisor.tls import peer_identity, tls_server_factory
from hypervisor.upload import UploadAborted, UploadStream

MAX_AHEAD = 64 * 1024
"""Bytes a client may send while one of its calls runs (they wait for the next)."""
MAX_PING = 1 << 20
"""A GetUpdatesRequest line."""
HEALTHY = "healthy"
SERVICE = "Hypervisor"


def _hand_over(transport: Any, inner: protocol.Protocol) -> None:
    """
    Make C{inner} the protocol C{transport} delivers to from now on.
    """
    if isinstance(transport, ProtocolWrapper):
        transport.wrappedProtocol = inner
    else:
        transport.protocol = inner


def network_producer(transport: Any) -> Optional[IPushProducer]:
    """
    The producer that stops reading the connection under C{transport} (the TCP
    connection under TLS and wrappers), or None.
    """
    seen = 0
    while transport is not None and seen < 8:
        if IPushProducer.providedBy(transport):
            return transport
        transport = getattr(transport, "transport", None)
        seen += 1
    return None


# The first-line router ------------------------------------------------------------------


@implementer(IHandshakeListener)
class ConnectRouter(protocol.Protocol):
    """
    Reads until the first bytes say C{CONNECT } or not, then hands the connection
    over: to SRPC or to HTTP.
    """

    def __init__(self, factory: "ConnectRouterFactory", addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.buffer = b""
        self.inner: Optional[protocol.Protocol] = None

    def handshakeCompleted(self) -> None:
        """
        TLS is up (the router sits inside TLS): the first line is now due.
        """
        guard = find_guard(self.transport)
        if guard is not None:
            guard.enter(Phase.WAITING)

    def dataReceived(self, data: bytes) -> None:
        """
        Decide on the first bytes, then pass everything through.
        """
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        self.buffer += data
        prefix = wire.CONNECT_PREFIX
        if not self.buffer.startswith(prefix) and prefix.startswith(self.buffer):
            return  # could still be CONNECT
        srpc = self.buffer.startswith(prefix)
        if srpc:
            inner: Optional[protocol.Protocol] = self.factory.srpc.buildProtocol(
                self.addr, in_tls=self.factory.in_tls
            )
        else:
            inner = self.factory.http.buildProtocol(self.addr)
        if inner is None:
            assert self.transport is not None
            self.transport.loseConnection()
            return
        self.inner = inner
        _hand_over(self.transport, inner)
        inner.makeConnection(self.transport)
        data, self.buffer = self.buffer, b""
        inner.dataReceived(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        Pass the loss on.
        """
        if self.inner is not None:
            self.inner.connectionLost(reason)


@implementer(IProtocolNegotiationFactory)
class ConnectRouterFactory(protocol.Factory):
    """
    Routes a connection's first line: C{CONNECT} to SRPC, the rest to C{http}.

    Under TLS it answers ALPN as the HTTP factory does: Twisted's TLS asks the
    factory it wraps for the protocols it speaks, and a factory that cannot say
    makes every client offering ALPN (curl, browsers) fail the handshake with an
    "internal error" alert.
    """

    def acceptableProtocols(self) -> list[bytes]:
        """
        The HTTP factory's ALPN protocols (C{http/1.1}); SRPC clients offer none.
        """
        negotiation = IProtocolNegotiationFactory(self.http, None)
        return negotiation.acceptableProtocols() if negotiation is not None else [b"http/1.1"]

    def __init__(self, http: IProtocolFactory, srpc: "SrpcFactory", in_tls: bool = False) -> None:
        self.http = http
        self.srpc = srpc
        self.in_tls = in_tls

    def doStart(self) -> None:
        """
        Start the HTTP factory too.
        """
        super().doStart()
        self.http.doStart()

    def doStop(self) -> None:
        """
        Stop the HTTP factory too.
        """
        self.http.doStop()
        super().doStop()

    def buildProtocol(self, addr: Any) -> ConnectRouter:
        """
        A router for the new connection.
        """
        return ConnectRouter(self, addr)


# The SRPC server ------------------------------------------------------------------------


class SrpcFactory(protocol.Factory):
    """
    Makes L{SrpcServer}s; C{tls_options} None means no TLS (the TLS endpoint is then
    answered 404).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        trust: TrustStore,
        tls_options: Any,
        reactor: Any,
        metrics: Optional[Metrics] = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.trust = trust
        self.reactor = reactor
        self.metrics = metrics or dispatcher.metrics
        self.tls = (
            tls_server_factory(tls_options, _SessionFactory(self), reactor)
            if tls_options is not None
            else None
        )

    def router(self, http: IProtocolFactory, in_tls: bool = False) -> ConnectRouterFactory:
        """
        The first-line hook for L{hypervisor.tls.SniffingFactory}'s C{connect}.
        """
        return ConnectRouterFactory(http, self, in_tls)

    def buildProtocol(self, addr: Any, in_tls: bool = False) -> "SrpcServer":
        """
        A server reading a CONNECT head (inside TLS already when C{in_tls}: Go's
        fallback, no second handshake).
        """
        return SrpcServer(self, addr, in_tls=in_tls)


class _SessionFactory(protocol.Factory):
    """
    What TLS wraps after C{CONNECT /_SRPC_/TLS/JSON}: a server taking calls.
    """

    def __init__(self, srpc: SrpcFactory) -> None:
        self.srpc = srpc

    def buildProtocol(self, addr: Any) -> "SrpcServer":
        return SrpcServer(self.srpc, addr, stage="calls", in_tls=True)


@implementer(IHandshakeListener, IPushProducer)
class SrpcServer(protocol.Protocol):
    """
    One SRPC connection (module docstring). It is its transport's push producer
    while it streams updates.

    @ivar stage: C{connect}, C{method} (waiting for a method line), C{request} (its
        JSON), C{upload}, C{busy} (the call runs), C{updates}, C{handed-over}
        (TLS took the connection), C{closed}.
    """

    log = Logger()

    def __init__(
        self, factory: SrpcFactory, addr: Any, stage: str = "connect", in_tls: bool = False
    ) -> None:
        self.factory = factory
        self.dispatcher = factory.dispatcher
        self.addr = addr
        self.stage = "connect" if stage == "connect" else "method"
        self.in_tls = in_tls
        self.reader = LineReader()
        self.secure = False
        self.use_method_powers = True
        self.identity: Optional[Identity] = None
        self.refused: Optional[CertificateRefused] = None
        self.call: Optional[Call] = None
        self.upload: Optional[UploadStream] = None
        self.upload_left = 0
        self.draining = False
        self.held: list[bytes] = []
        self.outcome: Optional[tuple[bytes, bool]] = None  # (bytes, close after)
        self.stream: Any = None
        self.pipe: Any = None
        self.paused = False
        self.managed_leases = False
        self.producing = False
        self.lost = False
        self._pulling = False
        self._waiting = False
        self._answer: Optional[Deferred[Any]] = None

    # Connection ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        """
        Set TCP_NODELAY (each reply is one small write the client waits for).
        """
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            try:
                nodelay(True)
            except (OSError, AttributeError):
                pass
        if self.stage == "connect":
            self._enter(Phase.HEADERS)
        else:
            self._start_producing()

    def _start_producing(self) -> None:
        """
        Be the connection's push producer while it carries calls: the transport
        pauses us when its send buffer is full (the client does not read), and no
        further call or keepalive is taken until it resumes us.
        """
        register = getattr(self.transport, "registerProducer", None)
        if register is not None and not self.producing:
            register(self, True)
            self.producing = True

    def handshakeCompleted(self) -> None:
        """
        TLS is up: the first method line is due.
        """
        self._enter(Phase.WAITING)

    def _enter(self, phase: Phase) -> None:
        guard = find_guard(self.transport)
        if guard is not None:
            guard.enter(phase)

    def _write(self, data: bytes) -> None:
        if self.stage != "closed" and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        if self.stage == "closed":
            return
        self.stage = "closed"
        self._end_stream()
        transport: Any = self.transport
        if self.producing:
            # Unregister before closing: TLS does not shut down while a producer is
            # registered.
            self.producing = False
            transport.unregisterProducer()
        transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        The connection went away: an upload in progress fails, a stream ends.
        """
        self.stage = "closed"
        self.lost = True
        answer, self._answer = self._answer, None
        if answer is not None:
            answer.errback(UploadAborted("the client went away before it answered"))
        if self.pipe is not None:
            self.pipe.close()
        if self.upload is not None and self.upload_left:
            self.upload.fail(UploadAborted("the client went away during the upload"))
        self._end_stream()

    # Bytes in -------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the client, by stage.
        """
        if self.stage in ("closed", "handed-over"):
            return
        if self.stage == "console":
            self.pipe.write(data)
            return
        if self.stage == "upload":
            data = self._upload_bytes(data)
            if not data:
                return
        self.reader.feed(data)
        if self.stage in ("busy",) or (
            self.stage == "updates" and self.call is not None and self.call.method != "GetUpdates"
        ):
            if self._answer is not None:
                self._take_answer()
                return
            if len(self.reader) > MAX_AHEAD:
                self._fail_line(f"more than {MAX_AHEAD} bytes sent while a call was running")
            return
        if self.paused and self.stage in ("method", "updates"):
            # The client does not read: its next calls and keepalives wait (each
            # answer would grow the send buffer), up to a bound.
            limit = MAX_PING if self.stage == "updates" else MAX_AHEAD
            if len(self.reader) > limit:
                self._fail_line(f"more than {limit} bytes sent while not reading")
            return
        self._advance()

    def _advance(self) -> None:
        try:
            while self.stage not in ("closed", "handed-over", "busy", "upload"):
                if self.stage == "connect":
                    end = wire.head_complete(bytes(self.reader.buffer[: MAX_HEAD + 4]))
                    if end < 0:
                        if len(self.reader) > MAX_HEAD:
                            self._connect_answer(BAD_REQUEST, "malformed", "?")
                        return
                    self._connect(self.reader.take(end))
                elif self.stage == "method":
                    if self.paused:
                        return  # the next call once the client reads again
                    line = self.reader.line(MAX_METHOD_LINE)
                    if line is None:
                        if len(self.reader):
                            self._enter(Phase.HEADERS)
                        return
                    self._method(line)
                elif self.stage == "request":
                    assert self.call is not None
                    line = self.reader.line(self.call.spec.max_request)
                    if line is None:
                        return
                    self._request(line)
                elif self.stage == "updates":
                    if self.paused:
                        return  # answered once the client reads again
                    line = self.reader.line(MAX_PING)
                    if line is None:
                        return
                    self._ping(line)
                else:
                    return
        except wire.LineTooLong as e:
            self._fail_line(f"line too long: {e}")
        except FramingError as e:
            self._fail_line(str(e))

    def _fail_line(self, message: str) -> None:
        """
        Garbage: the error line, then close.
        """
        self.log.info("SRPC connection from {addr} closed: {why}", addr=self.addr, why=message)
        self._write(wire.error_line(message))
        self._close()

    # CONNECT ---------------------------------------------------------------------------------

    def _connect_answer(self, answer: bytes, result: str, endpoint: str) -> None:
        self.factory.metrics.srpc_connections.labels(endpoint, result).inc()
        self._write(answer)
        if answer is not CONNECTED:
            self._close()

    def _connect(self, head: bytes) -> None:
        try:
            request = wire.parse_connect(head)
        except FramingError:
            self._connect_answer(BAD_REQUEST, "malformed", "?")
            return
        path = request.path
        known = path in (SRPC_TLS_JSON, SRPC_UNSECURED_JSON, GOB_TLS, GOB_PLAIN)
        label = path if known else "other"
        self.use_method_powers = request.use_method_powers
        if path == SRPC_TLS_JSON and self.in_tls:
            self._connect_answer(CONNECTED, "connected", label)
            self.secure = True
            self._start_calls()
        elif path == SRPC_TLS_JSON and self.factory.tls is not None:
            self._connect_answer(CONNECTED, "connected", label)
            self._start_tls()
        elif path == SRPC_UNSECURED_JSON and self.in_tls:
            self._connect_answer(CONNECTED, "connected", label)
            self.secure = True
            self._start_calls()
        elif path == SRPC_UNSECURED_JSON:
            if not self.dispatcher.allow_unauthenticated_reads:
                # Go: TLS required and no unauthenticated methods -> 405.
                self._connect_answer(METHOD_NOT_ALLOWED, "refused", label)
                return
            self._connect_answer(CONNECTED, "connected", label)
            self._start_calls()
        else:
            self._connect_answer(NOT_FOUND, "not-found", label)

    def _start_calls(self) -> None:
        self.stage = "method"
        self._enter(Phase.WAITING)
        self._start_producing()

    def _start_tls(self) -> None:
        assert self.factory.tls is not None and self.transport is not None
        tls = self.factory.tls.buildProtocol(self.addr)
        session = tls.wrappedProtocol
        session.use_method_powers = self.use_method_powers
        self.stage = "handed-over"
        self._enter(Phase.HANDSHAKE)
        _hand_over(self.transport, tls)
        tls.makeConnection(self.transport)
        rest = self.reader.take(len(self.reader))
        if rest:
            tls.dataReceived(rest)

    # Method lines --------------------------------------------------------------------------

    def _caller(self) -> Identity:
        if self.identity is None:
            try:
                secure, identity = peer_identity(self.transport, self.factory.trust)
            except CertificateRefused as e:
                self.refused = e
                secure, identity = True, ANONYMOUS
            self.secure = secure or self.secure
            self.identity = identity
        return self.identity

    def _method(self, line: bytes) -> None:
        if not line:
            self._write(b"\n")  # a ping
            self._enter(Phase.IDLE)
            return
        # The method line and its request JSON are due within the headers deadline.
        self._enter(Phase.HEADERS)
        service, method = wire.split_method(line)
        identity = self._caller()
        if service != SERVICE:
            self._write(wire.error_line(wire.unknown_service(service)))
            self._enter(Phase.IDLE)
            return
        if self.refused is not None:
            self.dispatcher.classify(None, Failure(self.refused))
            self._fail_line(str(self.refused))
            return
        try:
            call = self.dispatcher.admit(
                f"{SERVICE}.{method}",
                identity,
                self.secure,
                transport="srpc",
                use_method_powers=self.use_method_powers,
            )
        except NotFound:
            self._write(wire.error_line(wire.unknown_method(service, method)))
            self._enter(Phase.IDLE)
            return
        except HypervisorError as e:
            text = ACCESS_DENIED if e.status in (401, 403) else str(e)
            self._write(wire.error_line(text))
            self._enter(Phase.IDLE)
            return
        self.call = call
        self._write(b"\n")
        if call.method == "GetUpdates":
            self._enter(Phase.BUSY)
            self.stage = "busy"
            self._invoke(call.spec.request())
        else:
            self.stage = "request"

    # Requests and uploads -------------------------------------------------------------------

    def _request(self, line: bytes) -> None:
        call = self.call
        assert call is not None
        try:
            request = self.dispatcher.decode(call, line)
            size = self.dispatcher.upload_size(call, request)
        except HypervisorError as e:
            _, message = self.dispatcher.classify(call, Failure(e))
            self._fail_line(message)
            return
        self._enter(Phase.BUSY)
        if not size:
            self.stage = "busy"
            self._invoke(request)
            return
        upload = UploadStream(size)
        producer = network_producer(self.transport)
        if producer is not None:
            upload.register_producer(producer)
        upload.on_discard = self._discarded
        self.upload = upload
        self.upload_left = size
        self.stage = "upload"
        self._invoke(request, upload)
        rest = self.reader.take(len(self.reader))
        if rest and self.stage == "upload":
            rest = self._upload_bytes(rest)
            self.reader.feed(rest)

    def _upload_bytes(self, data: bytes) -> bytes:
        """
        Give the upload its bytes; return what follows it.
        """
        n = min(len(data), self.upload_left)
        part, rest = data[:n], data[n:]
        self.upload_left -= n
        if not self.draining and self.upload is not None:
            try:
                self.upload.write(part)
            except UploadAborted:
                pass
        if self.upload_left == 0:
            self.stage = "busy"
            self.draining = False
            self._flush()
        return rest

    def _discarded(self) -> None:
        """
        The service gave up on the upload: read the rest and drop it.
        """
        self.draining = True

    # Running --------------------------------------------------------------------------------

    def _invoke(self, request: Any, upload: Optional[UploadStream] = None) -> None:
        call = self.call
        assert call is not None
        receive = self._receive if call.spec.answer is not None else None
        d = self.dispatcher.invoke(
            call, request, progress=self._progress, upload=upload, receive=receive
        )
        d.addCallbacks(self._result, self._failed, callbackArgs=(call,), errbackArgs=(call,))
        d.addErrback(lambda f: self.log.failure("answering SRPC {name}", f, name=call.label))

    def _receive(self) -> "Deferred[Any]":
        """
        The client's answer in the middle of a stream (MigrateVm's
        C{MigrateVmResponseResponse} after C{RequestCommit}): its next JSON line,
        decoded as the method's C{spec.answer}; fails if the connection goes away.
        """
        d: Deferred[Any] = Deferred()
        self._answer = d
        if self.lost or self.stage == "closed":
            self._answer = None
            d.errback(UploadAborted("the client went away before it answered"))
            return d
        self._take_answer()
        return d

    def _take_answer(self) -> None:
        d, call = self._answer, self.call
        if d is None or call is None or call.spec.answer is None:
            return
        try:
            line = self.reader.line(MAX_AHEAD)
        except wire.LineTooLong:
            self._answer = None
            d.errback(InvalidRequest("the client's answer is too long"))
            self._fail_line("answer too long")
            return
        if line is None:
            return
        self._answer = None
        try:
            answer = wire.decode_json(call.spec.answer, line)
        except ValueError as e:
            d.errback(InvalidRequest(f"malformed answer: {e}"))
            return
        d.callback(answer)

    def _progress(self, message: Any) -> None:
        self._send(wire.message(encode_reply(message)))

    def _send(self, data: bytes) -> None:
        if self.stage == "upload":
            self.held.append(data)
        else:
            self._write(data)

    def _result(self, result: Any, call: Call) -> None:
        self.dispatcher.finish(call, ok=True)
        if self.stage == "closed" or call is not self.call:
            if call.spec.kind == UPDATES:
                result.close()
            return
        kind = call.spec.kind
        raw = raw_of(result)
        if kind == RAW:
            self._console(result)
        elif kind == UPDATES:
            self._stream(result)
        elif raw is not None:
            self._finish_with_raw(wire.message(encode_reply(result)), raw)
        elif kind == PROGRESS:
            self._finish(wire.message(encode_reply(result)))
        else:
            self._finish(wire.reply(encode_reply(result)))

    def _failed(self, failure: Failure, call: Call) -> None:
        _, message = self.dispatcher.classify(call, failure)
        if self.stage == "closed" or call is not self.call:
            return
        kind = call.spec.kind
        if kind in (PROGRESS, RAW):
            self._finish(wire.message(wire.error_message(message)))
        elif kind == UPDATES:
            self._finish(wire.message(wire.error_message(message)), close=True)
        else:
            self._finish(wire.reply(wire.error_message(message)))

    def _finish_with_raw(self, message: bytes, raw: bytes) -> None:
        """
        A bare JSON message, then raw bytes in later TLS records: Go's client decodes
        the JSON reading ahead up to 512 bytes and would lose raw bytes that came in
        the same record.
        """
        self._write(message)
        send_now = getattr(self.transport, "send_now", None)
        if send_now is not None:
            send_now()
        self._finish(raw)

    def _console(self, pipe: Any) -> None:
        """
        A console: C{{"Error":""}} in its own TLS record, then raw bytes both ways.
        """
        self._write(wire.message(wire.error_message("")))
        send_now = getattr(self.transport, "send_now", None)
        if send_now is not None:
            send_now()
        self.stage = "console"
        self.pipe = pipe
        self.producing = False  # the pipe takes the transport's producer slot
        pipe.attach(self._write, self._console_end, self.transport)
        rest = self.reader.take(len(self.reader))
        if rest:
            pipe.write(rest)

    def _console_end(self, farewell: bytes) -> None:
        """
        The VM side closed: the farewell, then close the connection.
        """
        if self.stage != "console":
            return
        if farewell:
            self._write(farewell)
        transport: Any = self.transport
        transport.unregisterProducer()
        self.stage = "closed"
        transport.loseConnection()

    def _finish(self, data: bytes, close: bool = False) -> None:
        self.outcome = (data, close)
        self._flush()

    def _flush(self) -> None:
        """
        Send what waits once the upload (if any) has fully arrived; after the call's
        outcome, take the next call.
        """
        if self.stage in ("upload", "closed"):
            return
        held, self.held = self.held, []
        for data in held:
            self._write(data)
        if self.outcome is None:
            return
        data, close = self.outcome
        self.outcome = None
        self._write(data)
        if close:
            self._close()
            return
        self._next_call()

    def _next_call(self) -> None:
        self.call = None
        self.upload = None
        self.stage = "method"
        self._enter(Phase.IDLE)
        self._advance()

    # Update streams (GetUpdates, WatchDhcp) ---------------------------------------------------

    def _stream(self, stream: Any) -> None:
        self.stream = stream
        self.stage = "updates"
        if not self.paused:
            self.resumeProducing()
        self._advance()  # keepalives that came with the method line

    def _end_stream(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()
            if self.managed_leases:
                # The leases this GetUpdates stream registered end with it (§1.9).
                self.managed_leases = False
                self._register_leases(RegisterExternalLeasesRequest())

    def pauseProducing(self) -> None:
        """
        The client is behind: take no more updates, calls or keepalives for now.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The client caught up: write what waits (a loop: many may be ready at once).
        """
        self.paused = False
        if self._pulling:
            return
        self._pulling = True
        try:
            while self.stream is not None and not (self.paused or self._waiting):
                self._waiting = True
                self.stream.get().addCallback(self._got)
        finally:
            self._pulling = False
        if self.stage in ("method", "updates") and not self.paused and len(self.reader):
            self._advance()  # calls and keepalives that waited while the client was behind

    def stopProducing(self) -> None:
        """
        The connection is going away.
        """
        self._end_stream()

    def _got(self, update: Any) -> None:
        self._waiting = False
        if self.stream is None or self.stage == "closed":
            return
        if update is None:
            call = self.call
            self._end_stream()
            if call is not None and call.method == "GetUpdates":
                self._close()  # dropped, or the daemon stops: the client redials
            else:
                self._next_call()
            return
        self._write(wire.message(encode_reply(self._healthy(update))))
        if not self._pulling and not self.paused:
            self.resumeProducing()

    @staticmethod
    def _healthy(update: Any) -> Any:
        """
        fleet-manager takes each Update's HealthStatus as the new health: say it.
        """
        if isinstance(update, Update) and not update.HealthStatus:
            return dataclasses.replace(update, HealthStatus=HEALTHY)
        return update

    def _ping(self, line: bytes) -> None:
        """
        A GetUpdatesRequest: apply its external leases, if any; answer with an Update.
        """
        call = self.call
        if call is None or call.method != "GetUpdates":
            return
        try:
            request = wire.decode_json(GetUpdatesRequest, line)
        except ValueError as e:
            self._fail_line(f"malformed GetUpdatesRequest: {e}")
            return
        leases = request.RegisterExternalLeasesRequest
        if leases is not None:
            self._register_leases(leases)
        self._write(wire.message(encode_reply(Update(HealthStatus=HEALTHY))))

    def _register_leases(self, leases: Any) -> None:
        try:
            call = self.dispatcher.admit(
                f"{SERVICE}.RegisterExternalLeases",
                self._caller(),
                self.secure,
                transport="srpc",
                use_method_powers=self.use_method_powers,
            )
        except HypervisorError:
            return  # refused and counted; the keepalive is still answered
        if leases.Addresses:
            self.managed_leases = True
        d = self.dispatcher.invoke(call, leases)
        d.addCallbacks(
            lambda _: self.dispatcher.finish(call, ok=True),
            lambda f: self.dispatcher.classify(call, f),
        )
