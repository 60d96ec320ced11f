# -*- test-case-name: tests.test_manager_state -*-
"""
State keeping: the VMs in memory, their persistence, the indexes the network services
read, and who is told about changes.

How a change is made durable (the rule every mutation follows):

- L{VmTable.commit}: for a change a caller asked for and nothing outside this daemon
  has acted on yet (a tag, a size, a state before libvirt is asked). The new
  C{info.json} is written first; only once it is on disk does memory change and are
  subscribers told. If the write fails the change is refused and nothing changed.
- L{VmTable.record}: for a fact that is already true outside (libvirt started or
  stopped a domain, a guest powered itself off). Memory changes at once (it must match
  reality) and the write is retried every L{RETRY_INTERVAL} seconds until it succeeds;
  the failure is logged, never unwound into destroying or forgetting a VM.

Indexes for the network services (DHCP, metadata): VM by any of its addresses
(primary or secondary), leases by MAC. Listeners (L{IVmListener}) are called
synchronously after every change.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from hypervisor import codec
from hypervisor.diskio import FileWrite, StateWriter
from hypervisor.errors import InvalidRequest, NotFound
from hypervisor.manager.capacity import Usage
from hypervisor.manager.network import Subnets
from hypervisor.manager.updates import UpdateHub
from hypervisor.manager.vm import Vm, ip_sort_key, matches
from hypervisor.model import Address, LocalVmInfo, State, Subnet, Update, VmFilter, VmInfo
from hypervisor.store import StateDirectory

RETRY_INTERVAL = 5.0
INFO_FILE = "info.json"
PENDING_FILE = "pending.json"
USER_DATA_FILE = "user-data.raw"
IDENTITY_CERT_FILE = "identity.cert"
IDENTITY_KEY_FILE = "identity.key"


class IVmListener(Protocol):
    """
    Told synchronously, on the reactor thread, about every change of VMs and subnets
    (DHCP and metadata keep their own views this way).
    """

    def vm_changed(self, info: VmInfo) -> None:
        """
        A VM was added or changed (C{info} is its current VmInfo).
        """

    def vm_removed(self, ip: str, info: VmInfo) -> None:
        """
        The VM with primary IP C{ip} is gone; C{info} is what it was.
        """

    def subnets_changed(self, subnets: list[Subnet]) -> None:
        """
        The subnet table changed (C{subnets} is all of it).
        """


@dataclass(frozen=True)
class Lease:
    """
    What the DHCP server hands a VM's interface: one address of one VM.

    @ivar primary: the VM's primary interface (else a secondary one).
    @ivar vm_ip: the VM's primary IP (its key).
    """

    MacAddress: str
    IpAddress: str
    Hostname: str
    Subnet: Optional[Subnet]
    primary: bool
    vm_ip: str


VolumePair = tuple[str, int]


def volume_pairs(local: LocalVmInfo) -> list[VolumePair]:
    """
    (path, effective size) of each of a VM's volumes: what placement counts as taken.
    """
    return [
        (location.Filename, volume.effective_size)
        for volume, location in zip(local.VmInfo.Volumes, local.VolumeLocations)
    ]


class VmTable:
    """
    The VMs, their files and indexes.

    @ivar vms: VMs by primary IP (deleted ones are removed).
    @ivar listeners: told about changes (L{IVmListener}).
    """

    log = Logger()

    def __init__(
        self,
        state: StateDirectory,
        writer: StateWriter,
        subnets: Subnets,
        hub: UpdateHub,
        reactor: IReactorTime,
    ) -> None:
        self.state = state
        self.writer = writer
        self.subnets = subnets
        self.hub = hub
        self.reactor = reactor
        self.vms: dict[str, Vm] = {}
        self.listeners: list[IVmListener] = []
        self._by_ip: dict[str, Vm] = {}
        self._by_mac: dict[str, tuple[Vm, int]] = {}
        self._dirty: set[Vm] = set()
        self._retry: Optional[IDelayedCall] = None
        self._milli_cpus = 0
        self._memory_mib = 0
        # ListVMs answers by filter, kept until any VM is added, removed or changed
        # (a listing scans every VM and sorts: repeated calls need not).
        self._listings: dict[Any, list[str]] = {}
        # Told (pairs removed, pairs added) of (volume path, effective size) whenever
        # the volumes of the VMs held change (L{add}, L{forget} and L{_apply}: nothing
        # else changes a VM's info or the VMs held): HostStats keeps the bytes VM
        # volumes take per directory by it, instead of summing every VM per create.
        self.volumes_changed: Callable[[Sequence[VolumePair], Sequence[VolumePair]], None] = (
            lambda removed, added: None
        )

    # Loading ----------------------------------------------------------------------

    def load(self) -> None:
        """
        Read every C{VMs/<IP>/info.json} (at start, before the reactor runs). A VM
        whose file is unreadable is reported and left on disk untouched.
        """
        try:
            names = sorted(os.listdir(self.state.vms_path), key=ip_sort_key)
        except FileNotFoundError:
            names = []
        for name in names:
            directory = os.path.join(self.state.vms_path, name)
            path = os.path.join(directory, INFO_FILE)
            repairs: list[str] = []
            try:
                with open(path, "rb") as f:
                    local = codec.decode(LocalVmInfo, f.read(), trusted=True, repairs=repairs)
            except FileNotFoundError:
                self._no_info(directory)
                continue
            except (OSError, codec.DecodeError) as e:
                self.log.error(
                    "cannot load VM from {path}: {e}; it is left on disk "
                    "untouched and not managed",
                    path=path,
                    e=e,
                )
                continue
            if local.VmInfo.Address.IpAddress != name:
                self.log.error(
                    "{path} is for {ip}, not {name}: ignored",
                    path=path,
                    ip=local.VmInfo.Address.IpAddress,
                    name=name,
                )
                continue
            for repair in repairs:
                self.log.warn("{path}: {repair}", path=path, repair=repair)
            vm = Vm(local, directory)
            vm.pending = _read_pending(os.path.join(directory, PENDING_FILE))
            if local.VolumeLocations:
                root_dir = os.path.dirname(local.VolumeLocations[0].Filename)
                vm.kernel = os.path.exists(os.path.join(root_dir, "kernel"))
                vm.initrd = os.path.exists(os.path.join(root_dir, "initrd"))
            self.add(vm)

    def _no_info(self, directory: str) -> None:
        """
        A VM directory without C{info.json}: left by a creation or removal that was
        interrupted (it then holds at most C{pending.json}) and removed; anything
        else is reported and left alone.
        """
        try:
            names = set(os.listdir(directory))
        except OSError:
            return
        if names <= {PENDING_FILE}:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
            self.log.warn(
                "removed {dir}: an interrupted VM creation or removal left it", dir=directory
            )
        else:
            self.log.warn("{dir} has no info.json: ignored (not deleted)", dir=directory)

    # Lookups ----------------------------------------------------------------------

    def get(self, ip: str) -> Vm:
        """
        The VM with this primary IP, or L{NotFound}.
        """
        if not ip:
            raise InvalidRequest("IpAddress is required")
        vm = self.vms.get(ip)
        if vm is None or vm.deleted:
            raise NotFound(f"no VM with IP {ip}")
        return vm

    def by_address(self, ip: str) -> Optional[Vm]:
        """
        The VM holding C{ip} as its primary or a secondary address.
        """
        vm = self._by_ip.get(ip)
        return None if vm is None or vm.deleted else vm

    def lease(self, mac: str) -> Optional[Lease]:
        """
        The lease of the VM interface with this MAC (lower-case, colon-separated).
        """
        found = self._by_mac.get(mac.lower())
        if found is None or found[0].deleted:
            return None
        if found[0].info.State == State.MIGRATING:
            return None  # a VM moving away (or not yet here): the running copy answers
        vm, index = found
        info = vm.info
        if index == 0:
            address, subnet_id = info.Address, info.SubnetId
        else:
            address = info.SecondaryAddresses[index - 1]
            ids = info.SecondarySubnetIDs
            subnet_id = ids[index - 1] if index - 1 < len(ids) else ""
        subnet = self.subnets.subnets.get(subnet_id) if subnet_id else None
        if subnet is None and address.IpAddress:
            subnet = self.subnets.subnet_of(address.IpAddress)
        return Lease(
            MacAddress=address.MacAddress,
            IpAddress=address.IpAddress,
            Hostname=info.Hostname,
            Subnet=subnet,
            primary=index == 0,
            vm_ip=vm.ip,
        )

    def leases(self) -> list[Lease]:
        """
        Every VM interface's lease, by VM IP then interface.
        """
        out = []
        for mac in self._by_mac:
            lease = self.lease(mac)
            if lease is not None:
                out.append(lease)
        return sorted(out, key=lambda lease: (ip_sort_key(lease.vm_ip), not lease.primary))

    def _count(self, info: VmInfo, sign: int) -> None:
        self._milli_cpus += sign * info.MilliCPUs
        self._memory_mib += sign * info.MemoryInMiB

    def usage(self) -> Usage:
        """
        The milliCPUs and memory all VMs hold (kept as VMs come, change and go).
        """
        return Usage(self._milli_cpus, self._memory_mib)

    def addresses_in_use(self) -> list[Address]:
        """
        Every address a VM holds (primary and secondary).
        """
        out = []
        for vm in self.vms.values():
            out.append(vm.info.Address)
            out.extend(vm.info.SecondaryAddresses)
        return out

    def user_data_path(self, ip: str) -> str:
        """
        Where the VM's user data is (the file may not exist).
        """
        return os.path.join(self.get(ip).directory, USER_DATA_FILE)

    def identity_paths(self, ip: str) -> tuple[str, str]:
        """
        The VM's identity certificate and key files (they may not exist).
        """
        directory = self.get(ip).directory
        return (
            os.path.join(directory, IDENTITY_CERT_FILE),
            os.path.join(directory, IDENTITY_KEY_FILE),
        )

    # Membership -------------------------------------------------------------------

    def listing(self, f: VmFilter, sort: bool) -> list[str]:
        """
        The IPs of the VMs matching C{f} (ListVMs), sorted by address if asked; kept
        until a VM is added, removed or changed.
        """
        key = (
            sort,
            f.IgnoreStateMask,
            tuple(f.OwnerGroups),
            tuple(f.OwnerUsers),
            tuple((k, tuple(v)) for k, v in sorted(f.VmTagsToMatch.items())),
        )
        kept = self._listings.get(key)
        if kept is None:
            vms = [vm for vm in self.vms.values() if not vm.deleted and matches(vm.info, f)]
            if sort:
                vms.sort(key=lambda vm: vm.sort_key)
            if len(self._listings) >= 64:  # bounded: filters come from clients
                self._listings.clear()
            kept = self._listings[key] = [vm.ip for vm in vms]
        return list(kept)

    def add(self, vm: Vm) -> None:
        """
        Hold a new VM in memory (its files are written by the caller).
        """
        self._listings.clear()
        held = self.vms.get(vm.ip)
        self.volumes_changed(
            volume_pairs(held.local) if held is not None else (), volume_pairs(vm.local)
        )
        self.vms[vm.ip] = vm
        self._index(vm)
        self._count(vm.info, 1)

    def forget(self, vm: Vm) -> None:
        """
        Drop a deleted VM from memory and tell subscribers and listeners.
        """
        self._dirty.discard(vm)
        self._listings.clear()
        if self.vms.get(vm.ip) is vm:
            del self.vms[vm.ip]
            self.volumes_changed(volume_pairs(vm.local), ())
            if not vm.deleted:
                self._count(vm.info, -1)
        vm.deleted = True
        self._unindex(vm)
        self.hub.publish(Update(HaveVMs=True, VMs={vm.ip: VmInfo()}))
        for listener in list(self.listeners):
            try:
                listener.vm_removed(vm.ip, vm.info)
            except Exception:
                self.log.failure("VM listener {l!r} failed", l=listener)

    def _index(self, vm: Vm) -> None:
        info = vm.info
        for i, address in enumerate([info.Address] + list(info.SecondaryAddresses)):
            if address.IpAddress:
                self._by_ip[address.IpAddress] = vm
            if address.MacAddress:
                self._by_mac[address.MacAddress.lower()] = (vm, i)

    def _unindex(self, vm: Vm) -> None:
        for key in [k for k, v in self._by_ip.items() if v is vm]:
            del self._by_ip[key]
        for key in [k for k, v in self._by_mac.items() if v[0] is vm]:
            del self._by_mac[key]

    # Changes --------------------------------------------------------------------------

    def info_path(self, vm: Vm) -> str:
        """
        The VM's C{info.json}.
        """
        return os.path.join(vm.directory, INFO_FILE)

    def copy(self, vm: Vm) -> LocalVmInfo:
        """
        A copy of the VM's persisted info to change and then L{commit}.
        """
        return copy.deepcopy(vm.local)

    @inlineCallbacks
    def commit(self, vm: Vm, new: LocalVmInfo, also: Sequence[FileWrite] = ()) -> Any:
        """
        Write C{new} as the VM's info; once it is on disk, make it the VM's info and
        tell everyone. On failure (C{OSError}) nothing changed.

        @param also: other files (path, data, mode) written with info.json as one
            group (L{StateWriter.write_all}: one directory flush), in no order.
        """
        info = codec.encode(new, indent=4)
        if also:
            yield self.writer.write_all([(self.info_path(vm), info, 0o644), *also])
        else:
            yield self.writer.write(self.info_path(vm), info)
        self._dirty.discard(vm)
        self._apply(vm, new)

    def commit_state(
        self, vm: Vm, state: State, also: Sequence[FileWrite] = ()
    ) -> "Deferred[None]":
        """
        L{commit} a new state (only C{also} to write if it is the VM's state already).
        """
        if vm.info.State == state and not vm.deleted:
            return self.writer.write_all(list(also)) if also else succeed(None)
        new = self.copy(vm)
        self._stamp(new, state)
        return self.commit(vm, new, also)

    def record(self, vm: Vm, new: LocalVmInfo, persist: bool = True) -> "Deferred[None]":
        """
        Make C{new} the VM's info now (it is already true) and write it, retrying
        until the write succeeds (unless not C{persist}: a VM whose files are being
        removed anyway).

        @return: fires (never fails) after the first attempt, so that a caller can
            answer once the fact is on disk when the disk allows it.
        """
        self._apply(vm, new)
        if persist:
            return self._persist(vm)
        return succeed(None)

    def record_state(self, vm: Vm, state: State, persist: bool = True) -> "Deferred[None]":
        """
        L{record} a new state.
        """
        new = self.copy(vm)
        self._stamp(new, state)
        return self.record(vm, new, persist)

    def _stamp(self, new: LocalVmInfo, state: State) -> None:
        if new.VmInfo.State != state:
            self.log.info(
                "VM {ip}: {old} -> {new}",
                ip=new.VmInfo.Address.IpAddress,
                old=new.VmInfo.State.value,
                new=state.value,
            )
            new.VmInfo.State = state
            new.VmInfo.ChangedStateOn = _now(self.reactor)

    def _apply(self, vm: Vm, new: LocalVmInfo) -> None:
        readdress = (
            new.VmInfo.Address != vm.info.Address
            or new.VmInfo.SecondaryAddresses != vm.info.SecondaryAddresses
        )
        if readdress:
            self._unindex(vm)
        if self.vms.get(vm.ip) is vm:
            if not vm.deleted:
                self._count(vm.info, -1)
                self._count(new.VmInfo, 1)
            removed, added = volume_pairs(vm.local), volume_pairs(new)
            if removed != added:
                self.volumes_changed(removed, added)
        vm.local = new
        vm.changed()
        self._listings.clear()
        if readdress:
            self._index(vm)
        if vm.deleted:
            return
        self.hub.publish(Update(HaveVMs=True, VMs={vm.ip: vm.info}))
        for listener in list(self.listeners):
            try:
                listener.vm_changed(vm.info)
            except Exception:
                self.log.failure("VM listener {l!r} failed", l=listener)

    def _persist(self, vm: Vm) -> "Deferred[None]":
        d = self.writer.write(self.info_path(vm), codec.encode(vm.local, indent=4))

        def failed(failure: Any) -> None:
            if vm.deleted:
                return
            if vm not in self._dirty:
                self.log.error(
                    "cannot write {path}: {why}; the VM is {state} and the write is "
                    "retried every {n:g}s",
                    path=self.info_path(vm),
                    why=failure.getErrorMessage(),
                    state=vm.info.State.value,
                    n=RETRY_INTERVAL,
                )
            self._dirty.add(vm)
            self._schedule_retry()

        def written(_: object) -> None:
            if vm in self._dirty:
                self._dirty.discard(vm)
                self.log.info("{path} written after earlier failures", path=self.info_path(vm))

        return d.addCallbacks(written, failed)

    def _schedule_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            return
        self._retry = self.reactor.callLater(RETRY_INTERVAL, self._retry_dirty)

    def _retry_dirty(self) -> None:
        self._retry = None
        for vm in list(self._dirty):
            if vm.deleted:
                self._dirty.discard(vm)
            else:
                self._persist(vm)

    @property
    def unsaved(self) -> list[str]:
        """
        IPs of VMs whose info.json is behind memory (writes being retried).
        """
        return sorted((vm.ip for vm in self._dirty), key=ip_sort_key)

    def stop(self) -> None:
        """
        Stop retrying (the daemon stops).
        """
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def notify_subnets(self, subnets: list[Subnet]) -> None:
        """
        Tell listeners the subnet table changed.
        """
        for listener in list(self.listeners):
            try:
                listener.subnets_changed(subnets)
            except Exception:
                self.log.failure("VM listener {l!r} failed", l=listener)

    def infos(self, vms: Optional[Iterable[Vm]] = None) -> list[VmInfo]:
        """
        VmInfos of the given (default: all) VMs.
        """
        return [vm.info for vm in (self.vms.values() if vms is None else vms)]


def _read_pending(path: str) -> Optional[dict[str, Any]]:
    """
    The VM's C{pending.json} (an unfinished creation or acknowledgement), if any.
    """
    import json

    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"Phase": "creating"}  # unreadable: treat as the worst case
    return data if isinstance(data, dict) else {"Phase": "creating"}


def _now(reactor: IReactorTime) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)
