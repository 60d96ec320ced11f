# -*- test-case-name: tests.test_manager_clock -*-
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

    def __init__(
        self,
        cpus: int = 4,
        memory_mib: int = 8192,
        available_mib: Optional[int] = None,
        storage: Optional[tuple[int, int]] = None,
    ) -> None:
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


class SynchronousRunner:
    """
    An L{hypervisor.diskio.IBlockingRunner} that runs each function at once, on the
    calling thread (manager tests on a C{Clock}).

    @ivar calls: how many functions it ran.
    """

    def __init__(self) -> None:
        self.calls = 0

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Run C{fn} now; return a fired Deferred.
        """
        from twisted.internet.defer import fail, succeed

        self.calls += 1
        try:
            return succeed(fn(*args, **kwargs))
        except BaseException:
            return fail()

    def from_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """
        Call C{fn(*args)} now (there is no other thread).
        """
        fn(*args)


class FailingWrites:
    """
    A state-file writer function that raises C{OSError} on chosen writes (fault
    injection): the Nth write (1-based, counting every write and removal), or every
    write while C{failing} is set.

    @ivar count: writes attempted so far.
    @ivar failed: paths whose write was made to fail.
    """

    def __init__(self, fail_at: Optional[int] = None, error: int = 5) -> None:
        from hypervisor.diskio import _write

        self._write = _write
        self.fail_at = fail_at
        self.error = error
        self.failing = False
        self.count = 0
        self.failed: list[str] = []

    def __call__(self, path: str, data: Optional[bytes], mode: int) -> None:
        import os

        self.count += 1
        if self.failing or self.count == self.fail_at:
            self.failed.append(path)
            raise OSError(self.error, os.strerror(self.error), path)
        self._write(path, data, mode)


class FakeDomains:
    """
    An L{hypervisor.virt.domains.IDomains} in memory: domains start and stop at once
    and lifecycle events reach the listeners after C{event_delay} seconds of the
    given clock (a guest that powers itself off: L{power_off}).

    @ivar domains: running domains, name -> uuid.
    @ivar fail_create: an exception the next create raises (then cleared).
    @ivar connected: set False to act as if libvirtd were gone.
    """

    def __init__(self, reactor: Any, event_delay: float = 0.0) -> None:
        self.reactor = reactor
        self.event_delay = event_delay
        self.connected = True
        self.domains: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.listeners: list[Any] = []
        self.fail_create: Optional[BaseException] = None
        self.ignore_shutdown = False
        self.created = 0
        self._next = 0

    def describe(self) -> str:
        """
        The connection state, as a sentence.
        """
        return (
            "connected to fake libvirt"
            if self.connected
            else "not connected to fake libvirt: it is down"
        )

    def add_listener(self, listener: Any) -> None:
        """
        Tell C{listener} about events.
        """
        self.listeners.append(listener)

    def keep_open_until(self, d: Any) -> None:
        """
        Nothing to keep open.
        """

    def _call(self, fn: Callable[[], Any]) -> Any:
        from twisted.internet.defer import fail, succeed

        from hypervisor.virt.connection import NotConnected

        if not self.connected:
            return fail(NotConnected(self.describe()))
        try:
            return succeed(fn())
        except BaseException:
            return fail()

    def _event(self, name: str, uuid: str, event: int, detail: int) -> None:
        def deliver() -> None:
            for listener in list(self.listeners):
                listener.domain_lifecycle(name, uuid, event, detail)

        self.reactor.callLater(self.event_delay, deliver)

    def list(self) -> Any:
        """
        Every running domain, all ours.
        """
        from hypervisor.virt.domains import DomainSummary
        from hypervisor.virt.domainxml import ip_from_domain_name

        return self._call(
            lambda: [
                DomainSummary(
                    name=name,
                    uuid=uuid,
                    state="running",
                    active=True,
                    ours=True,
                    ip_address=ip_from_domain_name(name),
                )
                for name, uuid in self.domains.items()
            ]
        )

    def create(self, xml: str) -> Any:
        """
        Start a domain named as in C{xml}.
        """
        import re

        def create() -> str:
            if self.fail_create is not None:
                error, self.fail_create = self.fail_create, None
                raise error
            match = re.search(r"<name>([^<]+)</name>", xml)
            assert match is not None
            name = match.group(1)
            if name in self.domains:
                raise RuntimeError(f"domain {name} already runs")
            self._next += 1
            uuid = f"00000000-0000-0000-0000-{self._next:012d}"
            self.domains[name] = uuid
            self.names[uuid] = name
            self.created += 1
            self._event(name, uuid, 2, 0)
            return uuid

        return self._call(create)

    def uuid_of(self, name: str) -> Any:
        """
        The UUID of a running domain.
        """
        return self._call(lambda: self.domains.get(name))

    def _stop(self, uuid: str, detail: int) -> bool:
        name = self.names.get(uuid)
        if name is None or self.domains.get(name) != uuid:
            return False
        del self.domains[name]
        self._event(name, uuid, 5, detail)
        return True

    def request_shutdown(self, uuid: str) -> Any:
        """
        ACPI: the guest powers off (unless C{ignore_shutdown}).
        """

        def shutdown() -> bool:
            if self.names.get(uuid) not in self.domains:
                return False
            if not self.ignore_shutdown:
                self._stop(uuid, 0)
            return True

        return self._call(shutdown)

    def is_active(self, uuid: str) -> Any:
        """
        Whether it runs.
        """
        return self._call(
            lambda: self.names.get(uuid) in self.domains and self.domains[self.names[uuid]] == uuid
        )

    def force_off(self, uuid: str) -> Any:
        """
        Pull the plug.
        """
        return self._call(lambda: self._stop(uuid, 1))

    def send_ctrl_alt_del(self, uuid: str) -> Any:
        """
        Nothing happens (the guest reboots itself).
        """
        return self._call(lambda: None)

    def vnc_socket(self, uuid: str) -> Any:
        """
        Fake domains have no VNC server.
        """
        return self._call(lambda: "")

    def probe_kvm(self) -> Any:
        """
        TCG only.
        """
        return self._call(lambda: (False, "fake libvirt has no KVM"))

    def power_off(self, name: str, crashed: bool = False) -> None:
        """
        The guest powers itself off (or crashes).
        """
        uuid = self.domains.get(name)
        if uuid is not None:
            self._stop(uuid, 2 if crashed else 0)

    def lose_connection(self) -> None:
        """
        libvirtd goes away.
        """
        self.connected = False
        for listener in list(self.listeners):
            listener.libvirt_disconnected("fake libvirtd stopped")

    def reconnect(self) -> None:
        """
        libvirtd is back.
        """
        self.connected = True
        for listener in list(self.listeners):
            listener.libvirt_connected()
