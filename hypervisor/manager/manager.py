# -*- test-case-name: tests.test_manager_vms -*-
"""
The C{manager} service: owns the state directory, the VMs, the address pool and the
subnets, and every mutation of them.

- The state directory is the truth: each VM is C{VMs/<IP>/info.json} (plus
  C{create-request.json}), written atomically on every change, before the change is
  reported. libvirt domains are transient and rebuilt from it (see
  L{hypervisor.virt.domainxml}).
- Lifecycle changes come from libvirt events (guest power-off -> stopped, crash ->
  crashed), hopped onto the reactor by the C{libvirt} service.
- At start and after every libvirt reconnect, L{Manager.reconcile} compares the state
  directory with libvirt's domains: a VM that should run and runs is adopted
  untouched, one that should run and does not is started again, C{stopping} and
  C{destroying} are completed, a domain of ours with no state is reported and left
  alone.
- Each VM has its own lock; nothing holds a lock for all VMs across libvirt calls or
  disk I/O. Disk work (volume files) runs on a thread; libvirt calls on the libvirt
  service's pool. Small state files are written synchronously (a few ms).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import IO, Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.errors import (
    AccessDenied,
    HypervisorError,
    InvalidRequest,
    NotFound,
    Unavailable,
    WrongState,
)
from hypervisor.manager import capacity, images
from hypervisor.manager.network import (
    AddressPool,
    Subnets,
    bridge_for_subnet,
    discover_bridges,
    parse_ipv4,
)
from hypervisor.manager.vm import (
    DESTROY_IDLE,
    DESTROY_RUNNING,
    SHOULD_RUN,
    START_FROM,
    STOP_FROM_IDLE,
    STOP_FROM_RUNNING,
    UpdateStream,
    Vm,
    ip_sort_key,
    matches,
)
from hypervisor.model import (
    Address,
    CloudInitDatasource,
    CreateVmRequest,
    CreateVmResponse,
    GetCapacityResponse,
    LocalVmInfo,
    State,
    Subnet,
    Update,
    VmFilter,
    VmInfo,
    Volume,
    VolumeFormat,
    VolumeInterface,
    VolumeLocation,
    VolumeType,
)
from hypervisor.store import StateDirectory, atomic_write
from hypervisor.virt import domains
from hypervisor.virt.connection import LibvirtService
from hypervisor.virt.domainxml import (
    DiskFile,
    DomainSpec,
    build_domain_xml,
    domain_name,
    ip_from_domain_name,
)

SHUTDOWN_POLL_INTERVAL = 0.5
ACKNOWLEDGE_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0
MiB = 1024 * 1024

# libvirt event codes (virDomainEventType / virDomainEventStoppedDetailType)
EVENT_STARTED = 2
EVENT_STOPPED = 5
STOPPED_SHUTDOWN = 0
STOPPED_DESTROYED = 1


def _now(reactor: Any) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)


def detect_volume_directories(mounts: str = "/proc/mounts") -> list[str]:
    """
    The reference's default: C{<mountpoint>/hyper-volumes} for each block-device
    file system (not C{/boot}), one per device.
    """
    seen: set[str] = set()
    out = []
    try:
        with open(mounts) as f:
            for line in f:
                device, mountpoint = line.split()[:2]
                if not device.startswith("/dev/") or device in seen:
                    continue
                if mountpoint.startswith("/boot"):
                    continue
                seen.add(device)
                out.append(os.path.join(mountpoint, "hyper-volumes"))
    except OSError:
        pass
    return out or ["/var/lib/hypervisor-volumes"]


class Manager(Service):
    """
    The VM manager service.

    @ivar state: the state directory.
    @ivar vms: VMs by IP.
    @ivar subnets: the subnet table.
    @ivar pool: the address pool.
    @ivar start_time: reactor time when the service started.
    @ivar stop_vms_on_next_stop: set by the control socket.
    @ivar domains: libvirt's domains by UUID, as last read.
    @ivar domains_current: whether L{domains} reflects a live connection.
    @ivar domain_type: C{"kvm"} or C{"qemu"} once decided, else None.
    @ivar domain_type_reason: why that type was chosen.
    """

    name = "manager"
    log = Logger()

    def __init__(
        self,
        state: StateDirectory,
        libvirt: LibvirtService,
        reactor: Any,
        *,
        domain_type: str = "auto",
        vm_shutdown_timeout: float = 60.0,
        volume_directories: Optional[list[str]] = None,
        images_directory: str = "",
        host: Optional[capacity.IHost] = None,
        bridges: Optional[Callable[[], dict[str, int]]] = None,
        datasource: CloudInitDatasource = CloudInitDatasource.OPENSTACK,
        run_blocking: Optional[Callable[..., "Deferred[Any]"]] = None,
        stop_timeout: float = STOP_TIMEOUT,
        acknowledge_timeout: float = ACKNOWLEDGE_TIMEOUT,
    ) -> None:
        self.state = state
        self.libvirt = libvirt
        self.reactor = reactor
        self.requested_domain_type = domain_type
        self.vm_shutdown_timeout = vm_shutdown_timeout
        self.volume_directories = volume_directories or detect_volume_directories()
        self.images_directory = images_directory
        self.host: capacity.IHost = host or capacity.Host()
        self.bridges = bridges or discover_bridges
        self.datasource = datasource
        self.run_blocking = run_blocking or deferToThread
        self.stop_timeout = stop_timeout
        self.acknowledge_timeout = acknowledge_timeout
        self.start_time: Optional[float] = None
        self.stop_vms_on_next_stop = False
        self.domains: dict[str, domains.DomainSummary] = {}
        self.domains_current = False
        self.domain_type: Optional[str] = None
        self.domain_type_reason = ""
        if domain_type != "auto":
            self.domain_type = domain_type
            self.domain_type_reason = "set by -domainType"
        self.vms: dict[str, Vm] = {}
        self.subnets = Subnets(state.join("subnets.json"))
        self.pool = AddressPool(state.join("address-pool.json"), self.subnets,
                                self._addresses_in_use)
        self.owner_users: frozenset[str] = frozenset()
        self.owner_groups: frozenset[str] = frozenset()
        self.dhcp_acks: Optional[Callable[[str, float], "Deferred[bool]"]] = None
        self._streams: list[UpdateStream] = []
        self._refreshing: Optional[Deferred[None]] = None
        self._refresh_again = False
        self._probing = False
        self._reconciling: Optional[Deferred[None]] = None
        self._next_volume_directory = 0
        self._loaded = False
        libvirt.add_listener(self)

    # Service ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Prepare the state directory and load subnets, pool and VMs, before anything
        else starts (and before twistd drops privileges).

        @raise hypervisor.store.StateDirectoryError: it cannot be used.
        """
        if not self._loaded:
            removed = self.state.prepare()
            for path in removed:
                self.log.warn("removed {path}, left by a daemon that did not stop "
                              "cleanly", path=path)
            self.load()
            self._loaded = True
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Note the start time (the state directory is ready by now).
        """
        if not self._loaded:
            self.privilegedStartService()
        self.start_time = self.reactor.seconds()
        super().startService()
        self.log.info(
            "hypervisor {uuid} started with state directory {path}: {n} VMs, "
            "{s} subnets{disabled}",
            uuid=self.state.uuid, path=self.state.path, n=len(self.vms),
            s=len(self.subnets.subnets),
            disabled=" (disabled: VM creation and starts are refused)"
            if self.state.disabled else "",
        )

    def stopService(self) -> "Deferred[None]":
        """
        Leave VMs running (or power them down after stop-vms-on-next-stop), remove the
        root cookie and release the state directory.
        """
        super().stopService()
        for vm in self.vms.values():
            if vm.ack_timer is not None and vm.ack_timer.active():
                vm.ack_timer.cancel()
        for stream in list(self._streams):
            stream.close()
        if self.stop_vms_on_next_stop:
            d = self.shutdown_vms(self.vm_shutdown_timeout)
            self.libvirt.keep_open_until(d)
        else:
            self.log.info("stopping; VMs keep running")
            d = succeed(None)

        def finish(_: object) -> None:
            self.state.remove_root_cookie()
            self.state.unlock()

        return d.addBoth(finish)

    @property
    def uptime(self) -> float:
        """
        Seconds since the service started.
        """
        if self.start_time is None:
            return 0.0
        return self.reactor.seconds() - self.start_time

    @property
    def disabled(self) -> bool:
        """
        Whether the hypervisor is disabled (C{<stateDir>/disabled} exists).
        """
        return self.state.disabled

    # Loading and persistence -------------------------------------------------

    def load(self) -> None:
        """
        Read subnets, the pool and every C{VMs/<IP>/info.json}. A VM whose file is
        unreadable is reported and left on disk untouched.
        """
        self.subnets.load()
        self.pool.load()
        try:
            names = sorted(os.listdir(self.state.vms_path), key=ip_sort_key)
        except FileNotFoundError:
            names = []
        for name in names:
            directory = os.path.join(self.state.vms_path, name)
            path = os.path.join(directory, "info.json")
            try:
                with open(path, "rb") as f:
                    local = codec.decode(LocalVmInfo, f.read())
            except FileNotFoundError:
                self.log.warn("{dir} has no info.json: ignored (not deleted)", dir=directory)
                continue
            except (OSError, codec.DecodeError) as e:
                self.log.error("cannot load VM from {path}: {e}; it is left on disk "
                               "untouched and not managed", path=path, e=e)
                continue
            if local.VmInfo.Address.IpAddress != name:
                self.log.error("{path} is for {ip}, not {name}: ignored", path=path,
                               ip=local.VmInfo.Address.IpAddress, name=name)
                continue
            self.vms[name] = Vm(local, directory)
        for problem in self.check_invariants():
            self.log.error("address pool: {problem}", problem=problem)

    def _addresses_in_use(self) -> list[Address]:
        out = []
        for vm in self.vms.values():
            out.append(vm.info.Address)
            out.extend(vm.info.SecondaryAddresses)
        return out

    def check_invariants(self) -> list[str]:
        """
        Problems with addresses (free and in use, used twice...), as sentences.
        """
        return self.pool.check_invariants(self._addresses_in_use())

    def _save(self, vm: Vm) -> None:
        """
        Write the VM's info.json atomically, then tell update subscribers.
        """
        atomic_write(os.path.join(vm.directory, "info.json"),
                     codec.encode(vm.local, indent=4))
        self._publish(Update(HaveVMs=True, VMs={vm.ip: vm.info}))

    def _set_state(self, vm: Vm, state: State) -> None:
        if vm.info.State != state:
            self.log.info("VM {ip}: {old} -> {new}", ip=vm.ip, old=vm.info.State.value,
                          new=state.value)
        vm.info.State = state
        vm.info.ChangedStateOn = _now(self.reactor)
        self._save(vm)

    # Updates ---------------------------------------------------------------

    def full_update(self) -> Update:
        """
        The first message of GetUpdates: everything.
        """
        total, available = self.host.memory()
        return Update(
            HaveAddressPool=True, AddressPool=list(self.pool.registered),
            HaveDisabled=True, Disabled=self.disabled,
            MemoryInMiB=total, AvailableMemoryInMiB=available,
            NumCPUs=self.host.num_cpus(), NumFreeAddresses=self.pool.num_free(),
            HaveSubnets=True, Subnets=self.subnets.list(sort=True),
            TotalVolumeBytes=self.total_volume_bytes(),
            HaveVMs=True, VMs={ip: vm.info for ip, vm in self.vms.items()},
        )

    def subscribe_updates(self) -> UpdateStream:
        """
        Start a GetUpdates stream: a full update, then incremental ones.
        """
        stream = UpdateStream(self._streams.remove)
        self._streams.append(stream)
        stream.put(self.full_update())
        return stream

    def _publish(self, update: Update) -> None:
        for stream in list(self._streams):
            stream.put(update)

    def _publish_pool(self) -> None:
        self._publish(Update(HaveAddressPool=True, AddressPool=list(self.pool.registered),
                             NumFreeAddresses=self.pool.num_free()))

    # Capacity ----------------------------------------------------------------

    def total_volume_bytes(self) -> int:
        """
        The summed size of the volume directories' file systems.
        """
        from hypervisor.manager.report import mount_point

        total = 0
        seen = set()
        for directory in self.volume_directories:
            # a directory not made yet counts by the file system it will be on
            existing = directory if os.path.exists(directory) else mount_point(directory)
            try:
                dev = os.stat(existing).st_dev
                size = self.host.storage(existing)[0]
            except OSError:
                continue
            if dev not in seen:
                seen.add(dev)
                total += size
        return total

    def get_capacity(self) -> GetCapacityResponse:
        """
        GetCapacity's numbers.
        """
        total, available = self.host.memory()
        return GetCapacityResponse(AvailableMemoryInMiB=available, MemoryInMiB=total,
                                   NumCPUs=self.host.num_cpus(),
                                   TotalVolumeBytes=self.total_volume_bytes())

    def _pick_volume_directory(self, needed: int) -> str:
        """
        Round-robin over volume directories with room for C{needed} bytes.
        """
        errors = []
        n = len(self.volume_directories)
        for i in range(n):
            directory = self.volume_directories[(self._next_volume_directory + i) % n]
            try:
                os.makedirs(directory, mode=0o755, exist_ok=True)
                capacity.check_storage(self.host, directory, needed)
            except (OSError, HypervisorError) as e:
                errors.append(str(e))
                continue
            self._next_volume_directory = (self._next_volume_directory + i + 1) % n
            return directory
        if len(errors) == 1:
            raise capacity.InsufficientCapacity(errors[0])
        raise capacity.InsufficientCapacity("; ".join(errors))

    # Lookups and access --------------------------------------------------------

    def get_vm(self, ip: str) -> Vm:
        """
        The VM with this IP, or L{NotFound}.
        """
        if not ip:
            raise InvalidRequest("IpAddress is required")
        vm = self.vms.get(ip)
        if vm is None or vm.deleted:
            raise NotFound(f"no VM with IP {ip}")
        return vm

    @staticmethod
    def check_owner(vm: Vm, identity: Identity, method: str) -> None:
        """
        The reference's C{checkAuth}: method power, owner user or owner group.
        """
        if identity.has_method_power(method):
            return
        if identity.username and identity.username in vm.info.OwnerUsers:
            return
        if identity.groups & set(vm.info.OwnerGroups):
            return
        raise AccessDenied(f"no access to VM {vm.ip}")

    def _require_enabled(self) -> None:
        if self.disabled:
            raise Unavailable("Hypervisor is disabled")

    # libvirt listener ------------------------------------------------------

    def libvirt_connected(self) -> None:
        """
        Re-read the domain list, decide the domain type if unknown, reconcile.
        """
        self.refresh_domains()
        if self.domain_type is None and not self._probing:
            self._probe_domain_type()
        elif self.domain_type is not None:
            self.reconcile()

    def libvirt_disconnected(self, reason: str) -> None:
        """
        Mark the domain list as stale until libvirt is back.
        """
        self.domains_current = False

    def domain_lifecycle(self, name: str, uuid: str, event: int, detail: int) -> None:
        """
        A domain changed: update the VM's state from the event; re-read domains.
        """
        self.refresh_domains()
        ip = ip_from_domain_name(name)
        vm = self.vms.get(ip) if ip else None
        if vm is None or vm.deleted or event != EVENT_STOPPED:
            return
        vm.domain_stopped()
        if vm.expecting_stop:
            return
        if vm.info.State not in SHOULD_RUN:
            return
        if detail == STOPPED_SHUTDOWN:
            if vm.info.DestroyOnPowerdown and not vm.info.DestroyProtection:
                self.log.info("VM {ip} powered off and has DestroyOnPowerdown: "
                              "destroying it", ip=vm.ip)
                self._locked(vm, lambda: self._delete_vm(vm))
            else:
                self.log.info("VM {ip} powered itself off", ip=vm.ip)
                self._set_state(vm, State.STOPPED)
        else:
            self.log.warn("VM {ip}: its domain stopped unexpectedly (detail {d})",
                          ip=vm.ip, d=detail)
            self._set_state(vm, State.CRASHED)

    def _locked(self, vm: Vm, fn: Callable[[], Any]) -> "Deferred[Any]":
        d = vm.lock.run(fn)
        d.addErrback(lambda f: self.log.failure("VM {ip}", f, ip=vm.ip))
        return d

    # Domains -----------------------------------------------------------------

    def refresh_domains(self) -> "Deferred[None]":
        """
        Re-read libvirt's domains (one call on the pool); coalesces bursts of events:
        while a read is running, further requests make one more read after it.
        """
        if self._refreshing is not None:
            self._refresh_again = True
            return self._refreshing
        self._refresh_again = False

        def got(summaries: list[domains.DomainSummary]) -> None:
            self.domains = {s.uuid: s for s in summaries}
            self.domains_current = True

        def failed(failure: Any) -> None:
            self.log.warn("cannot list libvirt domains: {why}", why=failure.getErrorMessage())

        def done(_: object) -> None:
            self._refreshing = None
            if self._refresh_again:
                self.refresh_domains()

        d: Deferred[None] = self.libvirt.call(domains.list_domains).addCallbacks(
            got, failed
        )
        if not d.called:
            self._refreshing = d
        d.addBoth(done)
        return d

    def _probe_domain_type(self) -> None:
        self._probing = True
        self.log.info("-domainType auto: probing whether KVM guests run on this host")
        d = self.libvirt.call(domains.probe_kvm)

        def got(result: tuple[bool, str]) -> None:
            usable, reason = result
            self.domain_type = "kvm" if usable else "qemu"
            self.domain_type_reason = reason
            self.log.info(
                "domain type {type}: {reason}", type=self.domain_type, reason=reason
            )
            self.reconcile()

        def failed(failure: Any) -> None:
            self.log.warn("KVM probe failed: {why}; will probe again on reconnect",
                          why=failure.getErrorMessage())

        def done(_: object) -> None:
            self._probing = False

        d.addCallbacks(got, failed).addBoth(done)

    # Reconciliation ----------------------------------------------------------

    def reconcile(self) -> "Deferred[None]":
        """
        Bring libvirt in line with the state directory (see the module docstring).
        """
        if self._reconciling is not None:
            return self._reconciling
        d = self._reconcile()
        self._reconciling = d

        def done(result: object) -> None:
            self._reconciling = None

        d.addErrback(lambda f: self.log.failure("reconciliation failed", f))
        d.addBoth(done)
        return d

    @inlineCallbacks
    def _reconcile(self) -> Any:
        summaries = yield self.libvirt.call(domains.list_domains)
        by_ip = {}
        for s in summaries:
            ip = ip_from_domain_name(s.name)
            if s.ours and ip:
                by_ip[ip] = s
        for ip, s in by_ip.items():
            if ip not in self.vms:
                self.log.warn(
                    "libvirt domain {name} is tagged as ours but {ip} has no state in "
                    "{dir}; left alone (destroy it with virsh if it is not wanted)",
                    name=s.name, ip=ip, dir=self.state.vms_path)
        for vm in list(self.vms.values()):
            summary = by_ip.get(vm.ip)
            active = summary is not None and summary.active
            yield vm.lock.run(self._reconcile_vm, vm, active)

    @inlineCallbacks
    def _reconcile_vm(self, vm: Vm, active: bool) -> Any:
        state = vm.info.State
        if vm.deleted:
            return
        if state in SHOULD_RUN:
            if active:
                if state == State.STARTING:
                    self._set_state(vm, State.RUNNING)
                return
            self.log.warn("VM {ip} should be {state} but its domain is not running: "
                          "starting it", ip=vm.ip, state=state.value)
            try:
                yield self._start_domain(vm)
            except Exception as e:
                self.log.error("VM {ip} failed to start: {e}", ip=vm.ip, e=e)
        elif state == State.STOPPING:
            if active:
                yield self._force_off(vm)
            self.log.info("VM {ip}: completing an interrupted stop", ip=vm.ip)
            self._set_state(vm, State.STOPPED)
        elif state == State.DESTROYING:
            if active:
                yield self._force_off(vm)
            self.log.info("VM {ip}: completing an interrupted destroy", ip=vm.ip)
            yield self._delete_vm(vm)
        elif active:
            self.log.warn("VM {ip} is recorded {state} but its domain runs: now "
                          "recorded running", ip=vm.ip, state=state.value)
            self._set_state(vm, State.RUNNING)

    # Domain operations (libvirt) -----------------------------------------------

    def _domain_spec(self, vm: Vm) -> DomainSpec:
        info = vm.info
        subnet_ids = [info.SubnetId] + list(info.SecondarySubnetIDs)
        bridges_found = self.bridges()
        bridges = [bridge_for_subnet(self.subnets.get(sid), bridges_found)
                   for sid in subnet_ids]
        disks = [
            DiskFile(loc.Filename, volume.Format, volume.Interface)
            for volume, loc in zip(info.Volumes, vm.local.VolumeLocations)
        ]
        root_dir = os.path.dirname(vm.local.VolumeLocations[0].Filename) \
            if vm.local.VolumeLocations else vm.directory
        kernel = os.path.join(root_dir, "kernel")
        initrd = os.path.join(root_dir, "initrd")
        datasource = info.CloudInitDatasource
        if datasource == CloudInitDatasource.DEFAULT:
            datasource = self.datasource
        if self.domain_type is None:
            raise Unavailable("the domain type is not decided yet (KVM probe running); "
                              "try again in a few seconds")
        return DomainSpec(
            domain_type=self.domain_type,
            bootlog=os.path.join(vm.directory, "bootlog"),
            disks=disks,
            bridges=bridges,
            host_cpus=self.host.num_cpus(),
            hypervisor_uuid=self.state.uuid,
            kernel=kernel if os.path.exists(kernel) else "",
            initrd=initrd if os.path.exists(initrd) else "",
            datasource=datasource,
            vnc_socket=os.path.join(vm.directory, "vnc"),
        )

    @inlineCallbacks
    def _start_domain(self, vm: Vm) -> Any:
        """
        starting -> (libvirt createXML) -> running, or failed to start.
        """
        self._set_state(vm, State.STARTING)
        try:
            xml = build_domain_xml(vm.info, self._domain_spec(vm))
            vm.expecting_stop = False
            yield self.libvirt.call(lambda conn: conn.createXML(xml, 0) and None)
        except Exception as e:
            self._set_state(vm, State.FAILED_TO_START)
            message = getattr(e, "get_error_message", lambda: str(e))() or str(e)
            raise WrongState(f"VM {vm.ip} failed to start: {message}") from e
        self._set_state(vm, State.RUNNING)

    @inlineCallbacks
    def _force_off(self, vm: Vm) -> Any:
        vm.expecting_stop = True
        uuid = yield self._domain_uuid(vm)
        if uuid:
            yield self.libvirt.call(domains.force_off, uuid)

    @inlineCallbacks
    def _domain_uuid(self, vm: Vm) -> Any:
        import libvirt

        def lookup(conn: Any) -> Optional[str]:
            try:
                return str(conn.lookupByName(domain_name(vm.ip)).UUIDString())
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return None
                raise

        result = yield self.libvirt.call(lookup)
        return result

    @inlineCallbacks
    def _stop_domain(self, vm: Vm, timeout: float) -> Any:
        """
        ACPI power-down; forced off after C{timeout}; returns when it is off.
        """
        vm.expecting_stop = True
        uuid = yield self._domain_uuid(vm)
        if uuid is None:
            return
        stopped = vm.wait_stopped(self.reactor, timeout)
        requested = yield self.libvirt.call(domains.request_shutdown, uuid)
        if requested:
            done = yield stopped
        else:
            vm.domain_stopped()
            done = True
        active = yield self.libvirt.call(domains.is_active, uuid)
        if active:
            if done:
                self.log.warn("VM {ip}: stop event seen but domain active", ip=vm.ip)
            self.log.info("VM {ip} did not power down within {t:g}s: forcing it off",
                          ip=vm.ip, t=timeout)
            forced = vm.wait_stopped(self.reactor, 30)
            yield self.libvirt.call(domains.force_off, uuid)
            yield forced

    # Deleting ------------------------------------------------------------------

    @inlineCallbacks
    def _delete_vm(self, vm: Vm) -> Any:
        """
        Remove a VM: its files, its directory, and give its addresses back.
        """
        vm.deleted = True
        if vm.ack_timer is not None and vm.ack_timer.active():
            vm.ack_timer.cancel()
        directories = {loc.DirectoryToCleanup for loc in vm.local.VolumeLocations
                       if loc.DirectoryToCleanup}
        for directory in directories:
            yield self.run_blocking(images.remove_tree, directory)
        yield self.run_blocking(images.remove_tree, vm.directory)
        self.vms.pop(vm.ip, None)
        if not vm.info.Uncommitted:
            for address in [vm.info.Address] + list(vm.info.SecondaryAddresses):
                try:
                    self.pool.release(address)
                except OSError as e:
                    self.log.error("cannot return {ip} to the pool: {e}",
                                   ip=address.IpAddress, e=e)
            self._publish_pool()
        self._publish(Update(HaveVMs=True, VMs={vm.ip: VmInfo()}))
        self.log.info("VM {ip} destroyed", ip=vm.ip)

    # CreateVm ------------------------------------------------------------------

    def _validate_create(self, request: CreateVmRequest, has_upload: bool) -> None:
        info = request.VmInfo
        if info.MemoryInMiB <= 0:
            raise InvalidRequest("MemoryInMiB must be positive")
        if info.MilliCPUs <= 0:
            raise InvalidRequest("MilliCPUs must be positive")
        if info.VirtualCPUs < 0 or request.MinimumFreeBytes < 0 or request.RoundupPower < 0:
            raise InvalidRequest("VirtualCPUs, MinimumFreeBytes and RoundupPower must "
                                 "not be negative")
        if request.RoundupPower > 40:
            raise InvalidRequest("RoundupPower must be at most 40")
        if info.ImageName:
            raise InvalidRequest("ImageName needs an image server, which this hypervisor "
                                 "does not use yet; use ImageURL (file://) instead")
        if request.ImageDataSize < 0 or request.UserDataSize < 0:
            raise InvalidRequest("ImageDataSize and UserDataSize must not be negative")
        if (request.ImageDataSize or request.UserDataSize) and not has_upload:
            raise InvalidRequest("ImageDataSize/UserDataSize announce data that did not "
                                 "come with the request")
        if request.ImageDataSize and info.ImageURL:
            raise InvalidRequest("give ImageURL or image data (ImageDataSize), not both")
        if not info.ImageURL and not request.ImageDataSize and request.MinimumFreeBytes <= 0:
            raise InvalidRequest("give ImageURL (a file:// image), image data "
                                 "(ImageDataSize) or MinimumFreeBytes (an empty root "
                                 "volume)")
        if request.InitrdURL and not request.KernelURL:
            raise InvalidRequest("InitrdURL needs KernelURL")
        for i, volume in enumerate(request.SecondaryVolumes):
            if volume.Size <= 0:
                raise InvalidRequest(f"SecondaryVolumes[{i}].Size must be positive")
            if volume.Format != VolumeFormat.RAW:
                raise InvalidRequest(f"SecondaryVolumes[{i}]: only raw volumes")
            if volume.Type == VolumeType.MEMORY:
                raise InvalidRequest(f"SecondaryVolumes[{i}]: memory volumes are not "
                                     "supported yet")
        for volume in [Volume()] + request.SecondaryVolumes:
            if volume.Interface not in (VolumeInterface.VIRTIO, VolumeInterface.IDE):
                raise InvalidRequest(f"volume interface {volume.Interface.value!r} is not "
                                     "supported yet")
        if info.Address.IpAddress:
            parse_ipv4(info.Address.IpAddress, "Address.IpAddress")
        if len(info.SecondarySubnetIDs) > 8:
            raise InvalidRequest("at most 8 secondary subnets")

    @inlineCallbacks
    def create_vm(
        self, identity: Identity, request: CreateVmRequest,
        progress: Callable[[str], None] = lambda message: None,
        upload: Optional[tuple[IO[bytes], int, int]] = None,
    ) -> Any:
        """
        CreateVm: allocate, build volumes, persist, start; return the final
        L{CreateVmResponse}. Anything that fails leaves nothing behind.

        @param upload: (file, offset, length) of the raw image then user data sent
            after the request (ImageDataSize + UserDataSize bytes).
        """
        self._require_enabled()
        if not identity.username:
            raise AccessDenied("no authentication data")
        self._validate_create(request, upload is not None)
        info = request.VmInfo
        subnet = self.subnets.choose(info.SubnetId, identity)
        secondary_subnets = [self.subnets.choose(sid, identity)
                             for sid in info.SecondarySubnetIDs]
        bridges_found = self.bridges()
        for s in [subnet] + secondary_subnets:
            bridge_for_subnet(s, bridges_found)
        capacity.check_cpu_and_memory(self.host, [v.info for v in self.vms.values()],
                                      info.MilliCPUs, info.MemoryInMiB)
        # Sizes of the volumes, to choose a directory with room.
        image_path = kernel_path = initrd_path = ""
        if info.ImageURL:
            image_path = images.local_image_path(info.ImageURL, self.images_directory)
            image_format, image_size = images.image_format(image_path)
            if image_format == VolumeFormat.RAW:
                root_size = images.round_up(image_size + request.MinimumFreeBytes,
                                            request.RoundupPower)
            else:
                root_size = os.path.getsize(image_path)
        elif request.ImageDataSize:
            assert upload is not None
            source, offset, _ = upload
            source.seek(offset)
            image_format, virtual = images.header_format(source.read(32),
                                                         request.ImageDataSize)
            if image_format == VolumeFormat.RAW:
                root_size = images.round_up(request.ImageDataSize + request.MinimumFreeBytes,
                                            request.RoundupPower)
            else:
                root_size = request.ImageDataSize
        else:
            image_format = VolumeFormat.RAW
            root_size = images.round_up(request.MinimumFreeBytes, request.RoundupPower)
        if request.KernelURL:
            kernel_path = images.local_image_path(request.KernelURL, self.images_directory,
                                                  "KernelURL")
        if request.InitrdURL:
            initrd_path = images.local_image_path(request.InitrdURL, self.images_directory,
                                                  "InitrdURL")
        needed = root_size + sum(v.Size for v in request.SecondaryVolumes)
        volume_directory = self._pick_volume_directory(needed)
        # From here on the VM exists: addresses are taken, and undone on failure.
        address = self.pool.allocate(subnet, info.Address.IpAddress)
        taken = [address]
        try:
            for s in secondary_subnets:
                taken.append(self.pool.allocate(s))
        except Exception:
            for a in taken:
                self.pool.release(a)
            raise
        self._publish_pool()
        ip = address.IpAddress
        now = _now(self.reactor)
        new = codec.from_dict(VmInfo, codec.to_dict(info))  # a copy
        new.Address = address
        new.SecondaryAddresses = taken[1:]
        new.SubnetId = subnet.Id
        owners = [identity.username] + [u for u in info.OwnerUsers if u != identity.username]
        new.OwnerUsers = list(dict.fromkeys(owners))
        new.OwnerGroups = list(dict.fromkeys(info.OwnerGroups))
        new.CreatedOn = now
        new.ChangedStateOn = now
        new.State = State.STARTING
        new.Uncommitted = False
        new.Volumes = [Volume(Format=image_format, Size=root_size)] + [
            Volume(Size=v.Size, Interface=v.Interface) for v in request.SecondaryVolumes
        ]
        if image_format == VolumeFormat.QCOW2:
            new.Volumes[0].VirtualSize = (images.image_format(image_path)[1] if image_path
                                          else virtual)
        vm_volume_dir = os.path.join(volume_directory, ip)
        files = [os.path.join(vm_volume_dir, "root")] + [
            os.path.join(vm_volume_dir, f"secondary-volume.{i}")
            for i in range(len(request.SecondaryVolumes))
        ]
        local = LocalVmInfo(VmInfo=new, VolumeLocations=[
            VolumeLocation(DirectoryToCleanup=vm_volume_dir, Filename=f) for f in files
        ])
        vm = Vm(local, os.path.join(self.state.vms_path, ip))
        if ip in self.vms:
            raise WrongState(f"VM {ip} exists already")  # the pool prevents this
        self.vms[ip] = vm
        yield vm.lock.acquire()
        try:
            yield self._build_vm(vm, request, image_path, kernel_path, initrd_path,
                                 progress, upload)
            if request.DoNotStart:
                self._set_state(vm, State.STOPPED)
            else:
                progress(f"starting VM {ip}")
                yield self._start_domain(vm)
        except BaseException as e:
            self.log.warn("CreateVm {ip} failed ({e}): removing what was made", ip=ip, e=e)
            yield self._delete_vm(vm)
            raise
        finally:
            vm.lock.release()
        timed_out = False
        if request.DhcpTimeout > 0 and not request.DoNotStart:
            timed_out = yield self.wait_for_dhcp(vm, float(request.DhcpTimeout))
        vm.ack_timer = self.reactor.callLater(self.acknowledge_timeout,
                                              self._unacknowledged, vm)
        return CreateVmResponse(DhcpTimedOut=timed_out, Final=True, IpAddress=ip)

    @inlineCallbacks
    def _build_vm(self, vm: Vm, request: CreateVmRequest, image_path: str,
                  kernel_path: str, initrd_path: str,
                  progress: Callable[[str], None],
                  upload: Optional[tuple[IO[bytes], int, int]] = None) -> Any:
        ip = vm.ip
        volume_dir = os.path.dirname(vm.local.VolumeLocations[0].Filename)

        def make_directories() -> None:
            os.makedirs(vm.directory, mode=0o755, exist_ok=False)
            os.makedirs(volume_dir, mode=0o755, exist_ok=False)

        yield self.run_blocking(make_directories)
        self._save(vm)
        create_request = codec.to_dict(request)
        create_request.pop("IdentityKey", None)
        atomic_write(os.path.join(vm.directory, "create-request.json"),
                     json.dumps(create_request, indent=4).encode())
        root = vm.local.VolumeLocations[0].Filename
        root_volume = vm.info.Volumes[0]
        last = [0.0]

        def report(done: int, total: int) -> None:
            # from the copying thread: hop to the reactor, at most every 0.5 s
            now = self.reactor.seconds()
            if now - last[0] >= 0.5 or done == total:
                last[0] = now
                self.reactor.callFromThread(
                    progress, f"copied {done // MiB} of {total // MiB} MiB")

        if upload is not None and request.UserDataSize:
            source, offset, _ = upload
            source.seek(offset + request.ImageDataSize)
            user_data = source.read(request.UserDataSize)
            atomic_write(os.path.join(vm.directory, "user-data.raw"), user_data,
                         mode=0o600)
        if image_path or request.ImageDataSize:
            if image_path:
                progress(f"copying image {os.path.basename(image_path)}")
                yield self.run_blocking(images.copy_file, image_path, root, report)
            else:
                assert upload is not None
                progress(f"writing uploaded image ({request.ImageDataSize // MiB} MiB)")
                yield self.run_blocking(images.copy_stream, upload[0], upload[1],
                                        request.ImageDataSize, root, report)
            if root_volume.Format == VolumeFormat.RAW:
                yield self.run_blocking(images.make_thick, root, root_volume.Size)
        else:
            progress(f"creating empty root volume of {root_volume.Size // MiB} MiB")
            yield self.run_blocking(images.make_thick, root, root_volume.Size)
        if request.SecondaryVolumes:
            progress("creating secondary volumes")
        for volume, location in zip(vm.info.Volumes[1:], vm.local.VolumeLocations[1:]):
            yield self.run_blocking(images.make_thick, location.Filename, volume.Size)
        if kernel_path:
            progress("copying kernel")
            yield self.run_blocking(images.copy_file, kernel_path,
                                    os.path.join(volume_dir, "kernel"))
        if initrd_path:
            yield self.run_blocking(images.copy_file, initrd_path,
                                    os.path.join(volume_dir, "initrd"))
        self.log.info("VM {ip} created in {dir}", ip=ip, dir=volume_dir)

    def wait_for_dhcp(self, vm: Vm, timeout: float) -> "Deferred[bool]":
        """
        Wait for the VM's DHCP ACK; fire with True if it timed out.

        Without a DHCP server in this daemon no ACK can be seen: report a time-out at
        once (and say so in the log) rather than claim an ACK.
        """
        if self.dhcp_acks is None:
            self.log.warn("VM {ip}: DhcpTimeout asked but this daemon runs no DHCP "
                          "server yet; reporting DhcpTimedOut", ip=vm.ip)
            return succeed(True)
        d = self.dhcp_acks(vm.info.Address.MacAddress, timeout)
        return d.addCallback(lambda acked: not acked)

    def _unacknowledged(self, vm: Vm) -> None:
        vm.ack_timer = None
        if vm.deleted:
            return
        self.log.warn("VM {ip} was not acknowledged within {t:g}s: destroying it",
                      ip=vm.ip, t=self.acknowledge_timeout)

        @inlineCallbacks
        def destroy() -> Any:
            if vm.info.State in SHOULD_RUN or vm.info.State == State.STOPPING:
                yield self._force_off(vm)
            yield self._delete_vm(vm)

        self._locked(vm, destroy)

    def acknowledge_vm(self, identity: Identity, ip: str) -> None:
        """
        AcknowledgeVm: keep a newly created VM (stop its 15 s auto-destroy).
        """
        vm = self.get_vm(ip)
        self.check_owner(vm, identity, "AcknowledgeVm")
        if vm.ack_timer is not None:
            if vm.ack_timer.active():
                vm.ack_timer.cancel()
            vm.ack_timer = None

    # Lifecycle operations --------------------------------------------------------

    @inlineCallbacks
    def start_vm(self, identity: Identity, ip: str, dhcp_timeout: float = 0) -> Any:
        """
        StartVm; return whether the DHCP wait timed out.
        """
        vm = self.get_vm(ip)
        self.check_owner(vm, identity, "StartVm")
        self._require_enabled()
        yield vm.lock.acquire()
        try:
            self.get_vm(ip)
            vm.require_state(START_FROM, "start")
            _, available = self.host.memory()
            if vm.info.MemoryInMiB >= available:
                raise capacity.InsufficientCapacity(
                    f"not enough free memory to start VM {ip}: {vm.info.MemoryInMiB} MiB "
                    f"needed, {available} MiB available")
            yield self._start_domain(vm)
        finally:
            vm.lock.release()
        if dhcp_timeout > 0:
            timed_out = yield self.wait_for_dhcp(vm, dhcp_timeout)
            return timed_out
        return False

    @inlineCallbacks
    def stop_vm(self, identity: Identity, ip: str) -> Any:
        """
        StopVm: ACPI power-down, forced after the stop timeout; returns once stopped.
        """
        vm = self.get_vm(ip)
        self.check_owner(vm, identity, "StopVm")
        yield vm.lock.acquire()
        try:
            self.get_vm(ip)
            vm.require_state(STOP_FROM_RUNNING | STOP_FROM_IDLE, "stop")
            if vm.info.State in STOP_FROM_RUNNING:
                self._set_state(vm, State.STOPPING)
                yield self._stop_domain(vm, self.stop_timeout)
            self._set_state(vm, State.STOPPED)
        finally:
            vm.expecting_stop = False
            vm.lock.release()

    @inlineCallbacks
    def destroy_vm(self, identity: Identity, ip: str) -> Any:
        """
        DestroyVm: force off (refused with DestroyProtection while running) and remove.
        """
        vm = self.get_vm(ip)
        self.check_owner(vm, identity, "DestroyVm")
        yield vm.lock.acquire()
        try:
            self.get_vm(ip)
            vm.require_state(DESTROY_RUNNING | DESTROY_IDLE, "destroy")
            if vm.info.State in DESTROY_RUNNING:
                if vm.info.DestroyProtection:
                    raise WrongState(f"VM {ip} has DestroyProtection; clear it first")
                self._set_state(vm, State.DESTROYING)
                forced = vm.wait_stopped(self.reactor, 30)
                yield self._force_off(vm)
                yield forced
            yield self._delete_vm(vm)
        finally:
            vm.lock.release()

    @inlineCallbacks
    def reboot_vm(self, identity: Identity, ip: str, dhcp_timeout: float = 0) -> Any:
        """
        RebootVm: send Ctrl-Alt-Del (as the Go hypervisor does); return whether the
        DHCP wait timed out.
        """
        vm = self.get_vm(ip)
        self.check_owner(vm, identity, "RebootVm")
        yield vm.lock.acquire()
        try:
            vm.require_state({State.RUNNING}, "reboot")
            uuid = yield self._domain_uuid(vm)
            if uuid is None:
                raise WrongState(f"VM {ip} has no running domain")

            def send_keys(conn: Any) -> None:
                import libvirt

                # KEY_LEFTCTRL, KEY_LEFTALT, KEY_DELETE
                conn.lookupByUUIDString(uuid).sendKey(
                    libvirt.VIR_KEYCODE_SET_LINUX, 0, [29, 56, 111], 3, 0)

            yield self.libvirt.call(send_keys)
        finally:
            vm.lock.release()
        if dhcp_timeout > 0:
            timed_out = yield self.wait_for_dhcp(vm, dhcp_timeout)
            return timed_out
        return False

    # Reads -----------------------------------------------------------------------

    def get_vm_info(self, ip: str) -> VmInfo:
        """
        GetVmInfo.
        """
        return self.get_vm(ip).info

    def list_vms(self, f: VmFilter, sort: bool = False) -> list[str]:
        """
        ListVMs.
        """
        ips = [ip for ip, vm in self.vms.items() if not vm.deleted and matches(vm.info, f)]
        return sorted(ips, key=ip_sort_key) if sort else ips

    def get_vm_infos(self, f: VmFilter) -> list[VmInfo]:
        """
        GetVmInfos.
        """
        return [self.vms[ip].info for ip in self.list_vms(f, sort=True)]

    def get_vm_create_request(self, identity: Identity, ip: str) -> CreateVmRequest:
        """
        GetVmCreateRequest: the stored request (without IdentityKey).
        """
        vm = self.get_vm(ip)
        self.check_owner(vm, identity, "GetVmCreateRequest")
        path = os.path.join(vm.directory, "create-request.json")
        try:
            with open(path, "rb") as f:
                return codec.decode(CreateVmRequest, f.read())
        except FileNotFoundError:
            raise NotFound(f"VM {ip} has no stored create request") from None

    # Changes ---------------------------------------------------------------------

    def _change(self, identity: Identity, ip: str, method: str,
                fn: Callable[[Vm], None]) -> "Deferred[None]":
        """
        Run C{fn(vm)} under the VM's lock, then persist; a failure changes nothing.
        """
        vm = self.get_vm(ip)
        self.check_owner(vm, identity, method)

        def run() -> None:
            self.get_vm(ip)
            before = codec.to_dict(vm.local)
            try:
                fn(vm)
                self._save(vm)
            except BaseException:
                vm.local = codec.from_dict(LocalVmInfo, before)
                raise

        return vm.lock.run(run)

    def change_vm_size(self, identity: Identity, ip: str, memory_mib: int,
                       milli_cpus: int, virtual_cpus: int) -> "Deferred[None]":
        """
        ChangeVmSize: memory changes need a stopped VM; CPU changes of a running VM
        must keep its vCPU count; increases must fit.
        """
        from hypervisor.virt.domainxml import num_vcpus

        def change(vm: Vm) -> None:
            info = vm.info
            if memory_mib < 0 or milli_cpus < 0 or virtual_cpus < 0:
                raise InvalidRequest("sizes must not be negative")
            new_memory = memory_mib or info.MemoryInMiB
            new_cpus = milli_cpus or info.MilliCPUs
            new_vcpus = virtual_cpus or info.VirtualCPUs
            running = info.State != State.STOPPED
            if new_memory != info.MemoryInMiB and running:
                raise WrongState(f"VM {ip} must be stopped to change its memory")
            if running:
                trial = codec.from_dict(VmInfo, codec.to_dict(info))
                trial.MilliCPUs, trial.VirtualCPUs = new_cpus, new_vcpus
                host_cpus = self.host.num_cpus()
                if num_vcpus(trial, host_cpus) != num_vcpus(info, host_cpus):
                    raise WrongState(f"VM {ip} must be stopped to change its vCPU count")
            others = [v.info for v in self.vms.values() if v is not vm]
            capacity.check_cpu_and_memory(
                self.host, others + [info], max(0, new_cpus - info.MilliCPUs),
                max(0, new_memory - info.MemoryInMiB), check_available=False)
            info.MemoryInMiB, info.MilliCPUs, info.VirtualCPUs = (
                new_memory, new_cpus, new_vcpus)

        return self._change(identity, ip, "ChangeVmSize", change)

    def change_vm_tags(self, identity: Identity, ip: str,
                       tags: dict[str, str]) -> "Deferred[None]":
        """
        ChangeVmTags: replace all tags.
        """
        def change(vm: Vm) -> None:
            vm.info.Tags = dict(tags)

        return self._change(identity, ip, "ChangeVmTags", change)

    def change_vm_owner_users(self, identity: Identity, ip: str,
                              users: list[str]) -> "Deferred[None]":
        """
        ChangeVmOwnerUsers: keep the primary owner, replace the others.
        """
        def change(vm: Vm) -> None:
            primary = vm.info.OwnerUsers[:1]
            vm.info.OwnerUsers = list(dict.fromkeys(primary + [u for u in users if u]))

        return self._change(identity, ip, "ChangeVmOwnerUsers", change)

    def change_vm_owner_groups(self, identity: Identity, ip: str,
                               groups: list[str]) -> "Deferred[None]":
        """
        ChangeVmOwnerGroups: replace the owner groups (duplicates dropped).
        """
        def change(vm: Vm) -> None:
            vm.info.OwnerGroups = list(dict.fromkeys(g for g in groups if g))

        return self._change(identity, ip, "ChangeVmOwnerGroups", change)

    def become_primary_vm_owner(self, identity: Identity, ip: str) -> "Deferred[None]":
        """
        BecomePrimaryVmOwner: the caller becomes OwnerUsers[0].
        """
        if not identity.username:
            raise AccessDenied("no authentication data")

        def change(vm: Vm) -> None:
            others = [u for u in vm.info.OwnerUsers if u != identity.username]
            vm.info.OwnerUsers = [identity.username] + others

        return self._change(identity, ip, "BecomePrimaryVmOwner", change)

    def change_vm_destroy_protection(self, identity: Identity, ip: str,
                                     protect: bool) -> "Deferred[None]":
        """
        ChangeVmDestroyProtection (any state).
        """
        def change(vm: Vm) -> None:
            vm.info.DestroyProtection = protect

        return self._change(identity, ip, "ChangeVmDestroyProtection", change)

    def change_vm_hostname(self, identity: Identity, ip: str,
                           hostname: str) -> "Deferred[None]":
        """
        ChangeVmHostname (served by DHCP option 12 once DHCP lands).
        """
        if hostname and not all(c.isalnum() or c in "-." for c in hostname):
            raise InvalidRequest(f"hostname {hostname!r} has characters other than "
                                 "letters, digits, - and .")
        if len(hostname) > 253:
            raise InvalidRequest("hostname longer than 253 characters")

        def change(vm: Vm) -> None:
            vm.info.Hostname = hostname

        return self._change(identity, ip, "ChangeVmHostname", change)

    # Host administration --------------------------------------------------------

    def set_disabled_state(self, disable: bool) -> None:
        """
        SetDisabledState: create or remove C{<stateDir>/disabled}.
        """
        self.state.set_disabled(disable)
        self.log.info("hypervisor {state}", state="disabled" if disable else "enabled")
        self._publish(Update(HaveDisabled=True, Disabled=disable))

    def change_owners(self, users: list[str], groups: list[str]) -> None:
        """
        ChangeOwners: the hypervisor's owners, in memory (fleet-manager sets them).
        """
        self.owner_users = frozenset(u for u in users if u)
        self.owner_groups = frozenset(g for g in groups if g)
        self.log.info("hypervisor owners: users {u}, groups {g}",
                      u=sorted(self.owner_users), g=sorted(self.owner_groups))

    def change_address_pool(self, to_add: list[Address], to_remove: list[Address],
                            maximum_free: dict[str, int]) -> None:
        """
        ChangeAddressPool.
        """
        self.pool.change(to_add, to_remove, maximum_free)
        self._publish_pool()

    def update_subnets(self, add: list[Subnet], change: list[Subnet],
                       delete: list[str]) -> None:
        """
        UpdateSubnets.
        """
        def in_use(subnet_id: str) -> bool:
            return any(vm.info.SubnetId == subnet_id or subnet_id in vm.info.SecondarySubnetIDs
                       for vm in self.vms.values())

        self.subnets.update(add, change, delete, in_use)
        self._publish(Update(HaveSubnets=True, Subnets=self.subnets.list(sort=True)))

    # Stopping all VMs (stop-vms-on-next-stop) ------------------------------------

    @inlineCallbacks
    def shutdown_vms(self, timeout: float) -> Any:
        """
        Power our running domains down: ACPI first, forced off after C{timeout}
        seconds. The VMs' recorded states are kept (this is for host shutdown): when
        the daemon starts again, reconciliation starts the VMs that were running.
        """
        if not self.libvirt.connected:
            self.log.error(
                "cannot stop VMs: {why}", why=self.libvirt.describe()
            )
            return
        summaries = yield self.libvirt.call(domains.list_domains)
        running = [s for s in summaries if s.ours and s.active]
        if not running:
            self.log.info("stopping VMs: none running")
            return
        self.log.info(
            "stopping {n} VMs (ACPI power-down, forced after {timeout:g}s): {names}",
            n=len(running), timeout=timeout, names=", ".join(s.name for s in running),
        )
        for s in running:
            vm = self.vms.get(s.ip_address or "")
            if vm is not None:
                vm.expecting_stop = True
            try:
                yield self.libvirt.call(domains.request_shutdown, s.uuid)
            except Exception as e:
                self.log.warn("ACPI power-down of {name} failed: {e}", name=s.name, e=e)
        deadline = self.reactor.seconds() + timeout
        remaining = running
        while remaining and self.reactor.seconds() < deadline:
            yield deferLater(self.reactor, SHUTDOWN_POLL_INTERVAL, lambda: None)
            still = []
            for s in remaining:
                active = yield self.libvirt.call(domains.is_active, s.uuid)
                if active:
                    still.append(s)
                else:
                    self.log.info("VM {name} powered down", name=s.name)
            remaining = still
        for s in remaining:
            self.log.warn(
                "VM {name} did not power down within {timeout:g}s: forcing it off",
                name=s.name, timeout=timeout,
            )
            try:
                yield self.libvirt.call(domains.force_off, s.uuid)
            except Exception as e:
                self.log.error("forcing {name} off failed: {e}", name=s.name, e=e)
        self.log.info("all {n} VMs stopped", n=len(running))
