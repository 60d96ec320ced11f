# -*- test-case-name: tests.test_pb -*-
"""
A Python client for the hypervisor's Perspective Broker service (L{hypervisor.pb}),
for scripts and for C{hyper-control -transport pb}.

    from twisted.internet import defer, task
    from hypervisor.client import connect

    async def main(reactor):
        hv = await connect(reactor, "tcp:hv1.example:8787", "me.cert", "me.key",
                           ca_file="/etc/ssl/CA.pem")
        print(await hv.whoami())
        print(await hv.call("ListSubnets", {"Sort": True}))       # a dict
        subscription = hv.subscribe_updates(lambda update: print(sorted(update)))
        ...
        await subscription.stop()
        print(await hv.admin("ListClients"))
        await hv.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))

- L{connect}: a Twisted client endpoint string (C{tcp:HOST:PORT}, C{unix:PATH},
  C{tor:ADDRESS.onion:PORT} with txtorcon installed...) or an endpoint object, and a
  certificate pair; TLS always wraps the endpoint, presenting the certificate. The
  server's certificate is verified against C{ca_file} (for C{hostname}, by default
  the endpoint's host) when given, else not verified (as SmallStack's tools do).
- L{HypervisorClient.call}: C{Hypervisor.<Method>} with a request (a dict, a
  L{hypervisor.model} object or JSON bytes); returns the decoded reply (a dict), or
  with C{call_json} the reply's JSON bytes, the same bytes HTTPS answers. A
  refused or failed call raises L{CallFailed} with its status (401, 403, 404,
  409, 503...) and the hypervisor's sentence.
- L{HypervisorClient.stream}: CreateVm progress, GetUpdates, WatchDhcp,
  TraceVmMetadata: each message to a callback (flow control: the next message comes
  after the callback returns, or after the Deferred it returns fires; a callback
  returning C{False} ends the stream).
- L{HypervisorClient.upload}: methods followed by raw bytes (CreateVm with image
  data, ReplaceVmImage, ReplaceVmUserData): the bytes from byte strings or files,
  written with flow control.
- L{HypervisorClient.console}: a console (ConnectToVmSerialPort, ConnectToVmConsole):
  the VM's bytes to a callback (flow control as for streams), a L{Console} to write
  to and close (L{hypervisor.pb.console}).
- L{HypervisorClient.admin}: the runtime admin surface (L{hypervisor.pb.admin}).
"""

from __future__ import annotations

import json
from typing import IO, Any, Callable, Iterable, Optional, Union

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.spread import pb

from hypervisor import codec
from hypervisor.pb.wire import CHUNK, chunks, join, parse_error

OnMessage = Callable[[bytes], Any]

UPLOAD_CHUNK = CHUNK


