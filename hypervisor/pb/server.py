# -*- test-case-name: tests.test_pb,tests.test_pb_access -*-
"""
The Perspective Broker admin service: a transport adapter over
L{hypervisor.dispatch.Dispatcher}, like HTTPS (L{web.rpc}) and SRPC
(L{hypervisor.srpc.protocol}).

For other listeners (the onion service), one stable entry point::

    listening = make_pb_factory(dispatcher, tls, reactor, admin=admin, sessions=sessions,
                                transport="pb-onion", limits=limits)
    endpoint.listen(listening.factory)

L{make_pb_factory} returns a L{PbListening}: C{factory} is the server factory
wrapped in TLS (client certificate required, verified as HTTPS and SRPC verify it)
and in a connection guard (L{hypervisor.netguard}: deadlines, caps); C{tls} is the
L{hypervisor.tlsreload.ReloadableTLS} it uses (certificate rotation reaches every
listener made from it); C{server} is the unwrapped L{PbServerFactory}; C{sessions}
the registry the admin surface lists. The daemon's C{pb} service
(L{PbService}, named C{pb} in L{tap.service}) keeps its L{PbListening} as
C{service.listening}, and its dispatcher, TLS, admin surface and sessions as
attributes of the same names, so another listener can share them.

How a connection goes:

1. TLS with the daemon's server certificate; the handshake asks for a client
   certificate and L{hypervisor.tls.peer_identity} verifies it when the handshake
   completes (the same function HTTPS and SRPC use: CA.pem grants methods,
   IdentityCA.pem only names, a client certificate can never issue another). No
   certificate, or one that does not verify: the first remote call answers C{401}
   with the reason and the connection is closed; nothing else is served, and a
   client that asks nothing is closed at the guard's deadline. There are no passwords.
2. The per-connection root object (L{SessionRoot}) is bound to that identity:
   - C{whoami()}: the identity the certificate proves;
   - C{call(method, request_chunks, observer=None)}: C{Hypervisor.<method>} through
     the dispatcher's admit (C{authorize}), decode and invoke; the reply is the same
     JSON bytes as over HTTPS (L{hypervisor.pb.wire}); progress messages
     (CreateVm, ReplaceVmImage) and stream messages (GetUpdates, WatchDhcp,
     TraceVmMetadata) go to C{observer.message(chunks)}, one at a time (each
     answer awaited: a slow client slows its stream, whose bounded queue drops it
     if it falls too far behind); the call's answer comes when the stream ends;
   - C{upload(method, request_chunks, observer=None)}: for methods whose request is
     followed by raw bytes (CreateVm with ImageDataSize/UserDataSize,
     ReplaceVmImage, ReplaceVmUserData): returns a L{Sink}; C{sink.write(bytes)}
     feeds the call's L{hypervisor.upload.UploadStream} and answers when there is
     room again; C{sink.finish()} answers with the reply;
   - C{console(method, request_chunks, observer)}: a console (ConnectToVmSerialPort,
     ConnectToVmConsole), its bytes both ways (L{hypervisor.pb.console});
   - C{cancel(observer)}: end the stream sending to that observer now;
   - C{admin(action, request_json)}: the runtime admin surface
     (L{hypervisor.pb.admin}), for admin certificates only.
3. Bounds: a PB message (one Banana expression) of at most L{MAX_MESSAGE} bytes;
   L{MAX_CALLS} calls in flight and L{MAX_STREAMS} streams and uploads open per
   connection; connections capped by the guard's L{LIMITS}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from hypervisor.api import METHODS, PROGRESS, RAW, UPDATES, encode_reply, raw_of
from hypervisor.auth import CertificateRefused, Identity, Unauthenticated
from hypervisor.dispatch import Call, Dispatcher
from hypervisor.errors import HypervisorError, InvalidRequest, Unavailable
from hypervisor.netguard import ConnectionGuard, Limits, Phase, find_guard, guard_factory
from hypervisor.pb.wire import CallError, chunks, join
from hypervisor.tls import peer_identity, tls_server_factory
from hypervisor.tlsreload import ReloadableTLS
from hypervisor.upload import UploadAborted, UploadStream

MAX_MESSAGE = max(spec.max_request for spec in METHODS.values()) + 64 * 1024
"""Bytes of one incoming PB message: the largest request JSON and some framing."""
MAX_REFUSED_MESSAGE = 4096
"""Bytes of one message on a connection without an accepted certificate."""
MAX_CALLS = 16
"""Calls waiting for their answer, per connection."""
MAX_STREAMS = 4
"""Streams (updates, progress) and uploads open at once, per connection."""
MAX_PROGRESS_QUEUED = 256
"""Progress messages waiting for a slow observer before older ones are dropped."""
MAX_SINKS = 64
"""Upload sinks a client may hold references to at once (PB keeps each until the
client drops its reference; PB itself allows 1024 references of any kind)."""

LIMITS = Limits(
    first_byte=10.0,
    handshake=10.0,
    headers=10.0,
    idle=900.0,
    max_idle_per_source=16,
    max_idle_total=64,
    max_connections=128,
)
"""The PB port's guard: a session without calls or streams may stay 15 minutes."""


