# -*- test-case-name: tests.test_manager_vms -*-
"""
What the manager's parts share: the state directory, the VM table, the address pool
and subnets, the domain layer, cached host figures, the disk runner and state writer,
the clock, and the settings. Each part (lifecycle, reconciliation, creation, changes,
host administration) takes one L{ManagerContext}; none imports another's module
except through it, so there are no import cycles.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, DeferredLock, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hypervisor.auth import Identity
from hypervisor.diskio import IBlockingRunner, StateWriter
from hypervisor.errors import AccessDenied, Unavailable
from hypervisor.manager.acks import IDhcpAcknowledgements
from hypervisor.manager.hoststats import HostStats
from hypervisor.manager.network import AddressPool, Subnets
from hypervisor.manager.state import VmTable
from hypervisor.manager.updates import UpdateHub
from hypervisor.manager.vm import Vm
from hypervisor.model import Address, CloudInitDatasource, Update
from hypervisor.store import StateDirectory
from hypervisor.virt.domains import IDomains

ACKNOWLEDGE_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


@dataclass
class Settings:
    """
    The manager's knobs (from flags).
    """

    vm_shutdown_timeout: float = 60.0
    stop_timeout: float = STOP_TIMEOUT
    acknowledge_timeout: float = ACKNOWLEDGE_TIMEOUT
    images_directory: str = ""
    # Memory volumes (Volume.Type memory) live on tmpfs here, mounted if needed.
    memory_volume_directory: str = "/tmp/hyper-volumes"
    datasource: CloudInitDatasource = CloudInitDatasource.OPENSTACK
    requested_domain_type: str = "auto"


@dataclass
class ManagerContext:
    """
    The collaborators every part of the manager uses.

    @ivar domain_type: C{"kvm"} or C{"qemu"} once decided, else None.
    @ivar reactor: the clock (time and timers only: blocking work goes through
        C{runner}, whose C{from_thread} reports back from its threads).
    @ivar owner_users: the hypervisor's owners (ChangeOwners), in memory.
    """

    state: StateDirectory
    table: VmTable
    pool: AddressPool
    subnets: Subnets
    domains: IDomains
    stats: HostStats
    runner: IBlockingRunner
    writer: StateWriter
    hub: UpdateHub
    acks: IDhcpAcknowledgements
    reactor: IReactorTime
    settings: Settings
    bridges: Callable[[], dict[str, int]]
    domain_type: Optional[str] = None
    domain_type_reason: str = ""
    owner_users: frozenset[str] = field(default_factory=frozenset)
    owner_groups: frozenset[str] = field(default_factory=frozenset)
    disabled: bool = False
    pool_lock: DeferredLock = field(default_factory=DeferredLock)
    # The local image cache (hypervisor.manager.imagecache.ImageCache), or None
    # when -objectCacheDirectory is off: then only file:// images, copied.
    image_cache: Optional[Any] = None
    # The last background write of the pool (allocate_addresses), never failing.
    _pool_saved: "Deferred[None]" = field(
        default_factory=lambda: succeed(None), init=False, repr=False
    )

    def now(self) -> datetime.datetime:
        """
        The reactor's time as an aware datetime.
        """
        return datetime.datetime.fromtimestamp(self.reactor.seconds(), datetime.timezone.utc)

    def require_enabled(self) -> None:
        """
        Refuse with 503 while the hypervisor is disabled.
        """
        if self.disabled:
            raise Unavailable(
                "Hypervisor is disabled; enable it with SetDisabledState "
                "(hyper-control set-disabled-state -disable=false)"
            )

    def require_libvirt(self) -> None:
        """
        Refuse with 503, before anything changes, while libvirt is not connected.
        """
        if not self.domains.connected:
            from hypervisor.virt.connection import NotConnected

            raise NotConnected(
                f"{self.domains.describe()}; nothing was changed: try "
                "again once libvirtd is back"
            )

    @staticmethod
    def check_owner(vm: Vm, identity: Identity, method: str) -> None:
        """
        The reference's C{checkAuth}: method power, owner user, the VM's access token
        (L{Identity.token_vm}) or owner group.
        """
        if identity.has_method_power(method):
            return
        if identity.token_vm and identity.token_vm == vm.ip:
            return
        if identity.username and identity.username in vm.info.OwnerUsers:
            return
        if identity.groups & set(vm.info.OwnerGroups):
            return
        raise AccessDenied(f"no access to VM {vm.ip}")

    # The pool: serialised, persisted before it is believed ------------------------------

    def free_counts(self) -> dict[str, int]:
        """
        Free addresses per subnet for GetUpdates, every subnet a key (0 included):
        fleet-manager replenishes only the subnets it finds among the keys.
        """
        counts = {s.Id: 0 for s in self.subnets.list() if s.Id != "hypervisor"}
        counts.update(self.pool.num_free())
        return counts

    @inlineCallbacks
    def save_pool(self) -> Any:
        """
        Write C{address-pool.json} from memory and tell subscribers.
        """
        yield self.writer.write(self.pool.path, self.pool.encode)
        self.hub.publish(
            Update(
                HaveAddressPool=True,
                AddressPool=list(self.pool.registered),
                NumFreeAddresses=self.free_counts(),
            )
        )

    @inlineCallbacks
    def release_addresses(self, addresses: list[Address]) -> Any:
        """
        Give addresses back to the free list and persist the pool; a failure to write
        is logged and the pool is written again at the next change (the addresses are
        free in memory either way, and the pool is repaired from the VMs at start).
        """
        yield self.pool_lock.acquire()
        try:
            for address in addresses:
                self.pool.release(address)
            yield self.save_pool()
        except OSError as e:
            from twisted.logger import Logger

            Logger().error(
                "cannot write the address pool after freeing {ips}: {e}; "
                "it is written again at the next change",
                ips=", ".join(a.IpAddress for a in addresses),
                e=e,
            )
        finally:
            self.pool_lock.release()

    @inlineCallbacks
    def register_addresses(self, addresses: list[Address]) -> Any:
        """
        Make sure addresses held by a VM are registered (and not free); persisted.
        """
        yield self.pool_lock.acquire()
        try:
            for address in addresses:
                self.pool.register_in_use(address)
            yield self.save_pool()
        finally:
            self.pool_lock.release()

    @inlineCallbacks
    def unregister_addresses(self, addresses: list[Address]) -> Any:
        """
        Take addresses out of the pool (free and registered): a VM moving away, or
        gone elsewhere, holds them; persisted.
        """
        yield self.pool_lock.acquire()
        try:
            macs = {a.MacAddress for a in addresses}
            self.pool._commit(
                [a for a in self.pool.free if a.MacAddress not in macs],
                [a for a in self.pool.registered if a.MacAddress not in macs],
            )
            yield self.save_pool()
        finally:
            self.pool_lock.release()

    @inlineCallbacks
    def allocate_addresses(self, subnets: list[Any], requested_ip: str = "") -> Any:
        """
        Take one free address in each subnet (the first one C{requested_ip}, if
        given); on any failure nothing is taken.

        The pool is written in the background, not waited for: what makes an
        address taken on disk is the VM's own C{info.json}, written before the VM is
        answered for, and the pool is repaired from the VMs at start (a crash before
        the pool reaches the disk leaves the address free there and held by the VM
        or by nobody: the repair takes or frees it). Allocation is decided in memory
        under the pool lock, so no address is given twice. This takes one durable
        write (two fsyncs) out of every CreateVm's path.
        """
        yield self.pool_lock.acquire()
        try:
            taken: list[Address] = []
            try:
                for i, subnet in enumerate(subnets):
                    taken.append(self.pool.allocate(subnet, requested_ip if i == 0 else ""))
            except BaseException:
                for address in taken:
                    self.pool.release(address)
                raise
            self._pool_saved = self.save_pool().addErrback(self._pool_not_written, taken)
            return taken
        finally:
            self.pool_lock.release()

    def pool_on_disk(self) -> "Deferred[None]":
        """
        Fires (never fails) once the pool writes asked for so far by
        L{allocate_addresses} are done: CreateVm waits for it before its final answer
        (long done by then), so an answered VM's address is taken on disk too.
        """
        d: Deferred[None] = Deferred()

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self._pool_saved.addBoth(fire)
        return d

    def _pool_not_written(self, failure: Failure, taken: list[Address]) -> None:
        Logger().error(
            "cannot write the address pool after taking {ips}: {e}; it is written "
            "again at the next change (and repaired from the VMs at start)",
            ips=[a.IpAddress or a.MacAddress for a in taken],
            e=failure.getErrorMessage(),
        )
