"""
Fast tests of the access tokens (L{hypervisor.manager.tokens}) and of the volume
transfer (L{hypervisor.migration.transfer}) with a source served in memory: ranges,
checksums, the re-sync that sends only changed chunks, resuming, a corrupted chunk.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.errors import InvalidRequest, WrongState
from hypervisor.manager.tokens import AccessTokens
from hypervisor.migration import transfer
from hypervisor.migration.messages import ReadVmVolumeRequest

KiB = 1024


class FakeVm:
    def __init__(self, ip: str) -> None:
        self.ip = ip


class TokenTests(TestCase):
    """
    Tokens: one per VM, 32 random bytes, bound to the VM object, expiring.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.vm = FakeVm("10.0.0.2")
        self.table = {"10.0.0.2": self.vm}
        self.tokens = AccessTokens(self.clock, self.table.get)

    def test_issue_and_check(self) -> None:
        """
        A token matches only its VM; a second one is refused while it lasts.
        """
        token = self.tokens.issue(self.vm, 3600)
        self.assertEqual(len(token), 32)
        self.assertTrue(self.tokens.valid("10.0.0.2", token))
        self.assertFalse(self.tokens.valid("10.0.0.3", token))
        self.assertFalse(self.tokens.valid("10.0.0.2", token[:31]))
        self.assertFalse(self.tokens.valid("10.0.0.2", bytes(32)))
        self.assertRaises(WrongState, self.tokens.issue, self.vm, 3600)
        identity = self.tokens.identity(Identity(username="bob"), "10.0.0.2", token)
        self.assertEqual(identity.token_vm, "10.0.0.2")
        self.assertEqual(
            self.tokens.identity(Identity(username="bob"), "10.0.0.2", b"x" * 32).token_vm, ""
        )

    def test_lifetime_limits(self) -> None:
        """
        1 minute to 1 day, as the reference.
        """
        self.assertRaises(InvalidRequest, self.tokens.issue, self.vm, 59)
        self.assertRaises(InvalidRequest, self.tokens.issue, self.vm, 86401)

    def test_expiry_and_discard(self) -> None:
        """
        An expired token matches nothing and a new one may be issued; a discarded one
        is scrubbed.
        """
        token = self.tokens.issue(self.vm, 60)
        self.clock.advance(60)
        self.assertFalse(self.tokens.valid("10.0.0.2", token))
        token = self.tokens.issue(self.vm, 60)
        held = self.tokens._tokens["10.0.0.2"].value
        self.tokens.discard("10.0.0.2")
        self.assertEqual(bytes(held), bytes(32))
        self.assertFalse(self.tokens.valid("10.0.0.2", token))

    def test_bound_to_the_vm(self) -> None:
        """
        A VM destroyed and another made at its IP does not inherit the token.
        """
        token = self.tokens.issue(self.vm, 3600)
        self.table["10.0.0.2"] = FakeVm("10.0.0.2")
        self.assertFalse(self.tokens.valid("10.0.0.2", token))