class CallFailed(Exception):
    """
    A call was refused or failed on the hypervisor.

    @ivar status: HTTP's number for it (401 no or bad certificate, 403 denied, 404
        unknown, 400 malformed, 409 wrong state, 503 disabled or busy...).
    @ivar message: the hypervisor's sentence.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} ({status})" if status else message)
        self.status = status
        self.message = message


def _translate(failure: Failure) -> None:
    """
    A PB failure as L{CallFailed} (raised).
    """
    if failure.check(pb.PBConnectionLost, pb.DeadReferenceError):
        raise CallFailed(0, "the connection to the hypervisor was lost")
    if failure.check(CallFailed):
        failure.raiseException()
    status, message = parse_error(failure.getErrorMessage())
    raise CallFailed(status, message)


def _request_bytes(request: Any) -> bytes:
    if request is None:
        return b""
    if isinstance(request, bytes):
        return request
    if isinstance(request, dict):
        return json.dumps(request, separators=(",", ":")).encode()
    return codec.encode(request)


def endpoint_host(description: str) -> str:
    """
    The host an endpoint string names (for TLS verification), or "".
    """
    try:
        args, kwargs = endpoints._parse(description)
    except Exception:  # noqa: BLE001 - a malformed string fails later with its own error
        return ""
    if "host" in kwargs:
        return str(kwargs["host"])
    return str(args[1]) if len(args) > 1 else ""


class _Observer(pb.Referenceable):
    """
    The client-side object the hypervisor sends stream messages to.
    """

    def __init__(self, on_message: OnMessage) -> None:
        self.on_message = on_message
        self.stopped = False

    def remote_message(self, parts: Any) -> Any:
        """
        One message; answered (True: go on, False: end the stream) once C{on_message}
        returned, or once the Deferred it returned fired: the hypervisor sends the
        next message only then.
        """
        if self.stopped:
            return False
        try:
            keep = self.on_message(join(parts))
        except Exception:
            self.stopped = True
            raise
        if isinstance(keep, Deferred):
            return keep.addCallback(self._decided)
        return self._decided(keep)

    def _decided(self, keep: Any) -> bool:
        if keep is False:
            self.stopped = True
        return not self.stopped


class Subscription:
    """
    A running stream: C{done} fires when it ends (with b"", or with L{CallFailed});
    L{stop} ends it.
    """

    def __init__(
        self, root: pb.RemoteReference, observer: _Observer, done: "Deferred[bytes]"
    ) -> None:
        self._root = root
        self._observer = observer
        self.done = done

    def stop(self) -> "Deferred[bytes]":
        """
        End the stream now; fires (with b"") once the hypervisor ended it. A
        subscription stopped by its caller does not fail when the connection goes.
        """
        self._observer.stopped = True
        try:
            self._root.callRemote("cancel", self._observer).addErrback(lambda f: None)
        except pb.DeadReferenceError:
            pass
        return self.done


class _ConsoleObserver(pb.Referenceable):
    """
    The client-side object the hypervisor sends a console's bytes to.
    """

    def __init__(self, on_data: Callable[[bytes], Any], on_closed: Callable[[], Any]) -> None:
        self.on_data = on_data
        self.on_closed = on_closed

    def remote_data(self, data: bytes) -> Any:
        """
        VM bytes; answered once C{on_data} returned (or its Deferred fired): the
        hypervisor keeps only a few unanswered (flow control).
        """
        return self.on_data(data)

    def remote_closed(self) -> Any:
        """
        The VM side ended (after its farewell bytes).
        """
        return self.on_closed()


class Console:
    """
    An open console (L{HypervisorClient.console}): C{write} bytes to the VM, C{close}.
    """

    def __init__(self, channel: pb.RemoteReference) -> None:
        self.channel = channel

    def write(self, data: bytes) -> "Deferred[None]":
        """
        Bytes to the VM.
        """
        return self.channel.callRemote("write", data).addErrback(_translate)

    def close(self) -> "Deferred[None]":
        """
        End the console (the VM's console is free again).
        """
        try:
            return self.channel.callRemote("close").addErrback(lambda f: None)
        except pb.DeadReferenceError:
            return succeed(None)


class HypervisorClient:
    """
    One PB connection to a hypervisor, bound to the certificate presented.
    """

    def __init__(self, factory: pb.PBClientFactory, root: pb.RemoteReference) -> None:
        self.factory = factory
        self.root = root

    def _remote(self, name: str, *args: Any) -> "Deferred[Any]":
        try:
            d = self.root.callRemote(name, *args)
        except pb.DeadReferenceError:
            d = Deferred()
            d.errback(Failure(pb.DeadReferenceError("closed")))
        return d.addErrback(_translate)

    async def whoami(self) -> dict[str, Any]:
        """
        The identity the hypervisor sees (username, groups, grants, owner).
        """
        result: dict[str, Any] = await self._remote("whoami")
        return result

    async def call_json(
        self, method: str, request: Any = None, on_message: Optional[OnMessage] = None
    ) -> tuple[bytes, bytes]:
        """
        Call C{method} (C{ListVMs} or C{Hypervisor.ListVMs}); the reply's JSON bytes
        and any raw bytes after it (GetVmUserData).

        @raise CallFailed: refused or failed.
        """
        observer = _Observer(on_message) if on_message is not None else None
        reply = await self._remote("call", method, chunks(_request_bytes(request)), observer)
        return join(reply["json"]), join(reply.get("raw") or [])

    async def call(self, method: str, request: Any = None) -> dict[str, Any]:
        """
        Call C{method}; the reply decoded (a dict).

        @raise CallFailed: refused or failed.
        """
        data, _ = await self.call_json(method, request)
        value = json.loads(data) if data.strip() else {}
        return value if isinstance(value, dict) else {}

    async def stream(self, method: str, request: Any, on_message: OnMessage) -> bytes:
        """
        A streaming call: each message (JSON bytes) to C{on_message} until the stream
        ends (progress: the final reply is returned; GetUpdates and other endless
        streams: b"" when it ends, or when C{on_message} returned False).
        """
        data, _ = await self.call_json(method, request, on_message)
        return data

    async def console(
        self,
        method: str,
        request: Any,
        on_data: Callable[[bytes], Any],
        on_closed: Callable[[], Any],
    ) -> Console:
        """
        Open a console (C{ConnectToVmSerialPort}, C{ConnectToVmConsole}): the VM's
        bytes go to C{on_data} (in order; a Deferred it returns holds the next ones
        back), its end to C{on_closed}.

        @raise CallFailed: refused (not an owner, the VM not running, its console
            already taken...).
        """
        observer = _ConsoleObserver(on_data, on_closed)
        reply = await self._remote("console", method, chunks(_request_bytes(request)), observer)
        return Console(reply["console"])

    def subscribe_updates(self, on_update: Callable[[dict[str, Any]], Any]) -> Subscription:
        """
        GetUpdates: each Update (a dict) to C{on_update}; the first one is full.
        """
        observer = _Observer(lambda data: on_update(json.loads(data)))
        d = self._remote("call", "GetUpdates", chunks(b""), observer)
        d.addCallback(lambda reply: join(reply["json"]))

        def lost(failure: Failure) -> Any:
            error = failure.value
            if observer.stopped and isinstance(error, CallFailed) and not error.status:
                return b""  # stopped, then the connection closed first
            return failure

        d.addErrback(lost)
        return Subscription(self.root, observer, d)

    async def upload(
        self,
        method: str,
        request: Any,
        data: Iterable[Union[bytes, IO[bytes]]],
        on_message: Optional[OnMessage] = None,
    ) -> bytes:
        """
        A call followed by raw bytes (the request announces how many): C{data} is
        byte strings and/or files, sent in order with flow control; returns the
        reply's JSON bytes.

        @raise CallFailed: refused, or failed (also when the hypervisor stopped
            reading the upload: its reason).
        """
        observer = _Observer(on_message) if on_message is not None else None
        sink = await self._remote("upload", method, chunks(_request_bytes(request)), observer)
        stopped: Optional[CallFailed] = None
        try:
            for part in data:
                if isinstance(part, bytes):
                    pieces: Iterable[bytes] = chunks(part, UPLOAD_CHUNK) if part else []
                else:
                    pieces = iter(lambda f=part: f.read(UPLOAD_CHUNK), b"")  # type: ignore[misc]
                for piece in pieces:
                    await sink.callRemote("write", piece).addErrback(_translate)
        except CallFailed as e:
            if e.status != 409:
                raise
            stopped = e  # the hypervisor stopped reading: finish() has its reason
        try:
            reply = await sink.callRemote("finish").addErrback(_translate)
        except CallFailed:
            raise
        if stopped is not None and not reply:
            raise stopped
        return join(reply["json"])

    async def admin(self, action: str, request: Optional[dict[str, Any]] = None) -> Any:
        """
        A runtime admin action (L{hypervisor.pb.admin}); its reply decoded.
        """
        reply = await self._remote("admin", action, chunks(json.dumps(request or {}).encode()))
        return json.loads(join(reply))

    def close(self) -> "Deferred[None]":
        """
        Close the connection; fires once it is closed.
        """
        done: Deferred[None] = Deferred()
        broker = self.root.broker
        if broker.disconnected:
            done.callback(None)
            return done

        def lost() -> None:
            if not done.called:
                done.callback(None)

        broker.notifyOnDisconnect(lost)
        self.factory.disconnect()
        return done


class _Broker(pb.Broker):
    """
    A client broker that tells its factory when the connection is lost (endpoints,
    unlike connectors, do not): a TLS failure then fails C{getRootObject} with its
    reason instead of leaving it waiting.
    """

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        factory = self.factory
        if factory is not None:
            factory.clientConnectionLost(None, reason)


class _ClientFactory(pb.PBClientFactory):
    protocol = _Broker


async def connect(
    reactor: Any,
    endpoint: Union[str, IStreamClientEndpoint],
    cert_file: Optional[str],
    key_file: Optional[str],
    *,
    ca_file: str = "",
    hostname: str = "",
    timeout: float = 30.0,
) -> HypervisorClient:
    """
    Connect over TLS with a client certificate; fires with a L{HypervisorClient}.

    @param endpoint: a client endpoint string (C{tcp:HOST:8787}) or object; TLS is
        added on top.
    @param ca_file: verify the server's certificate against this CA file (for
        C{hostname}, default: the endpoint string's host); not verified if "".
    @raise CallFailed: cannot connect, or the certificate is refused (401).
    """
    from hypervisor.cli.client import CertPair, ClientTLSPolicy

    if isinstance(endpoint, str):
        host = hostname or endpoint_host(endpoint)
        try:
            plain = endpoints.clientFromString(reactor, endpoint)
        except (ValueError, KeyError, TypeError) as e:
            raise CallFailed(0, f"bad endpoint {endpoint!r}: {e}") from None
    else:
        host, plain = hostname or "localhost", endpoint
    pair = CertPair(cert_file, key_file, [], 0.0) if cert_file and key_file else None
    creator = ClientTLSPolicy(pair, ca_file).creatorForNetloc(host.encode() or b"localhost", 0)
    tls = endpoints.wrapClientTLS(creator, plain)
    factory = _ClientFactory()
    d = tls.connect(factory)
    root_d: Optional[Deferred[Any]] = None

    def too_slow() -> None:
        d.cancel()
        factory.disconnect()
        if root_d is not None and not root_d.called:
            root_d.cancel()

    timer = reactor.callLater(timeout, too_slow)
    try:
        await d
        root_d = factory.getRootObject()
        root = await root_d
    except Exception as e:  # noqa: BLE001 - shown to the user
        from hypervisor.cli.client import _describe

        factory.disconnect()
        raise CallFailed(0, f"cannot reach the hypervisor at {endpoint}: {_describe(e)}") from None
    finally:
        if timer.active():
            timer.cancel()
    client = HypervisorClient(factory, root)
    try:
        await client.whoami()  # a refused certificate fails here, with the hypervisor's reason
    except CallFailed:
        await client.close()
        raise
    return client


__all__ = ["CallFailed", "HypervisorClient", "Subscription", "connect", "endpoint_host"]