def _fail(status: int, message: str) -> CallError:
    return CallError(f"{status} {message}")


@dataclass
class StreamInfo:
    """
    An open stream or upload of a session.
    """

    id: int
    method: str
    since: float


@dataclass
class Session:
    """
    One PB connection: who, from where, since when, and what it has open.
    """

    id: int
    transport: str
    address: str
    since: float
    identity: Optional[Identity] = None
    refused: Optional[HypervisorError] = None
    answered_refusal: bool = False
    calls: int = 0
    streams: dict[int, StreamInfo] = field(default_factory=dict)
    closers: dict[int, Callable[[], None]] = field(default_factory=dict)
    by_observer: dict[int, int] = field(default_factory=dict)  # observer luid -> stream
    broker: Optional["PbBroker"] = None

    def describe(self) -> dict[str, Any]:
        """
        JSON-ready, for C{list-clients}.
        """
        identity = self.identity
        return {
            "Id": self.id,
            "Identity": identity.username if identity is not None else "",
            "Groups": sorted(identity.groups) if identity is not None else [],
            "Transport": self.transport,
            "Address": self.address,
            "Since": self.since,
            "SinceUTC": _utc(self.since),
            "Refused": str(self.refused) if self.refused is not None else "",
            "Calls": self.calls,
            "Streams": [
                {"Id": s.id, "Method": s.method, "Since": s.since} for s in self.streams.values()
            ],
        }

    def disconnect(self) -> bool:
        """
        Close the connection (its streams end); False if it is already gone.
        """
        broker = self.broker
        if broker is None or broker.transport is None or broker.disconnected:
            return False
        broker.transport.loseConnection()
        return True


