# -*- test-case-name: tests.test_srpc_codec -*-
"""
SRPC's wire without I/O (reference §12.1-12.3), shared by the server
(L{hypervisor.srpc.protocol}) and the client (L{hypervisor.srpc.client}).

A connection starts with a plaintext head, C{CONNECT <path>[?query] HTTP/1.0} and an
empty line (Go sends bare LF; CRLF is accepted). The server answers one of the status
heads below. On C{/_SRPC_/TLS/JSON} TLS then starts on the same connection, the
client being the TLS client. Inside, each call is:

    C: Service.Method\\n         ("" is a ping, answered "\\n")
    S: \\n                        accepted | "<error text>\\n" refused
    -- request/reply --
    C: <JSON>\\n
    S: \\n<JSON>\\n               | "<error text>\\n" (the server then closes)
    -- streams: bare JSON values + "\\n", raw bytes where the method has them --

Every buffer here is bounded: L{LineReader} refuses a line longer than its limit
before it holds more than the limit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from hypervisor import codec
from hypervisor.codec import field
from hypervisor.model import RegisterExternalLeasesRequest

SRPC_TLS_JSON = "/_SRPC_/TLS/JSON"
SRPC_UNSECURED_JSON = "/_SRPC_/unsecured/JSON"
GOB_TLS = "/_go_TLS_SRPC_/"
GOB_PLAIN = "/_goSRPC_/"
ENDPOINTS_WITH_CERTS = (GOB_TLS, SRPC_TLS_JSON, GOB_PLAIN, SRPC_UNSECURED_JSON)
"""The order the Go client tries endpoints in (client.go:120): only a 404 advances."""

CONNECTED = b"HTTP/1.0 200 Connected to Go SRPC\n\n"
NOT_FOUND = b"HTTP/1.0 404 Not Found\n\n"
BAD_REQUEST = b"HTTP/1.0 400 Bad Request\n\n"
UNAUTHORIZED = b"HTTP/1.0 401 Unauthorized\n\n"
METHOD_NOT_ALLOWED = b"HTTP/1.0 405 Method Not Allowed\n\n"

MAX_HEAD = 4096
"""The CONNECT head (request line and any header lines) in bytes."""
MAX_METHOD_LINE = 1024
"""A method line in bytes."""
CONNECT_PREFIX = b"CONNECT "
DO_NOT_USE_METHOD_POWERS = "doNotUseMethodPowers"
LOCAL_UPGRADE = ".LocalUpgradeToUnix"
PING = ""

ACCESS_DENIED = "access to method denied"
"""The Go server's method-line refusal (lib/srpc/server.go findMethod)."""


class FramingError(ValueError):
    """
    Bytes that break the framing (the connection is answered and closed).
    """


class LineTooLong(FramingError):
    """
    A line went past its limit without a newline.
    """


@dataclass(frozen=True)
class ConnectRequest:
    """
    A parsed CONNECT head.

    @ivar path: the path without the query.
    @ivar use_method_powers: False when the query says C{doNotUseMethodPowers=true}.
    """

    path: str
    use_method_powers: bool = True


def head_complete(data: bytes) -> int:
    """
    The length of the head in C{data} (up to and including its empty line), or -1.
    """
    best = -1
    for end in (b"\n\n", b"\r\n\r\n", b"\n\r\n"):
        i = data.find(end)
        if i >= 0 and (best < 0 or i + len(end) < best):
            best = i + len(end)
    return best


def parse_connect(head: bytes) -> ConnectRequest:
    """
    Parse C{CONNECT <path>[?query] HTTP/1.x} (the first line of C{head}).

    @raise FramingError: not such a line.
    """
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or parts[0] != b"CONNECT" or parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise FramingError("not a CONNECT <path> HTTP/1.x line")
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise FramingError("the path is not ASCII") from None
    if not target.startswith("/"):
        raise FramingError("the path does not start with /")
    path, _, query = target.partition("?")
    use_powers = True
    for item in query.split("&") if query else ():
        key, _, value = item.partition("=")
        if key == DO_NOT_USE_METHOD_POWERS and value.lower() in ("true", "1"):
            use_powers = False
    return ConnectRequest(path, use_powers)


