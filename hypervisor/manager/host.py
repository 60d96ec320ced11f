# -*- test-case-name: tests.test_manager_vms -*-
"""
Host administration: disabling the hypervisor, its owners, the address pool, the
subnets, capacity, and the GetUpdates stream.

The pool and the subnets change under one lock each and are written before they are
believed; if the write fails, memory is put back and the request is refused.
"""

from __future__ import annotations

import copy
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from hypervisor.manager.context import ManagerContext
from hypervisor.manager.updates import UpdateStream
from hypervisor.model import Address, GetCapacityResponse, Subnet, Update


class HostAdmin:
    """
    The hypervisor-wide methods.
    """

    log = Logger()

    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx

    @inlineCallbacks
    def set_disabled_state(self, disable: bool) -> Any:
        """
        SetDisabledState: create or remove C{<stateDir>/disabled}, then believe it.
        """
        ctx = self.ctx
        path = ctx.state.join("disabled")
        if disable:
            yield ctx.writer.write(path, b"")
        else:
            yield ctx.writer.remove(path)
        ctx.disabled = disable
        self.log.info("hypervisor {state}", state="disabled" if disable else "enabled")
        ctx.hub.publish(Update(HaveDisabled=True, Disabled=disable))

    def change_owners(self, users: list[str], groups: list[str]) -> None:
        """
        ChangeOwners: the hypervisor's owners, in memory (fleet-manager sets them).
        """
        self.ctx.owner_users = frozenset(u for u in users if u)
        self.ctx.owner_groups = frozenset(g for g in groups if g)
        self.log.info(
            "hypervisor owners: users {u}, groups {g}",
            u=sorted(self.ctx.owner_users),
            g=sorted(self.ctx.owner_groups),
        )

    @inlineCallbacks
    def change_address_pool(
        self, to_add: list[Address], to_remove: list[Address], maximum_free: dict[str, int]
    ) -> Any:
        """
        ChangeAddressPool: all or nothing, persisted before it is believed.
        """
        ctx = self.ctx
        yield ctx.pool_lock.acquire()
        try:
            old = (list(ctx.pool.free), list(ctx.pool.registered))
            ctx.pool.change(to_add, to_remove, maximum_free)
            try:
                yield ctx.save_pool()
            except BaseException:
                ctx.pool.free, ctx.pool.registered = old
                raise
        finally:
            ctx.pool_lock.release()

    @inlineCallbacks
    def update_subnets(self, add: list[Subnet], change: list[Subnet], delete: list[str]) -> Any:
        """
        UpdateSubnets: all or nothing, persisted before it is believed.
        """
        ctx = self.ctx

        def in_use(subnet_id: str) -> bool:
            return any(
                vm.info.SubnetId == subnet_id or subnet_id in vm.info.SecondarySubnetIDs
                for vm in ctx.table.vms.values()
            )

        yield ctx.pool_lock.acquire()
        try:
            old = dict(ctx.subnets.subnets)
            ctx.subnets.update(add, change, delete, in_use)
            try:
                yield ctx.writer.write(ctx.subnets.path, ctx.subnets.encode())
            except BaseException:
                ctx.subnets.subnets = old
                raise
        finally:
            ctx.pool_lock.release()
        subnets = ctx.subnets.list(sort=True)
        ctx.hub.publish(
            Update(HaveSubnets=True, Subnets=subnets, NumFreeAddresses=ctx.free_counts())
        )
        ctx.table.notify_subnets(copy.deepcopy(subnets))

    def get_capacity(self) -> GetCapacityResponse:
        """
        GetCapacity's numbers (cached host figures).
        """
        stats = self.ctx.stats
        total, available = stats.memory()
        return GetCapacityResponse(
            AvailableMemoryInMiB=available,
            MemoryInMiB=total,
            NumCPUs=stats.num_cpus(),
            TotalVolumeBytes=stats.total_volume_bytes(),
        )

    def full_update(self) -> Update:
        """
        The first message of GetUpdates: everything.
        """
        ctx = self.ctx
        total, available = ctx.stats.memory()
        return Update(
            HaveAddressPool=True,
            AddressPool=list(ctx.pool.registered),
            HaveDisabled=True,
            Disabled=ctx.disabled,
            MemoryInMiB=total,
            AvailableMemoryInMiB=available,
            NumCPUs=ctx.stats.num_cpus(),
            NumFreeAddresses=ctx.free_counts(),
            HaveSubnets=True,
            Subnets=ctx.subnets.list(sort=True),
            TotalVolumeBytes=ctx.stats.total_volume_bytes(),
            HaveVMs=True,
            VMs={ip: vm.info for ip, vm in ctx.table.vms.items()},
        )

    def subscribe_updates(self, name: str = "") -> UpdateStream:
        """
        Start a GetUpdates stream: a full update, then incremental ones.
        """
        return self.ctx.hub.subscribe(self.full_update(), name)
