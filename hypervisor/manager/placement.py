# -*- test-case-name: tests.test_volume_placement -*-
"""
Volume directories and where each volume goes (reference §2.3, §11; the Go
daemon's C{manager/volumes.go}).

- L{detect_volume_directories}: without C{-volumeDirectories}, one
  C{<mountpoint>/hyper-volumes} per disk: every block-device file system (not
  C{/boot}, not C{/dev/root}), device-mapper devices followed to the device under
  them, and of the partitions of one disk only the largest; sorted.
- A volume's I{storage index} is the position of its volume directory in the list
  (L{storage_index}: the first directory that is a prefix of its path).
- L{usable_bytes}: what a directory can still take, the Go rule:
  C{min(size - allocated, available)}, where I{allocated} is the summed effective
  size (C{max(Size, VirtualSize)}) of the VM volumes already there, 1 GiB kept free
  on the root file system.
- L{place}: a directory for each volume, Go's C{getVolumeDirectories}: volume I{i}
  goes to C{StorageIndices[i]} when given (refused if it lacks room), else to the
  first directory from the current position with room for it (a volume may fill a
  directory exactly, where Go wants one byte more); the position starts
  at the first directory for every request and moves on after each volume only with
  C{SpreadVolumes}.

Everything here is pure (or reads the files it is given) so that it can be tested
with any figures; L{hypervisor.manager.hoststats.HostStats} feeds it the cached
C{statvfs} figures and the VMs' allocations.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Sequence

from hypervisor.errors import InsufficientCapacity, InvalidRequest
from hypervisor.model import StorageInfo

GiB = 1 << 30
MiB = 1 << 20
FALLBACK = "/var/lib/hypervisor-volumes"


def _format(size: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (1024, "KiB")):
        if size >= unit:
            return f"{size / unit:.4g} {name}"
    return f"{size} B"


def _underlying(device: str, sys_block: str) -> Optional[str]:
    """
    The device under a device-mapper device (its single slave), the device itself
    when it has none, None when it has several (not one disk).
    """
    try:
        slaves = os.listdir(os.path.join(sys_block, os.path.basename(device), "slaves"))
    except OSError:
        return device
    if len(slaves) == 1:
        return os.path.join("/dev", slaves[0])
    return None if slaves else device


def detect_volume_directories(
    mounts: str = "/proc/mounts",
    sys_block: str = "/sys/class/block",
    size_of: Callable[[str], int] = lambda path: os.statvfs(path).f_blocks
    * os.statvfs(path).f_frsize,
    realpath: Callable[[str], str] = os.path.realpath,
) -> list[str]:
    """
    The reference's volume directories when C{-volumeDirectories} is not given
    (C{detectVolumeDirectories}); L{FALLBACK} when no disk qualifies.
    """
    first_mount: dict[str, str] = {}  # device name -> mount point
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2:
            continue
        device, mountpoint = fields[0], fields[1].replace("\\040", " ")
        if mountpoint == "/boot" or not device.startswith("/dev/") or device == "/dev/root":
            continue
        real = _underlying(realpath(device), sys_block)
        if real is None:
            continue
        first_mount.setdefault(os.path.basename(real), mountpoint)
    chosen: list[str] = []
    biggest: dict[str, tuple[int, str]] = {}  # parent disk -> (size, mount point)
    for name, mountpoint in first_mount.items():
        entry = os.path.join(sys_block, name)
        try:
            target = os.readlink(entry)
        except OSError:
            continue  # not a block device the kernel lists
        if not os.path.exists(os.path.join(entry, "partition")):
            chosen.append(mountpoint)  # a whole disk
            continue
        try:
            size = size_of(mountpoint)
        except OSError:
            continue
        parent = os.path.basename(os.path.dirname(target))
        if parent not in biggest or size > biggest[parent][0]:
            biggest[parent] = (size, mountpoint)
    chosen.extend(mountpoint for _, mountpoint in biggest.values())
    out = sorted(os.path.join(m, "hyper-volumes") for m in chosen)
    return out or [FALLBACK]


def storage_index(directories: Sequence[str], path: str) -> Optional[int]:
    """
    The storage index of a volume path or per-VM volume directory: the first volume
    directory it lies under (None: under none, e.g. a memory volume).
    """
    for index, directory in enumerate(directories):
        if path.startswith(directory.rstrip("/") + "/"):
            return index
    return None


def allocations(directories: Sequence[str], volumes: Iterable[tuple[str, int]]) -> dict[int, int]:
    """
    Bytes allocated to VM volumes per storage index, from (path, effective size)
    pairs (the Go daemon's C{calculateStorageAllocations}).
    """
    out: dict[int, int] = {}
    for path, size in volumes:
        index = storage_index(directories, path)
        if index is not None:
            out[index] = out.get(index, 0) + size
    return out


def usable_bytes(size: int, available: int, allocated: int, on_root: bool) -> int:
    """
    What a new volume may take in a directory: C{min(size - allocated, available)},
    1 GiB less on the root file system, never negative.
    """
    keep = GiB if on_root else 0
    return max(0, min(size - allocated, available - keep))


def storage_info(
    size: int, free: int, available: int, allocated: int, on_root: bool
) -> StorageInfo:
    """
    One directory's L{StorageInfo} as GetVmVolumeStorageConfiguration reports it.
    """
    return StorageInfo(
        AvailableBytes=max(0, available),
        FreeBytes=max(0, free),
        SizeBytes=max(0, size),
        UsableBytes=usable_bytes(size, available, allocated, on_root),
    )


def place(
    directories: Sequence[str],
    usable: Sequence[int],
    sizes: Sequence[int],
    spread: bool = False,
    indices: Sequence[Optional[int]] = (),
    problems: Sequence[str] = (),
) -> list[int]:
    """
    A storage index for each volume size (Go's C{getVolumeDirectories}).

    @param usable: bytes each directory can take (L{usable_bytes}); not changed.
    @param indices: C{StorageIndices}: volume i goes to C{indices[i]} when given
        (and not None).
    @param problems: per directory, why its figures are unknown ("" if known).
    @raise InvalidRequest: a storage index that does not exist.
    @raise InsufficientCapacity: a volume fits nowhere (or not where it was pinned);
        the message gives what each directory can take.
    """
    n = len(directories)
    if n == 0:
        raise InsufficientCapacity("no volume directories are configured")
    left = list(usable)
    for index in indices:
        if index is not None and index >= n:
            raise InvalidRequest(
                f"storage index {index} does not exist: this hypervisor has {n} volume "
                f"director{'y' if n == 1 else 'ies'} (indices 0 to {n - 1})"
            )

    def room() -> str:
        parts = []
        for i, directory in enumerate(directories):
            why = problems[i] if i < len(problems) else ""
            parts.append(f"[{i}] {directory}: {why or _format(left[i]) + ' usable'}")
        return "; ".join(parts)

    out = []
    position = 0
    for volume, size in enumerate(sizes):
        pin = indices[volume] if volume < len(indices) else None
        if pin is not None:
            index = pin
            if size > left[index]:
                raise InsufficientCapacity(
                    f"storage[{index}] ({directories[index]}) does not have "
                    f"{_format(size)} free for volume {volume}: {room()}"
                )
        else:
            for step in range(n):
                index = (position + step) % n
                if size <= left[index]:
                    break
            else:
                raise InsufficientCapacity(
                    f"not enough free space for a {_format(size)} volume: {room()}"
                )
            position = index
            if spread:
                position = (position + 1) % n
        left[index] -= size
        out.append(index)
    return out
