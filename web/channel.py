# -*- test-case-name: tests.test_netguard -*-
"""
The HTTP channel of port 6976: L{HTTPChannel} that tells the connection guard
(L{hypervisor.netguard}) where each request is, so that the guard can enforce the
header and keep-alive deadlines and knows which connections are busy.

The channel finds its guard with L{find_guard}, walking down its transport chain
(the guard's L{GuardedConnection} is the plain channel's transport, or the TLS
layer's transport); a channel without a guard (in tests) behaves as L{HTTPChannel}.
What it reports:

    - the TLS handshake completed: C{WAITING} (the first request is due within the
      first-byte deadline);
    - the first byte of a request: C{HEADERS} (the headers deadline runs from here,
      in total, however slowly the lines come);
    - all headers received: C{BUSY} (the request, its body upload and its response,
      a stream included, are not timed out or shed by the guard);
    - the request done: C{IDLE} (keep-alive) — or C{CLOSING}, which the guard sees
      itself when the channel closes the connection.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IHandshakeListener
from twisted.web.http import HTTPChannel
from zope.interface import implementer

from hypervisor.netguard import GuardedConnection, Phase, find_guard


@implementer(IHandshakeListener)
class HypervisorChannel(HTTPChannel):
    """
    An HTTP channel that reports its requests' progress to the connection guard.
    """

    _guard: Optional[GuardedConnection] = None
    _in_request = False
    _peer: Any = None
    _host: Any = None

    def getPeer(self) -> Any:
        """
        The peer's address, asked of the transport once: each request asks for it,
        and the question goes down through the TLS and guard wrappers to a new
        address object each time.
        """
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    def getHost(self) -> Any:
        """
        Our address, asked of the transport once (as L{getPeer}).
        """
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionMade(self) -> None:
        """
        Find the guard (if any) below this channel.
        """
        super().connectionMade()
        self._guard = find_guard(self.transport)

    def _enter(self, phase: Phase) -> None:
        if self._guard is not None:
            self._guard.enter(phase)

    def handshakeCompleted(self) -> None:
        """
        TLS is up: the first request is now due.
        """
        self._enter(Phase.WAITING)

    def dataReceived(self, data: bytes) -> None:
        """
        The first byte of a request starts its headers deadline.

        Bytes that arrive once the connection is closing are dropped: TLS still
        hands up the records it had already received after C{loseConnection} (a
        plain TCP transport stops reading), and L{HTTPChannel} would go on parsing
        them after it refused the request — e.g. the headers after a malformed
        C{Content-Length}, reaching a body with no transfer decoder (an
        AttributeError and a logged traceback, found by C{bench/fuzz_http.py}).
        """
        if getattr(self.transport, "disconnecting", False):
            return
        if data and not self._in_request:
            self._in_request = True
            self._enter(Phase.HEADERS)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        """
        The headers are in: the request is being processed.
        """
        self._enter(Phase.BUSY)
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        """
        The request is done: idle until the next one (pipelined data, if any, starts
        it at once; a connection that is not persistent closes).
        """
        self._in_request = False
        self._enter(Phase.IDLE)
        super().requestDone(request)
