"""
Hostile bytes to the SRPC server in memory, over the real service layer: 400 random
sessions (a fixed seed, so a failure is reproducible) built from method lines (real,
admin, unknown, malformed), request JSON (valid, truncated, wrong types, deeply
nested, huge), raw bytes, CONNECT heads and line ends, split at random places. After
each: no exception escaped the protocol, nothing was logged as an error (trial fails
the test on a logged error), every line the server wrote is an accept line, an error
line or one JSON object, and the connection's bounded buffer never held more than
the limits allow.
"""

from __future__ import annotations

import json
import random

from twisted.internet.protocol import connectionDone
from twisted.trial.unittest import TestCase

from hypervisor.api import METHODS
from hypervisor.auth import Identity
from hypervisor.srpc.codec import MAX_HEAD, MAX_METHOD_LINE
from hypervisor.srpc.protocol import MAX_AHEAD
from tests.srpc_support import Backend, sleep
from tests.test_rpc_access import REQUESTS

SEED = 13
SESSIONS = 400
USER = Identity(username="testuser", groups=frozenset({"team-a"}), full_authority=True)


def pieces(rng: random.Random) -> list[bytes]:
    """
    One session's units.
    """
    methods = sorted(METHODS)
    out: list[bytes] = []
    for _ in range(rng.randint(1, 8)):
        kind = rng.randrange(12)
        if kind == 0:
            out.append(b"Hypervisor." + rng.choice(methods).encode() + b"\n")
        elif kind == 1:
            name = rng.choice(methods)
            request = dict(REQUESTS.get(name, {}))
            if name in ("CreateVm", "ReplaceVmImage") and rng.random() < 0.5:
                request["ImageDataSize"] = rng.choice([0, 10, 1 << 20, 1 << 45, -1])
            out.append(b"Hypervisor." + name.encode() + b"\n")
            out.append(json.dumps(request).encode() + b"\n")
        elif kind == 2:
            out.append(rng.choice([b"\n", b"\r\n", b"\r", b"\n\n\n", b".LocalUpgradeToUnix\n"]))
        elif kind == 3:
            out.append(
                rng.choice(
                    [
                        b"Nope.X\n",
                        b"Hypervisor.\n",
                        b"Hypervisor\n",
                        b"\xff\xfe\n",
                        b"Hypervisor.List\x00VMs\n",
                        "Hypervisor.ÜnicodeMethod\n".encode(),
                        b"x" * rng.randint(MAX_METHOD_LINE - 2, MAX_METHOD_LINE + 50) + b"\n",
                    ]
                )
            )
        elif kind == 4:
            out.append(
                rng.choice(
                    [
                        b"{",
                        b"}\n",
                        b"[]\n",
                        b"null\n",
                        b'{"IpAddress":5}\n',
                        b'{"IpAddress":"10.77.0.10"',
                        b'{"MemoryInMiB":1e999}\n',
                        b"[" * 5000 + b"\n",
                        b'{"a":"' + b"b" * 70000 + b'"}\n',
                        b'{"IpAddress":"\\ud800"}\n',
                    ]
                )
            )
        elif kind == 5:
            out.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
        elif kind == 6:
            out.append(b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\n\n")
        elif kind == 7:
            out.append(b"Hypervisor.GetUpdates\n")
            out.append(rng.choice([b"{}\n", b'{"RegisterExternalLeasesRequest":null}\n', b"zz\n"]))
        elif kind == 8:
            out.append(b"\x00" * rng.randint(1, MAX_AHEAD + 10))
        elif kind == 9:
            out.append(json.dumps(REQUESTS[rng.choice(methods)]).encode() + b"\n")
        elif kind == 10:
            out.append(b"CONNECT /" + b"a" * rng.randint(1, MAX_HEAD + 10) + b" HTTP/1.0\n\n")
        else:
            out.append(b"Hypervisor.CreateVm\n" + b'{"SubnetId":"t","ImageDataSize":100}\n')
            out.append(b"\x01" * rng.randint(0, 150))
    return out


def split(data: bytes, rng: random.Random) -> list[bytes]:
    """
    C{data} cut at random places.
    """
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def well_formed(output: bytes) -> list[str]:
    """
    What is wrong with the server's output: each line must be empty, an error text,
    or one JSON object.
    """
    problems = []
    for line in output.split(b"\n"):
        if not line or not line.startswith(b"{"):
            if b"Traceback" in line:
                problems.append(f"traceback: {line[:200]!r}")
            continue
        try:
            value = json.loads(line)
        except ValueError:
            problems.append(f"broken JSON line: {line[:200]!r}")
            continue
        if not isinstance(value, dict):
            problems.append(f"not an object: {line[:200]!r}")
    return problems


class FuzzTests(TestCase):
    """
    Random hostile sessions.
    """

    timeout = 600

    async def test_random_sessions(self) -> None:
        """
        The module docstring's properties, for every session.
        """
        backend = Backend(self)
        await backend.start()
        await backend.ensure_vm()
        rng = random.Random(SEED)
        problems: list[str] = []
        replies = refusals = 0
        for n in range(SESSIONS):
            data = b"".join(pieces(rng))
            connect = rng.random() < 0.3
            if connect:
                data = (
                    rng.choice([b"CONNECT /_SRPC_/unsecured/JSON HTTP/1.0\n\n", b"CONNECT "]) + data
                )
            proto, transport = backend.server(USER, connect=connect)
            try:
                for chunk in split(data, rng):
                    proto.dataReceived(chunk)
                    if len(proto.reader) > max(MAX_AHEAD, 4 * 1024 * 1024) + len(chunk):
                        problems.append(f"session {n}: {len(proto.reader)} bytes buffered")
                await sleep(0)
            except Exception as e:  # noqa: BLE001 - the finding
                problems.append(f"session {n}: {type(e).__name__}: {e}")
            finally:
                proto.connectionLost(connectionDone)
            output = transport.value()
            problems.extend(f"session {n}: {p}" for p in well_formed(output))
            replies += output.count(b"\n{")
            refusals += sum(1 for line in output.split(b"\n") if line and line[:1] != b"{")
        await sleep(0.5)  # let calls still running finish (and log, if they would)
        self.assertEqual(problems, [], "\n" + "\n".join(problems[:20]))
        # The sessions reached the service layer and the refusals alike.
        self.assertGreater(replies, 100)
        self.assertGreater(refusals, 100)
