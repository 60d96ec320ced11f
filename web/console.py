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

from twisted.web.resource import Resource

from hypervisor.auth import CertificateRefused, TrustStore
from hypervisor.console.model import ConsoleType
from hypervisor.dispatch import Dispatcher
from hypervisor.errors import HypervisorError
from hypervisor.tls import peer_identity
from web.headers import SECURITY_HEADERS

WS_PREFIX = "/ws/"
MAX_FRAME = 64 * 1024
REQUEST_TIMEOUT = 15.0
"""Seconds from the WebSocket's opening to its request message."""
REQUEST_LATE = 4008
"""The close code then (an application's: autobahn sends 1008 only itself)."""


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


class LazyWebSocket(Resource):
    """
    C{/ws/...}: autobahn's WebSocket resource (L{web.console_ws}), made on the first
    console request, so a daemon whose consoles are never used does not import
    autobahn (about 6 MiB of resident memory).
    """

    isLeaf = True

    def __init__(self, dispatcher: Dispatcher, trust: TrustStore) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.trust = trust
        self.resource: Optional[Resource] = None

    def render(self, request: Any) -> Any:
        """
        Hand the request to the WebSocket resource (made now if it is the first).
        """
        if self.resource is None:
            from web.console_ws import websocket_resource

            self.resource = websocket_resource(self.dispatcher, self.trust)
        return self.resource.render(request)


def routes(manager: Any, dispatcher: Dispatcher, trust: TrustStore) -> dict[bytes, Any]:
    """
    The first path segments this module serves (for L{web.root.make_root}'s C{extra}).
    """
    return {b"ws": LazyWebSocket(dispatcher, trust), b"console": ConsolePage(manager, trust)}
