# -*- test-case-name: tests.test_srpc_protocol -*-
"""
The plain GET side routes Go's SRPC servers register next to their CONNECT endpoints
(lib/srpc): C{/_goSRPC_/listMethods} (every C{Service.Method}, one a line, sorted),
C{/_goSRPC_/listPublicMethods} (those any authenticated caller may call) and
C{/_goSRPC_/getHostname}. Text, no body taken, any other path under C{/_goSRPC_/} 404.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.web.resource import Resource

from hypervisor.api import ACCESS, PUBLIC
from web.headers import SECURITY_HEADERS


def method_lines(public_only: bool = False) -> bytes:
    """
    C{Hypervisor.<Method>} lines, sorted.
    """
    names = sorted(m for m, access in ACCESS.items() if access == PUBLIC or not public_only)
    return "".join(f"Hypervisor.{m}\n" for m in names).encode()


class SrpcRoutes(Resource):
    """
    C{/_goSRPC_/...} (a leaf: it sees the whole path, as L{web.root.PathDispatch}
    leaves it).
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        """
        The listing or the hostname; 404 for anything else.
        """
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        path = request.path.rstrip(b"/")
        if path == b"/_goSRPC_/listMethods":
            return method_lines()
        if path == b"/_goSRPC_/listPublicMethods":
            return method_lines(public_only=True)
        if path == b"/_goSRPC_/getHostname":
            return socket.gethostname().encode() + b"\n"
        request.setResponseCode(404)
        return b"404 page not found\n"

    render_HEAD = render_GET
