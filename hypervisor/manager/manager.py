# -*- test-case-name: tests.test_manager -*-
"""
The C{manager} service: owns the state directory and what the daemon knows of its
VMs, and decides what a stop does to them.

In this first form it prepares the state directory (lock, uuid, root cookie, leftover
temporary files), keeps an in-memory list of libvirt's domains refreshed on
connection and on lifecycle events (pages never call libvirt per request), decides
the domain type (C{-domainType auto} probes KVM), and on the stop after
C{stop-vms-on-next-stop} powers our VMs down (ACPI, then forced after
C{-vmShutdownTimeout}). Everything else leaves VMs running: they are libvirt's
processes, not ours.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from hypervisor.store import StateDirectory
from hypervisor.virt import domains
from hypervisor.virt.connection import LibvirtService

SHUTDOWN_POLL_INTERVAL = 0.5


class Manager(Service):
    """
    The VM manager service.

    @ivar state: the state directory.
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
    ) -> None:
        self.state = state
        self.libvirt = libvirt
        self.reactor = reactor
        self.requested_domain_type = domain_type
        self.vm_shutdown_timeout = vm_shutdown_timeout
        self.start_time: Optional[float] = None
        self.stop_vms_on_next_stop = False
        self.domains: dict[str, domains.DomainSummary] = {}
        self.domains_current = False
        self.domain_type: Optional[str] = None
        self.domain_type_reason = ""
        if domain_type != "auto":
            self.domain_type = domain_type
            self.domain_type_reason = "set by -domainType"
        self._refreshing: Optional[Deferred[None]] = None
        self._refresh_again = False
        self._probing = False
        libvirt.add_listener(self)

    # Service ---------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Prepare the state directory before anything else starts (and before twistd
        drops privileges).

        @raise hypervisor.store.StateDirectoryError: it cannot be used.
        """
        removed = self.state.prepare()
        for path in removed:
            self.log.warn("removed {path}, left by an interrupted write", path=path)
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Note the start time (the state directory is ready by now).
        """
        if not self.state.uuid:
            self.privilegedStartService()
        self.start_time = self.reactor.seconds()
        super().startService()
        self.log.info(
            "hypervisor {uuid} started with state directory {path}{disabled}",
            uuid=self.state.uuid, path=self.state.path,
            disabled=" (disabled: VM creation and starts are refused)"
            if self.state.disabled else "",
        )

    def stopService(self) -> "Deferred[None]":
        """
        Leave VMs running (or power them down after stop-vms-on-next-stop), remove the
        root cookie and release the state directory.
        """
        super().stopService()
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

    # libvirt listener ------------------------------------------------------

    def libvirt_connected(self) -> None:
        """
        Re-read the domain list; decide the domain type if still unknown.
        """
        self.refresh_domains()
        if self.domain_type is None and not self._probing:
            self._probe_domain_type()

    def libvirt_disconnected(self, reason: str) -> None:
        """
        Mark the domain list as stale until libvirt is back.
        """
        self.domains_current = False

    def domain_lifecycle(self, name: str, uuid: str, event: int, detail: int) -> None:
        """
        A domain changed: re-read the domain list.
        """
        self.refresh_domains()

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

        def failed(failure: Any) -> None:
            self.log.warn("KVM probe failed: {why}; will probe again on reconnect",
                          why=failure.getErrorMessage())

        def done(_: object) -> None:
            self._probing = False

        d.addCallbacks(got, failed).addBoth(done)

    @inlineCallbacks
    def shutdown_vms(self, timeout: float) -> Any:
        """
        Power our running VMs down: ACPI first, forced off after C{timeout} seconds.
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
