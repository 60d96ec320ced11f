# -*- test-case-name: tests.test_console_real -*-
"""
Consoles over HTTPS on port 6976: a WebSocket per console call and a page per VM.

WebSocket C{/ws/Hypervisor.<Method>} (autobahn's Twisted WebSocket), for the console
methods (L{hypervisor.api.RAW}: C{ConnectToVmSerialPort}, C{ConnectToVmConsole},
C{ConnectToVmManager}):

1. the opening handshake is refused (before anything else) when its C{Origin} is
   another site than the page's own (a page elsewhere cannot use the browser's client
   certificate to reach a console), when the client certificate is missing or
   refused (401) or the caller may not call the method (403, L{Dispatcher.admit});
2. the client's first message is the request JSON (text, at most the method's
   limit, due within L{REQUEST_TIMEOUT} seconds, else the WebSocket is closed with
   L{REQUEST_LATE}); the first server message is the response JSON (text), C{{"Error":""}}
   when the console is connected;
3. then binary messages both ways carry the console's raw bytes (at most
   L{MAX_FRAME} per message from the client); when the VM side closes, the serial
   port's C{"VM serial port closed\\n"} comes as a last binary message and the
   WebSocket is closed (1000). An error answer is followed by a close (1000).

Page C{/console?<IP>}: the VM's serial console in xterm.js (vendored in
C{web/static}, no external assets; C{tools/vendor-console-assets.sh} re-makes them)
for the VM's owners, decided by the client certificate as the method is (401/403
pages otherwise); its script (C{web/static/console.js}) opens the WebSocket above.
For a VM whose C{ConsoleType} is C{vnc} the page also shows its screen in noVNC
(C{web/static/vnc.js}, C{novnc.js}) over C{ConnectToVmConsole}'s WebSocket.
"""

from __future__ import annotations

import html
import ipaddress
from typing import Any, Optional

import txaio
from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from hypervisor.api import RAW, encode_reply
from hypervisor.auth import CertificateRefused, TrustStore
from hypervisor.console.model import ConsoleResponse, ConsoleType
from hypervisor.dispatch import Call, Dispatcher
from hypervisor.errors import HypervisorError
from hypervisor.netguard import Phase, find_guard
from hypervisor.tls import peer_identity
from web.headers import SECURITY_HEADERS

# autobahn logs every frame at debug level through the daemon's log observers.
txaio.set_global_log_level("info")  # type: ignore[attr-defined]

WS_PREFIX = "/ws/"
MAX_FRAME = 64 * 1024
REQUEST_TIMEOUT = 15.0
"""Seconds from the WebSocket's opening to its request message."""
REQUEST_LATE = 4008
"""The close code then (an application's: autobahn sends 1008 only itself)."""


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


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Console of VM {ip}</title>
<link rel="stylesheet" href="/static/style.css">
<link rel="stylesheet" href="/static/xterm.css">
</head>
<body data-ip="{ip}">
<h1>Serial console of VM {ip}</h1>
<p><a href="/showVM?{ip}">VM {ip}</a> &middot; state: <span id="console-status">connecting</span>
&middot; one connection at a time; closing this page disconnects</p>
<div id="terminal"></div>
<script src="/static/xterm.js"></script>
<script src="/static/console.js"></script>
{vnc}</body>
</html>
"""


VNC_SECTION = """<h2>Graphical console (VNC)</h2>
<p>state: <span id="vnc-status">connecting</span></p>
<div id="screen" style="width: 1024px; height: 768px"></div>
<script type="module" src="/static/vnc.js"></script>
"""


class ConsolePage(Resource):
    """
    C{/console?<IP>}: the serial console page of one VM, for its owners.
    """

    isLeaf = True

    def __init__(self, manager: Any, trust: TrustStore) -> None:
        super().__init__()
        self.manager = manager
        self.trust = trust

    def _answer(self, request: Any, status: int, body: str, content: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content)
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        request.setHeader(b"Cache-Control", b"no-store")
        return body.encode()

    def _error(self, request: Any, status: int, message: str) -> bytes:
        text = html.escape(message)
        page = (
            f"<!DOCTYPE html><html><body><h1>{status}</h1><p class='error'>{text}</p></body></html>"
        )
        return self._answer(request, status, page, b"text/html; charset=utf-8")

    def render_GET(self, request: Any) -> bytes:
        """
        The page, or 400/401/403/404.
        """
        if request.path.rstrip(b"/") != b"/console":
            return self._error(request, 404, "no such page; the console is /console?<IP>")
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        try:
            ip = str(ipaddress.IPv4Address(query.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            return self._error(request, 400, "usage: /console?<IP address of the VM>")
        try:
            secure, identity = peer_identity(request.channel.transport, self.trust)
        except CertificateRefused as e:
            return self._error(request, 401, str(e))
        if not secure or not identity.username:
            return self._error(request, 401, "the console needs HTTPS with a client certificate")
        try:
            vm = self.manager.ctx.table.get(ip)
            self.manager.ctx.check_owner(vm, identity, "ConnectToVmSerialPort")
        except HypervisorError as e:
            return self._error(request, e.status, str(e))
        vnc = VNC_SECTION if vm.info.ConsoleType == ConsoleType.VNC else ""
        page = PAGE.format(ip=ip, vnc=vnc)
        return self._answer(request, 200, page, b"text/html; charset=utf-8")

    render_HEAD = render_GET


def routes(manager: Any, dispatcher: Dispatcher, trust: TrustStore) -> dict[bytes, Any]:
    """
    The first path segments this module serves (for L{web.root.make_root}'s C{extra}).
    """
    return {b"ws": websocket_resource(dispatcher, trust), b"console": ConsolePage(manager, trust)}
