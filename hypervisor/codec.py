# -*- test-case-name: tests.test_model,tests.test_codec_fuzz -*-
"""
The one JSON codec for our model: dataclasses <-> Go's C{encoding/json} shapes.

Rules (reference §12.3):

- field names are the Go field names (the dataclass field names);
- decoding matches names case-insensitively and ignores unknown fields, as Go does;
  a value of the wrong type is a L{DecodeError} naming the field;
- fields marked C{omitempty} are left out when zero (Go's rule; a pointer, C{Optional},
  only when C{None}), others always written;
- an C{embed} field is flattened into its parent (Go's embedded structs);
- L{TextEnum} values are their lower-case text; C{bytes} are standard base64;
  C{datetime} is RFC 3339 (C{None} <-> Go's zero time); L{Duration} is integer
  nanoseconds (Go's C{time.Duration}, an C{int64}).

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
import enum
import ipaddress
import itertools
import json
import re
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


def _is_ipv4(text: str) -> bool:
    """
    Dotted-quad IPv4 (no leading zeros, no spaces), as Go's C{net.ParseIP} writes it.
    """
    if not text.isascii():
        return False
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


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
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """
    A dataclass field with codec options.
    """
    metadata = {"omitempty": omitempty, "embed": embed}
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


# Encoding ----------------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")
_NOT_ESCAPED_BYTE = re.compile("[\ud800-\udc7f\udd00-\udfff]")


def _well_formed(text: str) -> str:
    """
    C{text} with every lone surrogate replaced by U+FFFD (what Go writes and reads).
    """
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


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


def encode_value(value: Any) -> Any:
    """
    Turn a model value into plain JSON data (strings made well-formed).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, TextEnum):
        return value.value
    if isinstance(value, Duration):
        return _duration_ns(value)
    if isinstance(value, str):
        return _well_formed(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.datetime):
        return format_time(value)
    if isinstance(value, (list, tuple)):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {
            _well_formed(k) if isinstance(k, str) else k: encode_value(v) for k, v in value.items()
        }
    return value


def _encode_typed(tp: Any, value: Any) -> Any:
    """
    L{encode_value} for a value of declared type C{tp}: integers are clamped to
    their Go type's range so that a Go client can always decode what we write.
    """
    inner = _optional_inner(tp)
    if inner is not None:
        return None if value is None else _encode_typed(inner, value)
    base, metas = _unwrap(tp)
    go = _meta(metas, GoInt)
    if go is not None and isinstance(value, int) and not isinstance(value, bool):
        return max(go.low, min(go.high, value))
    if isinstance(value, str) and _meta(metas, OsPath) is not None:
        return _NOT_ESCAPED_BYTE.sub("\ufffd", value)  # a name's raw bytes stay
    origin = typing.get_origin(base)
    if origin is list and isinstance(value, list):
        element = typing.get_args(base)[0]
        return [_encode_typed(element, v) for v in value]
    if origin is dict and isinstance(value, dict):
        item = typing.get_args(base)[1]
        return {
            _well_formed(k) if isinstance(k, str) else k: _encode_typed(item, v)
            for k, v in value.items()
        }
    return encode_value(value)


def to_dict(obj: Any) -> dict[str, Any]:
    """
    Encode a model dataclass to a dict with Go field names.
    """
    out: dict[str, Any] = {}
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("embed"):
            out.update(to_dict(value))
            continue
        tp = hints[f.name]
        if value is None and _unwrap(tp)[0] == Optional[datetime.datetime]:
            out[f.name] = GO_ZERO_TIME  # omitempty never omits a Go struct
            continue
        if f.metadata.get("omitempty"):
            # A Go pointer (Optional) is empty only when nil.
            empty = value is None if _optional_inner(tp) is not None else _is_zero(value)
            if empty:
                continue
        out[f.name] = _encode_typed(tp, value)
    return out


def format_time(value: Optional[datetime.datetime]) -> str:
    """
    RFC 3339 in UTC with nanosecond precision trimmed, as Go writes it.
    """
    if value is None:
        return GO_ZERO_TIME
    value = value.astimezone(datetime.timezone.utc)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "Z"


_RFC3339_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:Z|[+-]\d{2}:\d{2})", re.ASCII
)


def parse_time(text: str, *, strict: bool = False) -> Optional[datetime.datetime]:
    """
    Parse RFC 3339 (with up to nanoseconds); Go's zero time is None.

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
    if "." in s:
        head, _, rest = s.partition(".")
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        zone = rest[len(digits) :]
        s = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        value = datetime.datetime.fromisoformat(s)
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.timezone.utc)
        value.astimezone(datetime.timezone.utc)  # representable in UTC
    except (ValueError, OverflowError):
        raise DecodeError(f"{_show(text)} is not an RFC 3339 time") from None
    return value


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


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls, include_extras=True)
        _HINTS[cls] = hints
    return hints


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
    mode = _Mode(trusted, repairs)
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise DecodeError(f"{where}: expected an object, got {_json_kind(data)}")
    lowered = {str(k).lower(): v for k, v in data.items()}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if f.metadata.get("embed"):
            kwargs[f.name] = from_dict(tp, data, where, trusted=trusted, repairs=repairs)
            continue
        key = f.name.lower()
        if key in lowered:
            kwargs[f.name] = decode_value(tp, lowered[key], f"{where}.{f.name}", mode)
    return cls(**kwargs)


def encode(obj: Any, indent: Optional[int] = None) -> bytes:
    """
    Encode a model object to JSON bytes (ASCII: other characters are escaped).
    """
    return json.dumps(encode_value(obj), indent=indent, sort_keys=False).encode("utf-8")


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
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise DecodeError(f"malformed JSON: nested {depth} deep; the limit is {MAX_DEPTH}")
    try:
        return json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
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
