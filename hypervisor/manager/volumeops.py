# -*- test-case-name: tests.test_volume_ops -*-
"""
Volume operations (reference §1.2, §1.3, §2.3): AddVmVolumes, DeleteVmVolume,
ChangeVmVolumeSize, SnapshotVm, RestoreVmFromSnapshot, DiscardVmSnapshot,
ReplaceVmImage, RestoreVmImage and DiscardVmOldImage.

Each runs under the VM's lock. File work runs on the disk threads; the VM's info is
changed on a copy and committed (written, then believed) once the files are in
place, and a failure removes what was made, so a refused or failed operation leaves
the VM as it was. File names are the reference's: C{root}, C{secondary-volume.N},
C{root.old}, C{<volume>.snapshot} and C{<volume>.snapshot:<name>}.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from typing import Any, Callable, Optional

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from hypervisor.auth import Identity
from hypervisor.errors import InvalidRequest, NotFound, WrongState
from hypervisor.manager import images, placement
from hypervisor.manager.context import ManagerContext
from hypervisor.manager.lifecycle import Lifecycle
from hypervisor.manager.vm import Vm
from hypervisor.model import (
    ReplaceVmImageRequest,
    State,
    Volume,
    VolumeFormat,
    VolumeInterface,
    VolumeLocation,
)
from hypervisor.upload import UploadStream, write_to_file

MiB = 1024 * 1024
MAX_VOLUMES = 128
_SNAPSHOT_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
# Bytes of an uploaded image read before its volume is made: enough for the qcow2
# header fields that matter (magic, version, backing file, size) and the leading
# magic numbers of what is not an image.
HEADER = 32


def snapshot_path(volume: str, name: str) -> str:
    """
    The reference's snapshot file name: C{<volume>.snapshot[:name]}.
    """
    return f"{volume}.snapshot:{name}" if name else f"{volume}.snapshot"


def _check_name(name: str) -> None:
    if name and not _SNAPSHOT_NAME.fullmatch(name):
        raise InvalidRequest(f"snapshot name {name!r}: 1 to 64 letters, digits and _ . + - only")


def _data_after(path: str, offset: int) -> Optional[int]:
    """
    The first offset at or after C{offset} that holds data (not a hole, not zeros),
    or None.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        position = offset
        while position < size:
            try:
                start = os.lseek(fd, position, os.SEEK_DATA)
            except OSError:
                return None  # no data after position
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            os.lseek(fd, start, os.SEEK_SET)
            at = start
            while at < end:
                chunk = os.read(fd, min(MiB, end - at))
                if not chunk:
                    break
                stripped = chunk.lstrip(b"\0")
                if stripped:
                    return at + len(chunk) - len(stripped)
                at += len(chunk)
            position = end
        return None
    finally:
        os.close(fd)


def _shrink(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)
        os.fsync(f.fileno())


def _rename(src: str, dst: str) -> None:
    os.replace(src, dst)
    from hypervisor.store import fsync_directory

    fsync_directory(os.path.dirname(dst))


def _own_format(path: str) -> tuple[VolumeFormat, int]:
    """
    The format and virtual size of a volume file this hypervisor made (a qcow2
    overlay's backing file is ours, so not refused as in an image from outside).
    """
    import struct

    with open(path, "rb") as f:
        header = f.read(32)
    if header[:4] == images.QCOW2_MAGIC and len(header) == 32:
        return VolumeFormat.QCOW2, struct.unpack(">Q", header[24:32])[0]
    return VolumeFormat.RAW, 0


def _rename_all(moves: list[tuple[str, str]]) -> None:
    """
    Rename C{src -> dst} for every pair at once (through temporary names, so that
    swaps work); on failure, what was renamed is put back.
    """
    staged = []
    try:
        for src, dst in moves:
            if src != dst:
                os.replace(src, src + ".reorder")
                staged.append((src, dst))
        for src, dst in staged:
            os.replace(src + ".reorder", dst)
    except BaseException:
        for src, dst in reversed(staged):
            for path in (dst, src + ".reorder"):
                if os.path.exists(path) and not os.path.exists(src):
                    os.replace(path, src)
        raise
    from hypervisor.store import fsync_directory

    for directory in {os.path.dirname(dst) for _, dst in moves}:
        fsync_directory(directory)


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _copy_then_rename(src: str, dst: str) -> int:
    """
    Copy C{src} to C{dst} through a temporary name (reflink where possible), so
    that C{dst} is either the old file or the whole copy; the size copied.
    """
    tmp = dst + ".new"
    images.remove_file(tmp)
    try:
        images.clone_or_copy(src, tmp)
        _rename(tmp, dst)
    except BaseException:
        images.remove_file(tmp)
        raise
    return os.path.getsize(dst)


