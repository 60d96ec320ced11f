"""
Our vm-control and hyper-control replay the Go tools' own sessions
(C{../shared/reference/srpc-transcripts/}): for each captured command line they make
the same calls with the same request bytes, and given the captured answers they print
what the Go tool printed and exit with its status.

The calls go through a transport that plays the server's side of the transcript
(checking method, request bytes and uploads); the SRPC transport itself is tested end
to end against the real daemon in L{tests.test_tools_e2e}.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shlex
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from hypervisor import certs
from hypervisor.cli import goflags, hyper_control, tool, vm_control
from hypervisor.cli.client import ClientError
from hypervisor.cli.transport import ENDLESS_STREAMS, PROGRESS_STREAMS
from tests.srpc_support import transcripts_dir

TRANSCRIPTS = transcripts_dir()
FILES = [
    "01-list-vms-get-vm-info.txt",
    "02-create-vm.txt",
    "03-vm-commands.txt",
    "04-hyper-control.txt",
    "07-error-paths.txt",
]
# Steps whose client side our tools cannot be compared on, and why.
SKIP = {
    ("03-vm-commands.txt", 8): "JSON and raw bytes in one write: Go's client lost bytes",
    ("03-vm-commands.txt", 10): "JSON and raw bytes in one write: Go's client lost bytes",
    ("03-vm-commands.txt", 11): "a console on a terminal: tests.test_console_transcript",
    ("07-error-paths.txt", 10): "CONNECT answered 404 everywhere: below the call level",
    ("07-error-paths.txt", 11): "CONNECT answered 200 OK: below the call level",
    ("07-error-paths.txt", 12): "CONNECT answered 401: below the call level",
}
# Steps where our message differs in wording (the exit status is still compared).
OWN_WORDING = {
    ("07-error-paths.txt", 6): "a number for an enum: our decoder names the field its way",
}


@dataclass
class Call:
    method: str
    answered: bool = False  # the method line was answered
    refused: Optional[bytes] = None
    request: Optional[bytes] = None
    uploads: list[Any] = field(default_factory=list)  # bytes, or an int size
    replies: list[bytes] = field(default_factory=list)


@dataclass
class Step:
    file: str
    number: int
    title: str
    argv: list[str]
    calls: list[Call]
    status: int
    stdout: str
    stderr: str


def _literal(line: str) -> Any:
    body = line[3:]
    if body.startswith("<"):
        m = re.match(r"<(\d+) raw bytes", body)
        assert m, line
        return int(m.group(1))
    text = body.rsplit("  # ", 1)[0]
    try:
        return ast.literal_eval(text)
    except SyntaxError:  # JSON + raw bytes in one write (downloads we do not replay)
        return text


def _block(lines: list[str], start: int) -> str:
    head = lines[start]
    if head.endswith("(empty)"):
        return ""
    out = []
    for line in lines[start + 1 :]:
        if not line.startswith("   | ") and line != "   |":
            break
        out.append(line[5:])
    return "\n".join(out) + "\n"


def steps() -> list[Step]:
    """
    Every step of the transcripts that runs vm-control or hyper-control.
    """
    found = []
    for name in FILES:
        with open(os.path.join(TRANSCRIPTS, name)) as f:
            text = f.read()
        for chunk in re.split(r"\n=+\n", text):
            m = re.search(r"^## Step (\d+): (.*)$", chunk, re.M)
            if not m:
                continue
            lines = chunk.splitlines()
            command = next(line for line in lines if line.startswith("$ "))
            argv = shlex.split(command[2:])
            if argv[0] == "timeout":
                argv = argv[2:]
            calls: list[Call] = []
            status, stdout, stderr = 0, "", ""
            for i, line in enumerate(lines):
                if line.startswith("C: "):
                    value = _literal(line)
                    if isinstance(value, bytes) and value.startswith(b"CONNECT "):
                        continue
                    if isinstance(value, bytes) and re.fullmatch(rb"[\w.]+\n", value):
                        calls.append(Call(value.decode().strip()))
                    elif calls and calls[-1].request is None:
                        calls[-1].request = value
                    elif calls:
                        calls[-1].uploads.append(value)
                elif line.startswith("S: ") and calls:
                    value = _literal(line)
                    call = calls[-1]
                    if not call.answered:
                        call.answered = True
                        if value != b"\n":
                            call.refused = value
                    else:
                        call.replies.append(value)
                elif line.startswith("-- client exit status:"):
                    status = int(line.split(":")[1].split()[0])
                elif line.startswith("-- client stdout:"):
                    stdout = _block(lines, i)
                elif line.startswith("-- client stderr:"):
                    stderr = _block(lines, i)
            found.append(
                Step(name, int(m.group(1)), m.group(2), argv, calls, status, stdout, stderr)
            )
    return found


class PlayedServer:
    """
    A transport answering as the transcript's server did, checking what it is sent.
    """

    address = "127.0.0.2:6976"
    description = "transcript"

    def __init__(self, testcase: TestCase, step: Step, files: dict[int, bytes]) -> None:
        self.testcase = testcase
        self.step = step
        self.calls = list(step.calls)
        self.files = files

    async def call(
        self, method: str, request: bytes, tail: Any = None, on_message: Any = None
    ) -> bytes:
        where = f"{self.step.file} step {self.step.number}"
        self.testcase.assertTrue(self.calls, f"{where}: unexpected call {method}")
        expected = self.calls.pop(0)
        self.testcase.assertEqual(method, expected.method, where)
        if expected.refused is not None:
            raise ClientError(expected.refused.decode().rstrip("\n"))
        if expected.request is None and request:
            raise ClientError("EOF")
        if expected.request is not None:
            self.testcase.assertEqual(request + b"\n", expected.request, f"{where}: {method}")
        sent = []
        if tail:
            for part, size in zip(*tail):
                data = part.read()
                self.testcase.assertEqual(len(data), size)
                sent.append(data)
        wanted = [u if isinstance(u, bytes) else self.files[u] for u in expected.uploads]
        self.testcase.assertEqual(sent, wanted, f"{where}: uploads")
        short = method.rpartition(".")[2]
        if short in PROGRESS_STREAMS:
            for message in expected.replies[:-1]:
                on_message(message.rstrip(b"\n"))
            return expected.replies[-1].rstrip(b"\n")
        if short in ENDLESS_STREAMS:
            for message in expected.replies:
                on_message(message.rstrip(b"\n"))
            return b""
        if not expected.replies:
            raise ClientError("EOF")
        reply = expected.replies[0]
        if not reply.startswith(b"\n"):
            raise ClientError(reply.rstrip(b"\n").decode())
        return reply[1:].rstrip(b"\n")

    async def call_download(self, method: str, request: bytes) -> tuple[bytes, bytes]:
        where = f"{self.step.file} step {self.step.number}"
        expected = self.calls.pop(0)
        self.testcase.assertEqual(method, expected.method, where)
        self.testcase.assertEqual(request + b"\n", expected.request, f"{where}: {method}")
        reply, raw = expected.replies[0], expected.replies[1]
        data = raw if isinstance(raw, bytes) else bytes(raw)
        self.downloaded = data
        return reply.rstrip(b"\n"), data

    def close(self) -> None:
        pass


class TranscriptReplayTests(TestCase):
    """
    Each captured Go session, replayed by our tool.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="i13-transcripts-")
        ca_key, ca_cert, _ = certs.ensure_ca(os.path.join(self.dir, "CA.pem"))
        key, cert = certs.make_certificate(ca_key, ca_cert, "testuser", groups=["team-a"])
        certs.write_pair(
            os.path.join(self.dir, "ssl", "user.cert"),
            os.path.join(self.dir, "ssl", "user.key"),
            key,
            cert,
        )

    async def replay(self, step: Step) -> tuple[int, str, str]:
        module = vm_control if step.argv[0] == "vm-control" else hyper_control
        files: dict[int, bytes] = {}
        argv = []
        for arg in step.argv[1:]:
            if arg == "$OUTFILE":
                arg = self.output_file = os.path.join(self.dir, "out")
            if arg in ("$IMAGE", "$USERDATA"):
                upload = next((c for c in step.calls if c.method == "Hypervisor.CreateVm"), None)
                assert upload is not None
                index = 0 if arg == "$IMAGE" else 1
                content = upload.uploads[index]
                if isinstance(content, int):
                    files[content] = os.urandom(content)
                    content = files[content]
                path = os.path.join(self.dir, arg[1:])
                with open(path, "wb") as f:
                    f.write(content)
                arg = path
            argv.append(arg)
        argv = [f"-certDirectory={self.dir}/ssl", f"-CAfile={self.dir}/none.pem"] + argv
        parsed = goflags.parse(argv, module.FLAGS, module.COMMANDS)
        assert parsed.command is not None
        server = PlayedServer(self, step, files)
        original = tool.make_transport
        tool.make_transport = lambda *a, **k: server
        out, err = io.StringIO(), io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(err):
                status = await tool.execute(
                    step.argv[0],
                    parsed.values,
                    parsed.command,
                    module.RUNNERS[parsed.command.name],
                    parsed.args,
                    reactor,
                )
        finally:
            tool.make_transport = original
        self.assertEqual(server.calls, [], f"{step.file} step {step.number}: calls not made")
        if hasattr(server, "downloaded"):
            with open(self.output_file, "rb") as f:
                self.assertEqual(f.read(), server.downloaded)
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_replay(self):  # type: ignore[no-untyped-def]
        """
        Same calls, same request bytes, same uploads; same output and exit status.
        """
        replayed = 0
        for step in steps():
            module = vm_control if step.argv[0] == "vm-control" else hyper_control
            command = next(
                a
                for a in step.argv[1:]
                if not a.startswith("-") and a in {c.name for c in module.COMMANDS}
            )
            if (step.file, step.number) in SKIP or command not in module.RUNNERS:
                continue
            where = f"{step.file} step {step.number} ({step.title})"
            status, out, err = yield defer.ensureDeferred(self.replay(step))
            replayed += 1
            if step.status != 124:  # killed by timeout(1): ours ended with the stream
                self.assertEqual(status, step.status, where)
            self.assertEqual(out, step.stdout, where)
            if (step.file, step.number) in OWN_WORDING:
                continue
            ours = err.splitlines()
            theirs = step.stderr.splitlines()
            # Ours is Go's, or (with -logDebugLevel 0) Go's lines in order with some
            # of Go's transport chatter left out.
            it = iter(theirs)
            self.assertTrue(all(line in it for line in ours), f"{where}: {ours} vs {theirs}")
            if "-logDebugLevel" not in step.argv:
                self.assertEqual(ours, theirs, where)
        self.assertGreaterEqual(replayed, 25)


