# -*- test-case-name: tests.test_volume_storage -*-
"""
Growing the file system in a volume after ChangeVmVolumeSize made it bigger, as the
Go daemon's C{grow2fs} does: an ext2/3/4 file system on the whole volume is checked
(C{e2fsck -f -y}) and grown (C{resize2fs}); a volume with a DOS partition table of one
partition has that partition extended to the end of the volume (C{sfdisk}), and the
ext file system in it grown through a loop device over the partition.

Unlike the reference, a volume holding neither (no file system, another file system,
or other partition layouts) is left as it is without an error: growing the volume
itself succeeded, and there is nothing this hypervisor knows how to grow in it.
Blocking: run it on a disk thread, with the VM stopped.
"""

from __future__ import annotations

import os
import struct
import subprocess
from typing import Optional

from hypervisor.errors import HypervisorError

SECTOR = 512
TIMEOUT = 600


class GrowError(HypervisorError):
    """
    The volume grew but its file system could not be grown (the message says why).
    """

    status = 500


def _run(argv: list[str], stdin: str = "", ok: tuple[int, ...] = (0,)) -> str:
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise GrowError(f"{argv[0]} is not installed") from None
    if result.returncode not in ok:
        output = (result.stderr or result.stdout).strip().replace("\n", "\\n")
        raise GrowError(f"{' '.join(argv)}: exit status {result.returncode}: {output}")
    return result.stdout


def _is_ext(device: str) -> bool:
    try:
        return subprocess.run(["e2label", device], capture_output=True, timeout=60).returncode == 0
    except FileNotFoundError:
        raise GrowError("e2label is not installed (e2fsprogs)") from None


def _grow_ext(device: str) -> None:
    _run(["e2fsck", "-f", "-y", device], ok=(0, 1, 2))  # 1, 2: errors corrected
    _run(["resize2fs", device])


def single_partition(path: str) -> Optional[tuple[int, int]]:
    """
    The (start, length) in bytes of partition 1 of a DOS partition table whose other
    three entries are empty; None without such a table.
    """
    with open(path, "rb") as f:
        sector = f.read(SECTOR)
    if len(sector) < SECTOR or sector[510:512] != b"\x55\xaa":
        return None
    entries = [struct.unpack("<B3xB3xII", sector[446 + 16 * i : 462 + 16 * i]) for i in range(4)]
    (_, kind, start, count), rest = entries[0], entries[1:]
    if kind in (0, 0xEE) or count == 0 or any(e[3] for e in rest):
        return None  # empty, GPT's protective entry, or more than one partition
    return start * SECTOR, count * SECTOR


def grow_file_system(path: str) -> str:
    """
    Grow what is in the volume file C{path} to its (new) size; returns what was done.

    @raise GrowError: a file system was found and could not be grown.
    """
    if _is_ext(path):
        _grow_ext(path)
        return "grew its ext file system"
    partition = single_partition(path)
    if partition is None:
        return "no ext file system or single-partition DOS table in it: nothing grown"
    _run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", "-N", "1", path], stdin=", +\n")
    start, length = single_partition(path) or partition
    size = os.path.getsize(path)
    length = min(length, size - start)
    device = _run(
        ["losetup", "--find", "--show", "--offset", str(start), "--sizelimit", str(length), path]
    ).strip()
    try:
        if not _is_ext(device):
            return "extended its partition (no ext file system in it)"
        _grow_ext(device)
    finally:
        _run(["losetup", "-d", device])
    return "extended its partition and grew the ext file system in it"
