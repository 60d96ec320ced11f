# -*- test-case-name: tests.test_metadata_real -*-
"""
The named service C{metadata}: for every bridge that carries a subnet with metadata
enabled, the plumbing of L{hypervisor.metadata.plumbing} and, inside the bridge's
namespace, a listening socket on C{169.254.169.254:80} serving
L{hypervisor.metadata.resource} (plus the hypervisor's own web port, so that a VM
with a certificate can call the hypervisor there, reference §6).

When it runs:

- at start (C{privilegedStartService}, as root, before the reactor runs): our
  leftovers from a daemon that did not stop cleanly are removed, then everything is
  made;
- when subnets or VMs change (the manager's listener API): the plan (bridges,
  subnets, VM address/MAC pairs) is computed on the reactor thread and applied on a
  disk thread only if it differs from the one applied;
- every L{REFRESH_INTERVAL} seconds: the bridges are listed again (a bridge that
  appears, disappears or was recreated is served, dropped or repaired);
- at stop: the sockets are closed, then our namespaces, veths and table removed.

Commands run one batch at a time (never two appliers at once).
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hypervisor.diskio import IBlockingRunner
from hypervisor.errors import InvalidRequest
from hypervisor.manager.network import bridge_for_subnet, discover_bridges, subnet_network
from hypervisor.metadata.backend import MetadataBackend
from hypervisor.metadata.plumbing import (
    BridgePlan,
    BridgeState,
    Plumbing,
    PlumbingError,
    open_socket,
)
from hypervisor.metadata.resource import MetadataMetrics, make_site
from hypervisor.model import Subnet, VmInfo

REFRESH_INTERVAL = 15.0
METADATA_PORT = 80


class MetadataService(Service):
    """
    The metadata server's namespaces and sockets around one L{MetadataBackend}.

    @ivar ports: listening ports by bridge.
    @ivar states: what was made per bridge.
    @ivar problems: why a bridge is not served, by name.
    @ivar only: when set (tests), the only bridges ever served.
    @ivar extra: (port, factory) also served in every namespace (the web port).
    """

    log = Logger()

    def __init__(
        self,
        backend: MetadataBackend,
        reactor: Any,
        *,
        runner: IBlockingRunner,
        tag: Callable[[], str],
        metrics: Optional[MetadataMetrics] = None,
        port: int = METADATA_PORT,
        extra: Optional[list[tuple[int, Any]]] = None,
        refresh_interval: float = REFRESH_INTERVAL,
        discover: Callable[[], dict[str, int]] = discover_bridges,
        only: Optional[set[str]] = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.backend = backend
        self.manager = backend.manager
        self.reactor = reactor
        self.runner = runner
        self.tag = tag
        self.metrics = metrics
        self.port = port
        self.extra = list(extra or [])
        self.refresh_interval = refresh_interval
        self.discover = discover
        self.only = only
        self.plumbing: Optional[Plumbing] = None
        self.bridges: dict[str, int] = {}
        self.ports: dict[str, list[IListeningPort]] = {}
        self.states: dict[str, BridgeState] = {}
        self.problems: dict[str, str] = {}
        self.notes: list[str] = []
        self.applied: Optional[list[BridgePlan]] = None
        self._loop: Optional[LoopingCall] = None
        self._busy = False
        self._again = False
        self._pending: Optional[Any] = None
        self._inflight: Optional[Deferred[None]] = None
        self._started = False

    # Plans --------------------------------------------------------------------------------

    def plans(self) -> list[BridgePlan]:
        """
        What every served bridge's namespace should hold, from the manager's subnets
        and VM addresses and the last list of bridges.
        """
        networks: dict[str, list[str]] = {}
        bridge_of_subnet: dict[str, str] = {}
        notes = []
        for subnet in self.manager.subnet_list():
            if subnet.DisableMetadata:
                continue
            try:
                bridge = bridge_for_subnet(subnet, self.bridges)
            except InvalidRequest as e:
                notes.append(str(e))
                continue
            if self.only is not None and bridge not in self.only:
                continue
            try:
                network = str(subnet_network(subnet))
            except ValueError as e:
                notes.append(f"subnet {subnet.Id!r}: {e}")
                continue
            bridge_of_subnet[subnet.Id] = bridge
            networks.setdefault(bridge, []).append(network)
        neighbours: dict[str, set[tuple[str, str]]] = {}
        for lease in self.manager.leases():
            subnet = lease.Subnet
            if subnet is None or subnet.Id not in bridge_of_subnet:
                continue
            if lease.IpAddress and lease.MacAddress:
                bridge = bridge_of_subnet[subnet.Id]
                neighbours.setdefault(bridge, set()).add((lease.IpAddress, lease.MacAddress))
        self.backend.bridge_of_subnet = bridge_of_subnet
        if notes != self.notes:
            self.notes = notes
            for note in notes:
                self.log.info("metadata: {note}", note=note)
        return [
            BridgePlan(
                bridge,
                tuple(sorted(set(networks[bridge]))),
                tuple(sorted(neighbours.get(bridge, ()))),
            )
            for bridge in sorted(networks)
        ]

    # Service ------------------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """
        Remove our leftovers and make everything (blocking, as root, before the
        reactor runs).
        """
        super().privilegedStartService()
        if self._started or not self.enabled:
            return
        self._started = True
        self.backend.start()
        self.manager.add_listener(self)
        self.plumbing = Plumbing(self.tag())
        try:
            for what in self.plumbing.clean_stale():
                self.log.warn(
                    "metadata: removed {what}, left by a daemon that did not stop cleanly",
                    what=what,
                )
        except (PlumbingError, OSError) as e:
            self.log.error("metadata: cannot remove leftovers: {e}", e=e)
        try:
            self.bridges = self.discover()
        except OSError as e:
            self.log.error("metadata: cannot list this host's bridges: {e}", e=e)
        plans = self.plans()
        try:
            results = self._apply(plans, {p.bridge for p in plans})
        except (PlumbingError, OSError) as e:
            self.log.error("metadata: cannot set up: {e}", e=e)
            return
        self._applied(plans, results)

    def startService(self) -> None:
        """
        Start refreshing.
        """
        if not self._started:
            self.privilegedStartService()
        super().startService()
        if not self.enabled:
            self.log.info("metadata: off (-metadataServer=false)")
            return
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.reactor
        self._loop.start(self.refresh_interval, now=False).addErrback(
            lambda f: self.log.failure("metadata refresh stopped", f)
        )

    def stopService(self) -> "Deferred[Any]":
        """
        Close the sockets; remove our namespaces, veths and table.
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if not self._started:
            return succeed(None)
        self._started = False
        self.manager.remove_listener(self)
        self.backend.stop()
        closing = [self._close(bridge) for bridge in list(self.ports)]
        if self._inflight is not None:
            # A sync still running on a thread would make its namespaces and table
            # again after we removed them: wait for it first.
            closing.append(self._inflight)
        plumbing = self.plumbing

        def remove(_: Any) -> Any:
            self.states.clear()
            self.applied = None
            if plumbing is None:
                return None
            # On a thread of its own: the manager's disk threads stop at the same
            # time as this service (MultiService stops its children together).
            return self._in_thread(plumbing.remove_all).addErrback(
                lambda f: self.log.error(
                    "metadata: cannot remove our namespaces: {why}", why=f.getErrorMessage()
                )
            )

        return DeferredList(closing, consumeErrors=True).addCallback(remove)

    def _in_thread(self, fn: Callable[[], Any]) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()

        def target() -> None:
            try:
                result = fn()
            except BaseException:  # noqa: BLE001 - handed to the Deferred
                self.reactor.callFromThread(d.errback, Failure())
            else:
                self.reactor.callFromThread(d.callback, result)

        threading.Thread(target=target, name="metadata-stop", daemon=True).start()
        return d

    # Manager listener ---------------------------------------------------------------------

    def vm_changed(self, info: VmInfo) -> None:
        """
        A VM changed: its addresses may have.
        """
        self.schedule()

    def vm_removed(self, ip: str, info: VmInfo) -> None:
        """
        A VM is gone.
        """
        self.schedule()

    def subnets_changed(self, subnets: list[Subnet]) -> None:
        """
        The subnets changed.
        """
        self.schedule()

    def schedule(self) -> None:
        """
        Sync soon (changes arriving together are applied together).
        """
        if self._pending is None or not self._pending.active():
            self._pending = self.reactor.callLater(0, self.sync)

    # Applying -----------------------------------------------------------------------------

    def refresh(self) -> "Deferred[None]":
        """
        List the bridges again (on a thread), then sync.
        """
        d: Deferred[dict[str, int]] = self.runner.run(self.discover)

        def listed(result: Any) -> Any:
            if isinstance(result, Failure):
                self.log.warn("metadata: cannot list bridges: {why}", why=result.getErrorMessage())
                return None
            if not self.running:
                return None
            self.bridges = result
            return self.sync(force=True)

        return d.addBoth(listed)

    def sync(self, force: bool = False) -> "Deferred[None]":
        """
        Apply the current plan if it differs from the one applied (or C{force}: the
        bridges were listed again, so repair what may be broken).
        """
        if not self._started or self.plumbing is None:
            return succeed(None)
        if self._busy:
            self._again = True
            return succeed(None)
        plans = self.plans()
        if plans == self.applied and not force:
            return succeed(None)
        self._busy = True
        wanted = {p.bridge for p in plans}
        closing = [self._close(bridge) for bridge in list(self.ports) if bridge not in wanted]
        need = {p.bridge for p in plans if p.bridge not in self.ports}

        def apply(_: Any) -> Any:
            return self.runner.run(self._apply, plans, need)

        def done(result: Any) -> None:
            self._busy = False
            self._inflight = None
            if isinstance(result, Failure):
                self.log.error("metadata: cannot set up: {why}", why=result.getErrorMessage())
                self.applied = None
            elif self._started:
                self._applied(plans, result)
            else:
                for state in result.values():
                    if isinstance(state, BridgeState):
                        for s in state.sockets:
                            s.close()
            if self._again:
                self._again = False
                self.schedule()

        d = DeferredList(closing, consumeErrors=True).addCallback(apply)
        d.addBoth(done)
        if self._busy:  # not done yet: a thread is applying it
            self._inflight = d
        return d

    def _apply(self, plans: list[BridgePlan], need: set[str]) -> dict[str, Any]:
        """
        On a thread: make the plans true; open sockets for bridges in C{need} and for
        namespaces made anew. Returns a L{BridgeState} or a problem per bridge.
        """
        plumbing = self.plumbing
        assert plumbing is not None
        wanted = {p.bridge for p in plans}
        prefix = plumbing.netns_name("")
        for name in plumbing.namespaces():
            bridge = name[len(prefix) :]
            if bridge not in wanted:
                plumbing.remove(bridge)
        results: dict[str, Any] = {}
        good = []
        for plan in plans:
            try:
                state = plumbing.ensure(plan)
                if state.created or plan.bridge in need:
                    ports = [self.port] + [port for port, _ in self.extra]
                    state.sockets = [open_socket(state.netns, port) for port in ports]
                results[plan.bridge] = state
                good.append(plan)
            except (PlumbingError, OSError) as e:
                results[plan.bridge] = str(e)
        try:
            plumbing.write_rules(good)
        except BaseException:
            for state in results.values():
                if isinstance(state, BridgeState):
                    for s in state.sockets:
                        s.close()
            raise
        return results

    def _applied(self, plans: list[BridgePlan], results: dict[str, Any]) -> None:
        self.applied = plans
        for bridge, state in results.items():
            if isinstance(state, str):
                if self.problems.get(bridge) != state:
                    self.log.warn("metadata: bridge {bridge}: {why}", bridge=bridge, why=state)
                self.problems[bridge] = state
                self.applied = None  # try again at the next refresh
                continue
            self.problems.pop(bridge, None)
            self.states[bridge] = state
            if state.sockets:
                if bridge in self.ports:
                    self._close(bridge)
                self._adopt(bridge, state)
        for bridge in list(self.states):
            if bridge not in results:
                del self.states[bridge]

    def _adopt(self, bridge: str, state: BridgeState) -> None:
        factories = [make_site(self.backend, bridge, self.metrics, self.reactor)]
        factories += [factory for _, factory in self.extra]
        ports = []
        for sock, factory in zip(state.sockets, factories):
            try:
                ports.append(self.reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, factory))
            finally:
                sock.close()  # the reactor holds its own duplicate
        state.sockets = []
        self.ports[bridge] = ports
        self.log.info(
            "metadata: serving {bridge} from namespace {netns}", bridge=bridge, netns=state.netns
        )

    def _close(self, bridge: str) -> "Deferred[Any]":
        ports = self.ports.pop(bridge, [])
        stopping = []
        for port in ports:
            result = port.stopListening()
            if isinstance(result, Deferred):
                stopping.append(result)
        return DeferredList(stopping, consumeErrors=True)

    # Status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """
        Served bridges, their namespaces and problems.
        """
        return {
            "bridges": {
                bridge: {"netns": state.netns, "veth": state.veth, "mac": state.mac}
                for bridge, state in sorted(self.states.items())
            },
            "problems": dict(self.problems),
            "notes": list(self.notes),
        }
