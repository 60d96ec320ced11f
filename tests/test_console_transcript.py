"""
C{vm-control connect-to-vm-serial-port} against the Go client's capture (transcript 03
step 11): a fake hypervisor on loopback answers exactly what the recording fake
answered (404 for the gob endpoint, 200 for C{/_SRPC_/TLS/JSON}, the C{"\\n"} accept
line, C{{"Error":""}} in its own TLS record, the console banner, the echo), our tool
runs on a real pseudo-terminal where "root\\r" is typed and then Control-\\, and the
bytes it sent and the terminal's output are compared with the Go client's.
"""

from __future__ import annotations

import os
import pty
import select
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hypervisor import certs
from tests import support
from tests.test_tools_transcripts import steps

GO_OUTPUT = b"\r\nfake-vm serial console (port 0)\r\nlogin: root\r\r"


def _line(sock: Any) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


class ConsoleTranscriptTests(SynchronousTestCase):
    """
    Our tool's side of transcript 03 step 11, byte for byte.
    """

    def test_step_11(self) -> None:
        step = next(s for s in steps() if s.file == "03-vm-commands.txt" and s.number == 11)
        (call,) = step.calls
        self.assertEqual(call.method, "Hypervisor.ConnectToVmSerialPort")
        directory = tempfile.mkdtemp(prefix="console-transcript-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", directory]))
        ca_key, ca = certs.make_ca("transcript CA")
        key, cert = certs.make_certificate(ca_key, ca, "127.0.0.2", server_names=["127.0.0.2"])
        certs.write_pair(f"{directory}/server.pem", f"{directory}/server.key", key, cert)
        with open(f"{directory}/CA.pem", "wb") as f:
            f.write(certs.cert_pem(ca))
        os.makedirs(f"{directory}/user")
        key, cert = certs.make_certificate(ca_key, ca, "testuser", groups=["team-a"])
        certs.write_pair(f"{directory}/user/user.cert", f"{directory}/user/user.key", key, cert)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(f"{directory}/server.pem", f"{directory}/server.key")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(30)
        self.addCleanup(listener.close)
        seen: dict[str, Any] = {"input": b""}

        def serve() -> None:
            try:
                for _ in range(2):
                    conn, _ = listener.accept()
                    head = b""
                    while not head.endswith(b"\n\n"):
                        head += conn.recv(1)
                    if head.startswith(b"CONNECT /_go_TLS_SRPC_/"):
                        conn.sendall(b"HTTP/1.0 404 Not Found\n\n")
                        conn.close()
                        continue
                    seen["connect"] = head
                    conn.sendall(b"HTTP/1.0 200 Connected to Go SRPC\n\n")
                    tls = context.wrap_socket(conn, server_side=True)
                    seen["method"] = _line(tls)
                    tls.sendall(b"\n")
                    seen["request"] = _line(tls)
                    tls.sendall(call.replies[0])  # {"Error":""}\n, its own record
                    time.sleep(0.1)
                    tls.sendall(call.replies[1])  # the banner
                    while b"\r" not in seen["input"]:
                        data = tls.recv(256)
                        if not data:
                            break
                        seen["input"] += data
                    tls.sendall(call.replies[2])  # the echo
                    seen["eof"] = tls.recv(256) == b""
                    tls.close()
            except Exception as e:  # noqa: BLE001 - reported by the test
                seen["error"] = repr(e)

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        master, slave = pty.openpty()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hypervisor.cli.vm_control",
                "-hypervisorHostname=127.0.0.1",
                f"-hypervisorPortNum={listener.getsockname()[1]}",
                f"-certDirectory={directory}/user",
                f"-CAfile={directory}/CA.pem",
                "-transport=srpc",
                "connect-to-vm-serial-port",
                "10.77.0.10",
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            stdin=slave,
            stdout=slave,
            stderr=slave,
        )
        os.close(slave)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        output = b""

        def read_until(marker: bytes, timeout: float = 30) -> None:
            nonlocal output
            deadline = time.monotonic() + timeout
            while marker not in output and time.monotonic() < deadline:
                if select.select([master], [], [], 0.5)[0]:
                    try:
                        output += os.read(master, 4096)
                    except OSError:
                        break
            self.assertIn(marker, output, seen)

        read_until(b"login: ")
        os.write(master, b"root\r")
        read_until(b"login: root\r")
        os.write(master, b"\x1c")
        self.assertEqual(process.wait(30), 0)
        read_until(GO_OUTPUT, 5)
        server.join(10)
        self.assertNotIn("error", seen)
        self.assertEqual(seen["connect"], b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\n\n")
        self.assertEqual(seen["method"], b"Hypervisor.ConnectToVmSerialPort\n")
        self.assertEqual(seen["request"], call.request)
        self.assertEqual(seen["input"], call.uploads[0])  # b"root\r", raw (no echo, no CRLF)
        self.assertTrue(seen["eof"])
        self.assertEqual(output, GO_OUTPUT)  # the Go client's pty output, byte for byte