class Sessions:
    """
    Every open PB session of the daemon (all listeners), for the admin surface.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.open: dict[int, Session] = {}
        self._next = 1
        self._next_stream = 1

    def new(self, transport: str, address: str) -> Session:
        """
        Register a new connection.
        """
        session = Session(self._next, transport, address, self.clock.seconds())
        self._next += 1
        self.open[session.id] = session
        return session

    def new_stream_id(self) -> int:
        """
        A stream id unique in this daemon.
        """
        n = self._next_stream
        self._next_stream += 1
        return n

    def gone(self, session: Session) -> None:
        """
        The connection closed: end its streams and forget it.
        """
        self.open.pop(session.id, None)
        for close in list(session.closers.values()):
            close()
        session.closers.clear()
        session.streams.clear()
        session.broker = None


def _utc(seconds: float) -> str:
    import datetime

    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="seconds")


def _address(addr: Any) -> str:
    host = getattr(addr, "host", None)
    port = getattr(addr, "port", None)
    if host is None:
        return str(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@implementer(IHandshakeListener)
class PbBroker(pb.Broker):
    """
    A server broker that learns its caller from the TLS client certificate and
    bounds what a client may send.
    """

    log = Logger()
    factory: "PbServerFactory"  # type: ignore[assignment]

    def __init__(self, session: Session, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session = session
        self._message_bytes = 0
        self._max_message = MAX_REFUSED_MESSAGE

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake completed: verify the certificate and bind the identity.
        """
        session = self.session
        try:
            secure, identity = peer_identity(self.transport, self.factory.tls.trust)
        except CertificateRefused as e:
            session.refused = e
        else:
            if not secure or not identity.username:
                session.refused = Unauthenticated(
                    "the PB service needs a client certificate issued by CA.pem or "
                    "IdentityCA.pem (hyper-control presents the best one in -certDirectory)"
                )
            else:
                if self.factory.transport != "pb" and getattr(identity, "loopback", False):
                    # Another listener (an onion service): its connections all come
                    # from the local tor, not from a local caller.
                    identity = replace(identity, loopback=False)
                session.identity = identity
        if session.refused is not None:
            self.log.info(
                "PB connection from {address} refused: {why}",
                address=session.address,
                why=session.refused,
            )
            return
        self._max_message = MAX_MESSAGE
        self.log.info(
            "PB client {user} connected from {address} ({transport})",
            user=session.identity.username if session.identity else "?",
            address=session.address,
            transport=session.transport,
        )
        self.activity()

    def activity(self) -> None:
        """
        Tell the guard whether the session is busy (a call or stream open: no
        deadline) or idle (the idle deadline runs, and idle caps apply).
        """
        guard = find_guard(self.transport)
        if guard is None or self.session.identity is None:
            return
        busy = self.session.calls > 0 or bool(self.session.streams)
        guard.enter(Phase.BUSY if busy else Phase.IDLE)

    def dataReceived(self, data: bytes) -> None:
        """
        Bound the bytes of one PB message (Banana keeps an incomplete expression in
        memory): a message over the limit closes the connection.
        """
        self._message_bytes += len(data)
        if self._message_bytes > self._max_message:
            self._abort(f"a message over {self._max_message} bytes")
            return
        try:
            super().dataReceived(data)
        except Exception as e:  # noqa: BLE001 - malformed Banana: hostile or broken client
            self._abort(f"malformed PB data ({type(e).__name__}: {str(e)[:100]})")
            return
        if not self.listStack and not self.buffer:
            self._message_bytes = 0

    def _abort(self, why: str) -> None:
        self.log.info(
            "PB connection from {address} closed: {why}", address=self.session.address, why=why
        )
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        End the session's streams and uploads, then PB's own clean-up.
        """
        if self.session.identity is not None:
            self.log.info(
                "PB client {user} from {address} disconnected",
                user=self.session.identity.username,
                address=self.session.address,
            )
        self.factory.sessions.gone(self.session)
        super().connectionLost(reason)


@implementer(IPushProducer)
class Sink(pb.Referenceable):
    """
    The client's end of an upload: bytes written here go into the call's
    L{UploadStream}, with flow control (a write is answered once there is room).
    """

    def __init__(self, root: "SessionRoot", call: Call, upload: UploadStream) -> None:
        self.root = root
        self.call = call
        self.upload = upload
        self.paused = False
        self._room: Optional[Deferred[None]] = None
        self.discarded = False
        self._outcome: Optional[Any] = None  # the reply, or a Failure
        self._waiting: list[Deferred[Any]] = []
        self.finished = False
        upload.register_producer(self)
        upload.on_discard = self._discarded

    # IPushProducer (the upload stream pauses and resumes us) -----------------------

    def pauseProducing(self) -> None:
        """
        The volume writer is behind: the next write waits.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        There is room again: answer the waiting write.
        """
        self.paused = False
        room, self._room = self._room, None
        if room is not None:
            room.callback(None)

    def stopProducing(self) -> None:
        """
        Nothing to stop: the connection's end is seen by the session.
        """

    def _discarded(self) -> None:
        self.discarded = True
        self.resumeProducing()

    # Remote --------------------------------------------------------------------------

    def remote_write(self, data: bytes) -> "Deferred[None]":
        """
        More of the upload; answered when the stream can take more.
        """
        if self.finished:
            raise _fail(400, "the upload was finished already")
        if self.discarded:
            raise _fail(
                409, "the hypervisor stopped reading this upload: call finish() for the reply"
            )
        if not isinstance(data, bytes):
            raise _fail(400, "upload data must be bytes")
        try:
            self.upload.write(data)
        except UploadAborted as e:
            self.upload.fail(e)
            raise _fail(400, str(e))
        if self.paused and not self.discarded:
            self._room = Deferred()
            return self._room
        return succeed(None)

    def done(self, outcome: Any) -> None:
        """
        The call ended (a reply, or a Failure): answer L{remote_finish}.
        """
        self._outcome = outcome
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def remote_finish(self) -> "Deferred[dict[str, list[bytes]]]":
        """
        No more bytes: answered with the call's reply (or its error).
        """
        self.finished = True
        self.upload.finish()
        d: Deferred[Any] = Deferred()
        if self._outcome is None:
            self._waiting.append(d)
        else:
            d.callback(None)
        return d.addCallback(lambda _: self._outcome)


class SessionRoot(pb.Referenceable):
    """
    The root object of one PB connection, bound to its certificate's identity.
    """

    log = Logger()

    def __init__(self, factory: "PbServerFactory", session: Session) -> None:
        self.factory = factory
        self.session = session

    @property
    def dispatcher(self) -> Dispatcher:
        """
        The daemon's dispatcher.
        """
        return self.factory.dispatcher

    def _identity(self) -> Identity:
        session = self.session
        if session.identity is None:
            refused = session.refused or Unauthenticated("the TLS handshake has not completed")
            if not session.answered_refusal:
                # One answer with the reason, then the connection closes (once the
                # answer is written): a refused client cannot go on calling.
                session.answered_refusal = True
                self.dispatcher.classify(None, Failure(refused))
                self.factory.clock.callLater(0, session.disconnect)
            raise _fail(refused.status, str(refused))
        return session.identity

    def _broker(self) -> PbBroker:
        broker = self.session.broker
        if broker is None:
            raise _fail(503, "the connection is closing")
        return broker

    # whoami, methods -------------------------------------------------------------------

    def remote_whoami(self) -> dict[str, Any]:
        """
        The identity the client certificate proves.
        """
        identity = self._identity()
        users, groups = self.dispatcher.api.hypervisor_owners()
        return {
            "Username": identity.username,
            "Groups": sorted(identity.groups),
            "PermittedMethods": list(identity.method_patterns),
            "FullAuthority": identity.full_authority,
            "HypervisorOwner": identity.username in users or bool(identity.groups & groups),
            "Session": self.session.id,
        }

    # calls ---------------------------------------------------------------------------

    def _admit(self, method: str, request: Any, console: bool = False) -> tuple[Call, Any]:
        identity = self._identity()
        if not isinstance(method, str):
            raise _fail(400, "the method name must be a string")
        if self.session.calls >= MAX_CALLS:
            raise _fail(
                503,
                f"too many calls at once on this connection ({MAX_CALLS}): wait for answers",
            )
        name = method if method.startswith("Hypervisor.") else f"Hypervisor.{method}"
        try:
            call = self.dispatcher.admit(name, identity, True, transport="pb")
        except HypervisorError as e:
            raise _fail(e.status, str(e))
        if (call.spec.kind == RAW) != console:
            if console:
                message = f"{name} is not a console method: use call()"
            else:
                message = f"{name} is a console: use console() (hypervisor.pb.console)"
            status, message = self.dispatcher.classify(call, Failure(InvalidRequest(message)))
            raise _fail(status, message)
        try:
            try:
                data = join(request)
            except ValueError as e:
                raise InvalidRequest(f"malformed request: {e}")
            parsed = self.dispatcher.decode(call, data)
            if console or call.spec.kind in (PROGRESS, UPDATES) or call.spec.upload is not None:
                if len(self.session.streams) >= MAX_STREAMS:
                    raise Unavailable(
                        f"too many streams and uploads open on this connection "
                        f"({MAX_STREAMS}); end one first"
                    )
        except HypervisorError as e:
            status, message = self.dispatcher.classify(call, Failure(e))
            raise _fail(status, message)
        return call, parsed

    def _begin(self) -> None:
        self.session.calls += 1
        self._broker().activity()

    def _end(self, result: Any) -> Any:
        self.session.calls -= 1
        broker = self.session.broker
        if broker is not None:
            broker.activity()
        return result

    def remote_call(
        self, method: str, request: Any = b"", observer: Optional[pb.RemoteReference] = None
    ) -> "Deferred[dict[str, list[bytes]]]":
        """
        Call C{Hypervisor.<method>} with the request JSON (chunks); stream messages
        go to C{observer}. Methods with uploads need L{remote_upload}.
        """
        call, parsed = self._admit(method, request)
        if call.spec.upload is not None:
            size = self._upload_size(call, parsed)
            if size:
                self.dispatcher.classify(
                    call,
                    Failure(InvalidRequest(f"{call.method} announces {size} bytes: use upload()")),
                )
                raise _fail(400, f"{call.method} announces {size} bytes of data: use upload()")
        # No bytes follow: the service layer gets no upload, as over HTTPS.
        upload: Optional[UploadStream] = None
        if call.spec.kind in (PROGRESS, UPDATES) and observer is None:
            self.dispatcher.classify(
                call, Failure(InvalidRequest(f"{call.method} streams: pass an observer"))
            )
            raise _fail(400, f"{call.method} sends a stream of messages: pass an observer")
        self._begin()
        d = ensureDeferred(self._run(call, parsed, observer, upload))
        return d.addBoth(self._end)

    def remote_console(
        self, method: str, request: Any = b"", observer: Optional[pb.RemoteReference] = None
    ) -> "Deferred[dict[str, Any]]":
        """
        Open a console (C{ConnectToVmSerialPort}, C{ConnectToVmConsole}): the answer's
        C{console} is a L{hypervisor.pb.console.ConsoleChannel}; the VM's bytes go to
        C{observer.data(bytes)}, its end to C{observer.closed()}.
        """
        call, parsed = self._admit(method, request, console=True)
        if observer is None:
            self.dispatcher.classify(
                call, Failure(InvalidRequest(f"{call.method} needs an observer"))
            )
            raise _fail(400, f"{call.method} sends the console to an observer: pass one")
        self._begin()
        return ensureDeferred(self._console(call, parsed, observer)).addBoth(self._end)

    async def _console(
        self, call: Call, parsed: Any, observer: pb.RemoteReference
    ) -> dict[str, Any]:
        from hypervisor.console.model import ConsoleResponse
        from hypervisor.pb.console import ConsoleChannel

        try:
            pipe = await self.dispatcher.invoke(call, parsed)
        except BaseException as e:  # noqa: B036 - every failure is classified
            status, message = self.dispatcher.classify(call, Failure(e))
            raise _fail(status, message)
        self.dispatcher.finish(call, ok=True)
        if self.session.broker is None:
            pipe.close()  # the client went away meanwhile
            raise _fail(503, "the connection is closing")
        stream_id = self.factory.sessions.new_stream_id()
        self.session.streams[stream_id] = StreamInfo(
            stream_id, call.method, self.factory.clock.seconds()
        )
        self.session.closers[stream_id] = pipe.close

        def activity() -> None:
            broker = self.session.broker
            if broker is not None:
                broker.activity()

        def closed(_: Any) -> None:
            self.session.streams.pop(stream_id, None)
            self.session.closers.pop(stream_id, None)
            activity()

        pipe.closed.addCallback(closed)
        channel = ConsoleChannel(pipe, observer, activity)
        channel.start()
        return {"json": chunks(encode_reply(ConsoleResponse())), "console": channel}

    def _upload_size(self, call: Call, parsed: Any) -> int:
        try:
            return self.dispatcher.upload_size(call, parsed)
        except HypervisorError as e:
            status, message = self.dispatcher.classify(call, Failure(e))
            raise _fail(status, message)

    def remote_upload(
        self, method: str, request: Any = b"", observer: Optional[pb.RemoteReference] = None
    ) -> Sink:
        """
        Start a call whose request is followed by raw bytes; write them to the
        returned L{Sink}, then call its C{finish()} for the reply.
        """
        call, parsed = self._admit(method, request)
        if call.spec.upload is None:
            self.dispatcher.classify(
                call, Failure(InvalidRequest(f"{call.method} takes no upload"))
            )
            raise _fail(400, f"{call.method} takes no upload: use call()")
        if call.spec.kind == PROGRESS and observer is None:
            self.dispatcher.classify(
                call, Failure(InvalidRequest(f"{call.method} streams: pass an observer"))
            )
            raise _fail(400, f"{call.method} sends progress messages: pass an observer")
        size = self._upload_size(call, parsed)
        held = sum(isinstance(o.object, Sink) for o in self._broker().localObjects.values())
        if held >= MAX_SINKS:
            self.dispatcher.classify(
                call, Failure(Unavailable(f"{held} upload sinks held on this connection"))
            )
            raise _fail(
                503,
                f"this connection holds {held} upload sinks: drop references to finished "
                "ones (they are released when the client lets them go)",
            )
        upload = UploadStream(size)
        sink = Sink(self, call, upload)
        stream_id = self.factory.sessions.new_stream_id()
        self.session.streams[stream_id] = StreamInfo(
            stream_id, call.method + " upload", self.factory.clock.seconds()
        )

        def lost() -> None:
            upload.fail(UploadAborted("the client went away during the upload"))

        self.session.closers[stream_id] = lost
        self._begin()

        def done(result: Any) -> Any:
            self.session.streams.pop(stream_id, None)
            self.session.closers.pop(stream_id, None)
            return self._end(result)

        # The outcome is kept for finish(); a client that never asks leaves no
        # unhandled failure behind.
        ensureDeferred(self._run(call, parsed, observer, upload)).addBoth(done).addBoth(sink.done)
        return sink

    async def _run(
        self,
        call: Call,
        parsed: Any,
        observer: Optional[pb.RemoteReference],
        upload: Optional[UploadStream],
    ) -> dict[str, list[bytes]]:
        """
        Invoke, pump the stream or progress to the observer, and answer.
        """
        progress: Optional[_ProgressPump] = None
        if call.spec.kind == PROGRESS and observer is not None:
            progress = _ProgressPump(observer)
        try:
            result = await self.dispatcher.invoke(
                call, parsed, progress=progress.put if progress else None, upload=upload
            )
            if progress is not None:
                await progress.drain()
            if call.spec.kind == UPDATES:
                assert observer is not None
                await self._pump(call, result, observer)
                self.dispatcher.finish(call, ok=True)
                return {"json": [b""], "raw": []}
        except CallError:
            raise
        except BaseException as e:  # noqa: B036 - every failure is classified
            if upload is not None:
                upload.discard()
            status, message = self.dispatcher.classify(call, Failure(e))
            raise _fail(status, message)
        self.dispatcher.finish(call, ok=True)
        raw = raw_of(result)
        return {"json": chunks(encode_reply(result)), "raw": chunks(raw) if raw else []}

    async def _pump(self, call: Call, stream: Any, observer: pb.RemoteReference) -> None:
        """
        Each stream message to the observer, waiting for its answer before the next.
        """
        stream_id = self.factory.sessions.new_stream_id()
        self.session.streams[stream_id] = StreamInfo(
            stream_id, call.method, self.factory.clock.seconds()
        )
        self.session.closers[stream_id] = stream.close
        luid = getattr(observer, "luid", None)
        if isinstance(luid, int):
            self.session.by_observer[luid] = stream_id
        self._broker().activity()
        try:
            while True:
                message = await stream.get()
                if message is None or stream.closed:
                    return
                try:
                    keep = await observer.callRemote("message", chunks(encode_reply(message)))
                except (pb.PBConnectionLost, pb.DeadReferenceError):
                    return
                except Exception as e:  # noqa: BLE001 - the observer failed: end the stream
                    self.log.info(
                        "PB stream {method} ended: the observer failed ({why})",
                        method=call.method,
                        why=getattr(e, "remoteType", type(e).__name__),
                    )
                    return
                if keep is False:
                    return
        finally:
            stream.close()
            self.session.streams.pop(stream_id, None)
            self.session.closers.pop(stream_id, None)
            if isinstance(luid, int):
                self.session.by_observer.pop(luid, None)
            broker = self.session.broker
            if broker is not None:
                broker.activity()

    def remote_cancel(self, observer: Any) -> bool:
        """
        End the stream that sends to C{observer} now (its call then answers); False
        if there is none.
        """
        self._identity()
        stream_id = self.session.by_observer.get(getattr(observer, "luid", None))  # type: ignore[arg-type]
        close = self.session.closers.get(stream_id) if stream_id is not None else None
        if close is None:
            return False
        close()
        return True

    # admin ---------------------------------------------------------------------------

    def remote_admin(self, action: str, request: Any = b"") -> Any:
        """
        A runtime admin action (L{hypervisor.pb.admin}); admin certificates only.
        """
        identity = self._identity()
        admin = self.factory.admin
        if admin is None:
            raise _fail(503, "this PB service has no admin surface")
        try:
            data = join(request)
            body = json.loads(data) if data.strip() else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise _fail(400, f"malformed admin request: {e}")
        if not isinstance(body, dict):
            raise _fail(400, "an admin request is a JSON object")
        d = ensureDeferred(admin.run(action, body, identity, self.session))

        def failed(failure: Failure) -> Any:
            error = failure.value
            if isinstance(error, HypervisorError):
                raise _fail(error.status, str(error))
            self.log.failure("admin action {action} failed", failure, action=action)
            raise _fail(500, "internal error; the hypervisor's log has the details")

        return d.addCallback(lambda reply: chunks(json.dumps(reply).encode())).addErrback(failed)


class _ProgressPump:
    """
    Progress messages to an observer one at a time; at most L{MAX_PROGRESS_QUEUED}
    wait (older ones are dropped: they are only progress).
    """

    def __init__(self, observer: pb.RemoteReference) -> None:
        self.observer = observer
        self.queue: list[bytes] = []
        self.sending: Optional[Deferred[Any]] = None
        self.dropped = 0
        self.gone = False
        self._drained: list[Deferred[None]] = []

    def put(self, message: Any) -> None:
        """
        A progress message from the service layer.
        """
        if self.gone:
            return
        if len(self.queue) >= MAX_PROGRESS_QUEUED:
            self.queue.pop(0)
            self.dropped += 1
        self.queue.append(encode_reply(message))
        self._next()

    def _next(self) -> None:
        if self.sending is not None:
            return
        if not self.queue or self.gone:
            self.queue.clear()
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)
            return
        data = self.queue.pop(0)
        try:
            self.sending = self.observer.callRemote("message", chunks(data))
        except pb.DeadReferenceError:
            self.gone = True
            self._next()
            return

        def sent(result: Any) -> None:
            self.sending = None
            if isinstance(result, Failure):
                self.gone = True
            self._next()

        self.sending.addBoth(sent)

    def drain(self) -> "Deferred[None]":
        """
        Fires once every queued message was answered (or the observer is gone).
        """
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        self._next()
        return d


class PbServerFactory(pb.PBServerFactory):
    """
    Makes a L{PbBroker} and L{SessionRoot} per connection.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        tls: ReloadableTLS,
        clock: Any,
        *,
        admin: Optional[Any] = None,
        sessions: Optional[Sessions] = None,
        transport: str = "pb",
    ) -> None:
        super().__init__(pb.Root())
        self.dispatcher = dispatcher
        self.tls = tls
        self.clock = clock
        self.admin = admin
        self.sessions = sessions if sessions is not None else Sessions(clock)
        self.transport = transport

    def buildProtocol(self, addr: Any) -> Optional[PbBroker]:
        """
        A broker and a root bound to a new session; None (the connection is closed)
        while no server certificate is loaded.
        """
        if not self.tls.available:
            return None
        session = self.sessions.new(self.transport, _address(addr))
        broker = PbBroker(session, isClient=False, security=self.security)
        broker.factory = self
        session.broker = broker
        broker.setNameForLocal("root", SessionRoot(self, session))
        return broker


