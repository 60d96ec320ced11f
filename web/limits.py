# -*- test-case-name: tests.test_rpc -*-
"""
Request size limits enforced before a body is stored.

Twisted stores a request body (in memory, or a temporary file past 100 KB) before
any resource sees it. L{LimitedRequest} looks at the path and C{Content-Length} as
soon as the headers are in: a body over the limit for its path is answered C{413}
at once and the connection closed, before a byte of it is read; a chunked body that
grows past the limit is discarded as it arrives and answered C{413}.
"""

from __future__ import annotations

import io
import json
from typing import Any, Optional

from twisted.web.server import Request

MAX_JSON = 1 << 20
MAX_UPLOAD = 1 << 40
UPLOAD_PATHS = (b"/rpc/Hypervisor.CreateVm",)


def limit_for(path: bytes) -> int:
    """
    The largest body accepted for C{path}.
    """
    return MAX_UPLOAD if path.split(b"?", 1)[0] in UPLOAD_PATHS else MAX_JSON


def _error(limit: int) -> bytes:
    return json.dumps({"Error": f"request body is over the {limit}-byte limit for "
                                "this path"}).encode() + b"\n"


class LimitedRequest(Request):
    """
    A request that refuses oversized bodies without storing them.
    """

    _limit = MAX_JSON
    _received = 0
    _too_large = False

    def gotLength(self, length: Optional[int]) -> None:
        """
        Decide from the headers: refuse at once when C{Content-Length} is too large.
        """
        path = getattr(self.channel, "_path", b"") or b""
        self._limit = limit_for(path)
        if length is not None and length > self._limit:
            self._too_large = True
            self.content = io.BytesIO()
            body = _error(self._limit)
            transport: Any = self.channel.transport
            transport.write(
                b"HTTP/1.1 413 Request Entity Too Large\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body) + body)
            transport.loseConnection()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """
        Store a chunk unless the body has grown past the limit (chunked bodies).
        """
        if self._too_large:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._too_large = True
            self.content = io.BytesIO()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        """
        Answer 413 for a chunked body that went over the limit; else as usual.
        """
        if self._too_large:
            self.setResponseCode(413)
            self.setHeader(b"Content-Type", b"application/json")
            self.write(_error(self._limit))
            self.finish()
            return
        super().process()
