# -*- test-case-name: tests.test_volume_storage -*-
"""
The volume directories seen from RPC (reference §1.2): GetVmVolumeStorageConfiguration,
ChangeVmVolumeStorageIndex and ListVolumeDirectories.

Moving a volume to another volume directory is crash-safe. On the disk threads the
volume is copied to C{<new directory>/<IP>/<name>.moving}, its blocks allocated (a
raw volume stays thick), flushed, and renamed to its name; then C{info.json} is
switched to the new place (one atomic write); only then is the old file removed.
Whatever instant the daemon dies at, C{info.json} names exactly one of the copies,
and L{recover_moves} (at start) removes the other one and any C{.moving} file: the
VM comes back with exactly one copy of each volume, the one it names.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from twisted.internet.defer import inlineCallbacks

from hypervisor.auth import Identity
from hypervisor.errors import InvalidRequest, WrongState
from hypervisor.manager import images, placement
from hypervisor.manager.vm import Vm
from hypervisor.manager.volumeops import VolumeOps
from hypervisor.model import (
    GetVmVolumeStorageConfigurationResponse,
    VolumeFormat,
    VolumeLocation,
    VolumeType,
)
from hypervisor.store import fsync_directory

MOVING = ".moving"


def _volume_name(name: str) -> bool:
    if name == "root":
        return True
    prefix = "secondary-volume."
    return name.startswith(prefix) and name[len(prefix) :].isdigit()


def _remove_empty_directory(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (another volume, snapshots, logs) or gone


def copy_volume(src: str, directory: str, thick: bool) -> str:
    """
    Copy the volume file C{src} into C{directory} under the same name, durably
    (through C{<name>.moving}: the name appears only once the copy is whole and on
    disk). Blocking: call it on a disk thread.

    @return: the new file's path.
    @raise WrongState: a file of that name is there already.
    """
    name = os.path.basename(src)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    final = os.path.join(directory, name)
    if os.path.lexists(final):
        raise WrongState(f"{final} exists already")
    tmp = final + MOVING
    images.remove_file(tmp)
    try:
        images.clone_or_copy(src, tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if thick and size:
                os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        fsync_directory(directory)
    except BaseException:
        images.remove_file(tmp)
        raise
    return final


def remove_volume_file(path: str, keep_directory: bool) -> None:
    """
    Remove a volume file durably, and its per-VM directory when that is left empty
    (unless C{keep_directory}). Blocking.
    """
    images.remove_file(path)
    directory = os.path.dirname(path)
    fsync_directory(directory)
    if not keep_directory:
        _remove_empty_directory(directory)


def recover_moves(vm: Vm, directories: Sequence[str]) -> list[str]:
    """
    At start (blocking, before the reactor runs): finish what an interrupted
    ChangeVmVolumeStorageIndex left. In every volume directory's C{<IP>/}, a
    C{.moving} file is removed (a copy that never completed), and so is a volume file
    that C{info.json} does not name when it names one of that name elsewhere that
    exists with the same size (the other copy of a move: before the switch the new
    one, after it the old one). Per-VM directories left empty are removed.

    @return: what was done, for the log.
    """
    done = []
    recorded = {loc.Filename for loc in vm.local.VolumeLocations}
    by_name = {os.path.basename(f): f for f in recorded}
    keep = {loc.DirectoryToCleanup for loc in vm.local.VolumeLocations}
    for directory in directories:
        vm_dir = os.path.join(directory, vm.ip)
        try:
            names = os.listdir(vm_dir)
        except OSError:
            continue
        for name in names:
            path = os.path.join(vm_dir, name)
            if name.endswith(MOVING) and _volume_name(name[: -len(MOVING)]):
                os.unlink(path)
                done.append(f"removed {path}, a copy an interrupted move left")
                continue
            if not _volume_name(name) or path in recorded or name not in by_name:
                continue
            adopted = by_name[name]
            try:
                same = os.path.getsize(adopted) == os.path.getsize(path)
            except OSError:
                same = False
            if same:
                os.unlink(path)
                done.append(f"removed {path}: an interrupted move left it; {adopted} is the volume")
        if vm_dir not in keep and os.path.isdir(vm_dir) and not os.listdir(vm_dir):
            os.rmdir(vm_dir)
    return done


class VolumeStorage:
    """
    The volume directory methods.
    """

    def __init__(self, ops: VolumeOps) -> None:
        self.ops = ops
        self.ctx = ops.ctx

    @property
    def directories(self) -> list[str]:
        """
        The volume directories, by storage index.
        """
        return self.ctx.stats.directories

    @inlineCallbacks
    def get_configuration(self, ip: str) -> Any:
        """
        GetVmVolumeStorageConfiguration: every volume directory's figures (read
        afresh) and the storage index of each volume of the VM (no owner check, as
        in the reference).
        """
        ctx = self.ctx
        vm = ctx.table.get(ip)
        snapshot = yield ctx.stats.read()
        indices = []
        for number, location in enumerate(vm.local.VolumeLocations):
            index = placement.storage_index(self.directories, location.DirectoryToCleanup)
            if index is None:
                raise WrongState(
                    f"no volume directory for: {location.DirectoryToCleanup} (volume "
                    f"{number} of VM {ip} is not in a volume directory)"
                )
            indices.append(index)
        return GetVmVolumeStorageConfigurationResponse(
            StorageInfos=ctx.stats.storage_infos(snapshot), VolumeStorageIndices=indices
        )

    def change_storage_index(
        self, identity: Identity, ip: str, storage_index: int, volume_index: int
    ) -> Any:
        """
        ChangeVmVolumeStorageIndex: move a volume of a stopped VM to another volume
        directory (refused for a root with its own kernel or initrd or with
        C{root.old}, for a volume with snapshots, and when the directory lacks room).
        """
        directories = self.directories
        if storage_index >= len(directories):
            raise InvalidRequest(
                f"invalid storage index {storage_index}: this hypervisor has "
                f"{len(directories)} volume directories (indices 0 to {len(directories) - 1})"
            )

        @inlineCallbacks
        def move(vm: Vm) -> Any:
            ctx = self.ctx
            if volume_index >= len(vm.info.Volumes):
                raise InvalidRequest(
                    f"invalid volume index {volume_index}: VM {ip} has volumes 0 to "
                    f"{len(vm.info.Volumes) - 1}"
                )
            volume = vm.info.Volumes[volume_index]
            location = vm.local.VolumeLocations[volume_index]
            if volume.Type == VolumeType.MEMORY:
                raise InvalidRequest(f"volume {volume_index} is a memory volume")
            old_index = placement.storage_index(directories, location.DirectoryToCleanup)
            if old_index is None:
                raise WrongState(f"no volume directory for: {location.DirectoryToCleanup}")
            if old_index == storage_index:
                return
            if volume_index == 0 and vm.initrd:
                raise WrongState("cannot move root volume with separate initrd")
            if volume_index == 0 and vm.kernel:
                raise WrongState("cannot move root volume with separate kernel")
            if volume_index == 0:
                old = yield ctx.runner.run(os.path.lexists, location.Filename + ".old")
                if old:
                    raise WrongState(
                        "cannot move root volume with old image: RestoreVmImage or "
                        "DiscardVmOldImage first"
                    )
            if volume.Snapshots:
                raise WrongState("cannot move volume with snapshots: DiscardVmSnapshot first")
            if volume.Format == VolumeFormat.QCOW2:
                backing = yield ctx.runner.run(images.qcow2_backing_file, location.Filename)
                if backing and not os.path.isabs(backing):
                    raise WrongState(
                        f"cannot move volume {volume_index}: its backing file {backing!r} "
                        "is named relative to its directory"
                    )
            size = volume.effective_size
            target = directories[storage_index]
            ctx.stats.reserve(size, storage_index)
            new_dir = os.path.join(target, ip)
            shared_dir = any(
                loc.DirectoryToCleanup == location.DirectoryToCleanup
                for i, loc in enumerate(vm.local.VolumeLocations)
                if i != volume_index
            )
            try:
                path = yield ctx.runner.run(
                    copy_volume, location.Filename, new_dir, volume.Format == VolumeFormat.RAW
                )
                try:
                    new = ctx.table.copy(vm)
                    new.VolumeLocations[volume_index] = VolumeLocation(
                        DirectoryToCleanup=new_dir, Filename=path
                    )
                    yield ctx.table.commit(vm, new)
                except BaseException:
                    keep = any(
                        loc.DirectoryToCleanup == new_dir for loc in vm.local.VolumeLocations
                    )
                    yield ctx.runner.run(remove_volume_file, path, keep)
                    raise
            except BaseException:
                ctx.stats.release(target, size, used=False)
                raise
            ctx.stats.release(target, size, used=True)
            # info.json names the new copy: the old one goes (a crash here leaves it
            # for recover_moves at the next start).
            yield ctx.runner.run(remove_volume_file, location.Filename, shared_dir)

        return self.ops._run(identity, ip, "ChangeVmVolumeStorageIndex", move)

    def list_directories(self, identity: Identity) -> list[str]:
        """
        ListVolumeDirectories: only for callers on a loopback address (the
        reference's rule).
        """
        if not identity.loopback:
            from hypervisor.errors import AccessDenied

            raise AccessDenied("local connection required")
        return list(self.directories)
