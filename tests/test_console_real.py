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
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from tests import support

SUBNET = "con17"
BRIDGE = "br@con17"
GATEWAY = "10.77.17.1"


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


def shell_vm(testcase, cli, last: int) -> str:  # type: ignore[no-untyped-def]
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

    def setUp(self) -> None:
        support.require_libvirtd()
        guest = support.tiny_guest()
        support.ensure_bridge(BRIDGE)
        self.addCleanup(subprocess.run, ["ip", "link", "del", BRIDGE], capture_output=True)
        self.d, self.cli = support.tls_daemon(
            self,
            {"admin": "Hypervisor.*", "owner": "", "other": ""},
            "-domainType=qemu",
            f"-localImagesDirectory={guest}",
        )
        admin = lambda *a: self.cli("hyper_control", "admin", *a)  # noqa: E731
        r = admin("add-subnet", SUBNET, GATEWAY, "255.255.255.0")
        self.assertEqual(r.returncode, 0, r.stderr)
        for i in (20, 21):
            r = admin("add-address", f"52:54:0a:4d:11:{i:02x}", f"10.77.17.{i}")
            self.assertEqual(r.returncode, 0, r.stderr)
        self.pki = os.path.join(self.d.dir, "pki")
        self.ip = shell_vm(self, self.cli, 20)
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
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hypervisor.cli.vm_control",
                    f"-hypervisorPortNum={self.d.port}",
                    f"-certDirectory={self.pki}/owner",
                    f"-CAfile={self.pki}/CA.pem",
                    f"-transport={transport}",
                    "connect-to-vm-serial-port",
                    self.ip,
                ],
                cwd=support.REPO,
                env=dict(os.environ, PYTHONPATH=support.REPO),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            self.addCleanup(lambda p=process: p.poll() is None and p.kill())
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
        with self.assertRaises(ClientError) as e:
            self.open_console("srpc", "ConnectToVmManager", "admin")
        self.assertIn("ConnectToVmManager is not supported", str(e.exception))
        with self.assertRaises(ClientError) as e:
            self.open_console("srpc", "ConnectToVmManager", "owner")
        self.assertIn("denied", str(e.exception))
