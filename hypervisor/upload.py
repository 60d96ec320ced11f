# -*- test-case-name: tests.test_upload -*-
"""
Uploads: raw bytes that follow a request (CreateVm's image and user data), streamed
from a transport to where they are stored, never spooled.

A transport creates an L{UploadStream} of the announced length, registers its
connection as the producer, and L{UploadStream.write}s bytes as they arrive; the
stream pauses the producer while more than C{high_water} bytes wait and resumes it
when the consumer has caught up. The service layer reads with L{UploadStream.read}
and writes straight into the destination file on a disk thread
(L{write_to_file}). If the connection ends early the reader gets L{UploadAborted};
if the consumer gives up (an error before it read everything) it calls
L{UploadStream.discard}, and the transport is told through C{on_discard} so it can
answer at once instead of receiving bytes nobody reads.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer

from hypervisor.diskio import IBlockingRunner
from hypervisor.errors import InvalidRequest

HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
READ_CHUNK = 4 * 1024 * 1024


class UploadAborted(InvalidRequest):
    """
    The upload ended before the announced number of bytes arrived.
    """


class UploadStream:
    """
    A known number of bytes, pushed by a transport and pulled by one consumer.

    @ivar length: the announced number of bytes.
    @ivar received: bytes the transport wrote so far.
    @ivar consumed: bytes the consumer read so far.
    @ivar on_discard: called once if the consumer gives up before the end.
    """

    def __init__(
        self, length: int, high_water: int = HIGH_WATER, low_water: int = LOW_WATER
    ) -> None:
        self.length = length
        self.high_water = high_water
        self.low_water = low_water
        self.received = 0
        self.consumed = 0
        self.on_discard: Optional[Callable[[], None]] = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._producer: Optional[IPushProducer] = None
        self._paused = False
        self._reader: Optional[tuple[Deferred[bytes], int]] = None
        self._error: Optional[BaseException] = None
        self._discarded = False

    # Transport side ------------------------------------------------------------------

    def register_producer(self, producer: IPushProducer) -> None:
        """
        The producer to pause when too much is buffered (the connection).
        """
        self._producer = producer

    def write(self, data: bytes) -> None:
        """
        Bytes from the transport.

        @raise UploadAborted: more bytes than announced.
        """
        if self._discarded or self._error is not None:
            return
        if self.received + len(data) > self.length:
            raise UploadAborted(f"the request carries more than the {self.length} bytes announced")
        self.received += len(data)
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        if self._buffered > self.high_water and self._producer and not self._paused:
            self._paused = True
            self._producer.pauseProducing()

    def finish(self) -> None:
        """
        The transport has no more bytes (the request body ended).
        """
        if self.received < self.length:
            self.fail(
                UploadAborted(f"the upload ended after {self.received} of {self.length} bytes")
            )

    def end(self) -> None:
        """
        The transport has no more bytes and the length was not known in advance (an
        HTTP body without C{Content-Length}): what arrived is the whole.
        """
        if self._error is not None or self._discarded:
            return
        self.length = self.received
        if self._reader is not None and not self._chunks:
            d, _ = self._reader
            self._reader = None
            d.callback(b"")

    def fail(self, reason: BaseException) -> None:
        """
        The transport failed (the connection was lost): the reader gets C{reason}.
        """
        if self._error is not None or self.consumed == self.length:
            return
        self._error = reason
        self._chunks.clear()
        self._buffered = 0
        if self._reader is not None:
            d, _ = self._reader
            self._reader = None
            d.errback(reason)

    @property
    def complete(self) -> bool:
        """
        Whether every announced byte arrived.
        """
        return self.received == self.length

    # Consumer side -----------------------------------------------------------------

    def read(self, max_bytes: int = READ_CHUNK) -> "Deferred[bytes]":
        """
        The next bytes (at most C{max_bytes}); C{b""} once all were read.
        """
        d: Deferred[bytes] = Deferred()
        if self._error is not None:
            d.errback(self._error)
        elif self._chunks:
            d.callback(self._take(max_bytes))
        elif self.consumed >= self.length:
            d.callback(b"")
        else:
            self._reader = (d, max_bytes)
        return d

    @inlineCallbacks
    def read_exactly(self, n: int) -> Any:
        """
        Exactly C{n} bytes (for small parts such as user data).
        """
        parts = []
        got = 0
        while got < n:
            chunk = yield self.read(n - got)
            if not chunk:
                raise UploadAborted(f"the upload ended {n - got} bytes early")
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def discard(self) -> None:
        """
        The consumer will read no more: drop what is buffered and tell the transport.
        """
        if self._discarded:
            return
        self._discarded = True
        self._chunks.clear()
        self._buffered = 0
        self._resume()
        if self.on_discard is not None and self.consumed < self.length:
            self.on_discard()

    def _take(self, max_bytes: int) -> bytes:
        parts = []
        taken = 0
        while self._chunks and taken < max_bytes:
            chunk = self._chunks.popleft()
            room = max_bytes - taken
            if len(chunk) > room:
                self._chunks.appendleft(chunk[room:])
                chunk = chunk[:room]
            parts.append(chunk)
            taken += len(chunk)
        self._buffered -= taken
        self.consumed += taken
        if self._buffered <= self.low_water:
            self._resume()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _resume(self) -> None:
        if self._paused and self._producer is not None:
            self._paused = False
            self._producer.resumeProducing()

    def _wake(self) -> None:
        if self._reader is not None and self._chunks:
            d, max_bytes = self._reader
            self._reader = None
            d.callback(self._take(max_bytes))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_hashing(fd: int, data: bytes, hasher: Any) -> None:
    hasher.update(data)
    _write_all(fd, data)


@inlineCallbacks
def write_to_file(
    upload: UploadStream,
    size: int,
    path: str,
    runner: IBlockingRunner,
    progress: Optional[Callable[[int, int], None]] = None,
    mode: int = 0o640,
    prefix: bytes = b"",
    hasher: Optional[Any] = None,
) -> Any:
    """
    Write C{prefix} (bytes already read from the upload, e.g. a header) and then the
    next C{size} bytes of C{upload} into a new file C{path} on C{runner}'s threads,
    then fsync it. C{progress(done, total)} counts the prefix too. A failure leaves
    the partial file for the caller to remove. With C{hasher} (a C{hashlib} object)
    every byte written is hashed too, on the same threads.
    """
    total = len(prefix) + size
    fd = yield runner.run(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)

    def write(data: bytes) -> Any:
        if hasher is None:
            return runner.run(_write_all, fd, data)
        return runner.run(_write_hashing, fd, data, hasher)

    try:
        done = 0
        if prefix:
            yield write(prefix)
            done = len(prefix)
        while done < total:
            chunk = yield upload.read(min(READ_CHUNK, total - done))
            if not chunk:
                raise UploadAborted(f"the upload ended after {done} of {total} bytes")
            yield write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        yield runner.run(os.fsync, fd)
    finally:
        yield runner.run(os.close, fd)
    return total
