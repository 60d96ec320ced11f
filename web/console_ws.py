# -*- test-case-name: tests.test_console_real -*-
"""
The console WebSocket of L{web.console} (its module docstring says what it does):
autobahn's Twisted WebSocket, imported only when a console is first asked for
(L{web.console.LazyWebSocket}).
"""

from __future__ import annotations

from typing import Any, Optional

import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger
from twisted.python.failure import Failure

from hypervisor.api import RAW, encode_reply
from hypervisor.auth import CertificateRefused, TrustStore
from hypervisor.console.model import ConsoleResponse
from hypervisor.dispatch import Call, Dispatcher
from hypervisor.errors import HypervisorError
from hypervisor.netguard import Phase, find_guard
from hypervisor.tls import peer_identity

# autobahn logs every frame at debug level through the daemon's log observers.
txaio.set_global_log_level("info")  # type: ignore[attr-defined]

from web.console import MAX_FRAME, REQUEST_LATE, REQUEST_TIMEOUT, WS_PREFIX

# autobahn logs every frame at debug level through the daemon's log observers.
txaio.set_global_log_level("info")  # type: ignore[attr-defined]


class ConsoleSocket(WebSocketServerProtocol):
    """
    One console WebSocket (module docstring).
    """

    log = Logger()
    factory: "ConsoleSocketFactory"

    def __init__(self) -> None:
        super().__init__()
        self.call: Optional[Call] = None
        self.pipe: Any = None
        self.stage = "handshake"
        self.request_timer: Any = None

    def onConnect(self, request: Any) -> None:
        """
        Decide before the WebSocket opens: origin, certificate, method access.
        """
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin != f"https://{host}":
            raise ConnectionDeny(403, "a console WebSocket from another site is refused")
        path = request.path
        if not path.startswith(WS_PREFIX):
            raise ConnectionDeny(404, "console WebSockets are /ws/Hypervisor.<Method>")
        dispatcher = self.factory.dispatcher
        try:
            secure, identity = peer_identity(self.transport, self.factory.trust)
        except CertificateRefused as e:
            dispatcher.classify(None, Failure(e))
            raise ConnectionDeny(401, str(e)) from None
        try:
            call = dispatcher.admit(path[len(WS_PREFIX) :], identity, secure, transport="websocket")
        except HypervisorError as e:
            raise ConnectionDeny(e.status, str(e)) from None
        if call.spec.kind != RAW:
            dispatcher.finish(call, ok=False)
            raise ConnectionDeny(400, f"{call.method} is not a console method: POST it to /rpc")
        self.call = call
        guard = find_guard(self.transport)
        if guard is not None:
            guard.enter(Phase.BUSY)  # a console may be quiet for long
        self.stage = "request"

    def onOpen(self) -> None:
        """
        The request is due within L{REQUEST_TIMEOUT} seconds.
        """
        reactor = self.factory.dispatcher.reactor
        self.request_timer = reactor.callLater(REQUEST_TIMEOUT, self._no_request)

    def _no_request(self) -> None:
        self.request_timer = None
        if self.stage == "request":
            self.stage = "done"
            if self.call is not None:
                self.factory.dispatcher.finish(self.call, ok=False)
            self.sendClose(REQUEST_LATE, f"no request within {REQUEST_TIMEOUT:.0f} s")

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        """
        The request (first message), then console input.
        """
        if self.stage == "console":
            self.pipe.write(payload)
            return
        if self.stage != "request":
            return  # input before the console is connected is dropped
        self.stage = "connecting"
        if self.request_timer is not None and self.request_timer.active():
            self.request_timer.cancel()
        call = self.call
        assert call is not None
        dispatcher = self.factory.dispatcher
        try:
            request = dispatcher.decode(call, payload)
        except HypervisorError as e:
            _, message = dispatcher.classify(call, Failure(e))
            self._refuse(message)
            return
        d = dispatcher.invoke(call, request)
        d.addCallbacks(self._connected, self._failed)
        d.addErrback(lambda f: self.log.failure("console WebSocket", f))

    def _connected(self, pipe: Any) -> None:
        assert self.call is not None
        self.factory.dispatcher.finish(self.call, ok=True)
        if self.stage != "connecting":
            pipe.close()  # the client went away meanwhile
            return
        self.sendMessage(encode_reply(ConsoleResponse()), isBinary=False)
        self.stage = "console"
        self.pipe = pipe
        pipe.attach(self._output, self._ended, self.transport)

    def _failed(self, failure: Failure) -> None:
        _, message = self.factory.dispatcher.classify(self.call, failure)
        if self.stage == "connecting":
            self._refuse(message)

    def _refuse(self, message: str) -> None:
        self.stage = "done"
        self.sendMessage(encode_reply(ConsoleResponse(Error=message)), isBinary=False)
        self.sendClose(1000)

    def _output(self, data: bytes) -> None:
        if self.stage == "console":
            self.sendMessage(data, isBinary=True)

    def _ended(self, farewell: bytes) -> None:
        if self.stage != "console":
            return
        self.stage = "done"
        if farewell:
            self.sendMessage(farewell, isBinary=True)
        transport: Any = self.transport
        if transport is not None:
            try:
                transport.unregisterProducer()
            except (AttributeError, RuntimeError):
                pass
        self.sendClose(1000)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        """
        The WebSocket closed: close the VM side.
        """
        self.stage = "done"
        if self.request_timer is not None and self.request_timer.active():
            self.request_timer.cancel()
        pipe, self.pipe = self.pipe, None
        if pipe is not None:
            pipe.close()


class ConsoleSocketFactory(WebSocketServerFactory):
    """
    Makes L{ConsoleSocket}s over the daemon's dispatcher and trust store.
    """

    protocol = ConsoleSocket  # type: ignore[assignment]

    def __init__(self, dispatcher: Dispatcher, trust: TrustStore) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.trust = trust
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_FRAME,
            maxMessagePayloadSize=MAX_FRAME,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=2,
            autoPingInterval=30,
            autoPingTimeout=30,
        )


def websocket_resource(dispatcher: Dispatcher, trust: TrustStore) -> Any:
    """
    The resource of C{/ws/...}.
    """
    return WebSocketResource(ConsoleSocketFactory(dispatcher, trust))
