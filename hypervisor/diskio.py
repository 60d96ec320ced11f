# -*- test-case-name: tests.test_diskio -*-
"""
Disk work off the reactor thread.

- L{IBlockingRunner}: something that runs a blocking function and returns a Deferred
  of its result. L{ThreadPoolRunner} is the real one (a bounded thread pool owned by
  a service and stopped with it, not Twisted's global C{deferToThread} pool);
  L{hypervisor.testing.SynchronousRunner} runs the function at once, for tests on a
  C{Clock}.
- L{StateWriter}: every write of a state file goes through it. Writes run on the
  runner, one at a time per file and in the order they were asked for; a write asked
  for while an earlier one of the same file waits to start replaces it (the file ends
  with the newest content either way, and both callers learn when it is on disk).
  The write itself is L{hypervisor.store.atomic_write} (temporary file, fsync,
  rename, fsync of the directory).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar, Union

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from hypervisor import store

T = TypeVar("T")

ReactorWithThreads = Union[IReactorThreads, IReactorFromThreads, Any]


class IBlockingRunner(Protocol):
    """
    Runs blocking functions somewhere other than the reactor thread.
    """

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """
        Run C{fn(*args, **kwargs)}; the Deferred fires on the reactor thread with its
        result or failure.
        """

    def from_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """
        From inside a function this runner runs: call C{fn(*args)} on the reactor
        thread (e.g. progress reports while a file is copied).
        """


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


class ThreadPoolRunner(Service):
    """
    A bounded thread pool for blocking work, started and stopped as a service.

    Stopping waits for the work in flight before the threads are joined, so a state
    write asked for just before the daemon stops still reaches the disk.
    """

    log = Logger()

    def __init__(self, reactor: ReactorWithThreads, name: str, size: int = 4) -> None:
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name=name)
        # Daemon threads: a pool used without its service being stopped (a test, a
        # tool) never keeps the process alive. The daemon stops the service, which
        # waits for the work in flight first.
        self.pool.threadFactory = _daemon_thread  # type: ignore[assignment]
        self._in_flight: set["Deferred[None]"] = set()

    def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """
        Run C{fn} on the pool (started on first use if the service is not running).
        """
        if not self.pool.started:
            self.pool.start()
        d: Deferred[T] = deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)
        done: Deferred[None] = Deferred()
        self._in_flight.add(done)

        def finished(result: Any) -> Any:
            # Tell stopService only after the caller's own callbacks have had the
            # result (they may chain more work, e.g. the next pending state write).
            self.reactor.callFromThread(self._finished, done)
            return result

        return d.addBoth(finished)

    def from_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """
        Call C{fn(*args)} on the reactor thread, from one of the pool's threads.
        """
        self.reactor.callFromThread(fn, *args)

    def _finished(self, done: "Deferred[None]") -> None:
        self._in_flight.discard(done)
        done.callback(None)

    def _drain(self) -> "Deferred[None]":
        """
        Fire once no work is in flight, including work chained by callers onto work
        that finished meanwhile.
        """
        if not self._in_flight:
            return succeed(None)
        pending = DeferredList(list(self._in_flight), consumeErrors=True)
        return pending.addCallback(lambda _: self._drain())

    def startService(self) -> None:
        """
        Start the threads.
        """
        super().startService()
        if not self.pool.started:
            self.pool.start()

    def stopService(self) -> "Deferred[None]":
        """
        Wait for the work in flight, then stop the threads.
        """
        super().stopService()

        def stop(_: object) -> None:
            if self.pool.started:
                self.pool.stop()

        return self._drain().addCallback(stop)


def _write(path: str, data: Optional[bytes], mode: int) -> None:
    if data is None:
        store.remove_file(path)
    else:
        store.atomic_write(path, data, mode)


FileWrite = tuple[str, Optional[bytes], int]
"""One file of a group: its path, its data (None: remove it), its mode."""

WriteGroup = Callable[[list[FileWrite]], None]


@dataclass
class _Pending:
    data: Union[None, bytes, Callable[[], bytes]]
    mode: int
    waiters: list["Deferred[None]"] = field(default_factory=list)


class StateWriter:
    """
    Writes state files atomically on a runner, serially per file, newest wins.

    @ivar writes: how many writes reached the disk (for tests and metrics).
    @ivar write_file: the function doing one write (C{path, data or None, mode});
        tests replace it to inject failures.
    @ivar write_files: the function doing a group of writes (L{write_all}):
        L{hypervisor.store.atomic_write_many}, or C{write_file} once per file when
        that was replaced.
    """

    log = Logger()

    def __init__(
        self,
        runner: IBlockingRunner,
        write_file: Callable[[str, Optional[bytes], int], None] = _write,
        write_files: Optional[WriteGroup] = None,
    ) -> None:
        self.runner = runner
        self.write_file = write_file
        if write_files is None:
            # With a write_file of its own (a test injecting faults), a group is that
            # function once per file, so every file is a point where a fault can hit.
            write_files = store.atomic_write_many if write_file is _write else self._one_by_one
        self.write_files = write_files
        self.writes = 0
        self._running: set[str] = set()
        self._pending: dict[str, _Pending] = {}

    def write(
        self, path: str, data: Union[bytes, Callable[[], bytes]], mode: int = 0o644
    ) -> "Deferred[None]":
        """
        Replace C{path} with C{data} atomically; fires once it is on disk, or fails
        with the C{OSError} (the file then holds its previous content).

        C{data} may be a function making the bytes (on the reactor thread), called
        when the write starts: writes asked for while one of the same file runs are
        made once, from the state of that moment (a large file rewritten after each
        of many changes in a row, such as the address pool, is encoded once per
        write that reaches the disk, not once per change).
        """
        return self._queue(path, data, mode)

    def remove(self, path: str) -> "Deferred[None]":
        """
        Remove C{path} durably (after any write of it asked for earlier).
        """
        return self._queue(path, None, 0)

    def write_all(self, files: Sequence[FileWrite]) -> "Deferred[None]":
        """
        Write (data) or remove (C{None}) several files whose order does not matter in
        one job on the runner, with one directory flush per directory
        (L{hypervisor.store.atomic_write_many}): fewer thread hops and fsyncs than a
        L{write} each. Fires once all are on disk, or fails with the first
        C{OSError}. When one of the files has a write running or waiting, the
        files go through L{write} one by one instead, so each file's writes stay in
        the order they were asked for.
        """
        paths = [path for path, _, _ in files]
        if len(set(paths)) != len(paths):
            raise ValueError(f"a file appears twice in one group: {paths}")
        if any(path in self._running or path in self._pending for path in paths):
            return all_then_first_failure(
                [self._queue(path, data, mode) for path, data, mode in files]
            )
        self._running.update(paths)
        d = self.runner.run(self.write_files, list(files))

        def done(result: Union[None, Failure]) -> Union[None, Failure]:
            for path in paths:
                self._running.discard(path)
            if not isinstance(result, Failure):
                self.writes += len(paths)
            for path in paths:
                if path in self._pending:
                    self._start(path)
            return result

        return d.addBoth(done)

    def _one_by_one(self, files: list[FileWrite]) -> None:
        for path, data, mode in files:
            self.write_file(path, data, mode)

    def idle(self) -> bool:
        """
        Whether no write is running or waiting.
        """
        return not self._running and not self._pending

    def _queue(
        self, path: str, data: Union[None, bytes, Callable[[], bytes]], mode: int
    ) -> "Deferred[None]":
        d: Deferred[None] = Deferred()
        pending = self._pending.get(path)
        if pending is None:
            pending = self._pending[path] = _Pending(data, mode)
        else:
            pending.data, pending.mode = data, mode
        pending.waiters.append(d)
        if path not in self._running:
            self._start(path)
        return d

    def _start(self, path: str) -> None:
        pending = self._pending.pop(path, None)
        if pending is None:
            return
        self._running.add(path)
        d: Deferred[None]
        try:
            data = pending.data() if callable(pending.data) else pending.data
        except Exception:
            d = fail()
        else:
            d = self.runner.run(self.write_file, path, data, pending.mode)

        def done(result: Union[None, Failure]) -> None:
            self._running.discard(path)
            if not isinstance(result, Failure):
                self.writes += 1
            for waiter in pending.waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            if path in self._pending:
                self._start(path)

        d.addBoth(done)


def all_then_first_failure(ds: list["Deferred[None]"]) -> "Deferred[None]":
    """
    Fires when every one of C{ds} has fired: with the first failure if any failed.
    """

    def first_failure(results: list[tuple[bool, Any]]) -> Union[None, Failure]:
        for ok, value in results:
            if not ok:
                return value
        return None

    return DeferredList(ds, consumeErrors=True).addCallback(first_failure)
