"""
C{hypervisor serve-images} as a real process over client-certificate TLS: curl and
openssl as clients (refused without a certificate, names cannot escape the
directory), and CreateVm/ReplaceVmImage with C{ImageName} fetched from it into the
image cache.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

from hypervisor import certs, errors
from hypervisor.imageserver import ImageServerClientPolicy, check_name, image_server_url
from hypervisor.model import AccessRequest, IpRequest, ReplaceVmImageRequest, VolumeFormat
from tests import support
from tests.test_image_sources import write_raw
from tests.test_manager_vms import ALICE, Daemon, ManagerTestCase

MiB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ImageServerProcess:
    """
    A CA, the server's certificate (also its client certificate, as the daemon's
    is), a stranger's certificate from another CA, and C{hypervisor serve-images}.
    """

    def __init__(self, testcase: Any, root: str) -> None:
        self.root = root
        self.images = os.path.join(root, "served-images")
        os.makedirs(os.path.join(self.images, "debian"))
        pki = self.pki = os.path.join(root, "pki")
        os.makedirs(pki)
        ca_key, ca = certs.make_ca("image CA")
        self.ca = os.path.join(pki, "CA.pem")
        with open(self.ca, "wb") as f:
            f.write(certs.cert_pem(ca))
        key, cert = certs.make_certificate(
            ca_key, ca, "hypervisor", server_names=["localhost", "127.0.0.1"]
        )
        self.cert, self.key = os.path.join(pki, "server.pem"), os.path.join(pki, "server.key")
        certs.write_pair(self.cert, self.key, key, cert)
        other_key, other = certs.make_ca("other CA")
        k, c = certs.make_certificate(other_key, other, "mallory")
        self.stranger = (os.path.join(pki, "m.pem"), os.path.join(pki, "m.key"))
        certs.write_pair(self.stranger[0], self.stranger[1], k, c)
        self.port = support.free_port()
        env = dict(os.environ, PYTHONPATH=REPO, HYPERVISOR_FLAGS_DIRECTORY=pki)
        self.log = open(os.path.join(root, "serve-images.log"), "wb")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hypervisor",
                f"-CAfile={self.ca}",
                f"-certFile={self.cert}",
                f"-keyFile={self.key}",
                "serve-images",
                "--port",
                str(self.port),
                self.images,
            ],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        testcase.addCleanup(self.stop)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.output()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, self.output()
                time.sleep(0.05)

    def output(self) -> str:
        with open(os.path.join(self.root, "serve-images.log"), errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.log.close()

    def curl(
        self, path: str, *extra: str, cert: Any = "mine"
    ) -> subprocess.CompletedProcess[bytes]:
        args = ["curl", "-sS", "--path-as-is", "--cacert", self.ca, "-o", "-"]
        args += ["-w", "\n%{http_code}"]
        if cert == "mine":
            args += ["--cert", self.cert, "--key", self.key]
        elif cert is not None:
            args += ["--cert", cert[0], "--key", cert[1]]
        return subprocess.run(
            args + list(extra) + [f"https://127.0.0.1:{self.port}{path}"],
            capture_output=True,
            timeout=30,
        )

    def policy(self) -> ImageServerClientPolicy:
        return ImageServerClientPolicy(self.cert, self.key, self.ca)


class ServeImagesTests(ManagerTestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        support.require(shutil.which("curl") is not None, "curl is not installed")
        self.server = ImageServerProcess(self, self.root)
        self.image = write_raw(os.path.join(self.server.images, "debian", "disk.raw"), 2 * MiB)
        self.daemon = Daemon(
            self,
            self.root,
            self.host,
            image_cache_directory=os.path.join(self.root, "objectcache"),
            image_server=("127.0.0.1", self.server.port, self.server.policy()),
        )
        self.api = self.daemon.api
        self.manager = self.daemon.manager

    def test_http_layout_and_refusals(self) -> None:
        """
        GET /images/<name> with a client certificate; without one, or with one
        from another CA, the handshake fails; names cannot leave the directory.
        """
        os.symlink("/etc/passwd", os.path.join(self.server.images, "escape"))
        ok = self.server.curl("/images/debian/disk.raw")
        self.assertEqual(ok.stdout[-3:], b"200", ok.stderr)
        self.assertEqual(ok.stdout[:-4], self.image)
        for cert in (None, self.server.stranger):
            refused = self.server.curl("/images/debian/disk.raw", cert=cert)
            self.assertNotEqual(refused.returncode, 0)
            self.assertNotIn(self.image[:600], refused.stdout)
        for path in (
            "/images/../pki/server.key",
            "/images/debian/../../pki/server.key",
            "/images/%2e%2e/pki/server.key",
            "/images/escape",
            "/images/.hidden",
            "/images/",
            "/pki/server.key",
        ):
            result = self.server.curl(path)
            self.assertEqual(result.stdout[-3:], b"404", (path, result.stdout[-200:]))
            self.assertNotIn(b"PRIVATE KEY", result.stdout)
        posted = self.server.curl("/images/debian/disk.raw", "-X", "POST")
        self.assertEqual(posted.stdout[-3:], b"405")

    def test_names(self) -> None:
        self.assertEqual(image_server_url("h", 1, "a b/c"), "https://h:1/images/a%20b/c")
        for bad in ("", "/abs", "a/../b", "a//b", ".x", "a\nb", "a\\b", "x" * 1025):
            with self.assertRaises(ValueError):
                check_name(bad)

    async def test_create_and_replace_by_name(self) -> None:
        """
        CreateVm with ImageName downloads into the cache once (the second VM
        revalidates); ReplaceVmImage by name works; a bad name changes nothing.
        """
        await self.prepare()
        ip = await self.create(ImageName="debian/disk.raw", MinimumFreeBytes=0)
        info = self.api.GetVmInfo(ALICE, IpRequest(ip)).VmInfo
        self.assertEqual(info.Volumes[0].Format, VolumeFormat.QCOW2)
        self.assertEqual(info.Volumes[0].VirtualSize, 2 * MiB)
        cache: Any = self.manager.ctx.image_cache
        await self.create(ImageName="debian/disk.raw", MinimumFreeBytes=0)
        self.assertEqual((cache.misses, cache.revalidations), (1, 1))
        write_raw(os.path.join(self.server.images, "debian", "next.raw"), MiB, seed=5)
        await self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        await self.api.ReplaceVmImage(
            ALICE, ReplaceVmImageRequest(IpAddress=ip, ImageName="debian/next.raw")
        )
        self.assertEqual(
            self.api.GetVmInfo(ALICE, IpRequest(ip)).VmInfo.Volumes[0].VirtualSize, MiB
        )
        free = list(self.manager.pool.free)
        for name, error, words in (
            ("../pki/server.key", errors.InvalidRequest, "ImageName"),
            ("debian/missing.raw", errors.InvalidRequest, "HTTP 404"),
        ):
            e = await self.raises(error, self.create, ImageName=name, MinimumFreeBytes=0)
            self.assertIn(words, str(e))
        self.assertEqual(self.manager.pool.free, free)
        self.assertEqual(os.listdir(os.path.join(self.root, "objectcache", "partial")), [])
