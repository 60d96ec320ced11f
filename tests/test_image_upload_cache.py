"""
Images uploaded with CreateVm (ImageDataSize) go into the image cache by content
digest when there is one: the root is a qcow2 overlay on the cached bytes, so a second
upload of the same bytes stores nothing new; other bytes make a second entry; a
standalone root still gets the bytes themselves; a broken upload leaves nothing in
the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from hypervisor import errors
from hypervisor.manager import images
from hypervisor.model import AccessRequest, CreateVmRequest, IpRequest, VmInfo, VolumeFormat
from hypervisor.upload import UploadStream
from tests.test_image_sources import write_raw
from tests.test_manager_vms import ALICE, Daemon, ManagerTestCase

MiB = 1024 * 1024


class UploadCacheTests(ManagerTestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.cache = os.path.join(self.root, "objectcache")
        self.daemon = Daemon(
            self, self.root, self.host, image_cache_directory=self.cache, image_timeout=5
        )
        self.api = self.daemon.api
        self.manager = self.daemon.manager

    async def upload(self, data: bytes, chunks: int = 4, **fields: Any) -> str:
        stream = UploadStream(len(data))
        step = -(-len(data) // chunks)
        for i in range(chunks):
            reactor.callLater(0.001 * (i + 1), stream.write, data[i * step : (i + 1) * step])
        response = await self.api.CreateVm(
            ALICE,
            CreateVmRequest(
                VmInfo=VmInfo(MemoryInMiB=64, MilliCPUs=100, SubnetId="net"),
                ImageDataSize=len(data),
                DoNotStart=True,
                **fields,
            ),
            upload=stream,
        )
        await self.api.AcknowledgeVm(ALICE, IpRequest(response.IpAddress))
        return str(response.IpAddress)

    def cached(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.cache, "images")))

    async def test_same_bytes_twice_one_cached_image(self) -> None:
        """
        Two uploads of the same raw bytes: one cache entry named by their sha256,
        both roots qcow2 overlays on it of the rounded-up size, the second a hit;
        other bytes make a second entry; StandaloneRootVolume writes the bytes into
        the root as before.
        """
        await self.prepare()
        path = os.path.join(self.root, "disk.raw")
        data = write_raw(path, 3 * MiB)
        digest = hashlib.sha256(data).hexdigest()
        first = await self.upload(data, RoundupPower=22)
        cache = self.manager.ctx.image_cache
        assert cache is not None
        self.assertEqual(self.cached(), [digest])
        self.assertEqual((cache.misses, cache.hits), (1, 0))
        second = await self.upload(data, RoundupPower=22)
        self.assertEqual(self.cached(), [digest])
        self.assertEqual((cache.misses, cache.hits), (1, 1))
        for ip in (first, second):
            info = self.info_file(ip)
            root = info["VolumeLocations"][0]["Filename"]
            volume = info["Volumes"][0]
            self.assertEqual(volume["Format"], "qcow2")
            self.assertEqual(volume["VirtualSize"], 4 * MiB)  # 3 MiB + 1 MiB free, 2^22
            self.assertEqual(
                images.qcow2_backing_file(root), os.path.join(self.cache, "images", digest)
            )
            self.assertLess(os.path.getsize(root), MiB)
            out = subprocess.run(
                ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", root, path],
                capture_output=True,
                text=True,
            )
            # The overlay reads back the uploaded bytes (then zeros up to its size).
            self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        third = await self.upload(write_raw(os.path.join(self.root, "o.raw"), 2 * MiB, seed=5))
        self.assertEqual(len(self.cached()), 2)
        self.assertEqual(self.info_file(third)["Volumes"][0]["Format"], "qcow2")
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=third))  # (3 addresses)
        standalone = await self.upload(data, StandaloneRootVolume=True)
        info = self.info_file(standalone)
        self.assertEqual(info["Volumes"][0]["Format"], VolumeFormat.RAW.value)
        with open(info["VolumeLocations"][0]["Filename"], "rb") as f:
            self.assertEqual(f.read(len(data)), data)
        self.assertEqual(len(self.cached()), 2)

    async def test_broken_upload_leaves_nothing(self) -> None:
        """
        An upload that ends early, or bytes that are no image, leave no cache entry,
        nothing in partial/ and no VM.
        """
        await self.prepare()
        data = b"\x1f\x8b" + b"\0" * (2 * MiB)  # gzip magic: refused when probed
        e = await self.raises(
            errors.InvalidRequest, lambda: Deferred.fromCoroutine(self.upload(data))
        )
        self.assertIn("gzip", str(e))
        stream = UploadStream(2 * MiB)
        reactor.callLater(0.01, stream.write, b"\0" * MiB)
        reactor.callLater(0.02, stream.fail, ConnectionError("client went away"))
        try:
            await self.api.CreateVm(
                ALICE,
                CreateVmRequest(
                    VmInfo=VmInfo(MemoryInMiB=64, MilliCPUs=100, SubnetId="net"),
                    ImageDataSize=2 * MiB,
                    DoNotStart=True,
                ),
                upload=stream,
            )
        except Exception:
            pass
        else:
            raise AssertionError("a broken upload made a VM")
        self.assertEqual(os.listdir(os.path.join(self.cache, "partial")), [])
        self.assertEqual(self.cached(), [])
        self.assertEqual(self.manager.vms, {})
