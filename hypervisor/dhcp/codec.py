# -*- test-case-name: tests.test_dhcp_codec -*-
"""
DHCPv4 messages (RFC 2131) and their options (RFC 2132 and later) as bytes and
back: pure functions, no I/O, no Twisted.

- L{decode} turns a datagram into a L{Packet}; anything that is not a well-formed
  DHCP message raises L{MalformedPacket} (and only that).
- L{encode} turns a L{Packet} into a datagram. Options that do not fit the options
  field spill into the C{file} and C{sname} fields (option 52, "overload") when
  those are unused; values longer than 255 bytes are split into several instances
  of the option (RFC 3396), which L{decode} joins again.
- A L{Packet} keeps its options as raw bytes by code, in order
  (C{dict[int, bytes]}); L{option_value} and L{option_bytes} convert between those
  bytes and typed values for the options the server uses (L{OPTION_KINDS}): IPv4
  addresses, integers, text, the parameter request list, the PXE options 93, 94 and
  97, the relay agent information (82) and classless static routes (121, RFC 3442).

C{decode(encode(p)) == p} for every packet whose C{sname} and C{file} hold no NUL
byte, whose C{chaddr} is 16 bytes, and whose options have neither the pad (0), the
overload (52) nor the end (255) code: those three are the codec's own business.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

BOOTREQUEST = 1
BOOTREPLY = 2

MAGIC = b"\x63\x82\x53\x63"
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
HEADER_SIZE = HEADER.size  # 236
OPTIONS_START = HEADER_SIZE + len(MAGIC)  # 240
SNAME_START = 44
FILE_START = 108

MIN_MESSAGE = 576
"""The size every DHCP client must accept (RFC 2131 §2): the default reply limit."""

MIN_BOOTP = 300
"""Replies are padded to this size (RFC 1542 §3.2.1): some clients drop shorter ones."""

BROADCAST_FLAG = 0x8000

PAD = 0
END = 255

# Option codes used by the server.
SUBNET_MASK = 1
ROUTER = 3
DNS_SERVERS = 6
HOST_NAME = 12
DOMAIN_NAME = 15
BROADCAST_ADDRESS = 28
REQUESTED_IP = 50
LEASE_TIME = 51
OVERLOAD = 52
MESSAGE_TYPE = 53
SERVER_ID = 54
PARAMETER_REQUEST_LIST = 55
MESSAGE = 56
MAX_MESSAGE_SIZE = 57
RENEWAL_TIME = 58
REBINDING_TIME = 59
VENDOR_CLASS = 60
CLIENT_ID = 61
TFTP_SERVER_NAME = 66
BOOTFILE_NAME = 67
RELAY_AGENT_INFORMATION = 82
CLIENT_ARCHITECTURE = 93
CLIENT_NDI = 94
CLIENT_UUID = 97
CLASSLESS_ROUTES = 121


class MalformedPacket(ValueError):
    """
    Bytes that are not a well-formed DHCP message (or an option value that does not
    fit its option's type); the message says what is wrong.
    """


class PacketTooLarge(ValueError):
    """
    A packet to encode whose options do not fit the size allowed, even with the
    C{file} and C{sname} fields used for options.
    """


class MessageType(enum.IntEnum):
    """
    Option 53: the DHCP message type.
    """

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8

    @property
    def label(self) -> str:
        """
        The lower-case name (for logs and metrics).
        """
        return _LABELS[self]


_MESSAGE_TYPES = {int(kind): kind for kind in MessageType}
_LABELS = {kind: kind.name.lower() for kind in MessageType}


@dataclass
class Packet:
    """
    One DHCP message: the BOOTP header fields and the options.

    @ivar chaddr: the 16-byte client hardware address field (the MAC is its first
        C{hlen} bytes).
    @ivar sname: the server host name field up to its first NUL (C{b""} when it
        carried options).
    @ivar file: the boot file name field up to its first NUL (C{b""} when it carried
        options).
    @ivar options: raw option values by code, in the order they came (several
        instances of one code joined, RFC 3396); never the pad, overload or end code.
    """

    op: int = BOOTREQUEST
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = "0.0.0.0"
    yiaddr: str = "0.0.0.0"
    siaddr: str = "0.0.0.0"
    giaddr: str = "0.0.0.0"
    chaddr: bytes = bytes(16)
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def mac(self) -> str:
        """
        The client's hardware address, lower-case and colon-separated.
        """
        return self.chaddr[: min(self.hlen, 16)].hex(":")

    @property
    def message_type(self) -> Optional[MessageType]:
        """
        Option 53, or None if absent or unknown.
        """
        raw = self.options.get(MESSAGE_TYPE)
        if raw is None or len(raw) != 1:
            return None
        return _MESSAGE_TYPES.get(raw[0])

    @property
    def broadcast(self) -> bool:
        """
        Whether the client asked for broadcast replies (the flags' top bit).
        """
        return bool(self.flags & BROADCAST_FLAG)

    def get(self, code: int) -> Any:
        """
        The typed value of option C{code} (see L{option_value}), or None if absent.

        @raise MalformedPacket: the option's bytes do not fit its type.
        """
        raw = self.options.get(code)
        return None if raw is None else option_value(code, raw)


# Typed option values --------------------------------------------------------------------


def _ip(raw: bytes) -> str:
    if len(raw) != 4:
        raise MalformedPacket(f"an IPv4 address is 4 bytes, not {len(raw)}")
    return socket.inet_ntoa(raw)


def _ips(raw: bytes) -> list[str]:
    if not raw or len(raw) % 4:
        raise MalformedPacket(f"a list of IPv4 addresses cannot be {len(raw)} bytes")
    return [socket.inet_ntoa(raw[i : i + 4]) for i in range(0, len(raw), 4)]


def _uint(size: int) -> Callable[[bytes], int]:
    def decode(raw: bytes) -> int:
        if len(raw) != size:
            raise MalformedPacket(f"expected a {size}-byte integer, got {len(raw)} bytes")
        return int.from_bytes(raw, "big")

    return decode


def _uints(size: int) -> Callable[[bytes], list[int]]:
    def decode(raw: bytes) -> list[int]:
        if not raw or len(raw) % size:
            raise MalformedPacket(f"a list of {size}-byte integers cannot be {len(raw)} bytes")
        return [int.from_bytes(raw[i : i + size], "big") for i in range(0, len(raw), size)]

    return decode


def _text(raw: bytes) -> str:
    # Some clients end text options with a NUL (RFC 2132 says they should not).
    try:
        return raw.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError as e:
        raise MalformedPacket(f"text is not UTF-8: {e.reason}") from None


def _ndi(raw: bytes) -> tuple[int, int, int]:
    if len(raw) != 3:
        raise MalformedPacket(f"option 94 is 3 bytes (type, major, minor), not {len(raw)}")
    return raw[0], raw[1], raw[2]


def _uuid(raw: bytes) -> bytes:
    if len(raw) != 17 or raw[0] != 0:
        raise MalformedPacket("option 97 is a 0 byte and a 16-byte machine identifier")
    return raw[1:]


def _suboptions(raw: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    i = 0
    while i < len(raw):
        if i + 2 > len(raw) or i + 2 + raw[i + 1] > len(raw):
            raise MalformedPacket("a relay agent sub-option runs past the end of option 82")
        code, length = raw[i], raw[i + 1]
        out[code] = out.get(code, b"") + raw[i + 2 : i + 2 + length]
        i += 2 + length
    return out


def _routes(raw: bytes) -> list[tuple[str, str]]:
    routes = []
    i = 0
    while i < len(raw):
        width = raw[i]
        if width > 32:
            raise MalformedPacket(f"a classless route has a prefix length of {width}")
        significant = (width + 7) // 8
        end = i + 1 + significant + 4
        if end > len(raw):
            raise MalformedPacket("a classless route runs past the end of option 121")
        destination = raw[i + 1 : i + 1 + significant] + bytes(4 - significant)
        try:
            network = ipaddress.IPv4Network((destination, width))
        except ValueError:
            raise MalformedPacket(
                f"classless route {socket.inet_ntoa(destination)}/{width} has bits set "
                "beyond its prefix length"
            ) from None
        routes.append((str(network), socket.inet_ntoa(raw[end - 4 : end])))
        i = end
    return routes


def _encode_ip(value: str) -> bytes:
    try:
        return socket.inet_aton(value) if value.count(".") == 3 else _bad_ip(value)
    except OSError:
        return _bad_ip(value)


def _bad_ip(value: str) -> bytes:
    raise ValueError(f"{value!r} is not an IPv4 address")


def _encode_routes(routes: Iterable[tuple[str, str]]) -> bytes:
    out = bytearray()
    for network_text, router in routes:
        network = ipaddress.IPv4Network(network_text)
        width = network.prefixlen
        out.append(width)
        out += network.network_address.packed[: (width + 7) // 8]
        out += _encode_ip(router)
    return bytes(out)


def _encode_suboptions(suboptions: dict[int, bytes]) -> bytes:
    out = bytearray()
    for code, value in suboptions.items():
        for start in range(0, max(len(value), 1), 255):
            chunk = value[start : start + 255]
            out += bytes((code, len(chunk))) + chunk
    return bytes(out)


@dataclass(frozen=True)
class OptionKind:
    """
    How the bytes of an option map to a typed value.
    """

    name: str
    decode: Callable[[bytes], Any]
    encode: Callable[[Any], bytes]


IP = OptionKind("IPv4 address", _ip, _encode_ip)
IPS = OptionKind("IPv4 addresses", _ips, lambda v: b"".join(_encode_ip(ip) for ip in v))
U8 = OptionKind("8-bit integer", _uint(1), lambda v: v.to_bytes(1, "big"))
U16 = OptionKind("16-bit integer", _uint(2), lambda v: v.to_bytes(2, "big"))
U32 = OptionKind("32-bit integer", _uint(4), lambda v: v.to_bytes(4, "big"))
U8S = OptionKind("8-bit integers", _uints(1), bytes)
U16S = OptionKind("16-bit integers", _uints(2), lambda v: b"".join(x.to_bytes(2, "big") for x in v))
TEXT = OptionKind("text", _text, lambda v: v.encode("utf-8"))
BYTES = OptionKind("bytes", bytes, bytes)
NDI = OptionKind("network device interface", _ndi, bytes)
UUID = OptionKind("machine identifier", _uuid, lambda v: b"\0" + bytes(v))
SUBOPTIONS = OptionKind("sub-options", _suboptions, _encode_suboptions)
ROUTES = OptionKind("classless static routes", _routes, _encode_routes)

OPTION_KINDS: dict[int, OptionKind] = {
    SUBNET_MASK: IP,
    ROUTER: IPS,
    DNS_SERVERS: IPS,
    HOST_NAME: TEXT,
    DOMAIN_NAME: TEXT,
    BROADCAST_ADDRESS: IP,
    REQUESTED_IP: IP,
    LEASE_TIME: U32,
    OVERLOAD: U8,
    MESSAGE_TYPE: U8,
    SERVER_ID: IP,
    PARAMETER_REQUEST_LIST: U8S,
    MESSAGE: TEXT,
    MAX_MESSAGE_SIZE: U16,
    RENEWAL_TIME: U32,
    REBINDING_TIME: U32,
    VENDOR_CLASS: BYTES,
    CLIENT_ID: BYTES,
    TFTP_SERVER_NAME: TEXT,
    BOOTFILE_NAME: TEXT,
    RELAY_AGENT_INFORMATION: SUBOPTIONS,
    CLIENT_ARCHITECTURE: U16S,
    CLIENT_NDI: NDI,
    CLIENT_UUID: UUID,
    CLASSLESS_ROUTES: ROUTES,
}
"""The typed options; any other code is raw bytes."""


def option_value(code: int, raw: bytes) -> Any:
    """
    The typed value of option C{code} from its bytes (bytes for untyped codes).

    @raise MalformedPacket: the bytes do not fit the option's type.
    """
    kind = OPTION_KINDS.get(code, BYTES)
    return kind.decode(raw)


def option_bytes(code: int, value: Any) -> bytes:
    """
    The bytes of option C{code} for a typed value (the inverse of L{option_value}).

    @raise ValueError: the value does not fit the option's type.
    """
    kind = OPTION_KINDS.get(code, BYTES)
    try:
        return kind.encode(value)
    except (OverflowError, TypeError, AttributeError) as e:
        raise ValueError(f"option {code}: {value!r} is not a {kind.name}: {e}") from None


# Messages -------------------------------------------------------------------------------------


def _parse_options(
    data: bytes, start: int, end: int, out: dict[int, bytes], where: str
) -> Optional[int]:
    """
    Parse options from C{data[start:end]} into C{out} (joining repeated codes).

    @return: the value of an overload option (52) found, else None.
    """
    overload = None
    i = start
    while i < end:
        code = data[i]
        if code == END:
            break
        if code == PAD:
            i += 1
            continue
        if i + 1 >= end:
            raise MalformedPacket(f"option {code} in the {where} has no length byte")
        length = data[i + 1]
        value_end = i + 2 + length
        if value_end > end:
            raise MalformedPacket(
                f"option {code} in the {where} is {length} bytes long but only "
                f"{end - i - 2} remain"
            )
        value = data[i + 2 : value_end]
        if code == OVERLOAD:
            if where != "options field":
                raise MalformedPacket(f"option 52 (overload) may not be in the {where}")
            if length != 1 or not 1 <= value[0] <= 3:
                raise MalformedPacket("option 52 (overload) must be one byte of 1, 2 or 3")
            overload = value[0]
        else:
            previous = out.get(code)
            out[code] = value if previous is None else previous + value
        i = value_end
    return overload


def decode(data: bytes) -> Packet:
    """
    The DHCP message in C{data}.

    @raise MalformedPacket: C{data} is not a well-formed DHCP message.
    """
    if len(data) < OPTIONS_START:
        raise MalformedPacket(
            f"{len(data)} bytes is too short for a DHCP message ({OPTIONS_START} at least)"
        )
    (
        op,
        htype,
        hlen,
        hops,
        xid,
        secs,
        flags,
        ciaddr,
        yiaddr,
        siaddr,
        giaddr,
        chaddr,
        sname,
        file,
    ) = HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"op is {op}, neither 1 (request) nor 2 (reply)")
    if hlen > 16:
        raise MalformedPacket(f"hlen is {hlen}; the hardware address field holds 16 bytes")
    if data[HEADER_SIZE:OPTIONS_START] != MAGIC:
        raise MalformedPacket("no DHCP magic cookie (a BOOTP message?)")
    options: dict[int, bytes] = {}
    overload = _parse_options(data, OPTIONS_START, len(data), options, "options field")
    if overload is not None:
        if overload & 1:
            _parse_options(data, FILE_START, FILE_START + 128, options, "file field")
            file = b""
        if overload & 2:
            _parse_options(data, SNAME_START, SNAME_START + 64, options, "sname field")
            sname = b""
    return Packet(
        op=op,
        htype=htype,
        hlen=hlen,
        hops=hops,
        xid=xid,
        secs=secs,
        flags=flags,
        ciaddr=socket.inet_ntoa(ciaddr),
        yiaddr=socket.inet_ntoa(yiaddr),
        siaddr=socket.inet_ntoa(siaddr),
        giaddr=socket.inet_ntoa(giaddr),
        chaddr=chaddr,
        sname=sname.split(b"\0", 1)[0],
        file=file.split(b"\0", 1)[0],
        options=options,
    )


def _encode_option(code: int, value: bytes) -> list[bytes]:
    if code in (PAD, OVERLOAD, END) or not 0 <= code <= 255:
        raise ValueError(f"option code {code} is the codec's own, or out of range")
    if len(value) <= 255:
        return [bytes((code, len(value))) + value]
    return [bytes((code, len(chunk))) + chunk for chunk in _chunks(value)]


def _chunks(value: bytes) -> list[bytes]:
    return [value[i : i + 255] for i in range(0, len(value), 255)]


def encode(packet: Packet, max_size: int = MIN_MESSAGE, min_size: int = 0) -> bytes:
    """
    The datagram of C{packet}, at most C{max_size} bytes (the client's maximum
    message size, or 576), padded to C{min_size} (L{MIN_BOOTP} for replies).

    @raise PacketTooLarge: the options do not fit even in the C{file} and C{sname}
        fields.
    @raise ValueError: a field does not fit its size.
    """
    if len(packet.chaddr) > 16 or len(packet.sname) > 64 or len(packet.file) > 128:
        raise ValueError("chaddr, sname or file is longer than its field")
    pieces: list[bytes] = []
    for code, value in packet.options.items():
        pieces.extend(_encode_option(code, value))
    body = b"".join(pieces)
    room = max(max_size, OPTIONS_START + 1) - OPTIONS_START - 1  # the end option
    sname, file = packet.sname, packet.file
    if len(body) <= room:
        options = body
    else:
        # Overload: option 52 first, then as many whole pieces as fit in each field.
        slots: list[tuple[str, int]] = [("options", room - 3)]
        if not file:
            slots.append(("file", 127))
        if not sname:
            slots.append(("sname", 63))
        filled: dict[str, bytearray] = {name: bytearray() for name, _ in slots}
        slot = 0
        for piece in pieces:
            while slot < len(slots) and len(filled[slots[slot][0]]) + len(piece) > slots[slot][1]:
                slot += 1
            if slot == len(slots):
                raise PacketTooLarge(
                    f"{len(body)} bytes of options do not fit a {max_size}-byte message"
                )
            filled[slots[slot][0]] += piece
        overload = 0
        if filled.get("file"):
            overload |= 1
            file = bytes(filled["file"]) + bytes((END,))
        if filled.get("sname"):
            overload |= 2
            sname = bytes(filled["sname"]) + bytes((END,))
        options = bytes((OVERLOAD, 1, overload)) + bytes(filled["options"])
    out = (
        HEADER.pack(
            packet.op,
            packet.htype,
            packet.hlen,
            packet.hops,
            packet.xid,
            packet.secs,
            packet.flags,
            _encode_ip(packet.ciaddr),
            _encode_ip(packet.yiaddr),
            _encode_ip(packet.siaddr),
            _encode_ip(packet.giaddr),
            packet.chaddr,
            sname,
            file,
        )
        + MAGIC
        + options
        + bytes((END,))
    )
    if len(out) < min_size:
        out += bytes(min_size - len(out))
    return out


def mac_bytes(mac: str) -> bytes:
    """
    C{"52:54:00:01:02:03"} -> its 6 bytes.

    @raise ValueError: not a MAC address.
    """
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return bytes(int(p, 16) for p in parts)
