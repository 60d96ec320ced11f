# -*- test-case-name: tests.test_local_export_real -*-
"""
Local export and import (reference §1.7): C{ExportLocalVm}, C{ImportLocalVm} and
C{CommitImportedVm}, for a root on this host moving a VM between a hypervisor daemon
and something else on the same machine (virsh, or another daemon: a local upgrade
exports from the old daemon and imports into the new one).

Access, as the reference: ExportLocalVm and ImportLocalVm only for callers on a
loopback address (decided by the dispatcher's admission from L{Identity.loopback},
the mark the TLS layer sets and ListVolumeDirectories reads, before the request is
read) who present the root cookie (C{GetRootCookiePath}'s file, 32 random bytes
readable by root only, new at each start; compared in constant time before anything
else is looked at). ExportLocalVm also needs the VM's ownership; CommitImportedVm
is an owner's method from any address.

- ExportLocalVm: a stopped VM -> C{exporting}; the answer is its C{info.json}
  (LocalVmInfo: VmInfo and volume locations) and the bridges of its interfaces. An
  exporting VM can be started again (it stays here) or destroyed (it went
  elsewhere: its addresses are then unregistered here, not freed for another VM).
- ImportLocalVm: the volume files must be regular files (no symbolic link anywhere
  in their path) three levels below one of our volume directories (vm-control puts
  them in C{<volumeDirectory>/import/<pid>/}); each is hard-linked as
  C{<that volume directory>/<IP>/root} (C{secondary-volume.N} for the others). Ours:
  a C{kernel} and C{initrd} beside the first file are linked too (a VM booted by
  direct kernel boot). The VM is created uncommitted, owned by the caller, and
  started. None of its addresses may be in our address pool (so no VM here can be
  given them meanwhile); they are registered at CommitImportedVm.
- An import that fails at any step leaves nothing: C{pending.json} (creating) is
  written before anything else, so even a daemon killed half-way removes the VM at
  its next start (the reconciliation's interrupted-creation rule); a failure seen
  here removes the domain, the links and the VM's directory (the imported files
  themselves are never touched); no address was registered.
"""

from __future__ import annotations

import copy
import hmac
import json
import os
import stat
from dataclasses import dataclass
from typing import Annotated, Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.codec import IPv4Text, MaxLen, field
from hypervisor.errors import AccessDenied, InvalidRequest, WrongState
from hypervisor.manager import capacity, images
from hypervisor.manager.network import bridge_for_subnet
from hypervisor.manager.state import INFO_FILE, PENDING_FILE
from hypervisor.manager.vm import Vm
from hypervisor.model import (
    LocalVmInfo,
    MessageText,
    State,
    VmInfo,
    VmInfoT,
    Volume,
    VolumeLocation,
)

CookieBytes = Annotated[bytes, MaxLen(4096)]
PathList = Annotated[list[Annotated[str, MaxLen(4096)]], MaxLen(128)]
LocalVmInfoT = LocalVmInfo
EXTRA_FILES = ("kernel", "initrd")
LOOPBACK_ONLY = frozenset({"ExportLocalVm", "ImportLocalVm"})
"""Methods refused, before their request is read, to callers not on loopback."""


@dataclass
class ExportLocalVmRequest:
    """
    ExportLocalVm: the VM and the root cookie's bytes.
    """

    IpAddress: IPv4Text = ""
    VerificationCookie: CookieBytes = b""


@dataclass
class ExportLocalVmInfo:
    """
    What an export hands over: the bridges of the VM's interfaces (in order) and its
    C{info.json} (VmInfo and volume locations, flattened as Go's embedded struct).
    """

    Bridges: Annotated[list[Annotated[str, MaxLen(64)]], MaxLen(64)] = field(default_factory=list)
    LocalVmInfo: LocalVmInfoT = field(embed=True, default_factory=LocalVmInfo)


@dataclass
class ExportLocalVmResponse:
    """
    ExportLocalVm's answer.
    """

    Error: MessageText = ""
    VmInfo: ExportLocalVmInfo = field(default_factory=ExportLocalVmInfo)