def scan_storage(vm: Vm) -> list[str]:
    """
    At start (blocking, before the reactor runs; the reference's C{scanStorage}):
    remove what an interrupted operation left (C{root.new}, C{<volume>.snapshot*.new},
    C{user-data.raw.new}), adopt snapshot files that exist but are not recorded (a
    crash between the file and C{info.json}) and forget recorded snapshots whose file
    is gone. Changes C{vm.local} in place; returns what it did, for the log.
    """
    done = []
    for name in ("user-data.raw.new",):
        path = os.path.join(vm.directory, name)
        if os.path.exists(path):
            os.unlink(path)
            done.append(f"removed {path}")
    for volume, location in zip(vm.local.VmInfo.Volumes, vm.local.VolumeLocations):
        directory, base = os.path.split(location.Filename)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            full = os.path.join(directory, name)
            if name == base + ".new" or (
                name.startswith(base + ".snapshot") and name.endswith(".new")
            ):
                os.unlink(full)
                done.append(f"removed {full}, left by an interrupted operation")
            elif name == base + ".snapshot" or name.startswith(base + ".snapshot:"):
                snap = name[len(base) + len(".snapshot:") :] if ":" in name else ""
                if snap not in volume.Snapshots and (not snap or _SNAPSHOT_NAME.fullmatch(snap)):
                    volume.Snapshots[snap] = os.path.getsize(full)
                    done.append(f"adopted snapshot {full}")
        for snap in list(volume.Snapshots):
            if not os.path.exists(snapshot_path(location.Filename, snap)):
                del volume.Snapshots[snap]
                done.append(f"forgot snapshot {snap!r} of {location.Filename}: its file is gone")
    return done


