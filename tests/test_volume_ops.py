"""
Volume operations, snapshots and root image history through the service layer
(L{hypervisor.manager.volumeops}), on the manager with C{test:///default}, real files
and real C{qemu-img}; bad requests change nothing.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from typing import Any

from twisted.internet import reactor

from hypervisor import errors
from hypervisor.api import raw_of
from hypervisor.manager import images
from hypervisor.model import (
    AccessRequest,
    AddVmVolumesRequest,
    ChangeVmVolumeInterfacesRequest,
    ChangeVmVolumeSizeRequest,
    DeleteVmVolumeRequest,
    DiscardVmSnapshotRequest,
    IpRequest,
    ReorderVmVolumesRequest,
    ReplaceVmImageRequest,
    ReplaceVmUserDataRequest,
    RestoreVmFromSnapshotRequest,
    SnapshotVmRequest,
    StartVmRequest,
    State,
    Volume,
    VolumeFormat,
    VolumeInterface,
    VolumeType,
)
from hypervisor.upload import UploadStream
from tests.imageserver import ImageServer
from tests.test_image_sources import write_raw
from tests.test_manager_vms import ALICE, BOB, Daemon, ManagerTestCase

MiB = 1024 * 1024


class VolumeOpsTests(ManagerTestCase):
    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.cache = os.path.join(self.root, "objectcache")
        self.daemon = Daemon(
            self, self.root, self.host, image_cache_directory=self.cache, image_timeout=5
        )
        self.api = self.daemon.api
        self.manager = self.daemon.manager

    def info(self, ip: str) -> Any:
        return self.api.GetVmInfo(ALICE, IpRequest(ip)).VmInfo

    def files(self, ip: str) -> list[str]:
        directory = os.path.join(self.root, "volumes", ip)
        return sorted(os.listdir(directory))

    def on_disk(self, ip: str) -> Any:
        info = self.info_file(ip)
        return info["Volumes"], [loc["Filename"] for loc in info["VolumeLocations"]]

    async def stopped_vm(self) -> str:
        await self.prepare()
        return await self.create(DoNotStart=True, MinimumFreeBytes=MiB)

    async def test_add_resize_delete(self) -> None:
        """
        Volumes are added thick with the reference's names, grown (allocated), shrunk
        only over zeros, and deleted; a running VM, strangers and bad indices are
        refused without change.
        """
        ip = await self.stopped_vm()
        await self.api.AddVmVolumes(ALICE, AddVmVolumesRequest(ip, [2 * MiB, MiB]))
        self.assertEqual([v.Size for v in self.info(ip).Volumes], [MiB, 2 * MiB, MiB])
        self.assertEqual(self.files(ip), ["root", "secondary-volume.0", "secondary-volume.1"])
        volumes, paths = self.on_disk(ip)
        self.assertEqual([v["Size"] for v in volumes], [MiB, 2 * MiB, MiB])
        self.assertGreaterEqual(os.stat(paths[1]).st_blocks * 512, 2 * MiB)
        with open(paths[1], "r+b") as f:
            f.seek(MiB + 10)
            f.write(b"data")
        await self.api.ChangeVmVolumeSize(ALICE, ChangeVmVolumeSizeRequest(ip, 1, 4 * MiB))
        self.assertEqual(os.path.getsize(paths[1]), 4 * MiB)
        self.assertGreaterEqual(os.stat(paths[1]).st_blocks * 512, 4 * MiB)
        before = self.on_disk(ip)
        e = await self.raises(
            errors.InvalidRequest,
            self.api.ChangeVmVolumeSize,
            ALICE,
            ChangeVmVolumeSizeRequest(ip, 1, MiB),
        )
        self.assertIn(f"holds data at byte {MiB + 10}", str(e))
        self.assertEqual(os.path.getsize(paths[1]), 4 * MiB)
        await self.api.ChangeVmVolumeSize(ALICE, ChangeVmVolumeSizeRequest(ip, 1, 2 * MiB))
        self.assertEqual(os.path.getsize(paths[1]), 2 * MiB)
        before = self.on_disk(ip)
        for identity, request, error in [
            (BOB, AddVmVolumesRequest(ip, [MiB]), errors.AccessDenied),
            (ALICE, AddVmVolumesRequest(ip, [0]), errors.InvalidRequest),
            (ALICE, AddVmVolumesRequest(ip, [1 << 50]), errors.InsufficientCapacity),
        ]:
            await self.raises(error, self.api.AddVmVolumes, identity, request)
            self.assertEqual(self.on_disk(ip), before)
        for request in (DeleteVmVolumeRequest(IpAddress=ip, VolumeIndex=0),):
            await self.raises(errors.InvalidRequest, self.api.DeleteVmVolume, ALICE, request)
        await self.api.DeleteVmVolume(ALICE, DeleteVmVolumeRequest(IpAddress=ip, VolumeIndex=1))
        self.assertEqual(self.files(ip), ["root", "secondary-volume.1"])
        self.assertEqual([v.Size for v in self.info(ip).Volumes], [MiB, MiB])
        await self.api.AddVmVolumes(ALICE, AddVmVolumesRequest(ip, [MiB]))
        self.assertEqual(self.files(ip), ["root", "secondary-volume.0", "secondary-volume.1"])
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        self.assertEqual(self.info(ip).State, State.RUNNING)
        before = self.on_disk(ip)
        await self.raises(
            errors.WrongState, self.api.AddVmVolumes, ALICE, AddVmVolumesRequest(ip, [MiB])
        )
        self.assertEqual(self.on_disk(ip), before)
        self.assertEqual(self.manager.check_invariants(), [])

    async def test_snapshots(self) -> None:
        """
        A snapshot copies every volume to .snapshot:<name>; restoring with Retain
        keeps it, without renames it; discarding removes the files. A running VM
        needs ForceIfNotStopped.
        """
        ip = await self.stopped_vm()
        await self.api.AddVmVolumes(ALICE, AddVmVolumesRequest(ip, [MiB]))
        _, paths = self.on_disk(ip)
        with open(paths[0], "r+b") as f:
            f.write(b"first")
        await self.api.SnapshotVm(ALICE, SnapshotVmRequest(IpAddress=ip, Name="a"))
        self.assertIn("root.snapshot:a", self.files(ip))
        self.assertIn("secondary-volume.0.snapshot:a", self.files(ip))
        self.assertEqual(self.info(ip).Volumes[0].Snapshots, {"a": MiB})
        await self.api.SnapshotVm(ALICE, SnapshotVmRequest(IpAddress=ip, RootOnly=True))
        self.assertIn("root.snapshot", self.files(ip))
        self.assertNotIn("secondary-volume.0.snapshot", self.files(ip))
        with open(paths[0], "r+b") as f:
            f.write(b"later")
        await self.api.RestoreVmFromSnapshot(
            ALICE, RestoreVmFromSnapshotRequest(IpAddress=ip, Name="a", Retain=True)
        )
        with open(paths[0], "rb") as f:
            self.assertEqual(f.read(5), b"first")
        self.assertIn("root.snapshot:a", self.files(ip))
        with open(paths[0], "r+b") as f:
            f.write(b"again")
        await self.api.RestoreVmFromSnapshot(
            ALICE, RestoreVmFromSnapshotRequest(IpAddress=ip, Name="a")
        )
        with open(paths[0], "rb") as f:
            self.assertEqual(f.read(5), b"first")
        self.assertNotIn("root.snapshot:a", self.files(ip))
        self.assertEqual(self.info(ip).Volumes[0].Snapshots, {"": MiB})
        for request, error in [
            (SnapshotVmRequest(IpAddress=ip, Name="../x"), errors.InvalidRequest),
            (SnapshotVmRequest(IpAddress=ip, Name="a/b"), errors.InvalidRequest),
        ]:
            await self.raises(error, self.api.SnapshotVm, ALICE, request)
        await self.raises(
            errors.NotFound,
            self.api.DiscardVmSnapshot,
            ALICE,
            DiscardVmSnapshotRequest(IpAddress=ip, Name="nope"),
        )
        await self.raises(
            errors.AccessDenied,
            self.api.DiscardVmSnapshot,
            BOB,
            DiscardVmSnapshotRequest(IpAddress=ip, Name=""),
        )
        await self.api.DiscardVmSnapshot(ALICE, DiscardVmSnapshotRequest(IpAddress=ip, Name=""))
        self.assertEqual(self.files(ip), ["root", "secondary-volume.0"])
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        await self.raises(
            errors.WrongState,
            self.api.SnapshotVm,
            ALICE,
            SnapshotVmRequest(IpAddress=ip, Name="b"),
        )
        await self.api.SnapshotVm(
            ALICE, SnapshotVmRequest(IpAddress=ip, Name="b", ForceIfNotStopped=True)
        )
        self.assertIn("root.snapshot:b", self.files(ip))

    async def test_replace_restore_discard_image(self) -> None:
        """
        ReplaceVmImage from an http ImageURL (a qcow2 overlay on the cached image)
        keeps root.old; a running VM is stopped and started again; RestoreVmImage
        puts the old root back; a format change needs SkipBackup; uploaded bytes
        work too; DiscardVmOldImage removes root.old.
        """
        ip = await self.stopped_vm()
        served = os.path.join(self.root, "served")
        os.makedirs(served)
        image = write_raw(os.path.join(served, "new.raw"), 2 * MiB)
        server = ImageServer(self, served)
        _, paths = self.on_disk(ip)
        with open(paths[0], "r+b") as f:
            f.write(b"old root")
        url = server.url("/images/new.raw")
        e = await self.raises(
            errors.InvalidRequest,
            self.api.ReplaceVmImage,
            ALICE,
            ReplaceVmImageRequest(IpAddress=ip, ImageURL=url),
        )
        self.assertIn("SkipBackup", str(e))
        self.assertEqual(self.files(ip), ["root"])
        # What the reference does for its file-system images is refused, not ignored.
        before = self.on_disk(ip)
        for fields, words in [
            ({"SkipBootloader": True}, "SkipBootloader"),
            ({"PreDelete": True}, "PreDelete"),
            ({"OverlayFiles": {"/etc/motd": b"hi"}}, "OverlayFiles"),
        ]:
            e = await self.raises(
                errors.InvalidRequest,
                self.api.ReplaceVmImage,
                ALICE,
                ReplaceVmImageRequest(IpAddress=ip, ImageURL=url, SkipBackup=True, **fields),
            )
            self.assertIn(words, str(e))
            self.assertIn("not supported", str(e))
            self.assertEqual(self.on_disk(ip), before)
            self.assertEqual(self.files(ip), ["root"])
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        messages: list[str] = []
        response = await self.api.ReplaceVmImage(
            ALICE,
            ReplaceVmImageRequest(IpAddress=ip, ImageURL=url, SkipBackup=True),
            lambda r: messages.append(r.ProgressMessage),
        )
        self.assertTrue(response.Final)
        self.assertIn("getting image", messages)
        self.assertIn(f"stopping VM {ip}", messages)
        self.assertIn(f"starting VM {ip}", messages)
        info = self.info(ip)
        self.assertEqual(info.State, State.RUNNING)
        self.assertEqual(info.Volumes[0].Format, VolumeFormat.QCOW2)
        self.assertEqual(info.Volumes[0].VirtualSize, 2 * MiB)
        self.assertEqual(self.files(ip), ["root"])
        await self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        # Now a raw upload: into the image cache by digest, the root an overlay on it
        # (with a backup of the old root), then again without the image cache (a raw
        # root: a format change, so SkipBackup), then a qcow2 -> qcow2 replacement with
        # a backup, restored.
        data = b"\x55" * MiB
        stream = UploadStream(len(data))
        reactor.callLater(0, stream.write, data)
        await self.api.ReplaceVmImage(
            ALICE, ReplaceVmImageRequest(IpAddress=ip, ImageDataSize=len(data)), upload=stream
        )
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(self.info(ip).Volumes[0].Format, VolumeFormat.QCOW2)
        self.assertEqual(
            images.qcow2_backing_file(paths[0]), os.path.join(self.cache, "images", digest)
        )
        self.assertEqual(self.files(ip), ["root", "root.old"])
        await self.api.DiscardVmOldImage(ALICE, IpRequest(ip))
        cache = self.manager.ctx.image_cache
        self.manager.ctx.image_cache = None
        try:
            stream = UploadStream(len(data))
            reactor.callLater(0, stream.write, data)
            await self.api.ReplaceVmImage(
                ALICE,
                ReplaceVmImageRequest(IpAddress=ip, ImageDataSize=len(data), SkipBackup=True),
                upload=stream,
            )
        finally:
            self.manager.ctx.image_cache = cache
        self.assertEqual(self.info(ip).Volumes[0].Format, VolumeFormat.RAW)
        with open(paths[0], "rb") as f:
            self.assertEqual(f.read(MiB), data)
        other = write_raw(os.path.join(served, "other.raw"), MiB, seed=9)
        await self.api.ReplaceVmImage(
            ALICE,
            ReplaceVmImageRequest(
                IpAddress=ip, ImageURL=server.url("/images/other.raw"), SkipBackup=True
            ),
        )
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(served, "q.qcow2"), "8M"],
            check=True,
        )
        await self.api.ReplaceVmImage(
            ALICE, ReplaceVmImageRequest(IpAddress=ip, ImageURL=server.url("/images/q.qcow2"))
        )
        self.assertEqual(self.files(ip), ["root", "root.old"])
        self.assertEqual(self.info(ip).Volumes[0].VirtualSize, 8 * MiB)
        await self.api.RestoreVmImage(ALICE, IpRequest(ip))
        self.assertEqual(self.files(ip), ["root"])
        self.assertEqual(self.info(ip).Volumes[0].VirtualSize, MiB)
        self.assertEqual(self.info_file(ip)["Volumes"][0]["VirtualSize"], MiB)
        await self.raises(errors.NotFound, self.api.RestoreVmImage, ALICE, IpRequest(ip))
        # Bad images change nothing.
        before = (self.files(ip), self.on_disk(ip))
        for bad in (server.url("/html"), server.url("/truncated"), server.url("/loop")):
            await self.raises(
                errors.InvalidRequest,
                self.api.ReplaceVmImage,
                ALICE,
                ReplaceVmImageRequest(IpAddress=ip, ImageURL=bad, SkipBackup=True),
            )
            self.assertEqual((self.files(ip), self.on_disk(ip)), before)
        await self.api.ReplaceVmImage(
            ALICE, ReplaceVmImageRequest(IpAddress=ip, ImageURL=server.url("/images/q.qcow2"))
        )
        await self.api.DiscardVmOldImage(ALICE, IpRequest(ip))
        self.assertEqual(self.files(ip), ["root"])
        del image, other

    async def test_user_data(self) -> None:
        """
        ReplaceVmUserData streams the bytes to user-data.raw (the previous one kept
        as .old); GetVmUserData returns them; RestoreVmUserData and
        DiscardVmOldUserData work on .old; strangers are refused; a short upload
        changes nothing.
        """
        ip = await self.stopped_vm()
        directory = os.path.join(self.root, "state", "VMs", ip)

        async def replace(data: bytes, identity: Any = ALICE, length: Any = None) -> Any:
            stream = UploadStream(len(data) if length is None else length)
            reactor.callLater(0, stream.write, data)
            if length is not None:
                reactor.callLater(0.01, stream.finish)
            return await self.api.ReplaceVmUserData(
                identity, ReplaceVmUserDataRequest(IpAddress=ip, Size=stream.length), stream
            )

        await replace(b"#cloud-config\nfirst\n")
        await replace(b"#cloud-config\nsecond\n")
        got = await self.api.GetVmUserData(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(raw_of(got), b"#cloud-config\nsecond\n")
        self.assertEqual(got.Length, len(raw_of(got) or b""))
        with open(os.path.join(directory, "user-data.raw.old"), "rb") as f:
            self.assertEqual(f.read(), b"#cloud-config\nfirst\n")
        self.assertEqual(os.stat(os.path.join(directory, "user-data.raw")).st_mode & 0o777, 0o600)
        await self.raises(errors.AccessDenied, replace, b"evil", BOB)
        await self.raises(
            errors.AccessDenied, self.api.GetVmUserData, BOB, AccessRequest(IpAddress=ip)
        )
        e = await self.raises(errors.InvalidRequest, replace, b"short", ALICE, 100)
        self.assertIn("ended", str(e))
        got = await self.api.GetVmUserData(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(raw_of(got), b"#cloud-config\nsecond\n")
        self.assertNotIn("user-data.raw.new", os.listdir(directory))
        await self.api.RestoreVmUserData(ALICE, IpRequest(ip))
        got = await self.api.GetVmUserData(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(raw_of(got), b"#cloud-config\nfirst\n")
        await self.raises(errors.NotFound, self.api.RestoreVmUserData, ALICE, IpRequest(ip))
        await replace(b"third")
        await self.api.DiscardVmOldUserData(ALICE, IpRequest(ip))
        self.assertNotIn("user-data.raw.old", os.listdir(directory))
        self.assertEqual(
            self.manager.table.user_data_path(ip), os.path.join(directory, "user-data.raw")
        )

    async def test_reorder(self) -> None:
        """
        ReorderVmVolumes permutes volumes and renames their files to match; a
        non-permutation, a running VM and snapshots are refused without change.
        """
        ip = await self.stopped_vm()
        await self.api.AddVmVolumes(ALICE, AddVmVolumesRequest(ip, [2 * MiB, 3 * MiB]))
        _, paths = self.on_disk(ip)
        for path, tag in zip(paths, (b"root", b"two", b"three")):
            with open(path, "r+b") as f:
                f.write(tag)
        before = (self.files(ip), self.on_disk(ip))
        for indices in ([1, 1], [0, 1], [0, 1, 2, 3], [5]):
            await self.raises(
                errors.InvalidRequest,
                self.api.ReorderVmVolumes,
                ALICE,
                ReorderVmVolumesRequest(IpAddress=ip, VolumeIndices=indices),
            )
            self.assertEqual((self.files(ip), self.on_disk(ip)), before)
        await self.raises(
            errors.AccessDenied,
            self.api.ReorderVmVolumes,
            BOB,
            ReorderVmVolumesRequest(IpAddress=ip, VolumeIndices=[2, 1]),
        )
        await self.api.ReorderVmVolumes(
            ALICE, ReorderVmVolumesRequest(IpAddress=ip, VolumeIndices=[2, 1])
        )
        volumes, paths = self.on_disk(ip)
        self.assertEqual([v["Size"] for v in volumes], [MiB, 3 * MiB, 2 * MiB])
        self.assertEqual(self.files(ip), ["root", "secondary-volume.0", "secondary-volume.1"])
        for path, tag in zip(paths, (b"root", b"three", b"two")):
            with open(path, "rb") as f:
                self.assertEqual(f.read(len(tag)), tag)
        await self.api.ReorderVmVolumes(
            ALICE, ReorderVmVolumesRequest(IpAddress=ip, VolumeIndices=[1, 0, 2])
        )
        volumes, paths = self.on_disk(ip)
        self.assertEqual([v["Size"] for v in volumes], [3 * MiB, MiB, 2 * MiB])
        with open(paths[0], "rb") as f:
            self.assertEqual(f.read(5), b"three")
        await self.api.SnapshotVm(ALICE, SnapshotVmRequest(IpAddress=ip, Name="s"))
        await self.raises(
            errors.WrongState,
            self.api.ReorderVmVolumes,
            ALICE,
            ReorderVmVolumesRequest(IpAddress=ip, VolumeIndices=[2, 1]),
        )

    async def test_change_interfaces(self) -> None:
        """
        ChangeVmVolumeInterfaces sets each volume's interface (virtio or ide), used
        at the next start; a wrong count, an unsupported interface, a running VM and
        a stranger are refused without change.
        """
        ip = await self.stopped_vm()
        await self.api.AddVmVolumes(ALICE, AddVmVolumesRequest(ip, [MiB]))
        ide, virtio = VolumeInterface.IDE, VolumeInterface.VIRTIO
        await self.api.ChangeVmVolumeInterfaces(
            ALICE, ChangeVmVolumeInterfacesRequest(IpAddress=ip, Interfaces=[ide, virtio])
        )
        self.assertEqual([v.Interface for v in self.info(ip).Volumes], [ide, virtio])
        self.assertEqual(self.info_file(ip)["Volumes"][0]["Interface"], "ide")
        before = self.on_disk(ip)
        for interfaces, error in (
            ([ide], errors.InvalidRequest),
            ([VolumeInterface.NVME, ide], errors.InvalidRequest),
        ):
            await self.raises(
                error,
                self.api.ChangeVmVolumeInterfaces,
                ALICE,
                ChangeVmVolumeInterfacesRequest(IpAddress=ip, Interfaces=interfaces),
            )
        await self.raises(
            errors.AccessDenied,
            self.api.ChangeVmVolumeInterfaces,
            BOB,
            ChangeVmVolumeInterfacesRequest(IpAddress=ip, Interfaces=[virtio, virtio]),
        )
        self.assertEqual(self.on_disk(ip), before)
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        await self.raises(
            errors.WrongState,
            self.api.ChangeVmVolumeInterfaces,
            ALICE,
            ChangeVmVolumeInterfacesRequest(IpAddress=ip, Interfaces=[virtio, virtio]),
        )


class MemoryVolumeTests(ManagerTestCase):
    """
    Memory volumes: files on a tmpfs the manager mounts when needed.
    """

    def setUp(self) -> None:
        super().setUp()
        self.memory = os.path.join(self.root, "memory-volumes")
        self.daemon = Daemon(self, self.root, self.host, memory_volume_directory=self.memory)
        self.api = self.daemon.api
        self.manager = self.daemon.manager
        self.addCleanup(self.unmount)

    def unmount(self) -> None:
        if os.path.isdir(self.memory) and images.is_tmpfs(self.memory):
            subprocess.run(["umount", self.memory], check=True)

    async def test_memory_volume(self) -> None:
        await self.prepare()
        memory = Volume(Size=2 * MiB, Type=VolumeType.MEMORY)
        disk = Volume(Size=MiB)
        e = await self.raises(
            errors.InsufficientCapacity,
            self.create,
            SecondaryVolumes=[Volume(Size=9000 * MiB, Type=VolumeType.MEMORY)],
        )
        self.assertIn("memory volumes", str(e))
        ip = await self.create(SecondaryVolumes=[memory, disk], DoNotStart=True)
        self.assertTrue(images.is_tmpfs(self.memory))
        info = self.info_file(ip)
        paths = [loc["Filename"] for loc in info["VolumeLocations"]]
        self.assertEqual(paths[1], os.path.join(self.memory, ip, "secondary-volume.0"))
        self.assertEqual(os.path.dirname(paths[2]), os.path.join(self.root, "volumes", ip))
        self.assertEqual(info["Volumes"][1]["Type"], "memory")
        self.assertEqual(os.path.getsize(paths[1]), 2 * MiB)
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertFalse(os.path.exists(os.path.join(self.memory, ip)))
