# -*- test-case-name: tests.test_manager_vms -*-
"""
The C{manager} service: owns the state directory, the VMs, the address pool and the
subnets, and every mutation of them. It is assembled from parts a reader can find:

=====================  =====================================================
L{state}               the VMs in memory, their persistence, indexes, listeners
L{lifecycle}           start, stop, reboot, destroy, acknowledge, libvirt events
L{reconcile}           libvirt vs. the state directory; the domain type
L{create}              CreateVm (uploads streamed into the volume)
L{changes}             ChangeVm* and GetVmCreateRequest
L{host}                disabled state, owners, pool, subnets, capacity, updates
L{hoststats}           cached host figures (memory, volume file systems)
=====================  =====================================================

- The state directory is the truth: each VM is C{VMs/<IP>/info.json} (plus
  C{create-request.json}, C{pending.json} while it is being created or awaits its
  acknowledgement), written atomically by the L{hypervisor.diskio.StateWriter} on
  this service's own disk threads; nothing here reads, writes or stats files on the
  reactor thread once the daemon runs (loading at start happens before it runs).
- libvirt domains are transient and rebuilt from the state directory
  (L{hypervisor.virt.domainxml}); lifecycle changes come from libvirt events.
- Each VM has its own lock; nothing holds a lock for all VMs across libvirt calls or
  disk I/O.

The read and observer API for the network services (DHCP, metadata):
L{Manager.lease}, L{Manager.leases}, L{Manager.vm_by_address},
L{Manager.user_data_path}, L{Manager.identity_paths}, L{Manager.add_listener}
(L{hypervisor.manager.state.IVmListener}), and the DHCP acknowledgement seam
(L{hypervisor.manager.acks}) given to the constructor.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hypervisor.diskio import IBlockingRunner, StateWriter, ThreadPoolRunner
from hypervisor.manager import capacity
from hypervisor.manager.acks import DhcpAcknowledgements, IDhcpAcknowledgements
from hypervisor.manager.changes import Changes
from hypervisor.manager.context import (
    ACKNOWLEDGE_TIMEOUT,
    STOP_TIMEOUT,
    ManagerContext,
    Settings,
)
from hypervisor.manager.create import Creator
from hypervisor.manager.host import HostAdmin
from hypervisor.manager.hoststats import HostStats
from hypervisor.manager.lifecycle import Lifecycle
from hypervisor.manager.network import AddressPool, Subnets, discover_bridges
from hypervisor.manager.reconcile import Reconciler
from hypervisor.manager.state import IVmListener, Lease, VmTable, volume_pairs
from hypervisor.manager.updates import UpdateHub
from hypervisor.manager.vm import Vm
from hypervisor.model import Address, CloudInitDatasource, Subnet, VmFilter, VmInfo
from hypervisor.store import StateDirectory
from hypervisor.virt.domains import Domains, IDomains

DISK_THREADS = 4


def detect_volume_directories(mounts: str = "/proc/mounts") -> list[str]:
    """
    The reference's default volume directories: C{<mountpoint>/hyper-volumes} per disk
    (L{hypervisor.manager.placement.detect_volume_directories}).
    """
    from hypervisor.manager.placement import detect_volume_directories as detect

    return detect(mounts)


class Manager(MultiService):
    """
    The VM manager service (its child is its disk thread pool).

    @ivar state: the state directory.
    @ivar table: the VMs (L{VmTable}); C{vms} is its dict by IP.
    @ivar lifecycle, reconciler, creator, changes, admin: the parts.
    @ivar stop_vms_on_next_stop: set by the control socket.
    """

    name = "manager"
    log = Logger()

    def __init__(
        self,
        state: StateDirectory,
        libvirt: Any,
        reactor: IReactorTime,
        *,
        domain_type: str = "auto",
        vm_shutdown_timeout: float = 60.0,
        volume_directories: Optional[list[str]] = None,
        images_directory: str = "",
        host: Optional[capacity.IHost] = None,
        bridges: Optional[Callable[[], dict[str, int]]] = None,
        datasource: CloudInitDatasource = CloudInitDatasource.OPENSTACK,
        runner: Optional[IBlockingRunner] = None,
        domains: Optional[IDomains] = None,
        acks: Optional[IDhcpAcknowledgements] = None,
        stop_timeout: float = STOP_TIMEOUT,
        acknowledge_timeout: float = ACKNOWLEDGE_TIMEOUT,
        write_file: Optional[Callable[[str, Optional[bytes], int], None]] = None,
        image_cache_directory: str = "",
        image_cache_size: int = 10 << 30,
        image_timeout: float = 600.0,
        image_max_size: int = 64 << 30,
        image_tls_policy: Optional[Any] = None,
        image_server: Optional[tuple[str, int, Any]] = None,
        memory_volume_directory: str = "/tmp/hyper-volumes",
    ) -> None:
        super().__init__()
        self.state = state
        self.libvirt = libvirt
        self.reactor = reactor
        if runner is None:
            pool = ThreadPoolRunner(reactor, "manager-disk", DISK_THREADS)
            pool.setServiceParent(self)
            runner = pool
        self.runner = runner
        writer = StateWriter(runner) if write_file is None else StateWriter(runner, write_file)
        self.volume_directories = volume_directories or detect_volume_directories()
        subnets = Subnets(state.join("subnets.json"))
        hub = UpdateHub()
        table = VmTable(state, writer, subnets, hub, reactor)
        pool_ = AddressPool(state.join("address-pool.json"), subnets, table.addresses_in_use)
        self.ctx = ManagerContext(
            state=state,
            table=table,
            pool=pool_,
            subnets=subnets,
            domains=domains if domains is not None else Domains(libvirt),
            stats=HostStats(host or capacity.Host(), self.volume_directories, runner, reactor),
            runner=runner,
            writer=writer,
            hub=hub,
            acks=acks if acks is not None else DhcpAcknowledgements(reactor),
            reactor=reactor,
            settings=Settings(
                vm_shutdown_timeout=vm_shutdown_timeout,
                stop_timeout=stop_timeout,
                acknowledge_timeout=acknowledge_timeout,
                images_directory=images_directory,
                memory_volume_directory=memory_volume_directory,
                datasource=datasource,
                requested_domain_type=domain_type,
            ),
            bridges=bridges or discover_bridges,
        )
        if image_cache_directory:
            from hypervisor.manager.fetch import Fetcher
            from hypervisor.manager.imagecache import ImageCache

            self.ctx.image_cache = ImageCache(
                image_cache_directory,
                image_cache_size,
                runner,
                writer,
                reactor,
                Fetcher(
                    reactor,
                    runner,
                    max_size=image_max_size,
                    timeout=image_timeout,
                    tls_policy=image_tls_policy,
                ),
                self._volume_files,
            )
            if image_server is not None:
                hostname, port, policy = image_server
                self.ctx.image_cache.image_server = (
                    hostname,
                    port,
                    Fetcher(
                        reactor,
                        runner,
                        max_size=image_max_size,
                        timeout=image_timeout,
                        tls_policy=policy,
                    ),
                )
        if domain_type != "auto":
            self.ctx.domain_type = domain_type
            self.ctx.domain_type_reason = "set by -domainType"
        self.table = table
        self.lifecycle = Lifecycle(self.ctx)
        self.reconciler = Reconciler(self.ctx, self.lifecycle)
        self.creator = Creator(self.ctx, self.lifecycle)
        from hypervisor.manager.volumeops import VolumeOps

        self.volumes = VolumeOps(self.ctx, self.lifecycle)
        from hypervisor.manager.storage import VolumeStorage

        self.storage = VolumeStorage(self.volumes)
        from hypervisor.manager.userdata import UserData

        self.user_data = UserData(self.ctx)
        self.changes = Changes(self.ctx)
        self.admin = HostAdmin(self.ctx)
        self.start_time: Optional[float] = None
        self.stop_vms_on_next_stop = False
        self._loaded = False
        self.ctx.domains.add_listener(self)
        self.ctx.stats.allocated = self._volume_allocations
        self.ctx.stats.track = True
        self.table.volumes_changed = self.ctx.stats.volumes_changed

    def _volume_allocations(self) -> list[tuple[str, int]]:
        """
        (path, effective size) of every VM volume: what placement counts as taken.
        """
        return [pair for vm in list(self.table.vms.values()) for pair in volume_pairs(vm.local)]

    def _volume_files(self) -> list[str]:
        """
        Every VM's volume files, with their snapshots and C{root.old} (the image cache
        keeps their backing files).
        """
        from hypervisor.manager.volumeops import snapshot_path

        files = []
        for vm in list(self.table.vms.values()):
            for volume, location in zip(vm.info.Volumes, vm.local.VolumeLocations):
                files.append(location.Filename)
                files.extend(snapshot_path(location.Filename, n) for n in volume.Snapshots)
            if vm.local.VolumeLocations:
                files.append(vm.local.VolumeLocations[0].Filename + ".old")
        return files

    # Shared state, for pages, metrics and tests ------------------------------------

    @property
    def vms(self) -> dict[str, Vm]:
        """
        VMs by primary IP.
        """
        return self.table.vms

    @property
    def subnets(self) -> Subnets:
        """
        The subnet table.
        """
        return self.ctx.subnets

    @property
    def pool(self) -> AddressPool:
        """
        The address pool.
        """
        return self.ctx.pool

    @property
    def host(self) -> HostStats:
        """
        The host's figures (cached; never blocks).
        """
        return self.ctx.stats

    @property
    def writer(self) -> StateWriter:
        """
        The state file writer.
        """
        return self.ctx.writer

    @property
    def disabled(self) -> bool:
        """
        Whether the hypervisor is disabled (C{<stateDir>/disabled} exists).
        """
        return self.ctx.disabled

    @property
    def domain_type(self) -> Optional[str]:
        """
        C{"kvm"} or C{"qemu"} once decided, else None.
        """
        return self.ctx.domain_type

    @property
    def domain_type_reason(self) -> str:
        """
        Why that domain type.
        """
        return self.ctx.domain_type_reason

    @property
    def domains(self) -> dict[str, Any]:
        """
        libvirt's domains by UUID, as last read.
        """
        return self.reconciler.domains

    @property
    def domains_current(self) -> bool:
        """
        Whether L{domains} reflects a live connection.
        """
        return self.reconciler.domains_current

    @property
    def owner_users(self) -> frozenset[str]:
        """
        The hypervisor's owner users (ChangeOwners).
        """
        return self.ctx.owner_users

    @property
    def owner_groups(self) -> frozenset[str]:
        """
        The hypervisor's owner groups (ChangeOwners).
        """
        return self.ctx.owner_groups

    @property
    def uptime(self) -> float:
        """
        Seconds since the service started.
        """
        if self.start_time is None:
            return 0.0
        return self.reactor.seconds() - self.start_time

    def _addresses_in_use(self) -> list[Address]:
        return self.table.addresses_in_use()

    @property
    def dhcp_acks(self) -> Optional[IDhcpAcknowledgements]:
        """
        The DHCP acknowledgement seam, when a DHCP server reports to it.
        """
        return self.ctx.acks if self.ctx.acks.serving else None

    # Read and observer API (DHCP, metadata) ------------------------------------------

    def lease(self, mac: str) -> Optional[Lease]:
        """
        The lease of the VM interface with this MAC, if any.
        """
        return self.table.lease(mac)

    def leases(self) -> list[Lease]:
        """
        Every VM interface's lease.
        """
        return self.table.leases()

    def vm_by_address(self, ip: str) -> Optional[VmInfo]:
        """
        The VM holding C{ip} as its primary or a secondary address.
        """
        vm = self.table.by_address(ip)
        return vm.info if vm is not None else None

    def user_data_path(self, ip: str) -> str:
        """
        Where the VM's user data is (the file may not exist).
        """
        return self.table.user_data_path(ip)

    def identity_paths(self, ip: str) -> tuple[str, str]:
        """
        The VM's identity certificate and key files (they may not exist).
        """
        return self.table.identity_paths(ip)

    def add_listener(self, listener: IVmListener) -> None:
        """
        Tell C{listener} about every change of VMs and subnets.
        """
        self.table.listeners.append(listener)

    def remove_listener(self, listener: IVmListener) -> None:
        """
        Stop telling C{listener}.
        """
        if listener in self.table.listeners:
            self.table.listeners.remove(listener)

    def subnet_list(self) -> list[Subnet]:
        """
        The subnets, sorted by id.
        """
        return self.ctx.subnets.list(sort=True)

    # Reads for the service layer ------------------------------------------------------

    def get_vm(self, ip: str) -> Vm:
        """
        The VM with this IP, or L{hypervisor.errors.NotFound}.
        """
        return self.table.get(ip)

    def get_vm_info(self, ip: str) -> VmInfo:
        """
        GetVmInfo.
        """
        return self.table.get(ip).info

    def list_vms(self, f: VmFilter, sort: bool = False) -> list[str]:
        """
        ListVMs.
        """
        return self.table.listing(f, sort)

    def get_vm_infos(self, f: VmFilter) -> list[VmInfo]:
        """
        GetVmInfos.
        """
        return [self.table.vms[ip].info for ip in self.list_vms(f, sort=True)]

    def check_invariants(self) -> list[str]:
        """
        Problems with addresses (free and in use, used twice...), as sentences.
        """
        return self.ctx.pool.check_invariants(self.table.addresses_in_use())

    # Service ----------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Prepare the state directory and load subnets, pool and VMs, before anything
        else starts (and before twistd drops privileges).

        @raise hypervisor.store.StateDirectoryError: it cannot be used.
        """
        if not self._loaded:
            self.load()
            self._loaded = True
        super().privilegedStartService()

    def load(self) -> None:
        """
        Read everything from the state directory (blocking; at start only), repair
        the pool from the VMs, and read the host's figures.
        """
        for path in self.state.prepare():
            self.log.warn("removed {path}, left by a daemon that did not stop cleanly", path=path)
        ctx = self.ctx
        ctx.disabled = self.state.disabled
        ctx.subnets.load()
        ctx.pool.load()
        self.table.load()
        if isinstance(ctx.domains, Domains):
            ctx.domains.owner = self.state.uuid  # never touch another daemon's domains
        # Uncommitted VMs (migrating away, or migrating in and not committed yet) hold
        # no registered address here (hypervisor.migration).
        repaired = ctx.pool.repair(
            [
                a
                for vm in self.table.vms.values()
                if not vm.info.Uncommitted
                for a in [vm.info.Address, *vm.info.SecondaryAddresses]
            ]
        )
        for sentence in repaired:
            self.log.warn("address pool: {s}", s=sentence)
        if repaired:
            from hypervisor.store import atomic_write

            atomic_write(ctx.pool.path, ctx.pool.encode())
        for problem in self.check_invariants():
            self.log.error("address pool: {problem}", problem=problem)
        self._scan_storage()
        ctx.stats.load()

    def _scan_storage(self) -> None:
        """
        Clean up after interrupted volume operations and rediscover snapshots
        (L{hypervisor.manager.volumeops.scan_storage}); blocking, at start only.
        """
        from hypervisor import codec
        from hypervisor.manager.storage import recover_moves
        from hypervisor.manager.volumeops import scan_storage
        from hypervisor.store import atomic_write

        for vm in list(self.table.vms.values()):
            try:
                for sentence in recover_moves(vm, self.volume_directories):
                    self.log.warn("VM {ip}: {s}", ip=vm.ip, s=sentence)
                done = scan_storage(vm)
                if done:
                    vm.changed()
                    atomic_write(self.table.info_path(vm), codec.encode(vm.local, indent=4))
            except OSError as e:
                self.log.error("VM {ip}: scanning its volumes failed: {e}", ip=vm.ip, e=e)
                continue
            for sentence in done:
                self.log.warn("VM {ip}: {s}", ip=vm.ip, s=sentence)

    def startService(self) -> None:
        """
        Start the disk threads, the host figures' refresh, and the acknowledgement
        timers of VMs that were awaiting theirs when the daemon stopped.
        """
        if not self._loaded:
            self.privilegedStartService()
        self.start_time = self.reactor.seconds()
        super().startService()
        self.ctx.stats.start()
        if self.ctx.image_cache is not None:
            # Empties partial/ (downloads a crash interrupted) and checks the index now,
            # not at the first use.
            self.ctx.image_cache.open().addErrback(
                lambda f: self.log.failure("image cache {d}", f, d=self.ctx.image_cache.directory)
            )
        for vm in self.table.vms.values():
            if vm.pending is not None and vm.pending.get("Phase") == "acknowledge":
                self.log.info(
                    "VM {ip} still awaits its acknowledgement: destroyed "
                    "unless acknowledged within {t:g}s",
                    ip=vm.ip,
                    t=self.ctx.settings.acknowledge_timeout,
                )
                self.lifecycle.arm_acknowledgement(vm, self.ctx.settings.acknowledge_timeout)
        self.log.info(
            "hypervisor {uuid} started with state directory {path}: {n} VMs, "
            "{s} subnets{disabled}",
            uuid=self.state.uuid,
            path=self.state.path,
            n=len(self.vms),
            s=len(self.subnets.subnets),
            disabled=" (disabled: VM creation and starts are refused)" if self.disabled else "",
        )

    def stopService(self) -> "Deferred[None]":
        """
        Leave VMs running (or power them down after stop-vms-on-next-stop), let the
        state writes in flight finish, remove the root cookie and release the state
        directory.
        """
        self.lifecycle.cancel_timers()
        self.ctx.stats.stop()
        self.table.stop()
        self.ctx.hub.close_all()
        if self.stop_vms_on_next_stop:
            d = self.lifecycle.shutdown_vms(self.ctx.settings.vm_shutdown_timeout)
            self.ctx.domains.keep_open_until(d)
        else:
            self.log.info("stopping; VMs keep running")
            d = succeed(None)

        def children(_: object) -> Any:
            return MultiService.stopService(self)

        def finish(_: object) -> None:
            if self.table.unsaved:
                self.log.error(
                    "stopping with unsaved VM state for {ips}: the next start "
                    "reconciles them with libvirt",
                    ips=", ".join(self.table.unsaved),
                )
            self.state.remove_root_cookie()
            self.state.unlock()

        d.addBoth(children)
        return d.addBoth(finish)

    # libvirt listener ------------------------------------------------------------------

    def libvirt_connected(self) -> None:
        """
        Reconcile (after deciding the domain type if needed).
        """
        self.reconciler.libvirt_connected()

    def libvirt_disconnected(self, reason: str) -> None:
        """
        The domain list is stale until libvirt is back.
        """
        self.reconciler.libvirt_disconnected(reason)

    def domain_lifecycle(self, name: str, uuid: str, event: int, detail: int) -> None:
        """
        A domain changed: re-read domains; update the VM under its lock.
        """
        self.reconciler.refresh_domains()
        self.lifecycle.domain_lifecycle(name, uuid, event, detail)

    # Kept for the control socket -----------------------------------------------------------

    def shutdown_vms(self, timeout: float) -> "Deferred[None]":
        """
        Power every running VM of ours down (stop-vms-on-next-stop).
        """
        return self.lifecycle.shutdown_vms(timeout)
