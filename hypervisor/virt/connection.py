# -*- test-case-name: tests.test_virt_connection -*-
"""
The C{libvirt} service: one connection to C{-libvirtUri}, kept alive and reconnected.

- libvirt's default event loop runs in one daemon thread (registered once per
  process, before any connection is opened); every libvirt callback hops onto the
  reactor at once with C{callFromThread}.
- Every blocking libvirt call runs on one bounded L{ThreadPool} owned by this service
  (L{LibvirtService.call}); the reactor thread never waits on libvirtd.
- Keepalive (5 s interval, 3 missed) detects a hung libvirtd; the close callback
  detects a dead one. Either way the service logs it, reports itself disconnected
  (C{/healthz} answers 503), tells its listeners, and reconnects with exponential
  back-off; on reconnect it registers for events again and tells its listeners, so
  the manager can reconcile.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from hypervisor.errors import Unavailable

T = TypeVar("T")

KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3

_event_loop_lock = threading.Lock()
_event_loop_started = False

CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "client closed"}


def start_event_loop() -> None:
    """
    Register libvirt's default event implementation and run it in a daemon thread.

    Idempotent. Must run before the first C{libvirt.open} of the process: connections
    opened earlier never deliver events.
    """
    global _event_loop_started
    import libvirt

    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; they reach us as
        # exceptions, which we log where they matter.
        libvirt.registerErrorHandler(lambda ctx, err: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, daemon=True, name="libvirt-events").start()
        _event_loop_started = True


class NotConnected(Unavailable):
    """
    libvirt is not connected right now (HTTP 503); the message says why and that we
    reconnect.
    """


def is_connection_error(error: BaseException) -> bool:
    """
    Whether a libvirt error means the connection to libvirtd broke (not that the
    operation itself failed).
    """
    try:
        import libvirt
    except ImportError:  # pragma: no cover - libvirt is a dependency
        return False
    if not isinstance(error, libvirt.libvirtError):
        return False
    code = error.get_error_code()
    domain = error.get_error_domain()
    return code in (
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_RPC,
    ) or (
        domain in (libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE)
        and code in (libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR)
    )


class IConnectionListener(Protocol):
    """
    What the libvirt service tells the rest of the daemon (on the reactor thread).
    """

    def libvirt_connected(self) -> None:
        """
        A (re)connection is established and events are registered.
        """

    def libvirt_disconnected(self, reason: str) -> None:
        """
        The connection was lost; the service is reconnecting.
        """

    def domain_lifecycle(self, name: str, uuid: str, event: int, detail: int) -> None:
        """
        A domain lifecycle event (libvirt's VIR_DOMAIN_EVENT_* codes).
        """


def _default_open(uri: str) -> Any:
    import libvirt

    return libvirt.open(uri)


class LibvirtService(Service):
    """
    The connection to libvirtd, its events, and the bounded pool for blocking calls.

    @ivar uri: the libvirt URI.
    @ivar connected: whether a connection is up.
    @ivar reason: why not connected (empty when connected).
    @ivar connects: how many times a connection was established.
    @ivar disconnects: how many times an established connection was lost.
    @ivar connected_since: reactor time of the current connection, or None.
    """

    name = "libvirt"
    log = Logger()

    def __init__(
        self,
        uri: str,
        reactor: Any,
        *,
        max_threads: int = 8,
        open_connection: Callable[[str], Any] = _default_open,
        min_backoff: float = 0.25,
        max_backoff: float = 8.0,
        use_event_loop: bool = True,
    ) -> None:
        self.uri = uri
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=max_threads, name="libvirt")
        self._open = open_connection
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._use_event_loop = use_event_loop
        self._conn: Any = None
        self._callback_ids: list[int] = []
        self._listeners: list[IConnectionListener] = []
        self._holds: list[Deferred[Any]] = []
        self._in_flight: set[Deferred[None]] = set()
        self._retry: Optional[IDelayedCall] = None
        self._backoff = min_backoff
        self._attempts = 0
        self._connecting = False
        self.connected = False
        self.reason = "not connected yet"
        self.connects = 0
        self.disconnects = 0
        self.connected_since: Optional[float] = None
        self.lost_reason = ""
        self.lost_at: Optional[float] = None

    # Listeners ---------------------------------------------------------------

    def add_listener(self, listener: IConnectionListener) -> None:
        """
        Tell C{listener} about connections, disconnections and domain events.
        """
        self._listeners.append(listener)

    def _notify(self, method: str, *args: Any) -> None:
        for listener in list(self._listeners):
            try:
                getattr(listener, method)(*args)
            except Exception:
                self.log.failure(
                    "libvirt listener {listener!r}.{method} failed",
                    listener=listener,
                    method=method,
                )

    # Blocking calls ------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """
        Run C{fn(connection, *args, **kwargs)} on the libvirt thread pool.

        @return: a Deferred firing with its result, or failing with L{NotConnected}
            at once when there is no connection or when the call found it broken,
            or with the libvirt error.
        """
        conn = self._conn
        if conn is None:
            return fail(NotConnected(self._unavailable()))
        d = deferToThreadPool(self.reactor, self.pool, fn, conn, *args, **kwargs)
        # The connection is closed at stop only once calls using it have returned.
        done: Deferred[None] = Deferred()
        self._in_flight.add(done)

        def finished(result: Any) -> Any:
            self._in_flight.discard(done)
            done.callback(None)
            if (
                isinstance(result, Failure)
                and result.value is not None
                and is_connection_error(result.value)
            ):
                message = result.getErrorMessage()
                if conn is self._conn:
                    self.lose_connection(message)
                return Failure(NotConnected(self._unavailable()))
            return result

        return d.addBoth(finished)

    def _unavailable(self) -> str:
        return (
            f"{self.describe()}; nothing was changed: try again once libvirtd is "
            "back (it is reconnected automatically)"
        )

    def run_blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """
        Run C{fn(*args, **kwargs)} (no connection needed) on the libvirt thread pool.
        """
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)

    def describe(self) -> str:
        """
        One sentence for operators: the connection state and what is being done.
        """
        if self.connected:
            return f"connected to libvirt at {self.uri}"
        if not self.running:
            return f"not connected to libvirt at {self.uri}: the service is stopped"
        lost = ""
        if self.lost_reason and self.lost_at is not None:
            ago = self.reactor.seconds() - self.lost_at
            lost = f"{self.lost_reason} {ago:.0f}s ago; "
        retry = ""
        if self._retry is not None and self._retry.active():
            delay = max(0.0, self._retry.getTime() - self.reactor.seconds())
            retry = f"; reconnect attempt {self._attempts + 1} in {delay:.1f}s"
        elif self._connecting:
            retry = f"; connecting (attempt {self._attempts})"
        return f"not connected to libvirt at {self.uri}: {lost}{self.reason}{retry}"

    # Service -----------------------------------------------------------------

    def startService(self) -> None:
        """
        Start the thread pool and the first connection attempt (without waiting).
        """
        super().startService()
        if self._use_event_loop:
            start_event_loop()
        self.pool.start()
        self._connect()

    def keep_open_until(self, d: "Deferred[Any]") -> None:
        """
        Keep the connection open at stop until C{d} fires (e.g. VMs shutting down).
        """
        self._holds.append(d)

    def stopService(self) -> "Deferred[None]":
        """
        Stop reconnecting; once every L{keep_open_until} Deferred has fired and every
        call in flight has returned, close the connection and stop the thread pool.
        """
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        holds = DeferredList(self._holds, consumeErrors=True)
        self._holds = []

        def drain(_: object) -> "Deferred[Any]":
            # Calls made while holds ran (e.g. powering VMs down) are waited for too.
            return DeferredList(list(self._in_flight), consumeErrors=True)

        holds.addCallback(drain)

        def close(_: object) -> "Deferred[Any]":
            conn, ids = self._conn, self._callback_ids
            self._conn, self._callback_ids = None, []
            self.connected = False
            self.reason = "the service is stopped"
            if conn is None:
                return succeed(None)
            d = deferToThreadPool(self.reactor, self.pool, self._close_blocking, conn, ids)
            d.addErrback(lambda f: self.log.failure("closing libvirt connection", f))
            return d

        def stop_pool(_: object) -> None:
            # Joins idle workers; a call stuck in libvirtd ends with keepalive.
            self.pool.stop()

        return holds.addCallback(close).addCallback(stop_pool)

    # Connecting ------------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        if not self.running or self._connecting:
            return
        self._connecting = True
        self._attempts += 1
        d = deferToThreadPool(self.reactor, self.pool, self._open_blocking)
        d.addCallbacks(self._opened, self._open_failed)
        d.addErrback(lambda f: self.log.failure("libvirt connect handling", f))

    def _open_blocking(self) -> tuple[Any, list[int]]:
        import libvirt

        conn = self._open(self.uri)
        ids: list[int] = []
        try:
            conn.registerCloseCallback(self._close_callback, None)
            ids.append(
                conn.domainEventRegisterAny(
                    None,
                    libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                    self._lifecycle_callback,
                    None,
                )
            )
            if self._use_event_loop:
                try:
                    conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
                except libvirt.libvirtError as e:
                    # Drivers without a daemon (test://) have no keepalive.
                    if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                        raise
        except BaseException:
            self._close_blocking(conn, ids)
            raise
        return conn, ids

    @staticmethod
    def _close_blocking(conn: Any, ids: list[int]) -> None:
        # Best effort: the connection is usually already dead (libvirtd went away),
        # and every step fails then; nothing is left to undo either way.
        for callback_id in ids:
            try:
                conn.domainEventDeregisterAny(callback_id)
            except Exception:
                pass
        try:
            conn.unregisterCloseCallback()
        except Exception:
            pass
        try:
            conn.close()
        except Exception:
            pass

    def _opened(self, result: tuple[Any, list[int]]) -> None:
        self._connecting = False
        conn, ids = result
        if not self.running:
            self.run_blocking(self._close_blocking, conn, ids)
            return
        self._conn, self._callback_ids = conn, ids
        self.connected = True
        self.reason = ""
        self.connects += 1
        self.connected_since = self.reactor.seconds()
        self._backoff = self._min_backoff
        self._attempts = 0
        self.lost_reason = ""
        self.lost_at = None
        if self.connects > 1:
            self.log.info("reconnected to libvirt at {uri}", uri=self.uri)
        else:
            self.log.info("connected to libvirt at {uri}", uri=self.uri)
        self._notify("libvirt_connected")

    def _open_failed(self, failure: Failure) -> None:
        self._connecting = False
        self.reason = f"last attempt failed: {failure.getErrorMessage()}"
        if self._attempts == 1 or self._attempts % 10 == 0:
            self.log.warn(
                "libvirt at {uri} unreachable (attempt {n}): {why}; is libvirtd "
                "running? retrying",
                uri=self.uri,
                n=self._attempts,
                why=failure.getErrorMessage(),
            )
        self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if not self.running:
            return
        delay = self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)
        self._retry = self.reactor.callLater(delay, self._connect)

    # Callbacks from the libvirt event thread ---------------------------------

    def _close_callback(self, conn: Any, reason: int, opaque: object) -> None:
        self.reactor.callFromThread(self._lost, conn, reason)

    def _lifecycle_callback(
        self, conn: Any, dom: Any, event: int, detail: int, opaque: object
    ) -> None:
        try:
            name, uuid = dom.name(), dom.UUIDString()
        except Exception:
            return
        self.reactor.callFromThread(self._lifecycle, conn, name, uuid, event, detail)

    # ...handled on the reactor ------------------------------------------------

    def _lifecycle(self, conn: Any, name: str, uuid: str, event: int, detail: int) -> None:
        if conn is not self._conn:
            return
        self._notify("domain_lifecycle", name, uuid, event, detail)

    def _lost(self, conn: Any, reason: int) -> None:
        if conn is not self._conn:
            return
        self.lose_connection(CLOSE_REASONS.get(reason, f"reason {reason}"))

    def lose_connection(self, why: str) -> None:
        """
        Treat the connection as lost (libvirt closed it, or a call found it dead).
        """
        conn, ids = self._conn, self._callback_ids
        if conn is None:
            return
        self._conn, self._callback_ids = None, []
        self.connected = False
        self.connected_since = None
        self.disconnects += 1
        self.reason = "reconnecting"
        self.lost_reason = f"connection lost ({why})"
        self.lost_at = self.reactor.seconds()
        self.log.error(
            "lost the connection to libvirt at {uri} ({why}); VMs keep running, " "reconnecting",
            uri=self.uri,
            why=why,
        )
        self.run_blocking(self._close_blocking, conn, ids)
        self._notify("libvirt_disconnected", self.lost_reason)
        self._schedule_reconnect()
