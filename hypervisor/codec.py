# -*- test-case-name: tests.test_model -*-
"""
The one JSON codec for our model: dataclasses <-> Go's C{encoding/json} shapes.

Rules (reference §12.3):

- field names are the Go field names (the dataclass field names);
- decoding matches names case-insensitively and ignores unknown fields, as Go does;
  a value of the wrong type is a L{DecodeError} naming the field;
- fields marked C{omitempty} are left out when zero (Go's rule), others always written;
- an C{embed} field is flattened into its parent (Go's embedded structs);
- L{TextEnum} values are their lower-case text; C{bytes} are standard base64;
  C{datetime} is RFC 3339 (C{None} <-> Go's zero time); L{Duration} is integer
  nanoseconds.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime
import enum
import json
import types
import typing
from typing import Any, Optional, Type, TypeVar, Union

T = TypeVar("T")

GO_ZERO_TIME = "0001-01-01T00:00:00Z"


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
        raise DecodeError(f"unknown {cls.__name__} {text!r} (valid: {valid})")


class Duration(float):
    """
    Seconds in Python, integer nanoseconds on the wire (Go's time.Duration).
    """


def field(*, omitempty: bool = False, embed: bool = False, default: Any = dataclasses.MISSING,
          default_factory: Any = dataclasses.MISSING) -> Any:
    """
    A dataclass field with codec options.
    """
    metadata = {"omitempty": omitempty, "embed": embed}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


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


def encode_value(value: Any) -> Any:
    """
    Turn a model value into plain JSON data.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, TextEnum):
        return value.value
    if isinstance(value, Duration):
        return int(round(value * 1e9))
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, datetime.datetime):
        return format_time(value)
    if isinstance(value, list):
        return [encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: encode_value(v) for k, v in value.items()}
    return value


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
        if value is None and hints[f.name] == Optional[datetime.datetime]:
            out[f.name] = GO_ZERO_TIME  # omitempty never omits a Go struct
            continue
        if f.metadata.get("omitempty") and _is_zero(value):
            continue
        out[f.name] = encode_value(value)
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


def parse_time(text: str) -> Optional[datetime.datetime]:
    """
    Parse RFC 3339 (with up to nanoseconds); Go's zero time is None.
    """
    if text == GO_ZERO_TIME or text.startswith("0001-01-01T00:00:00"):
        return None
    s = text.replace("Z", "+00:00")
    if "." in s:
        head, _, rest = s.partition(".")
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        zone = rest[len(digits):]
        s = f"{head}.{digits[:6].ljust(6, '0')}{zone}"
    try:
        return datetime.datetime.fromisoformat(s)
    except ValueError:
        raise DecodeError(f"{text!r} is not an RFC 3339 time") from None


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            int: "number", float: "number", type(None): "null"}.get(type(value), "value")


def decode_value(tp: Any, value: Any, where: str) -> Any:
    """
    Turn plain JSON data into a value of type C{tp}; L{DecodeError} names C{where}.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None:
            return None
        return decode_value(inner[0], value, where)
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
            return from_dict(tp, {}, where)  # type: ignore[arg-type]
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
        return [decode_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object, got {_json_kind(value)}")
        return {str(k): decode_value(args[1], v, f"{where}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DecodeError(f"{where}: expected an object, got {_json_kind(value)}")
        return from_dict(tp, value, where)  # type: ignore[arg-type]
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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError(f"{where}: expected nanoseconds (a number), got "
                              f"{_json_kind(value)}")
        return Duration(value / 1e9)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()
        ):
            raise DecodeError(f"{where}: expected an integer, got {_json_kind(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DecodeError(f"{where}: expected a number, got {_json_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected a string, got {_json_kind(value)}")
        return value
    if tp is bytes:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected base64 text, got {_json_kind(value)}")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError(f"{where}: not valid base64") from None
    if tp is datetime.datetime:
        if not isinstance(value, str):
            raise DecodeError(f"{where}: expected an RFC 3339 time, got {_json_kind(value)}")
        try:
            return parse_time(value)
        except DecodeError as e:
            raise DecodeError(f"{where}: {e}") from None
    raise DecodeError(f"{where}: cannot decode into {_type_name(tp)}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def from_dict(cls: Type[T], data: dict[str, Any], where: str = "") -> T:
    """
    Decode a dict into dataclass C{cls} (case-insensitive names, unknown ignored).
    """
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise DecodeError(f"{where}: expected an object, got {_json_kind(data)}")
    lowered = {str(k).lower(): v for k, v in data.items()}
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        tp = hints[f.name]
        if f.metadata.get("embed"):
            kwargs[f.name] = from_dict(tp, data, where)
            continue
        key = f.name.lower()
        if key in lowered:
            kwargs[f.name] = decode_value(tp, lowered[key], f"{where}.{f.name}")
    return cls(**kwargs)


def encode(obj: Any, indent: Optional[int] = None) -> bytes:
    """
    Encode a model object to JSON bytes.
    """
    return json.dumps(encode_value(obj), indent=indent, sort_keys=False).encode("utf-8")


def decode(cls: Type[T], data: Union[bytes, str]) -> T:
    """
    Decode JSON bytes into C{cls}; malformed JSON or a misfit is a L{DecodeError}.
    """
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"malformed JSON: {e}") from None
    return from_dict(cls, parsed)