@dataclass
class ImportLocalVmRequest:
    """
    ImportLocalVm: the VM (Go embeds VmInfo: its fields are the request's) and the
    files of its volumes, root first.
    """

    SkipMemoryCheck: bool = False
    VerificationCookie: CookieBytes = b""
    VmInfo: VmInfoT = field(embed=True, default_factory=VmInfo)
    VolumeFilenames: PathList = field(default_factory=list)


@dataclass
class CommitImportedVmRequest:
    """
    CommitImportedVm: the imported VM.
    """

    IpAddress: IPv4Text = ""


def volume_name(index: int) -> str:
    """
    A volume's file name in its VM's volume directory (Go's C{indexToName}).
    """
    return "root" if index == 0 else f"secondary-volume.{index - 1}"


def read_cookie(path: str) -> bytes:
    """
    The root cookie's bytes (empty if there is none).
    """
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except FileNotFoundError:
        return b""


def check_import_files(
    filenames: list[str], directories: list[str], ip: str
) -> tuple[list[tuple[str, int, str]], dict[str, str], dict[str, tuple[int, int]]]:
    """
    Check the files to import (on a disk thread): each a regular file, no symbolic
    link in its path below the volume directory, three levels below a volume
    directory, and C{<that directory>/<ip>} not there yet.

    @return: (file, size, the directory its link goes to) for each volume; the
        C{kernel}/C{initrd} found beside the first file; the (device, inode) of every
        file checked (L{link_files} makes sure it links those).
    @raise InvalidRequest: a file that does not qualify.
    @raise WrongState: the VM's volume directory exists already.
    """
    known = {os.path.normpath(d) for d in directories}
    out: list[tuple[str, int, str]] = []
    seen: dict[str, tuple[int, int]] = {}
    for filename in filenames:
        if not os.path.isabs(filename) or os.path.normpath(filename) != filename:
            raise InvalidRequest(f"{filename} is not a clean absolute path")
        volume_directory = os.path.dirname(os.path.dirname(os.path.dirname(filename)))
        if volume_directory not in known:
            raise InvalidRequest(f"{filename} not in a volume directory")
        below = os.path.relpath(filename, volume_directory)
        if os.path.realpath(filename) != os.path.join(os.path.realpath(volume_directory), below):
            raise InvalidRequest(f"{filename} has a symbolic link in its path")
        try:
            st = os.lstat(filename)
        except OSError as e:
            raise InvalidRequest(f"{filename}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequest(f"{filename} is not a regular file")
        target = os.path.join(volume_directory, ip)
        if os.path.lexists(target):
            raise WrongState(f"{target} exists already")
        out.append((filename, st.st_size, target))
        seen[filename] = (st.st_dev, st.st_ino)
    extras: dict[str, str] = {}
    if filenames:
        for name in EXTRA_FILES:
            path = os.path.join(os.path.dirname(filenames[0]), name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                extras[name] = path
                seen[path] = (st.st_dev, st.st_ino)
    return out, extras, seen


def link_files(
    links: list[tuple[str, str]], directories: list[str], seen: dict[str, tuple[int, int]]
) -> None:
    """
    Create the VM's volume directories and hard-link each C{(source, destination)}
    (never following a symbolic link); each link must be the regular file checked
    (C{seen}: a file swapped meanwhile is refused). On any failure what this made is
    removed again and the error raised.
    """
    made: list[str] = []
    try:
        for directory in directories:
            os.makedirs(directory, mode=0o755, exist_ok=False)
            made.append(directory)
        for source, destination in links:
            os.link(source, destination, follow_symlinks=False)
            st = os.lstat(destination)
            if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != seen.get(source):
                raise OSError(f"{source} changed while it was imported")
    except OSError as e:
        for directory in made:
            images.remove_tree(directory)
        raise InvalidRequest(f"cannot link the volume files: {e}") from None


class LocalMoves:
    """
    The three methods, over the manager (called by L{hypervisor.api.HypervisorApi}).
    """

    log = Logger()

    def __init__(self, manager: Any) -> None:
        self.manager = manager
        self.ctx = manager.ctx

    @inlineCallbacks
    def _check_cookie(self, cookie: bytes) -> Any:
        """
        Refuse a caller whose cookie is not the root cookie (constant-time compare).
        """
        expected = yield self.ctx.runner.run(read_cookie, self.manager.state.root_cookie_path)
        if len(expected) < 32 or not hmac.compare_digest(bytes(cookie), expected):
            raise AccessDenied("bad verification cookie: you are not root")

    # ExportLocalVm --------------------------------------------------------------------

    @inlineCallbacks
    def export(self, identity: Identity, request: ExportLocalVmRequest) -> Any:
        """
        stopped -> exporting; the VM's LocalVmInfo and bridges.
        """
        ctx = self.ctx
        yield self._check_cookie(request.VerificationCookie)
        vm = ctx.table.get(request.IpAddress)
        ctx.check_owner(vm, identity, "ExportLocalVm")
        yield vm.lock.acquire()
        try:
            ctx.table.get(request.IpAddress)
            if vm.info.State != State.STOPPED:
                raise WrongState("VM is not stopped")
            found = yield ctx.runner.run(ctx.bridges)  # reads /sys: off the reactor
            ids = [vm.info.SubnetId] + list(vm.info.SecondarySubnetIDs)
            bridges = [bridge_for_subnet(ctx.subnets.get(sid), found) for sid in ids]
            yield ctx.table.commit_state(vm, State.EXPORTING)
            self.log.info("VM {ip} exported (by {who})", ip=vm.ip, who=identity.username)
            return ExportLocalVmResponse(
                VmInfo=ExportLocalVmInfo(Bridges=bridges, LocalVmInfo=copy.deepcopy(vm.local))
            )
        finally:
            vm.lock.release()

    # ImportLocalVm --------------------------------------------------------------------

    def _check_addresses(self, info: VmInfo) -> None:
        ctx = self.ctx
        addresses = [info.Address] + list(info.SecondaryAddresses)
        ips: set[str] = set()
        macs: set[str] = set()
        for a in addresses:
            if not a.IpAddress or not a.MacAddress:
                raise InvalidRequest("every address needs an IpAddress and a MacAddress")
            if a.IpAddress in ips:
                raise InvalidRequest(f"duplicate address: {a.IpAddress}")
            if a.MacAddress.lower() in macs:
                raise InvalidRequest(f"duplicate address: {a.MacAddress}")
            ips.add(a.IpAddress)
            macs.add(a.MacAddress.lower())
        if info.Address.IpAddress in ctx.table.vms:
            raise WrongState(f"{info.Address.IpAddress} already exists")
        for a in ctx.table.addresses_in_use():
            if a.IpAddress in ips or a.MacAddress.lower() in macs:
                raise WrongState(f"{a.IpAddress or a.MacAddress} is used by another VM")
        for a in ctx.pool.registered:
            if a.IpAddress in ips:
                raise WrongState(f"{a.IpAddress} is in address pool")
            if a.MacAddress.lower() in macs:
                raise WrongState(f"{a.MacAddress} is in address pool")
        subnet_ids = []
        for a in addresses:
            subnet = ctx.subnets.subnet_of(a.IpAddress)
            if subnet is None:
                raise InvalidRequest(f"no matching subnet for: {a.IpAddress}")
            subnet_ids.append(subnet.Id)
        info.SubnetId = subnet_ids[0]
        info.SecondarySubnetIDs = subnet_ids[1:]

    @inlineCallbacks
    def import_vm(self, identity: Identity, request: ImportLocalVmRequest) -> Any:
        """
        Link the files in, create the VM uncommitted and start it; on any failure
        remove what was made (see the module docstring).
        """
        ctx = self.ctx
        yield self._check_cookie(request.VerificationCookie)
        if not identity.username:
            raise AccessDenied("no authentication data")
        info = copy.deepcopy(request.VmInfo)
        ip = info.Address.IpAddress
        if not request.VolumeFilenames:
            raise InvalidRequest("no volume files to import")
        self._check_addresses(info)
        ctx.require_enabled()
        ctx.require_libvirt()
        files, extras, seen = yield ctx.runner.run(
            check_import_files,
            list(request.VolumeFilenames),
            list(self.manager.storage.directories),
            ip,
        )
        self._check_addresses(info)  # again: the table may have changed meanwhile
        volumes = []
        for index, (_, size, _) in enumerate(files):
            given = info.Volumes[index] if index < len(info.Volumes) else Volume()
            volumes.append(
                Volume(Format=given.Format, Interface=given.Interface, Size=size, Type=given.Type)
            )
        info.Volumes = volumes
        capacity.check_cpu_and_memory(
            ctx.stats,
            ctx.table.usage(),
            info.MilliCPUs,
            info.MemoryInMiB,
            check_available=not request.SkipMemoryCheck,
        )
        info.OwnerUsers = [identity.username]
        info.Uncommitted = True
        info.State = State.STARTING
        info.ChangedStateOn = ctx.now()
        locations = [
            VolumeLocation(DirectoryToCleanup=target, Filename=os.path.join(target, volume_name(i)))
            for i, (_, _, target) in enumerate(files)
        ]
        links = [(source, loc.Filename) for (source, _, _), loc in zip(files, locations)]
        root_target = files[0][2]
        links += [(path, os.path.join(root_target, name)) for name, path in extras.items()]
        directories = list(dict.fromkeys(loc.DirectoryToCleanup for loc in locations))
        vm = Vm(LocalVmInfo(VmInfo=info, VolumeLocations=locations), ctx.state.vms_path + "/" + ip)
        vm.pending = {"Phase": "creating", "Import": "local"}
        vm.kernel = "kernel" in extras
        vm.initrd = "initrd" in extras
        vm.creating = True
        ctx.table.add(vm)
        try:
            yield ctx.runner.run(images.make_directories, vm.directory)
            yield ctx.writer.write(
                os.path.join(vm.directory, PENDING_FILE), json.dumps(vm.pending).encode()
            )
            yield ctx.writer.write(
                os.path.join(vm.directory, INFO_FILE), codec.encode(vm.local, indent=4)
            )
            yield ctx.runner.run(link_files, links, directories, seen)
            yield vm.lock.acquire()
            try:
                yield self.manager.lifecycle.start_domain(vm)
            finally:
                vm.lock.release()
            yield ctx.writer.remove(os.path.join(vm.directory, PENDING_FILE))
            vm.pending = None
            vm.creating = False
        except BaseException as e:
            self.log.warn("import of VM {ip} failed: {e}; removing it", ip=ip, e=e)
            yield self._remove(vm)
            raise
        self.log.info("VM {ip} imported (uncommitted) by {who}", ip=ip, who=identity.username)

    @inlineCallbacks
    def _remove(self, vm: Vm) -> Any:
        """
        Remove a failed import (no address of it was registered).
        """
        vm.creating = False
        yield vm.lock.acquire()
        try:
            if vm.deleted:
                return
            self.ctx.table.record_state(vm, State.DESTROYING, persist=False)
            yield self.manager.lifecycle.remove_vm(vm)
        except Exception as e:
            self.log.error("VM {ip}: removing the failed import failed: {e}", ip=vm.ip, e=e)
        finally:
            vm.lock.release()

    # CommitImportedVm -----------------------------------------------------------------

    @inlineCallbacks
    def commit(self, identity: Identity, request: CommitImportedVmRequest) -> Any:
        """
        The imported VM is ours: C{info.json} says committed, then its addresses are
        registered (the pool's repair at start registers a committed VM's addresses,
        so a crash between the two loses nothing).
        """
        ctx = self.ctx
        vm = ctx.table.get(request.IpAddress)
        ctx.check_owner(vm, identity, "CommitImportedVm")
        yield vm.lock.acquire()
        try:
            ctx.table.get(request.IpAddress)
            if not vm.info.Uncommitted:
                raise WrongState(f"{vm.ip} is already committed")
            if vm.info.State == State.MIGRATING or vm.pending is not None:
                raise WrongState(f"{vm.ip} is not an imported VM")
            new = ctx.table.copy(vm)
            new.VmInfo.Uncommitted = False
            yield ctx.table.commit(vm, new)
            yield ctx.register_addresses([vm.info.Address] + list(vm.info.SecondaryAddresses))
            self.log.info("VM {ip}: import committed", ip=vm.ip)
        finally:
            vm.lock.release()