class TransferTests(TestCase):
    """
    ReadVmVolume's two ends, joined in memory.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.dir, True))
        self.source = os.path.join(self.dir, "source")
        self.target = os.path.join(self.dir, "target")
        self.size = 3 * transfer.MAX_READ + 100 * KiB
        with open(self.source, "wb") as f:
            f.write(os.urandom(self.size))
        self.calls = 0
        self.corrupt = False

    def call(self, request: ReadVmVolumeRequest) -> tuple[dict[str, Any], bytes]:
        self.calls += 1
        wire = codec.decode(ReadVmVolumeRequest, codec.encode(request))
        response, data = transfer.read_range(self.source, wire, self.size)
        if self.corrupt and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        return codec.to_dict(response), data

    def same(self) -> bool:
        with open(self.source, "rb") as a, open(self.target, "rb") as b:
            return a.read() == b.read()

    def test_copy_then_resync(self) -> None:
        """
        A full copy, then a change of one chunk on the source: the re-sync sends that
        chunk only.
        """
        state = transfer.pull_volume(self.call, ReadVmVolumeRequest(), self.target, self.size)
        self.assertEqual(state.sent, self.size)
        self.assertTrue(self.same())
        with open(self.source, "r+b") as f:
            f.seek(5 * transfer.CHUNK + 7)
            f.write(b"changed")
        state = transfer.pull_volume(
            self.call, ReadVmVolumeRequest(), self.target, self.size, resync=True
        )
        self.assertEqual(state.sent, transfer.CHUNK)
        self.assertEqual(state.skipped, self.size - transfer.CHUNK)
        self.assertTrue(self.same())

    def test_resume(self) -> None:
        """
        A pull that starts at an offset asks only for the rest.
        """
        transfer.pull_volume(self.call, ReadVmVolumeRequest(), self.target, self.size)
        self.calls = 0
        state = transfer.pull_volume(
            self.call, ReadVmVolumeRequest(), self.target, self.size, start=2 * transfer.MAX_READ
        )
        self.assertEqual(self.calls, 2)
        self.assertEqual(state.sent, self.size - 2 * transfer.MAX_READ)

    def senders(self, n: int, corrupt: int = -1) -> tuple[list[Any], dict[str, int]]:
        """
        C{n} thread-safe senders (sender C{corrupt} flips a bit of what it gets), and
        counts: calls per sender, most calls in flight at once.
        """
        import threading
        import time

        lock = threading.Lock()
        seen = {"in_flight": 0, "most": 0}

        def sender(i: int) -> Any:
            def call(request: ReadVmVolumeRequest) -> tuple[dict[str, Any], bytes]:
                with lock:
                    seen[f"calls{i}"] = seen.get(f"calls{i}", 0) + 1
                    seen["in_flight"] += 1
                    seen["most"] = max(seen["most"], seen["in_flight"])
                try:
                    time.sleep(0.05)  # the network: lets the other senders start
                    wire = codec.decode(ReadVmVolumeRequest, codec.encode(request))
                    response, data = transfer.read_range(self.source, wire, self.size)
                    if i == corrupt and data:
                        data = bytes([data[0] ^ 1]) + data[1:]
                    return codec.to_dict(response), data
                finally:
                    with lock:
                        seen["in_flight"] -= 1

            return call

        return [sender(i) for i in range(n)], seen

    def test_ranges_in_flight_at_once(self) -> None:
        """
        With extra senders, ranges are fetched by all of them at once (never more
        than one each), the copy is exact, the verified offset only moves forward and
        ends at the size; a re-sync with them sends only the changed chunk.
        """
        (first, *rest), seen = self.senders(3)
        offsets: list[int] = []
        state = transfer.pull_volume(
            first,
            ReadVmVolumeRequest(),
            self.target,
            self.size,
            extra_calls=rest,
            progress=lambda state, size: offsets.append(state.offset),
        )
        self.assertTrue(self.same())
        self.assertEqual((state.sent, state.offset), (self.size, self.size))
        self.assertEqual(seen["most"], 3)
        self.assertEqual(sum(seen[f"calls{i}"] for i in range(3)), 4)  # 4 ranges
        self.assertEqual(offsets, sorted(offsets))
        self.assertEqual(offsets[-1], self.size)
        with open(self.source, "r+b") as f:
            f.seek(2 * transfer.MAX_READ + 3)
            f.write(b"changed")
        state = transfer.pull_volume(
            first, ReadVmVolumeRequest(), self.target, self.size, resync=True, extra_calls=rest
        )
        self.assertEqual((state.sent, state.skipped), (transfer.CHUNK, self.size - transfer.CHUNK))
        self.assertTrue(self.same())

    def test_one_sender_failing_fails_the_pull(self) -> None:
        """
        A checksum mismatch on one of three senders fails the pull with that error;
        the others take no range after it.
        """
        (first, *rest), seen = self.senders(3, corrupt=1)
        error = self.assertRaises(
            transfer.TransferError,
            transfer.pull_volume,
            first,
            ReadVmVolumeRequest(),
            self.target,
            self.size,
            extra_calls=rest,
        )
        self.assertIn("fails its checksum", str(error))
        self.assertEqual(seen["calls1"], 1)
        self.assertEqual(seen["in_flight"], 0)  # every thread returned

    def test_more_senders_than_ranges(self) -> None:
        """
        A volume of one range uses one sender (no thread for the others).
        """
        small = os.path.join(self.dir, "small")
        with open(small, "wb") as f:
            f.write(os.urandom(100 * KiB))
        self.source, self.size = small, 100 * KiB
        (first, *rest), seen = self.senders(3)
        state = transfer.pull_volume(
            first, ReadVmVolumeRequest(), self.target, self.size, extra_calls=rest
        )
        self.assertEqual(state.sent, 100 * KiB)
        self.assertTrue(self.same())
        self.assertEqual(
            (seen.get("calls0"), seen.get("calls1"), seen.get("calls2")), (1, None, None)
        )

    def zero_filled(self, *data_chunks: int) -> None:
        """
        Make the source all zeros but for random bytes in chunks C{data_chunks}.
        """
        with open(self.source, "r+b") as f:
            f.write(bytes(self.size))
            for i in data_chunks:
                f.seek(i * transfer.CHUNK)
                f.write(os.urandom(transfer.CHUNK))

    def test_zero_chunks_are_not_sent(self) -> None:
        """
        Chunks of zeros travel as a flag: no bytes; the copy is exact and fully
        allocated (thick, as the source). A re-sync after the source zeroed a chunk
        the copy has data in zeroes it there; the copy's zero chunks that stay zero
        are unchanged.
        """
        self.zero_filled(1, 9)
        raw: list[int] = []

        def call(request: ReadVmVolumeRequest) -> tuple[dict[str, Any], bytes]:
            reply, data = self.call(request)
            raw.append(len(data))
            return reply, data

        state = transfer.pull_volume(call, ReadVmVolumeRequest(), self.target, self.size)
        self.assertTrue(self.same())
        self.assertEqual(sum(raw), 2 * transfer.CHUNK)
        self.assertEqual((state.sent, state.zero), (2 * transfer.CHUNK, self.size - state.sent))
        self.assertGreaterEqual(os.stat(self.target).st_blocks * 512, self.size)
        with open(self.source, "r+b") as f:
            f.seek(9 * transfer.CHUNK)
            f.write(bytes(transfer.CHUNK))
        state = transfer.pull_volume(
            call, ReadVmVolumeRequest(), self.target, self.size, resync=True
        )
        self.assertTrue(self.same())
        self.assertEqual((state.sent, state.zero), (0, transfer.CHUNK))
        self.assertEqual(state.skipped, self.size - transfer.CHUNK)

    def test_zero_chunk_over_old_data(self) -> None:
        """
        A copy resumed over a file holding other bytes gets zeros written where the
        source's chunks are zero.
        """
        self.zero_filled(0)
        with open(self.target, "wb") as f:
            f.write(os.urandom(self.size))
        state = transfer.pull_volume(self.call, ReadVmVolumeRequest(), self.target, self.size)
        self.assertTrue(self.same())
        self.assertEqual(state.zero, self.size - transfer.CHUNK)

    def test_no_fallocate(self) -> None:
        """
        On a file system without fallocate (EOPNOTSUPP, or EINVAL as some say) the
        copy is made all the same, holes where the source has zeros; a full disk
        (ENOSPC) fails the pull before anything is asked of the source.
        """
        import errno

        self.zero_filled(2)
        for code in (errno.EOPNOTSUPP, errno.EINVAL):

            def unsupported(fd: int, offset: int, length: int, code: int = code) -> None:
                raise OSError(code, os.strerror(code))

            self.patch(os, "posix_fallocate", unsupported)
            if os.path.exists(self.target):
                os.unlink(self.target)
            state = transfer.pull_volume(self.call, ReadVmVolumeRequest(), self.target, self.size)
            self.assertTrue(self.same())
            self.assertEqual(state.sent, transfer.CHUNK)
            self.assertLess(os.stat(self.target).st_blocks * 512, self.size // 2)

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        self.patch(os, "posix_fallocate", full)
        os.unlink(self.target)
        calls = self.calls
        with self.assertRaises(OSError) as e:
            transfer.pull_volume(self.call, ReadVmVolumeRequest(), self.target, self.size)
        self.assertEqual(e.exception.errno, errno.ENOSPC)
        self.assertEqual(self.calls, calls)

    def test_zero_chunks_only_to_callers_that_ask(self) -> None:
        """
        A caller that does not say C{ZeroChunks} (an older one) gets every chunk's
        bytes and checksum; the wire leaves both flags out when false.
        """
        self.zero_filled()
        response, data = transfer.read_range(
            self.source, ReadVmVolumeRequest(Length=2 * transfer.CHUNK), self.size
        )
        self.assertEqual(len(data), 2 * transfer.CHUNK)
        self.assertEqual([(c.Sent, c.Zero) for c in response.Chunks], [(True, False)] * 2)
        self.assertEqual(response.Chunks[0].Checksum, transfer.checksum(bytes(transfer.CHUNK)))
        self.assertNotIn(b"Zero", codec.encode(response))
        self.assertNotIn(b"ZeroChunks", codec.encode(ReadVmVolumeRequest()))
        response, data = transfer.read_range(
            self.source,
            ReadVmVolumeRequest(Length=2 * transfer.CHUNK, ZeroChunks=True),
            self.size,
        )
        self.assertEqual(data, b"")
        self.assertEqual([(c.Sent, c.Zero) for c in response.Chunks], [(False, True)] * 2)
        self.assertEqual(response.Chunks[0].Checksum, transfer.checksum(bytes(transfer.CHUNK)))

    def test_corrupt_chunk(self) -> None:
        """
        A chunk whose bytes do not match its checksum fails the pull.
        """
        self.corrupt = True
        self.assertRaises(
            transfer.TransferError,
            transfer.pull_volume,
            self.call,
            ReadVmVolumeRequest(),
            self.target,
            self.size,
        )

    def test_bad_ranges(self) -> None:
        """
        Out-of-range offsets, over-long ranges, odd chunk sizes and wrong checksum
        counts are refused.
        """
        for request in [
            ReadVmVolumeRequest(Offset=self.size + 1),
            ReadVmVolumeRequest(Length=transfer.MAX_READ + 1),
            ReadVmVolumeRequest(ChunkSize=1),
            ReadVmVolumeRequest(Length=2 * transfer.CHUNK, Checksums=[b"x" * 32]),
        ]:
            self.assertRaises(InvalidRequest, transfer.check_range, request, self.size)

    def test_backed_qcow2_refused(self) -> None:
        """
        A qcow2 overlay (backing file offset set) is not sent.
        """
        path = os.path.join(self.dir, "overlay")
        with open(path, "wb") as f:
            f.write(b"QFI\xfb" + b"\x00\x00\x00\x03" + (1234).to_bytes(8, "big") + bytes(100))
        self.assertRaises(InvalidRequest, transfer.read_range, path, ReadVmVolumeRequest(), 116)


class MoreConnectionsTests(TestCase):
    """
    L{service.more_connections}: extra connections to the source for a pull.
    """

    class Client:
        def __init__(self, opened: list["MoreConnectionsTests.Client"], fail_after: int) -> None:
            self.opened = opened
            self.fail_after = fail_after
            self.closed = False

        def sibling(self) -> "MoreConnectionsTests.Client":
            if len(self.opened) >= self.fail_after:
                raise OSError("connection refused")
            other = MoreConnectionsTests.Client(self.opened, self.fail_after)
            self.opened.append(other)
            return other

        def close(self) -> None:
            self.closed = True

    def test_all_opened_and_closed(self) -> None:
        """
        Two more connections are opened, handed over, and closed at the end.
        """
        from hypervisor.migration import service

        opened: list[Any] = []
        with service.more_connections(self.Client(opened, 10), 2, "10.0.0.2") as more:  # type: ignore[arg-type]
            self.assertEqual(more, opened)
            self.assertEqual(len(more), 2)
            self.assertFalse(any(c.closed for c in opened))
        self.assertTrue(all(c.closed for c in opened))

    def test_one_that_fails_leaves_fewer(self) -> None:
        """
        A connection that cannot be opened is not a failure: the pull gets the ones
        that opened (and a log line says so); they are closed even if the pull fails.
        """
        from hypervisor.migration import service

        opened: list[Any] = []
        with self.assertRaises(RuntimeError):
            with service.more_connections(self.Client(opened, 1), 2, "10.0.0.2") as more:  # type: ignore[arg-type]
                self.assertEqual(len(more), 1)
                raise RuntimeError("the pull failed")
        self.assertEqual(len(opened), 1)
        self.assertTrue(opened[0].closed)
        self.flushLoggedErrors()
