# -*- test-case-name: tests.test_manager_vms -*-
"""
VM lifecycle: StartVm, StopVm, RebootVm, DestroyVm, AcknowledgeVm, libvirt lifecycle
events, and removing a VM.

Every operation on a VM runs under that VM's lock, libvirt events included, so an
event never interleaves with an RPC on the same VM. The durability rule of
L{hypervisor.manager.state} applies: an intent is committed (written) before libvirt
is asked, and refused if it cannot be written; what libvirt then did is recorded
(memory at once, disk retried). So:

- libvirt not connected: refused with 503 before anything changes; if the connection
  breaks during a start, the VM goes back to its previous state (never "failed to
  start"); during a stop or destroy, the VM stays C{stopping}/C{destroying} and the
  reconciliation after the reconnect completes it.
- A VM is removed in this order: C{destroying} is committed; its domain is forced
  off; its volume directories go; its C{info.json} is removed (durably); the rest of
  its directory goes; its addresses return to the pool. A crash at any step leaves a
  C{destroying} VM that the next start completes, or no VM and addresses that the
  pool repair at start frees — never a running domain without a VM, never an
  address both free and held.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hypervisor.auth import Identity
from hypervisor.console.paths import serial_socket_path
from hypervisor.errors import WrongState
from hypervisor.manager import images
from hypervisor.manager.capacity import InsufficientCapacity
from hypervisor.manager.context import ManagerContext
from hypervisor.manager.network import bridge_for_subnet
from hypervisor.manager.state import INFO_FILE, PENDING_FILE
from hypervisor.manager.vm import (
    DESTROY_IDLE,
    DESTROY_RUNNING,
    SHOULD_RUN,
    START_FROM,
    STOP_FROM_IDLE,
    STOP_FROM_RUNNING,
    Vm,
)
from hypervisor.model import CloudInitDatasource, State
from hypervisor.virt.connection import NotConnected
from hypervisor.virt.domainxml import (
    DiskFile,
    DomainSpec,
    build_domain_xml,
    domain_name,
    ip_from_domain_name,
)

# libvirt event codes (virDomainEventType / virDomainEventStoppedDetailType)
EVENT_STARTED = 2
EVENT_STOPPED = 5
STOPPED_SHUTDOWN = 0
STOPPED_DESTROYED = 1
SHUTDOWN_POLL_INTERVAL = 0.5
FORCE_OFF_WAIT = 30.0


class Lifecycle:
    """
    Starting, stopping, rebooting and destroying VMs.
    """

    log = Logger()

    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx
        self._ack_timers: dict[str, Any] = {}

    # RPCs ----------------------------------------------------------------------------

    @inlineCallbacks
    def start_vm(self, identity: Identity, ip: str, dhcp_timeout: float = 0) -> Any:
        """
        StartVm; fires with whether the DHCP wait timed out.
        """
        ctx = self.ctx
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, identity, "StartVm")
        ctx.require_enabled()
        yield vm.lock.acquire()
        try:
            ctx.table.get(ip)
            vm.require_state(START_FROM, "start")
            ctx.require_libvirt()
            _, available = ctx.stats.memory()
            if vm.info.MemoryInMiB >= available:
                raise InsufficientCapacity(
                    f"not enough free memory to start VM {ip}: {vm.info.MemoryInMiB} MiB "
                    f"needed, {available} MiB available"
                )
            yield self.start_domain(vm)
        finally:
            vm.lock.release()
        timed_out = yield self.wait_for_dhcp(vm, dhcp_timeout)
        return timed_out

    @inlineCallbacks
    def stop_vm(self, identity: Identity, ip: str) -> Any:
        """
        StopVm: ACPI power-down, forced after the stop timeout; fires once stopped.
        """
        ctx = self.ctx
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, identity, "StopVm")
        yield vm.lock.acquire()
        try:
            ctx.table.get(ip)
            vm.require_state(STOP_FROM_RUNNING | STOP_FROM_IDLE, "stop")
            if vm.info.State in STOP_FROM_RUNNING:
                ctx.require_libvirt()
                yield ctx.table.commit_state(vm, State.STOPPING)
                yield self.stop_domain(vm, ctx.settings.stop_timeout)
                yield ctx.table.record_state(vm, State.STOPPED)
            else:
                yield ctx.table.commit_state(vm, State.STOPPED)
        finally:
            vm.expecting_stop = False
            vm.lock.release()

    @inlineCallbacks
    def destroy_vm(self, identity: Identity, ip: str) -> Any:
        """
        DestroyVm: force off (refused with DestroyProtection while running) and remove.
        """
        ctx = self.ctx
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, identity, "DestroyVm")
        yield vm.lock.acquire()
        try:
            ctx.table.get(ip)
            # A VM still "destroying" once we hold its lock is one whose removal
            # failed part-way (a disk error): destroying it again completes it.
            vm.require_state(DESTROY_RUNNING | DESTROY_IDLE | {State.DESTROYING}, "destroy")
            if vm.info.State in DESTROY_RUNNING and vm.info.DestroyProtection:
                raise WrongState(
                    f"VM {ip} has DestroyProtection; clear it first " "(ChangeVmDestroyProtection)"
                )
            # Even a stopped VM's removal checks that no domain of it runs.
            ctx.require_libvirt()
            exported = vm.info.State == State.EXPORTING
            if exported:
                # ExportLocalVm handed the VM (and its addresses) to something else on
                # this host: its addresses are unregistered here, never freed for
                # another VM (reference). Uncommitted first, so that the removal
                # (even one completed after a crash) does not free them.
                new = ctx.table.copy(vm)
                new.VmInfo.Uncommitted = True
                yield ctx.table.commit(vm, new)
            if vm.info.State != State.DESTROYING:
                yield ctx.table.commit_state(vm, State.DESTROYING)
            yield self.remove_vm(vm)
            if exported:
                yield ctx.unregister_addresses([vm.info.Address] + list(vm.info.SecondaryAddresses))
        finally:
            vm.lock.release()

    @inlineCallbacks
    def reboot_vm(self, identity: Identity, ip: str, dhcp_timeout: float = 0) -> Any:
        """
        RebootVm: Ctrl-Alt-Del (as the Go hypervisor does); fires with whether the DHCP
        wait timed out.
        """
        ctx = self.ctx
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, identity, "RebootVm")
        yield vm.lock.acquire()
        try:
            vm.require_state({State.RUNNING}, "reboot")
            ctx.require_libvirt()
            uuid = yield ctx.domains.uuid_of(domain_name(vm.ip))
            if uuid is None:
                raise WrongState(f"VM {ip} has no running domain")
            yield ctx.domains.send_ctrl_alt_del(uuid)
        finally:
            vm.lock.release()
        timed_out = yield self.wait_for_dhcp(vm, dhcp_timeout)
        return timed_out

    @inlineCallbacks
    def acknowledge_vm(self, identity: Identity, ip: str) -> Any:
        """
        AcknowledgeVm: keep a newly created VM (its 15 s auto-destroy is cancelled once
        that is on disk).
        """
        ctx = self.ctx
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, identity, "AcknowledgeVm")
        # Under the VM's lock, like the deadline's destroy: a deadline passing while
        # pending.json is being removed waits, then finds the VM acknowledged.
        yield vm.lock.acquire()
        try:
            ctx.table.get(ip)
            if vm.pending is None:
                return
            if vm.pending.get("Phase") == "creating":
                raise WrongState(f"VM {ip} is still being created")
            yield ctx.writer.remove(os.path.join(vm.directory, PENDING_FILE))
            vm.pending = None
            timer = self._ack_timers.pop(vm.ip, None)
            if timer is not None and timer.active():
                timer.cancel()
        finally:
            vm.lock.release()

    # Acknowledgement deadline -----------------------------------------------------------

    def acknowledgement_file(self, vm: Vm) -> tuple[str, bytes, int, dict[str, Any]]:
        """
        C{pending.json} saying C{vm} must be acknowledged within the acknowledge
        timeout from now: path, content, mode, and the record itself (for
        L{await_acknowledgement}'s C{written}).
        """
        timeout = self.ctx.settings.acknowledge_timeout
        pending = {"Phase": "acknowledge", "Deadline": self.ctx.reactor.seconds() + timeout}
        path = os.path.join(vm.directory, PENDING_FILE)
        return path, json.dumps(pending).encode(), 0o644, pending

    @inlineCallbacks
    def await_acknowledgement(self, vm: Vm, written: Optional[dict[str, Any]] = None) -> Any:
        """
        Record that C{vm} must be acknowledged within the acknowledge timeout, and arm
        the timer (CreateVm, after the VM is complete).

        @param written: the record of L{acknowledgement_file} when the caller wrote it
            already (with the VM's info.json, in one group): not written again.
        """
        if written is None:
            path, data, mode, written = self.acknowledgement_file(vm)
            yield self.ctx.writer.write(path, data, mode)
        vm.pending = written
        self.arm_acknowledgement(vm, max(0.0, written["Deadline"] - self.ctx.reactor.seconds()))

    def arm_acknowledgement(self, vm: Vm, timeout: float) -> None:
        """
        Destroy C{vm} unless it is acknowledged within C{timeout} seconds.
        """
        old = self._ack_timers.pop(vm.ip, None)
        if old is not None and old.active():
            old.cancel()
        self._ack_timers[vm.ip] = self.ctx.reactor.callLater(timeout, self._unacknowledged, vm)

    def cancel_timers(self) -> None:
        """
        Cancel every acknowledgement timer (the daemon stops; they are re-armed at
        the next start from C{pending.json}).
        """
        for timer in self._ack_timers.values():
            if timer.active():
                timer.cancel()
        self._ack_timers.clear()

    def _unacknowledged(self, vm: Vm) -> None:
        self._ack_timers.pop(vm.ip, None)
        if vm.deleted or vm.pending is None:
            return
        self.log.warn(
            "VM {ip} was not acknowledged within {t:g}s: destroying it",
            ip=vm.ip,
            t=self.ctx.settings.acknowledge_timeout,
        )
        self.locked(vm, self._destroy_unacknowledged, vm)

    @inlineCallbacks
    def _destroy_unacknowledged(self, vm: Vm) -> Any:
        if vm.deleted or vm.pending is None:
            return
        yield self.ctx.table.commit_state(vm, State.DESTROYING)
        yield self.remove_vm(vm)

    # Events -------------------------------------------------------------------------------

    def domain_lifecycle(self, name: str, uuid: str, event: int, detail: int) -> None:
        """
        A libvirt lifecycle event: a domain of ours stopped. Waiters are woken at once;
        the VM's state changes under its lock.
        """
        ip = ip_from_domain_name(name)
        vm = self.ctx.table.vms.get(ip) if ip else None
        if vm is None or vm.deleted or event != EVENT_STOPPED:
            return
        if vm.domain_uuid and uuid != vm.domain_uuid and vm.info.State != State.STARTING:
            # An older domain of this VM. (During a start the new domain's UUID is
            # not known until libvirt answers, and its events may come first: they
            # are judged under the lock, once the start recorded the UUID.)
            return
        vm.domain_stopped()
        self.locked(vm, self._domain_stopped, vm, uuid, detail)

    def _domain_stopped(self, vm: Vm, uuid: str, detail: int) -> Any:
        if vm.deleted or vm.expecting_stop:
            return None
        if vm.domain_uuid and uuid != vm.domain_uuid:
            return None  # the VM was started again meanwhile
        if vm.info.State not in SHOULD_RUN:
            return None
        if detail == STOPPED_SHUTDOWN:
            if vm.info.DestroyOnPowerdown and not vm.info.DestroyProtection:
                self.log.info(
                    "VM {ip} powered off and has DestroyOnPowerdown: " "destroying it", ip=vm.ip
                )
                self.ctx.table.record_state(vm, State.DESTROYING)
                return self.remove_vm(vm)
            self.log.info("VM {ip} powered itself off", ip=vm.ip)
            self.ctx.table.record_state(vm, State.STOPPED)
        else:
            self.log.warn(
                "VM {ip}: its domain stopped unexpectedly (detail {d})", ip=vm.ip, d=detail
            )
            self.ctx.table.record_state(vm, State.CRASHED)
        return None

    def locked(self, vm: Vm, fn: Callable[..., Any], *args: Any) -> "Deferred[Any]":
        """
        Run C{fn(*args)} under the VM's lock; failures are logged.
        """
        d = vm.lock.run(fn, *args)
        d.addErrback(lambda f: self.log.failure("VM {ip}", f, ip=vm.ip))
        return d

    # Domains -------------------------------------------------------------------------------

    def domain_spec(self, vm: Vm, bridges_found: dict[str, int]) -> DomainSpec:
        """
        What the domain XML needs beyond the VmInfo (no disk I/O: kernel and initrd are
        recorded when the VM is created; the host's bridges, C{bridges_found}, are
        read by the caller on a disk thread).
        """
        ctx = self.ctx
        info = vm.info
        subnet_ids = [info.SubnetId] + list(info.SecondarySubnetIDs)
        bridges = [bridge_for_subnet(ctx.subnets.get(sid), bridges_found) for sid in subnet_ids]
        disks = [
            DiskFile(loc.Filename, volume.Format, volume.Interface)
            for volume, loc in zip(info.Volumes, vm.local.VolumeLocations)
        ]
        root_dir = (
            os.path.dirname(vm.local.VolumeLocations[0].Filename)
            if vm.local.VolumeLocations
            else vm.directory
        )
        datasource = info.CloudInitDatasource
        if datasource == CloudInitDatasource.DEFAULT:
            datasource = ctx.settings.datasource
        if ctx.domain_type is None:
            from hypervisor.errors import Unavailable

            raise Unavailable(
                "the domain type is not decided yet (KVM probe running); "
                "try again in a few seconds"
            )
        return DomainSpec(
            domain_type=ctx.domain_type,
            bootlog=os.path.join(vm.directory, "bootlog"),
            disks=disks,
            bridges=bridges,
            host_cpus=ctx.stats.num_cpus(),
            hypervisor_uuid=ctx.state.uuid,
            kernel=os.path.join(root_dir, "kernel") if vm.kernel else "",
            initrd=os.path.join(root_dir, "initrd") if vm.initrd else "",
            datasource=datasource,
            serial_socket=serial_socket_path(vm.directory),
        )

    @inlineCallbacks
    def start_domain(self, vm: Vm) -> Any:
        """
        starting (committed) -> libvirt createXML -> running (recorded); on a libvirt
        failure "failed to start"; if the connection broke, back to the previous
        state and L{NotConnected}. Called with the VM's lock held.
        """
        ctx = self.ctx
        previous = vm.info.State
        ctx.require_libvirt()
        bridges_found = yield ctx.runner.run(ctx.bridges)  # reads /sys: off the reactor
        xml = build_domain_xml(vm.info, self.domain_spec(vm, bridges_found))
        yield ctx.table.commit_state(vm, State.STARTING)
        vm.expecting_stop = False
        failure: Optional[BaseException] = None
        try:
            uuid = yield ctx.domains.create(xml)
        except Exception as e:
            failure = e
        if isinstance(failure, NotConnected):
            self.log.warn(
                "VM {ip}: libvirt went away during the start; back to {s}",
                ip=vm.ip,
                s=previous.value,
            )
            yield ctx.table.record_state(vm, previous)
            raise failure
        if failure is not None:
            yield ctx.table.record_state(vm, State.FAILED_TO_START)
            get_message = getattr(failure, "get_error_message", None)
            message = (get_message() if get_message is not None else "") or str(failure)
            raise WrongState(f"VM {vm.ip} failed to start: {message}") from failure
        vm.domain_uuid = uuid
        yield ctx.table.record_state(vm, State.RUNNING)

    @inlineCallbacks
    def force_off(self, vm: Vm) -> Any:
        """
        Pull the plug on the VM's domain (if any) and wait until libvirt says it
        stopped. Called with the VM's lock held.
        """
        vm.expecting_stop = True
        uuid = yield self.ctx.domains.uuid_of(domain_name(vm.ip))
        if uuid:
            stopped = vm.wait_stopped(self.ctx.reactor, FORCE_OFF_WAIT)
            was_running = yield self.ctx.domains.force_off(uuid)
            if was_running:
                yield stopped
            else:
                vm.domain_stopped()

    @inlineCallbacks
    def stop_domain(self, vm: Vm, timeout: float) -> Any:
        """
        ACPI power-down; forced off after C{timeout}; fires when it is off.
        """
        ctx = self.ctx
        vm.expecting_stop = True
        uuid = yield ctx.domains.uuid_of(domain_name(vm.ip))
        if uuid is None:
            return
        stopped = vm.wait_stopped(ctx.reactor, timeout)
        requested = yield ctx.domains.request_shutdown(uuid)
        if not requested:
            vm.domain_stopped()
        yield stopped
        active = yield ctx.domains.is_active(uuid)
        if active:
            self.log.info(
                "VM {ip} did not power down within {t:g}s: forcing it off", ip=vm.ip, t=timeout
            )
            forced = vm.wait_stopped(ctx.reactor, FORCE_OFF_WAIT)
            yield ctx.domains.force_off(uuid)
            yield forced

    # Removing -----------------------------------------------------------------------------

    @inlineCallbacks
    def remove_vm(self, vm: Vm, domain: bool = True) -> Any:
        """
        Remove a C{destroying} VM: its domain off, its volumes, its directory's other
        files, its C{info.json} (durably), the directory, then its addresses back to
        the pool. Called with the VM's lock held.

        @param domain: whether a domain may exist (False only for a creation that
            failed before libvirt was asked).
        """
        ctx = self.ctx
        if domain:
            yield self.force_off(vm)
        timer = self._ack_timers.pop(vm.ip, None)
        if timer is not None and timer.active():
            timer.cancel()
        directories = {
            loc.DirectoryToCleanup for loc in vm.local.VolumeLocations if loc.DirectoryToCleanup
        }
        for directory in sorted(directories):
            yield ctx.runner.run(images.remove_tree, directory)
        # pending.json stays until info.json is gone: if removing info.json fails, a
        # failed creation is still marked "creating" and removed at the next start
        # (never started again without its volumes).
        yield ctx.runner.run(images.remove_all_but, vm.directory, INFO_FILE, PENDING_FILE)
        yield ctx.writer.remove(os.path.join(vm.directory, INFO_FILE))
        yield ctx.runner.run(images.remove_directory, vm.directory)
        ctx.table.forget(vm)
        if not vm.info.Uncommitted:
            yield ctx.release_addresses([vm.info.Address] + list(vm.info.SecondaryAddresses))
        ctx.stats.refresh()
        self.log.info("VM {ip} destroyed", ip=vm.ip)

    # DHCP ---------------------------------------------------------------------------------

    def wait_for_dhcp(self, vm: Vm, timeout: float) -> "Deferred[bool]":
        """
        Wait for the VM's DHCP acknowledgement; fire with True if it timed out (no
        wait, False, when C{timeout} is not positive).

        Without a DHCP server in this daemon no acknowledgement can be seen: report a
        time-out at once (and say so in the log) rather than claim one.
        """
        if timeout <= 0:
            return succeed(False)
        acks = self.ctx.acks
        if not acks.serving:
            self.log.warn(
                "VM {ip}: DhcpTimeout asked but this daemon runs no DHCP "
                "server; reporting DhcpTimedOut",
                ip=vm.ip,
            )
            return succeed(True)
        d = acks.wait(vm.info.Address.MacAddress, timeout)
        return d.addCallback(lambda acked: not acked)

    # Host shutdown ---------------------------------------------------------------------------

    @inlineCallbacks
    def shutdown_vms(self, timeout: float) -> Any:
        """
        Power our running domains down: ACPI first, forced off after C{timeout}
        seconds. The VMs' recorded states are kept (this is for host shutdown): when
        the daemon starts again, reconciliation starts the VMs that were running.
        """
        ctx = self.ctx
        if not ctx.domains.connected:
            self.log.error("cannot stop VMs: {why}", why=ctx.domains.describe())
            return
        summaries = yield ctx.domains.list()
        # Only this daemon's VMs: another hypervisor daemon may share the libvirtd.
        running = [
            s for s in summaries if s.ours and s.active and (s.ip_address or "") in ctx.table.vms
        ]
        if not running:
            self.log.info("stopping VMs: none running")
            return
        self.log.info(
            "stopping {n} VMs (ACPI power-down, forced after {timeout:g}s): {names}",
            n=len(running),
            timeout=timeout,
            names=", ".join(s.name for s in running),
        )
        for s in running:
            vm = ctx.table.vms.get(s.ip_address or "")
            if vm is not None:
                vm.expecting_stop = True
            try:
                yield ctx.domains.request_shutdown(s.uuid)
            except Exception as e:
                self.log.warn("ACPI power-down of {name} failed: {e}", name=s.name, e=e)
        deadline = ctx.reactor.seconds() + timeout
        remaining = running
        while remaining and ctx.reactor.seconds() < deadline:
            yield deferLater(ctx.reactor, SHUTDOWN_POLL_INTERVAL, lambda: None)
            still = []
            for s in remaining:
                active = yield ctx.domains.is_active(s.uuid)
                if active:
                    still.append(s)
                else:
                    self.log.info("VM {name} powered down", name=s.name)
            remaining = still
        for s in remaining:
            self.log.warn(
                "VM {name} did not power down within {timeout:g}s: forcing it " "off",
                name=s.name,
                timeout=timeout,
            )
            try:
                yield ctx.domains.force_off(s.uuid)
            except Exception as e:
                self.log.error("forcing {name} off failed: {e}", name=s.name, e=e)
        self.log.info("all {n} VMs stopped", n=len(running))
