# -*- test-case-name: tests.test_manager_vms -*-
"""
Reconciliation: bring libvirt in line with the state directory at start and after
every libvirt reconnect, keep a current list of libvirt's domains, and decide the
domain type (KVM or TCG) when it is C{auto}.

Per VM (under its lock):

- a creation that never finished (C{pending.json} says C{creating}: the daemon died
  before the client got the VM's address) is removed: domain off, files, addresses;
- should run (starting/running/debugging) and runs: adopted untouched; should run
  and does not: started again;
- C{stopping} / C{destroying}: completed;
- recorded idle but its domain runs: recorded running.

A domain tagged as ours whose VM is unknown is reported and left alone.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from hypervisor.manager.context import ManagerContext
from hypervisor.manager.lifecycle import Lifecycle
from hypervisor.manager.state import PENDING_FILE
from hypervisor.manager.vm import SHOULD_RUN, Vm
from hypervisor.model import State
from hypervisor.virt import domains
from hypervisor.virt.connection import NotConnected
from hypervisor.virt.domainxml import domain_name, ip_from_domain_name


class Reconciler:
    """
    Keeps libvirt and the state directory in agreement.

    @ivar domains: libvirt's domains by UUID, as last read.
    @ivar domains_current: whether L{domains} reflects a live connection.
    """

    log = Logger()

    def __init__(self, ctx: ManagerContext, lifecycle: Lifecycle) -> None:
        self.ctx = ctx
        self.lifecycle = lifecycle
        self.domains: dict[str, domains.DomainSummary] = {}
        self.domains_current = False
        self.reconciling: Optional[Deferred[None]] = None
        self._refreshing: Optional[Deferred[None]] = None
        self._refresh_again = False
        self._probing = False

    # Listener ------------------------------------------------------------------------

    def libvirt_connected(self) -> None:
        """
        Re-read the domain list, decide the domain type if unknown, reconcile.
        """
        self.refresh_domains()
        if self.ctx.domain_type is None and not self._probing:
            self._probe_domain_type()
        elif self.ctx.domain_type is not None:
            self.reconcile()

    def libvirt_disconnected(self, reason: str) -> None:
        """
        Mark the domain list as stale until libvirt is back.
        """
        self.domains_current = False

    # Domains ---------------------------------------------------------------------------

    def refresh_domains(self) -> "Deferred[None]":
        """
        Re-read libvirt's domains (one call); coalesces bursts of events: while a read
        runs, further requests make one more read after it.
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

        d: Deferred[None] = self.ctx.domains.list().addCallbacks(got, failed)
        if not d.called:
            self._refreshing = d
        d.addBoth(done)
        return d

    def _probe_domain_type(self) -> None:
        self._probing = True
        self.log.info("-domainType auto: probing whether KVM guests run on this host")
        d = self.ctx.domains.probe_kvm()

        def got(result: tuple[bool, str]) -> None:
            usable, reason = result
            self.ctx.domain_type = "kvm" if usable else "qemu"
            self.ctx.domain_type_reason = reason
            self.log.info("domain type {type}: {reason}", type=self.ctx.domain_type, reason=reason)
            self.reconcile()

        def failed(failure: Any) -> None:
            self.log.warn(
                "KVM probe failed: {why}; will probe again on reconnect",
                why=failure.getErrorMessage(),
            )

        def done(_: object) -> None:
            self._probing = False

        d.addCallbacks(got, failed).addBoth(done)

    # Reconciliation -----------------------------------------------------------------------

    def reconcile(self) -> "Deferred[None]":
        """
        Bring libvirt in line with the state directory (see the module docstring).
        """
        if self.reconciling is not None:
            return self.reconciling
        d = self._reconcile()
        self.reconciling = d

        def done(result: object) -> None:
            self.reconciling = None

        def failed(failure: Any) -> None:
            if failure.check(NotConnected):
                self.log.warn(
                    "reconciliation stopped: {why}; it runs again when libvirt " "is back",
                    why=failure.getErrorMessage(),
                )
            else:
                self.log.failure("reconciliation failed", failure)

        d.addErrback(failed)
        d.addBoth(done)
        return d

    @inlineCallbacks
    def _reconcile(self) -> Any:
        # What each VM was before libvirt is asked: a VM that changes while the listing
        # is under way is asked about again (the listing is stale for it), and a VM
        # that appears meanwhile is a creation of this process, not ours to reconcile.
        before = {ip: vm.local for ip, vm in self.ctx.table.vms.items()}
        summaries = yield self.ctx.domains.list()
        by_ip = {}
        for s in summaries:
            ip = ip_from_domain_name(s.name)
            if s.ours and ip and s.hypervisor in ("", self.ctx.state.uuid):
                by_ip[ip] = s
        for ip, s in by_ip.items():
            if ip not in self.ctx.table.vms:
                self.log.warn(
                    "libvirt domain {name} is tagged as ours but {ip} has no state in "
                    "{dir}; left alone (destroy it with virsh if it is not wanted)",
                    name=s.name,
                    ip=ip,
                    dir=self.ctx.state.vms_path,
                )
        listed = [(vm, before[vm.ip]) for vm in self.ctx.table.vms.values() if vm.ip in before]
        for vm, local in listed:
            summary = by_ip.get(vm.ip)
            try:
                yield vm.lock.run(self._reconcile_vm, vm, summary, local)
            except NotConnected:
                raise
            except Exception as e:
                self.log.error("VM {ip}: reconciliation failed: {e}", ip=vm.ip, e=e)

    @inlineCallbacks
    def _reconcile_vm(self, vm: Vm, summary: Optional[domains.DomainSummary], listed: Any) -> Any:
        if vm.deleted or vm.creating:
            return  # a creation under way handles its own VM (and undoes its failures)
        active = summary is not None and summary.active
        if vm.local is not listed:
            # The VM changed while we waited for its lock (a stop or start ran): the
            # listing is stale for it; ask libvirt again.
            uuid = yield self.ctx.domains.uuid_of(domain_name(vm.ip))
            active = bool(uuid) and (yield self.ctx.domains.is_active(uuid))
            summary = (
                None
                if not uuid
                else domains.DomainSummary(
                    name=domain_name(vm.ip),
                    uuid=uuid,
                    state="",
                    active=active,
                    ours=True,
                    ip_address=vm.ip,
                )
            )
        if active and summary is not None and not vm.domain_uuid:
            vm.domain_uuid = summary.uuid
        table = self.ctx.table
        state = vm.info.State
        if (
            vm.pending is not None
            and vm.pending.get("Phase") == "creating"
            and vm.pending.get("Migration") == "in"
            and not vm.info.Uncommitted
        ):
            # A migrated VM committed just before a crash: it is ours now.
            yield self.ctx.writer.remove(os.path.join(vm.directory, PENDING_FILE))
            vm.pending = None
        if vm.pending is not None and vm.pending.get("Phase") == "creating":
            self.log.warn(
                "VM {ip}: its creation was interrupted (the client never got "
                "its address): removing it",
                ip=vm.ip,
            )
            table.record_state(vm, State.DESTROYING)
            yield self.lifecycle.remove_vm(vm)
            return
        if state in SHOULD_RUN:
            if active:
                if state == State.STARTING:
                    table.record_state(vm, State.RUNNING)
                return
            self.log.warn(
                "VM {ip} should be {state} but its domain is not running: " "starting it",
                ip=vm.ip,
                state=state.value,
            )
            try:
                yield self.lifecycle.start_domain(vm)
            except Exception as e:
                self.log.error("VM {ip} failed to start: {e}", ip=vm.ip, e=e)
        elif state == State.STOPPING:
            if active:
                yield self.lifecycle.force_off(vm)
            self.log.info("VM {ip}: completing an interrupted stop", ip=vm.ip)
            table.record_state(vm, State.STOPPED)
        elif state == State.DESTROYING:
            self.log.info("VM {ip}: completing an interrupted destroy", ip=vm.ip)
            yield self.lifecycle.remove_vm(vm)
        elif active and state != State.MIGRATING:
            self.log.warn(
                "VM {ip} is recorded {state} but its domain runs: now " "recorded running",
                ip=vm.ip,
                state=state.value,
            )
            table.record_state(vm, State.RUNNING)
