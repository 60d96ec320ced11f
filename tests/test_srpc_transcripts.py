"""
Every capture of the real Go clients (C{srpc-transcripts}, see its README) replayed
byte for byte against our SRPC server in memory, over the real service layer
(libvirt's test driver): each connection's client bytes are fed as they were sent,
and our answers are checked where the protocol makes them normative:

- CONNECT: C{404 Not Found} for the gob endpoints, exactly C{HTTP/1.0 200 Connected
  to Go SRPC} for C{/_SRPC_/TLS/JSON} (then TLS takes the connection), 405 for the
  unsecured endpoint while unauthenticated reads are off — the transcript's own
  bytes where the fake was not told to answer wrongly;
- method lines: C{"\\n"} where the reference admits the caller (the transcript's
  certificate: CN, groups, method grants), C{access to method denied} for admin
  methods without a grant, C{Hypervisor: unknown method: X} for methods this daemon
  does not serve, C{unknown service: } for C{.LocalUpgradeToUnix} (06 step 1
  exactly);
- replies: C{"\\n"} + one JSON object + C{"\\n"} for request/reply methods, with the
  JSON types of the keys the transcript's reply also has (enums as strings, times as
  RFC 3339 text...); CreateVm: bare messages ending with C{Final} or an C{Error},
  after the whole upload was read; GetUpdates: a full first Update, and one Update
  with C{HealthStatus} per keepalive the client sent.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

from twisted.internet.protocol import connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import TestCase

from hypervisor.api import ACCESS, ADMIN, METHODS, PROGRESS, RAW, UPDATES
from hypervisor.auth import Identity
from hypervisor.srpc.codec import (
    CONNECTED,
    GOB_PLAIN,
    GOB_TLS,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    SRPC_TLS_JSON,
    SRPC_UNSECURED_JSON,
    parse_connect,
)
from tests.srpc_support import (
    USER_DATA,
    Backend,
    Connection,
    Step,
    Unit,
    all_steps,
    output_until,
)

METHOD_LINE = re.compile(rb"^[A-Za-z]*\.[A-Za-z]+\r?\n$")
FULL_UPDATE_KEYS = {
    "HaveAddressPool",
    "AddressPool",
    "HaveDisabled",
    "MemoryInMiB",
    "NumCPUs",
    "HealthStatus",
    "HaveSubnets",
    "Subnets",
    "TotalVolumeBytes",
    "HaveVMs",
    "VMs",
}
CREATE_KEYS = {"DhcpTimedOut", "Final", "IpAddress", "ProgressMessage", "Error"}


def _lines(data: bytes) -> int:
    return data.count(b"\n")


def _type(value: Any) -> str:
    if value is None:
        return "null"
    return type(value).__name__


def compare_shapes(ours: Any, theirs: Any, where: str, problems: list[str]) -> None:
    """
    The JSON types of the keys both objects have (null matches a list or an object:
    Go writes nil slices and maps as null).
    """
    if not isinstance(ours, dict) or not isinstance(theirs, dict):
        return
    for key in set(ours) & set(theirs):
        a, b = ours[key], theirs[key]
        if a is None or b is None:
            if {_type(a), _type(b)} <= {"null", "list", "dict"}:
                continue
        if (
            isinstance(a, (int, float))
            and isinstance(b, (int, float))
            and not (isinstance(a, bool) or isinstance(b, bool))
        ):
            continue
        if _type(a) != _type(b):
            problems.append(f"{where}.{key}: ours is {_type(a)}, the Go peer's {_type(b)}")
        elif isinstance(a, dict):
            compare_shapes(a, b, f"{where}.{key}", problems)


def split_calls(units: list[Unit]) -> list[list[Unit]]:
    """
    A connection's units after CONNECT, grouped per call (a call starts at a method
    line from the client).
    """
    calls: list[list[Unit]] = []
    for unit in units:
        if unit.side == "C" and not unit.raw and METHOD_LINE.match(unit.data):
            calls.append([unit])
        elif calls:
            calls[-1].append(unit)
    return calls


class TranscriptReplayTests(TestCase):
    """
    All transcripts, in memory.
    """

    timeout = 600

    async def test_every_transcript(self) -> None:
        """
        Replay every step of every transcript (module docstring); list every
        difference.
        """
        steps = all_steps()
        self.assertGreaterEqual(len(steps), 40, "the transcripts are there")
        backend = Backend(self)
        await backend.start()
        problems: list[str] = []
        replayed = 0
        for step in steps:
            for connection in step.connections.values():
                await backend.ensure_vm()
                where = f"{step.file} {step.title[:40]!r} {connection.name}"
                await self.replay(backend, step, connection, where, problems)
                replayed += 1
        self.assertGreater(replayed, 80)
        self.assertEqual(problems, [], "\n" + "\n".join(problems))

    async def replay(
        self,
        backend: Backend,
        step: Step,
        connection: Connection,
        where: str,
        problems: list[str],
    ) -> None:
        units = connection.units
        if not units or units[0].side != "C":
            return
        first = units[0]
        rest = units[1:]
        if first.data.startswith(b"CONNECT "):
            proto, transport = backend.server(connect=True)
            proto.dataReceived(first.data)
            answer = transport.value()
            path = parse_connect(first.data).path
            want = {
                GOB_TLS: NOT_FOUND,
                GOB_PLAIN: NOT_FOUND,
                SRPC_TLS_JSON: CONNECTED,
                SRPC_UNSECURED_JSON: METHOD_NOT_ALLOWED,
            }.get(path, NOT_FOUND)
            if answer != want:
                problems.append(f"{where}: CONNECT {path}: {answer!r}, want {want!r}")
            theirs = next((u.data for u in rest if u.side == "S"), None)
            if not step.faulty and theirs is not None and answer != theirs:
                problems.append(f"{where}: CONNECT answer {answer!r} != transcript {theirs!r}")
            if want is not CONNECTED:
                if not transport.disconnecting:
                    problems.append(f"{where}: not closed after {answer!r}")
                return
            tls = getattr(transport, "protocol", None)
            if not isinstance(tls, TLSMemoryBIOProtocol):
                problems.append(f"{where}: TLS did not take the connection after 200")
                return
            tls.connectionLost(connectionDone)
            rest = rest[1:] if rest and rest[0].side == "S" else rest
        identity = connection.identity or Identity(
            username="testuser", groups=frozenset({"team-a"}), full_authority=True
        )
        proto, transport = backend.server(identity)
        try:
            for call in split_calls(rest):
                if not await self.replay_call(
                    proto, transport, step, call, identity, where, problems
                ):
                    break
        finally:
            proto.connectionLost(connectionDone)

    async def replay_call(
        self,
        proto: Any,
        transport: Any,
        step: Step,
        call: list[Unit],
        identity: Identity,
        where: str,
        problems: list[str],
    ) -> bool:
        line = call[0].data
        name = line.strip().decode()
        service, _, method = name.rpartition(".")
        client = [u for u in call[1:] if u.side == "C"]
        theirs = [u for u in call[1:] if u.side == "S"]
        where = f"{where} {name}"
        mark = len(transport.value())
        proto.dataReceived(line)
        got = await output_until(transport, lambda out: _lines(out[mark:]) >= 1, 10)
        answer = got[mark:].split(b"\n", 1)[0] + b"\n"
        spec = METHODS.get(method) if service == "Hypervisor" else None
        if service != "Hypervisor":
            want = f"unknown service: {service}\n".encode()
        elif spec is None:
            want = f"Hypervisor: unknown method: {method}\n".encode()
        elif ACCESS[method] == ADMIN and not identity.has_method_power(method):
            want = b"access to method denied\n"
        else:
            want = b"\n"
        if answer != want:
            problems.append(f"{where}: method line answered {answer!r}, want {want!r}")
            return not transport.disconnecting
        if (
            not step.faulty
            and theirs
            and want == b"\n"
            and theirs[0].data != want
            and name != ".LocalUpgradeToUnix"
        ):
            problems.append(f"{where}: transcript answered {theirs[0].data!r}, we {want!r}")
        if want != b"\n":
            return True  # refused: a Go client stops this call here
        assert spec is not None
        if spec.kind == UPDATES and method == "GetUpdates":
            return await self.replay_updates(proto, transport, client, where, problems, mark)
        if not client:
            return True  # the client went away (07 step 7)
        mark = len(transport.value())
        for unit in client:
            proto.dataReceived(unit.data)
        if spec.kind == PROGRESS:

            def final(out: bytes) -> bool:
                for text in out[mark:].split(b"\n"):
                    if text.startswith(b"{"):
                        message = json.loads(text)
                        if message.get("Final") or message.get("Error"):
                            return True
                return False

            got = await output_until(transport, final, 60)
            messages = [json.loads(t) for t in got[mark:].split(b"\n") if t]
            if not messages or not final(got):
                problems.append(f"{where}: no final message: {got[mark:]!r}")
            if messages and messages[-1].get("Error") and not step.faulty:
                problems.append(f"{where}: failed: {messages[-1]['Error']}")
            if messages and messages[-1].get("Final") and not messages[-1].get("IpAddress"):
                problems.append(f"{where}: the final message has no IpAddress")
            for message in messages:
                extra = set(message) - CREATE_KEYS
                if extra:
                    problems.append(f"{where}: unknown keys {sorted(extra)}")
            return True
        if spec.kind == RAW:
            # A console: a bare {"Error":...} message (no status line), raw bytes after
            # it when the console connected (the replay's VM does not run: an Error).
            got = await output_until(transport, lambda out: b"\n" in out[mark:], 30)
            answer = got[mark:].split(b"\n", 1)[0]
            if not answer.startswith(b"{") or set(json.loads(answer)) != {"Error"}:
                problems.append(f"{where}: console answer not a bare Error message: {answer!r}")
            return True
        if any(u.data.startswith(b"{") and b'"Length"' in u.data for u in theirs[1:]):
            return await self.replay_download(transport, mark, where, problems)
        got = await output_until(transport, lambda out: _lines(out[mark:]) >= 2, 30)
        answer = got[mark:]
        if not answer.startswith(b"\n") or not answer.endswith(b"\n") or _lines(answer) != 2:
            problems.append(f"{where}: reply not \\n+JSON+\\n: {answer[:200]!r}")
            return False
        ours = json.loads(answer[1:])
        if "VmInfo" in ours and isinstance(ours["VmInfo"].get("State", ""), int):
            problems.append(f"{where}: State sent as a number")
        reply = next((u.data for u in theirs if u.data.startswith(b"\n{")), None)
        if reply is not None and not step.faulty:
            compare_shapes(ours, json.loads(reply[1:]), where, problems)
            if ours.get("Error") and not json.loads(reply[1:]).get("Error"):
                problems.append(f"{where}: failed where the Go peer succeeded: {ours['Error']}")
        return True

    async def replay_download(
        self, transport: Any, mark: int, where: str, problems: list[str]
    ) -> bool:
        """
        A reply followed by raw bytes (GetVmUserData): a bare JSON object with its
        C{Length}, then exactly that many bytes (the fixture VM's user data).
        """

        def complete(out: bytes) -> bool:
            head, found, rest = out[mark:].partition(b"\n")
            if not found or not head.startswith(b"{"):
                return bool(found)
            return len(rest) >= json.loads(head).get("Length", 0)

        got = await output_until(transport, complete, 10)
        head, _, rest = got[mark:].partition(b"\n")
        message = json.loads(head) if head.startswith(b"{") else {}
        if message.get("Error") or message.get("Length") != len(USER_DATA):
            problems.append(f"{where}: download answered {got[mark:][:200]!r}")
        elif rest != USER_DATA:
            problems.append(f"{where}: raw bytes {rest[:80]!r}... != the user data")
        return True

    async def replay_updates(
        self,
        proto: Any,
        transport: Any,
        client: list[Unit],
        where: str,
        problems: list[str],
        start: int,
    ) -> bool:
        got = await output_until(transport, lambda out: _lines(out[start:]) >= 2, 10)
        first = got[start:].split(b"\n")[1]
        update = json.loads(first) if first.startswith(b"{") else {}
        missing = FULL_UPDATE_KEYS - set(update)
        if missing:
            problems.append(f"{where}: the first Update lacks {sorted(missing)}")
        if update.get("HealthStatus") != "healthy":
            problems.append(f"{where}: first Update's HealthStatus {update.get('HealthStatus')!r}")
        for unit in client:
            mark = len(transport.value())
            proto.dataReceived(unit.data)
            got = await output_until(transport, lambda out: _lines(out[mark:]) >= 1, 10)
            texts = [t for t in got[mark:].split(b"\n") if t]
            if not texts or json.loads(texts[-1]).get("HealthStatus") != "healthy":
                problems.append(f"{where}: keepalive {unit.data!r} answered {got[mark:]!r}")
        return False
