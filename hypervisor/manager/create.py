# -*- test-case-name: tests.test_manager_vms -*-
"""
CreateVm: validate, allocate, build the volumes, start, and wait for the
acknowledgement.

Creation is recorded as unfinished until the client has its answer: the VM's
C{pending.json} says C{creating} from before its C{info.json} exists until the VM is
complete (volumes written, started unless C{DoNotStart}); then it says
C{acknowledge} with a deadline, and AcknowledgeVm removes it. At start, a VM still
C{creating} is removed (its domain forced off first), and an unacknowledged one gets
the acknowledge timeout again from the start.

Uploaded bytes (the image, then the user data) are read from an
L{hypervisor.upload.UploadStream} and written straight into the volume on a disk
thread; nothing is spooled.

On any failure the VM is removed in the order of L{Lifecycle.remove_vm}: domain off
first, then files, then addresses, so an address is never free while a domain that
holds it runs.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import urllib.parse
from typing import Any, Callable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.logger import Logger

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.errors import AccessDenied, InsufficientCapacity, InvalidRequest, WrongState
from hypervisor.manager import capacity, images
from hypervisor.manager.context import ManagerContext
from hypervisor.manager.lifecycle import Lifecycle
from hypervisor.manager.network import bridge_for_subnet, parse_ipv4
from hypervisor.manager.state import (
    IDENTITY_CERT_FILE,
    IDENTITY_KEY_FILE,
    INFO_FILE,
    PENDING_FILE,
    USER_DATA_FILE,
)
from hypervisor.manager.vm import Vm
from hypervisor.model import (
    CreateVmRequest,
    CreateVmResponse,
    LocalVmInfo,
    State,
    Subnet,
    Volume,
    VolumeFormat,
    VolumeInterface,
    VolumeLocation,
    VolumeType,
)
from hypervisor.upload import UploadStream, write_to_file
from hypervisor.virt.connection import NotConnected

MiB = 1024 * 1024
MAX_USER_DATA = 64 * MiB
PROGRESS_INTERVAL = 0.5
# Bytes of an uploaded image read before its volume is made: enough for the qcow2
# header fields that matter (magic, version, backing file, size) and the leading
# magic numbers of what is not an image.
HEADER = 32


@inlineCallbacks
def _all(deferreds: list["Deferred[Any]"]) -> Any:
    """
    Wait for every Deferred; then fail with the first failure, if any (all have
    finished by then, so nothing is left running behind the caller's back).
    """
    results = yield DeferredList(deferreds, consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()


def upload_size(request: CreateVmRequest) -> int:
    """
    How many raw bytes follow a CreateVm request (the image, then the user data).
    """
    return max(request.ImageDataSize, 0) + max(request.UserDataSize, 0)


def validate(request: CreateVmRequest, has_upload: bool) -> None:
    """
    Refuse a CreateVm request that cannot work, before anything is allocated.
    """
    info = request.VmInfo
    if info.MemoryInMiB <= 0:
        raise InvalidRequest("MemoryInMiB must be positive")
    if info.MilliCPUs <= 0:
        raise InvalidRequest("MilliCPUs must be positive")
    if info.VirtualCPUs < 0 or request.MinimumFreeBytes < 0 or request.RoundupPower < 0:
        raise InvalidRequest(
            "VirtualCPUs, MinimumFreeBytes and RoundupPower must not be " "negative"
        )
    if request.RoundupPower > 40:
        raise InvalidRequest("RoundupPower must be at most 40")
    if info.ImageName and (info.ImageURL or request.ImageDataSize):
        raise InvalidRequest("give one of ImageName, ImageURL and image data (ImageDataSize)")
    if request.ImageDataSize < 0 or request.UserDataSize < 0:
        raise InvalidRequest("ImageDataSize and UserDataSize must not be negative")
    if request.UserDataSize > MAX_USER_DATA:
        raise InvalidRequest(
            f"UserDataSize {request.UserDataSize} is over the " f"{MAX_USER_DATA}-byte limit"
        )
    if (request.ImageDataSize or request.UserDataSize) and not has_upload:
        raise InvalidRequest(
            "ImageDataSize/UserDataSize announce data that did not come " "with the request"
        )
    if info.ImageURL and urllib.parse.urlparse(info.ImageURL).scheme not in (
        "file",
        "http",
        "https",
    ):
        raise InvalidRequest(
            f"ImageURL {info.ImageURL!r}: only file://, http:// and https:// URLs are supported"
        )
    if request.ImageDataSize and info.ImageURL:
        raise InvalidRequest("give ImageURL or image data (ImageDataSize), not both")
    if (
        not info.ImageURL
        and not info.ImageName
        and not request.ImageDataSize
        and request.MinimumFreeBytes <= 0
    ):
        raise InvalidRequest(
            "give ImageName, ImageURL, image data (ImageDataSize) "
            "or MinimumFreeBytes (an empty root volume)"
        )
    if request.InitrdURL and not request.KernelURL:
        raise InvalidRequest("InitrdURL needs KernelURL")
    for i, volume in enumerate(request.SecondaryVolumes):
        if volume.Size <= 0:
            raise InvalidRequest(f"SecondaryVolumes[{i}].Size must be positive")
        if volume.Format != VolumeFormat.RAW:
            raise InvalidRequest(f"SecondaryVolumes[{i}]: only raw volumes")
    for volume in [Volume()] + request.SecondaryVolumes:
        if volume.Interface not in (VolumeInterface.VIRTIO, VolumeInterface.IDE):
            raise InvalidRequest(
                f"volume interface {volume.Interface.value!r} is not " "supported yet"
            )
    if info.Address.IpAddress:
        parse_ipv4(info.Address.IpAddress, "Address.IpAddress")
    if len(info.SecondarySubnetIDs) > 8:
        raise InvalidRequest("at most 8 secondary subnets")


def check_identity(
    request: CreateVmRequest, creator: str, now: datetime.datetime
) -> tuple[str, Optional[datetime.datetime]]:
    """
    Validate an identity certificate and key given to a new VM (reference §2.4).

    @return: (IdentityName, IdentityExpires), or ("", None) when none was given.
    """
    if not request.IdentityCertificate and not request.IdentityKey:
        return "", None
    if not request.IdentityCertificate or not request.IdentityKey:
        raise InvalidRequest("IdentityCertificate and IdentityKey go together")
    try:
        cert = x509.load_pem_x509_certificate(request.IdentityCertificate)
    except ValueError as e:
        raise InvalidRequest(f"IdentityCertificate is not a PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(request.IdentityKey, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"IdentityKey is not an unencrypted PEM private key: {e}") from None
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if public != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise InvalidRequest("IdentityKey does not match IdentityCertificate")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidRequest("IdentityCertificate is not valid now (expired or not yet " "valid)")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else ""
    if not name:
        raise InvalidRequest("IdentityCertificate has no common name")
    if name == creator:
        raise InvalidRequest("cannot give VM your own identity")
    return name, cert.not_valid_after_utc


def _upload_cached(ctx: ManagerContext, request: CreateVmRequest) -> bool:
    """
    Whether an uploaded image goes into the image cache (the root then a qcow2 overlay
    on it) rather than straight into the root volume.
    """
    return bool(
        request.ImageDataSize and ctx.image_cache is not None and not request.StandaloneRootVolume
    )


class Creator:
    """
    CreateVm.
    """

    log = Logger()

    # How long the bridges read for one create may serve the next ones, when they
    # carry the new VM's subnets (a bridge the subnets lack is always looked for
    # again at once; one removed meanwhile fails the domain's start, as it would
    # a moment later anyway).
    BRIDGES_FRESH = 1.0

    def __init__(self, ctx: ManagerContext, lifecycle: Lifecycle) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle
        self._bridges: Optional[tuple[float, dict[str, int]]] = None

    @inlineCallbacks
    def _check_bridges(self, subnets: list[Subnet]) -> Any:
        """
        Each subnet has a bridge (L{bridge_for_subnet}), from the bridges read within
        L{BRIDGES_FRESH} seconds if they do, else read again (off the reactor).
        """
        ctx = self.ctx
        kept = self._bridges
        if kept is not None and ctx.reactor.seconds() - kept[0] < self.BRIDGES_FRESH:
            try:
                for s in subnets:
                    bridge_for_subnet(s, kept[1])
                return
            except InvalidRequest:
                pass
        read_at = ctx.reactor.seconds()
        found = yield ctx.runner.run(ctx.bridges)  # reads /sys: off the reactor
        self._bridges = (read_at, found)
        for s in subnets:
            bridge_for_subnet(s, found)

    @inlineCallbacks
    def create_vm(
        self,
        identity: Identity,
        request: CreateVmRequest,
        progress: Callable[[str], None] = lambda message: None,
        upload: Optional[UploadStream] = None,
    ) -> Any:
        """
        Create a VM; fires with the final L{CreateVmResponse}. Anything that fails
        leaves nothing behind (and discards the rest of the upload).
        """
        pins: list[Any] = []
        try:
            response = yield self._create(identity, request, progress, upload, pins)
        except BaseException:
            if upload is not None:
                upload.discard()
            raise
        finally:
            cache = self.ctx.image_cache
            for image in pins:
                cache.unpin(image)  # type: ignore[union-attr]
        return response

    @inlineCallbacks
    def _create(
        self,
        identity: Identity,
        request: CreateVmRequest,
        progress: Callable[[str], None],
        upload: Optional[UploadStream],
        pins: list[Any],
    ) -> Any:
        ctx = self.ctx
        ctx.require_enabled()
        if not identity.username:
            raise AccessDenied("no authentication data")
        validate(request, upload is not None)
        if upload is not None and upload.length != upload_size(request):
            raise InvalidRequest(
                f"the request announces {upload_size(request)} bytes of image and user "
                f"data but {upload.length} follow it"
            )
        if not request.DoNotStart:
            ctx.require_libvirt()
        info = request.VmInfo
        identity_name, identity_expires = check_identity(request, identity.username, ctx.now())
        subnet = ctx.subnets.choose(info.SubnetId, identity)
        secondary = [ctx.subnets.choose(sid, identity) for sid in info.SecondarySubnetIDs]
        yield self._check_bridges([subnet] + secondary)
        capacity.check_cpu_and_memory(
            ctx.stats, ctx.table.usage(), info.MilliCPUs, info.MemoryInMiB
        )
        # What the root volume will be.
        image_path = ""
        header = b""
        virtual_size = 0
        cached = None
        scheme = urllib.parse.urlparse(info.ImageURL).scheme if info.ImageURL else ""
        if scheme in ("http", "https") and ctx.image_cache is None:
            raise InvalidRequest(
                f"ImageURL {info.ImageURL!r}: http(s) images need the image cache "
                "(-objectCacheDirectory)"
            )
        if info.ImageName and ctx.image_cache is None:
            raise InvalidRequest("ImageName needs the image cache (-objectCacheDirectory)")
        if (info.ImageURL or info.ImageName) and ctx.image_cache is not None:
            progress("getting image")
            if info.ImageName:
                cached = yield ctx.image_cache.get_named(
                    info.ImageName, float(request.ImageTimeout), progress
                )
            else:
                cached = yield ctx.image_cache.get(
                    info.ImageURL,
                    ctx.settings.images_directory,
                    float(request.ImageTimeout),
                    progress,
                )
            pins.append(cached)
            image_format = cached.format
            if image_format == VolumeFormat.RAW:
                virtual_size = images.round_up(
                    cached.virtual_size + request.MinimumFreeBytes, request.RoundupPower
                )
            else:
                virtual_size = cached.virtual_size
            if request.StandaloneRootVolume:
                root_size = virtual_size if image_format == VolumeFormat.RAW else cached.size
                if image_format == VolumeFormat.RAW:
                    virtual_size = 0
            else:
                # A qcow2 overlay on the cached image: its size is what is reserved.
                image_format = VolumeFormat.QCOW2
                root_size = virtual_size
        elif info.ImageURL:
            image_path, image_format, root_size, virtual_size = yield ctx.runner.run(
                images.inspect_local_image,
                info.ImageURL,
                ctx.settings.images_directory,
                request.MinimumFreeBytes,
                request.RoundupPower,
            )
        elif request.ImageDataSize:
            assert upload is not None
            header = yield upload.read_exactly(min(HEADER, request.ImageDataSize))
            image_format, virtual_size = images.header_format(
                header, request.ImageDataSize, "the uploaded image"
            )
            if image_format == VolumeFormat.RAW:
                root_size = images.round_up(
                    request.ImageDataSize + request.MinimumFreeBytes, request.RoundupPower
                )
                virtual_size = 0
            else:
                root_size = request.ImageDataSize
            if _upload_cached(ctx, request):
                # The bytes go into the image cache (by digest): the root is a qcow2
                # overlay on them, of the size the root would have had.
                virtual_size = root_size if image_format == VolumeFormat.RAW else virtual_size
                image_format = VolumeFormat.QCOW2
                root_size = virtual_size
        else:
            image_format = VolumeFormat.RAW
            root_size = images.round_up(request.MinimumFreeBytes, request.RoundupPower)
        kernel_path = initrd_path = ""
        if request.KernelURL:
            kernel_path = yield ctx.runner.run(
                images.local_image_path,
                request.KernelURL,
                ctx.settings.images_directory,
                "KernelURL",
            )
        if request.InitrdURL:
            initrd_path = yield ctx.runner.run(
                images.local_image_path,
                request.InitrdURL,
                ctx.settings.images_directory,
                "InitrdURL",
            )
        # Persistent volumes are placed one by one (StorageIndices pin, SpreadVolumes
        # spreads); memory volumes go to the tmpfs and are not counted here.
        persistent = [0] + [
            i + 1 for i, v in enumerate(request.SecondaryVolumes) if v.Type != VolumeType.MEMORY
        ]
        # The root's directory also holds the kernel and initrd of direct kernel boot.
        beside_root = 0
        for path in (kernel_path, initrd_path):
            if path:
                beside_root += yield ctx.runner.run(os.path.getsize, path)
        sizes = [
            root_size + beside_root if i == 0 else request.SecondaryVolumes[i - 1].Size
            for i in persistent
        ]
        pinned_to = [
            request.StorageIndices[i] if i < len(request.StorageIndices) else None
            for i in persistent
        ]
        in_memory = sum(v.Size for v in request.SecondaryVolumes if v.Type == VolumeType.MEMORY)
        if in_memory:
            _, available = ctx.stats.memory()
            if in_memory // MiB + info.MemoryInMiB > available:
                raise InsufficientCapacity(
                    f"memory volumes of {in_memory // MiB} MiB and {info.MemoryInMiB} MiB of "
                    f"VM memory do not fit in the {available} MiB available"
                )
        chosen = ctx.stats.reserve_volumes(sizes, info.SpreadVolumes, pinned_to)
        directories = dict(zip(persistent, chosen))
        try:
            addresses = yield ctx.allocate_addresses([subnet] + secondary, info.Address.IpAddress)
        except BaseException:
            ctx.stats.release_volumes(chosen, sizes, used=False)
            raise
        vm = self._new_vm(
            identity,
            request,
            subnet.Id,
            addresses,
            directories,
            image_format,
            root_size,
            virtual_size,
            identity_name,
            identity_expires,
        )
        ip = vm.ip
        if ip in ctx.table.vms:  # the pool prevents this
            ctx.stats.release_volumes(chosen, sizes, used=False)
            yield ctx.release_addresses(addresses)
            raise WrongState(f"VM {ip} exists already")
        ctx.table.add(vm)
        vm.creating = True  # the reconciliation leaves it to us until we are done
        reserved = True
        acknowledgement: Optional[dict[str, Any]] = None  # written with info.json
        yield vm.lock.acquire()
        try:
            yield self._build(
                vm,
                request,
                image_path,
                header,
                kernel_path,
                initrd_path,
                progress,
                upload,
                cached,
                pins,
            )
            ctx.stats.release_volumes(chosen, sizes, used=True)
            reserved = False
            if request.DoNotStart:
                # Stopped, and awaiting its acknowledgement from now: info.json and
                # pending.json in one group (one directory flush).
                path, data, mode, acknowledgement = self.lifecycle.acknowledgement_file(vm)
                yield ctx.table.commit_state(vm, State.STOPPED, also=[(path, data, mode)])
            else:
                progress(f"starting VM {ip}")
                yield self.lifecycle.start_domain(vm)
        except BaseException as e:
            if reserved:
                ctx.stats.release_volumes(chosen, sizes, used=False)
            yield self._undo(vm, e)
            raise
        finally:
            vm.lock.release()
        timed_out = False
        if request.DhcpTimeout > 0 and not request.DoNotStart:
            timed_out = yield self.lifecycle.wait_for_dhcp(vm, float(request.DhcpTimeout))
        yield vm.lock.acquire()
        try:
            if vm.deleted:
                raise WrongState(f"VM {ip} was removed while it was being created")
            yield self.lifecycle.await_acknowledgement(vm, acknowledgement)
        except BaseException as e:
            yield self._undo(vm, e)
            raise
        finally:
            vm.lock.release()
        yield ctx.pool_on_disk()  # written in the background since the allocation
        vm.creating = False
        return CreateVmResponse(DhcpTimedOut=timed_out, Final=True, IpAddress=ip)

    def _new_vm(
        self,
        identity: Identity,
        request: CreateVmRequest,
        subnet_id: str,
        addresses: list[Any],
        directories: dict[int, str],
        image_format: VolumeFormat,
        root_size: int,
        virtual_size: int,
        identity_name: str,
        identity_expires: Optional[datetime.datetime],
    ) -> Vm:
        ctx = self.ctx
        info = request.VmInfo
        address = addresses[0]
        ip = address.IpAddress
        now = ctx.now()
        new = copy.deepcopy(info)
        new.Address = address
        new.SecondaryAddresses = addresses[1:]
        new.SubnetId = subnet_id
        owners = [identity.username] + [u for u in info.OwnerUsers if u != identity.username]
        new.OwnerUsers = list(dict.fromkeys(owners))
        new.OwnerGroups = list(dict.fromkeys(info.OwnerGroups))
        new.CreatedOn = now
        new.ChangedStateOn = now
        new.State = State.STOPPED if request.DoNotStart else State.STARTING
        new.Uncommitted = False
        new.IdentityName = identity_name
        new.IdentityExpires = identity_expires
        new.Volumes = [Volume(Format=image_format, Size=root_size)] + [
            Volume(Size=v.Size, Interface=v.Interface, Type=v.Type)
            for v in request.SecondaryVolumes
        ]
        if image_format == VolumeFormat.QCOW2:
            new.Volumes[0].VirtualSize = virtual_size
        vm_volume_dir = os.path.join(directories[0], ip)
        memory_dir = os.path.join(ctx.settings.memory_volume_directory, ip)
        locations = [
            VolumeLocation(
                DirectoryToCleanup=vm_volume_dir, Filename=os.path.join(vm_volume_dir, "root")
            )
        ]
        for i, volume in enumerate(request.SecondaryVolumes):
            if volume.Type == VolumeType.MEMORY:
                where = memory_dir
            else:
                where = os.path.join(directories[i + 1], ip)
            locations.append(
                VolumeLocation(
                    DirectoryToCleanup=where, Filename=os.path.join(where, f"secondary-volume.{i}")
                )
            )
        local = LocalVmInfo(VmInfo=new, VolumeLocations=locations)
        vm = Vm(local, os.path.join(ctx.state.vms_path, ip))
        vm.pending = {"Phase": "creating"}
        vm.kernel = bool(request.KernelURL)
        vm.initrd = bool(request.InitrdURL)
        return vm

    @inlineCallbacks
    def _build(
        self,
        vm: Vm,
        request: CreateVmRequest,
        image_path: str,
        header: bytes,
        kernel_path: str,
        initrd_path: str,
        progress: Callable[[str], None],
        upload: Optional[UploadStream],
        cached: Optional[Any] = None,
        pins: Optional[list[Any]] = None,
    ) -> Any:
        """
        Write the VM's files: C{pending.json} (creating) before anything else, then
        C{info.json}, then the volume directory and the volumes.
        """
        ctx = self.ctx
        writer = ctx.writer
        volume_dir = os.path.dirname(vm.local.VolumeLocations[0].Filename)
        yield ctx.runner.run(images.make_directories, vm.directory)
        yield writer.write(
            os.path.join(vm.directory, PENDING_FILE), json.dumps(vm.pending).encode()
        )
        # With pending.json on disk, the rest may be written in any order (a crash
        # leaves an unfinished creation that the next start removes): one group of
        # files with one directory flush, on disk (info.json names the volumes to
        # clean up) before any volume is made.
        stored = dataclasses.replace(request, IdentityKey=b"")  # the key is never stored here
        files = [
            (os.path.join(vm.directory, INFO_FILE), codec.encode(vm.local, indent=4), 0o644),
            (
                os.path.join(vm.directory, "create-request.json"),
                codec.encode(stored, indent=4),
                0o644,
            ),
        ]
        if request.IdentityCertificate:
            files.append(
                (os.path.join(vm.directory, IDENTITY_CERT_FILE), request.IdentityCertificate, 0o644)
            )
            files.append(
                (os.path.join(vm.directory, IDENTITY_KEY_FILE), request.IdentityKey, 0o600)
            )
        try:
            yield _all(
                [writer.write_all(files), ctx.runner.run(images.make_directories, volume_dir)]
            )
            root = vm.local.VolumeLocations[0].Filename
            root_volume = vm.info.Volumes[0]
            last = [0.0]

            def report(done: int, total: int) -> None:
                now = ctx.reactor.seconds()
                if now - last[0] >= PROGRESS_INTERVAL or done == total:
                    last[0] = now
                    progress(f"copied {done // MiB} of {total // MiB} MiB")

            def report_from_thread(done: int, total: int) -> None:
                ctx.runner.from_thread(report, done, total)

            if cached is not None and request.StandaloneRootVolume:
                progress("copying image")
                how = yield ctx.runner.run(
                    images.clone_or_copy, cached.path, root, report_from_thread
                )
                self.log.debug("root of {ip}: {how} of {d}", ip=vm.ip, how=how, d=cached.digest)
            elif cached is not None:
                yield self._overlay_root(vm, cached, progress)
            elif image_path:
                progress(f"copying image {os.path.basename(image_path)}")
                yield ctx.runner.run(images.copy_file, image_path, root, report_from_thread)
            elif request.ImageDataSize and _upload_cached(ctx, request):
                assert upload is not None and ctx.image_cache is not None
                progress(
                    f"writing uploaded image ({request.ImageDataSize // MiB} MiB) into the "
                    "image cache"
                )
                image = yield ctx.image_cache.put_upload(
                    upload, request.ImageDataSize - len(header), header, report
                )
                if pins is not None:
                    pins.append(image)
                else:
                    ctx.image_cache.unpin(image)
                yield self._overlay_root(vm, image, progress)
            elif request.ImageDataSize:
                assert upload is not None
                progress(f"writing uploaded image ({request.ImageDataSize // MiB} MiB)")
                yield write_to_file(
                    upload,
                    request.ImageDataSize - len(header),
                    root,
                    ctx.runner,
                    report,
                    prefix=header,
                )
                if root_volume.Format == VolumeFormat.QCOW2:
                    yield ctx.runner.run(images.qemu_img_info, root, VolumeFormat.QCOW2)
            else:
                progress(f"creating empty root volume of {root_volume.Size // MiB} MiB")
            if root_volume.Format == VolumeFormat.RAW:
                yield ctx.runner.run(images.make_thick, root, root_volume.Size)
            if request.UserDataSize:
                assert upload is not None
                user_data = yield upload.read_exactly(request.UserDataSize)
                yield writer.write(
                    os.path.join(vm.directory, USER_DATA_FILE), user_data, mode=0o600
                )
            if request.SecondaryVolumes:
                progress("creating secondary volumes")
            memory_dirs = {
                os.path.dirname(location.Filename)
                for volume, location in zip(vm.info.Volumes[1:], vm.local.VolumeLocations[1:])
                if volume.Type == VolumeType.MEMORY
            }
            for directory in sorted(memory_dirs):
                yield ctx.runner.run(images.ensure_tmpfs, os.path.dirname(directory))
                yield ctx.runner.run(images.make_directories, directory)
            other_dirs = {
                os.path.dirname(location.Filename)
                for volume, location in zip(vm.info.Volumes[1:], vm.local.VolumeLocations[1:])
                if volume.Type != VolumeType.MEMORY
            } - {volume_dir}
            for directory in sorted(other_dirs):  # placed in other volume directories
                yield ctx.runner.run(images.make_directories, directory)
            for volume, location in zip(vm.info.Volumes[1:], vm.local.VolumeLocations[1:]):
                yield ctx.runner.run(images.make_thick, location.Filename, volume.Size)
            if kernel_path:
                progress("copying kernel")
                yield ctx.runner.run(
                    images.copy_file, kernel_path, os.path.join(volume_dir, "kernel")
                )
            if initrd_path:
                yield ctx.runner.run(
                    images.copy_file, initrd_path, os.path.join(volume_dir, "initrd")
                )
        except BaseException as e:
            error: Optional[BaseException] = e
        else:
            error = None
        if error is not None:
            raise error
        self.log.info("VM {ip} created in {dir}", ip=vm.ip, dir=volume_dir)

    @inlineCallbacks
    def _overlay_root(self, vm: Vm, base: Any, progress: Callable[[str], None]) -> Any:
        """
        Make the VM's root a qcow2 overlay on a cached image, and record its size.
        """
        ctx = self.ctx
        progress("creating copy-on-write root volume")
        root_volume = vm.info.Volumes[0]
        root_volume.Size = yield ctx.runner.run(
            images.make_overlay,
            base.path,
            base.format,
            vm.local.VolumeLocations[0].Filename,
            root_volume.VirtualSize,
        )
        vm.changed()
        yield ctx.writer.write(
            os.path.join(vm.directory, INFO_FILE), codec.encode(vm.local, indent=4)
        )

    @inlineCallbacks
    def _undo(self, vm: Vm, error: BaseException) -> Any:
        """
        Remove a VM whose creation failed (domain first, then files, then addresses).
        If libvirt went away while it was starting the domain, whether the domain runs
        is unknown: the VM stays (still marked C{creating}) and the reconciliation
        after the reconnect removes it, domain first. Likewise if removing fails.
        """
        vm.creating = False  # what is left of it is the reconciliation's now
        if vm.deleted:
            return
        if isinstance(error, NotConnected) and vm.info.State == State.STARTING:
            self.log.warn(
                "CreateVm {ip} failed ({e}): whether its domain started is "
                "unknown; it is removed once libvirt is back",
                ip=vm.ip,
                e=error,
            )
            return
        self.log.warn("CreateVm {ip} failed ({e}): removing what was made", ip=vm.ip, e=error)
        domain = bool(vm.domain_uuid)
        self.ctx.table.record_state(vm, State.DESTROYING, persist=False)
        try:
            yield self.lifecycle.remove_vm(vm, domain=domain)
        except Exception as e:
            self.log.error(
                "VM {ip}: removing the failed creation failed too ({e}); it is "
                "removed when libvirt and the disk allow (at the latest at the "
                "next start)",
                ip=vm.ip,
                e=e,
            )