@dataclass
class PbListening:
    """
    What L{make_pb_factory} makes: listen with C{factory}.
    """

    factory: ConnectionGuard
    tls: ReloadableTLS
    server: PbServerFactory
    sessions: Sessions


def make_pb_factory(
    dispatcher: Dispatcher,
    tls: ReloadableTLS,
    reactor: Any,
    *,
    admin: Optional[Any] = None,
    sessions: Optional[Sessions] = None,
    transport: str = "pb",
    limits: Limits = LIMITS,
) -> PbListening:
    """
    The PB server factory for one listener: TLS (client certificate required,
    verified with C{tls.trust}) over L{PbServerFactory}, under a connection guard.

    @param admin: the runtime admin surface (L{hypervisor.pb.admin.AdminSurface}),
        or None for none.
    @param sessions: the registry shared with other listeners (a new one if None).
    @param transport: the name shown for these sessions (C{pb}, C{pb-onion}); for
        any name but C{pb}, a peer on a loopback address is not a local caller
        (an onion service's connections all come from the local tor): the
        identity's C{loopback} is cleared.
    @param limits: the guard's deadlines and caps (e.g. a larger per-source cap
        for an onion service, whose connections all come from the local tor).
    """
    server = PbServerFactory(
        dispatcher, tls, reactor, admin=admin, sessions=sessions, transport=transport
    )
    wrapped = tls_server_factory(tls, server, reactor)  # type: ignore[arg-type]
    return PbListening(guard_factory(wrapped, reactor, limits), tls, server, server.sessions)


