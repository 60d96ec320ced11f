# -*- test-case-name: tests.test_manager_vms -*-
"""
One VM as the manager holds it, the reference's state machine rules and filters.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime

from hypervisor.errors import WrongState
from hypervisor.model import LocalVmInfo, State, VmFilter, VmInfo

# Which operation may start from which state (reference §2.2).
START_FROM = {State.STOPPED, State.FAILED_TO_START, State.EXPORTING, State.CRASHED}
STOP_FROM_RUNNING = {State.RUNNING, State.DEBUGGING}
STOP_FROM_IDLE = {State.FAILED_TO_START, State.CRASHED}
DESTROY_RUNNING = {State.RUNNING, State.DEBUGGING}
DESTROY_IDLE = {
    State.STOPPED,
    State.FAILED_TO_START,
    State.MIGRATING,
    State.EXPORTING,
    State.CRASHED,
}
STATE_NUMBERS = {state: number for number, state in enumerate(State)}
SHOULD_RUN = {State.STARTING, State.RUNNING, State.DEBUGGING}


class Vm:
    """
    A VM: its persisted info, its lock, and transient bookkeeping.

    @ivar local: what C{info.json} holds.
    @ivar directory: C{<stateDir>/VMs/<IP>}.
    @ivar lock: serialises this VM's mutations (other VMs are not blocked).
    @ivar expecting_stop: we asked libvirt to stop the domain (events are expected).
    @ivar deleted: the VM is gone; late events and waiters ignore it.
    @ivar pending: the VM's C{pending.json} while its creation is unfinished
        (C{{"Phase": "creating"}}) or unacknowledged (C{{"Phase": "acknowledge"}}).
    @ivar wire: the encoded GetVmInfo reply, kept until the VM changes (None: not made
        yet, or stale).
    @ivar info_json: its VmInfo's encoding, kept likewise (pages, GetVmInfos).
    @ivar page_row: its /listVMs row (figures and HTML), kept likewise.
    @ivar sort_key: the numeric order of its primary IP (which never changes).
    @ivar kernel: the root volume directory holds a C{kernel} (and C{initrd}) for
        direct kernel boot (known without touching the disk).
    @ivar creating: this process is creating the VM right now (its CreateVm has not
        ended): the reconciliation leaves it to the creation, which undoes its own
        failures. A VM whose C{pending.json} says C{creating} without this was being
        created by a daemon that died: the reconciliation removes it.
    @ivar domain_uuid: the UUID of the libvirt domain we last started for it (events
        of older domains are ignored).
    """

    __slots__ = (
        "local",
        "directory",
        "lock",
        "expecting_stop",
        "deleted",
        "pending",
        "creating",
        "domain_uuid",
        "kernel",
        "initrd",
        "wire",
        "info_json",
        "page_row",
        "sort_key",
        "_stop_waiters",
    )

    def __init__(self, local: LocalVmInfo, directory: str) -> None:
        self.local = local
        self.directory = directory
        self.lock = DeferredLock()
        self.expecting_stop = False
        self.deleted = False
        self.pending: Optional[dict[str, Any]] = None
        self.creating = False
        self.domain_uuid = ""
        self.kernel = False
        self.initrd = False
        self.wire: Optional[bytes] = None
        self.info_json: Optional[bytes] = None
        self.page_row: Optional[Any] = None
        self.sort_key = ip_sort_key(local.VmInfo.Address.IpAddress)
        self._stop_waiters: list[Deferred[bool]] = []

    @property
    def info(self) -> VmInfo:
        """
        The VM's VmInfo.
        """
        return self.local.VmInfo

    @property
    def ip(self) -> str:
        """
        The VM's primary IP (its key).
        """
        return self.local.VmInfo.Address.IpAddress

    def changed(self) -> None:
        """
        Drop what is kept derived from the VM's info (it changed).
        """
        self.wire = None
        self.info_json = None
        self.page_row = None

    def encoded_info(self) -> bytes:
        """
        The VM's VmInfo as JSON, kept until it changes.
        """
        if self.info_json is None:
            from hypervisor import codec

            self.info_json = codec.encode(self.info)
        return self.info_json

    def require_state(self, allowed: set[State], operation: str) -> None:
        """
        Refuse C{operation} unless the VM is in one of C{allowed}.
        """
        if self.info.State not in allowed:
            wanted = ", ".join(sorted(s.value for s in allowed))
            raise WrongState(
                f"cannot {operation} VM {self.ip}: it is {self.info.State.value} "
                f"(needs: {wanted})"
            )

    def wait_stopped(self, reactor: IReactorTime, timeout: float) -> "Deferred[bool]":
        """
        Fire with True when the domain stops, or False after C{timeout} seconds.
        """
        d: Deferred[bool] = Deferred()
        self._stop_waiters.append(d)
        call = reactor.callLater(timeout, self._time_out, d)

        def cancel_timer(result: bool) -> bool:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(cancel_timer)

    def _time_out(self, d: "Deferred[bool]") -> None:
        if d in self._stop_waiters:
            self._stop_waiters.remove(d)
            d.callback(False)

    def domain_stopped(self) -> None:
        """
        The domain stopped: wake everyone waiting for it.
        """
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(True)


def matches(info: VmInfo, f: VmFilter) -> bool:
    """
    The reference's ListVMs/GetVmInfos filters.
    """
    if f.IgnoreStateMask and f.IgnoreStateMask & (1 << STATE_NUMBERS[info.State]):
        return False
    if f.OwnerGroups and not set(f.OwnerGroups) & set(info.OwnerGroups):
        return False
    if f.OwnerUsers and not set(f.OwnerUsers) & set(info.OwnerUsers):
        return False
    for key, values in f.VmTagsToMatch.items():
        if key not in info.Tags:
            return False
        if values and info.Tags[key] not in values:
            return False
    return True


def ip_sort_key(ip: str) -> tuple[int, int]:
    """
    Numeric order of IPv4 addresses (unparsable ones last).
    """
    try:
        return (0, int(ipaddress.IPv4Address(ip)))
    except ValueError:
        return (1, 0)
