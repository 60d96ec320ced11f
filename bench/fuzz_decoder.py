"""
Fuzz the request decoder (L{hypervisor.codec}) far longer than the CI tests do.

    .venv/bin/python -m bench.fuzz_decoder [--examples 20000] [--seconds 120] [--seed 1]

Runs the targets of C{tests/test_codec_fuzz.py} with a large budget, each input
decoded strictly (as a request from the network) and trusted (as our own state
file), over every type of the model and every request type of the method table:

- C{shaped}: JSON shaped like the type with hostile leaves (hypothesis);
- C{one-bad}: a valid object with exactly one hostile value (hypothesis);
- C{json}: arbitrary JSON with the model's field names (hypothesis);
- C{bytes}: arbitrary bytes (hypothesis);
- C{mutate}: random byte edits of valid encodings and of hostile seeds, for
  C{--seconds} (no hypothesis: many more inputs per second).

An input fails if decoding raises anything but C{DecodeError}, if strict decoding
returns an object breaking a rule (ill-formed or over-long string, bad syntax, an
integer outside its Go type), or if trusted decoding fails to repair. Prints, per
target, the number of inputs run, how many strict decoding accepted, how many
distinct errors it gave (messages with numbers and quoted values folded), and the
failures (0 expected); exits 1 if any.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import sys
import time
import traceback
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hypothesis import HealthCheck, Phase, given  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import settings
from hypothesis import strategies as st  # noqa: E402

from hypervisor import codec  # noqa: E402
from tests import test_codec_fuzz as targets  # noqa: E402


class Tally:
    """
    What one target saw: inputs, acceptances, distinct errors, failures.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.inputs = 0
        self.accepted = 0
        self.repaired = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def run(self, cls: type, data: bytes) -> None:
        """
        Decode C{data} both ways and record the outcome.
        """
        self.inputs += 1
        try:
            strict = codec.decode(cls, data)
        except codec.DecodeError as e:
            strict = None
            self.errors[_fold(str(e))] += 1
        except Exception:
            self._fail(cls, data, "strict: " + traceback.format_exc(limit=3))
            return
        if strict is not None:
            self.accepted += 1
            found = list(targets.problems(strict, cls, cls.__name__, True))
            if found:
                self._fail(cls, data, f"strict accepted a bad value: {found}")
        repairs: list[str] = []
        try:
            trusted = codec.decode(cls, data, trusted=True, repairs=repairs)
        except codec.DecodeError:
            if strict is not None:
                self._fail(cls, data, "trusted refused what strict accepted")
            return
        except Exception:
            self._fail(cls, data, "trusted: " + traceback.format_exc(limit=3))
            return
        if repairs:
            self.repaired += 1
        found = list(targets.problems(trusted, cls, cls.__name__, False))
        if found:
            self._fail(cls, data, f"trusted kept a bad value: {found}")
        if strict is not None and (repairs or trusted != strict):
            self._fail(cls, data, f"strict accepted what needed repair: {repairs}")

    def _fail(self, cls: type, data: bytes, why: str) -> None:
        self.failures.append(f"{cls.__name__} {data[:200]!r}: {why}")


_FOLD = [
    (re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""), "'…'"),
    (re.compile(r"-?\d+(\.\d+)?(e[+-]?\d+)?"), "N"),
]


def _fold(message: str) -> str:
    """
    An error message with its values folded, so that errors of one kind at one
    field count once.
    """
    for pattern, replacement in _FOLD:
        message = pattern.sub(replacement, message)
    return message


def hypothesis_target(tally: Tally, strategy: Any, examples: int, seed: int) -> None:
    """
    Run C{examples} inputs drawn from C{strategy} (pairs of type and bytes) through
    the tally, generation only (no shrinking: failures are collected, not raised).
    """

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(case: tuple[type, bytes]) -> None:
        tally.run(*case)

    run()


def valid_or_one_bad(cls: type) -> Any:
    """
    JSON data for a valid C{cls}, or with one hostile value.
    """
    good = targets.valid(cls).map(codec.encode_value)
    return good | targets.one_bad(cls) if targets.hints_of(cls) else good