class PbService(service.MultiService):
    """
    The daemon's C{pb} service: a TCP listener on C{-pbPortNum} for
    L{make_pb_factory}'s factory (none when the port is 0).
    """

    log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        tls: ReloadableTLS,
        reactor: Any,
        port: int,
        *,
        admin: Optional[Any] = None,
        interface: str = "",
    ) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.tls = tls
        self.reactor = reactor
        self.port = port
        self.sessions = Sessions(reactor)
        self.admin = admin
        if admin is not None:
            admin.sessions = self.sessions
        self.listening = make_pb_factory(
            dispatcher, tls, reactor, admin=admin, sessions=self.sessions
        )
        if port:
            self.listening.factory.tcp_server(port, interface).setServiceParent(self)

    def startService(self) -> None:
        """
        Listen; a port that cannot be had is logged, and the rest of the daemon runs.
        """
        try:
            super().startService()
        except CannotListenError as e:
            self.log.error(
                "PB admin service: cannot listen on port {port}: {why}; hyper-control "
                "-transport pb will not reach this hypervisor (choose -pbPortNum)",
                port=self.port,
                why=e.socketError,
            )


def identity_name(identity: Optional[Identity]) -> str:
    """
    A caller for log lines.
    """
    if identity is None:
        return "?"
    return identity.username + (
        f" (groups {','.join(sorted(identity.groups))})" if identity.groups else ""
    )


__all__ = [
    "CallError",
    "LIMITS",
    "MAX_CALLS",
    "MAX_MESSAGE",
    "MAX_STREAMS",
    "PbListening",
    "PbServerFactory",
    "PbService",
    "Sessions",
    "make_pb_factory",
]
