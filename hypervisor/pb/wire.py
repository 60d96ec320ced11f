# -*- test-case-name: tests.test_pb -*-
"""
What the PB server and its clients agree on, besides Twisted's PB itself.

- JSON travels as lists of byte strings of at most L{CHUNK} bytes (Banana, PB's
  serialisation, refuses any string over 640 KiB), joined by the receiver: the
  bytes are exactly the JSON the HTTPS and SRPC transports send.
- A reply is C{{"json": [chunks], "raw": [chunks]}}: C{raw} holds the bytes that
  follow the JSON on other transports (GetVmUserData), usually none.
- A refused or failed call raises C{CallError} on the server; the client sees its
  message C{"<status> <sentence>"} (HTTP's numbers, as L{hypervisor.dispatch}
  classifies them) and L{parse_error} splits it.
- Observers (client-side C{pb.Referenceable}) get C{remote_message(chunks)} for
  each stream message; the server waits for each answer before sending the next
  (flow control), and an answer of C{False} ends the stream.
"""

from __future__ import annotations

import re
from typing import Iterable

from twisted.spread import pb

CHUNK = 256 * 1024
"""Largest byte string PB carries for us (Banana's limit is 640 KiB)."""

DEFAULT_PORT = pb.portno
"""Twisted's PB port, 8787 (-pbPortNum)."""


class CallError(pb.Error):
    """
    A call was refused or failed: C{"<status> <sentence>"}.
    """


def chunks(data: bytes, size: int = CHUNK) -> list[bytes]:
    """
    C{data} cut into strings PB can carry (one empty string for no data).
    """
    if not data:
        return [b""]
    return [data[i : i + size] for i in range(0, len(data), size)]


def join(parts: Iterable[bytes]) -> bytes:
    """
    The bytes of a chunk list (also accepts a single byte string).

    @raise ValueError: not a list of byte strings.
    """
    if isinstance(parts, bytes):
        return parts
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, bytes) for p in parts):
        raise ValueError("expected a list of byte strings")
    return b"".join(parts)


_ERROR = re.compile(r"^(\d{3}) (.*)$", re.S)


def parse_error(text: str) -> tuple[int, str]:
    """
    The status and sentence of a C{CallError}'s message (500 and the whole text when
    it has no status).
    """
    match = _ERROR.match(text)
    if match is None:
        return 500, text
    return int(match.group(1)), match.group(2)
