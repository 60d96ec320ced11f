"""
Fuzzing the request decoder (L{hypervisor.codec}) over every type of
L{hypervisor.model} and every request type of L{hypervisor.api.METHODS}.

Properties (bounded for CI; C{bench/fuzz_decoder.py} runs the same targets longer):

- C{decode(encode(x)) == x} for every valid value of every type;
- for JSON shaped like a type but hostile (lone surrogates, raw invalid UTF-8,
  over-long strings and lists, integers out of their Go range, NaN, wrong kinds),
  for arbitrary JSON, for arbitrary and mutated bytes and for deep nesting, strict
  decoding raises only L{codec.DecodeError}, and what it returns has only
  well-formed strings within their limits and syntax and integers within their Go
  type's range (checked here independently of the codec's own code);
- trusted decoding (our state files) raises only L{codec.DecodeError} too, and
  repairs rather than refuses: its strings are well-formed, its integers in range.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import string
import typing
from typing import Any, Callable, Iterator, Optional

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import api, codec, model

# The types under test --------------------------------------------------------------


def _model_types() -> list[type]:
    seen: dict[str, type] = {}
    for value in vars(model).values():
        if (
            isinstance(value, type)
            and dataclasses.is_dataclass(value)
            and value.__module__ == model.__name__
        ):
            seen[value.__name__] = value
    for spec in api.METHODS.values():
        seen.setdefault(spec.request.__name__, spec.request)
    return [seen[name] for name in sorted(seen)]


TYPES = _model_types()
FIELDED_TYPES = [t for t in TYPES if dataclasses.fields(t)]
REQUEST_TYPES = sorted({spec.request for spec in api.METHODS.values()}, key=lambda t: t.__name__)

# An independent statement of the rules (not the codec's code) ---------------------

GO_RANGES = {
    "int8": (-128, 127),
    "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "int": (-(2**63), 2**63 - 1),
    "uint8": (0, 255),
    "uint16": (0, 65535),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**64 - 1),
    "uint": (0, 2**64 - 1),
}
HEX = set("0123456789abcdefABCDEF")
LABEL_CHARS = set(string.ascii_letters + string.digits + "-")


def is_ipv4(text: str) -> bool:
    """
    Four decimal parts 0-255, no leading zeros.
    """
    parts = text.split(".")
    return len(parts) == 4 and all(
        p
        and len(p) <= 3
        and all(c in "0123456789" for c in p)
        and str(int(p)) == p
        and int(p) <= 255
        for p in parts
    )


def is_hostname(text: str) -> bool:
    """
    RFC 1123 host name.
    """
    if len(text) > 253:
        return False
    return all(
        1 <= len(label) <= 63
        and set(label) <= LABEL_CHARS
        and not label.startswith("-")
        and not label.endswith("-")
        for label in text.split(".")
    )


def is_mac(text: str) -> bool:
    """
    Six hex pairs with one kind of separator.
    """
    if len(text) != 17 or text[2] not in ":-":
        return False
    return all(text[i] == text[2] for i in (2, 5, 8, 11, 14)) and all(
        text[i] in HEX and text[i + 1] in HEX for i in range(0, 17, 3)
    )


FORMATS: dict[str, Callable[[str], bool]] = {
    codec.IPV4.description: is_ipv4,
    codec.HOSTNAME.description: is_hostname,
    codec.MAC.description: is_mac,
}


def _split(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if typing.get_origin(tp) is typing.Annotated:
        return typing.get_args(tp)[0], tuple(tp.__metadata__)
    return tp, ()


def _find(metas: tuple[Any, ...], kind: type) -> Any:
    return next((m for m in metas if isinstance(m, kind)), None)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def problems(
    value: Any, tp: Any, where: str, strict: bool, default_limit: int = codec.MAX_STRING
) -> Iterator[str]:
    """
    Every way C{value} breaks the rules for type C{tp} (limits and syntax only when
    C{strict}); well-formedness and Go ranges always.
    """
    if typing.get_origin(tp) is typing.Union:
        if value is None:
            return
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    base, metas = _split(tp)
    max_len = _find(metas, codec.MaxLen)
    origin = typing.get_origin(base)
    if dataclasses.is_dataclass(base):
        if not isinstance(value, base):
            yield f"{where}: {type(value).__name__} is not {base.__name__}"
            return
        hints = _hints(base)
        for f in dataclasses.fields(base):
            yield from problems(getattr(value, f.name), hints[f.name], f"{where}.{f.name}", strict)
    elif origin is list:
        if not isinstance(value, list):
            yield f"{where}: not a list"
            return
        if strict and len(value) > (max_len.limit if max_len else codec.MAX_ITEMS):
            yield f"{where}: {len(value)} elements"
        for i, v in enumerate(value):
            yield from problems(v, typing.get_args(base)[0], f"{where}[{i}]", strict)
    elif origin is dict:
        if not isinstance(value, dict):
            yield f"{where}: not a dict"
            return
        if strict and len(value) > (max_len.limit if max_len else codec.MAX_ITEMS):
            yield f"{where}: {len(value)} entries"
        key_tp, value_tp = typing.get_args(base)
        for k, v in value.items():
            yield from problems(k, key_tp, f"{where} key {k!a}", strict, codec.MAX_KEY)
            yield from problems(v, value_tp, f"{where}[{k!a}]", strict)
    elif base is str:
        if not isinstance(value, str):
            yield f"{where}: not a str"
            return
        # A file name of ours may keep its undecodable bytes when trusted.
        errors = "surrogateescape" if not strict and _find(metas, codec.OsPath) else "strict"
        try:
            value.encode("utf-8", errors)
        except UnicodeEncodeError:
            yield f"{where}: ill-formed {value!a}"
        if strict:
            fmt = _find(metas, codec.TextFormat)
            limit = max_len.limit if max_len else (fmt.limit if fmt else default_limit)
            if len(value) > limit:
                yield f"{where}: {len(value)} characters"
            if fmt is not None and value and not FORMATS[fmt.description](value):
                yield f"{where}: {value!a} is not {fmt.description}"
    elif base is int:
        go = _find(metas, codec.GoInt)
        if go is None:
            yield f"{where}: int without a Go type"
            return
        low, high = GO_RANGES[go.go_type]
        if type(value) is not int or not low <= value <= high:
            yield f"{where}: {value!a} is not a {go.go_type}"
    elif base is codec.Duration:
        # int64 nanoseconds, as seconds in a float (which rounds 2**63 - 1 up).
        if (
            not isinstance(value, codec.Duration)
            or not math.isfinite(value)
            or not (-(2**63) / 1e9 <= value <= (2**63 - 1) / 1e9)
        ):
            yield f"{where}: {value!a} is not a Duration"
    elif base is bytes:
        if not isinstance(value, bytes):
            yield f"{where}: not bytes"
        elif strict and len(value) > (max_len.limit if max_len else codec.MAX_BYTES):
            yield f"{where}: {len(value)} bytes"
    elif base is bool:
        if type(value) is not bool:
            yield f"{where}: not a bool"
    elif base is datetime.datetime:
        if value is not None and (not isinstance(value, datetime.datetime) or value.tzinfo is None):
            yield f"{where}: {value!a} is not an aware datetime"
    elif isinstance(base, type) and issubclass(base, codec.TextEnum):
        if not isinstance(value, base):
            yield f"{where}: not a {base.__name__}"
    else:
        yield f"{where}: unexpected type {base!a}"


def assert_valid(case: SynchronousTestCase, obj: Any, cls: type, strict: bool) -> None:
    """
    Fail with the list of problems of a decoded object, if any.
    """
    found = list(problems(obj, cls, cls.__name__, strict))
    case.assertEqual(found, [], f"decoded {cls.__name__} breaks the rules")


# Valid values, derived from the annotations ---------------------------------------

HOSTNAMES = st.from_regex(
    r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}[a-zA-Z0-9])?(\.[a-zA-Z0-9]([a-zA-Z0-9-]{0,8}"
    r"[a-zA-Z0-9])?){0,3}",
    fullmatch=True,
)
LONG_HOSTNAME = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
IPV4S = st.ip_addresses(v=4).map(str)
MACS = st.tuples(st.binary(min_size=6, max_size=6), st.sampled_from(":-"), st.booleans()).map(
    lambda t: t[1].join(f"{x:02X}" if t[2] else f"{x:02x}" for x in t[0])
)
TIMES = st.datetimes(
    min_value=datetime.datetime(1900, 1, 1),
    max_value=datetime.datetime(9000, 1, 1),
    timezones=st.just(datetime.timezone.utc),
)


@functools.lru_cache(maxsize=None)
def valid(tp: Any, default_limit: int = codec.MAX_STRING) -> st.SearchStrategy[Any]:
    """
    Valid values of type C{tp}: within limits, formats and Go ranges.
    """
    if typing.get_origin(tp) is typing.Union:
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        return st.none() | valid(inner)
    base, metas = _split(tp)
    max_len = _find(metas, codec.MaxLen)
    origin = typing.get_origin(base)
    if dataclasses.is_dataclass(base):
        hints = _hints(base)
        return st.builds(base, **{f.name: valid(hints[f.name]) for f in dataclasses.fields(base)})
    if origin is list:
        limit = max_len.limit if max_len else codec.MAX_ITEMS
        return st.lists(valid(typing.get_args(base)[0]), max_size=min(limit, 3))
    if origin is dict:
        key_tp, value_tp = typing.get_args(base)
        limit = max_len.limit if max_len else codec.MAX_ITEMS
        return st.dictionaries(
            valid(key_tp, codec.MAX_KEY), valid(value_tp), max_size=min(limit, 3)
        )
    if base is str:
        fmt = _find(metas, codec.TextFormat)
        if fmt is codec.IPV4:
            return st.just("") | IPV4S
        if fmt is codec.HOSTNAME:
            return st.just("") | st.just(LONG_HOSTNAME) | HOSTNAMES
        if fmt is codec.MAC:
            return st.just("") | MACS
        limit = max_len.limit if max_len else default_limit
        # Any well-formed text (hypothesis never draws surrogates), sometimes the
        # longest allowed.
        short = st.text(max_size=12)
        return st.one_of(short, short, short, st.just(limit).map(lambda n: "\U0001f600" * n))
    if base is int:
        low, high = GO_RANGES[_find(metas, codec.GoInt).go_type]
        return st.integers(low, high)
    if base is codec.Duration:
        return st.integers(-(2**48), 2**48).map(lambda n: codec.Duration(n / 1e9))
    if base is bool:
        return st.booleans()
    if base is bytes:
        return st.binary(max_size=24)
    if base is datetime.datetime:
        return TIMES
    if isinstance(base, type) and issubclass(base, codec.TextEnum):
        return st.sampled_from(list(base))
    raise AssertionError(f"no strategy for {base!r}")


# Hostile JSON shaped like a type ---------------------------------------------------

SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
HOSTILE_TEXT = st.one_of(
    st.lists(st.one_of(st.characters(), SURROGATES), max_size=8).map("".join),
    st.sampled_from(
        [
            "",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "é.example",
            "a" * 64,
            " 10.0.0.1",
            "10.0.0.256",
            "01.2.3.4",
            "1.2.3",
            "::1",
            "52:54:0a:02:03",
            "52:54:0a:02:03:04:05",
            "52-54:0a:02:03:04",
            "\x00",
            "\udc80x",
            "\ud83d",
            "\ud83d\ude00",
            "2024-01-01",
            "0001-01-01T00:30:00+01:00",
            "2024-01-01T00:00:00",
            "9999-12-31T23:59:59-01:00",
            "running",
            "AAAA",
            "!!",
        ]
    ),
    st.integers(0, 3).map(lambda k: "x" * [253, 254, 4097, 65537][k]),
)
HOSTILE_NUMBER = st.one_of(
    st.integers(),
    st.sampled_from(
        [
            -1,
            2**63 - 1,
            2**63,
            2**64 - 1,
            2**64,
            -(2**63) - 1,
            10**400,
            -(10**400),
            10**309,
            1.5,
            1e309,
            -1e309,
            2e9,
            1e19,
            1.8446744073709552e19,
            float("nan"),
            float("inf"),
            -0.0,
        ]
    ),
    st.floats(),
)
SCALARS = st.one_of(st.none(), st.booleans(), HOSTILE_NUMBER, HOSTILE_TEXT)
NEAR_MISSES = {
    codec.IPV4.description: [
        "10.0.0",
        "10.0.0.1.2",
        "010.0.0.1",
        "10.0.0.256",
        " 10.0.0.1",
        "10.0.0.1 ",
        "::1",
        "::ffff:10.0.0.1",
        "10.0.0.-1",
        "1e1.0.0.1",
        "\u0661.0.0.1",
        "10.0.0.1\n",
    ],
    codec.HOSTNAME.description: [
        "-a",
        "a-",
        "a.-b",
        "a..b",
        ".a",
        "a.",
        "a_b",
        "a b",
        "a" * 64,
        ".".join(["a" * 63] * 4),
        "caf\u00e9",
        "a\n",
        "a\x00",
        "*.example",
    ],
    codec.MAC.description: [
        "52:54:00:00:00",
        "52:54:00:00:00:00:00",
        "52:54-00:00:00:00",
        "5254.0000.0001",
        "52:54:00:00:00:0g",
        " 52:54:00:00:00:01",
        "525400000001",
        "52:54:00:00:00:1",
    ],
}
"""Values that almost have a field's syntax."""