def mutation_target(tally: Tally, seconds: float, seed: int) -> None:
    """
    Random byte edits of a corpus of valid and hostile encodings for C{seconds}.
    """
    rng = random.Random(seed)
    corpus: list[tuple[type, bytes]] = []
    seeds = st.sampled_from(targets.TYPES).flatmap(
        lambda t: st.tuples(st.just(t), valid_or_one_bad(t), st.integers(0, 2))
    )

    @hypothesis_seed(seed)
    @settings(
        max_examples=2000,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(seeds)
    def collect(case: tuple[type, Any, int]) -> None:
        cls, value, how = case
        data = targets.serialise(value, how)
        if len(data) <= 8192:  # small seeds: edits land in the structure, and fast
            corpus.append((cls, data))

    collect()
    tokens = [
        b"\xed\xa0\x80",
        b"\\ud800",
        b"\xff",
        b"\xc0\xaf",
        b"[",
        b"{",
        b"]",
        b"}",
        b"18446744073709551616",
        b"-1",
        b"1e400",
        b"NaN",
        b"1" + b"0" * 400,
        b'"',
        b"\\",
        b"null",
        b",",
        b":",
        b'"a":',
        b"\x00",
        b"9223372036854775808",
    ]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        cls, seed_data = rng.choice(corpus)
        data = bytearray(seed_data)
        for _ in range(rng.randint(1, 6)):
            i = rng.randint(0, len(data))
            kind = rng.randint(0, 3)
            if kind == 0:
                data[i : i + 1] = bytes([rng.randint(0, 255)])
            elif kind == 1:
                data[i:i] = rng.choice(tokens)
            elif kind == 2:
                del data[i : i + rng.randint(1, 8)]
            else:
                j = rng.randint(0, len(data))
                data[i:i] = data[min(i, j) : max(i, j)][:64]
        tally.run(cls, bytes(data))


def main(argv: list[str]) -> int:
    """
    Run every target; print the table; 1 if any input failed.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=20000, help="inputs per hypothesis target")
    parser.add_argument("--seconds", type=float, default=120.0, help="time for the mutation target")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    types = st.sampled_from(targets.TYPES)
    fielded = st.sampled_from(targets.FIELDED_TYPES)
    json_values = targets.JSON_VALUES
    hypothesis_targets = {
        "shaped": types.flatmap(
            lambda t: st.tuples(
                st.just(t),
                st.tuples(targets.hostile(t), st.integers(0, 2)).map(
                    lambda v: targets.serialise(*v)
                ),
            )
        ),
        "one-bad": fielded.flatmap(
            lambda t: st.tuples(
                st.just(t),
                st.tuples(targets.one_bad(t), st.integers(0, 2)).map(
                    lambda v: targets.serialise(*v)
                ),
            )
        ),
        "json": st.tuples(
            types, st.tuples(json_values, st.integers(0, 2)).map(lambda v: targets.serialise(*v))
        ),
        "bytes": st.tuples(types, st.binary(max_size=2000)),
    }
    tallies = []
    started = time.monotonic()
    for name, strategy in hypothesis_targets.items():
        tally = Tally(name)
        t0 = time.monotonic()
        hypothesis_target(tally, strategy, args.examples, args.seed)
        print(f"{name}: {tally.inputs} inputs in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        tallies.append(tally)
    tally = Tally("mutate")
    mutation_target(tally, args.seconds, args.seed)
    tallies.append(tally)

    print(
        f"\n{'target':10} {'inputs':>9} {'accepted':>9} {'repaired':>9} "
        f"{'distinct errors':>16} {'failures':>9}"
    )
    for t in tallies:
        print(
            f"{t.name:10} {t.inputs:9d} {t.accepted:9d} {t.repaired:9d} "
            f"{len(t.errors):16d} {len(t.failures):9d}"
        )
    every_error = collections.Counter[str]()
    for t in tallies:
        every_error.update(t.errors)
    total = sum(t.inputs for t in tallies)
    failures = [f for t in tallies for f in t.failures]
    print(f"{'total':10} {total:9d} {'':9} {'':9} {len(every_error):16d} " f"{len(failures):9d}")
    print(
        f"\n{time.monotonic() - started:.0f} s; types: {len(targets.TYPES)}; most "
        "frequent errors:"
    )
    for message, count in every_error.most_common(8):
        print(f"  {count:7d}  {message[:110]}")
    for failure in failures[:20]:
        print("FAILURE", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
