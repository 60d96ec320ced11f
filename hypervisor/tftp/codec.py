# -*- test-case-name: tests.test_tftp_codec -*-
"""
TFTP packets as pure functions over bytes: RFC 1350 (RRQ, WRQ, DATA, ACK, ERROR) and
the RFC 2347 option extension (options in requests, OACK).

L{decode} validates everything it returns and raises only L{MalformedPacket};
L{encode} is its inverse (C{decode(encode(p)) == p}).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Union

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

# RFC 1350 error codes (and RFC 2347's 8).
ERR_NOT_DEFINED = 0
ERR_FILE_NOT_FOUND = 1
ERR_ACCESS_VIOLATION = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL_OPERATION = 4
ERR_UNKNOWN_TID = 5
ERR_FILE_EXISTS = 6
ERR_NO_SUCH_USER = 7
ERR_OPTION_REFUSED = 8

MODES = ("netascii", "octet", "mail")
MAX_BLOCK = 65535
MAX_DATA = 65464  # RFC 2348's largest blksize
MAX_PACKET = MAX_DATA + 4
MAX_TEXT = 512  # a file name, mode, option name or value, error message
# The largest packet a reading client sends that decodes (an ERROR with the longest
# message): a transfer's socket reads no more (a longer packet, cut, still fails or
# is still not an ACK), which spares allocating MAX_PACKET bytes per ACK.
MAX_CLIENT_PACKET = 4 + MAX_TEXT + 1
MAX_OPTIONS = 32

_HEADER = struct.Struct("!HH")


class MalformedPacket(ValueError):
    """
    Bytes that are not a valid TFTP packet; the message says what is wrong.
    """


@dataclass(frozen=True)
class Request:
    """
    A read (RRQ) or write (WRQ) request: file name, transfer mode (lower case) and
    options (names lower case, in the order sent; values as sent).
    """

    opcode: int
    filename: str
    mode: str = "octet"
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Data:
    """
    A DATA packet: block number (0-65535, wrapping) and up to L{MAX_DATA} bytes.
    """

    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    """
    An ACK of block C{block} (0 acknowledges a request's OACK).
    """

    block: int


@dataclass(frozen=True)
class Error:
    """
    An ERROR packet: code and message.
    """

    code: int
    message: str = ""


@dataclass(frozen=True)
class OptionAck:
    """
    An OACK: the options the server accepted, with their values.
    """

    options: dict[str, str] = field(default_factory=dict)


Packet = Union[Request, Data, Ack, Error, OptionAck]


def _text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_TEXT:
        raise MalformedPacket(f"{what} is longer than {MAX_TEXT} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what} is not UTF-8") from None


def _strings(body: bytes, what: str) -> list[bytes]:
    """
    NUL-terminated strings filling C{body} exactly.
    """
    if not body.endswith(b"\0"):
        raise MalformedPacket(f"{what}: the last string is not NUL-terminated")
    return body[:-1].split(b"\0")


def _options(parts: list[bytes]) -> dict[str, str]:
    if len(parts) % 2:
        raise MalformedPacket("an option has no value")
    if len(parts) // 2 > MAX_OPTIONS:
        raise MalformedPacket(f"more than {MAX_OPTIONS} options")
    options: dict[str, str] = {}
    for i in range(0, len(parts), 2):
        name = _text(parts[i], "an option name").lower()
        if not name:
            raise MalformedPacket("an option name is empty")
        if name in options:
            raise MalformedPacket(f"option {name!r} is given twice")
        options[name] = _text(parts[i + 1], f"the value of option {name!r}")
    return options


def decode(data: bytes) -> Packet:
    """
    The packet in C{data}.

    @raise MalformedPacket: C{data} is not a valid packet.
    """
    if len(data) < 4:
        raise MalformedPacket(f"a packet has at least 4 bytes, not {len(data)}")
    if len(data) > MAX_PACKET:
        raise MalformedPacket(f"a packet has at most {MAX_PACKET} bytes, not {len(data)}")
    opcode, number = _HEADER.unpack_from(data)
    if opcode == ACK:
        if len(data) != 4:
            raise MalformedPacket(f"an ACK has 4 bytes, not {len(data)}")
        return Ack(number)
    if opcode == DATA:
        return Data(number, bytes(data[4:]))
    if opcode in (RRQ, WRQ):
        parts = _strings(bytes(data[2:]), "request")
        if len(parts) < 2:
            raise MalformedPacket("a request needs a file name and a mode")
        filename = _text(parts[0], "the file name")
        if not filename:
            raise MalformedPacket("the file name is empty")
        mode = _text(parts[1], "the mode").lower()
        if mode not in MODES:
            raise MalformedPacket(f"mode {mode[:20]!r} is not one of {', '.join(MODES)}")
        return Request(opcode, filename, mode, _options(parts[2:]))
    if opcode == ERROR:
        parts = _strings(bytes(data[4:]), "error")
        if len(parts) != 1:
            raise MalformedPacket("an error message has a NUL inside")
        return Error(number, _text(parts[0], "the error message"))
    if opcode == OACK:
        parts = _strings(bytes(data[2:]), "option acknowledgement")
        return OptionAck(_options(parts))
    raise MalformedPacket(f"unknown opcode {opcode}")


def _check_text(value: str, what: str, empty: bool = True) -> bytes:
    raw = value.encode("utf-8")
    if b"\0" in raw or len(raw) > MAX_TEXT or (not empty and not raw):
        raise ValueError(f"{what} {value[:40]!r} cannot be sent")
    return raw


def _encode_options(options: dict[str, str]) -> bytes:
    out = bytearray()
    for name, value in options.items():
        out += _check_text(name, "option name", empty=False) + b"\0"
        out += _check_text(value, "option value") + b"\0"
    return bytes(out)


def encode(packet: Packet) -> bytes:
    """
    The bytes of C{packet}.

    @raise ValueError: a field cannot be sent (a NUL in a string, a number out of range).
    """
    if isinstance(packet, Data):
        if len(packet.payload) > MAX_DATA:
            raise ValueError(f"a DATA payload has at most {MAX_DATA} bytes")
        return _HEADER.pack(DATA, packet.block) + packet.payload
    if isinstance(packet, Ack):
        return _HEADER.pack(ACK, packet.block)
    if isinstance(packet, Error):
        return _HEADER.pack(ERROR, packet.code) + _check_text(packet.message, "message") + b"\0"
    if isinstance(packet, OptionAck):
        if not packet.options:
            raise ValueError("an OACK carries at least one option")
        return struct.pack("!H", OACK) + _encode_options(packet.options)
    if isinstance(packet, Request):
        if packet.opcode not in (RRQ, WRQ):
            raise ValueError(f"opcode {packet.opcode} is not a request")
        return (
            struct.pack("!H", packet.opcode)
            + _check_text(packet.filename, "file name", empty=False)
            + b"\0"
            + _check_text(packet.mode, "mode", empty=False)
            + b"\0"
            + _encode_options(packet.options)
        )
    raise TypeError(f"not a TFTP packet: {packet!r}")


def data_packet(block: int, payload: bytes) -> bytes:
    """
    The bytes of a DATA packet (the fast path of a transfer; C{block} is 0-65535).
    """
    return _HEADER.pack(DATA, block) + payload


def error_packet(code: int, message: str) -> bytes:
    """
    The bytes of an ERROR packet (the message cut to what can be sent).
    """
    text = message.replace("\0", " ").encode("utf-8", "replace")[:MAX_TEXT]
    raw = text.decode("utf-8", "ignore").encode("utf-8")
    return _HEADER.pack(ERROR, code) + raw + b"\0"
