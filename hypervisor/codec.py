# -*- test-case-name: tests.test_model,tests.test_codec_fuzz,tests.test_codec_golden -*-
"""
The one JSON codec for our model: dataclasses <-> Go's C{encoding/json} shapes,
byte for byte.

Rules (reference §12.3; the SRPC transcripts are the test vectors):

- field names are the Go field names (the dataclass field names), written in the
  Go struct's declaration order (the dataclass order, or the class's
  C{__go_order__} where an embedded struct's fields and the outer ones interleave);
- decoding matches names case-insensitively and ignores unknown fields, as Go does;
  a value of the wrong type is a L{DecodeError} naming the field;
- fields marked C{omitempty} are left out when zero (Go's rule: C{false}, 0, "",
  an empty list, map or C{bytes}; a pointer, C{Optional}, only when C{None}; a
  struct or a time never), others always written: an empty list, map or C{bytes}
  as C{null} (a Go nil slice or map) unless the field says C{nonnil} (Go makes it
  with C{make}: C{[]}, C{{}}, C{""});
- an C{embed} field is flattened into its parent (Go's embedded structs);
- L{TextEnum} values are their lower-case text; C{bytes} are standard base64;
  C{datetime} is RFC 3339 with Go's trimmed nanoseconds (C{time.RFC3339Nano}; None
  <-> Go's zero time, which is never left out; L{GoTime} keeps the nanoseconds a
  Go peer sent); L{Duration} is integer nanoseconds (Go's C{time.Duration});
- maps are written with their keys sorted (Go sorts map keys);
- the output is compact (no spaces) UTF-8, escaped as Go escapes: C{<}, C{>}, C{&},
  U+2028 and U+2029 as C{\\u003c} ..., control characters as C{\\n}, C{\\u001f} ...,
  other characters as they are; a lone surrogate (what invalid UTF-8 is in Python)
  as C{\\ufffd}, as Go writes invalid UTF-8 (L{encode}'s C{indent} gives Go's
  C{MarshalIndent} layout instead).

Encoders and decoders are compiled once per dataclass, at first use: generated
Python source (C{exec}) with the field table folded in, so a call does no
reflection. Values of an unexpected type (a caller's mistake, hostile input) take
the general path, L{decode_value}, which gives the same result and messages.

Every value is validated while it is decoded, so that nothing a client sends can
break a page, a state file or a Go client later:

- the JSON itself: UTF-8 only, no C{NaN}/C{Infinity}, nested at most L{MAX_DEPTH}
  deep (checked before parsing, without recursion);
- strings (and map keys): well-formed Unicode (no lone surrogate, escaped or as raw
  bytes, no invalid UTF-8; file names of ours, L{PathText}, may keep undecodable
  bytes as U+DC80-U+DCFF when trusted), at most L{MAX_STRING} characters (L{MAX_KEY} for map
  keys) unless the field says otherwise with L{MaxLen}, and the syntax of their
  L{TextFormat} (L{IPV4}, L{HOSTNAME}, L{MAC}; the empty string means "not given");
- lists and maps: at most L{MAX_ITEMS} elements unless the field says otherwise;
- integers: annotated with their Go type (L{GoInt}: C{Annotated[int,
  GoInt("uint64")]}, or the aliases L{Uint64}, L{Uint} ...) and refused outside its
  range; C{bytes} at most L{MAX_BYTES} long.

Requests from the network are decoded I{strictly} (the default): any of the above is a
L{DecodeError} naming the field. Files we wrote ourselves (C{info.json},
C{subnets.json}, C{address-pool.json}, C{create-request.json}) are decoded with
C{trusted=True}: what an older version stored must not make a VM unloadable, so
ill-formed strings are repaired to U+FFFD, integers out of range are clamped, limits
and formats are not enforced, and every repair is reported in the C{repairs} list the
caller passes (to log it). Malformed JSON is refused in both modes.

L{encode} never writes what a Go client would refuse: like Go's encoder it replaces
ill-formed strings by U+FFFD, and clamps integers to their Go type's range.
"""

from __future__ import annotations

import array
import base64
import binascii
import dataclasses
import datetime
import decimal
import enum
import itertools
import json
import json.encoder
import re
import threading
import types
import typing
from typing import Annotated, Any, Callable, Optional, Type, TypeVar, Union

T = TypeVar("T")

GO_ZERO_TIME = "0001-01-01T00:00:00Z"

MAX_DEPTH = 32
"""How deeply JSON arrays and objects may nest (our deepest model needs 6)."""

MAX_STRING = 4096
"""Characters in a string field without its own L{MaxLen}."""

MAX_KEY = 256
"""Characters in a map key without its own L{MaxLen}."""

MAX_ITEMS = 1024
"""Elements of a list or map field without its own L{MaxLen}."""

MAX_BYTES = 65536
"""Bytes of a C{bytes} (base64) field without its own L{MaxLen}."""

MAX_TIME_TEXT = 64
"""Characters of an RFC 3339 time."""

GO_INT_RANGES: dict[str, tuple[int, int]] = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "int": (-(2**63), 2**63 - 1),  # 64-bit on every platform the Go daemon runs on
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "uint": (0, 2**64 - 1),
}
"""The range of each Go integer type (C{int} and C{uint} are 64-bit)."""

GO_ORDER = "__go_order__"
"""
The class attribute (a C{ClassVar[tuple[str, ...]]}) naming a dataclass's JSON
fields, embedded ones included, in the Go struct's order, where the dataclass's own
order cannot be Go's (Go's C{ListVMsRequest} has C{Sort} between the filter's
fields, ours embeds the filter).
"""


class DecodeError(ValueError):
    """
    JSON that does not fit the model; the message names the field and what was wrong.
    """


class TextEnum(str, enum.Enum):
    """
    An enum written as its text (Go types with MarshalText); its index is its position.
    """

    @property
    def number(self) -> int:
        """
        The Go numeric value (position in the declaration).
        """
        return list(type(self)).index(self)

    @classmethod
    def from_text(cls: Type[T], text: str) -> T:
        """
        The member with this text, or L{DecodeError} listing the valid ones.
        """
        for member in cls:  # type: ignore[attr-defined]
            if member.value == text:
                return member
        valid = ", ".join(repr(m.value) for m in cls)  # type: ignore[attr-defined]
        raise DecodeError(f"unknown {cls.__name__} {_show(text)} (valid: {valid})")


class Duration(float):
    """
    Seconds in Python, integer nanoseconds on the wire (Go's time.Duration).
    """


class GoTime(datetime.datetime):
    """
    A time with Go's nanosecond precision: a C{datetime} plus the nanoseconds below
    its microsecond (L{nanos}, 0-999), so that a time a Go peer sent is written back
    exactly as Go wrote it. Decoding makes one only when those digits are not zero;
    arithmetic and comparisons ignore them, as they would any datetime's.
    """

    nanos: int = 0

    @property
    def nanosecond(self) -> int:
        """
        The nanoseconds within the second (0-999,999,999).
        """
        return self.microsecond * 1000 + self.nanos

    def __reduce_ex__(self, protocol: Any) -> Any:
        """
        Pickle and copy keep the nanoseconds.
        """
        reduced = super().__reduce_ex__(protocol)
        return (reduced[0], reduced[1], {"nanos": self.nanos})


