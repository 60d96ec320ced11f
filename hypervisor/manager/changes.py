# -*- test-case-name: tests.test_manager_vms -*-
"""
The ChangeVm* methods and GetVmCreateRequest.

Each change is made on a copy of the VM's info under the VM's lock and committed
(written, then believed): if C{info.json} cannot be written the change is refused and
nothing changed (L{hypervisor.manager.state}).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet.defer import Deferred, inlineCallbacks

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.errors import AccessDenied, InvalidRequest, NotFound, WrongState
from hypervisor.manager import capacity
from hypervisor.manager.context import ManagerContext
from hypervisor.manager.vm import Vm
from hypervisor.model import CreateVmRequest, State, VmInfo
from hypervisor.virt.domainxml import num_vcpus


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class Changes:
    """
    Changes to one VM's settings.
    """

    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx

    def change(
        self, identity: Identity, ip: str, method: str, fn: Callable[[Vm, VmInfo], None]
    ) -> "Deferred[None]":
        """
        Run C{fn(vm, new_info)} on a copy under the VM's lock, then commit it.
        """
        vm = self.ctx.table.get(ip)
        self.ctx.check_owner(vm, identity, method)

        @inlineCallbacks
        def run() -> Any:
            self.ctx.table.get(ip)
            new = self.ctx.table.copy(vm)
            fn(vm, new.VmInfo)
            yield self.ctx.table.commit(vm, new)

        return vm.lock.run(run)

    @inlineCallbacks
    def get_vm_create_request(self, identity: Identity, ip: str) -> Any:
        """
        GetVmCreateRequest: the stored request (without IdentityKey).
        """
        vm = self.ctx.table.get(ip)
        self.ctx.check_owner(vm, identity, "GetVmCreateRequest")
        path = os.path.join(vm.directory, "create-request.json")
        try:
            data = yield self.ctx.runner.run(_read, path)
        except FileNotFoundError:
            raise NotFound(f"VM {ip} has no stored create request") from None
        return codec.decode(CreateVmRequest, data, trusted=True)

    def change_vm_size(
        self, identity: Identity, ip: str, memory_mib: int, milli_cpus: int, virtual_cpus: int
    ) -> "Deferred[None]":
        """
        ChangeVmSize: memory changes need a stopped VM; CPU changes of a running VM
        must keep its vCPU count; increases must fit.
        """
        ctx = self.ctx

        def change(vm: Vm, info: VmInfo) -> None:
            if memory_mib < 0 or milli_cpus < 0 or virtual_cpus < 0:
                raise InvalidRequest("sizes must not be negative")
            new_memory = memory_mib or info.MemoryInMiB
            new_cpus = milli_cpus or info.MilliCPUs
            new_vcpus = virtual_cpus or info.VirtualCPUs
            running = info.State != State.STOPPED
            if new_memory != info.MemoryInMiB and running:
                raise WrongState(f"VM {ip} must be stopped to change its memory")
            host_cpus = ctx.stats.num_cpus()
            if running:
                before = num_vcpus(info, host_cpus)
                old = (info.MilliCPUs, info.VirtualCPUs)
                info.MilliCPUs, info.VirtualCPUs = new_cpus, new_vcpus
                after = num_vcpus(info, host_cpus)
                info.MilliCPUs, info.VirtualCPUs = old
                if after != before:
                    raise WrongState(f"VM {ip} must be stopped to change its vCPU count")
            capacity.check_cpu_and_memory(
                ctx.stats,
                ctx.table.usage(),
                max(0, new_cpus - info.MilliCPUs),
                max(0, new_memory - info.MemoryInMiB),
                check_available=False,
            )
            info.MemoryInMiB, info.MilliCPUs, info.VirtualCPUs = (new_memory, new_cpus, new_vcpus)

        return self.change(identity, ip, "ChangeVmSize", change)

    def change_vm_tags(self, identity: Identity, ip: str, tags: dict[str, str]) -> "Deferred[None]":
        """
        ChangeVmTags: replace all tags.
        """

        def change(vm: Vm, info: VmInfo) -> None:
            info.Tags = dict(tags)

        return self.change(identity, ip, "ChangeVmTags", change)

    def change_vm_owner_users(
        self, identity: Identity, ip: str, users: list[str]
    ) -> "Deferred[None]":
        """
        ChangeVmOwnerUsers: keep the primary owner, replace the others.
        """

        def change(vm: Vm, info: VmInfo) -> None:
            primary = info.OwnerUsers[:1]
            info.OwnerUsers = list(dict.fromkeys(primary + [u for u in users if u]))

        return self.change(identity, ip, "ChangeVmOwnerUsers", change)

    def change_vm_owner_groups(
        self, identity: Identity, ip: str, groups: list[str]
    ) -> "Deferred[None]":
        """
        ChangeVmOwnerGroups: replace the owner groups (duplicates dropped).
        """

        def change(vm: Vm, info: VmInfo) -> None:
            info.OwnerGroups = list(dict.fromkeys(g for g in groups if g))

        return self.change(identity, ip, "ChangeVmOwnerGroups", change)

    def become_primary_vm_owner(self, identity: Identity, ip: str) -> "Deferred[None]":
        """
        BecomePrimaryVmOwner: the caller becomes OwnerUsers[0].
        """
        if not identity.username:
            raise AccessDenied("no authentication data")

        def change(vm: Vm, info: VmInfo) -> None:
            others = [u for u in info.OwnerUsers if u != identity.username]
            info.OwnerUsers = [identity.username] + others

        return self.change(identity, ip, "BecomePrimaryVmOwner", change)

    def change_vm_destroy_protection(
        self, identity: Identity, ip: str, protect: bool
    ) -> "Deferred[None]":
        """
        ChangeVmDestroyProtection (any state).
        """

        def change(vm: Vm, info: VmInfo) -> None:
            info.DestroyProtection = protect

        return self.change(identity, ip, "ChangeVmDestroyProtection", change)

    def change_vm_hostname(self, identity: Identity, ip: str, hostname: str) -> "Deferred[None]":
        """
        ChangeVmHostname (served by DHCP option 12).
        """
        if hostname and not all(c.isascii() and (c.isalnum() or c in "-.") for c in hostname):
            raise InvalidRequest(
                f"hostname {hostname!r} has characters other than " "letters, digits, - and ."
            )
        if len(hostname) > 253:
            raise InvalidRequest("hostname longer than 253 characters")

        def change(vm: Vm, info: VmInfo) -> None:
            info.Hostname = hostname

        return self.change(identity, ip, "ChangeVmHostname", change)
