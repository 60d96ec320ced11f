"""
Volume directories and placement (L{hypervisor.manager.placement}), the host figures
that feed it (L{hypervisor.manager.hoststats.HostStats} with per-directory
C{statvfs} figures injected) and the start-up recovery of interrupted moves
(L{hypervisor.manager.storage.recover_moves}) on real files. The same behaviour
against the real libvirtd and real file systems (one of them a small tmpfs that
fills up) is in L{tests.test_volume_storage}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Optional

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.errors import InsufficientCapacity, InvalidRequest
from hypervisor.manager import placement
from hypervisor.manager.hoststats import HostStats
from hypervisor.manager.storage import MOVING, recover_moves
from hypervisor.manager.vm import Vm
from hypervisor.model import LocalVmInfo, StorageInfo, Volume, VolumeLocation
from hypervisor.testing import SynchronousRunner

MiB = 1 << 20
GiB = 1 << 30


class DetectTests(SynchronousTestCase):
    """
    L{placement.detect_volume_directories} on a fake C{/proc/mounts} and
    C{/sys/class/block}.
    """

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.sys = os.path.join(self.root, "sys")
        os.makedirs(self.sys)

    def block(self, name: str, parent: str = "", slaves: tuple[str, ...] = ()) -> None:
        """
        A /sys/class/block entry: a symlink into devices/, with C{partition} when it
        is a partition of C{parent}, and C{slaves/} for a device-mapper device.
        """
        device = os.path.join(self.root, "devices", parent or "virtual", name)
        os.makedirs(device)
        if parent:
            open(os.path.join(device, "partition"), "w").close()
        if slaves:
            os.makedirs(os.path.join(device, "slaves"))
            for slave in slaves:
                open(os.path.join(device, "slaves", slave), "w").close()
        os.symlink(os.path.relpath(device, self.sys), os.path.join(self.sys, name))

    def detect(self, mounts: str, sizes: dict[str, int]) -> list[str]:
        path = os.path.join(self.root, "mounts")
        with open(path, "w") as f:
            f.write(mounts)
        return placement.detect_volume_directories(
            path,
            self.sys,
            size_of=lambda mountpoint: sizes[mountpoint],
            realpath=lambda device: {"/dev/mapper/vg-lv": "/dev/dm-0"}.get(device, device),
        )

    def test_one_per_disk_largest_partition_sorted(self) -> None:
        """
        Whole disks count; of one disk's partitions only the largest; a device-mapper
        device counts as the partition under it; /boot, /dev/root, pseudo file
        systems, unknown devices and second mounts of a device are skipped.
        """
        self.block("vda1", parent="vda")
        self.block("vda2", parent="vda")
        self.block("vdb")
        self.block("vdc1", parent="vdc")
        self.block("dm-0", slaves=("vdc1",))
        self.block("sdz1", parent="sdz")
        mounts = "\n".join(
            [
                "/dev/vda1 / ext4 rw 0 0",
                "proc /proc proc rw 0 0",
                "tmpfs /tmp tmpfs rw 0 0",
                "/dev/vda2 /data ext4 rw 0 0",
                "/dev/vdb /big xfs rw 0 0",
                "/dev/mapper/vg-lv /lvm ext4 rw 0 0",
                "/dev/vda1 /again ext4 rw 0 0",
                "/dev/sdz1 /boot ext4 rw 0 0",
                "/dev/root /rootfs ext4 rw 0 0",
                "/dev/loop7 /snap squashfs ro 0 0",
            ]
        )
        sizes = {"/": 10 * GiB, "/data": 90 * GiB, "/lvm": 5 * GiB}
        self.assertEqual(
            self.detect(mounts, sizes),
            ["/big/hyper-volumes", "/data/hyper-volumes", "/lvm/hyper-volumes"],
        )
        sizes["/"] = 100 * GiB
        self.assertEqual(
            self.detect(mounts, sizes),
            ["/big/hyper-volumes", "/hyper-volumes", "/lvm/hyper-volumes"],
        )

    def test_nothing_qualifies(self) -> None:
        """
        Without a block-device file system the fallback directory is used.
        """
        self.assertEqual(self.detect("tmpfs / tmpfs rw 0 0\n", {}), [placement.FALLBACK])


class PlaceTests(SynchronousTestCase):
    """
    L{placement.place}: the Go daemon's C{getVolumeDirectories}.
    """

    dirs = ["/a", "/b", "/c"]

    def test_first_fit_from_the_first_directory(self) -> None:
        """
        Every volume goes to the first directory with room, starting from the first
        for every request; a volume that does not fit moves on to the next.
        """
        self.assertEqual(placement.place(self.dirs, [10, 10, 10], [4, 4]), [0, 0])
        self.assertEqual(placement.place(self.dirs, [10, 10, 10], [4, 4, 4]), [0, 0, 1])
        self.assertEqual(placement.place(self.dirs, [3, 10, 10], [4, 2]), [1, 1])
        self.assertEqual(placement.place(self.dirs, [10, 10, 10], [10]), [0])

    def test_spread(self) -> None:
        """
        With SpreadVolumes the position moves on after each volume (wrapping).
        """
        self.assertEqual(
            placement.place(self.dirs, [10, 10, 10], [1, 1, 1, 1], spread=True), [0, 1, 2, 0]
        )
        self.assertEqual(placement.place(self.dirs, [10, 0, 10], [1, 1, 1], spread=True), [0, 2, 0])

    def test_storage_indices_pin(self) -> None:
        """
        StorageIndices pin volume i (None: not pinned); the others are placed as
        usual, counting what the pinned ones took.
        """
        self.assertEqual(placement.place(self.dirs, [10, 10, 10], [4, 4], indices=[2]), [2, 0])
        self.assertEqual(
            placement.place(self.dirs, [10, 10, 10], [4, 4, 4], indices=[None, 1, 1]), [0, 1, 1]
        )
        self.assertEqual(placement.place(self.dirs, [5, 10, 10], [4, 4], indices=[0]), [0, 1])

    def test_refusals_say_what_each_directory_can_take(self) -> None:
        """
        A storage index that does not exist is a bad request; a volume that fits
        nowhere, or not where it is pinned, is refused with every directory's room;
        a directory whose figures are unknown says why.
        """
        e = self.assertRaises(
            InvalidRequest, placement.place, self.dirs, [10, 10, 10], [1], indices=[3]
        )
        self.assertIn("storage index 3 does not exist", str(e))
        self.assertIn("indices 0 to 2", str(e))
        e = self.assertRaises(
            InsufficientCapacity,
            placement.place,
            self.dirs,
            [2 * MiB, GiB, 0],
            [2 * GiB],
            problems=["", "", "No such file or directory"],
        )
        self.assertIn("not enough free space for a 2 GiB volume", str(e))
        self.assertIn("[0] /a: 2 MiB usable", str(e))
        self.assertIn("[1] /b: 1 GiB usable", str(e))
        self.assertIn("[2] /c: No such file or directory", str(e))
        e = self.assertRaises(
            InsufficientCapacity, placement.place, self.dirs, [10, 10, 3], [4], indices=[2]
        )
        self.assertIn("storage[2] (/c) does not have 4 B free for volume 0", str(e))
        e = self.assertRaises(InsufficientCapacity, placement.place, [], [], [1])
        self.assertIn("no volume directories", str(e))

    def test_usable_bytes(self) -> None:
        """
        min(size - allocated, available), 1 GiB kept on the root file system, never
        negative.
        """
        self.assertEqual(placement.usable_bytes(100, 80, 30, False), 70)
        self.assertEqual(placement.usable_bytes(100, 50, 30, False), 50)
        self.assertEqual(placement.usable_bytes(10 * GiB, 5 * GiB, 0, True), 4 * GiB)
        self.assertEqual(placement.usable_bytes(100, 50, 300, False), 0)
        self.assertEqual(placement.usable_bytes(100, MiB, 0, True), 0)

    def test_storage_index(self) -> None:
        """
        The first volume directory a path lies under (not a mere prefix of a name).
        """
        self.assertEqual(placement.storage_index(["/v", "/v2"], "/v2/10.0.0.2/root"), 1)
        self.assertEqual(placement.storage_index(["/v/", "/w"], "/v/10.0.0.2"), 0)
        self.assertIsNone(placement.storage_index(["/v"], "/tmp/hyper-volumes/10.0.0.2"))
        self.assertEqual(
            placement.allocations(["/v", "/w"], [("/w/ip/root", 5), ("/w/ip/s", 6), ("/x/y", 9)]),
            {1: 11},
        )


class PerDirectoryHost:
    """
    A host whose volume directories' C{statvfs} figures are given per directory.
    """

    def __init__(self, figures: dict[str, tuple[int, int, int]]) -> None:
        self.figures = figures  # directory -> (size, free, available)

    def num_cpus(self) -> int:
        return 4

    def memory(self) -> tuple[int, int]:
        return 8192, 8192

    def storage(self, directory: str) -> tuple[int, int]:
        size, _, available = self.figures[directory]
        return size, available

    def storage_free(self, directory: str) -> int:
        return self.figures[directory][1]


class HostStatsPlacementTests(SynchronousTestCase):
    """
    L{HostStats} places volumes with the statvfs figures it read, the VMs' volumes
    and the reservations in flight.
    """

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.a = os.path.join(self.root, "a")
        self.full = os.path.join(self.root, "full")
        os.makedirs(self.a)
        os.makedirs(self.full)
        self.host = PerDirectoryHost(
            {self.a: (10 * GiB, 9 * GiB, 8 * GiB), self.full: (64 * MiB, 2 * MiB, MiB)}
        )
        self.stats = HostStats(self.host, [self.full, self.a], SynchronousRunner(), Clock())
        self.stats.load()
        for entry in self.stats.snapshot.directories:
            entry.on_root = False
        self.volumes: list[tuple[str, int]] = []
        self.stats.allocated = lambda: self.volumes

    def test_full_directory_is_passed_over(self) -> None:
        """
        The nearly full first directory takes only what fits in it (a volume placed
        after one that moved on stays where that one went, as in the reference);
        pinning a volume there that does not fit is refused.
        """
        self.assertEqual(self.stats.reserve_volumes([64 * MiB, 512 * 1024]), [self.a, self.a])
        self.assertEqual(self.stats.reserve_volumes([512 * 1024]), [self.full])
        e = self.assertRaises(
            InsufficientCapacity, self.stats.reserve_volumes, [2 * MiB], indices=[0]
        )
        self.assertIn(f"storage[0] ({self.full}) does not have 2 MiB free", str(e))
        self.assertIn("512 KiB usable", str(e))

    def test_allocations_and_reservations_count(self) -> None:
        """
        VM volumes already in a directory count against its size (thick volumes that
        are not written yet), reservations against both bounds; a release gives them
        back.
        """
        self.volumes = [(os.path.join(self.a, "10.0.0.2", "root"), 9 * GiB)]
        usable, problems = self.stats.usable()
        self.assertEqual(usable, [MiB, GiB])
        self.assertEqual(problems, ["", ""])
        [where] = self.stats.reserve_volumes([GiB])
        self.assertEqual(where, self.a)
        self.assertRaises(InsufficientCapacity, self.stats.reserve_volumes, [MiB + 1])
        self.stats.release(self.a, GiB, used=False)  # (reads the figures again)
        self.assertEqual(self.stats.usable()[0][1], GiB)

    def test_allocations_kept_and_moved_by_changes(self) -> None:
        """
        With C{track} (the manager's VM table tells every change to the VMs' volumes),
        the per-directory sums are made once and then moved by each change: the VMs'
        volumes are not summed again per create; a new list of directories sums
        them again.
        """
        summed = []

        def allocated() -> list[tuple[str, int]]:
            summed.append(1)
            return self.volumes

        self.stats.allocated = allocated
        self.stats.track = True
        root = os.path.join(self.a, "10.0.0.2", "root")
        self.volumes = [(root, 9 * GiB)]
        self.stats.volumes_changed([], [(root, 9 * GiB)])  # before any use: ignored
        self.assertEqual(self.stats.usable()[0], [MiB, GiB])
        self.stats.reserve_volumes([MiB])
        self.stats.storage_infos()
        self.assertEqual(len(summed), 1)
        self.stats.volumes_changed([(root, 9 * GiB)], [(root, 5 * GiB)])
        self.assertEqual(self.stats.usable()[0], [0, 5 * GiB])
        other = os.path.join(self.a, "10.0.0.3", "root")
        self.stats.volumes_changed([], [(other, GiB), ("/elsewhere/10.0.0.3/data", GiB)])
        self.assertEqual(self.stats.usable()[0], [0, 4 * GiB])
        self.stats.volumes_changed([(other, GiB)], [])
        self.assertEqual(self.stats.allocations(), {1: 5 * GiB})
        self.assertEqual(len(summed), 1)
        self.volumes = [(root, 5 * GiB)]
        self.stats.directories = [self.a]
        self.assertEqual(self.stats.allocations(), {0: 5 * GiB})
        self.assertEqual(len(summed), 2)
        self.stats.track = False  # not tracked: summed on every use
        self.stats.allocations()
        self.stats.allocations()
        self.assertEqual(len(summed), 4)

    def test_storage_infos(self) -> None:
        """
        GetVmVolumeStorageConfiguration's figures: statvfs's available, free and size,
        and the usable bytes placement uses.
        """
        self.volumes = [(os.path.join(self.a, "10.0.0.2", "root"), 3 * GiB)]
        self.assertEqual(
            self.stats.storage_infos(),
            [
                StorageInfo(
                    AvailableBytes=MiB, FreeBytes=2 * MiB, SizeBytes=64 * MiB, UsableBytes=MiB
                ),
                StorageInfo(
                    AvailableBytes=8 * GiB,
                    FreeBytes=9 * GiB,
                    SizeBytes=10 * GiB,
                    UsableBytes=7 * GiB,
                ),
            ],
        )

    def test_unread_figures(self) -> None:
        """
        Before the figures are read nothing can be placed, and the refusal says so.
        """
        stats = HostStats(self.host, [self.a], SynchronousRunner(), Clock())
        e = self.assertRaises(InsufficientCapacity, stats.reserve_volumes, [1])
        self.assertIn("not read yet", str(e))


class RecoverMovesTests(SynchronousTestCase):
    """
    L{recover_moves}: whatever instant a ChangeVmVolumeStorageIndex was killed at, the
    VM keeps exactly the copy its info.json names.
    """

    ip = "10.0.0.9"

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.dirs = [os.path.join(self.root, "v0"), os.path.join(self.root, "v1")]
        for d in self.dirs:
            os.makedirs(os.path.join(d, self.ip))

    def vm(self, *where: int) -> Vm:
        names = ["root"] + [f"secondary-volume.{i}" for i in range(len(where) - 1)]
        locations = []
        for name, index in zip(names, where):
            directory = os.path.join(self.dirs[index], self.ip)
            locations.append(
                VolumeLocation(DirectoryToCleanup=directory, Filename=os.path.join(directory, name))
            )
        local = LocalVmInfo(VolumeLocations=locations)
        local.VmInfo.Volumes = [Volume(Size=MiB) for _ in where]
        local.VmInfo.Address.IpAddress = self.ip
        return Vm(local, os.path.join(self.root, "state", self.ip))

    def write(self, index: int, name: str, size: int = MiB) -> str:
        path = os.path.join(self.dirs[index], self.ip, name)
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def names(self, index: int) -> list[str]:
        try:
            return sorted(os.listdir(os.path.join(self.dirs[index], self.ip)))
        except FileNotFoundError:
            return ["<no directory>"]

    def test_killed_while_copying(self) -> None:
        """
        A partial C{.moving} copy is removed; the old file is the volume.
        """
        self.write(0, "root")
        self.write(0, "secondary-volume.0")
        self.write(1, "secondary-volume.0" + MOVING, MiB // 2)
        done = recover_moves(self.vm(0, 0), self.dirs)
        self.assertEqual(len(done), 1, done)
        self.assertEqual(self.names(0), ["root", "secondary-volume.0"])
        self.assertEqual(self.names(1), ["<no directory>"])

    def test_killed_after_the_copy_before_the_switch(self) -> None:
        """
        A whole copy that info.json does not name yet is removed.
        """
        self.write(0, "root")
        self.write(0, "secondary-volume.0")
        self.write(1, "secondary-volume.0")
        recover_moves(self.vm(0, 0), self.dirs)
        self.assertEqual(self.names(0), ["root", "secondary-volume.0"])
        self.assertEqual(self.names(1), ["<no directory>"])

    def test_killed_after_the_switch(self) -> None:
        """
        Once info.json names the new copy, the old one is removed (its directory
        stays while the root is in it).
        """
        self.write(0, "root")
        self.write(0, "secondary-volume.0")
        self.write(1, "secondary-volume.0")
        recover_moves(self.vm(0, 1), self.dirs)
        self.assertEqual(self.names(0), ["root"])
        self.assertEqual(self.names(1), ["secondary-volume.0"])

    def test_never_removes_the_only_copy(self) -> None:
        """
        A volume file info.json does not name is kept when the named one is missing
        or differs in size (not a copy: e.g. files a reorder renamed), and other
        files are never touched.
        """
        self.write(0, "root")
        self.write(1, "secondary-volume.0", 2 * MiB)
        self.write(1, "secondary-volume.1")
        self.write(0, "notes.txt")
        self.write(0, "secondary-volume.0", MiB)
        recover_moves(self.vm(0, 0, 0), self.dirs)
        self.assertEqual(self.names(0), ["notes.txt", "root", "secondary-volume.0"])
        self.assertEqual(self.names(1), ["secondary-volume.0", "secondary-volume.1"])


class SinglePartitionTests(SynchronousTestCase):
    """
    L{growfs.single_partition} on tables made by the real C{sfdisk}: only a DOS table
    with exactly one partition counts (the reference's C{grow2fs} rule).
    """

    def table(self, script: str) -> Optional[tuple[int, int]]:
        from hypervisor.manager import growfs

        path = self.mktemp()
        with open(path, "wb") as f:
            f.truncate(64 * MiB)
        if script:
            subprocess.run(["sfdisk", "-q", path], input=script, text=True, check=True)
        return growfs.single_partition(path)

    def test_tables(self) -> None:
        self.assertEqual(self.table("label: dos\n2048,,83\n"), (MiB, 63 * MiB))
        self.assertIsNone(self.table(""))
        self.assertIsNone(self.table("label: dos\n2048,20480,83\n,,83\n"))
        self.assertIsNone(self.table("label: gpt\n,,L\n"))
