"""
Tests for L{hypervisor.upload}: the upload stream between a transport and its
consumer (flow control, reads, early ends, failures, discards, too many bytes) and
L{write_to_file} (prefix and bytes into a file on a runner, progress, fsync).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from hypervisor.errors import InvalidRequest
from hypervisor.testing import SynchronousRunner
from hypervisor.upload import UploadAborted, UploadStream, write_to_file


@implementer(IPushProducer)
class FakeProducer:
    """
    A connection that records being paused and resumed.
    """

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self.resumes += 1

    def stopProducing(self) -> None:
        pass


def result_of(d: "Deferred[Any]") -> Any:
    """
    The result (or failure's exception) of a fired Deferred, or a marker if unfired.
    """
    out: list[Any] = []
    d.addCallbacks(out.append, lambda f: out.append(f.value))
    return out[0] if out else "unfired"


class FunctionsRunner(SynchronousRunner):
    """
    A synchronous runner that records which functions it ran.
    """

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.names.append(getattr(fn, "__name__", repr(fn)))
        return super().run(fn, *args, **kwargs)


class UploadStreamTests(SynchronousTestCase):
    """
    L{UploadStream}.
    """

    def test_write_then_read(self) -> None:
        """
        Bytes written are read back in order, at most C{max_bytes} at a time, then
        C{b""} once everything was read.
        """
        stream = UploadStream(10)
        stream.write(b"abcd")
        stream.write(b"efghij")
        self.assertTrue(stream.complete)
        self.assertEqual(result_of(stream.read(3)), b"abc")
        self.assertEqual(result_of(stream.read(5)), b"defgh")
        self.assertEqual(result_of(stream.read(100)), b"ij")
        self.assertEqual(stream.consumed, 10)
        self.assertEqual(result_of(stream.read()), b"")

    def test_read_waits_for_bytes(self) -> None:
        """
        A read before any bytes arrived fires when the transport writes.
        """
        stream = UploadStream(5)
        d = stream.read()
        self.assertFalse(d.called)
        stream.write(b"12")
        self.assertEqual(result_of(d), b"12")

    def test_read_exactly(self) -> None:
        """
        C{read_exactly} gathers bytes from several writes.
        """
        stream = UploadStream(8)
        d = stream.read_exactly(6)
        stream.write(b"ab")
        self.assertFalse(d.called)
        stream.write(b"cd")
        stream.write(b"efgh")
        self.assertEqual(result_of(d), b"abcdef")
        self.assertEqual(result_of(stream.read()), b"gh")

    def test_read_exactly_past_the_end(self) -> None:
        """
        C{read_exactly} of more than is left fails with L{UploadAborted}.
        """
        stream = UploadStream(2)
        stream.write(b"ab")
        self.assertIsInstance(result_of(stream.read_exactly(3)), UploadAborted)

    def test_pause_above_high_water_resume_below_low_water(self) -> None:
        """
        The producer is paused once more than C{high_water} bytes wait, once only,
        and resumed when reads bring the buffer to C{low_water} or below.
        """
        stream = UploadStream(100, high_water=10, low_water=4)
        producer = FakeProducer()
        stream.register_producer(producer)
        stream.write(b"x" * 10)
        self.assertFalse(producer.paused)
        stream.write(b"x" * 5)
        self.assertTrue(producer.paused)
        stream.write(b"x" * 5)
        self.assertEqual(producer.pauses, 1)
        result_of(stream.read(10))  # 10 left: still above low water
        self.assertTrue(producer.paused)
        result_of(stream.read(6))  # 4 left
        self.assertFalse(producer.paused)
        self.assertEqual(producer.resumes, 1)

    def test_waiting_reader_keeps_the_producer_running(self) -> None:
        """
        Bytes written while a reader waits go to it at once and never pause the
        producer.
        """
        stream = UploadStream(100, high_water=10, low_water=4)
        producer = FakeProducer()
        stream.register_producer(producer)
        d = stream.read(64)
        stream.write(b"y" * 20)
        self.assertEqual(result_of(d), b"y" * 20)
        self.assertEqual(producer.pauses, 0)

    def test_more_than_announced_refused(self) -> None:
        """
        A write that would go past the announced length raises L{UploadAborted} (a
        400) and is not buffered.
        """
        stream = UploadStream(4)
        stream.write(b"abc")
        error = self.assertRaises(UploadAborted, stream.write, b"de")
        self.assertIsInstance(error, InvalidRequest)
        self.assertEqual(error.status, 400)
        self.assertIn("more than the 4 bytes", str(error))
        self.assertEqual(stream.received, 3)
        self.assertEqual(result_of(stream.read()), b"abc")

    def test_finish_short_aborts_the_waiting_reader(self) -> None:
        """
        The body ending before the announced length fails a waiting reader with
        L{UploadAborted} saying how many bytes came.
        """
        stream = UploadStream(10)
        stream.write(b"abc")
        self.assertEqual(result_of(stream.read()), b"abc")
        d = stream.read()
        stream.finish()
        error = result_of(d)
        self.assertIsInstance(error, UploadAborted)
        self.assertIn("after 3 of 10 bytes", str(error))
        self.assertIsInstance(result_of(stream.read()), UploadAborted)

    def test_finish_short_fails_later_reads(self) -> None:
        """
        After a short finish even buffered bytes are not handed out: the upload is
        broken and the next read fails.
        """
        stream = UploadStream(10)
        stream.write(b"abc")
        stream.finish()
        self.assertIsInstance(result_of(stream.read()), UploadAborted)

    def test_finish_complete(self) -> None:
        """
        Finishing after every byte arrived changes nothing: the reader gets the rest.
        """
        stream = UploadStream(3)
        stream.write(b"abc")
        stream.finish()
        self.assertEqual(result_of(stream.read()), b"abc")
        self.assertEqual(result_of(stream.read()), b"")

    def test_fail(self) -> None:
        """
        A transport failure reaches the waiting reader and every later read.
        """
        stream = UploadStream(10)
        d = stream.read()
        reason = UploadAborted("the client went away during the upload")
        stream.fail(reason)
        self.assertIs(result_of(d), reason)
        self.assertIs(result_of(stream.read()), reason)

    def test_fail_after_everything_was_read_is_ignored(self) -> None:
        """
        The connection going away after the consumer read every byte does not fail
        the upload.
        """
        stream = UploadStream(2)
        stream.write(b"ab")
        result_of(stream.read())
        stream.fail(UploadAborted("gone"))
        self.assertEqual(result_of(stream.read()), b"")

    def test_discard(self) -> None:
        """
        A consumer that gives up drops the buffer, resumes a paused producer, tells
        the transport once, and later writes are ignored.
        """
        stream = UploadStream(100, high_water=4, low_water=1)
        producer = FakeProducer()
        stream.register_producer(producer)
        told: list[str] = []
        stream.on_discard = lambda: told.append("discarded")
        stream.write(b"z" * 8)
        self.assertTrue(producer.paused)
        stream.discard()
        stream.discard()
        self.assertFalse(producer.paused)
        self.assertEqual(told, ["discarded"])
        stream.write(b"z" * 8)
        self.assertEqual(stream._buffered, 0)

    def test_discard_after_everything_read_does_not_tell(self) -> None:
        """
        Discarding after every byte was read does not tell the transport (there is
        nothing left to refuse).
        """
        stream = UploadStream(2)
        told: list[str] = []
        stream.on_discard = lambda: told.append("discarded")
        stream.write(b"ab")
        result_of(stream.read())
        stream.discard()
        self.assertEqual(told, [])


class WriteToFileTests(SynchronousTestCase):
    """
    L{write_to_file}.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "root")

    def test_prefix_and_bytes(self) -> None:
        """
        The prefix, then C{size} bytes of the upload, land in the file (created with
        the mode asked for); progress counts the prefix; the file is fsynced and
        closed on the runner; the bytes after C{size} stay in the stream.
        """
        runner = FunctionsRunner()
        stream = UploadStream(12)
        progress: list[tuple[int, int]] = []
        d = write_to_file(
            stream,
            8,
            self.path,
            runner,
            lambda done, total: progress.append((done, total)),
            mode=0o600,
            prefix=b"HDR",
        )
        self.assertFalse(d.called)
        stream.write(b"01234")
        stream.write(b"567")
        stream.write(b"tail")
        self.assertEqual(result_of(d), 11)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"HDR01234567")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(progress[-1], (11, 11))
        self.assertEqual([p[0] for p in progress], sorted(p[0] for p in progress))
        self.assertEqual(runner.names[0], "open")
        self.assertEqual(runner.names[-2:], ["fsync", "close"])
        self.assertEqual(result_of(stream.read()), b"tail")

    def test_large_upload_in_chunks(self) -> None:
        """
        An upload larger than one read chunk is written whole, with flow control
        letting the producer go again as the writer catches up.
        """
        from hypervisor import upload

        self.patch(upload, "READ_CHUNK", 1000)
        stream = UploadStream(5000, high_water=1500, low_water=500)
        producer = FakeProducer()
        stream.register_producer(producer)
        data = os.urandom(5000)
        for i in range(0, 5000, 2500):
            stream.write(data[i : i + 2500])
        self.assertTrue(producer.paused)
        d = write_to_file(stream, 5000, self.path, SynchronousRunner())
        self.assertEqual(result_of(d), 5000)
        self.assertFalse(producer.paused)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_short_upload_fails(self) -> None:
        """
        The body ending early fails the write with L{UploadAborted} and closes the
        file (the partial file is left for the caller to remove).
        """
        runner = FunctionsRunner()
        stream = UploadStream(10)
        d = write_to_file(stream, 10, self.path, runner)
        stream.write(b"abc")
        stream.finish()
        self.assertIsInstance(result_of(d), UploadAborted)
        self.assertEqual(runner.names[-1], "close")
        self.assertNotIn("fsync", runner.names)
        self.assertTrue(os.path.exists(self.path))

    def test_zero_bytes(self) -> None:
        """
        A zero-byte write with only a prefix makes a file of the prefix.
        """
        stream = UploadStream(0)
        d = write_to_file(stream, 0, self.path, SynchronousRunner(), prefix=b"ab")
        self.assertEqual(result_of(d), 2)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"ab")