class StreamCommandTests(TestCase):
    """
    trace-vm-metadata reads the daemon's message stream (L{hypervisor.metadata.trace}):
    paths to stdout, the end of the stream by "VM destroyed" is a normal exit, any
    other end an error. (The real daemon's refusal is in L{tests.test_tools_e2e}.)
    """

    async def run_trace(self, messages: list[bytes]) -> tuple[int, str, str]:
        class Stream:
            address = "127.0.0.1:6976"
            description = "stream"

            async def call(
                self, method: str, request: bytes, tail: Any = None, on_message: Any = None
            ) -> bytes:
                assert method == "Hypervisor.TraceVmMetadata"
                assert request == b'{"IpAddress":"10.0.0.2"}'
                for message in messages:
                    on_message(message)
                return b""

            def close(self) -> None:
                pass

        parsed = goflags.parse(
            ["-certDirectory=/nonexistent", "trace-vm-metadata", "10.0.0.2"],
            vm_control.FLAGS,
            vm_control.COMMANDS,
        )
        assert parsed.command is not None
        original = tool.make_transport
        tool.make_transport = lambda *a, **k: Stream()  # type: ignore[assignment]
        out, err = io.StringIO(), io.StringIO()
        try:
            with redirect_stdout(out), redirect_stderr(err):
                status = await tool.execute(
                    "vm-control",
                    parsed.values,
                    parsed.command,
                    vm_control.RUNNERS["trace-vm-metadata"],
                    parsed.args,
                    reactor,
                )
        finally:
            tool.make_transport = original
        return status, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_paths_until_destroyed(self):  # type: ignore[no-untyped-def]
        """
        The accepting empty message prints nothing; each path a line; "VM destroyed"
        ends it with status 0.
        """
        status, out, err = yield defer.ensureDeferred(
            self.run_trace(
                [
                    b'{"Error":"","Path":""}',
                    b'{"Error":"","Path":"/latest/meta-data/"}',
                    b'{"Error":"","Path":"/latest/user-data"}',
                    b'{"Error":"VM destroyed","Path":""}',
                ]
            )
        )
        self.assertEqual((status, out), (0, "/latest/meta-data/\n/latest/user-data\n"))
        self.assertIn("VM destroyed", err)

    @defer.inlineCallbacks
    def test_other_end_is_an_error(self):  # type: ignore[no-untyped-def]
        """
        A stream ended for another reason, or a malformed message, is an error.
        """
        status, _, err = yield defer.ensureDeferred(
            self.run_trace([b'{"Error":"receiver not keeping up","Path":""}'])
        )
        self.assertEqual(status, 1)
        self.assertIn("error tracing VM metadata: receiver not keeping up", err)
        status, _, err = yield defer.ensureDeferred(self.run_trace([b"[1,2"]))
        self.assertEqual(status, 1)
        self.assertIn("error tracing VM metadata: malformed message", err)
