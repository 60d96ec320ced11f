# -*- test-case-name: tests.test_cli_flags -*-
"""
Go's C{flag} package for the client tools: the same flag names, types, defaults,
parsing rules and C{-h} layout as SmallStack's C{vm-control} and C{hyper-control}.

A tool declares a list of L{Flag}s (name, Go type, default as Go prints it, usage
text, value parser) and a list of L{Command}s. L{parse} reads C{argv} the way Go's
C{flag.Parse} does (C{-name value}, C{-name=value}, C{--name}, booleans without a
value or with C{=true}/C{=false}; parsing stops at the first non-flag or C{--}), and
L{usage} prints what Go's C{flag.PrintDefaults} prints: flags sorted by name, each as
C{"  -name type"} then C{"    \\t<usage> (default X)"}, the default shown unless it is
the type's zero value, quoted for strings.

Flags and commands that the Go tool does not have are listed after Go's, under their
own headings, so the Go part of C{-h} is line for line the Go tool's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from hypervisor import flags as _flags


class UsageError(ValueError):
    """
    A bad command line; the message names the flag or the command.
    """


class HelpRequested(Exception):
    """
    C{-h}/C{-help}/C{help}: print the usage and exit 0.
    """


@dataclass(frozen=True)
class Flag:
    """
    One flag.

    @ivar kind: the type name Go prints (C{string}, C{bool}, C{uint}, C{int},
        C{duration}, C{value}).
    @ivar default: the default as Go prints it (C{DefValue}); parsed by C{parse}.
    @ivar parse: text -> value (raises ValueError with a sentence); None: by kind.
    @ivar go: whether the Go tool has this flag (else it is ours, listed apart).
    @ivar unused: why this flag changes nothing here, or "" if it is used.
    """

    name: str
    kind: str
    default: str
    usage: str
    parse: Optional[Callable[[str], Any]] = None
    go: bool = True
    unused: str = ""

    def convert(self, text: str) -> Any:
        """
        Parse a value of this flag.

        @raise UsageError: naming the flag.
        """
        try:
            if self.parse is not None:
                return self.parse(text)
            return KIND_PARSERS[self.kind](text)
        except ValueError as e:
            raise UsageError(f'invalid value "{text}" for flag -{self.name}: {e}') from None

    def is_zero_default(self) -> bool:
        """
        Go's isZeroValue: the default is not printed when it is the zero value.
        """
        return self.default in ZERO_TEXTS.get(self.kind, ("",))

    def help_lines(self) -> str:
        """
        This flag as Go's PrintDefaults prints it.
        """
        head = f"  -{self.name}"
        if self.kind != "bool":
            head += f" {self.kind}"
        text = head + "\n    \t" + self.usage.replace("\n", "\n    \t")
        if not self.is_zero_default():
            if self.kind == "string":
                text += f' (default "{self.default}")'
            else:
                text += f" (default {self.default})"
        return text


@dataclass(frozen=True)
class Command:
    """
    One subcommand: its name, argument synopsis (as Go prints it), the number of
    arguments it takes, and whether this implementation runs it.

    @ivar unavailable: why it cannot run here ("" if it can).
    """

    name: str
    args: str = ""
    min_args: int = 0
    max_args: int = 0
    unavailable: str = ""
    go: bool = True
    action: str = ""

    def synopsis(self) -> str:
        """
        C{"  name args"} as in Go's command list.
        """
        return f"  {self.name} {self.args}".rstrip()


ZERO_TEXTS: dict[str, tuple[str, ...]] = {
    "string": ("",),
    "bool": ("false",),
    "uint": ("0",),
    "int": ("0",),
    "duration": ("0s",),
    "value": ("", "[]", "0"),
}


def parse_uint(text: str) -> int:
    """
    Go's ParseUint(text, 0, 64): decimal, 0x hex, 0o/leading-0 octal, 0b binary.
    """
    value = parse_int(text)
    if value < 0:
        raise ValueError("not an unsigned number")
    if value >= 1 << 64:
        raise ValueError("value out of range")
    return value


def parse_int(text: str) -> int:
    """
    Go's ParseInt(text, 0, 64).
    """
    t = text.strip().replace("_", "")
    try:
        if re.fullmatch(r"[+-]?0[0-7]+", t):
            return int(t, 8)
        return int(t, 0)
    except ValueError:
        raise ValueError("parse error") from None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """
    Go's time.ParseDuration, to seconds: C{"1m0s"}, C{"-1s"}, C{"500ms"}, C{"0"}.
    """
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise ValueError("invalid duration (examples: 1m0s, 30s, 500ms)")
    return sign * total


def format_duration(seconds: float) -> str:
    """
    Go's Duration.String() for whole seconds and above (C{1m0s}, C{15s}, C{1h0m0s}).
    """
    return _flags.format_duration(seconds) if seconds < 3600 else _hours(seconds)


def _hours(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s"


def parse_size(text: str) -> int:
    """
    A byte size as Dominator's flagutil.Size reads it: C{1073741824}, C{512M},
    C{1GiB}, C{16GiB}.
    """
    try:
        return _flags.parse_size(text)
    except ValueError:
        raise ValueError("not a size (examples: 512MiB, 1GiB, 1073741824)") from None


def format_size(size: int) -> str:
    """
    Dominator's flagutil.Size String(): C{1GiB}, C{256MiB}, C{100} bytes.
    """
    for power, unit in ((5, "PiB"), (4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if size and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def parse_string_list(text: str) -> list[str]:
    """
    Dominator's flagutil.StringList: comma-separated, empty items dropped.
    """
    return [item for item in text.split(",") if item]


def parse_size_list(text: str) -> list[int]:
    """
    Dominator's flagutil.SizeList: comma-separated sizes.
    """
    return [parse_size(item) for item in parse_string_list(text)]


def parse_uint_list(text: str) -> list[int]:
    """
    Comma-separated unsigned numbers.
    """
    return [parse_uint(item) for item in parse_string_list(text)]


def parse_tags(text: str) -> dict[str, str]:
    """
    Dominator's tags.Tags: C{key=value,key=value}.
    """
    tags: dict[str, str] = {}
    for item in parse_string_list(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"tag {item!r} is not key=value")
        tags[key] = value
    return tags


def parse_match_tags(text: str) -> dict[str, list[str]]:
    """
    Dominator's tags.MatchTags: C{key=value,...}; a key may repeat (any value matches).
    """
    match: dict[str, list[str]] = {}
    for key, value in (item.partition("=")[::2] for item in parse_string_list(text)):
        if not key:
            raise ValueError("a tag to match has no key")
        match.setdefault(key, []).append(value)
    return match


def one_of(*choices: str) -> Callable[[str], str]:
    """
    A parser accepting only C{choices}.
    """

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"not one of {', '.join(choices)}")
        return text

    return parse


def list_of(*choices: str) -> Callable[[str], list[str]]:
    """
    A comma-separated list of C{choices}.
    """
    check = one_of(*choices)
    return lambda text: [check(item) for item in parse_string_list(text)]


KIND_PARSERS: dict[str, Callable[[str], Any]] = {
    "string": str,
    "bool": _flags.parse_bool,
    "uint": parse_uint,
    "int": parse_int,
    "duration": parse_duration,
    "value": str,
}


@dataclass
class Parsed:
    """
    The result of L{parse}: every flag's value, which flags were set, the command and
    its arguments.
    """

    values: dict[str, Any]
    given: set[str] = field(default_factory=set)
    command: Optional[Command] = None
    args: list[str] = field(default_factory=list)


def parse(argv: Sequence[str], table: Sequence[Flag], commands: Sequence[Command]) -> Parsed:
    """
    Parse flags, then the command and its arguments (counted).

    @raise HelpRequested: C{-h}, C{-help} or the command C{help}.
    @raise UsageError: an unknown flag, a bad value, an unknown command or the wrong
        number of arguments.
    """
    by_name = {f.name: f for f in table}
    values = {f.name: f.convert(f.default) for f in table}
    given: set[str] = set()
    argv = list(argv)
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            i += 1
            break
        if not token.startswith("-") or token == "-":
            break
        body = token[2:] if token.startswith("--") else token[1:]
        if not body or body[0] in "-=":
            raise UsageError(f"bad flag syntax: {token}")
        name, sep, text = body.partition("=")
        if name in ("h", "help"):
            raise HelpRequested()
        flag = by_name.get(name)
        if flag is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        if flag.kind == "bool":
            values[name] = flag.convert(text) if sep else True
        else:
            if not sep:
                if i + 1 >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                i += 1
                text = argv[i]
            values[name] = flag.convert(text)
        given.add(name)
        i += 1
    rest = argv[i:]
    if not rest:
        raise UsageError("no command given")
    if rest[0] == "help":
        raise HelpRequested()
    known = {c.name: c for c in commands}
    command = known.get(rest[0])
    if command is None:
        raise UsageError(f"unknown command: {rest[0]}")
    args = rest[1:]
    if not command.min_args <= len(args) <= command.max_args:
        raise UsageError(
            f"command {command.name} takes {command.args or 'no arguments'}"
            + (f", got {len(args)} argument(s)" if args else "")
        )
    return Parsed(values, given, command, args)


def usage(program: str, table: Sequence[Flag], commands: Sequence[Command], notes: str = "") -> str:
    """
    The C{-h} text: Go's part first (its layout), then ours.
    """
    lines = [f"Usage: {program} [flags...] command [args...]", "Common flags:"]
    lines += [f.help_lines() for f in sorted(table, key=lambda f: f.name) if f.go]
    lines.append("Commands:")
    lines += [c.synopsis() for c in commands if c.go]
    ours = [f for f in table if not f.go]
    if ours:
        lines.append(f"Flags of this {program} (not in SmallStack's):")
        lines += [f.help_lines() for f in sorted(ours, key=lambda f: f.name)]
    extra = [c for c in commands if not c.go]
    if extra:
        lines.append(f"Commands of this {program} (not in SmallStack's v0.3.4):")
        lines += [c.synopsis() for c in extra]
    unavailable = [c for c in commands if c.unavailable]
    if unavailable:
        lines.append("Commands listed above that this implementation does not run:")
        for c in unavailable:
            lines.append(f"  {c.name}: {c.unavailable}")
    unused = [f for f in table if f.unused]
    if unused:
        lines.append("Flags accepted and checked but not used by this implementation:")
        lines.append("  " + ", ".join(f"-{f.name}" for f in sorted(unused, key=lambda f: f.name)))
    if notes:
        lines.append(notes)
    return "\n".join(lines)
