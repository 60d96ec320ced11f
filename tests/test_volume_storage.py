"""
Volume directories against the real libvirtd (C{qemu:///system}, TCG) with the tiny
guest and two real volume directories, one of them a 128 MiB tmpfs that fills up
(the tiny guest's kernel and initrd, 67 MiB, are placed with the root volume):
placement of CreateVm's and AddVmVolumes' volumes (StorageIndices, SpreadVolumes,
free-space checks), GetVmVolumeStorageConfiguration, ChangeVmVolumeStorageIndex (the
moved volume's bytes intact and thick, the VM booting from the new place) and
ListVolumeDirectories; every refusal leaves the VM and the disks as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from hypervisor import errors
from hypervisor.api import Empty, HypervisorApi
from hypervisor.auth import Identity
from hypervisor.manager.manager import Manager
from hypervisor.model import (
    AccessRequest,
    AddVmVolumesRequest,
    ChangeVmVolumeSizeRequest,
    ChangeVmVolumeStorageIndexRequest,
    CreateVmRequest,
    IpRequest,
    StartVmRequest,
    State,
    VmInfo,
    Volume,
)
from hypervisor.store import StateDirectory
from hypervisor.virt.connection import LibvirtService, start_event_loop
from tests import support
from tests.support import until

ALICE = Identity(username="alice")
LOCAL_ALICE = Identity(username="alice", loopback=True)
BOB = Identity(username="bob")
MiB = 1024 * 1024
PREFIX = "10.76.14"


class VolumeStorageRealTests(TestCase):
    """
    The manager in this process on the real libvirtd, volume directories C{big}
    (on the host's disk) and C{small} (a 128 MiB tmpfs).
    """

    timeout = 300

    def setUp(self) -> None:
        support.require_libvirtd()
        self.guest = support.tiny_guest()
        support.ensure_bridge()
        start_event_loop()
        self.root = support.public_tempdir("hv-storage-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.big = os.path.join(self.root, "big")
        self.small = os.path.join(self.root, "small")
        os.makedirs(self.big)
        os.makedirs(self.small)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=128m,mode=755", "hvtest-small", self.small],
            check=True,
        )
        self.addCleanup(subprocess.run, ["umount", "-l", self.small], check=False)
        self.services: list[Any] = []
        self.addCleanup(self.stop_services)

    async def start(self, directories: list[str], **extra: Any) -> None:
        libvirt = LibvirtService(support.QEMU_URI, reactor, max_backoff=1.0)
        self.manager = Manager(
            StateDirectory(os.path.join(self.root, "state")),
            libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=directories,
            images_directory=self.guest,
            stop_timeout=20,
            **extra,
        )
        self.manager.privilegedStartService()
        libvirt.startService()
        self.manager.startService()
        self.services = [self.manager, libvirt]
        self.api = HypervisorApi(self.manager)
        await until(lambda: libvirt.connected, 30, "libvirt")
        from hypervisor.auth import ROOT
        from hypervisor.model import (
            Address,
            ChangeAddressPoolRequest,
            Subnet,
            UpdateSubnetsRequest,
        )

        await self.api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[Subnet(Id="hvtest", IpGateway=f"{PREFIX}.1", IpMask="255.255.255.0")]
            ),
        )
        await self.api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(
                AddressesToAdd=[
                    Address(f"{PREFIX}.{i}", f"52:54:0a:4c:0e:{i:02x}") for i in range(2, 8)
                ]
            ),
        )

    async def stop_services(self) -> None:
        for service in self.services:
            if service.running:
                await service.stopService()
        self.services = []
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        for dom in conn.listAllDomains():
            if dom.name().startswith(f"vm-{PREFIX}.") and dom.isActive():
                dom.destroy()
        conn.close()

    async def create(self, upload: Any = None, **fields: Any) -> str:
        vm_fields = {k: fields.pop(k) for k in ("SpreadVolumes",) if k in fields}
        request = CreateVmRequest(
            VmInfo=VmInfo(
                MemoryInMiB=128,
                MilliCPUs=500,
                SubnetId="hvtest",
                ExtraKernelOptions="quiet hv.dhcp=no hv.mode=stay",
                **vm_fields,
            ),
            MinimumFreeBytes=fields.pop("MinimumFreeBytes", MiB),
            KernelURL=f"file://{self.guest}/vmlinux",
            InitrdURL=f"file://{self.guest}/initrd.cpio",
            DoNotStart=True,
            **fields,
        )
        response = await self.api.CreateVm(ALICE, request, upload=upload)
        await self.api.AcknowledgeVm(ALICE, IpRequest(response.IpAddress))
        return str(response.IpAddress)

    async def indices(self, ip: str) -> list[int]:
        reply = await self.api.GetVmVolumeStorageConfiguration(BOB, IpRequest(ip))
        return list(reply.VolumeStorageIndices)

    def on_disk(self, ip: str) -> Any:
        with open(os.path.join(self.root, "state", "VMs", ip, "info.json")) as f:
            info = json.load(f)
        return info["Volumes"], info["VolumeLocations"]

    def listing(self) -> dict[str, list[str]]:
        out = {}
        for directory in (self.big, self.small):
            for name in sorted(os.listdir(directory)):
                if name != "lost+found":
                    out[f"{directory}/{name}"] = sorted(os.listdir(os.path.join(directory, name)))
        return out

    async def refused(self, error: Any, fn: Any, *args: Any) -> str:
        try:
            await fn(*args)
        except error as e:
            return str(e)
        raise AssertionError(f"{fn.__name__}{args} was not refused with {error.__name__}")

    async def test_move_between_directories(self) -> None:
        """
        Volumes land where StorageIndices put them; a volume moves to the other
        directory and back with its bytes, thick, the old copy and directory gone;
        the VM boots from the new place on the real libvirtd. Moves that cannot be
        done (a full directory, a storage or volume index that does not exist, the
        root with its own kernel, a running VM, a stranger) change nothing.
        """
        await self.start([self.big, self.small])
        ip = await self.create(
            SecondaryVolumes=[Volume(Size=8 * MiB), Volume(Size=130 * MiB)],
            StorageIndices=[0, 1, 0],
        )
        self.assertEqual(await self.indices(ip), [0, 1, 0])
        reply = await self.api.GetVmVolumeStorageConfiguration(BOB, IpRequest(ip))
        small = reply.StorageInfos[1]
        self.assertEqual(small.SizeBytes, 128 * MiB)
        self.assertEqual(small.AvailableBytes, 120 * MiB)
        self.assertEqual(small.UsableBytes, 120 * MiB)
        self.assertEqual(len(reply.StorageInfos), 2)
        self.assertEqual(reply.Error, "")
        moving = os.path.join(self.small, ip, "secondary-volume.0")
        with open(moving, "r+b") as f:
            for i in range(8):
                f.seek(i * MiB + 17)
                f.write(f"block {i}".encode())
        with open(moving, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()

        before = (self.on_disk(ip), self.listing())
        cases = [
            (errors.InsufficientCapacity, ALICE, 1, 2, "does not have 130 MiB free"),
            (errors.InvalidRequest, ALICE, 2, 1, "invalid storage index 2"),
            (errors.InvalidRequest, ALICE, 0, 3, "invalid volume index 3"),
            (errors.WrongState, ALICE, 1, 0, "root volume with separate initrd"),
            (errors.AccessDenied, BOB, 0, 1, ""),
        ]
        for error, who, storage, volume, text in cases:
            message = await self.refused(
                error,
                self.api.ChangeVmVolumeStorageIndex,
                who,
                ChangeVmVolumeStorageIndexRequest(ip, StorageIndex=storage, VolumeIndex=volume),
            )
            self.assertIn(text, message)
            self.assertEqual((self.on_disk(ip), self.listing()), before, message)

        await self.api.ChangeVmVolumeStorageIndex(
            ALICE, ChangeVmVolumeStorageIndexRequest(ip, StorageIndex=0, VolumeIndex=1)
        )
        moved = os.path.join(self.big, ip, "secondary-volume.0")
        self.assertFalse(os.path.exists(os.path.join(self.small, ip)))
        with open(moved, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest)
        self.assertGreaterEqual(os.stat(moved).st_blocks * 512, 8 * MiB)
        _, locations = self.on_disk(ip)
        self.assertEqual(locations[1]["Filename"], moved)
        self.assertEqual(locations[1]["DirectoryToCleanup"], os.path.join(self.big, ip))
        self.assertEqual(await self.indices(ip), [0, 0, 0])
        reply = await self.api.GetVmVolumeStorageConfiguration(BOB, IpRequest(ip))
        self.assertEqual(reply.StorageInfos[1].UsableBytes, 128 * MiB)
        # The same index again: nothing to do.
        await self.api.ChangeVmVolumeStorageIndex(
            ALICE, ChangeVmVolumeStorageIndexRequest(ip, StorageIndex=0, VolumeIndex=1)
        )
        self.assertEqual(await self.indices(ip), [0, 0, 0])
        await self.api.ChangeVmVolumeStorageIndex(
            ALICE, ChangeVmVolumeStorageIndexRequest(ip, StorageIndex=1, VolumeIndex=1)
        )
        self.assertEqual(await self.indices(ip), [0, 1, 0])
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.big, ip))),
            ["initrd", "kernel", "root", "secondary-volume.1"],
        )
        with open(moving, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest)

        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        self.assertEqual(self.manager.vms[ip].info.State, State.RUNNING)
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        try:
            xml = conn.lookupByName(f"vm-{ip}").XMLDesc()
        finally:
            conn.close()
        self.assertIn(moving, xml)
        before = (self.on_disk(ip), self.listing())
        message = await self.refused(
            errors.WrongState,
            self.api.ChangeVmVolumeStorageIndex,
            ALICE,
            ChangeVmVolumeStorageIndexRequest(ip, StorageIndex=0, VolumeIndex=1),
        )
        self.assertIn("stop it first", message)
        self.assertEqual((self.on_disk(ip), self.listing()), before)
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(self.listing(), {})
        self.assertEqual(self.manager.check_invariants(), [])

    async def test_placement_spread_and_full_directory(self) -> None:
        """
        Without SpreadVolumes each volume goes to the first directory with room (the
        small one until a volume does not fit there, then the big one for the rest);
        with it the volumes take the directories in turn, AddVmVolumes too; a root
        pinned to the full directory and a storage index that does not exist are
        refused with nothing left behind; a VM with volumes in both directories runs
        on the real libvirtd.
        """
        await self.start([self.small, self.big])
        first = await self.create(SecondaryVolumes=[Volume(Size=100 * MiB), Volume(Size=8 * MiB)])
        self.assertEqual(await self.indices(first), [0, 1, 1])
        # 60 MiB are left in small: this root (with its kernel) goes to big.
        spread = await self.create(
            SecondaryVolumes=[Volume(Size=8 * MiB), Volume(Size=8 * MiB)], SpreadVolumes=True
        )
        self.assertEqual(await self.indices(spread), [1, 0, 1])
        await self.api.AddVmVolumes(ALICE, AddVmVolumesRequest(spread, [4 * MiB, 4 * MiB]))
        self.assertEqual(await self.indices(spread), [1, 0, 1, 0, 1])
        self.assertEqual(
            sorted(os.listdir(os.path.join(self.small, spread))),
            ["secondary-volume.0", "secondary-volume.2"],
        )

        free = [a.IpAddress for a in self.manager.pool.free]
        before = self.listing()
        cases: list[tuple[Any, dict[str, Any], str]] = [
            (
                errors.InsufficientCapacity,
                {"StorageIndices": [0], "MinimumFreeBytes": 100 * MiB},
                "storage[0]",
            ),
            (errors.InvalidRequest, {"StorageIndices": [5]}, "storage index 5 does not exist"),
        ]
        for error, fields, text in cases:
            message = await self.refused(error, lambda: self.create(**fields))
            self.assertIn(text, message)
            self.assertEqual(self.listing(), before)
            self.assertEqual([a.IpAddress for a in self.manager.pool.free], free)
        message = await self.refused(
            errors.InsufficientCapacity,
            self.api.AddVmVolumes,
            ALICE,
            AddVmVolumesRequest(first, [1 << 40]),
        )
        self.assertIn("not enough free space", message)
        self.assertEqual(self.listing(), before)

        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=spread))
        self.assertEqual(self.manager.vms[spread].info.State, State.RUNNING)
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=spread))
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=first))
        self.assertEqual(self.listing(), {})

    async def test_list_volume_directories(self) -> None:
        """
        ListVolumeDirectories answers a loopback caller with the directories in
        storage-index order and refuses anyone else ("local connection required").
        """
        await self.start([self.big, self.small])
        reply = self.api.ListVolumeDirectories(LOCAL_ALICE, Empty())
        self.assertEqual(reply.Directories, [self.big, self.small])
        e = self.assertRaises(errors.AccessDenied, self.api.ListVolumeDirectories, ALICE, Empty())
        self.assertEqual(str(e), "local connection required")

    async def test_growing_a_volume_grows_its_file_system(self) -> None:
        """
        ChangeVmVolumeSize grows the ext4 file system on a whole volume, and extends
        the single partition of a partitioned volume and grows the file system in it
        (checked by e2fsck, the partition table and the superblock); a volume of zeros
        just grows; the VM then runs with them on the real libvirtd.
        """
        await self.start([self.big])
        ip = await self.create(
            SecondaryVolumes=[Volume(Size=16 * MiB), Volume(Size=16 * MiB), Volume(Size=8 * MiB)]
        )
        whole = os.path.join(self.big, ip, "secondary-volume.0")
        parted = os.path.join(self.big, ip, "secondary-volume.1")
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "whole", whole], check=True)
        subprocess.run(
            ["sfdisk", "-q", parted], input="label: dos\n2048,,83\n", text=True, check=True
        )
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-E", f"offset={MiB}", parted, str(15 * MiB // 1024)],
            check=True,
        )
        for index in (1, 2, 3):
            await self.api.ChangeVmVolumeSize(
                ALICE, ChangeVmVolumeSizeRequest(ip, VolumeIndex=index, VolumeSize=48 * MiB)
            )
        self.assertEqual(ext_size(whole, 0), 48 * MiB)
        subprocess.run(["e2fsck", "-f", "-n", whole], check=True, capture_output=True)
        table = json.loads(
            subprocess.run(["sfdisk", "-J", parted], capture_output=True, text=True).stdout
        )
        [partition] = table["partitiontable"]["partitions"]
        self.assertEqual((partition["start"], partition["size"]), (2048, (48 * MiB - MiB) // 512))
        self.assertEqual(ext_size(parted, MiB), 47 * MiB)
        self.assertEqual(
            os.path.getsize(os.path.join(self.big, ip, "secondary-volume.2")), 48 * MiB
        )
        self.assertEqual([v.Size for v in self.manager.vms[ip].info.Volumes[1:]], [48 * MiB] * 3)
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        self.assertEqual(self.manager.vms[ip].info.State, State.RUNNING)
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))

    async def test_uploaded_root_through_the_image_cache(self) -> None:
        """
        The same root image uploaded twice with CreateVm: one image in the cache, two
        qcow2 overlays on it, and the VM boots on the real libvirtd from its overlay.
        """
        from hypervisor.manager import images
        from hypervisor.upload import UploadStream

        cache = os.path.join(self.root, "objectcache")
        await self.start([self.big], image_cache_directory=cache)
        data = b"\0" * 510 + b"\x55\xaa" + b"\0" * (4 * MiB - 512)
        ips = []
        for _ in range(2):
            stream = UploadStream(len(data))
            reactor.callLater(0, stream.write, data)
            ips.append(await self.create(upload=stream, ImageDataSize=len(data)))
        [cached] = os.listdir(os.path.join(cache, "images"))
        for ip in ips:
            root = os.path.join(self.big, ip, "root")
            self.assertEqual(images.qcow2_backing_file(root), os.path.join(cache, "images", cached))
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ips[1]))
        self.assertEqual(self.manager.vms[ips[1]].info.State, State.RUNNING)
        for ip in ips:
            await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(self.listing(), {})


def ext_size(path: str, offset: int) -> int:
    """
    The size of the ext file system at C{offset} in C{path}, from its superblock.
    """
    import struct

    with open(path, "rb") as f:
        f.seek(offset + 1024)
        block = f.read(1024)
    blocks, log = struct.unpack_from("<I", block, 4)[0], struct.unpack_from("<I", block, 24)[0]
    return int(blocks * (1024 << log))