def connect_line(path: str, do_not_use_method_powers: bool = False) -> bytes:
    """
    What the Go client sends (client.go:222): bare LF.
    """
    query = "?doNotUseMethodPowers=true" if do_not_use_method_powers else ""
    return f"CONNECT {path}{query} HTTP/1.0\n\n".encode("ascii")


def status_line(head: bytes) -> str:
    """
    C{"200 Connected to Go SRPC"} from C{"HTTP/1.0 200 Connected to Go SRPC\\n\\n"}.

    @raise FramingError: not an HTTP status line.
    """
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    if not line.startswith(b"HTTP/1."):
        raise FramingError(f"malformed HTTP response {line[:80]!r}")
    return line.split(b" ", 1)[1].decode("latin-1") if b" " in line else ""


class LineReader:
    """
    Bytes in, lines and raw byte counts out, never holding more than asked for: a
    line longer than its limit is refused (L{LineTooLong}) as soon as the buffer
    passes the limit.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """
        Bytes from the connection.
        """
        self.buffer += data

    def __len__(self) -> int:
        return len(self.buffer)

    def line(self, limit: int) -> Optional[bytes]:
        """
        The next line without its C{\\n} (and C{\\r}), or None if it has not all arrived.

        @raise LineTooLong: no newline within C{limit} bytes.
        """
        i = self.buffer.find(b"\n", 0, limit + 1)
        if i < 0:
            if len(self.buffer) > limit:
                raise LineTooLong(f"no newline within {limit} bytes")
            return None
        line = bytes(self.buffer[:i])
        del self.buffer[: i + 1]
        return line[:-1] if line.endswith(b"\r") else line

    def take(self, n: int) -> bytes:
        """
        Up to C{n} raw bytes of what is buffered.
        """
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


def method_line(name: str) -> bytes:
    """
    The client's method line.
    """
    return name.encode("utf-8") + b"\n"


def split_method(line: bytes) -> tuple[str, str]:
    """
    C{(service, method)} of a method line (C{"Hypervisor.ListVMs"}); the service is
    what comes before the last dot.

    @raise FramingError: not UTF-8 text, or control characters.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise FramingError("the method line is not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise FramingError("the method line holds control characters")
    service, _, method = text.rpartition(".")
    return service, method


def unknown_service(service: str) -> str:
    """
    The Go server's refusal of an unknown receiver (as for C{.LocalUpgradeToUnix}).
    """
    return f"unknown service: {service}"


def unknown_method(service: str, method: str) -> str:
    """
    The Go server's refusal of an unknown method of a known receiver.
    """
    return f"{service}: unknown method: {method}"


def error_line(message: str) -> bytes:
    """
    A refusal or failure line: the text on one line (newlines would break framing).
    """
    text = message.replace("\r", " ").replace("\n", " ")
    if not text.strip():
        text = "error"
    return text.encode("utf-8", "replace") + b"\n"


def error_message(message: str) -> bytes:
    """
    A JSON message carrying only C{Error} (Go decodes it into any response type).
    """
    return b'{"Error":' + json.dumps(message).encode("ascii") + b"}"


def reply(encoded: bytes) -> bytes:
    """
    A request/reply answer: the status newline and the JSON, in one write.
    """
    return b"\n" + encoded + b"\n"


def message(encoded: bytes) -> bytes:
    """
    A stream message: the JSON and its newline.
    """
    return encoded + b"\n"


@dataclass
class GetUpdatesRequest:
    """
    What a GetUpdates client sends on its stream (fleet-manager's keepalive): each
    one is answered with an Update; a non-null C{RegisterExternalLeasesRequest} also
    replaces the external leases (with RegisterExternalLeases' access rule).
    """

    RegisterExternalLeasesRequest: Optional[RegisterExternalLeasesRequest] = field(default=None)


def decode_json(cls: type, data: bytes) -> Any:
    """
    A JSON line into C{cls} (the codec's rules: Go field names, case-insensitive,
    unknown fields ignored).

    @raise codec.DecodeError: malformed.
    """
    return codec.decode(cls, data.strip() or b"{}")