JSON_VALUES = st.recursive(
    SCALARS,
    lambda c: st.lists(c, max_size=4)
    | st.dictionaries(
        HOSTILE_TEXT
        | st.sampled_from(
            [
                "Address",
                "IpAddress",
                "Tags",
                "Volumes",
                "VMs",
                "Subnets",
                "Free",
                "MemoryInMiB",
                "VirtualCPUs",
                "DhcpTimeout",
                "Hostname",
                "State",
                "OwnerUsers",
                "StorageIndices",
                "VmTagsToMatch",
                "CreatedOn",
            ]
        ),
        c,
        max_size=5,
    ),
    max_leaves=20,
)
"""Arbitrary JSON, keyed often by the model's field names."""


@functools.lru_cache(maxsize=None)
def hostile(tp: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """
    JSON data shaped like C{tp}: mostly valid, with leaves that are often wrong,
    out of range or ill-formed, random-case field names and unknown fields.
    """
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    base, metas = _split(tp)
    origin = typing.get_origin(base)
    if depth > 6:
        return SCALARS
    if dataclasses.is_dataclass(base):
        fields = hints_of(base)
        unknown = st.tuples(HOSTILE_TEXT, SCALARS)
        if fields:
            known = st.sampled_from(sorted(fields)).flatmap(
                lambda n: st.tuples(_case(n), hostile(fields[n], depth + 1))
            )
            pairs = st.one_of(known, known, known, unknown)
        else:
            pairs = unknown
        objects = st.lists(pairs, max_size=8).map(dict)
        return objects if depth == 0 else st.one_of(objects, objects, objects, SCALARS)
    if origin is list:
        max_len = _find(metas, codec.MaxLen)
        limit = max_len.limit if max_len else codec.MAX_ITEMS
        element = typing.get_args(base)[0]
        lists = st.lists(hostile(element, depth + 1), max_size=3)
        # One element too many (nulls for the longer limits, to keep the JSON small;
        # the 65536 of responses and state files is left to test_model: trusted
        # decoding of so many objects is slow).
        if limit <= 64:
            too_many = valid(element).map(lambda v: [codec.encode_value(v)] * (limit + 1))
        elif limit <= codec.MAX_ITEMS * 4:
            too_many = st.just([None] * (limit + 1))
        else:
            return st.one_of(lists, lists, lists, SCALARS)
        return st.one_of(lists, lists, lists, too_many, SCALARS)
    if origin is dict:
        key_tp, value_tp = typing.get_args(base)
        keys = st.one_of(valid(key_tp, codec.MAX_KEY), valid(key_tp, codec.MAX_KEY), HOSTILE_TEXT)
        maps = st.dictionaries(keys, hostile(value_tp, depth + 1), max_size=3)
        max_len = _find(metas, codec.MaxLen)
        limit = max_len.limit if max_len else codec.MAX_ITEMS
        if limit > codec.MAX_ITEMS:
            return st.one_of(maps, maps, maps, SCALARS)
        too_many = st.just({f"k{i}": None for i in range(limit + 1)})
        return st.one_of(maps, maps, maps, too_many, SCALARS)
    good = valid(tp).map(codec.encode_value)
    if base is str:
        return st.one_of(good, good, HOSTILE_TEXT, HOSTILE_TEXT, SCALARS)
    if base in (int, codec.Duration):
        return st.one_of(good, good, HOSTILE_NUMBER, HOSTILE_NUMBER, SCALARS)
    return st.one_of(good, good, good, SCALARS)


@functools.lru_cache(maxsize=None)
def bad_value(tp: Any) -> st.SearchStrategy[Any]:
    """
    A JSON value for a field of type C{tp} that is valid except for exactly one
    hostile leaf (or key) somewhere inside it.
    """
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    base, metas = _split(tp)
    origin = typing.get_origin(base)
    if dataclasses.is_dataclass(base):
        return one_bad(base) if hints_of(base) else SCALARS
    if origin is list:
        element = typing.get_args(base)[0]
        return st.tuples(
            st.lists(valid(element).map(codec.encode_value), max_size=2),
            bad_value(element),
            st.integers(0, 2),
        ).map(lambda t: t[0][: t[2]] + [t[1]] + t[0][t[2] :])
        # (too many elements: see hostile())
    if origin is dict:
        key_tp, value_tp = typing.get_args(base)
        good = st.dictionaries(
            valid(key_tp, codec.MAX_KEY), valid(value_tp).map(codec.encode_value), max_size=2
        )
        bad_key = st.tuples(good, HOSTILE_TEXT, valid(value_tp).map(codec.encode_value))
        bad_item = st.tuples(good, valid(key_tp, codec.MAX_KEY), bad_value(value_tp))
        return (bad_key | bad_item).map(lambda t: {**t[0], t[1]: t[2]})
    if base is str:
        fmt = _find(metas, codec.TextFormat)
        if fmt is not None:
            return st.one_of(st.sampled_from(NEAR_MISSES[fmt.description]), HOSTILE_TEXT)
        return st.one_of(HOSTILE_TEXT, HOSTILE_TEXT, SCALARS)
    if base in (int, codec.Duration):
        return st.one_of(HOSTILE_NUMBER, HOSTILE_NUMBER, SCALARS)
    return st.one_of(SCALARS, HOSTILE_TEXT)


@functools.lru_cache(maxsize=None)
def one_bad(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    """
    The JSON object of a valid C{cls} with one field given a L{bad_value}.
    """
    fields = hints_of(cls)
    return st.tuples(
        valid(cls).map(codec.encode_value),
        st.sampled_from(sorted(fields)).flatmap(
            lambda n: st.tuples(_case(n), bad_value(fields[n]))
        ),
    ).map(
        lambda t: {
            **{k: v for k, v in t[0].items() if k.lower() != t[1][0].lower()},
            t[1][0]: t[1][1],
        }
    )


_FLAT: dict[type, dict[str, Any]] = {}


def hints_of(cls: type) -> dict[str, Any]:
    """
    Field name -> type for the JSON object of C{cls} (embedded structs flattened).
    """
    if cls not in _FLAT:
        out: dict[str, Any] = {}
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            if f.metadata.get("embed"):
                out.update(hints_of(hints[f.name]))
            else:
                out[f.name] = hints[f.name]
        _FLAT[cls] = out
    return _FLAT[cls]


def _case(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper()])


def serialise(value: Any, how: int) -> bytes:
    """
    JSON bytes three ways: escaped (C{"\\ud800"}), raw UTF-8 with surrogates as
    bytes (C{ED A0 80}), and with an invalid byte put into the first string.
    """
    if how == 0:
        return json.dumps(value).encode("ascii")
    raw = json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == 1:
        return raw
    quote = raw.find(b'"')
    return raw if quote < 0 else raw[: quote + 1] + b"\xff\xc0\xaf" + raw[quote + 1 :]


# The tests -------------------------------------------------------------------------

EXAMPLES = 300


def attempt(cls: type, data: bytes, trusted: bool = False) -> Optional[Any]:
    """
    Decode; None on L{codec.DecodeError} (any other exception propagates).
    """
    try:
        return codec.decode(cls, data, trusted=trusted, repairs=[] if trusted else None)
    except codec.DecodeError:
        return None


def check_both_modes(case: SynchronousTestCase, cls: type, data: bytes) -> None:
    """
    Strict decoding refuses C{data} or returns a valid object; trusted decoding
    refuses only what strict refuses too, returns well-formed values in range, and
    repairs nothing in what strict accepted.
    """
    decoded = attempt(cls, data)
    if decoded is not None:
        assert_valid(case, decoded, cls, strict=True)
    repairs: list[str] = []
    try:
        trusted = codec.decode(cls, data, trusted=True, repairs=repairs)
    except codec.DecodeError:
        case.assertIsNone(decoded, "trusted decoding refused what strict accepted")
        return
    assert_valid(case, trusted, cls, strict=False)
    if decoded is not None:
        case.assertEqual(repairs, [], "strict decoding accepted what needed repair")
        case.assertEqual(trusted, decoded)


class RoundTripTests(SynchronousTestCase):
    """
    decode(encode(x)) == x for valid values of every type.
    """

    def test_every_type_is_covered(self) -> None:
        """
        The properties run over every dataclass of the model and every request type
        of the method table.
        """
        names = {t.__name__ for t in TYPES}
        self.assertTrue({t.__name__ for t in REQUEST_TYPES} <= names)
        self.assertIn("CreateVmRequest", names)
        self.assertIn("LocalVmInfo", names)
        self.assertIn("Empty", names)
        self.assertGreater(len(TYPES), 30)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.sampled_from(TYPES).flatmap(lambda t: st.tuples(st.just(t), valid(t))))
    def test_round_trip(self, case: tuple[type, Any]) -> None:
        """
        A valid value of any type survives encode then strict decode unchanged, and
        its encoding is UTF-8 JSON escaped as Go escapes (no raw C{<}, C{>}, C{&},
        U+2028 or U+2029).
        """
        cls, value = case
        data = codec.encode(value)
        data.decode("utf-8")
        for raw in (b"<", b">", b"&", "\u2028".encode(), "\u2029".encode()):
            self.assertNotIn(raw, data)
        self.assertEqual(codec.decode(cls, data), value)
        self.assertEqual(codec.decode(cls, data, trusted=True), value)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.sampled_from(REQUEST_TYPES).flatmap(lambda t: st.tuples(st.just(t), valid(t))))
    def test_round_trip_requests(self, case: tuple[type, Any]) -> None:
        """
        The same for the request types of the method table alone (more examples
        each).
        """
        cls, value = case
        self.assertEqual(codec.decode(cls, codec.encode(value)), value)


