# -*- test-case-name: tests.test_tftp_threaded -*-
"""
A transfer's data path on a thread of its own: the transfer's socket (its own
ephemeral port, connected to the client) is read by a blocking loop on that
thread, which drives the same L{ReadSession} the reactor path drives (and the
L{Clock}-driven tests drive), on a clock of its own (L{LoopClock}), with a reader
whose reads block that thread only (never the reactor's).

Why: in lock-step every block is a round trip (ACK in, DATA out), and through the
reactor each costs an C{epoll_wait}, a C{recv}, a C{recv} that says C{EAGAIN} and
the loop's bookkeeping; a blocking C{recv} on a thread of its own costs one
C{recv} and one C{send}.

Waiting for the next ACK, a thread first polls its socket for a moment (L{Spinner},
C{-tftpSpinMicroseconds}) before it blocks: a thread asleep in C{recv} is woken by
the scheduler, on another CPU and, on a virtual machine, a vCPU the host must wake
first, and that wakeup is most of a lock-step round trip on loopback or a fast LAN
(measured here: 14 MiB/s blocking, 40 with polling, for the same loop). Polling
costs CPU while the client answers within the moment, and is given up (for longer
and longer) when it does not: a slow client is waited for asleep. One thread polls
at a time: two would take the GIL from each other.

L{TransferThreads} bounds the number of such threads (C{-tftpTransferThreads});
beyond it transfers run on the reactor. What the reactor needs from a transfer's
thread crosses with C{callFromThread}: its progress every L{REPORT_EVERY} seconds
(not per block), its end once. The reactor asks a thread to stop
(L{TransferThread.stop}) by shutting the socket's read side down, which wakes the
blocked C{recv} at once.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from hypervisor.tftp import codec
from hypervisor.tftp.backend import IReader
from hypervisor.tftp.session import DEFAULT_RETRIES, Negotiated, ReadSession

REPORT_EVERY = 0.25
# A receive timeout within this of the session's next deadline is kept as it is
# (changing it is a system call): the timer fires at most this late.
TIMEOUT_SLACK = 0.02
IDLE_WAIT = 1.0
# Polling before a blocking wait: given up after SPIN_MISSES polls in a row that
# saw nothing, for SPIN_BACKOFF waits at first, twice as many each time again, at
# most SPIN_BACKOFF_MAX.
SPIN_MISSES = 8
SPIN_BACKOFF = 64
SPIN_BACKOFF_MAX = 8192

_TIMEVAL = struct.Struct("@ll")
_monotonic = time.monotonic


@implementer(IDelayedCall)
class LoopCall:
    """
    A call scheduled on a L{LoopClock}.
    """

    def __init__(
        self,
        clock: "LoopClock",
        when: float,
        f: Callable[..., Any],
        args: tuple[object, ...],
        kwargs: dict[str, object],
    ) -> None:
        self.clock = clock
        self.time = when
        self.f = f
        self.args = args
        self.kwargs = kwargs
        self.cancelled = False
        self.called = False

    def getTime(self) -> float:
        """
        When it is due (the clock's monotonic seconds).
        """
        return self.time

    def reset(self, secondsFromNow: float) -> None:
        """
        Due C{secondsFromNow} from now instead.
        """
        self.time = self.clock.now + secondsFromNow

    def delay(self, secondsLater: float) -> None:
        """
        Due C{secondsLater} later.
        """
        self.time += secondsLater

    def cancel(self) -> None:
        """
        Not to be called.
        """
        if not self.cancelled and not self.called:
            self.cancelled = True
            self.clock.calls.remove(self)

    def active(self) -> bool:
        """
        Neither called nor cancelled.
        """
        return not (self.cancelled or self.called)


@implementer(IReactorTime)
class LoopClock:
    """
    Time for code running on one thread's loop: L{seconds} is wall-clock time like
    the reactor's; calls are due by the monotonic clock and are run by the loop
    (L{run_due}).

    @ivar now: the loop's monotonic time, set by the loop each time it wakes (as a
        reactor's time for the work of one turn); L{LoopCall.reset} counts from it.
    """

    def __init__(self) -> None:
        self.calls: list[LoopCall] = []
        self.now = _monotonic()

    def seconds(self) -> float:
        """
        Wall-clock time (as the reactor's C{seconds}).
        """
        return time.time()

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kwargs: object
    ) -> LoopCall:
        """
        Call C{callable(*args, **kwargs)} C{delay} seconds from now.
        """
        call = LoopCall(self, self.now + delay, callable, args, kwargs)
        self.calls.append(call)
        return call

    def getDelayedCalls(self) -> list[IDelayedCall]:
        """
        The calls not yet run.
        """
        return list(self.calls)

    def next_due(self) -> Optional[float]:
        """
        When the earliest call is due (None: no call).
        """
        calls = self.calls
        if not calls:
            return None
        if len(calls) == 1:
            return calls[0].time
        return min(c.time for c in calls)

    def run_due(self, now: float) -> None:
        """
        Run the calls due at C{now} (monotonic).
        """
        for call in [c for c in self.calls if c.time <= now]:
            if call.active():
                call.called = True
                self.calls.remove(call)
                call.f(*call.args, **call.kwargs)


class Spinner:
    """
    How transfer threads poll before they block: for C{seconds} (0: never), one
    thread at a time (L{lock}), and only while L{alone}.

    @ivar alone: whether the server has no other transfer in progress (set by it):
        others run on the reactor, which needs the GIL a polling thread would keep.
    @ivar caught: polls that received a packet.
    @ivar missed: polls that saw nothing in time (the thread then blocked).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.lock = threading.Lock()
        self.alone = True
        self.caught = 0
        self.missed = 0


class TransferThread:
    """
    One transfer's thread: its session, socket and clock. C{reader} must answer
    every read at once (a blocking reader: its reads run on this thread) or with a
    failed Deferred; the socket must no longer be read by the reactor.

    @ivar session: created on the thread (C{None} before).
    @ivar progress: (bytes acknowledged, retransmissions) as last reported.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        reader: IReader,
        negotiated: Negotiated,
        *,
        retries: int = DEFAULT_RETRIES,
        on_progress: Callable[[int, int], None] = lambda sent, retransmissions: None,
        on_done: Callable[["TransferThread", Optional[str]], None] = lambda t, why: None,
        name: str = "tftp-transfer",
        spinner: Optional[Spinner] = None,
    ) -> None:
        self.reactor = reactor
        self.sock = sock
        self.reader = reader
        self.negotiated = negotiated
        self.retries = retries
        self.on_progress = on_progress
        self.on_done = on_done
        self.spinner = spinner
        self.clock = LoopClock()
        self.session: Optional[ReadSession] = None
        self.progress = (0, 0)
        self.started = time.time()
        self._stop_reason: Optional[str] = None
        self._lock = threading.Lock()
        self._closed = False
        self._receive_timeout = -1.0
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """
        Start the thread (C{RuntimeError} if the system has no thread to give).
        """
        self.thread.start()

    def stop(self, reason: str) -> None:
        """
        From any thread: end the transfer (the client gets an ERROR with C{reason}).
        """
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
            if not self._closed:
                try:
                    # Wakes the thread's recv at once (it returns b""); sending works on.
                    self.sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass

    # On the thread ---------------------------------------------------------------------

    def _set_receive_timeout(self, seconds: float) -> None:
        whole = int(seconds)
        micro = max(1000 if whole == 0 else 0, int((seconds - whole) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micro))
        self._receive_timeout = seconds

    def _run(self) -> None:
        why: Optional[str] = "the transfer thread failed"
        try:
            why = self._transfer()
        except Exception:
            self.log.failure("TFTP transfer thread failed")
            if self.session is not None and not self.session.finished:
                self.session.stop("internal error")
        finally:
            with self._lock:
                self._closed = True
                self.sock.close()
            if self.session is None:
                self.reader.close()  # on this thread: it may close a file
            self.reactor.callFromThread(self.on_done, self, why)

    def _transfer(self) -> Optional[str]:
        sock = self.sock
        sock.setblocking(True)
        # The session sends with the socket's own send (no wrapper on the way): a
        # failure raises out of the session and ends the transfer below.
        session = ReadSession(
            self.reader, sock.send, self.clock, self.negotiated, retries=self.retries
        )
        self.session = session
        try:
            self.clock.now = time.monotonic()
            session.start()
            self._loop(session)
        except ConnectionRefusedError:
            session.stop("the client went away", notify=False)
        except OSError as e:
            session.stop(f"socket error: {e.strerror or e}", notify=False)
        return session.reason

    def _loop(self, session: ReadSession) -> None:
        clock = self.clock
        calls = clock.calls
        recv = self.sock.recv
        datagram = session.datagram
        monotonic = time.monotonic
        current = self._receive_timeout
        low, high = current - TIMEOUT_SLACK, current + TIMEOUT_SLACK
        size = codec.MAX_CLIENT_PACKET
        next_report = monotonic() + REPORT_EVERY
        now = clock.now
        spinner = self.spinner if self.spinner is not None else Spinner(0.0)
        spin = spinner.seconds
        acquire, release = spinner.lock.acquire, spinner.lock.release
        poll = self._poll
        skip, misses, backoff = 0, 0, SPIN_BACKOFF
        while not session.finished:
            if calls:
                due = calls[0].time if len(calls) == 1 else min(c.time for c in calls)
                if due <= now:
                    clock.run_due(now)
                    clock.now = now = monotonic()
                    continue
                wait = due - now
            else:
                wait = IDLE_WAIT
            data: Optional[bytes] = None
            if spin and spinner.alone:
                if skip:
                    skip -= 1
                elif acquire(False):
                    try:
                        data = poll(spin if spin < wait else wait)
                    finally:
                        release()
                    if data is not None:
                        misses, backoff = 0, SPIN_BACKOFF
                    elif misses + 1 < SPIN_MISSES:
                        misses += 1
                    else:
                        skip, misses = backoff, 0
                        backoff = min(backoff * 2, SPIN_BACKOFF_MAX)
            if data is None:
                if wait < low or wait > high:
                    self._set_receive_timeout(wait)
                    low, high = wait - TIMEOUT_SLACK, wait + TIMEOUT_SLACK
                try:
                    data = recv(size)
                except BlockingIOError:
                    clock.now = now = monotonic()
                    continue  # the receive timeout: the clock decides
            clock.now = now = monotonic()
            if data:
                datagram(data)
            elif self._stop_reason is not None:  # stop() shut the socket's reading down
                session.stop(self._stop_reason)
                return
            if now >= next_report:
                next_report = now + REPORT_EVERY
                self.progress = progress = (session.bytes_acked, session.retransmissions)
                self.reactor.callFromThread(self.on_progress, *progress)

    def _poll(self, seconds: float) -> Optional[bytes]:
        """
        A packet received within C{seconds} by polling (without sleeping), or None.
        The caller holds the spinner's lock.
        """
        spinner = self.spinner
        assert spinner is not None
        recv = self.sock.recv
        size = codec.MAX_CLIENT_PACKET
        flags = socket.MSG_DONTWAIT
        monotonic = time.monotonic
        end = monotonic() + seconds
        while True:
            try:
                data = recv(size, flags)
            except BlockingIOError:
                if monotonic() < end and self._stop_reason is None:
                    continue  # (a shut down read side says EAGAIN here, not b"")
                spinner.missed += 1
                return None
            spinner.caught += 1
            return data


class TransferThreads:
    """
    At most C{limit} transfer threads at a time.

    @ivar spinner: how their threads poll before they block (C{spin} seconds).
    @ivar running: transfers whose thread has not reported its end.
    @ivar exiting: transfers that reported their end, their thread not yet gone
        (it returns right after; looked at again shortly, never waited for).
    """

    REAP_EVERY = 0.002

    def __init__(self, reactor: Any, limit: int, spin: float = 0.0) -> None:
        self.reactor = reactor
        self.limit = limit
        self.spinner = Spinner(spin)
        self.running: set[TransferThread] = set()
        self.exiting: set[TransferThread] = set()
        self._idle: list[Deferred[None]] = []
        self._reaping = False

    def available(self) -> bool:
        """
        Whether one more transfer may have a thread.
        """
        return len(self.running) + len(self.exiting) < self.limit

    def start(self, transfer: TransferThread) -> bool:
        """
        Start C{transfer}'s thread; False if the limit is reached or the system has no
        thread to give (the caller runs the transfer on the reactor).
        """
        if not self.available():
            return False
        done = transfer.on_done

        def ended(t: TransferThread, why: Optional[str]) -> None:
            self.running.discard(t)
            self.exiting.add(t)
            try:
                done(t, why)
            finally:
                self._reap()

        transfer.on_done = ended
        try:
            transfer.start()
        except RuntimeError:
            transfer.on_done = done
            return False
        self.running.add(transfer)
        return True

    def _reap(self, timer: bool = False) -> None:
        if timer:
            self._reaping = False
        for t in list(self.exiting):
            if not t.thread.is_alive():
                self.exiting.discard(t)
        if self.exiting:
            if not self._reaping:
                self._reaping = True
                self.reactor.callLater(self.REAP_EVERY, self._reap, True)
        elif not self.running:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def stop(self, reason: str) -> "Deferred[None]":
        """
        Ask every thread to stop; fires once none is left.
        """
        for transfer in list(self.running):
            transfer.stop(reason)
        return self.idle()

    def idle(self) -> "Deferred[None]":
        """
        Fires once no transfer thread is left.
        """
        if not self.running and not self.exiting:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d
