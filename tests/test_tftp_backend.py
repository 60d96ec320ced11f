"""
Tests for L{hypervisor.tftp.backend}: name normalisation as the reference does it,
no way out of the boot directory (C{..}, absolute names, symbolic links out, FIFOs
and directories not served), NetbootMachine files before the directory and only
for their client, netascii, and the read-ahead file reader (on a synchronous runner
and on a real thread pool).
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hypervisor.diskio import ThreadPoolRunner
from hypervisor.testing import SynchronousRunner
from hypervisor.tftp.backend import (
    AccessViolation,
    BackendError,
    DirectoryBackend,
    FileNotFound,
    FileReader,
    IReader,
    MemoryReader,
    TftpBackend,
    netascii,
    normalise,
    open_beneath,
)


def result_of(d: "Deferred[IReader]") -> IReader | Failure:
    out: list[IReader | Failure] = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def read_all(reader: IReader, step: int = 1000) -> bytes:
    data = b""
    while len(data) < reader.size:
        got = reader.read(len(data), step)
        if isinstance(got, Deferred):
            got = got.result  # a synchronous runner answers at once
        assert isinstance(got, bytes)
        data += got
    return data


class NormaliseTests(SynchronousTestCase):
    """
    The reference's cleanPath, plus refusal of '..'.
    """

    def test_names(self) -> None:
        """
        /tftpboot is stripped, a leading / ensured, empty and '.' parts dropped.
        """
        cases = {
            "pxelinux.0": "/pxelinux.0",
            "/pxelinux.0": "/pxelinux.0",
            "/tftpboot/pxelinux.0": "/pxelinux.0",
            "/tftpboot": "/",
            "/tftpbootx/y": "/tftpbootx/y",
            "a//b/./c": "/a/b/c",
            "pxelinux.cfg/default": "/pxelinux.cfg/default",
        }
        for given, expected in cases.items():
            self.assertEqual(normalise(given), expected, given)

    def test_dot_dot(self) -> None:
        """
        Any '..' part is an access violation.
        """
        for name in ("..", "../etc/passwd", "/a/../../b", "/tftpboot/../x", "a/.."):
            self.assertRaises(AccessViolation, normalise, name)
        self.assertEqual(normalise("a..b"), "/a..b")


class DirectoryTests(SynchronousTestCase):
    """
    Files inside the boot directory, and nothing outside.
    """

    def setUp(self) -> None:
        self.top = tempfile.mkdtemp(prefix="hv-tftp-")
        self.addCleanup(lambda: os.system(f"rm -rf {self.top}"))
        self.root = os.path.join(self.top, "boot")
        os.makedirs(os.path.join(self.root, "sub"))
        with open(os.path.join(self.root, "sub", "file"), "wb") as f:
            f.write(b"inside")
        with open(os.path.join(self.top, "secret"), "wb") as f:
            f.write(b"outside")
        os.symlink("../secret", os.path.join(self.root, "out"))
        os.symlink(os.path.join(self.top, "secret"), os.path.join(self.root, "out-abs"))
        os.symlink(self.top, os.path.join(self.root, "updir"))
        os.symlink("sub/file", os.path.join(self.root, "in"))
        os.mkfifo(os.path.join(self.root, "fifo"))
        self.backend = DirectoryBackend(self.root, SynchronousRunner())  # type: ignore[arg-type]

    def get(self, name: str) -> IReader | Failure:
        return result_of(self.backend.open("10.0.0.1", name))

    def test_inside(self) -> None:
        """
        Files inside are served, also through a symbolic link that stays inside and
        with /tftpboot in front.
        """
        for name in ("sub/file", "/sub/file", "/tftpboot/sub/file", "in", "./sub//file"):
            reader = self.get(name)
            assert not isinstance(reader, Failure), (name, reader)
            self.assertEqual(read_all(reader), b"inside")
            reader.close()

    def test_small_files_read_whole(self) -> None:
        """
        A file of one chunk or less is read whole as it is opened (a MemoryReader;
        its descriptor closed at once); a larger one is read by chunks as it is sent.
        """
        backend = DirectoryBackend(self.root, SynchronousRunner(), chunk=1000)  # type: ignore[arg-type]
        for size in (0, 1, 1000, 1001):
            data = os.urandom(size)
            with open(os.path.join(self.root, "f"), "wb") as f:
                f.write(data)
            descriptors = len(os.listdir("/proc/self/fd"))
            reader = result_of(backend.open("10.0.0.1", "f"))
            assert not isinstance(reader, Failure), reader
            self.assertIsInstance(reader, MemoryReader if size <= 1000 else FileReader, size)
            self.assertEqual(
                len(os.listdir("/proc/self/fd")), descriptors + (0 if size <= 1000 else 1)
            )
            self.assertEqual((reader.size, read_all(reader)), (size, data))
            reader.close()
            self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors)

    def test_escapes(self) -> None:
        """
        '..', symbolic links out (relative, absolute, to a directory above) are
        access violations; an absolute name is looked up inside the directory.
        """
        for name in (
            "../secret",
            "/../secret",
            "sub/../../secret",
            "out",
            "out-abs",
            "updir/secret",
        ):
            failure = self.get(name)
            assert isinstance(failure, Failure), name
            self.assertIsInstance(failure.value, AccessViolation, name)
        failure = self.get(os.path.join(self.top, "secret"))
        assert isinstance(failure, Failure)
        self.assertIsInstance(failure.value, FileNotFound)

    def test_not_regular(self) -> None:
        """
        Missing files, directories and FIFOs are not found (a FIFO without a writer
        does not hang the open).
        """
        for name in ("missing", "sub", "/", "fifo", "sub/file/x"):
            failure = self.get(name)
            assert isinstance(failure, Failure), name
            self.assertIsInstance(failure.value, FileNotFound, name)

    def test_open_beneath_checks_root(self) -> None:
        """
        open_beneath refuses a name whose real path is outside the root.
        """
        self.assertRaises(AccessViolation, open_beneath, os.path.realpath(self.root), "/out")
        fd, size = open_beneath(os.path.realpath(self.root), "/sub/file")
        os.close(fd)
        self.assertEqual(size, 6)

    def test_netascii(self) -> None:
        """
        netascii mode translates line ends (and tsize is the translated size).
        """
        with open(os.path.join(self.root, "text"), "wb") as f:
            f.write(b"a\nb\rc")
        reader = result_of(self.backend.open("10.0.0.1", "text", True))
        assert not isinstance(reader, Failure)
        self.assertEqual(reader.size, len(b"a\r\nb\r\0c"))
        self.assertEqual(read_all(reader), b"a\r\nb\r\0c")
        self.assertEqual(netascii(b"\r\n"), b"\r\0\r\n")


class NetbootFilesTests(SynchronousTestCase):
    """
    Per-client files first.
    """

    def test_per_client_first(self) -> None:
        """
        A client's registered file wins over the directory (names normalised on both
        sides); another client gets the directory's file or not found.
        """
        root = tempfile.mkdtemp(prefix="hv-tftp-")
        self.addCleanup(lambda: os.system(f"rm -rf {root}"))
        with open(os.path.join(root, "config.json"), "wb") as f:
            f.write(b"from directory")
        files = {"10.0.0.5": {"/tftpboot/config.json": b"for .5", "imagename": b"img"}}
        backend = TftpBackend(
            lambda ip: files.get(ip, {}),
            DirectoryBackend(root, SynchronousRunner()),  # type: ignore[arg-type]
        )

        def get(ip: str, name: str) -> bytes | type[BaseException]:
            r = result_of(backend.open(ip, name))
            if isinstance(r, Failure):
                return type(r.value)
            return read_all(r)

        self.assertEqual(get("10.0.0.5", "config.json"), b"for .5")
        self.assertEqual(get("10.0.0.5", "/imagename"), b"img")
        self.assertEqual(get("10.0.0.6", "config.json"), b"from directory")
        self.assertEqual(get("10.0.0.6", "imagename"), FileNotFound)
        self.assertEqual(get("10.0.0.5", "../imagename"), AccessViolation)

    def test_no_directory(self) -> None:
        """
        Without a boot directory, only registered files exist.
        """
        backend = TftpBackend(lambda ip: {"a": b"1"})
        r = result_of(backend.open("1.2.3.4", "b"))
        assert isinstance(r, Failure)
        self.assertIsInstance(r.value, FileNotFound)


class FileReaderTests(SynchronousTestCase):
    """
    The read-ahead reader on a synchronous runner.
    """

    def setUp(self) -> None:
        fd, self.path = tempfile.mkstemp(prefix="hv-tftp-")
        self.data = os.urandom(10_000)
        os.write(fd, self.data)
        os.close(fd)
        self.addCleanup(os.unlink, self.path)
        self.runner = SynchronousRunner()

    def test_reads_and_read_ahead(self) -> None:
        """
        Reads spanning chunks return the right bytes; the chunk after the one read is
        read ahead; old chunks are dropped.
        """
        reader = FileReader(os.open(self.path, os.O_RDONLY), len(self.data), self.runner, chunk=1000)  # type: ignore[arg-type]
        first = reader.read(0, 10)
        assert isinstance(first, Deferred)
        self.assertEqual(first.result, self.data[:10])
        self.assertEqual(sorted(reader.chunks), [0, 1])
        self.assertEqual(reader.read(990, 20), self.data[990:1010])
        self.assertEqual(sorted(reader.chunks), [0, 1, 2])
        got = reader.read(5000, 2500)
        assert isinstance(got, Deferred)
        self.assertEqual(got.result, self.data[5000:7500])
        self.assertEqual(sorted(reader.chunks), [5, 6, 7, 8])
        self.assertEqual(reader.read(7500, 1000), self.data[7500:8500])  # 8 was read ahead
        self.assertEqual(sorted(reader.chunks), [6, 7, 8, 9])
        self.assertEqual(reader.read(9990, 100), self.data[9990:])
        self.assertEqual(reader.read(10_000, 100), b"")
        calls = self.runner.calls
        reader.close()
        self.assertEqual(reader.chunks, {})
        self.assertEqual(self.runner.calls, calls + 1)  # os.close on the runner
        self.assertRaises(OSError, os.fstat, reader.fd)

    def test_file_shrinks(self) -> None:
        """
        A file cut shorter while being sent fails the read.
        """
        reader = FileReader(os.open(self.path, os.O_RDONLY), len(self.data), self.runner, chunk=1000)  # type: ignore[arg-type]
        os.truncate(self.path, 1500)
        got = reader.read(3000, 10)
        assert isinstance(got, Deferred)
        failures: list[Failure] = []
        got.addErrback(failures.append)
        self.assertIsInstance(failures[0].value, BackendError)
        reader.close()


class ThreadedReaderTests(TestCase):
    """
    The reader on a real thread pool.
    """

    def test_threaded(self) -> None:
        """
        Reads through a real thread pool return the file's bytes in order.
        """
        fd, path = tempfile.mkstemp(prefix="hv-tftp-")
        data = os.urandom(3_000_000)
        os.write(fd, data)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        runner = ThreadPoolRunner(reactor, "tftp-test", size=2)
        runner.startService()
        self.addCleanup(runner.stopService)
        backend = DirectoryBackend(os.path.dirname(path), runner, chunk=65536)

        async def go() -> None:
            reader = await backend.open("1.1.1.1", os.path.basename(path))
            out = bytearray()
            while len(out) < reader.size:
                got = reader.read(len(out), 1428 * 8)
                if isinstance(got, Deferred):
                    got = await got
                out += got
            reader.close()
            self.assertEqual(bytes(out), data)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]
