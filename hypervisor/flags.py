# -*- test-case-name: tests.test_options -*-
"""
Go-compatible daemon flags: flags files, single-dash flags, durations and sizes.

The Go hypervisor reads ``/etc/hypervisor/flags.default`` then ``flags.extra``
(``name=value`` lines, ``#`` comments) before its command line, and accepts
``-name value``, ``-name=value`` and ``--name`` forms; boolean flags take no value or
``=true``/``=false``. These pure functions let L{hypervisor.options.Options} do the
same on top of Twisted's L{twisted.python.usage}.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

DEFAULT_FLAGS_DIRECTORY = "/etc/hypervisor"
FLAGS_FILES = ("flags.default", "flags.extra")

_TRUE = {"1", "t", "true", "yes", "on"}
_FALSE = {"0", "f", "false", "no", "off"}


class FlagsFileError(ValueError):
    """
    A flags file could not be read or has a malformed line.
    """


@dataclass(frozen=True)
class FlagSetting:
    """
    One C{name=value} setting and where it came from (for error messages).
    """

    name: str
    value: str
    source: str


def read_flags_file(path: str) -> list[FlagSetting]:
    """
    Read one flags file; a missing file is an empty list.

    @raise FlagsFileError: a line is not C{name=value}, or the file is unreadable.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise FlagsFileError(f"cannot read flags file {path}: {e}") from e
    settings = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name = name.strip().lstrip("-")
        if not sep or not name:
            raise FlagsFileError(f"{path}:{number}: expected name=value, got {raw!r}")
        settings.append(FlagSetting(name, value.strip(), f"{path}:{number}"))
    return settings


def load_flags_files(directory: str) -> list[FlagSetting]:
    """
    Read C{flags.default} then C{flags.extra} from C{directory}, in that order.
    """
    settings: list[FlagSetting] = []
    for name in FLAGS_FILES:
        settings.extend(read_flags_file(os.path.join(directory, name)))
    return settings


def parse_bool(text: str) -> bool:
    """
    Parse a Go-style boolean (C{true}, C{false}, C{1}, C{0}, ...).

    @raise ValueError: not a boolean.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")


def normalize_argv(
    argv: Sequence[str], parameters: Iterable[str], booleans: Iterable[str]
) -> tuple[list[str], list[tuple[str, bool]]]:
    """
    Turn Go-style flags into what Twisted's getopt parser accepts.

    C{-name value} and C{-name=value} become C{--name value} and C{--name=value}.
    Boolean flags are taken out of the list and returned as ordered C{(name, value)}
    assignments, so C{-flag=false} on the command line can undo C{flag=true} from a
    flags file. Parsing stops at C{--} or at the first argument that is not a flag (a
    subcommand), exactly as Go's C{flag} package does; the rest is returned untouched.

    @return: the rewritten argument list and the boolean assignments in order.
    """
    params = set(parameters)
    bools = set(booleans)
    out: list[str] = []
    assignments: list[tuple[str, bool]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--" or not token.startswith("-") or token == "-":
            out.extend(argv[i:])
            break
        body = token[2:] if token.startswith("--") else token[1:]
        name, sep, value = body.partition("=")
        if name in bools:
            assignments.append((name, parse_bool(value) if sep else True))
        elif name in params:
            out.append(f"--{name}={value}" if sep else f"--{name}")
            if not sep and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        elif len(name) > 1:
            # An unknown long flag: let the parser reject it under its own name
            # ("option --stateDirr not recognized") rather than as "-s".
            out.append(f"--{body}")
        else:
            out.append(token)
        i += 1
    return out, assignments


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """
    Parse a Go duration (C{"2s"}, C{"1m30s"}, C{"500ms"}) or plain seconds, to seconds.

    @raise ValueError: malformed or negative.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty duration")
    try:
        seconds = float(s)
    except ValueError:
        pos = 0
        seconds = 0.0
        for m in _DURATION_PART.finditer(s):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise ValueError(f"{text!r} is not a duration (examples: 2s, 500ms, 1m30s)") from None
    if seconds < 0:
        raise ValueError(f"{text!r} is negative")
    return seconds


_SIZE = re.compile(r"^(\d+)\s*([KMGTP]?)(i?B?)$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """
    Parse a byte size: C{"10737418240"}, C{"10G"}, C{"10GiB"}, C{"512M"} (binary units).

    @raise ValueError: malformed.
    """
    m = _SIZE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 1073741824, 512M, 10G)")
    power = " KMGTP".index(m.group(2).upper() or " ")
    return int(m.group(1)) * 1024**power


def format_size(size: int) -> str:
    """
    Format a byte count the way L{parse_size} reads it back (C{10G}, C{512M}).
    """
    for power, unit in ((4, "T"), (3, "G"), (2, "M"), (1, "K")):
        if size and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """
    Format seconds the way Go prints a duration (C{2s}, C{1m0s}, C{500ms}).
    """
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    minutes, secs = divmod(seconds, 60)
    if minutes:
        hours, minutes = divmod(int(minutes), 60)
        head = f"{hours}h{minutes}m" if hours else f"{minutes}m"
        return f"{head}{secs:g}s"
    return f"{secs:g}s"