# Field annotations -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GoInt:
    """
    The Go integer type of an C{int} field: C{Annotated[int, GoInt("uint64")]}.
    Decoding refuses values outside the type's range.
    """

    go_type: str

    def __post_init__(self) -> None:
        if self.go_type not in GO_INT_RANGES:
            raise ValueError(
                f"unknown Go integer type {self.go_type!r}; known: " f"{', '.join(GO_INT_RANGES)}"
            )

    @property
    def low(self) -> int:
        """
        The smallest value of the type.
        """
        return GO_INT_RANGES[self.go_type][0]

    @property
    def high(self) -> int:
        """
        The largest value of the type.
        """
        return GO_INT_RANGES[self.go_type][1]


@dataclasses.dataclass(frozen=True)
class MaxLen:
    """
    A limit on a field: characters of a string, bytes of C{bytes}, elements of a
    list or map (C{Annotated[list[str], MaxLen(64)]}).
    """

    limit: int


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """
    A syntax that a non-empty string field must follow (checked in strict mode).

    @ivar description: what the text must be, for messages ("an IPv4 address").
    @ivar check: whether a non-empty text follows the syntax.
    @ivar example: a valid text, for messages.
    @ivar limit: the natural length bound of the syntax.
    """

    description: str
    check: Callable[[str], bool]
    example: str
    limit: int


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}", re.ASCII)


def _is_ipv4(text: str) -> bool:
    """
    Dotted-quad IPv4 (no leading zeros, no spaces), as Go's C{net.ParseIP} writes it.
    """
    return _IPV4_RE.fullmatch(text) is not None


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.ASCII)
_MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?:([:-])[0-9A-Fa-f]{2})(?:\1[0-9A-Fa-f]{2}){4}", re.ASCII)


def _is_hostname(text: str) -> bool:
    """
    An RFC 1123 host name: dot-separated labels of letters, digits and hyphens, each
    1-63 characters, not starting or ending with a hyphen; 253 characters in all.
    """
    return len(text) <= 253 and _HOSTNAME_RE.fullmatch(text) is not None


def _is_mac(text: str) -> bool:
    """
    A 48-bit MAC address: six hex pairs separated by colons (or hyphens).
    """
    return _MAC_RE.fullmatch(text) is not None


@dataclasses.dataclass(frozen=True)
class OsPath:
    """
    A string that is a file name on this host (C{VolumeLocation.Filename}). Python
    keeps a name's undecodable bytes as U+DC80-U+DCFF (C{surrogateescape}), so such
    characters are the name, not damage: L{encode} writes them as they are (ASCII
    C{\\udcXX} escapes) and trusted decoding keeps them, so that a volume in a
    directory whose name is not UTF-8 stays reachable. Strict decoding still refuses
    them: no request carries a file name of ours.
    """


OS_PATH = OsPath()

IPV4 = TextFormat("an IPv4 address", _is_ipv4, "10.2.3.4", 15)
HOSTNAME = TextFormat(
    "an RFC 1123 host name (labels of letters, digits and '-', 1-63 characters, "
    "not starting or ending with '-'; 253 characters in all)",
    _is_hostname,
    "web-1.example.com",
    253,
)
MAC = TextFormat("a MAC address", _is_mac, "52:54:0a:02:03:04", 17)

Int8 = Annotated[int, GoInt("int8")]
Int16 = Annotated[int, GoInt("int16")]
Int32 = Annotated[int, GoInt("int32")]
Int64 = Annotated[int, GoInt("int64")]
Int = Annotated[int, GoInt("int")]
Uint8 = Annotated[int, GoInt("uint8")]
Uint16 = Annotated[int, GoInt("uint16")]
Uint32 = Annotated[int, GoInt("uint32")]
Uint64 = Annotated[int, GoInt("uint64")]
Uint = Annotated[int, GoInt("uint")]
IPv4Text = Annotated[str, IPV4]
"""An IPv4 address, or "" (not given)."""
HostnameText = Annotated[str, HOSTNAME]
"""An RFC 1123 host name, or ""."""
MacText = Annotated[str, MAC]
"""A MAC address, or ""."""
PathText = Annotated[str, OS_PATH]
"""A file name on this host (see L{OsPath})."""


def field(
    *,
    omitempty: bool = False,
    embed: bool = False,
    nonnil: bool = False,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """
    A dataclass field with codec options.

    @param omitempty: Go's C{json:",omitempty"}: left out when zero.
    @param embed: a Go embedded struct: its fields are the parent's.
    @param nonnil: the Go side fills this slice, map or C{[]byte} with C{make}, so an
        empty one is written C{[]}, C{{}} or C{""} rather than C{null} (fields
        without C{omitempty} only).
    """
    metadata = {"omitempty": omitempty, "embed": embed, "nonnil": nonnil}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    """
    C{Annotated[X, m...]} -> (X, (m...)); anything else -> (tp, ()).
    """
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, tuple(tp.__metadata__)
    return tp, ()


def _meta(metas: tuple[Any, ...], kind: Type[T]) -> Optional[T]:
    for m in metas:
        if isinstance(m, kind):
            return m
    return None


def _optional_inner(tp: Any) -> Optional[Any]:
    """
    X for C{Optional[X]}, else None.
    """
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner[0]
    return None


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        _HINTS[cls] = hints
    return hints


# Times -------------------------------------------------------------------------------

_UTC = datetime.timezone.utc


def format_time(value: Optional[datetime.datetime]) -> str:
    """
    RFC 3339 with nanoseconds, trailing zeros trimmed, in the time's own zone (C{Z}
    for UTC), as Go's C{time.RFC3339Nano} writes it; a naive time is local time,
    written in UTC; None is Go's zero time.
    """
    if value is None:
        return GO_ZERO_TIME
    if value.tzinfo is _UTC and value.__class__ is datetime.datetime:
        if value.microsecond:
            return value.isoformat()[:26].rstrip("0") + "Z"
        return value.isoformat()[:19] + "Z"
    offset = value.utcoffset()
    if offset is None:
        value = value.astimezone(_UTC)
        zone = "Z"
    elif not offset:
        zone = "Z"
    else:
        seconds = offset.days * 86400 + offset.seconds
        if seconds % 60 or offset.microseconds:
            # Go writes whole minutes; such a zone is written in UTC instead.
            value = value.astimezone(_UTC)
            zone = "Z"
        else:
            minutes = abs(seconds) // 60
            zone = f"{'-' if seconds < 0 else '+'}{minutes // 60:02d}:{minutes % 60:02d}"
    text = value.isoformat(timespec="seconds")[:19]
    nanos = value.microsecond * 1000
    if value.__class__ is GoTime:
        nanos += value.nanos
    if nanos:
        text = f"{text}.{nanos:09d}".rstrip("0")
    return text + zone


_RFC3339_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})", re.ASCII
)
_FAST_TIME_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
_NOT_A_TIME = object()