class VolumeOps:
    """
    The volume and image methods.
    """

    log = Logger()

    def __init__(self, ctx: ManagerContext, lifecycle: Lifecycle) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle

    def _run(
        self,
        identity: Identity,
        ip: str,
        method: str,
        fn: Callable[[Vm], Any],
        stopped: bool = True,
    ) -> Any:
        """
        Check ownership, then run C{fn(vm)} under the VM's lock (requiring it to be
        stopped unless C{stopped} is False).
        """
        ctx = self.ctx
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, identity, method)
        ctx.require_enabled()

        def locked() -> Any:
            ctx.table.get(ip)
            if stopped and vm.info.State != State.STOPPED:
                raise WrongState(f"VM {ip} is {vm.info.State.value}: stop it first")
            return fn(vm)

        return vm.lock.run(locked)

    # AddVmVolumes, DeleteVmVolume, ChangeVmVolumeSize --------------------------------

    def add_vm_volumes(self, identity: Identity, ip: str, sizes: list[int]) -> Any:
        """
        AddVmVolumes: new thick raw secondary volumes of the given sizes, each placed
        in a volume directory with room for it (spread over the directories when the
        VM has C{SpreadVolumes}).
        """
        if not sizes:
            raise InvalidRequest("VolumeSizes is empty")
        if any(size <= 0 for size in sizes):
            raise InvalidRequest("every volume size must be positive")

        @inlineCallbacks
        def add(vm: Vm) -> Any:
            ctx = self.ctx
            if len(vm.info.Volumes) + len(sizes) > MAX_VOLUMES:
                raise InvalidRequest(f"a VM has at most {MAX_VOLUMES} volumes")
            directories = ctx.stats.reserve_volumes(sizes, vm.info.SpreadVolumes)
            used_names = {os.path.basename(loc.Filename) for loc in vm.local.VolumeLocations}
            new = ctx.table.copy(vm)
            made: list[str] = []
            try:
                n = 0
                for size, directory in zip(sizes, directories):
                    vm_dir = os.path.join(directory, ip)
                    yield ctx.runner.run(os.makedirs, vm_dir, 0o755, True)
                    while f"secondary-volume.{n}" in used_names:
                        n += 1
                    used_names.add(f"secondary-volume.{n}")
                    path = os.path.join(vm_dir, f"secondary-volume.{n}")
                    if (yield ctx.runner.run(_exists, path)):
                        raise WrongState(f"{path} exists already")
                    made.append(path)
                    yield ctx.runner.run(images.make_thick, path, size)
                    new.VmInfo.Volumes.append(Volume(Size=size))
                    new.VolumeLocations.append(
                        VolumeLocation(DirectoryToCleanup=vm_dir, Filename=path)
                    )
                yield ctx.table.commit(vm, new)
            except BaseException:
                ctx.stats.release_volumes(directories, sizes, used=False)
                for path in made:
                    yield ctx.runner.run(images.remove_file, path)
                raise
            ctx.stats.release_volumes(directories, sizes, used=True)

        return self._run(identity, ip, "AddVmVolumes", add)

    def delete_vm_volume(self, identity: Identity, ip: str, index: int) -> Any:
        """
        DeleteVmVolume: a secondary volume (index >= 1) and its snapshots.
        """

        @inlineCallbacks
        def delete(vm: Vm) -> Any:
            ctx = self.ctx
            if index < 1 or index >= len(vm.info.Volumes):
                raise InvalidRequest(
                    f"VolumeIndex {index}: VM {ip} has secondary volumes 1 to "
                    f"{len(vm.info.Volumes) - 1}"
                )
            volume = vm.info.Volumes[index]
            path = vm.local.VolumeLocations[index].Filename
            new = ctx.table.copy(vm)
            del new.VmInfo.Volumes[index]
            del new.VolumeLocations[index]
            yield ctx.table.commit(vm, new)  # never referring to a file that is gone
            for name in list(volume.Snapshots) or []:
                yield ctx.runner.run(images.remove_file, snapshot_path(path, name))
            yield ctx.runner.run(images.remove_file, path)
            ctx.stats.refresh()

        return self._run(identity, ip, "DeleteVmVolume", delete)

    def change_vm_volume_size(self, identity: Identity, ip: str, index: int, size: int) -> Any:
        """
        ChangeVmVolumeSize: raw volumes only. Growing allocates the new blocks
        (thick), then grows the ext file system in the volume (or in its single DOS
        partition, extended first) as the reference does (L{growfs}). Shrinking is done only when nothing but zeros lies beyond the new
        size (the reference shrinks the file system first with resize2fs, which
        this hypervisor does not do: it refuses rather than cut data).
        """

        @inlineCallbacks
        def change(vm: Vm) -> Any:
            ctx = self.ctx
            if index < 0 or index >= len(vm.info.Volumes):
                raise InvalidRequest(f"VolumeIndex {index}: VM {ip} has no such volume")
            volume = vm.info.Volumes[index]
            if volume.Format != VolumeFormat.RAW:
                raise InvalidRequest(f"volume {index} is {volume.Format.value}: only raw volumes")
            if size <= 0:
                raise InvalidRequest("VolumeSize must be positive")
            if volume.Snapshots:
                raise WrongState(f"volume {index} has snapshots: discard them first")
            path = vm.local.VolumeLocations[index].Filename
            if size == volume.Size:
                return
            new = ctx.table.copy(vm)
            if size > volume.Size:
                extra = size - volume.Size
                # Room is needed where the volume is (any directory for a volume
                # outside them, e.g. on the memory volumes' tmpfs).
                directory = ctx.stats.reserve(
                    extra, placement.storage_index(ctx.stats.directories, path)
                )
                try:
                    yield ctx.runner.run(images.make_thick, path, size)
                    new.VmInfo.Volumes[index].Size = size
                    yield ctx.table.commit(vm, new)
                except BaseException:
                    ctx.stats.release(directory, extra, used=False)
                    yield ctx.runner.run(_shrink, path, volume.Size)
                    raise
                ctx.stats.release(directory, extra, used=True)
                # As the reference: then grow the file system in it (the volume has
                # grown whatever happens; a failure here is reported, not undone).
                from hypervisor.manager.growfs import grow_file_system

                done = yield ctx.runner.run(grow_file_system, path)
                self.log.info(
                    "VM {ip} volume {i} grown to {size}: {done}",
                    ip=ip,
                    i=index,
                    size=size,
                    done=done,
                )
                return
            data = yield ctx.runner.run(_data_after, path, size)
            if data is not None:
                raise InvalidRequest(
                    f"volume {index} holds data at byte {data}, beyond the new size {size}: "
                    "shrink its file system and partition first"
                )
            new.VmInfo.Volumes[index].Size = size
            yield ctx.table.commit(vm, new)
            yield ctx.runner.run(_shrink, path, size)
            ctx.stats.refresh()

        return self._run(identity, ip, "ChangeVmVolumeSize", change)

    def reorder_vm_volumes(self, identity: Identity, ip: str, indices: list[int]) -> Any:
        """
        ReorderVmVolumes: the volumes in a new order (0 first unless listed), their
        files renamed to match (C{root}, C{secondary-volume.N}) in their directories.
        Refused while any volume has snapshots.
        """

        @inlineCallbacks
        def reorder(vm: Vm) -> Any:
            ctx = self.ctx
            n = len(vm.info.Volumes)
            order = list(indices) if 0 in indices else [0] + list(indices)
            if sorted(order) != list(range(n)):
                raise InvalidRequest(
                    f"VolumeIndices {list(indices)} is not a permutation of the volume "
                    f"indices 0 to {n - 1} (0 may be left out)"
                )
            if any(v.Snapshots for v in vm.info.Volumes):
                raise WrongState(f"VM {ip} has snapshots: discard them first")
            if order == list(range(n)):
                return
            new = ctx.table.copy(vm)
            new.VmInfo.Volumes = [vm.info.Volumes[i] for i in order]
            locations = [vm.local.VolumeLocations[i] for i in order]
            moves = []
            for position, location in enumerate(locations):
                directory = os.path.dirname(location.Filename)
                name = "root" if position == 0 else f"secondary-volume.{position - 1}"
                target = os.path.join(directory, name)
                moves.append((location.Filename, target))
                new.VolumeLocations[position] = VolumeLocation(
                    DirectoryToCleanup=location.DirectoryToCleanup, Filename=target
                )
            yield ctx.runner.run(_rename_all, moves)
            try:
                yield ctx.table.commit(vm, new)
            except BaseException:
                yield ctx.runner.run(_rename_all, [(b, a) for a, b in moves])
                raise

        return self._run(identity, ip, "ReorderVmVolumes", reorder)

    def change_vm_volume_interfaces(
        self, identity: Identity, ip: str, interfaces: list[VolumeInterface]
    ) -> Any:
        """
        ChangeVmVolumeInterfaces: the interface of every volume (virtio or ide: the
        ones this hypervisor attaches).
        """

        def change(vm: Vm) -> Any:
            ctx = self.ctx
            if len(interfaces) != len(vm.info.Volumes):
                raise InvalidRequest(
                    f"{len(interfaces)} interfaces for {len(vm.info.Volumes)} volumes"
                )
            for interface in interfaces:
                if interface not in (VolumeInterface.VIRTIO, VolumeInterface.IDE):
                    raise InvalidRequest(
                        f"volume interface {interface.value!r} is not supported here "
                        "(virtio or ide)"
                    )
            new = ctx.table.copy(vm)
            for volume, interface in zip(new.VmInfo.Volumes, interfaces):
                volume.Interface = interface
            return ctx.table.commit(vm, new)

        return self._run(identity, ip, "ChangeVmVolumeInterfaces", change)

    # Snapshots -----------------------------------------------------------------------

    def snapshot_vm(
        self, identity: Identity, ip: str, name: str, force: bool, root_only: bool
    ) -> Any:
        """
        SnapshotVm: copy each volume (or the root only) to C{<volume>.snapshot[:name]}
        (a reflink where the file system has it), replacing a snapshot of that name.
        """
        _check_name(name)

        @inlineCallbacks
        def snapshot(vm: Vm) -> Any:
            ctx = self.ctx
            if not force and vm.info.State != State.STOPPED:
                raise WrongState(
                    f"VM {ip} is {vm.info.State.value}: stop it or set ForceIfNotStopped"
                )
            count = 1 if root_only else len(vm.info.Volumes)
            new = ctx.table.copy(vm)
            made = []
            try:
                for index in range(count):
                    path = vm.local.VolumeLocations[index].Filename
                    target = snapshot_path(path, name)
                    made.append(target)
                    size = yield ctx.runner.run(_copy_then_rename, path, target)
                    new.VmInfo.Volumes[index].Snapshots[name] = size
                yield ctx.table.commit(vm, new)
            except BaseException:
                for target in made:
                    if name not in vm.info.Volumes[made.index(target)].Snapshots:
                        yield ctx.runner.run(images.remove_file, target)
                raise
            ctx.stats.refresh()

        return self._run(identity, ip, "SnapshotVm", snapshot, stopped=False)

    def restore_vm_from_snapshot(
        self, identity: Identity, ip: str, name: str, force: bool, retain: bool
    ) -> Any:
        """
        RestoreVmFromSnapshot: every volume that has the snapshot gets it back (the
        snapshot renamed over the volume, or copied when C{retain}).
        """
        _check_name(name)

        @inlineCallbacks
        def restore(vm: Vm) -> Any:
            ctx = self.ctx
            if not force and vm.info.State != State.STOPPED:
                raise WrongState(
                    f"VM {ip} is {vm.info.State.value}: stop it or set ForceIfNotStopped"
                )
            indices = [i for i, v in enumerate(vm.info.Volumes) if name in v.Snapshots]
            if not indices:
                raise NotFound(f"VM {ip} has no snapshot {name!r}")
            new = ctx.table.copy(vm)
            for index in indices:
                path = vm.local.VolumeLocations[index].Filename
                source = snapshot_path(path, name)
                if retain:
                    size = yield ctx.runner.run(_copy_then_rename, source, path)
                else:
                    size = new.VmInfo.Volumes[index].Snapshots.pop(name)
                    yield ctx.runner.run(_rename, source, path)
                new.VmInfo.Volumes[index].Size = size
            yield ctx.table.commit(vm, new)

        return self._run(identity, ip, "RestoreVmFromSnapshot", restore, stopped=False)

    def discard_vm_snapshot(self, identity: Identity, ip: str, name: str) -> Any:
        """
        DiscardVmSnapshot: remove the named snapshot's files.
        """
        _check_name(name)

        @inlineCallbacks
        def discard(vm: Vm) -> Any:
            ctx = self.ctx
            indices = [i for i, v in enumerate(vm.info.Volumes) if name in v.Snapshots]
            if not indices:
                raise NotFound(f"VM {ip} has no snapshot {name!r}")
            new = ctx.table.copy(vm)
            for index in indices:
                del new.VmInfo.Volumes[index].Snapshots[name]
            yield ctx.table.commit(vm, new)
            for index in indices:
                path = vm.local.VolumeLocations[index].Filename
                yield ctx.runner.run(images.remove_file, snapshot_path(path, name))
            ctx.stats.refresh()

        return self._run(identity, ip, "DiscardVmSnapshot", discard, stopped=False)

    # Root image history --------------------------------------------------------------

    def replace_vm_image(
        self,
        identity: Identity,
        request: ReplaceVmImageRequest,
        progress: Callable[[str], None],
        upload: Optional[UploadStream] = None,
    ) -> Any:
        """
        ReplaceVmImage: a new root from C{ImageURL} (through the image cache: a
        qcow2 overlay) or from the bytes streamed with the request; the old root is
        kept as C{root.old} unless C{SkipBackup}. A running VM is stopped first and
        started again after; fires with whether the DHCP wait (C{DhcpTimeout} > 0,
        after a restart) timed out.
        """
        ip = request.IpAddress
        if (bool(request.ImageURL) + bool(request.ImageDataSize) + bool(request.ImageName)) != 1:
            raise InvalidRequest("give one of ImageName, ImageURL and image data (ImageDataSize)")
        if request.ImageDataSize and (upload is None or upload.length != request.ImageDataSize):
            raise InvalidRequest("ImageDataSize announces data that did not come with the request")
        if request.ImageURL and urllib.parse.urlparse(request.ImageURL).scheme not in (
            "file",
            "http",
            "https",
        ):
            raise InvalidRequest("ImageURL: only file://, http:// and https:// URLs")
        if request.RoundupPower > 40:
            raise InvalidRequest("RoundupPower must be at most 40")
        # The reference acts on these for its file-system images (ImageName from its own
        # image server): refused rather than ignored, since the root here is a disk image.
        if request.SkipBootloader:
            raise InvalidRequest(
                "SkipBootloader (boot the image's kernel directly) is not supported: this "
                "hypervisor does not take a kernel out of a disk image; leave it unset "
                "(CreateVm's KernelURL and InitrdURL boot a kernel directly)"
            )
        if request.PreDelete:
            raise InvalidRequest(
                "PreDelete (delete the VM's files that the new image lacks) is not "
                "supported: the new image replaces the whole root disk here; leave it unset"
            )
        if request.OverlayFiles:
            raise InvalidRequest(
                "OverlayFiles are not supported: files cannot be written into a disk "
                "image here; leave OverlayFiles empty"
            )

        @inlineCallbacks
        def replace(vm: Vm) -> Any:
            ctx = self.ctx
            was_running = vm.info.State == State.RUNNING
            if vm.info.State not in (State.STOPPED, State.RUNNING):
                raise WrongState(f"VM {ip} is {vm.info.State.value}")
            if was_running:
                ctx.require_libvirt()
            root = vm.local.VolumeLocations[0].Filename
            staged = root + ".new"
            cached = None
            cache = ctx.image_cache
            yield ctx.runner.run(images.remove_file, staged)
            try:
                if request.ImageName:
                    if cache is None:
                        raise InvalidRequest("ImageName needs the image cache")
                    progress("getting image")
                    cached = yield cache.get_named(
                        request.ImageName, float(request.ImageTimeout), progress
                    )
                    volume = yield self._overlay(cached, staged, request, progress)
                elif request.ImageURL:
                    scheme = urllib.parse.urlparse(request.ImageURL).scheme
                    if cache is None and scheme != "file":
                        raise InvalidRequest(
                            "http(s) images need the image cache (-objectCacheDirectory)"
                        )
                    progress("getting image")
                    if cache is not None:
                        cached = yield cache.get(
                            request.ImageURL,
                            ctx.settings.images_directory,
                            float(request.ImageTimeout),
                            progress,
                        )
                        volume = yield self._overlay(cached, staged, request, progress)
                    else:
                        path = yield ctx.runner.run(
                            images.local_image_path,
                            request.ImageURL,
                            ctx.settings.images_directory,
                        )
                        fmt, virtual = yield ctx.runner.run(images.probe_file, path)
                        progress("copying image")
                        yield ctx.runner.run(images.copy_file, path, staged)
                        volume = yield self._sized(staged, fmt, virtual, request)
                else:
                    assert upload is not None
                    header = yield upload.read_exactly(min(HEADER, request.ImageDataSize))
                    fmt, virtual = images.header_format(
                        header, request.ImageDataSize, "the uploaded image"
                    )
                if (
                    request.ImageDataSize
                    and cache is not None
                    and (request.SkipBackup or vm.info.Volumes[0].Format == VolumeFormat.QCOW2)
                ):
                    # Into the image cache by digest, as CreateVm's uploads: the root
                    # is an overlay on the (possibly already) cached bytes. (Not over a
                    # raw root kept as root.old: that format change needs SkipBackup.)
                    progress(
                        f"writing uploaded image ({request.ImageDataSize // MiB} MiB) into "
                        "the image cache"
                    )
                    assert upload is not None
                    cached = yield cache.put_upload(
                        upload, request.ImageDataSize - len(header), header
                    )
                    volume = yield self._overlay(cached, staged, request, progress)
                elif request.ImageDataSize:
                    assert upload is not None
                    progress(f"writing uploaded image ({request.ImageDataSize // MiB} MiB)")
                    yield write_to_file(
                        upload,
                        request.ImageDataSize - len(header),
                        staged,
                        ctx.runner,
                        prefix=header,
                    )
                    if fmt == VolumeFormat.QCOW2:
                        yield ctx.runner.run(images.qemu_img_info, staged, fmt)
                    volume = yield self._sized(staged, fmt, virtual, request)
                old = vm.info.Volumes[0]
                if volume.Format != old.Format and not request.SkipBackup:
                    raise InvalidRequest(
                        f"the new image is {volume.Format.value} and the old one "
                        f"{old.Format.value}: a format change needs SkipBackup"
                    )
                if was_running:
                    progress(f"stopping VM {ip}")
                    yield ctx.table.commit_state(vm, State.STOPPING)
                    yield self.lifecycle.stop_domain(vm, ctx.settings.stop_timeout)
                    yield ctx.table.record_state(vm, State.STOPPED)
                if request.SkipBackup:
                    yield ctx.runner.run(images.remove_file, root + ".old")
                else:
                    yield ctx.runner.run(_rename, root, root + ".old")
                yield ctx.runner.run(_rename, staged, root)
                new = ctx.table.copy(vm)
                volume.Interface = old.Interface
                new.VmInfo.Volumes[0] = volume
                new.VmInfo.ImageURL = request.ImageURL
                new.VmInfo.ImageName = request.ImageName
                yield ctx.table.commit(vm, new)
            except BaseException:
                if upload is not None:
                    upload.discard()
                yield ctx.runner.run(images.remove_file, staged)
                raise
            finally:
                if cached is not None and cache is not None:
                    cache.unpin(cached)
            ctx.stats.refresh()
            if was_running:
                progress(f"starting VM {ip}")
                yield self.lifecycle.start_domain(vm)
                return vm
            return None

        @inlineCallbacks
        def replace_then_wait() -> Any:
            restarted = yield self._run(identity, ip, "ReplaceVmImage", replace, stopped=False)
            if restarted is not None and request.DhcpTimeout > 0:
                timed_out = yield self.lifecycle.wait_for_dhcp(
                    restarted, float(request.DhcpTimeout)
                )
                return bool(timed_out)
            return False

        return replace_then_wait()

    @inlineCallbacks
    def _overlay(
        self,
        cached: Any,
        staged: str,
        request: ReplaceVmImageRequest,
        progress: Callable[[str], None],
    ) -> Any:
        """
        A qcow2 overlay on a cached image at C{staged}; its Volume.
        """
        virtual = cached.virtual_size
        if cached.format == VolumeFormat.RAW:
            virtual = images.round_up(virtual + request.MinimumFreeBytes, request.RoundupPower)
        progress("creating copy-on-write root volume")
        size = yield self.ctx.runner.run(
            images.make_overlay, cached.path, cached.format, staged, virtual
        )
        return Volume(Format=VolumeFormat.QCOW2, Size=size, VirtualSize=virtual)

    @inlineCallbacks
    def _sized(
        self, path: str, fmt: VolumeFormat, virtual: int, request: ReplaceVmImageRequest
    ) -> Any:
        """
        The Volume of a staged root file: raw made thick at its rounded size.
        """
        if fmt == VolumeFormat.RAW:
            size = images.round_up(virtual + request.MinimumFreeBytes, request.RoundupPower)
            yield self.ctx.runner.run(images.make_thick, path, size)
            return Volume(Size=size)
        size = yield self.ctx.runner.run(os.path.getsize, path)
        return Volume(Format=VolumeFormat.QCOW2, Size=size, VirtualSize=virtual)

    def restore_vm_image(self, identity: Identity, ip: str) -> Any:
        """
        RestoreVmImage: C{root.old} back to C{root} (stopped VMs).
        """

        @inlineCallbacks
        def restore(vm: Vm) -> Any:
            ctx = self.ctx
            root = vm.local.VolumeLocations[0].Filename
            if not (yield ctx.runner.run(_exists, root + ".old")):
                raise NotFound(f"VM {ip} has no old root image")
            fmt, virtual = yield ctx.runner.run(_own_format, root + ".old")
            size = yield ctx.runner.run(os.path.getsize, root + ".old")
            new = ctx.table.copy(vm)
            volume = new.VmInfo.Volumes[0]
            volume.Format, volume.Size = fmt, size
            volume.VirtualSize = virtual if fmt == VolumeFormat.QCOW2 else 0
            yield ctx.runner.run(_rename, root + ".old", root)
            yield ctx.table.commit(vm, new)

        return self._run(identity, ip, "RestoreVmImage", restore)

    def discard_vm_old_image(self, identity: Identity, ip: str) -> Any:
        """
        DiscardVmOldImage: remove C{root.old} (and C{kernel.old}, C{initrd.old}).
        """

        @inlineCallbacks
        def discard(vm: Vm) -> Any:
            ctx = self.ctx
            root = vm.local.VolumeLocations[0].Filename
            directory = os.path.dirname(root)
            for name in (root + ".old", "kernel.old", "initrd.old"):
                yield ctx.runner.run(images.remove_file, os.path.join(directory, name))
            ctx.stats.refresh()

        return self._run(identity, ip, "DiscardVmOldImage", discard, stopped=False)
