# -*- test-case-name: tests.test_tftp_backend -*-
"""
Which bytes a TFTP client gets for a file name (the reference's tftpbootd lookup).

1. The files C{NetbootMachine} registered for the client's IP address (in memory,
   until they expire: L{hypervisor.dhcp.policy.DhcpPolicy.netboot_files}).
2. Otherwise the file of that path in the boot directory (C{-tftpbootDirectory}),
   opened and read on a thread (L{hypervisor.diskio.IBlockingRunner}), never on the
   reactor.

Names are normalised as the reference does (a leading C{/tftpboot} is stripped and a
leading C{/} ensured) for requests and registered files alike; C{.} and empty parts
are dropped and a C{..} part is refused, so is every path whose real location (after
symbolic links) is outside the boot directory. Only regular files are served.

L{IBackend.open} returns an L{IReader}: the size (for C{tsize}) and reads by offset
that answer at once from a read-ahead buffer when they can, so a transfer's next
window usually costs no thread hop and one large transfer never holds up others.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Callable, Mapping, Optional, Protocol, Union

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

from hypervisor.diskio import IBlockingRunner

PREFIX = "/tftpboot"
CHUNK = 128 * 1024
NETASCII_LIMIT = 16 * 1024 * 1024


class BackendError(Exception):
    """
    A file cannot be served; C{code} is the TFTP error code to answer with.
    """

    code = 0


class FileNotFound(BackendError):
    """
    No such file (TFTP error 1).
    """

    code = 1


class AccessViolation(BackendError):
    """
    The name may not be served: it leaves the boot directory, or is not readable
    (TFTP error 2).
    """

    code = 2


def normalise(filename: str) -> str:
    """
    The reference's name for C{filename}: C{/tftpboot} stripped, one leading C{/},
    no empty or C{.} parts.

    @raise AccessViolation: a C{..} part, or a NUL.
    """
    name = filename
    if name == PREFIX or name.startswith(PREFIX + "/"):
        name = name[len(PREFIX) :]
    if "\0" in name:
        raise AccessViolation("a file name has no NUL")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AccessViolation("a file name may not contain '..'")
    return "/" + "/".join(parts)


def netascii(data: bytes) -> bytes:
    """
    C{data} as netascii (RFC 764): CR becomes CR NUL, LF becomes CR LF.
    """
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


class IReader(Protocol):
    """
    The content of one opened file.
    """

    size: int

    def read(self, offset: int, length: int) -> Union[bytes, "Deferred[bytes]"]:
        """
        The bytes at C{offset} (fewer only at the end of the file): at once when they
        are buffered, else a Deferred (failing with L{BackendError}).
        """

    def close(self) -> None:
        """
        Release the file (reads in flight still finish).
        """


class IBackend(Protocol):
    """
    Where files come from.
    """

    def open(
        self, client_ip: str, filename: str, netascii_mode: bool = False
    ) -> "Deferred[IReader]":
        """
        Open C{filename} (normalised) for C{client_ip}; fails with L{BackendError}.
        """


class MemoryReader:
    """
    Bytes held in memory (a NetbootMachine file, a netascii translation).
    """

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        """
        The bytes at C{offset}.
        """
        return bytes(self.data[offset : offset + length])

    def close(self) -> None:
        """
        Nothing to release.
        """

    def blocking(self) -> "MemoryReader":
        """
        Itself: its reads never wait (and change nothing), on any thread.
        """
        return self


def _pread(fd: int, length: int, offset: int) -> bytes:
    first = os.pread(fd, length, offset)
    if len(first) == length or not first:
        return first  # the usual case: one read, no copy
    out = bytearray(first)
    while len(out) < length:
        got = os.pread(fd, length - len(out), offset + len(out))
        if not got:
            break
        out += got
    return bytes(out)


class FileReader:
    """
    An open file read by chunks on a thread, with the chunk after the one being sent
    read ahead; at most a few chunks are kept.
    """

    def __init__(self, fd: int, size: int, runner: IBlockingRunner, chunk: int = CHUNK) -> None:
        self.fd = fd
        self.size = size
        self.runner = runner
        self.chunk = chunk
        self.chunks: dict[int, bytes] = {}
        self.loading: dict[int, list[Deferred[bytes]]] = {}
        self.closed = False
        self._fd_closed = False

    def _load(self, index: int) -> "Deferred[bytes]":
        """
        Chunk C{index}, read on a thread (one read per chunk however many wait).
        """
        waiter: Deferred[bytes] = Deferred()
        waiters = self.loading.get(index)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self.loading[index] = [waiter]
        offset = index * self.chunk
        want = max(0, min(self.chunk, self.size - offset))

        def settle(result: Union[bytes, Failure]) -> None:
            waiting = self.loading.pop(index, [])
            if isinstance(result, Failure):
                if result.check(OSError):
                    result = Failure(BackendError(f"cannot read the file: {result.value}"))
            elif len(result) != want:
                result = Failure(BackendError("the file changed while it was being sent"))
            elif not self.closed:
                self.chunks[index] = result
            self._maybe_close_fd()
            for w in waiting:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(result)

        self.runner.run(_pread, self.fd, want, offset).addBoth(settle)
        return waiter

    def _assemble(self, first: int, last: int, offset: int, end: int) -> bytes:
        if first == last:
            base = first * self.chunk
            return self.chunks[first][offset - base : end - base]
        chunk = self.chunk
        parts = [self.chunks[first][offset - first * chunk :]]
        parts.extend(self.chunks[i] for i in range(first + 1, last))
        parts.append(self.chunks[last][: end - last * chunk])
        return b"".join(parts)

    def read(self, offset: int, length: int) -> Union[bytes, "Deferred[bytes]"]:
        """
        The bytes at C{offset}: at once if buffered; the next chunk is read ahead.
        """
        chunk = self.chunk
        first = offset // chunk
        end = offset + length
        if end > self.size:
            end = self.size
        # The common case: inside one buffered chunk whose successor is on its way.
        if (end - 1) // chunk == first and (first + 1) in self.chunks:
            data = self.chunks.get(first)
            if data is not None:
                base = first * chunk
                return data[offset - base : end - base]
        return self._read(offset, end)

    def _read(self, offset: int, end: int) -> Union[bytes, "Deferred[bytes]"]:
        if self.closed:
            return fail(BackendError("the file is closed"))
        if end <= offset:
            return b""
        first, last = offset // self.chunk, (end - 1) // self.chunk
        for index in list(self.chunks):
            if index < first - 1:
                del self.chunks[index]
        ahead = last + 1
        if ahead * self.chunk < self.size and ahead not in self.chunks:
            if ahead not in self.loading:
                self._load(ahead).addErrback(lambda _: None)
        missing = [i for i in range(first, last + 1) if i not in self.chunks]
        if not missing:
            return self._assemble(first, last, offset, end)
        loads = [self._load(i) for i in missing]
        done: Deferred[bytes] = Deferred()
        remaining = [len(loads)]
        errors: list[Failure] = []

        def one(result: object) -> None:
            if isinstance(result, Failure):
                errors.append(result)
            remaining[0] -= 1
            if remaining[0]:
                return
            if errors:
                done.errback(errors[0])
            elif any(i not in self.chunks for i in range(first, last + 1)):
                done.errback(BackendError("the file is closed"))
            else:
                done.callback(self._assemble(first, last, offset, end))

        for load in loads:
            load.addBoth(one)
        return done

    def _maybe_close_fd(self) -> None:
        if self.closed and not self.loading and not self._fd_closed:
            self._fd_closed = True
            self.runner.run(os.close, self.fd).addErrback(lambda _: None)

    def blocking(self) -> Optional["BlockingFileReader"]:
        """
        For a transfer's own thread: a reader that reads on the thread calling it,
        taking the descriptor over (this reader is closed; no I/O here); C{None} if
        reads are in flight already (then it stays on the reactor).
        """
        if self.loading or self.closed:
            return None
        self.closed = self._fd_closed = True
        self.chunks.clear()
        return BlockingFileReader(self.fd, self.size, self.chunk)

    def close(self) -> None:
        """
        Drop the buffers; close the file once reads in flight finished (on a thread).
        """
        self.closed = True
        self.chunks.clear()
        self._maybe_close_fd()


class BlockingFileReader:
    """
    An open file read on the thread that calls L{read} (a transfer's own thread,
    never the reactor's), by chunks; it owns the descriptor.
    """

    def __init__(self, fd: int, size: int, chunk: int = CHUNK) -> None:
        self.fd = fd
        self.size = size
        self.chunk = chunk
        self._base = 0
        self._data = b""
        self._error: Optional[BackendError] = None

    def read(self, offset: int, length: int) -> Union[bytes, "Deferred[bytes]"]:
        """
        The bytes at C{offset} (reading the chunks they are in if not buffered); a
        failed Deferred if the file cannot be read or shrank.
        """
        end = offset + length
        if end > self.size:
            end = self.size
        base = self._base
        if offset >= base and end <= base + len(self._data):
            return self._data[offset - base : end - base]
        if self._error is not None or self.fd < 0:
            return fail(self._error or BackendError("the file is closed"))
        if end <= offset:
            return b""
        start = offset  # reads go forward: from here on (a window's start)
        want = min(self.size, max(end, start + self.chunk)) - start
        try:
            data = _pread(self.fd, want, start)
        except OSError as e:
            self._error = BackendError(f"cannot read the file: {e}")
            return fail(self._error)
        if len(data) != want:
            self._error = BackendError("the file changed while it was being sent")
            return fail(self._error)
        self._base, self._data = start, data
        return data[offset - start : end - start]

    def close(self) -> None:
        """
        Close the file (on the calling thread).
        """
        fd, self.fd = self.fd, -1
        self._data = b""
        if fd >= 0:
            os.close(fd)


def open_beneath(root: str, name: str) -> tuple[int, int]:
    """
    Open C{name} (normalised) inside directory C{root} (its real path); return the
    descriptor and size (blocking).

    @raise FileNotFound: no such regular file.
    @raise AccessViolation: the path's real location is outside C{root}, or the file
        is not readable.
    """
    path = os.path.join(root, name.lstrip("/"))
    real = os.path.realpath(path)
    if real != root and not real.startswith(root.rstrip("/") + "/"):
        raise AccessViolation("the path leads out of the boot directory")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise FileNotFound("file not found") from None
    except PermissionError:
        raise AccessViolation("the file is not readable") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise AccessViolation("the path leads out of the boot directory") from None
        raise FileNotFound(f"cannot open the file: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFound("file not found (not a regular file)")
        return fd, st.st_size
    except BaseException:
        os.close(fd)
        raise


def open_small_whole(root: str, name: str, limit: int) -> Union[bytes, tuple[int, int]]:
    """
    L{open_beneath}, and a file of at most C{limit} bytes read whole and closed at
    once (its bytes); a larger one open (its descriptor and size). Blocking.
    """
    fd, size = open_beneath(root, name)
    if size > limit:
        return fd, size
    try:
        return _pread(fd, size, 0)
    finally:
        os.close(fd)


def _open_netascii(root: str, name: str) -> bytes:
    fd, size = open_beneath(root, name)
    try:
        if size > NETASCII_LIMIT:
            raise AccessViolation(
                f"files larger than {NETASCII_LIMIT >> 20} MiB are sent in octet mode only"
            )
        return netascii(_pread(fd, size, 0))
    finally:
        os.close(fd)


class DirectoryBackend:
    """
    Files inside one directory (the boot directory).
    """

    def __init__(self, root: str, runner: IBlockingRunner, chunk: int = CHUNK) -> None:
        self.root = os.path.realpath(root)
        self.runner = runner
        self.chunk = chunk

    def open(
        self, client_ip: str, filename: str, netascii_mode: bool = False
    ) -> "Deferred[IReader]":
        """
        Open C{filename} on a thread.
        """
        try:
            name = normalise(filename)
        except BackendError:
            return fail()
        if name == "/":
            return fail(FileNotFound("file not found (a directory)"))
        if netascii_mode:
            return self.runner.run(_open_netascii, self.root, name).addCallback(MemoryReader)
        # A file of one chunk or less is read whole with its opening: one trip to a
        # thread instead of three (open, read, close), and no more bytes held than
        # a FileReader holds. Many small files at once (a rack netbooting; 400
        # fetches of 64 KiB, 32 at a time): 2.3-2.8 ms of CPU a fetch before, most
        # of it handing work to threads and taking the GIL back, 1.3-1.7 after.
        return self.runner.run(open_small_whole, self.root, name, self.chunk).addCallback(
            self._reader
        )

    def _reader(self, opened: Union[bytes, tuple[int, int]]) -> IReader:
        if isinstance(opened, bytes):
            return MemoryReader(opened)
        return FileReader(opened[0], opened[1], self.runner, self.chunk)


class TftpBackend:
    """
    The server's backend: a client's NetbootMachine files, then the boot directory
    (if any).

    @ivar files_for: the files registered for an IP address (name -> content).
    """

    def __init__(
        self,
        files_for: Callable[[str], Mapping[str, bytes]] = lambda ip: {},
        directory: Optional[DirectoryBackend] = None,
    ) -> None:
        self.files_for = files_for
        self.directory = directory

    def open(
        self, client_ip: str, filename: str, netascii_mode: bool = False
    ) -> "Deferred[IReader]":
        """
        Open C{filename} for C{client_ip}.
        """
        try:
            name = normalise(filename)
        except BackendError:
            return fail()
        for registered, data in self.files_for(client_ip).items():
            try:
                if normalise(registered) == name:
                    return succeed(MemoryReader(netascii(data) if netascii_mode else data))
            except BackendError:
                continue
        if self.directory is None:
            return fail(FileNotFound("file not found"))
        return self.directory.open(client_ip, name, netascii_mode)
