"""
Tests for L{hypervisor.diskio}: the bounded thread pool service (stopping waits for
the work in flight) and the state writer (atomic, serial per file, newest pending
write wins, every waiter told, failures leave the old content, removals ordered after
writes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any, Callable, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hypervisor import store
from hypervisor.diskio import StateWriter, ThreadPoolRunner, _write
from hypervisor.testing import SynchronousRunner


class ManualRunner:
    """
    An L{hypervisor.diskio.IBlockingRunner} whose functions run when the test says
    (L{step}), so a test can see what waits and what runs.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        self.queue.append((fn, args, d))
        return d

    def step(self, index: int = 0) -> None:
        """
        Run the queued function at C{index} and fire its Deferred.
        """
        fn, args, d = self.queue.pop(index)
        try:
            result = fn(*args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)

    def paths(self) -> list[str]:
        """
        The paths of the queued writes.
        """
        return [args[0] for _, args, _ in self.queue]


class Recorder:
    """
    Fired/failed results of Deferreds, for synchronous assertions.
    """

    def __init__(self) -> None:
        self.results: list[tuple[str, Any]] = []

    def watch(self, d: "Deferred[Any]", name: str) -> None:
        d.addCallbacks(
            lambda r: self.results.append((name, "ok")),
            lambda f: self.results.append((name, f.value)),
        )

    def of(self, name: str) -> Optional[Any]:
        for n, r in self.results:
            if n == name:
                return r
        return None


class ThreadPoolRunnerTests(TestCase):
    """
    L{ThreadPoolRunner} on the real reactor.
    """

    def test_runs_off_the_reactor_thread(self) -> Any:
        """
        The function runs on a pool thread and its result reaches the reactor thread.
        """
        runner = ThreadPoolRunner(reactor, "test-diskio", 2)
        runner.startService()
        self.addCleanup(runner.stopService)
        main = threading.get_ident()

        def where() -> int:
            return threading.get_ident()

        d = runner.run(where)
        d.addCallback(lambda ident: self.assertNotEqual(ident, main))
        return d

    def test_failure_reaches_the_caller(self) -> Any:
        """
        An exception in the function fails the Deferred with it.
        """
        runner = ThreadPoolRunner(reactor, "test-diskio", 1)
        runner.startService()
        self.addCleanup(runner.stopService)

        def boom() -> None:
            raise OSError(5, "I/O error")

        return self.assertFailure(runner.run(boom), OSError)

    async def test_bounded(self) -> None:
        """
        No more than C{size} functions run at once.
        """
        runner = ThreadPoolRunner(reactor, "test-diskio", 2)
        runner.startService()
        self.addCleanup(runner.stopService)
        lock = threading.Lock()
        running = [0, 0]  # now, most
        release = threading.Event()

        def work() -> None:
            with lock:
                running[0] += 1
                running[1] = max(running[1], running[0])
            release.wait(5)
            with lock:
                running[0] -= 1

        ds = [runner.run(work) for _ in range(5)]
        reactor.callLater(0.2, release.set)
        for d in ds:
            await d
        self.assertEqual(running[1], 2)

    async def test_stop_waits_for_work_in_flight(self) -> None:
        """
        C{stopService} fires only after the work in flight has finished, then the
        pool's threads are stopped.
        """
        runner = ThreadPoolRunner(reactor, "test-diskio", 2)
        runner.startService()
        release = threading.Event()
        done: list[str] = []

        def slow() -> str:
            release.wait(5)
            done.append("written")
            return "written"

        work = runner.run(slow)
        stopped = runner.stopService()
        self.assertFalse(stopped.called)
        reactor.callLater(0.1, release.set)
        await stopped
        self.assertEqual(done, ["written"])
        self.assertTrue(work.called)
        self.assertFalse(runner.pool.started)
        self.assertEqual(await work, "written")

    async def test_stop_waits_for_failing_work_too(self) -> None:
        """
        Work that fails does not make C{stopService} fail, and its failure still
        reaches the caller.
        """
        runner = ThreadPoolRunner(reactor, "test-diskio", 1)
        runner.startService()
        release = threading.Event()

        def slow_failure() -> None:
            release.wait(5)
            raise OSError(28, "No space left on device")

        work = runner.run(slow_failure)
        errors: list[Any] = []
        work.addErrback(lambda f: errors.append(f.value))
        stopped = runner.stopService()
        reactor.callLater(0.05, release.set)
        await stopped
        self.assertEqual(len(errors), 1)
        self.assertIsInstance(errors[0], OSError)

    async def test_stop_fires_after_the_callers_callbacks(self) -> None:
        """
        The caller of work in flight gets its result before C{stopService} fires.
        """
        runner = ThreadPoolRunner(reactor, "test-diskio", 1)
        runner.startService()
        release = threading.Event()
        order: list[str] = []
        work = runner.run(release.wait, 5)
        work.addCallback(lambda _: order.append("caller"))
        stopped = runner.stopService()
        stopped.addCallback(lambda _: order.append("stopped"))
        reactor.callLater(0.05, release.set)
        await stopped
        self.assertEqual(order, ["caller", "stopped"])

    async def test_stop_waits_for_the_pending_state_write(self) -> None:
        """
        A state write waiting behind one in flight when the service stops (it will
        start only when the first finishes) still reaches the disk before
        C{stopService} fires: the file holds the newest content, on a stopped pool.
        """
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "info.json")
        runner = ThreadPoolRunner(reactor, "test-diskio", 2)
        runner.startService()
        release = threading.Event()

        def slow_write(path: str, data: Optional[bytes], mode: int) -> None:
            release.wait(5)
            _write(path, data, mode)

        writer = StateWriter(runner, slow_write)
        first = writer.write(path, b"older")
        second = writer.write(path, b"newest")
        stopped = runner.stopService()
        reactor.callLater(0.05, release.set)
        await stopped
        self.assertTrue(first.called)
        self.assertTrue(second.called)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"newest")
        self.assertFalse(runner.pool.started)
        self.assertTrue(writer.idle())

    async def test_starts_on_first_use(self) -> None:
        """
        A runner used before its service starts starts its pool itself.
        """
        runner = ThreadPoolRunner(reactor, "test-diskio", 1)
        self.addCleanup(runner.stopService)
        self.assertEqual(await runner.run(lambda: 42), 42)