def _fast_time(text: str) -> Any:
    """
    L{parse_time} for the common, strict RFC 3339 form; L{_NOT_A_TIME} for anything
    else (left to L{parse_time}, which explains what is wrong).
    """
    match = _FAST_TIME_RE.fullmatch(text)
    if match is None or text.startswith("0001-01-01T00:00:00"):
        return _NOT_A_TIME
    try:
        value = datetime.datetime.fromisoformat(text)
        if match.group(2) != "Z":
            value.astimezone(_UTC)  # representable in UTC
    except (ValueError, OverflowError):
        return _NOT_A_TIME
    digits = match.group(1)
    if digits and len(digits) > 6:
        nanos = int(digits[6:].ljust(3, "0"))
        if nanos:
            value = GoTime.fromisoformat(text)
            value.nanos = nanos
    return value


def parse_time(text: str, *, strict: bool = False) -> Optional[datetime.datetime]:
    """
    Parse RFC 3339 (with up to nanoseconds; a L{GoTime} when there are nanoseconds
    below the microsecond); Go's zero time is None.

    @param strict: require exactly RFC 3339 (a C{T}, a zone), as Go does; otherwise
        any ISO 8601 form Python reads, a missing zone meaning UTC.
    @raise DecodeError: not a time, or one that cannot be written back in UTC.
    """
    if text == GO_ZERO_TIME or text.startswith("0001-01-01T00:00:00"):
        return None
    if strict and (len(text) > MAX_TIME_TEXT or _RFC3339_RE.fullmatch(text) is None):
        raise DecodeError(
            f"{_show(text)} is not an RFC 3339 time " "(example: 2024-05-01T12:00:00Z)"
        )
    s = text.replace("Z", "+00:00")
    nanos = 0
    if "." in s:
        head, _, rest = s.partition(".")
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        zone = rest[len(digits) :]
        if len(digits) > 6 and digits[6:9].isascii():
            nanos = int(digits[6:9].ljust(3, "0"))
        s = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        value = datetime.datetime.fromisoformat(s)
        if value.tzinfo is None:
            value = value.replace(tzinfo=_UTC)
        value.astimezone(_UTC)  # representable in UTC
    except (ValueError, OverflowError):
        raise DecodeError(f"{_show(text)} is not an RFC 3339 time") from None
    if nanos:
        value = GoTime(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            value.tzinfo,
        )
        value.nanos = nanos
    return value


# Encoding ----------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_ESCAPED_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")

_quote: Callable[[str], str] = json.encoder.encode_basestring
"""
A string as a JSON string literal, other characters as they are: the C encoder of
the standard library (its escapes are Go's: C{\\"}, C{\\\\}, C{\\b}, C{\\f},
C{\\n}, C{\\r}, C{\\t}, C{\\u00XX} in lower case). L{_go_text} adds Go's others.
"""

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_GO_SPECIAL = re.compile("[<>&\u2028\u2029\ud800-\udfff]")


def _go_escape(match: re.Match[str]) -> str:
    return _GO_ESCAPES.get(match.group(), "\\ufffd")


def _go_text(text: str) -> str:
    """
    The last step of L{encode}: what Go escapes and the standard library does not
    (C{<}, C{>}, C{&}, U+2028, U+2029, which only strings can hold), and a lone
    surrogate (invalid UTF-8) as C{\\ufffd}, as Go writes invalid UTF-8.
    """
    if text.isascii():
        if "<" in text:
            text = text.replace("<", "\\u003c")
        if ">" in text:
            text = text.replace(">", "\\u003e")
        if "&" in text:
            text = text.replace("&", "\\u0026")
        return text
    return _GO_SPECIAL.sub(_go_escape, text)


