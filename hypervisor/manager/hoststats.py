# -*- test-case-name: tests.test_manager_state -*-
"""
The host's figures as the manager and the pages read them: CPUs, memory and the
volume directories' file systems, cached and refreshed on a disk thread every
L{REFRESH_INTERVAL} seconds (and after volumes are made or removed), so that no
request reads C{/proc/meminfo} or calls C{statvfs} on the reactor thread.

Storage for volumes being created is reserved until their files exist, so that two
creations in flight cannot both count the same free bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hypervisor.diskio import IBlockingRunner
from hypervisor.errors import InsufficientCapacity
from hypervisor.manager import placement
from hypervisor.manager.capacity import IHost
from hypervisor.model import StorageInfo

REFRESH_INTERVAL = 2.0
GiB = 1024**3
MiB = 1024**2


@dataclass
class DirectoryStats:
    """
    One volume directory's file system, as last read.
    """

    Directory: str
    MountPoint: str = ""
    Size: int = 0
    Available: int = 0
    Error: str = ""
    Free: int = 0
    device: int = -1
    on_root: bool = False
    exists: bool = False


@dataclass
class Snapshot:
    """
    Everything read in one refresh.
    """

    memory: tuple[int, int] = (0, 0)
    directories: list[DirectoryStats] = field(default_factory=list)


def mount_point(path: str) -> str:
    """
    The mount point of the file system holding C{path} (or its nearest parent).
    Blocking: stats the path and its parents.
    """
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def read_snapshot(host: IHost, directories: list[str]) -> Snapshot:
    """
    Read memory and each directory's file system (blocking: run on a thread).
    """
    snapshot = Snapshot(memory=host.memory())
    try:
        root_device = os.stat("/").st_dev
    except OSError:
        root_device = -1
    for directory in directories:
        entry = DirectoryStats(Directory=directory)
        try:
            entry.MountPoint = mount_point(directory)
            entry.exists = os.path.isdir(directory)
            target = directory if entry.exists else entry.MountPoint
            entry.device = os.stat(target).st_dev
            entry.on_root = entry.device == root_device
            entry.Size, entry.Available = host.storage(target)
            free_of = getattr(host, "storage_free", None)
            entry.Free = free_of(target) if free_of is not None else entry.Available
        except OSError as e:
            entry.Error = e.strerror or str(e)
        snapshot.directories.append(entry)
    return snapshot


class HostStats:
    """
    Cached host figures (an L{IHost} whose answers never block).

    @ivar host: the real host, read on the runner.
    @ivar directories: the volume directories.
    """

    log = Logger()

    def __init__(
        self,
        host: IHost,
        directories: list[str],
        runner: IBlockingRunner,
        reactor: IReactorTime,
        interval: float = REFRESH_INTERVAL,
    ) -> None:
        self.host = host
        self.directories = list(directories)
        self.runner = runner
        self.reactor = reactor
        self.interval = interval
        self.snapshot = Snapshot()
        self._cpus = host.num_cpus()
        self._reserved: dict[str, int] = {}
        # (path, effective size) of every VM volume: set by the manager; with
        # C{track}, the sums per directory are kept and moved by L{volumes_changed}
        # (the manager's VM table tells every change), else summed on each use.
        self.allocated: Callable[[], Iterable[tuple[str, int]]] = lambda: ()
        self.track = False
        self._allocations: Optional[tuple[tuple[str, ...], dict[int, int]]] = None
        self._refreshing: Optional[Deferred[None]] = None
        self._refresh_again = False
        self._loop: Optional[LoopingCall] = None

    # Refreshing ------------------------------------------------------------------

    def load(self) -> None:
        """
        Read the figures now (at start, before the reactor runs).
        """
        self.snapshot = read_snapshot(self.host, self.directories)

    def start(self) -> None:
        """
        Refresh every C{interval} seconds.
        """
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: self.log.failure("host figures", f)
        )

    def stop(self) -> None:
        """
        Stop refreshing.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def refresh(self) -> "Deferred[None]":
        """
        Read the figures again on the runner. A refresh asked for while one is in
        flight makes one more read after it (that one may have read the disk before
        the change that asked for this refresh).
        """
        if self._refreshing is not None:
            self._refresh_again = True
            return self._refreshing
        self._refresh_again = False

        def got(snapshot: Snapshot) -> None:
            if not self._refresh_again:
                self.snapshot = snapshot  # else stale: the next read replaces it

        def failed(failure: Any) -> None:
            self.log.warn("cannot read host figures: {why}", why=failure.getErrorMessage())

        def done(_: object) -> None:
            self._refreshing = None
            if self._refresh_again:
                self.refresh()

        d: Deferred[None] = self.runner.run(
            read_snapshot, self.host, self.directories
        ).addCallbacks(got, failed)
        d.addBoth(done)
        if not d.called:
            self._refreshing = d
        return d

    # IHost (cached) ------------------------------------------------------------------

    def num_cpus(self) -> int:
        """
        Online CPUs.
        """
        return self._cpus

    def memory(self) -> tuple[int, int]:
        """
        (total, available) MiB as last read.
        """
        return self.snapshot.memory

    def storage(self, directory: str) -> tuple[int, int]:
        """
        (size, available) bytes of a volume directory's file system as last read.
        """
        for entry in self.snapshot.directories:
            if entry.Directory == directory:
                return entry.Size, entry.Available
        return 0, 0

    # Volume directories ----------------------------------------------------------------

    def total_volume_bytes(self) -> int:
        """
        The summed size of the volume directories' file systems (each counted once).
        """
        seen = set()
        total = 0
        for entry in self.snapshot.directories:
            if entry.Error or entry.device in seen:
                continue
            seen.add(entry.device)
            total += entry.Size
        return total

    def usable(self) -> tuple[list[int], list[str]]:
        """
        Bytes a new volume may take in each volume directory (by storage index:
        L{placement.usable_bytes} less the reservations of operations in flight),
        and per directory why its figures are unknown ("" when known).
        """
        entries = self.snapshot.directories
        if [e.Directory for e in entries] != self.directories:
            return [0] * len(self.directories), ["not read yet"] * len(self.directories)
        allocated = self.allocations()
        usable, problems = [], []
        for index, entry in enumerate(entries):
            if entry.Error:
                usable.append(0)
                problems.append(entry.Error)
                continue
            room = placement.usable_bytes(
                entry.Size, entry.Available, allocated.get(index, 0), entry.on_root
            )
            usable.append(max(0, room - self._reserved.get(entry.Directory, 0)))
            problems.append("")
        return usable, problems

    def allocations(self) -> dict[int, int]:
        """
        Bytes VM volumes take per storage index (L{placement.allocations}): with
        C{track}, summed once per list of directories and then kept up to date by
        L{volumes_changed} (a create would otherwise sum every VM's volumes again).
        """
        directories = tuple(self.directories)
        kept = self._allocations
        if self.track and kept is not None and kept[0] == directories:
            return dict(kept[1])
        allocated = placement.allocations(directories, self.allocated())
        self._allocations = (directories, allocated) if self.track else None
        return dict(allocated)

    def volumes_changed(
        self, removed: Iterable[tuple[str, int]], added: Iterable[tuple[str, int]]
    ) -> None:
        """
        VM volumes were removed and added (path, effective size): the kept sums move.
        """
        kept = self._allocations
        if kept is None:
            return
        directories, sums = kept
        for sign, pairs in ((-1, removed), (1, added)):
            for path, size in pairs:
                index = placement.storage_index(directories, path)
                if index is not None:
                    sums[index] = sums.get(index, 0) + sign * size

    def storage_infos(self, snapshot: Optional[Snapshot] = None) -> list[StorageInfo]:
        """
        Each volume directory's figures, by storage index (GetVmVolumeStorageConfiguration),
        from C{snapshot} (a fresh L{read_snapshot}) or the cached figures.
        """
        allocated = self.allocations()
        return [
            placement.storage_info(e.Size, e.Free, e.Available, allocated.get(i, 0), e.on_root)
            for i, e in enumerate((snapshot or self.snapshot).directories)
        ]

    def read(self) -> "Deferred[Snapshot]":
        """
        Read the figures now on the runner (not cached: for a reply that must be
        current whatever refresh is in flight).
        """
        return self.runner.run(read_snapshot, self.host, self.directories)

    def reserve_volumes(
        self,
        sizes: Sequence[int],
        spread: bool = False,
        indices: Sequence[Optional[int]] = (),
    ) -> list[str]:
        """
        A volume directory for each volume size (L{placement.place}: C{StorageIndices}
        pin, else the first with room, moving on after each with C{SpreadVolumes}),
        the bytes reserved there until L{release_volumes}.

        @raise InsufficientCapacity: a volume fits nowhere (the message says what
            each directory can take).
        @raise InvalidRequest: a storage index that does not exist.
        """
        usable, problems = self.usable()
        chosen = placement.place(self.directories, usable, sizes, spread, indices, problems)
        out = [self.directories[i] for i in chosen]
        for directory, size in zip(out, sizes):
            self._reserved[directory] = self._reserved.get(directory, 0) + size
        return out

    def release_volumes(self, directories: Sequence[str], sizes: Sequence[int], used: bool) -> None:
        """
        L{release} each reservation of L{reserve_volumes}.
        """
        for directory, size in zip(directories, sizes):
            self.release(directory, size, used)

    def reserve(self, needed: int, index: Optional[int] = None) -> str:
        """
        Reserve C{needed} bytes in one volume directory (the one with storage index
        C{index} when given, else the first with room) until L{release}.
        """
        return self.reserve_volumes([needed], indices=() if index is None else [index])[0]

    def release(self, directory: str, amount: int, used: bool) -> None:
        """
        Give back a reservation: the files exist now (C{used}: their bytes are taken
        off the cached free space until the next read) or creation failed.
        """
        left = self._reserved.get(directory, 0) - amount
        if left > 0:
            self._reserved[directory] = left
        else:
            self._reserved.pop(directory, None)
        if used:
            for entry in self.snapshot.directories:
                if entry.Directory == directory:
                    entry.Available -= amount
        self.refresh()
