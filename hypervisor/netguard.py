# -*- test-case-name: tests.test_netguard -*-
"""
Connection limits for port 6976: no client, authenticated or not, can hold the
daemon's connections or file descriptors by connecting and then doing nothing.

How it fits together:

    - L{guard_factory} wraps the port's factory in a L{ConnectionGuard}; every
      connection's first protocol is a L{GuardedConnection} (a
      L{ProtocolWrapper}) sitting directly on the TCP transport, with everything
      else (the TLS sniffer, TLS, the HTTP channel) above it.
    - Each connection is in one L{Phase}. The guard moves it to C{WAITING} when it
      connects; the protocols above find the guard by walking their transport chain
      (L{find_guard}) and report progress with L{GuardedConnection.enter}:
      L{hypervisor.tls} reports C{HANDSHAKE} when the first byte is 0x16, the HTTP
      channel (L{web.channel}) reports C{WAITING} when the handshake completes,
      C{HEADERS} at the first byte of each request, C{BUSY} once its headers are
      complete and C{IDLE} when the request is done. Closing the connection (the
      guard sees every C{loseConnection}) is C{CLOSING}.
    - Every phase but C{BUSY} has a deadline (L{Limits}); a connection past its
      deadline is aborted (C{abortConnection}: a reset, no lingering close). A
      deadline is never reset within a phase: C{HEADERS} counts from the first
      byte of the request, however slowly the lines come. While the client is
      still reading output we sent it, the deadline is extended.
    - Connections not C{BUSY} are I{idle}: they are capped per source (an IPv4
      address or an IPv6 /64) and in total. A connection becoming idle beyond a cap
      sheds the oldest idle connection (the one idle the longest) of that source,
      or overall. A request in progress (a long upload, an update stream) is never
      shed.
    - All connections, busy or not, stay below a budget derived from the soft
      C{RLIMIT_NOFILE} (L{descriptor_budget}), so that port 6976 never takes the
      descriptors the rest of the daemon (libvirt, the control socket, files)
      needs. At the budget, a new connection sheds the oldest idle one, or is
      refused when every connection is busy.
    - L{GuardedPort} accepts connections; if C{accept} still fails for want of
      descriptors (C{EMFILE}, C{ENFILE}: something else used them), it sheds idle
      connections so the next attempt succeeds, or refuses the pending connections
      with a reserved descriptor so that it does not spin, and logs it at most once
      per L{LOG_INTERVAL} with a count.

L{raise_nofile_limit} raises the soft descriptor limit to the hard one at start.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import os
import resource
import socket
from collections import Counter, OrderedDict
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterable, Optional

from twisted.application import internet
from twisted.internet import tcp
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
)
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure

log = Logger()

FIRST_BYTE_TIMEOUT = 10.0
"""Seconds from connecting (or from the end of the TLS handshake) to the first byte."""
HANDSHAKE_TIMEOUT = 10.0
"""Seconds from the first byte of a TLS connection to the end of its handshake."""
HEADERS_TIMEOUT = 10.0
"""Seconds from the first byte of a request to the end of its headers (in total)."""
IDLE_TIMEOUT = 60.0
"""Seconds a keep-alive connection may wait for its next request."""
CLOSE_TIMEOUT = 10.0
"""Seconds a connection being closed may take to drain without progress."""

MAX_IDLE_PER_SOURCE = 64
"""Idle connections one source (IPv4 address, IPv6 /64) may hold."""
MAX_IDLE_TOTAL = 512
"""Idle connections all sources together may hold."""
MAX_CONNECTIONS = 4096
"""Connections (busy or not) at most, whatever the descriptor limit."""
MIN_RESERVED_DESCRIPTORS = 64
"""Descriptors always left to the rest of the daemon (at least; see L{descriptor_budget})."""
NOFILE_CEILING = 1 << 20
"""The soft descriptor limit is raised to the hard limit, but not above this."""

LOG_INTERVAL = 10.0
"""Seconds between two log lines about shed, aborted or refused connections."""
SHED_ON_EMFILE = 8
"""Idle connections shed each time C{accept} fails for want of descriptors."""
ACCEPT_PAUSE = 1.0
"""Seconds to stop accepting when out of descriptors and nothing can be freed."""
LISTEN_BACKLOG = 1024
"""The listen queue (Twisted's default of 50 drops SYNs in a burst of connections;
Go listens with the system's maximum)."""

_ACCEPT_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_nofile_limit(
    getrlimit: Callable[[int], tuple[int, int]] = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit (at most L{NOFILE_CEILING})
    and log the figure.

    @param getrlimit: L{resource.getrlimit} (a parameter for tests).
    @param setrlimit: L{resource.setrlimit} (a parameter for tests).
    @return: the soft limit now in force.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CEILING if hard == resource.RLIM_INFINITY else min(hard, NOFILE_CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            log.warn(
                "could not raise the file descriptor limit from {soft} to {target}"
                " ({why}); port connections are capped accordingly",
                soft=soft,
                target=target,
                why=e,
            )
        else:
            soft = target
    log.info(
        "file descriptor limit: {soft} (hard limit {hard}); port connections " "at most {budget}",
        soft=soft,
        hard="unlimited" if hard == resource.RLIM_INFINITY else hard,
        budget=descriptor_budget(soft),
    )
    return soft


def descriptor_budget(soft_limit: Optional[int] = None) -> int:
    """
    How many connections port 6976 may hold: the soft descriptor limit less a
    reserve for the rest of the daemon (an eighth, at least
    L{MIN_RESERVED_DESCRIPTORS}), at most L{MAX_CONNECTIONS}, at least 16.

    @param soft_limit: the soft C{RLIMIT_NOFILE}; the current one if None.
    """
    if soft_limit is None:
        soft_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft_limit == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    reserve = max(MIN_RESERVED_DESCRIPTORS, soft_limit // 8)
    return max(16, min(MAX_CONNECTIONS, soft_limit - reserve))


class Phase(enum.Enum):
    """
    Where a connection is; every phase but C{BUSY} counts as idle.
    """

    WAITING = "waiting for the first byte"
    HANDSHAKE = "in the TLS handshake"
    HEADERS = "reading request headers"
    BUSY = "processing a request"
    IDLE = "idle between requests"
    CLOSING = "closing"
    GONE = "closed"


@dataclass(frozen=True)
class Limits:
    """
    The deadlines (seconds) and caps a L{ConnectionGuard} enforces.

    @ivar max_connections: connections in total (busy or not); None for
        L{descriptor_budget} of the limit in force.
    """

    first_byte: float = FIRST_BYTE_TIMEOUT
    handshake: float = HANDSHAKE_TIMEOUT
    headers: float = HEADERS_TIMEOUT
    idle: float = IDLE_TIMEOUT
    closing: float = CLOSE_TIMEOUT
    max_idle_per_source: int = MAX_IDLE_PER_SOURCE
    max_idle_total: int = MAX_IDLE_TOTAL
    max_connections: Optional[int] = None

    def deadline(self, phase: Phase) -> Optional[float]:
        """
        The deadline of C{phase}, or None for none.
        """
        return self._deadlines.get(phase)

    @cached_property
    def _deadlines(self) -> dict[Phase, float]:
        # Built once: a phase changes three times per request.
        return {
            Phase.WAITING: self.first_byte,
            Phase.HANDSHAKE: self.handshake,
            Phase.HEADERS: self.headers,
            Phase.IDLE: self.idle,
            Phase.CLOSING: self.closing,
        }


_ABORT_REASONS = {
    Phase.WAITING: "aborted: no first byte",
    Phase.HANDSHAKE: "aborted: TLS handshake too slow",
    Phase.HEADERS: "aborted: request headers too slow",
    Phase.IDLE: "aborted: idle",
    Phase.CLOSING: "aborted: close not drained",
}


def source_key(address: Optional[IAddress]) -> str:
    """
    The source a connection is counted against: its IPv4 address, its IPv6 /64
    (an IPv4-mapped IPv6 address counts as IPv4), or the address as text.
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return str(address)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _unsent_bytes(transport: Any) -> int:
    """
    Bytes a TCP transport still has to send (0 when it cannot tell).

    Reads L{twisted.internet.abstract.FileDescriptor}'s buffer attributes; any other
    transport counts as having nothing to send.
    """
    try:
        return len(transport.dataBuffer) - int(transport.offset) + int(transport._tempDataLen)
    except (AttributeError, TypeError):
        return 0


class _Tally:
    """
    Counts events by kind and logs them at most once per interval: the first event
    at once, the rest as one summary line with counts at the end of the interval.
    """

    def __init__(self, clock: IReactorTime, interval: float, emit: Callable[[str], None]) -> None:
        self.clock = clock
        self.interval = interval
        self.emit = emit
        self.pending: Counter[str] = Counter()
        self.timer: Optional[IDelayedCall] = None

    def add(self, kind: str, count: int = 1) -> None:
        """
        Count C{count} events of C{kind}.
        """
        self.pending[kind] += count
        if self.timer is None:
            self._flush()

    def _flush(self) -> None:
        self.timer = None
        if not self.pending:
            return
        summary = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.pending.items()))
        self.pending.clear()
        self.emit(summary)
        self.timer = self.clock.callLater(self.interval, self._flush)

    def stop(self) -> None:
        """
        Log what is pending now and stop the timer.
        """
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        if self.pending:
            self.emit(", ".join(f"{kind} x{n}" for kind, n in sorted(self.pending.items())))
            self.pending.clear()


class GuardedConnection(ProtocolWrapper):
    """
    The bottom protocol of one guarded connection: tracks its L{Phase}, enforces
    the phase's deadline, and stands in as the transport of the protocol above.

    @ivar source: the key this connection is counted against (L{source_key}).
    @ivar phase: where the connection is now.
    """

    factory: "ConnectionGuard"

    def __init__(self, factory: "ConnectionGuard", wrapped: IProtocol, source: str) -> None:
        super().__init__(factory, wrapped)
        self.source = source
        self.phase: Optional[Phase] = None
        self._timer: Optional[IDelayedCall] = None
        self._unsent_at_arming = 0
        self._got_data = False

    def connectionMade(self) -> None:
        """
        Start in C{WAITING}, before the protocol above hears of the connection.

        Replies go out at once (C{TCP_NODELAY}): RPC is request/reply over a kept
        connection, where Nagle's algorithm holds a reply's last segment back until
        the client acknowledges the one before, which the client delays.
        """
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # not TCP after all (a socket pair in tests), or already gone
        self.enter(Phase.WAITING)

    def enter(self, phase: Phase) -> None:
        """
        Move to C{phase} and arm its deadline. Entering the current phase changes
        nothing (its deadline keeps running); a closing or closed connection stays
        so.
        """
        old = self.phase
        if phase is old or old in (Phase.CLOSING, Phase.GONE):
            return
        self.phase = phase
        self._arm(self.factory.limits.deadline(phase))
        self.factory._moved(self, old, phase)

    def _arm(self, seconds: Optional[float]) -> None:
        timer = self._timer
        if seconds is not None:
            self._unsent_at_arming = _unsent_bytes(self.transport)
            if timer is not None and timer.active():
                timer.reset(seconds)  # cheaper than a cancel and a new call
            else:
                self._timer = self.factory.clock.callLater(seconds, self._deadline_passed)
            return
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None

    def _deadline_passed(self) -> None:
        self._timer = None
        if self.phase in (None, Phase.BUSY, Phase.GONE):
            return
        unsent = _unsent_bytes(self.transport)
        if 0 < unsent < self._unsent_at_arming:
            # The client is still reading what we sent it: give it another period.
            self._arm(self.factory.limits.deadline(self.phase))
            return
        self.abort(_ABORT_REASONS.get(self.phase, "aborted"))

    def abort(self, why: Optional[str] = None) -> None:
        """
        Reset the connection now (no lingering TLS or TCP close); count C{why} among
        the guard's sheds and aborts when given.
        """
        if self.phase is Phase.GONE:
            return
        old = self.phase
        self.phase = Phase.GONE
        self._arm(None)
        self.factory._moved(self, old, Phase.GONE)
        if why is not None:
            self.factory._count(why)
        transport: Any = self.transport
        transport.abortConnection()

    # Transport side: what the protocol above asks of the connection.

    def dataReceived(self, data: bytes) -> None:
        """
        Pass data up; the connection's first byte, if nobody above claims it (as
        the TLS sniffer and the HTTP channel do), starts C{HEADERS}.
        """
        first = not self._got_data
        self._got_data = True
        super().dataReceived(data)
        if first and self.phase is Phase.WAITING:
            self.enter(Phase.HEADERS)

    def loseConnection(self) -> None:
        """
        Close after the output drains, within the C{CLOSING} deadline.
        """
        self.enter(Phase.CLOSING)
        super().loseConnection()

    def abortConnection(self) -> None:
        """
        Reset the connection at once (asked by the protocol above).
        """
        self.abort()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """
        Forget the connection, then tell the protocol above.
        """
        old = self.phase
        self.phase = Phase.GONE
        self._arm(None)
        if old is not Phase.GONE:
            self.factory._moved(self, old, Phase.GONE)
        super().connectionLost(reason)


def find_guard(transport: Any) -> Optional[GuardedConnection]:
    """
    The L{GuardedConnection} under a protocol: its transport, or its transport's
    transport (TLS), and so on; None when the connection is not guarded.
    """
    for _ in range(8):
        if transport is None:
            return None
        if isinstance(transport, GuardedConnection):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def _is_idle(phase: Optional[Phase]) -> bool:
    return phase not in (None, Phase.BUSY, Phase.GONE)


class ConnectionGuard(WrappingFactory[GuardedConnection]):
    """
    Wraps a port's factory: deadlines per connection, caps on idle connections per
    source and in total (oldest idle shed first), and a budget on all connections.

    @ivar limits: the L{Limits} in force.
    @ivar counts: how many connections were shed, aborted or refused, by reason,
        since the guard was made.
    """

    protocol = GuardedConnection

    def __init__(
        self,
        wrapped: IProtocolFactory,
        clock: IReactorTime,
        limits: Optional[Limits] = None,
        log_interval: float = LOG_INTERVAL,
    ) -> None:
        super().__init__(wrapped)
        self.clock = clock
        self.limits = limits or Limits()
        if self.limits.max_idle_per_source < 1 or self.limits.max_idle_total < 1:
            raise ValueError("idle connection caps must be at least 1")
        self.counts: Counter[str] = Counter()
        self._open: set[GuardedConnection] = set()
        self._idle: OrderedDict[GuardedConnection, None] = OrderedDict()
        self._idle_by_source: dict[str, OrderedDict[GuardedConnection, None]] = {}
        self._port_name = "?"
        self._tally = _Tally(clock, log_interval, self._log_tally)
        self._emfile = _Tally(clock, log_interval, self._log_emfile)

    @property
    def max_connections(self) -> int:
        """
        The budget on all connections: C{limits.max_connections}, or else
        L{descriptor_budget} of the soft descriptor limit in force now (so that a
        limit lowered while the daemon runs is honoured too).
        """
        if self.limits.max_connections is None:
            return descriptor_budget()
        return self.limits.max_connections

    def stopFactory(self) -> None:
        """
        Log what is still to be logged; stop the log timers.
        """
        self._tally.stop()
        self._emfile.stop()

    def tcp_server(
        self, port: int, interface: str = "", backlog: int = LISTEN_BACKLOG
    ) -> internet.TCPServer:
        """
        A C{TCPServer} service listening on C{port} for this guard with
        L{GuardedPort}, which copes with running out of descriptors.
        """
        return GuardedTCPServer(port, self, backlog, interface, reactor=self.clock)

    @property
    def open_connections(self) -> int:
        """
        Connections open and not being aborted.
        """
        return len(self._open)

    @property
    def idle_connections(self) -> int:
        """
        Open connections with no request in progress.
        """
        return len(self._idle)

    def buildProtocol(self, addr: IAddress) -> Optional[GuardedConnection]:  # type: ignore[override]
        """
        A guarded protocol for a new connection; at the connection budget, shed the
        oldest idle connection first, or refuse (None) when all are busy.
        """
        if len(self._open) >= self.max_connections:
            if not self._shed(self._idle, "shed: connection budget"):
                self._count("refused: all connections busy")
                return None
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped, source_key(addr))

    def _moved(self, conn: GuardedConnection, old: Optional[Phase], new: Phase) -> None:
        """
        Book-keeping for a phase change; enforce the caps when an idle one is added.
        """
        if old is None:
            self._open.add(conn)
        if new is Phase.GONE:
            self._open.discard(conn)
        was_idle, is_idle = _is_idle(old), _is_idle(new)
        if was_idle and not is_idle:
            self._idle.pop(conn, None)
            mine = self._idle_by_source.get(conn.source)
            if mine is not None:
                mine.pop(conn, None)
                if not mine:
                    del self._idle_by_source[conn.source]
        elif is_idle and not was_idle:
            self._idle[conn] = None
            mine = self._idle_by_source.setdefault(conn.source, OrderedDict())
            mine[conn] = None
            while len(mine) > self.limits.max_idle_per_source:
                self._shed(mine, "shed: idle connections per source")
            while len(self._idle) > self.limits.max_idle_total:
                self._shed(self._idle, "shed: idle connections in total")

    def _shed(self, idle: "OrderedDict[GuardedConnection, None]", why: str) -> bool:
        """
        Abort the oldest connection of C{idle}; False if there is none.
        """
        for conn in idle:
            conn.abort(why)
            return True
        return False

    def _count(self, why: str) -> None:
        self.counts[why] += 1
        self._tally.add(why)

    def out_of_descriptors(self, code: int) -> int:
        """
        C{accept} failed with C{code} (C{EMFILE}, C{ENFILE} ...): shed up to
        L{SHED_ON_EMFILE} idle connections so the next accept can succeed.

        @return: how many were shed.
        """
        self.counts[f"accept: {errno.errorcode.get(code, code)}"] += 1
        shed = 0
        while shed < SHED_ON_EMFILE and self._shed(self._idle, "shed: out of descriptors"):
            shed += 1
        self._emfile.add(errno.errorcode.get(code, str(code)))
        return shed

    def refused_without_descriptors(self, count: int) -> None:
        """
        C{count} pending connections were closed unserved: no descriptor was free.
        """
        self.counts["refused: out of descriptors"] += count
        self._emfile.add("connections refused", count)

    def _log_tally(self, summary: str) -> None:
        log.warn(
            "port {port}: {summary} ({open} connections open, {idle} idle; caps "
            "{per_source} idle per source, {total} idle in total, {budget} in all;"
            " logged at most every {interval:g}s)",
            port=self._port_name,
            summary=summary,
            open=len(self._open),
            idle=len(self._idle),
            per_source=self.limits.max_idle_per_source,
            total=self.limits.max_idle_total,
            budget=self.max_connections,
            interval=self._tally.interval,
        )

    def _log_emfile(self, summary: str) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.error(
            "port {port}: out of file descriptors accepting connections ({summary};"
            " descriptor limit {soft}, {open} connections open on this port; "
            "logged at most every {interval:g}s)",
            port=self._port_name,
            summary=summary,
            soft=soft,
            open=len(self._open),
            interval=self._emfile.interval,
        )


def guard_factory(
    factory: IProtocolFactory,
    reactor: Any,
    limits: Optional[Limits] = None,
    log_interval: float = LOG_INTERVAL,
) -> ConnectionGuard:
    """
    Wrap the port's factory with connection limits (see L{ConnectionGuard}).

    @param reactor: an L{IReactorTime} for the deadlines (the reactor, or a
        C{Clock} in tests); L{ConnectionGuard.tcp_server} also listens with it.
    """
    return ConnectionGuard(factory, reactor, limits, log_interval)


class _Reserve:
    """
    One descriptor held open (on /dev/null) so that it can be given up to accept
    and close connections when the process has no other descriptor.
    """

    def __init__(self) -> None:
        self.fd: Optional[int] = None

    def take(self) -> None:
        """
        Open the reserved descriptor if it is not open (best effort).
        """
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self.fd = None

    def release(self) -> bool:
        """
        Close the reserved descriptor; False if it was not open.
        """
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True


class GuardedPort(tcp.Port):
    """
    A TCP port that handles running out of descriptors on C{accept}: it asks its
    L{ConnectionGuard} to shed idle connections (so the pending connection is
    accepted on the next try), or, when there is nothing to shed, accepts and closes
    the pending connections on its own reserved descriptor (so it does not spin),
    or pauses accepting for L{ACCEPT_PAUSE} seconds. The guard logs it at most once
    per interval.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reserve = _Reserve()
        self._paused: Optional[IDelayedCall] = None

    def startListening(self) -> None:
        """
        Reserve a descriptor, then listen.
        """
        self._reserve.take()
        super().startListening()
        if isinstance(self.factory, ConnectionGuard):
            self.factory._port_name = str(self._realPortNumber)

    def connectionLost(self, reason: Any) -> None:
        """
        Give the reserved descriptor back when the port closes.
        """
        if self._paused is not None and self._paused.active():
            self._paused.cancel()
        self._paused = None
        self._reserve.release()
        super().connectionLost(reason)

    def doRead(self) -> None:
        """
        Accept the pending connections (at most C{numberAccepts} in a row).
        """
        accepted = 0
        try:
            for _ in range(self.numberAccepts):
                if self.disconnecting:
                    return
                try:
                    skt, addr = self.socket.accept()
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                        break
                    if e.errno in (errno.EPERM, errno.ECONNABORTED, errno.EINTR):
                        continue
                    if e.errno in _ACCEPT_RESOURCE_ERRORS:
                        self._out_of_descriptors(e.errno)
                        break
                    raise
                accepted += 1
                self._serve(skt, addr)
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = max(1, accepted)
        except BaseException:
            log.failure("port {port}: accepting a connection failed", port=self._realPortNumber)

    def _serve(self, skt: socket.socket, addr: Any) -> None:
        """
        Build the protocol and transport for an accepted socket (as L{tcp.Port}).
        """
        if len(addr) == 4:
            host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
            addr = tuple([host[0]] + list(addr[1:]))
        assert self.factory is not None
        protocol = self.factory.buildProtocol(self._buildAddr(addr))
        if protocol is None:
            skt.close()
            return
        session = self.sessionno
        self.sessionno = session + 1
        transport = self.transport(skt, protocol, addr, self, session, self.reactor)
        protocol.makeConnection(transport)

    def _out_of_descriptors(self, code: int) -> None:
        guard = self.factory if isinstance(self.factory, ConnectionGuard) else None
        if guard is not None and guard.out_of_descriptors(code) > 0:
            return  # the shed connections close on the next reactor turn
        if self._reserve.release():
            refused = 0
            try:
                for skt, _ in self._drain():
                    skt.close()
                    refused += 1
            finally:
                self._reserve.take()
            if guard is not None:
                guard.refused_without_descriptors(refused)
            else:
                log.error(
                    "port {port}: out of file descriptors; refused {n} connections",
                    port=self._realPortNumber,
                    n=refused,
                )
            if refused:
                return
        # Nothing to free and nothing accepted: stop trying for a moment.
        self.stopReading()
        clock: Any = self.reactor
        self._paused = clock.callLater(ACCEPT_PAUSE, self._resume)

    def _drain(self) -> Iterable[tuple[socket.socket, Any]]:
        """
        Accept pending connections until none is left or accept fails.
        """
        for _ in range(self.numberAccepts):
            try:
                yield self.socket.accept()
            except OSError:
                return

    def _resume(self) -> None:
        self._paused = None
        if not self.disconnecting and self.connected:
            self.startReading()


class GuardedTCPServer(internet.TCPServer):
    """
    A C{TCPServer} service that listens with L{GuardedPort} on a reactor that runs
    real sockets (a L{PosixReactorBase}), and with C{listenTCP} on any other (a
    test's fake).
    """

    def _getPort(self) -> Any:
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        if not isinstance(reactor, PosixReactorBase):
            return super()._getPort()  # a fake reactor: let it record the listen
        port = GuardedPort(*self.args, reactor=reactor, **self.kwargs)
        port.startListening()
        return port
