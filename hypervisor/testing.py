"""
Fakes for tests (ours and downstream): a libvirt connection whose failures and
close events a test controls.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class FakeLibvirtConnection:
    """
    The parts of C{libvirt.virConnect} that L{hypervisor.virt.connection} uses.

    @ivar closed: whether C{close} was called.
    @ivar close_callback: the callback registered for connection close, if any.
    """

    def __init__(self) -> None:
        self.closed = False
        self.close_callback: Optional[Callable[..., Any]] = None
        self.event_callbacks: dict[int, Callable[..., Any]] = {}
        self.keepalive: Optional[tuple[int, int]] = None
        self._next_id = 1

    def registerCloseCallback(self, cb: Callable[..., Any], opaque: object) -> int:
        self.close_callback = cb
        return 0

    def unregisterCloseCallback(self) -> int:
        self.close_callback = None
        return 0

    def domainEventRegisterAny(
        self, dom: object, event_id: int, cb: Callable[..., Any], opaque: object
    ) -> int:
        callback_id = self._next_id
        self._next_id += 1
        self.event_callbacks[callback_id] = cb
        return callback_id

    def domainEventDeregisterAny(self, callback_id: int) -> int:
        self.event_callbacks.pop(callback_id, None)
        return 0

    def setKeepAlive(self, interval: int, count: int) -> int:
        self.keepalive = (interval, count)
        return 0

    def close(self) -> int:
        self.closed = True
        return 0

    def simulate_close(self, reason: int = 1) -> None:
        """
        Act as libvirt does when libvirtd goes away (reason 1: end of file).
        """
        assert self.close_callback is not None, "no close callback registered"
        self.close_callback(self, reason, None)


class FakeOpener:
    """
    A replacement for C{libvirt.open}: fails while C{failures} is positive, else
    returns a new L{FakeLibvirtConnection}.
    """

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.attempts = 0
        self.connections: list[FakeLibvirtConnection] = []

    def __call__(self, uri: str) -> FakeLibvirtConnection:
        self.attempts += 1
        if self.failures > 0:
            self.failures -= 1
            raise OSError(f"Failed to connect socket to '{uri}': Connection refused")
        conn = FakeLibvirtConnection()
        self.connections.append(conn)
        return conn


class FakeHost:
    """
    A host for capacity checks: fixed CPUs and memory; real statvfs unless storage
    is given.
    """

    def __init__(self, cpus: int = 4, memory_mib: int = 8192,
                 available_mib: Optional[int] = None,
                 storage: Optional[tuple[int, int]] = None) -> None:
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.available_mib = memory_mib if available_mib is None else available_mib
        self.storage_override = storage

    def num_cpus(self) -> int:
        return self.cpus

    def memory(self) -> tuple[int, int]:
        return self.memory_mib, self.available_mib

    def storage(self, directory: str) -> tuple[int, int]:
        if self.storage_override is not None:
            return self.storage_override
        import os

        st = os.statvfs(directory)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize


def synchronous(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """
    A C{run_blocking} that runs the function at once (for tests with a fake clock).
    """
    from twisted.internet.defer import fail, succeed

    try:
        return succeed(fn(*args, **kwargs))
    except Exception:
        return fail()