class HostileInputTests(SynchronousTestCase):
    """
    Whatever arrives, strict decoding raises only DecodeError or returns an object
    that keeps every rule; trusted decoding repairs instead.
    """

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.sampled_from(TYPES).flatmap(
            lambda t: st.tuples(st.just(t), hostile(t), st.integers(0, 2))
        )
    )
    def test_shaped_json(self, case: tuple[type, Any, int]) -> None:
        """
        JSON shaped like the type with hostile leaves (escaped or raw surrogates,
        invalid UTF-8, over-long values, out-of-range or non-integer numbers, NaN).
        """
        cls, value, how = case
        check_both_modes(self, cls, serialise(value, how))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.sampled_from(FIELDED_TYPES).flatmap(
            lambda t: st.tuples(st.just(t), one_bad(t), st.integers(0, 2))
        )
    )
    def test_one_bad_value(self, case: tuple[type, Any, int]) -> None:
        """
        A valid object with exactly one hostile value somewhere (a string, key,
        number or element of any field, however deep): strict decoding refuses it
        or returns an object that keeps every rule and needed no repair.
        """
        cls, value, how = case
        check_both_modes(self, cls, serialise(value, how))

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(TYPES), JSON_VALUES, st.integers(0, 2))
    def test_random_json(self, cls: type, value: Any, how: int) -> None:
        """
        Arbitrary JSON values (with the model's field names as keys).
        """
        data = serialise(value, how)
        decoded = attempt(cls, data)
        if decoded is not None:
            assert_valid(self, decoded, cls, strict=True)
        trusted = attempt(cls, data, trusted=True)
        if trusted is not None:
            assert_valid(self, trusted, cls, strict=False)

    @settings(max_examples=EXAMPLES, deadline=None)
    @given(st.sampled_from(TYPES), st.binary(max_size=300))
    def test_random_bytes(self, cls: type, data: bytes) -> None:
        """
        Arbitrary bytes.
        """
        decoded = attempt(cls, data)
        if decoded is not None:
            assert_valid(self, decoded, cls, strict=True)
        attempt(cls, data, trusted=True)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        st.sampled_from(REQUEST_TYPES + [model.LocalVmInfo]).flatmap(
            lambda t: st.tuples(st.just(t), valid(t))
        ),
        st.lists(
            st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.binary(min_size=1, max_size=4)),
            min_size=1,
            max_size=4,
        ),
    )
    def test_mutated_bytes(
        self, case: tuple[type, Any], edits: list[tuple[int, int, bytes]]
    ) -> None:
        """
        A valid encoding with bytes replaced, inserted or deleted.
        """
        cls, value = case
        data = bytearray(codec.encode(value))
        for position, kind, chunk in edits:
            i = position % (len(data) + 1)
            if kind == 0:
                data[i : i + len(chunk)] = chunk
            elif kind == 1:
                data[i:i] = chunk
            else:
                del data[i : i + len(chunk)]
        decoded = attempt(cls, bytes(data))
        if decoded is not None:
            assert_valid(self, decoded, cls, strict=True)
        attempt(cls, bytes(data), trusted=True)

    @settings(max_examples=60, deadline=None)
    @given(
        st.sampled_from(TYPES),
        st.sampled_from(["[", '{"a":', '{"Tags":[', '{"VMs":{"x":', '[{"":']),
        st.sampled_from([33, 34, 100, 1000, 100_000]),
        st.booleans(),
    )
    def test_deep_nesting(self, cls: type, opener: str, depth: int, closed: bool) -> None:
        """
        Nesting deeper than MAX_DEPTH, closed or not, is a DecodeError (never a
        RecursionError), in both modes.
        """
        closers = {"[": "]", "{": "}"}
        text = opener * depth
        if closed:
            text += "1" + "".join(closers[c] for c in reversed(text) if c in closers)
        for trusted in (False, True):
            self.assertRaises(codec.DecodeError, codec.decode, cls, text.encode(), trusted=trusted)

    def test_nesting_up_to_the_limit(self) -> None:
        """
        Unknown fields nested up to MAX_DEPTH are ignored, one more is refused.
        """
        inner = "[" * (codec.MAX_DEPTH - 1) + "]" * (codec.MAX_DEPTH - 1)
        self.assertEqual(codec.decode(model.IpRequest, '{"x": %s}' % inner), model.IpRequest())
        deeper = "[" * codec.MAX_DEPTH + "]" * codec.MAX_DEPTH
        e = self.assertRaises(
            codec.DecodeError, codec.decode, model.IpRequest, '{"x": %s}' % deeper
        )
        self.assertIn("nested 33 deep; the limit is 32", str(e))
