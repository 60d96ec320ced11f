"""
The TFTP server (L{hypervisor.tftp.service.TftpService}, on the real reactor and
real UDP sockets on loopback) against real Debian clients: tftp-hpa (no options),
curl (tsize, blksize, timeout; and C{--tftp-no-options}), busybox tftp (C{-b 1428})
and atftp (C{windowsize 8}); a 40 MiB file past the block-number wrap checked by
sha256; traversal attempts refused; an unknown file answered with an error at once
(the client reports the server's error, not a timeout); a write refused; ten
clients at once on different files; per-client (NetbootMachine) files seen only by
their client's address.

Needs tftp-hpa, atftp, curl and busybox (C{tools/setup.sh --test}); skipped with
the reason otherwise (in CI they must be there).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from hypervisor.metrics import Metrics
from hypervisor.tftp.service import TftpService
from tests import support

CLIENTS = {"tftp": "tftp-hpa", "atftp": "atftp", "curl": "curl", "busybox": "busybox"}
BIG = 40 * 1024 * 1024


def require_clients() -> None:
    """
    Skip (or fail in CI) unless the real clients are installed.
    """
    for tool, package in CLIENTS.items():
        support.require(
            shutil.which(tool) is not None, f"{tool} is not installed (Debian {package})"
        )


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class RealClientTests(TestCase):
    """
    Real clients fetch from the server on 127.0.0.1.
    """

    timeout = 300

    def setUp(self) -> None:
        require_clients()
        self.top = tempfile.mkdtemp(prefix="hv-tftp-real-")
        self.addCleanup(shutil.rmtree, self.top, True)
        self.root = os.path.join(self.top, "boot")
        self.out = os.path.join(self.top, "out")
        os.makedirs(os.path.join(self.root, "pxelinux.cfg"))
        os.makedirs(self.out)
        self.files: dict[str, bytes] = {
            "small.txt": b"hello from the boot directory\n",
            "pxelinux.cfg/default": b"DEFAULT linux\n",
        }
        for i in range(10):
            self.files[f"f{i}.bin"] = os.urandom(200_000 + i * 7919)
        for name, data in self.files.items():
            with open(os.path.join(self.root, name), "wb") as f:
                f.write(data)
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            for _ in range(BIG // (1 << 20)):
                f.write(os.urandom(1 << 20))
        with open(os.path.join(self.top, "secret"), "wb") as f:
            f.write(b"not for clients")
        os.symlink("../secret", os.path.join(self.root, "link-out"))
        self.registered = {"127.0.0.1": {"/tftpboot/imagename": b"image-for-127.0.0.1"}}
        self.metrics = Metrics()
        self.service = TftpService(
            reactor,
            files_for=lambda ip: self.registered.get(ip, {}),
            directory=self.root,
            port=0,
            interface="127.0.0.1",
            stats=self.metrics.tftp,
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(self.service.stopService)
        assert self.service.bound_port is not None, self.service.problem
        self.port = str(self.service.bound_port)

    async def client(self, *argv: str) -> tuple[str, int]:
        """
        Run a client (without blocking the reactor); its output and exit status.
        """
        out, err, code = await getProcessOutputAndValue(
            shutil.which(argv[0]) or argv[0], argv[1:], env=dict(os.environ), path=self.out
        )
        return (out + err).decode("utf-8", "replace"), code

    def local(self, name: str) -> str:
        return os.path.join(self.out, name)

    def assertSame(self, name: str, out: str) -> None:
        self.assertEqual(sha256(self.local(out)), sha256(os.path.join(self.root, name)), name)

    def tftp_hpa(self, name: str, out: str) -> Any:
        return self.client("tftp", "127.0.0.1", self.port, "-m", "binary", "-c", "get", name, out)

    def curl(self, name: str, out: str, *extra: str) -> Any:
        return self.client("curl", "-sS", *extra, "-o", out, f"tftp://127.0.0.1:{self.port}/{name}")

    def busybox(self, name: str, out: str, blksize: int = 1428) -> Any:
        return self.client(
            "busybox",
            "tftp",
            "-b",
            str(blksize),
            "-g",
            "-r",
            name,
            "-l",
            out,
            "127.0.0.1",
            self.port,
        )

    def atftp(self, name: str, out: str, window: int = 8, blksize: int = 1428) -> Any:
        return self.client(
            "atftp",
            "--option",
            f"blksize {blksize}",
            "--option",
            "tsize 0",
            "--option",
            f"windowsize {window}",
            "-g",
            "-r",
            name,
            "-l",
            out,
            "127.0.0.1",
            self.port,
        )

    async def settled(self) -> None:
        """
        Wait until the server has no transfer in progress: a client exits on the
        last block, before the server sees its last ACK (on a transfer's thread,
        which then tells the reactor).
        """
        for _ in range(500):
            if not self.service.server.transfers:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"transfers still in progress: {self.service.server.status()}")

    def metric(self, name: str, labels: dict[str, str]) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def test_each_client(self) -> None:
        """
        Each client fetches small and multi-block files intact, with and without
        options; the metrics count the completed transfers.
        """

        async def go() -> None:
            output, code = await self.tftp_hpa("small.txt", "a")
            self.assertEqual(code, 0, output)
            self.assertSame("small.txt", "a")
            output, code = await self.tftp_hpa("/tftpboot/pxelinux.cfg/default", "b")
            self.assertSame("pxelinux.cfg/default", "b")
            output, code = await self.curl("f1.bin", "c", "--tftp-blksize", "1428")
            self.assertEqual(code, 0, output)
            self.assertSame("f1.bin", "c")
            output, code = await self.curl("f2.bin", "d", "--tftp-no-options")
            self.assertEqual(code, 0, output)
            self.assertSame("f2.bin", "d")
            output, code = await self.busybox("f3.bin", "e")
            self.assertEqual(code, 0, output)
            self.assertSame("f3.bin", "e")
            output, code = await self.atftp("f4.bin", "f")
            self.assertEqual(code, 0, output)
            self.assertSame("f4.bin", "f")
            await self.settled()
            completed = self.metric("hypervisor_tftp_transfers_total", {"outcome": "completed"})
            self.assertEqual(completed, 6)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_wrap_40_mib(self) -> None:
        """
        40 MiB at 512-byte blocks (81921 blocks: block numbers wrap past 65535) reach
        tftp-hpa and curl without options, busybox with blksize 512 and atftp with
        blksize 512 and windowsize 8, each with the same sha256.
        """

        async def go() -> None:
            for fetch, out in (
                (lambda: self.tftp_hpa("big.bin", "big1"), "big1"),
                (lambda: self.curl("big.bin", "big2", "--tftp-no-options"), "big2"),
                (lambda: self.busybox("big.bin", "big3", blksize=512), "big3"),
                (lambda: self.atftp("big.bin", "big4", blksize=512), "big4"),
            ):
                output, code = await fetch()
                self.assertEqual(code, 0, output)
                self.assertSame("big.bin", out)
                os.unlink(self.local(out))

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_refusals(self) -> None:
        """
        '..' and a symbolic link out of the directory are access violations, an
        unknown file is "file not found" (an answer, not a client timeout), a write
        is refused; no client gets the secret.
        """

        async def go() -> None:
            for name in ("../secret", "/../secret", "pxelinux.cfg/../../secret", "link-out"):
                output, _ = await self.tftp_hpa(name, "x")
                self.assertIn("Error code 2", output, name)
            output, code = await self.curl("../secret", "y", "--path-as-is")
            self.assertEqual(code, 69, output)  # CURLE_TFTP_PERM
            output, code = await self.busybox("link-out", "z")
            self.assertNotEqual(code, 0)
            self.assertIn("server error: (2)", output)
            output, _ = await self.tftp_hpa("no-such-file", "n")
            self.assertIn("Error code 1: file not found", output)
            output, code = await self.curl("no-such-file", "n2")
            self.assertEqual(code, 68, output)  # CURLE_TFTP_NOTFOUND
            output, code = await self.atftp("no-such-file", "n3")
            self.assertNotEqual(code, 0)
            self.assertNotIn("timeout", output.lower())
            with open(self.local("upload"), "wb") as f:
                f.write(b"data")
            output, _ = await self.client(
                "tftp", "127.0.0.1", self.port, "-m", "binary", "-c", "put", "upload", "up"
            )
            self.assertIn("Error code 2: this TFTP server is read-only", output)
            self.assertFalse(os.path.exists(os.path.join(self.root, "up")))
            for name in os.listdir(self.out):
                with open(self.local(name), "rb") as f:
                    self.assertNotIn(b"not for clients", f.read(), name)
            self.assertEqual(self.metric("hypervisor_tftp_refused_total", {"code": "1"}), 3)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_ten_at_once(self) -> None:
        """
        Ten clients (all four kinds) fetching ten files at the same time all finish
        with the right bytes.
        """
        kinds = [self.tftp_hpa, self.curl, self.busybox, self.atftp]

        async def go() -> None:
            runs = [kinds[i % 4](f"f{i}.bin", f"c{i}") for i in range(10)]
            results = await gatherResults([Deferred.fromCoroutine(r) for r in runs])
            for i, (output, code) in enumerate(results):
                self.assertEqual(code, 0, output)
                self.assertSame(f"f{i}.bin", f"c{i}")
            await self.settled()
            self.assertEqual(self.service.server.transfers, {})

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_per_client_files(self) -> None:
        """
        A file registered for 127.0.0.1 (as NetbootMachine does) is served to it,
        and is "not found" for a client at 127.0.0.2.
        """

        async def go() -> None:
            output, code = await self.curl("imagename", "i1")
            self.assertEqual(code, 0, output)
            with open(self.local("i1"), "rb") as f:
                self.assertEqual(f.read(), b"image-for-127.0.0.1")
            output, code = await self.curl("imagename", "i2", "--interface", "127.0.0.2")
            self.assertEqual(code, 68, output)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_no_disk_io_on_the_reactor(self) -> None:
        """
        Opening, reading and closing files (found, missing, refused, netascii) happens
        on the TFTP thread pool: the file-system calls of our code on the reactor's
        thread are none (the monitor of L{tests.test_reactor_io}).
        """
        from tests.test_reactor_io import Monitor

        monitor = Monitor()

        async def go() -> None:
            monitor.install()
            try:
                runs = [
                    self.tftp_hpa("f5.bin", "m1"),
                    self.atftp("f6.bin", "m2"),
                    self.curl("small.txt", "m3", "--tftp-no-options"),
                    self.tftp_hpa("missing", "m4"),
                    self.tftp_hpa("link-out", "m5"),
                    self.client(
                        "tftp",
                        "127.0.0.1",
                        self.port,
                        "-m",
                        "netascii",
                        "-c",
                        "get",
                        "small.txt",
                        "m6",
                    ),
                ]
                for run in runs:
                    await run
                await self.settled()
            finally:
                monitor.uninstall()
            self.assertSame("f5.bin", "m1")
            self.assertSame("f6.bin", "m2")
            with open(self.local("m6"), "rb") as f:
                self.assertEqual(f.read(), self.files["small.txt"])  # netascii decoded back
            report = "\n\n".join(f"{call}\n{stack}" for call, stack in monitor.violations)
            self.assertEqual(monitor.violations, [], report)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]
