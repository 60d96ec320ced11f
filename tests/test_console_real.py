"""
Serial consoles end to end: a real daemon, the tiny guest under the real libvirtd with
a shell on its serial port (C{hv.mode=shell}), and real clients over both
transports: a command typed into the guest's shell and its output read back, over
SRPC (as the Go vm-control speaks it) and over the HTTPS WebSocket; a second
connection refused while one is open; C{vm-control connect-to-vm-serial-port} with
piped stdin and the Go tool's escape key; the VM's end ("VM serial port closed");
the boot log kept meanwhile.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from tests import support

# Names and addresses of this process's own: another run of the suite on the same host
# (other sessions) must not share the bridge, the subnet or the domain names.
NET = 10 + os.getpid() % 200
SUBNET = f"con{NET}"
BRIDGE = f"br@{SUBNET}"
GATEWAY = f"10.117.{NET}.1"


def read_until(channel, marker: bytes, timeout: float = 60.0) -> bytes:  # type: ignore[no-untyped-def]
    """
    Console bytes until C{marker} appears (or fail).
    """
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout}s; saw {seen[-800:]!r}")
        if not channel.pending() and not select.select([channel], [], [], left)[0]:
            continue
        data = channel.recv()
        if not data:
            raise AssertionError(f"the console closed before {marker!r}; saw {seen[-800:]!r}")
        seen += data
    return seen


def shell_vm(testcase, cli, last: int, *flags: str) -> str:  # type: ignore[no-untyped-def]
    """
    A running tiny guest with a shell on its serial port, owned by C{owner}; its IP.
    """
    guest = support.tiny_guest()
    r = cli(
        "vm_control",
        "owner",
        f"-kernelURL=file://{guest}/vmlinux",
        f"-initrdURL=file://{guest}/initrd.cpio",
        "-extraKernelOptions",
        "quiet hv.dhcp=no hv.mode=shell",
        "-memory",
        "128M",
        "-milliCPUs",
        "500",
        "-minFreeBytes",
        "16M",
        "-roundupPower",
        "0",
        "-dhcpTimeout=0s",
        *flags,
        "create-vm",
    )
    testcase.assertEqual(r.returncode, 0, r.stderr)
    ip = r.stdout.strip()
    testcase.addCleanup(cli, "vm_control", "admin", "destroy-vm", ip)
    return ip


class ShellGuestCase(SynchronousTestCase):
    """
    A real daemon with TLS and a running tiny guest with a shell on its serial port.
    """

    create_flags: tuple[str, ...] = ()
    daemon_flags: tuple[str, ...] = ()

    def setUp(self) -> None:
        support.require_libvirtd()
        # An interrupted earlier run in a process of the same NET may have left them.
        support.destroy_domains([f"vm-10.117.{NET}.{i}" for i in (20, 21)])
        guest = support.tiny_guest()
        support.ensure_bridge(BRIDGE)
        self.addCleanup(subprocess.run, ["ip", "link", "del", BRIDGE], capture_output=True)
        self.d, self.cli = support.tls_daemon(
            self,
            {"admin": "Hypervisor.*", "owner": "", "other": ""},
            "-domainType=qemu",
            f"-localImagesDirectory={guest}",
            *self.daemon_flags,
        )
        admin = lambda *a: self.cli("hyper_control", "admin", *a)  # noqa: E731
        r = admin("add-subnet", SUBNET, GATEWAY, "255.255.255.0")
        self.assertEqual(r.returncode, 0, r.stderr)
        for i in (20, 21):
            r = admin("add-address", f"52:54:0a:75:{NET:02x}:{i:02x}", f"10.117.{NET}.{i}")
            self.assertEqual(r.returncode, 0, r.stderr)
        self.pki = os.path.join(self.d.dir, "pki")
        self.ip = shell_vm(self, self.cli, 20, *self.create_flags)
        self.bootlog = os.path.join(self.d.state_dir, "VMs", self.ip, "bootlog")
        try:
            support.wait_for(
                lambda: "shell on the console" in self._bootlog(), 180, "the guest's shell"
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; boot log: {self._bootlog()[-1500:]!r}") from None

    def _bootlog(self) -> str:
        try:
            with open(self.bootlog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def pair(self, user: str):  # type: ignore[no-untyped-def]
        from hypervisor.cli.transport import best_certificate

        return best_certificate(os.path.join(self.pki, user))

    def open(self, transport: str, user: str = "owner", port: int = 0):  # type: ignore[no-untyped-def]
        from hypervisor.cli import console

        request = json.dumps({"IpAddress": self.ip, "PortNumber": port}).encode()
        opener = console.open_srpc if transport == "srpc" else console.open_websocket
        return opener(
            "127.0.0.1",
            self.d.port,
            self.pair(user),
            f"{self.pki}/CA.pem",
            "Hypervisor.ConnectToVmSerialPort",
            request,
        )

    def vm_control_process(self, stdin: int, *args: str) -> "subprocess.Popen[bytes]":
        """
        vm-control as the owner with C{args}, stdout and stderr piped (killed at the
        end of the test if still running).
        """
        process = subprocess.Popen(
            support.tool_argv("vm_control", self.d.port, self.pki, "owner", *args),
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        return process

    def vnc_with_vm_control(self, *flags: str) -> None:
        """
        vm-control connect-to-vm-console -vncViewer= (Go's way without a viewer), with
        C{flags}: it logs the localhost port, a VNC client there gets the guest's RFB
        server.
        """
        import re
        import socket

        process = self.vm_control_process(
            subprocess.DEVNULL, *flags, "-vncViewer=", "connect-to-vm-console", self.ip
        )
        assert process.stderr is not None and process.stdout is not None
        line = process.stderr.readline().decode()
        m = re.search(r"listening on port (\d+) for VNC connection", line)
        self.assertIsNotNone(m, line)
        assert m is not None
        viewer = socket.create_connection(("localhost", int(m.group(1))), 10)
        viewer.settimeout(30)
        self.assertEqual(viewer.recv(12), b"RFB 003.008\n")
        viewer.close()
        self.assertEqual(process.wait(30), 0)
        process.stdout.close()
        process.stderr.close()

    def vm_control_console(self, n: int, *flags: str) -> None:
        """
        vm-control connect-to-vm-serial-port with C{flags} and piped stdin: a command
        typed, its output on stderr, Control-\\ ends it with status 0.
        """
        process = self.vm_control_process(
            subprocess.PIPE, *flags, "connect-to-vm-serial-port", self.ip
        )
        assert process.stdin is not None and process.stderr is not None
        process.stdin.write(f"echo tool{n}-$((40+2))\n".encode())
        process.stdin.flush()
        seen = b""
        deadline = time.monotonic() + 60
        while f"tool{n}-42".encode() not in seen and time.monotonic() < deadline:
            if select.select([process.stderr], [], [], 1)[0]:
                data = os.read(process.stderr.fileno(), 4096)
                if not data:
                    break
                seen += data
        self.assertIn(f"tool{n}-42".encode(), seen)
        process.stdin.write(b"\x1c")
        process.stdin.flush()
        self.assertEqual(process.wait(30), 0)
        process.stdin.close()
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()


class SerialConsoleTests(ShellGuestCase):
    """
    The serial console against the real daemon and guest.
    """

    def test_srpc_and_websocket(self) -> None:
        """
        Over SRPC: a command typed, its output read; meanwhile a second connection is
        refused on both transports (and other users are refused), then after the first
        closes the WebSocket gets the console; the VM stopping ends it with "VM
        serial port closed".
        """
        from hypervisor.cli.client import ClientError

        srpc = self.open("srpc")
        srpc.send(b"echo con$((6*7))sole\n")
        read_until(srpc, b"con42sole")
        for transport in ("srpc", "https"):
            with self.assertRaises(ClientError) as e:
                self.open(transport)
            self.assertEqual(str(e.exception), "VM already has a serial port connection")
            with self.assertRaises(ClientError) as e:
                self.open(transport, "other")
            self.assertIn("no access to VM", str(e.exception))
        with self.assertRaises(ClientError) as e:
            self.open("srpc", port=1)
        self.assertEqual(str(e.exception), "only one serial port is supported")
        srpc.close()
        # The lock is released once the daemon sees the close.
        ws = support.wait_for(lambda: self.open("https"), 10, "the console to be free again")
        ws.send(b"echo web$((40+2))socket\n")
        read_until(ws, b"web42socket")
        self.assertIn("con42sole", self._bootlog())  # the boot log is kept meanwhile
        r = self.cli("vm_control", "owner", "stop-vm", self.ip)
        self.assertEqual(r.returncode, 0, r.stderr)
        tail = read_until(ws, b"VM serial port closed\n", 60)
        self.assertTrue(tail.endswith(b"VM serial port closed\n"), tail[-200:])
        self.assertEqual(ws.recv(), b"")
        with self.assertRaises(ClientError) as e:
            self.open("srpc")
        self.assertEqual(str(e.exception), "VM is not running")

    def test_vm_control(self) -> None:
        """
        vm-control connect-to-vm-serial-port over both transports with piped stdin:
        a command typed, its output on stderr, Control-\\ ends it with status 0.
        """
        for n, transport in enumerate(("srpc", "https")):
            self.vm_control_console(n, f"-transport={transport}")


class GraphicalConsoleTests(ShellGuestCase):
    """
    ChangeVmConsoleType and ConnectToVmConsole (VNC) against the real daemon and guest.
    """

    def open_console(self, transport: str, method: str, user: str = "owner"):  # type: ignore[no-untyped-def]
        from hypervisor.cli import console

        opener = console.open_srpc if transport == "srpc" else console.open_websocket
        return opener(
            "127.0.0.1",
            self.d.port,
            self.pair(user),
            f"{self.pki}/CA.pem",
            f"Hypervisor.{method}",
            json.dumps({"IpAddress": self.ip}).encode(),
        )

    def test_vnc(self) -> None:
        """
        Without a VNC console the call is refused; the type changes only while the VM is
        stopped; after a start with ConsoleType vnc both transports reach the VM's RFB
        server (its version banner, then its security types after ours);
        ConnectToVmManager is refused as not supported.
        """
        from hypervisor.cli.client import ClientError

        with self.assertRaises(ClientError) as e:
            self.open_console("srpc", "ConnectToVmConsole")
        self.assertEqual(str(e.exception), "VNC console is not enabled")
        change = ("vm_control", "owner", "-consoleType", "vnc", "change-vm-console-type", self.ip)
        r = self.cli(*change)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("is not stopped", r.stderr)
        for args in (("stop-vm", self.ip), change[2:], ("-dhcpTimeout=0s", "start-vm", self.ip)):
            r = self.cli("vm_control", "owner", *args)
            self.assertEqual(r.returncode, 0, r.stderr)
        for transport in ("srpc", "https"):
            rfb = self.open_console(transport, "ConnectToVmConsole")
            banner = read_until(rfb, b"\n", 30)
            self.assertEqual(banner, b"RFB 003.008\n")
            rfb.send(b"RFB 003.008\n")
            types = rfb.recv()
            self.assertGreaterEqual(types[0], 1, types)  # at least one security type
            rfb.close()
        self.vnc_with_vm_control()
        with self.assertRaises(ClientError) as e:
            self.open_console("srpc", "ConnectToVmManager", "admin")
        self.assertIn("ConnectToVmManager is not supported", str(e.exception))
        with self.assertRaises(ClientError) as e:
            self.open_console("srpc", "ConnectToVmManager", "owner")
        self.assertIn("denied", str(e.exception))


class HostileWebSocketTests(SynchronousTestCase):
    """
    The console WebSocket against hostile clients, on a real daemon (no VM needed: every
    refusal comes before the console is reached): raw TLS sockets send what a browser
    would not.
    """

    def setUp(self) -> None:
        self.d, self.cli = support.tls_daemon(self, {"owner": ""})
        self.pki = os.path.join(self.d.dir, "pki")

    def handshake(self, headers: str, cert: bool = True, path: str = "ConnectToVmSerialPort"):  # type: ignore[no-untyped-def]
        import socket
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if cert:
            pair = self.pair()
            context.load_cert_chain(pair.cert_path, pair.key_path)
        sock = context.wrap_socket(socket.create_connection(("127.0.0.1", self.d.port), 10))
        sock.settimeout(10)
        self.addCleanup(sock.close)
        sock.sendall(
            (
                f"GET /ws/Hypervisor.{path} HTTP/1.1\r\nHost: 127.0.0.1:{self.d.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                f"{headers}\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                break
            head += data
        return sock, head

    def pair(self):  # type: ignore[no-untyped-def]
        from hypervisor.cli.transport import best_certificate

        return best_certificate(os.path.join(self.pki, "owner"))

    def test_refused_before_opening(self) -> None:
        """
        Another site's Origin: 403; no client certificate: 401; a method that is not a
        console: 400; an unknown one: 404 — each before the WebSocket opens.
        """
        _, head = self.handshake("Origin: https://evil.example\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 403"), head[:200])
        _, head = self.handshake("", cert=False)
        self.assertTrue(head.startswith(b"HTTP/1.1 401"), head[:200])
        _, head = self.handshake("", path="ListVMs")
        self.assertTrue(head.startswith(b"HTTP/1.1 400"), head[:200])
        _, head = self.handshake("", path="NoSuchMethod")
        self.assertTrue(head.startswith(b"HTTP/1.1 404"), head[:200])
        _, head = self.handshake(f"Origin: https://127.0.0.1:{self.d.port}\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head[:200])

    def test_request_is_due(self) -> None:
        """
        A WebSocket that opens and never sends its request is closed (4008) after
        web.console.REQUEST_TIMEOUT seconds.
        """
        import struct

        from web.console import REQUEST_LATE, REQUEST_TIMEOUT

        sock, head = self.handshake("")
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head[:200])
        sock.settimeout(REQUEST_TIMEOUT + 10)
        data = sock.recv(4096)
        self.assertEqual(data[:1], b"\x88")  # a close frame
        self.assertEqual(struct.unpack("!H", data[2:4])[0], REQUEST_LATE)
        self.assertIn(b"no request within", data)

    def test_oversized_frame_closes(self) -> None:
        """
        A frame announcing more than 64 KiB ends the connection (autobahn drops it);
        the daemon keeps serving.
        """
        import struct

        from hypervisor.cli.console import encode_frame

        sock, head = self.handshake("")
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head[:200])
        header = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + b"\0\0\0\0"
        sock.sendall(header + b"x" * 1024)
        data = b""
        while True:
            try:
                chunk = sock.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        # autobahn drops the connection at once (failByDrop); a close frame, if any,
        # says 1009 (message too big). Nothing of the frame reached the console.
        if data:
            self.assertEqual(data[:1], b"\x88")
            self.assertEqual(struct.unpack("!H", data[2:4])[0], 1009)
        sock2, head = self.handshake("")
        self.assertTrue(head.startswith(b"HTTP/1.1 101"), head[:200])
        sock2.sendall(encode_frame(1, b'{"IpAddress":"10.99.0.1"}'))
        answer = sock2.recv(4096)
        self.assertIn(b"no VM with IP 10.99.0.1", answer)