class StateWriterTests(SynchronousTestCase):
    """
    L{StateWriter} with a runner the test steps by hand, over a real directory.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.runner = ManualRunner()
        self.writer = StateWriter(self.runner)
        self.rec = Recorder()

    def path(self, name: str = "info.json") -> str:
        return os.path.join(self.dir, name)

    def content(self, name: str = "info.json") -> Optional[bytes]:
        try:
            with open(self.path(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def test_write_is_atomic_on_the_runner(self) -> None:
        """
        A write runs on the runner (nothing on disk before), then the file holds the
        data with the mode asked for, no temporary file is left and the Deferred fires.
        """
        d = self.writer.write(self.path(), b"one", 0o600)
        self.rec.watch(d, "one")
        self.assertIsNone(self.content())
        self.assertEqual(self.rec.results, [])
        self.runner.step()
        self.assertEqual(self.content(), b"one")
        self.assertEqual(os.stat(self.path()).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.dir), ["info.json"])
        self.assertEqual(self.rec.results, [("one", "ok")])
        self.assertEqual(self.writer.writes, 1)
        self.assertTrue(self.writer.idle())

    def test_serial_per_file(self) -> None:
        """
        A second write of a file asked for while the first runs waits until the first
        is done; it then runs with its own content.
        """
        self.rec.watch(self.writer.write(self.path(), b"one"), "one")
        self.rec.watch(self.writer.write(self.path(), b"two"), "two")
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.step()
        self.assertEqual(self.content(), b"one")
        self.assertEqual(self.rec.results, [("one", "ok")])
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.step()
        self.assertEqual(self.content(), b"two")
        self.assertEqual(self.rec.results, [("one", "ok"), ("two", "ok")])
        self.assertTrue(self.writer.idle())

    def test_other_files_do_not_wait(self) -> None:
        """
        Writes of different files run at the same time.
        """
        self.writer.write(self.path("a"), b"a")
        self.writer.write(self.path("b"), b"b")
        self.assertEqual(sorted(self.runner.paths()), [self.path("a"), self.path("b")])

    def test_newest_pending_replaces_older_and_all_waiters_fire(self) -> None:
        """
        While a write runs, later writes of the same file collapse into one: only the
        newest content is written, and every caller is told once it is on disk.
        """
        self.rec.watch(self.writer.write(self.path(), b"one"), "one")
        self.rec.watch(self.writer.write(self.path(), b"two"), "two")
        self.rec.watch(self.writer.write(self.path(), b"three"), "three")
        self.runner.step()
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.step()
        self.assertEqual(self.runner.queue, [])
        self.assertEqual(self.content(), b"three")
        self.assertEqual(self.writer.writes, 2)
        self.assertEqual(sorted(self.rec.results), [("one", "ok"), ("three", "ok"), ("two", "ok")])

    def test_content_made_when_the_write_starts(self) -> None:
        """
        A function given as content is called when its write starts, on the state of
        that moment: writes asked for while one runs are made once (the function of
        the newest), and a function that raises fails its waiters and writes nothing.
        """
        state = [b"a"]
        calls: list[bytes] = []

        def make() -> bytes:
            calls.append(state[0])
            return state[0]

        self.rec.watch(self.writer.write(self.path(), make), "first")
        self.assertEqual(calls, [b"a"])  # started at once: nothing else runs
        for value in (b"b", b"c", b"d"):
            state[0] = value
            self.rec.watch(self.writer.write(self.path(), make), value.decode())
        self.assertEqual(calls, [b"a"])  # waiting: not made yet
        self.runner.step()
        self.assertEqual(calls, [b"a", b"d"])  # the three waiting ones, made once
        self.runner.step()
        self.assertEqual(self.content(), b"d")
        self.assertEqual(self.writer.writes, 2)
        self.assertEqual(len(self.rec.results), 4)

        def broken() -> bytes:
            raise ValueError("cannot encode")

        self.rec.watch(self.writer.write(self.path(), broken), "broken")
        self.assertIsInstance(self.rec.of("broken"), ValueError)
        self.assertEqual(self.runner.queue, [])
        self.assertEqual(self.content(), b"d")
        self.assertTrue(self.writer.idle())
        self.rec.watch(self.writer.write(self.path(), b"e"), "after")
        self.runner.step()
        self.assertEqual((self.rec.of("after"), self.content()), ("ok", b"e"))

    def test_failed_write_fails_its_waiters_and_keeps_old_content(self) -> None:
        """
        A write that fails (here after its temporary file was written, before the
        rename) fails its callers with the OSError; the file keeps its old content and
        no temporary file is left.
        """
        with open(self.path(), "wb") as f:
            f.write(b"old")

        def failing(path: str, data: Optional[bytes], mode: int) -> None:
            def boom(temp: str) -> None:
                raise OSError(28, "No space left on device")

            assert data is not None
            store.atomic_write(path, data, mode, _before_rename=boom)

        self.writer.write_file = failing
        self.rec.watch(self.writer.write(self.path(), b"new"), "new")
        self.runner.step()
        error = self.rec.of("new")
        self.assertIsInstance(error, OSError)
        self.assertEqual(error.errno, 28)
        self.assertEqual(self.content(), b"old")
        self.assertEqual(os.listdir(self.dir), ["info.json"])
        self.assertEqual(self.writer.writes, 0)
        self.assertTrue(self.writer.idle())

    def test_failure_does_not_fail_the_next_write(self) -> None:
        """
        A write waiting behind one that fails still runs, and its callers learn of
        its own success.
        """
        calls = []

        def first_fails(path: str, data: Optional[bytes], mode: int) -> None:
            calls.append(data)
            if len(calls) == 1:
                raise OSError(5, "Input/output error")
            _write(path, data, mode)

        self.writer.write_file = first_fails
        self.rec.watch(self.writer.write(self.path(), b"one"), "one")
        self.rec.watch(self.writer.write(self.path(), b"two"), "two")
        self.runner.step()
        self.assertIsInstance(self.rec.of("one"), OSError)
        self.assertIsNone(self.rec.of("two"))
        self.runner.step()
        self.assertEqual(self.rec.of("two"), "ok")
        self.assertEqual(self.content(), b"two")

    def test_remove_after_earlier_write(self) -> None:
        """
        A removal asked for while a write of the file runs happens after it: the file
        is gone at the end.
        """
        self.rec.watch(self.writer.write(self.path(), b"one"), "write")
        self.rec.watch(self.writer.remove(self.path()), "remove")
        self.runner.step()
        self.assertEqual(self.content(), b"one")
        self.runner.step()
        self.assertIsNone(self.content())
        self.assertEqual(self.rec.of("write"), "ok")
        self.assertEqual(self.rec.of("remove"), "ok")

    def test_write_after_remove(self) -> None:
        """
        A write asked for after a removal (still running) happens after it: the file
        exists at the end with the new content.
        """
        with open(self.path(), "wb") as f:
            f.write(b"old")
        self.writer.remove(self.path())
        self.writer.write(self.path(), b"new")
        self.runner.step()
        self.assertIsNone(self.content())
        self.runner.step()
        self.assertEqual(self.content(), b"new")

    def test_remove_of_missing_file(self) -> None:
        """
        Removing a file that does not exist succeeds.
        """
        self.rec.watch(self.writer.remove(self.path("nothing")), "remove")
        self.runner.step()
        self.assertEqual(self.rec.of("remove"), "ok")

    def test_synchronous_runner_and_reentrant_waiters(self) -> None:
        """
        With a runner that runs at once, a caller that writes the file again from its
        callback gets its write done too, in order.
        """
        writer = StateWriter(SynchronousRunner())
        order: list[bytes] = []

        def again(_: object) -> None:
            order.append(b"one")
            writer.write(self.path(), b"two").addCallback(lambda _: order.append(b"two"))

        writer.write(self.path(), b"one").addCallback(again)
        self.assertEqual(order, [b"one", b"two"])
        self.assertEqual(self.content(), b"two")
        self.assertTrue(writer.idle())

    def test_write_all_is_one_job(self) -> None:
        """
        A group of writes and a remove runs as one job on the runner; every file then
        has its content and mode, the removed one is gone, no temporary file is left,
        and the Deferred fires once.
        """
        with open(self.path("pending.json"), "wb") as f:
            f.write(b"{}")
        d = self.writer.write_all(
            [
                (self.path("info.json"), b"info", 0o644),
                (self.path("key"), b"secret", 0o600),
                (self.path("pending.json"), None, 0),
            ]
        )
        self.rec.watch(d, "group")
        self.assertEqual(len(self.runner.queue), 1)
        self.assertFalse(self.writer.idle())
        self.runner.step()
        self.assertEqual(self.rec.results, [("group", "ok")])
        self.assertEqual(self.content("info.json"), b"info")
        self.assertEqual(self.content("key"), b"secret")
        self.assertEqual(os.stat(self.path("key")).st_mode & 0o777, 0o600)
        self.assertEqual(sorted(os.listdir(self.dir)), ["info.json", "key"])
        self.assertEqual(self.writer.writes, 3)
        self.assertTrue(self.writer.idle())

    def test_write_all_waits_behind_a_running_write(self) -> None:
        """
        A group with a file whose write is running goes file by file: that file's
        group content is written after the running write, never before it.
        """
        self.rec.watch(self.writer.write(self.path("info.json"), b"one"), "one")
        self.rec.watch(
            self.writer.write_all(
                [(self.path("info.json"), b"two", 0o644), (self.path("other"), b"x", 0o644)]
            ),
            "group",
        )
        self.assertEqual(sorted(self.runner.paths()), [self.path("info.json"), self.path("other")])
        self.runner.step(self.runner.paths().index(self.path("other")))
        self.assertIsNone(self.rec.of("group"))
        self.runner.step()
        self.assertEqual(self.content(), b"one")
        self.runner.step()
        self.assertEqual(self.content(), b"two")
        self.assertEqual(self.rec.results, [("one", "ok"), ("group", "ok")])
        self.assertTrue(self.writer.idle())

    def test_write_after_a_running_group_waits_for_it(self) -> None:
        """
        A write of a file asked for while a group holding it runs starts after the
        group, with its own content.
        """
        self.rec.watch(self.writer.write_all([(self.path("info.json"), b"group", 0o644)]), "group")
        self.rec.watch(self.writer.write(self.path("info.json"), b"later"), "later")
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.step()
        self.assertEqual(self.content(), b"group")
        self.assertEqual(len(self.runner.queue), 1)
        self.runner.step()
        self.assertEqual(self.content(), b"later")
        self.assertEqual(self.rec.results, [("group", "ok"), ("later", "ok")])

    def test_write_all_failure_reaches_the_caller(self) -> None:
        """
        A group that fails in the middle fails its Deferred with the OSError: the
        files before it are new, the failing one keeps its old content, no temporary
        file is left, and the writer is idle again.
        """
        with open(self.path("b"), "wb") as f:
            f.write(b"old")
        d = self.writer.write_all(
            [
                (self.path("a"), b"new a", 0o644),
                (self.path("no-such-directory/c"), b"c", 0o644),
                (self.path("b"), b"new b", 0o644),
            ]
        )
        self.rec.watch(d, "group")
        self.runner.step()
        self.assertIsInstance(self.rec.of("group"), FileNotFoundError)
        self.assertEqual(self.content("a"), b"new a")
        self.assertEqual(self.content("b"), b"old")
        self.assertEqual(sorted(os.listdir(self.dir)), ["a", "b"])
        self.assertTrue(self.writer.idle())

    def test_write_all_refuses_a_file_twice(self) -> None:
        """
        The same file twice in one group is a programming error, refused at once.
        """
        self.assertRaises(
            ValueError,
            self.writer.write_all,
            [(self.path(), b"a", 0o644), (self.path(), b"b", 0o644)],
        )
        self.assertEqual(self.runner.queue, [])

    def test_write_all_goes_through_an_injected_write_file(self) -> None:
        """
        With a C{write_file} of a test's own, a group calls it once per file in
        order, so every file of the group is a point where a fault can be injected.
        """
        calls: list[str] = []

        def record(path: str, data: Optional[bytes], mode: int) -> None:
            calls.append(os.path.basename(path))
            _write(path, data, mode)

        writer = StateWriter(self.runner, record)
        self.rec.watch(
            writer.write_all([(self.path("a"), b"a", 0o644), (self.path("b"), b"b", 0o644)]),
            "group",
        )
        self.runner.step()
        self.assertEqual(calls, ["a", "b"])
        self.assertEqual(self.rec.of("group"), "ok")
