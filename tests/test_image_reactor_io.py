"""
No disk I/O on the reactor thread in the image paths (issue 14, item 7): CreateVm from
an http ImageURL into the image cache (download, hash, probe, overlay) and again from
the cache, a file:// image through the cache, ReplaceVmImage, RestoreVmImage,
volumes, snapshots and user data, watched by L{tests.test_reactor_io.Monitor} on the
real reactor and the real disk thread pool.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from hypervisor.auth import ROOT
from hypervisor.manager.fetch import Fetcher
from hypervisor.manager.imagecache import ImageCache
from hypervisor.model import (
    AccessRequest,
    Address,
    AddVmVolumesRequest,
    ChangeAddressPoolRequest,
    ChangeVmVolumeSizeRequest,
    CreateVmRequest,
    DeleteVmVolumeRequest,
    DiscardVmSnapshotRequest,
    IpRequest,
    ReplaceVmImageRequest,
    ReplaceVmUserDataRequest,
    RestoreVmFromSnapshotRequest,
    SnapshotVmRequest,
    Subnet,
    UpdateSubnetsRequest,
    VmInfo,
)
from hypervisor.upload import UploadStream
from tests import test_reactor_io
from tests.imageserver import ImageServer
from tests.test_image_sources import write_raw

MiB = 1024 * 1024


class ImageReactorIOTests(TestCase):
    """
    The daemon of L{ReactorIOTests} (same set-up) with an image cache.
    """

    timeout = 120
    until = test_reactor_io.ReactorIOTests.until

    def setUp(self) -> None:
        test_reactor_io.ReactorIOTests.setUp(self)  # type: ignore[arg-type]
        served = os.path.join(self.root, "served")
        os.makedirs(served)
        write_raw(os.path.join(served, "disk.raw"), 4 * MiB)
        write_raw(os.path.join(served, "next.raw"), 2 * MiB, seed=3)
        self.server = ImageServer(self, served)
        ctx = self.manager.ctx
        ctx.image_cache = ImageCache(
            os.path.join(self.root, "objectcache"),
            64 * MiB,
            ctx.runner,
            ctx.writer,
            reactor,
            Fetcher(reactor, ctx.runner, timeout=10),
            self.manager._volume_files,
        )

    async def image_paths(self) -> None:
        api = self.api
        await api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[Subnet(Id="net", IpGateway="10.7.0.1", IpMask="255.255.255.0")]
            ),
        )
        await api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(
                AddressesToAdd=[
                    Address(f"10.7.0.{i}", f"52:54:0a:07:00:{i:02x}") for i in range(2, 8)
                ]
            ),
        )

        async def create(url: str) -> str:
            response = await api.CreateVm(
                ROOT,
                CreateVmRequest(
                    VmInfo=VmInfo(MemoryInMiB=64, MilliCPUs=100, SubnetId="net", ImageURL=url),
                    DoNotStart=True,
                ),
            )
            await api.AcknowledgeVm(ROOT, IpRequest(response.IpAddress))
            return str(response.IpAddress)

        url = self.server.url("/images/disk.raw")
        ip = await create(url)
        await create(url)
        await create(f"file://{self.images}/disk.raw")
        await api.AddVmVolumes(ROOT, AddVmVolumesRequest(ip, [MiB]))
        await api.ChangeVmVolumeSize(ROOT, ChangeVmVolumeSizeRequest(ip, 1, 2 * MiB))
        await api.SnapshotVm(ROOT, SnapshotVmRequest(IpAddress=ip, Name="s"))
        await api.RestoreVmFromSnapshot(
            ROOT, RestoreVmFromSnapshotRequest(IpAddress=ip, Name="s", Retain=True)
        )
        await api.DiscardVmSnapshot(ROOT, DiscardVmSnapshotRequest(IpAddress=ip, Name="s"))
        await api.DeleteVmVolume(ROOT, DeleteVmVolumeRequest(IpAddress=ip, VolumeIndex=1))
        await api.ReplaceVmImage(
            ROOT, ReplaceVmImageRequest(IpAddress=ip, ImageURL=self.server.url("/images/next.raw"))
        )
        await api.RestoreVmImage(ROOT, IpRequest(ip))
        data = b"#cloud-config\n"
        stream = UploadStream(len(data))
        reactor.callLater(0, stream.write, data)
        await api.ReplaceVmUserData(
            ROOT, ReplaceVmUserDataRequest(IpAddress=ip, Size=len(data)), stream
        )
        await api.GetVmUserData(ROOT, AccessRequest(IpAddress=ip))
        await api.DestroyVm(ROOT, AccessRequest(IpAddress=ip))

    async def test_image_paths(self) -> None:
        """
        No file-system call from our code on the reactor thread.
        """
        await self.until(lambda: not self.manager.reconciler.reconciling)
        self.monitor.install()
        try:
            await self.image_paths()
            await self.until(self.manager.writer.idle)
        finally:
            self.monitor.uninstall()
        report = "\n\n".join(f"{call}\n{stack}" for call, stack in self.monitor.violations)
        cache: Any = self.manager.ctx.image_cache
        self.assertEqual((cache.misses, cache.hits), (3, 1))
        self.assertEqual(
            len(self.monitor.violations),
            0,
            f"{len(self.monitor.violations)} calls on the reactor thread:\n\n{report}",
        )