def _well_formed(text: str) -> str:
    """
    C{text} with every lone surrogate replaced by U+FFFD (what Go writes and reads).
    """
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def _escape_byte(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\u{code:04x}" if 0xDC80 <= code <= 0xDCFF else "\\ufffd"


def _path_json(value: Any) -> str:
    """
    A file name of ours (L{OsPath}): its undecodable bytes (U+DC80-U+DCFF) as
    C{\\udcXX} escapes, so that they survive; other lone surrogates as C{\\ufffd}.
    """
    if value.__class__ is not str:
        return _any_json(value)
    text = _quote(value)
    if text.isascii():
        return text
    return _SURROGATE.sub(_escape_byte, text)


def _is_zero(value: Any) -> bool:
    """
    Go's omitempty test (structs are never empty).
    """
    if isinstance(value, TextEnum):
        return value.number == 0
    if value is None:
        return True
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value == 0
    if isinstance(value, (str, list, dict, bytes)):
        return len(value) == 0
    return False


def _duration_ns(value: float) -> int:
    """
    Seconds -> integer nanoseconds within int64 (NaN -> 0, infinities clamped).
    """
    low, high = GO_INT_RANGES["int64"]
    if value != value:
        return 0
    if value in (float("inf"), float("-inf")):
        return high if value > 0 else low
    return max(low, min(high, int(round(value * 1e9))))


def _duration_json(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(_duration_ns(value))
    return _any_json(value)


def _float_json(value: float) -> str:
    """
    A float as Go writes a float64: shortest digits, plain notation from 1e-6 to
    1e21, else an exponent without leading zeros (C{1e-7}, C{1e+21}); NaN and the
    infinities, which Go cannot write, as null.
    """
    if value != value or value in (float("inf"), float("-inf")):
        return "null"
    text = repr(float(value))
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        mantissa, _, exponent = text.partition("e")  # Python: e-07, e+21, as Go
        if exponent[0] == "-":
            exponent = "-" + exponent[1:].lstrip("0")  # Go trims e-07 to e-7
        return f"{mantissa}e{exponent}"
    text = format(decimal.Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def _time_json(value: Any) -> str:
    if value is None or isinstance(value, datetime.datetime):
        return '"' + format_time(value) + '"'
    return _any_json(value)


def _bytes_json(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return '"' + base64.b64encode(value).decode("ascii") + '"'
    return _any_json(value)


def _clamped_json(value: Any, low: int, high: int) -> str:
    """
    An integer field's value that is out of its Go type's range (clamped to it), or
    not an C{int} at all.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(max(low, min(high, int(value))))
    return _any_json(value)


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, TextEnum):
        return key.value
    return _any_json(key).strip('"')


def _any_json(value: Any) -> str:
    """
    Any value as Go JSON text (before L{_go_text}): the general path, for values
    without a declared type (or not of it).
    """
    cls = value.__class__
    compiled = _ENCODERS.get(cls)
    if compiled is not None:
        return compiled(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, TextEnum):
        return _quote(value.value)
    if isinstance(value, Duration):
        return str(_duration_ns(value))
    if isinstance(value, str):
        return _quote(str(value))
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return _float_json(value)
    if isinstance(value, (bytes, bytearray)):
        return '"' + base64.b64encode(value).decode("ascii") + '"'
    if isinstance(value, datetime.datetime):
        return '"' + format_time(value) + '"'
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encoder(cls)(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join([_any_json(v) for v in value]) + "]"
    if isinstance(value, dict):
        items = sorted((_key_text(k), v) for k, v in value.items())
        return "{" + ",".join([_quote(k) + ":" + _any_json(v) for k, v in items]) + "}"
    raise TypeError(f"{cls.__name__} cannot be encoded as JSON")


def encode_value(value: Any) -> Any:
    """
    Turn a model value into plain JSON data, as Go's JSON of it reads back (strings
    made well-formed; empty slices and maps of fields without C{nonnil} are None).
    """
    return json.loads(_go_text(_any_json(value)))


def to_dict(obj: Any) -> dict[str, Any]:
    """
    Encode a model dataclass to a dict with Go field names.
    """
    data = encode_value(obj)
    if not isinstance(data, dict):
        raise TypeError(f"{type(obj).__name__} is not encoded as a JSON object")
    return data


_TOKEN_RE = re.compile(r'"(?:[^"\\]|\\.)*"|\[\]|\{\}|[\[\]{},:]|[^\[\]{},:"]+', re.DOTALL)


def _indent(text: str, width: int) -> str:
    """
    Compact JSON laid out as Go's C{json.MarshalIndent(v, "", <width spaces>)} does
    (Python's C{json.dumps(indent=...)} layout: empty arrays and objects stay C{[]}
    and C{{}}).
    """
    step = " " * width
    depth = 0
    out: list[str] = []
    add = out.append
    for token in _TOKEN_RE.findall(text):
        first = token[0]
        if first == '"' or len(token) > 1:
            add(token)
        elif first in "[{":
            depth += 1
            add(first + "\n" + step * depth)
        elif first in "]}":
            depth -= 1
            add("\n" + step * depth + first)
        elif first == ",":
            add(",\n" + step * depth)
        elif first == ":":
            add(": ")
        else:
            add(token)
    return "".join(out)


def encode(obj: Any, indent: Optional[int] = None) -> bytes:
    """
    Encode a model object to JSON bytes, exactly as Go's C{encoding/json} writes
    the same value: compact UTF-8 (or Go's indented layout with C{indent}).
    """
    text = _go_text(_any_json(obj))
    if indent:
        text = _indent(text, indent)
    return text.encode("utf-8")


# Decoding ----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _json_kind(value: Any) -> str:
    if isinstance(value, _HugeInt):
        return "number"
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        int: "number",
        float: "number",
        type(None): "null",
    }.get(type(value), "value")


def _show(value: Any, limit: int = 40) -> str:
    """
    A short, printable (ASCII-safe) rendering of a client's value for a message.
    """
    if isinstance(value, _HugeInt):
        return f"a {len(value.text.lstrip('-'))}-digit number"
    text = ascii(value)
    if len(text) > limit:
        size = f" ({len(value)} characters)" if isinstance(value, str) else ""
        return text[:limit] + "..." + size
    return text


class _HugeInt:
    """
    A JSON integer literal too long to be any Go integer, kept as its text (so that
    a 100,000-digit number costs nothing to parse).
    """

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def negative(self) -> bool:
        """
        Whether the literal is negative.
        """
        return self.text.startswith("-")


def _parse_int(text: str) -> Union[int, _HugeInt]:
    # Go's largest integer has 20 digits; anything much longer is out of range.
    return int(text) if len(text) <= 40 else _HugeInt(text)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Mode:
    """
    How one decode runs: strict (network) or trusted (our files), and where repairs
    made in trusted mode are reported.
    """

    __slots__ = ("trusted", "repairs")

    def __init__(self, trusted: bool, repairs: Optional[list[str]]) -> None:
        self.trusted = trusted
        self.repairs = repairs

    def repair(self, where: str, what: str) -> None:
        """
        Note a repair made to a trusted value.
        """
        if self.repairs is not None:
            self.repairs.append(f"{where}: {what}")


_STRICT = _Mode(False, None)
_TRUSTED = _Mode(True, None)


def _decode_text(
    value: str, where: str, mode: _Mode, metas: tuple[Any, ...], default_limit: int
) -> str:
    """
    Check (strict) or repair (trusted) one string: well-formed, within its limit,
    in its format.
    """
    bad = _SURROGATE.search(value)
    if bad is not None:
        if not mode.trusted:
            raise DecodeError(
                f"{where}: not well-formed Unicode (a lone surrogate such as \\ud800 or "
                f"invalid UTF-8 at character {bad.start()}); send UTF-8 text"
            )
        # A file name keeps its undecodable bytes (U+DC80-U+DCFF); nothing else does.
        pattern = _NOT_ESCAPED_BYTE if _meta(metas, OsPath) is not None else _SURROGATE
        if pattern.search(value) is not None:
            value = pattern.sub("\ufffd", value)
            mode.repair(where, "ill-formed Unicode replaced by U+FFFD")
    if mode.trusted:
        return value
    fmt = _meta(metas, TextFormat)
    max_len = _meta(metas, MaxLen)
    limit = max_len.limit if max_len else (fmt.limit if fmt else default_limit)
    if len(value) > limit:
        raise DecodeError(f"{where}: {len(value)} characters is over the limit of {limit}")
    if fmt is not None and value and not fmt.check(value):
        raise DecodeError(
            f"{where}: {_show(value)} is not {fmt.description} " f"(example: {fmt.example})"
        )
    return value


def _decode_int(value: Any, where: str, mode: _Mode, go: GoInt) -> int:
    """
    A JSON number that must be an integer within the Go type's range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, _HugeInt)):
        raise DecodeError(
            f"{where}: expected an integer ({go.go_type}), got " f"{_json_kind(value)}"
        )
    number: Optional[int]
    if isinstance(value, float):
        if not value.is_integer():  # also NaN and infinities
            raise DecodeError(
                f"{where}: expected an integer ({go.go_type}), got " f"{_show(value)}"
            )
        number = int(value)
    elif isinstance(value, _HugeInt):
        number = None
    else:
        number = value
    if number is not None and go.low <= number <= go.high:
        return number
    if not mode.trusted:
        raise DecodeError(
            f"{where}: {_show(number if number is not None else value)} is "
            f"out of range for {go.go_type} ({go.low} to {go.high})"
        )
    if number is None:
        negative = isinstance(value, _HugeInt) and value.negative
    else:
        negative = number < 0
    clamped = go.low if negative else go.high
    mode.repair(where, f"{_show(value)} is out of range for {go.go_type}; clamped to " f"{clamped}")
    return clamped


_INT64 = GoInt("int64")


def decode_value(tp: Any, value: Any, where: str, mode: Optional[_Mode] = None) -> Any:
    """
    Turn plain JSON data into a value of type C{tp}; L{DecodeError} names C{where}.

    This is the general path; the compiled decoders take it for every value that is
    not of the expected kind, so that both give the same values and messages.
    """
    mode = mode or _STRICT
    inner = _optional_inner(tp)
    if inner is not None:
        if value is None:
            return None
        return decode_value(inner, value, where, mode)
    base, metas = _unwrap(tp)
    tp = base
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if value is None:
        # Go decodes null into the zero value.
        if origin is list or tp is list:
            return []
        if origin is dict or tp is dict:
            return {}
        if tp is datetime.datetime:
            return None
        if dataclasses.is_dataclass(tp):
            return from_dict(
                tp, {}, where, trusted=mode.trusted, repairs=mode.repairs  # type: ignore[arg-type]
            )
        if isinstance(tp, type) and issubclass(tp, TextEnum):
            return list(tp)[0]
        if tp in (int, float, Duration):
            return tp(0)
        if tp is str:
            return ""
        if tp is bool:
            return False
        if tp is bytes:
            return b""
        return None
    if origin is list:
        if not isinstance(value, list):
            raise DecodeError(f"{where}: expected an array, got {_json_kind(value)}")
        _check_count(value, where, mode, metas)
        return [decode_value(args[0], v, f"{where}[{i}]", mode) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object, got {_json_kind(value)}")
        _check_count(value, where, mode, metas)
        key_tp, key_metas = _unwrap(args[0])
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise DecodeError(f"{where}: keys must be strings, got {_show(k)}")
            key = _decode_text(k, f"{where} key {_show(k)}", mode, key_metas, MAX_KEY)
            out[key] = decode_value(args[1], v, f"{where}[{_show(k)}]", mode)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object, got {_json_kind(value)}")
        return from_dict(
            tp, value, where, trusted=mode.trusted, repairs=mode.repairs  # type: ignore[arg-type]
        )
    if isinstance(tp, type) and issubclass(tp, TextEnum):
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected a string, got {_json_kind(value)}")
        try:
            return tp.from_text(value)
        except DecodeError as e:
            raise DecodeError(f"{where}: {e}") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise DecodeError(f"{where}: expected true or false, got {_json_kind(value)}")
        return value
    if tp is Duration:
        if isinstance(value, bool) or not isinstance(value, (int, float, _HugeInt)):
            raise DecodeError(
                f"{where}: expected nanoseconds (an integer), got " f"{_json_kind(value)}"
            )
        return Duration(_decode_int(value, where, mode, _INT64) / 1e9)
    if tp is int:
        return _decode_int(value, where, mode, _meta(metas, GoInt) or _INT64)
    if tp is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and value != value)
        ):
            raise DecodeError(f"{where}: expected a number, got {_json_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected a string, got {_json_kind(value)}")
        return _decode_text(value, where, mode, metas, MAX_STRING)
    if tp is bytes:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected base64 text, got {_json_kind(value)}")
        max_len = _meta(metas, MaxLen)
        limit = max_len.limit if max_len else MAX_BYTES
        if not mode.trusted and len(value) > 4 * ((limit + 2) // 3):
            raise DecodeError(f"{where}: over the limit of {limit} bytes")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError(f"{where}: not valid base64") from None
    if tp is datetime.datetime:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected an RFC 3339 time, got {_json_kind(value)}")
        try:
            return parse_time(value, strict=not mode.trusted)
        except DecodeError as e:
            raise DecodeError(f"{where}: {e}") from None
    raise DecodeError(f"{where}: cannot decode into {_type_name(tp)}")


def _check_count(value: Any, where: str, mode: _Mode, metas: tuple[Any, ...]) -> None:
    if mode.trusted:
        return
    max_len = _meta(metas, MaxLen)
    limit = max_len.limit if max_len else MAX_ITEMS
    if len(value) > limit:
        raise DecodeError(f"{where}: {len(value)} elements is over the limit of {limit}")


def from_dict(
    cls: Type[T],
    data: dict[str, Any],
    where: str = "",
    *,
    trusted: bool = False,
    repairs: Optional[list[str]] = None,
) -> T:
    """
    Decode a dict into dataclass C{cls} (case-insensitive names, unknown ignored),
    validating every value.

    @param trusted: the data is from a file we wrote: repair instead of refusing
        (see the module's docstring).
    @param repairs: where trusted decoding lists what it repaired, as sentences.
    """
    if repairs is None:
        mode = _TRUSTED if trusted else _STRICT
    else:
        mode = _Mode(trusted, repairs)
    where = where or cls.__name__
    if data.__class__ is not dict:
        if not isinstance(data, dict):
            raise DecodeError(f"{where}: expected an object, got {_json_kind(data)}")
        data = dict(data)
    decoder = _DECODERS.get(cls)
    if decoder is None:
        decoder = _decoder(cls)
    return decoder(data, where, mode)


# A string, or an unterminated one up to the end (so that the scan stays linear: JSON
# never recurses into what follows an unterminated string).
_JSON_STRING_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nesting_depth(text: str) -> int:
    """
    How deeply the arrays and objects of JSON text nest, without parsing it (and
    without recursion, whatever the depth). Unterminated strings may over-count.
    """
    brackets = _NOT_BRACKET_RE.sub("", _JSON_STRING_RE.sub("", text))
    if not brackets:
        return 0
    steps = array.array("b", brackets.encode("ascii").translate(_BRACKET_STEPS))
    return max(0, max(itertools.accumulate(steps)))


_json_decode = json.JSONDecoder(parse_int=_parse_int, parse_constant=_refuse_constant).decode


def loads(data: Union[bytes, bytearray, memoryview, str]) -> Any:
    """
    Parse JSON text into plain data, refusing what Go refuses (and what would hurt):
    text nested deeper than L{MAX_DEPTH}, C{NaN}/C{Infinity}, anything after the
    value. Invalid UTF-8 in bytes is kept as lone surrogates (U+DC80-U+DCFF) so that
    L{from_dict} refuses or repairs it naming the field.

    @raise DecodeError: malformed JSON.
    """
    if isinstance(data, str):
        text = data
    else:
        text = bytes(data).decode("utf-8", "surrogateescape")
    if text.count("[") + text.count("{") > MAX_DEPTH:  # else it cannot nest deeper
        depth = nesting_depth(text)
        if depth > MAX_DEPTH:
            raise DecodeError(f"malformed JSON: nested {depth} deep; the limit is {MAX_DEPTH}")
    try:
        return _json_decode(text)
    except RecursionError:
        raise DecodeError(f"malformed JSON: nested deeper than {MAX_DEPTH}") from None
    except ValueError as e:
        raise DecodeError(f"malformed JSON: {e}") from None


def decode(
    cls: Type[T],
    data: Union[bytes, str],
    *,
    trusted: bool = False,
    repairs: Optional[list[str]] = None,
) -> T:
    """
    Decode JSON bytes into C{cls}; malformed JSON or a misfit is a L{DecodeError}.

    @param trusted: C{data} is a file we wrote (C{info.json} ...): repair ill-formed
        strings and out-of-range integers instead of refusing them, and do not
        enforce limits or formats; malformed JSON is still refused.
    @param repairs: where trusted decoding lists what it repaired (for the log).
    """
    return from_dict(cls, loads(data), trusted=trusted, repairs=repairs)


# Compiled codecs ---------------------------------------------------------------------
#
# Each dataclass gets an encoder (object -> JSON text) and a decoder (dict -> object)
# generated as Python source at its first use, with the field table folded in: names,
# Go order, omitempty, limits, formats and ranges become constants of the code. Each
# field's type is a _Kind; simple kinds are inlined, the others (lists, maps, structs,
# times) are compiled functions of their own. Anything unexpected falls back to the
# general path (_any_json, decode_value).

_ENCODERS: dict[type, Callable[[Any], str]] = {}
_DECODERS: dict[type, Callable[[dict[str, Any], str, _Mode], Any]] = {}
_MISSING = object()
_COMPILING = threading.RLock()
"""Held while code is generated (threads encode and decode too)."""
_PENDING: dict[tuple[str, type], Callable[..., Any]] = {}
"""Stand-ins for what is being compiled, for recursive types."""


class _Kind:
    """
    What the codec knows about a declared type: its C{tag} (C{str}, C{path}, C{bool},
    C{int}, C{float}, C{duration}, C{enum}, C{time}, C{bytes}, C{list}, C{dict},
    C{struct}, C{optional}, C{any}) and what the generated code needs of it.
    """

    def __init__(self, tp: Any, nonnil: bool = False) -> None:
        self.tp = tp
        self.nonnil = nonnil
        self.low = self.high = 0
        self.limit = self.key_limit = 0
        self.check: Optional[Callable[[str], bool]] = None
        self.item: Optional[_Kind] = None
        self.key: Optional[_Kind] = None
        self.cls: Any = None
        inner = _optional_inner(tp)
        base, metas = _unwrap(tp if inner is None else inner)
        origin = typing.get_origin(base)
        max_len = _meta(metas, MaxLen)
        if inner is not None and base is not datetime.datetime:
            self.tag = "optional"
            self.item = _Kind(inner)
        elif base is datetime.datetime:
            self.tag = "time"  # a Go time.Time: None is the zero time
        elif base is str:
            fmt = _meta(metas, TextFormat)
            self.tag = "path" if _meta(metas, OsPath) is not None else "str"
            self.limit = max_len.limit if max_len else (fmt.limit if fmt else MAX_STRING)
            self.key_limit = max_len.limit if max_len else (fmt.limit if fmt else MAX_KEY)
            self.check = fmt.check if fmt else None
        elif base is bool:
            self.tag = "bool"
        elif base is int:
            self.tag = "int"
            go = _meta(metas, GoInt) or _INT64
            self.low, self.high = go.low, go.high
        elif base is Duration:
            self.tag = "duration"
        elif base is float:
            self.tag = "float"
        elif base is bytes:
            self.tag = "bytes"
        elif isinstance(base, type) and issubclass(base, TextEnum):
            self.tag = "enum"
            self.cls = base
        elif origin is list:
            self.tag = "list"
            self.limit = max_len.limit if max_len else MAX_ITEMS
            self.item = _Kind(typing.get_args(base)[0])
        elif origin is dict:
            self.tag = "dict"
            self.limit = max_len.limit if max_len else MAX_ITEMS
            key_tp, item_tp = typing.get_args(base)
            self.key = _Kind(key_tp)
            self.item = _Kind(item_tp)
            if self.key.tag != "str":
                self.tag = "any"
        elif dataclasses.is_dataclass(base):
            self.tag = "struct"
            self.cls = base
        else:
            self.tag = "any"
        self._enc: Optional[Callable[[Any], str]] = None
        self._dec: Optional[Callable[[Any, str, _Mode], Any]] = None
        self.empty = "null"
        if nonnil:
            self.empty = {"list": "[]", "dict": "{}", "bytes": '""'}.get(self.tag, "null")

    # Encoding ---------------------------------------------------------------------

    def enc_expr(self, v: str, ns: dict[str, Any]) -> str:
        """
        A Python expression giving the JSON text of the value in variable C{v}.
        """
        tag = self.tag
        if tag == "str":
            return f"(_quote({v}) if {v}.__class__ is str else _any_json({v}))"
        if tag == "bool":
            return f"('true' if {v} is True else 'false' if {v} is False else _any_json({v}))"
        if tag == "int":
            return (
                f"(str({v}) if {v}.__class__ is int and {self.low} <= {v} <= {self.high}"
                f" else _clamped_json({v}, {self.low}, {self.high}))"
            )
        if tag == "enum":
            texts = _name(ns, {m: _quote(m.value) for m in self.cls})
            cls = _name(ns, self.cls)
            return f"({texts}[{v}] if {v}.__class__ is {cls} else _any_json({v}))"
        if tag == "optional":
            assert self.item is not None
            return f"('null' if {v} is None else {self.item.enc_expr(v, ns)})"
        simple = {
            "path": "_path_json",
            "duration": "_duration_json",
            "float": "_float_json",
            "time": "_time_json",
            "any": "_any_json",
        }
        if tag in simple:
            return f"{simple[tag]}({v})"
        if tag == "bytes":
            empty = _name(ns, self.empty)
            return f"(_bytes_json({v}) if {v} else {empty} if {v} is not None else 'null')"
        if tag == "struct":
            cls = _name(ns, self.cls)
            encoder = _name(ns, _encoder(self.cls))
            return f"({encoder}({v}) if {v}.__class__ is {cls} else _any_json({v}))"
        return f"{_name(ns, self.encoder())}({v})"

    def encoder(self) -> Callable[[Any], str]:
        """
        The compiled encoder of a list or map kind.
        """
        if self._enc is not None:
            return self._enc
        with _COMPILING:
            return self._compile_encoder()

    def _compile_encoder(self) -> Callable[[Any], str]:
        if self._enc is None:
            ns: dict[str, Any] = dict(_NAMESPACE)
            empty = _name(ns, self.empty)
            assert self.item is not None
            item = self.item.enc_expr("x", ns)
            if self.tag == "list":
                if self.item.tag == "str":
                    body = '"[" + ",".join(map(_quote, v)) + "]"'
                    check = "all(x.__class__ is str for x in v)"
                    source = (
                        f"def enc(v):\n"
                        f"    if v.__class__ is not list:\n"
                        f"        return _any_json(v)\n"
                        f"    if not v:\n"
                        f"        return {empty}\n"
                        f"    if {check}:\n"
                        f"        return {body}\n"
                        f'    return "[" + ",".join([{item} for x in v]) + "]"\n'
                    )
                else:
                    source = (
                        f"def enc(v):\n"
                        f"    if v.__class__ is not list:\n"
                        f"        return _any_json(v)\n"
                        f"    if not v:\n"
                        f"        return {empty}\n"
                        f'    return "[" + ",".join([{item} for x in v]) + "]"\n'
                    )
            else:
                source = (
                    f"def enc(v):\n"
                    f"    if v.__class__ is not dict:\n"
                    f"        return _any_json(v)\n"
                    f"    if not v:\n"
                    f"        return {empty}\n"
                    f"    try:\n"
                    f"        keys = sorted(v)\n"
                    f"    except TypeError:\n"
                    f"        return _any_json(v)\n"
                    f"    if keys[0].__class__ is not str or keys[-1].__class__ is not str:\n"
                    f"        return _any_json(v)\n"
                    f'    return "{{" + ",".join([_quote(k) + ":" + {item} '
                    f'for k in keys for x in (v[k],)]) + "}}"\n'
                )
            self._enc = _compile(source, "enc", ns)
        return self._enc

    # Decoding ---------------------------------------------------------------------

    def dec_expr(self, x: str, where: str, ns: dict[str, Any]) -> str:
        """
        A Python expression decoding the JSON value in variable C{x}; C{where} is an
        expression for the field's path (evaluated only when needed, except for
        structs, lists and maps, which pass it on). The generated code has C{tr}
        (trusted) and C{mode} in scope.
        """
        tag = self.tag
        slow = f"decode_value({_name(ns, self.tp)}, {x}, {where}, mode)"
        if tag in ("str", "path"):
            test = f"len({x}) <= {self.limit}"
            if self.check is not None:
                test += f" and (not {x} or {_name(ns, self.check)}({x}))"
            return (
                f"({x} if {x}.__class__ is str and {x}.isascii() and (tr or ({test}))"
                f" else {slow})"
            )
        if tag == "bool":
            return f"({x} if {x} is True or {x} is False else {slow})"
        if tag == "int":
            return (
                f"({x} if {x}.__class__ is int and {self.low} <= {x} <= {self.high}"
                f" else {slow})"
            )
        if tag == "enum":
            members = _name(ns, self.cls._value2member_map_)
            return f"({members}[{x}] if {x}.__class__ is str and {x} in {members} else {slow})"
        if tag == "duration":
            return (
                f"(Duration({x} / 1e9) if {x}.__class__ is int and "
                f"-9223372036854775808 <= {x} <= 9223372036854775807 else {slow})"
            )
        if tag == "time":
            return f"_decode_time({x}, {_name(ns, self.tp)}, {where}, mode)"
        if tag == "bytes":
            return f'(b"" if {x} is None else {slow})'
        if tag == "optional":
            assert self.item is not None
            return f"(None if {x} is None else {self.item.dec_expr(x, where, ns)})"
        if tag == "struct":
            decoder = _name(ns, _decoder(self.cls))
            return f"({decoder}({x}, {where}, mode) if {x}.__class__ is dict else {slow})"
        if tag in ("list", "dict"):
            decoder = _name(ns, self.decoder())
            empty = "[]" if tag == "list" else "{}"
            return (
                f"({decoder}({x}, {where}, mode) if {x}.__class__ is {tag}"
                f" else {empty} if {x} is None else {slow})"
            )
        return slow

    def decoder(self) -> Callable[[Any, str, _Mode], Any]:
        """
        The compiled decoder of a list or map kind: C{(value, where, mode)}.
        """
        if self._dec is not None:
            return self._dec
        with _COMPILING:
            return self._compile_decoder()

    def _compile_decoder(self) -> Callable[[Any, str, _Mode], Any]:
        if self._dec is None:
            ns: dict[str, Any] = dict(_NAMESPACE)
            assert self.item is not None
            limit = self.limit
            head = (
                f"def dec(v, w, mode):\n"
                f"    tr = mode.trusted\n"
                f"    if not tr and len(v) > {limit}:\n"
                f'        raise DecodeError(f"{{w}}: {{len(v)}} elements is over the limit"\n'
                f'                          " of {limit}")\n'
            )
            if self.tag == "list":
                item = self.item.dec_expr("x", 'f"{w}[{i}]"', ns)
                source = head + f"    return [{item} for i, x in enumerate(v)]\n"
            else:
                assert self.key is not None
                key_metas = _name(ns, _unwrap(self.key.tp)[1])
                key_test = f"len(k) <= {self.key.key_limit}"
                if self.key.check is not None:
                    key_test += f" and (not k or {_name(ns, self.key.check)}(k))"
                item = self.item.dec_expr("x", 'f"{w}[{_show(k)}]"', ns)
                source = head + (
                    f"    out = {{}}\n"
                    f"    for k, x in v.items():\n"
                    f"        key = k\n"
                    f"        if k.__class__ is not str or not (\n"
                    f"            k.isascii() and (tr or ({key_test}))\n"
                    f"        ):\n"
                    f"            if not isinstance(k, str):\n"
                    f'                raise DecodeError(f"{{w}}: keys must be strings, got "\n'
                    f'                                  f"{{_show(k)}}")\n'
                    f'            key = _decode_text(k, f"{{w}} key {{_show(k)}}", mode,\n'
                    f"                               {key_metas}, {MAX_KEY})\n"
                    f"        out[key] = {item}\n"
                    f"    return out\n"
                )
            self._dec = _compile(source, "dec", ns)
        return self._dec


def _decode_time(value: Any, tp: Any, where: str, mode: _Mode) -> Any:
    """
    A time field: the common RFC 3339 form directly, anything else (null, another
    form, an error) by L{decode_value}.
    """
    if value.__class__ is str:
        if value.startswith("0001-01-01T00:00:00"):
            return None  # Go's zero time (as parse_time)
        parsed = _fast_time(value)
        if parsed is not _NOT_A_TIME:
            return parsed
    elif value is None:
        return None
    return decode_value(tp, value, where, mode)


_KINDS: dict[tuple[Any, bool], _Kind] = {}


def _kind(tp: Any, nonnil: bool = False) -> _Kind:
    key = (tp, nonnil)
    kind = _KINDS.get(key)
    if kind is None:
        kind = _KINDS[key] = _Kind(tp, nonnil)
    return kind


def _name(ns: dict[str, Any], value: Any) -> str:
    """
    Bind C{value} to a fresh name in the namespace of generated code.
    """
    name = f"_c{len(ns)}"
    ns[name] = value
    return name


def _compile(source: str, name: str, ns: dict[str, Any], label: str = "") -> Any:
    """
    Run generated source in namespace C{ns}; return what it defines as C{name}.
    """
    exec(compile(source, f"<hypervisor.codec {label or name}>", "exec"), ns)  # noqa: S102
    return ns[name]


@dataclasses.dataclass
class _Field:
    """
    One JSON field of a dataclass (embedded structs flattened).

    @ivar path: the attribute names leading to it (one, or more through embeds).
    """

    name: str
    path: tuple[str, ...]
    kind: _Kind
    omitempty: bool
    default: Any
    factory: Any


def _flatten(cls: type) -> list[_Field]:
    hints = _hints(cls)
    out: list[_Field] = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("embed"):
            for sub in _flatten(hints[f.name]):
                sub.path = (f.name,) + sub.path
                out.append(sub)
            continue
        out.append(
            _Field(
                f.name,
                (f.name,),
                _kind(hints[f.name], bool(f.metadata.get("nonnil"))),
                bool(f.metadata.get("omitempty")),
                f.default,
                f.default_factory,
            )
        )
    return out


def _json_fields(cls: type) -> list[_Field]:
    """
    The JSON fields of C{cls} in Go's order.
    """
    fields = _flatten(cls)
    names = [f.name for f in fields]
    if len(set(names)) != len(names):
        raise TypeError(f"{cls.__name__} has two JSON fields of the same name")
    order = getattr(cls, GO_ORDER, None)
    if order is not None:
        if sorted(order) != sorted(names):
            raise TypeError(f"{cls.__name__}.{GO_ORDER} must name each JSON field once")
        by_name = {f.name: f for f in fields}
        fields = [by_name[name] for name in order]
    return fields


_NAMESPACE: dict[str, Any] = {}
"""The globals of generated code (filled in at the end of the module)."""


def _encoder(cls: type) -> Callable[[Any], str]:
    """
    The compiled encoder of dataclass C{cls}: object -> JSON text.
    """
    compiled = _ENCODERS.get(cls)
    if compiled is not None:
        return compiled
    with _COMPILING:
        compiled = _ENCODERS.get(cls) or _PENDING.get(("enc", cls))
        if compiled is not None:
            return compiled
        # A recursive type's code calls the encoder through the table: it runs
        # only once the table has it.
        _PENDING[("enc", cls)] = lambda obj: _ENCODERS[cls](obj)
        try:
            compiled = _compile_encoder(cls)
        finally:
            del _PENDING[("enc", cls)]
        _ENCODERS[cls] = compiled
        return compiled


def _compile_encoder(cls: type) -> Callable[[Any], str]:
    ns: dict[str, Any] = dict(_NAMESPACE)
    lines = ["def enc(o):", "    p = []", "    a = p.append"]
    holders: dict[tuple[str, ...], str] = {(): "o"}
    for f in _json_fields(cls):
        for depth in range(1, len(f.path)):
            prefix = f.path[:depth]
            if prefix not in holders:
                holders[prefix] = f"e{len(holders)}"
                lines.append(f"    {holders[prefix]} = {holders[prefix[:-1]]}.{prefix[-1]}")
        holder = holders[f.path[:-1]]
        lines.append(f"    v = {holder}.{f.path[-1]}")
        label = _quote(f.name) + ":"
        text = f.kind.enc_expr("v", ns)
        tag = f.kind.tag
        if not f.omitempty or tag in ("time", "struct"):
            lines.append(f"    a({label!r} + {text})")
        elif tag == "optional":
            lines.append(f"    if v is not None:")
            lines.append(f"        a({label!r} + {text})")
        elif tag in ("duration", "enum", "int", "float", "any"):
            lines.append(f"    t = {text}")
            zero = '"' + next(iter(f.kind.cls)).value + '"' if tag == "enum" else "0"
            if tag == "any":
                lines.append(f"    if not _is_zero(v):")
            else:
                lines.append(f"    if t != {zero!r}:")
            lines.append(f"        a({label!r} + t)")
        else:
            lines.append(f"    if v:")
            lines.append(f"        a({label!r} + {text})")
    lines.append('    return "{" + ",".join(p) + "}"')
    return _compile("\n".join(lines) + "\n", "enc", ns, f"encoder of {cls.__name__}")


def _maker(cls: type) -> Callable[[dict[str, Any]], Any]:
    """
    Build an instance of dataclass C{cls} from all its fields: its C{__dict__}
    directly when that is what its C{__init__} would do, else C{__init__}.
    """
    plain = (
        not hasattr(cls, "__slots__")
        and not hasattr(cls, "__post_init__")
        and all(f.init for f in dataclasses.fields(cls))
        and not getattr(cls, "__dataclass_params__").frozen
    )
    if not plain:
        return lambda values: cls(**values)
    new = object.__new__

    def make(values: dict[str, Any]) -> Any:
        obj: Any = new(cls)
        obj.__dict__ = values
        return obj

    return make


def _decoder(cls: type) -> Callable[[dict[str, Any], str, _Mode], Any]:
    """
    The compiled decoder of dataclass C{cls}: (dict, where, mode) -> object.
    """
    compiled = _DECODERS.get(cls)
    if compiled is not None:
        return compiled
    with _COMPILING:
        compiled = _DECODERS.get(cls) or _PENDING.get(("dec", cls))
        if compiled is not None:
            return compiled
        _PENDING[("dec", cls)] = lambda data, where, mode: _DECODERS[cls](data, where, mode)
        try:
            compiled = _compile_decoder(cls)
        finally:
            del _PENDING[("dec", cls)]
        _DECODERS[cls] = compiled
        return compiled


def _compile_decoder(cls: type) -> Callable[[dict[str, Any], str, _Mode], Any]:
    ns: dict[str, Any] = dict(_NAMESPACE)
    fields = _json_fields(cls)
    keys = _name(ns, frozenset(f.name for f in fields))
    folded = _name(ns, {f.name.lower(): f.name for f in fields})
    lines = [
        "def dec(data, where, mode):",
        f"    if not {keys}.issuperset(data):",
        f"        data = _fold(data, {folded})",
        "    tr = mode.trusted",
        "    g = data.get",
    ]
    local: dict[tuple[str, ...], str] = {}
    for n, f in enumerate(fields):
        var = f"f{n}"
        local[f.path] = var
        if f.factory is list or f.factory is dict:
            default = "[]" if f.factory is list else "{}"
        elif f.factory is not dataclasses.MISSING:
            default = f"{_name(ns, f.factory)}()"
        elif f.default is not dataclasses.MISSING:
            default = _name(ns, f.default)
        else:
            default = "_missing_field()"
        lines.append(f"    x = g({f.name!r}, _MISSING)")
        lines.append(
            f"    {var} = {default} if x is _MISSING else "
            f"{f.kind.dec_expr('x', '(where + ' + repr('.' + f.name) + ')', ns)}"
        )

    def build(owner: type, prefix: tuple[str, ...]) -> str:
        hints = _hints(owner)
        items = []
        for f in dataclasses.fields(owner):
            path = prefix + (f.name,)
            if f.metadata.get("embed"):
                items.append(f"{f.name!r}: {build(hints[f.name], path)}")
            else:
                items.append(f"{f.name!r}: {local[path]}")
        return f"{_name(ns, _maker(owner))}({{{', '.join(items)}}})"

    lines.append(f"    return {build(cls, ())}")
    return _compile("\n".join(lines) + "\n", "dec", ns, f"decoder of {cls.__name__}")


def _fold(data: dict[str, Any], folded: dict[str, str]) -> dict[str, Any]:
    """
    C{data} with its known keys matched case-insensitively, the last of several
    spellings winning (Go's rule), and unknown keys dropped.
    """
    out = {}
    for key, value in data.items():
        name = folded.get(str(key).lower())
        if name is not None:
            out[name] = value
    return out


def _missing_field() -> Any:
    raise TypeError("a dataclass field without a default cannot be decoded when absent")


_NAMESPACE.update(
    {
        "_quote": _quote,
        "_any_json": _any_json,
        "_clamped_json": _clamped_json,
        "_path_json": _path_json,
        "_duration_json": _duration_json,
        "_float_json": _float_json,
        "_time_json": _time_json,
        "_bytes_json": _bytes_json,
        "_is_zero": _is_zero,
        "_encoder": _encoder,
        "_decoder": _decoder,
        "_decode_time": _decode_time,
        "_decode_text": _decode_text,
        "_show": _show,
        "_fold": _fold,
        "_missing_field": _missing_field,
        "_MISSING": _MISSING,
        "decode_value": decode_value,
        "DecodeError": DecodeError,
        "Duration": Duration,
    }
)
