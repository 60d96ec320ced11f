"""
Tests for L{hypervisor.tftp.session}: option negotiation, and read sessions in memory
on a L{Clock} — lock-step and windowed transfers, lost DATA, lost ACK, duplicate
ACKs (no sorcerer's apprentice), timeout and give-up, block numbers wrapping past
65535, a window of 16 with a gap, reads that answer later, a client's ERROR.
"""

from __future__ import annotations

import os
from typing import Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.tftp import codec
from hypervisor.tftp.backend import BackendError, MemoryReader
from hypervisor.tftp.session import Negotiated, ReadSession, negotiate


class NegotiateTests(SynchronousTestCase):
    """
    What an RRQ's options come to.
    """

    def test_no_options(self) -> None:
        """
        No options: defaults, no OACK.
        """
        n = negotiate({}, 1000)
        self.assertEqual((n.blksize, n.windowsize, n.timeout, n.oack), (512, 1, 1.0, {}))

    def test_all_options(self) -> None:
        """
        blksize, tsize, timeout and windowsize are granted, tsize with the file's size,
        in the request's order; unknown options are left out.
        """
        n = negotiate(
            {"tsize": "0", "blksize": "1428", "multicast": "", "timeout": "3", "windowsize": "16"},
            123456,
        )
        self.assertEqual(
            list(n.oack.items()),
            [("tsize", "123456"), ("blksize", "1428"), ("timeout", "3"), ("windowsize", "16")],
        )
        self.assertEqual((n.blksize, n.windowsize, n.timeout), (1428, 16, 3.0))

    def test_clamps(self) -> None:
        """
        blksize is clamped to the configured maximum and to the path MTU less the IP,
        UDP and TFTP headers; windowsize to its maximum and to 1 MiB per window.
        """
        self.assertEqual(negotiate({"blksize": "65464"}, 0, max_blksize=8192).blksize, 8192)
        self.assertEqual(negotiate({"blksize": "65464"}, 0, mtu=1500).oack["blksize"], "1468")
        self.assertEqual(negotiate({"blksize": "1024"}, 0, mtu=1500).blksize, 1024)
        self.assertEqual(negotiate({"windowsize": "999"}, 0, max_windowsize=32).windowsize, 32)
        big = negotiate({"blksize": "65464", "windowsize": "64"}, 0)
        self.assertEqual(big.windowsize, (1 << 20) // 65464)

    def test_bad_values_ignored(self) -> None:
        """
        Values out of range or not numbers are left out of the OACK (defaults used).
        """
        n = negotiate({"blksize": "7", "timeout": "0", "windowsize": "0", "tsize": "-1"}, 10)
        self.assertEqual((n.oack, n.blksize, n.windowsize), ({}, 512, 1))
        n = negotiate({"blksize": "1e3", "timeout": "256", "windowsize": "99999999999"}, 10)
        self.assertEqual(n.oack, {})


class SlowReader(MemoryReader):
    """
    A reader whose reads answer only when the test says so.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.pending: list[tuple[Deferred[bytes], bytes]] = []

    def read(self, offset: int, length: int) -> Union[bytes, "Deferred[bytes]"]:  # type: ignore[override]
        d: Deferred[bytes] = Deferred()
        self.pending.append((d, bytes(self.data[offset : offset + length])))
        return d

    def answer(self) -> None:
        pending, self.pending = self.pending, []
        for d, data in pending:
            d.callback(data)


class Harness:
    """
    A session and what it sent.
    """

    def __init__(
        self,
        data: bytes,
        negotiated: Optional[Negotiated] = None,
        retries: int = 3,
        reader: Optional[MemoryReader] = None,
    ) -> None:
        self.clock = Clock()
        self.sent: list[codec.Packet] = []
        self.done: list[Optional[str]] = []
        self.reader = reader or MemoryReader(data)
        self.session = ReadSession(
            self.reader,
            lambda raw: self.sent.append(codec.decode(raw)),
            self.clock,
            negotiated,
            retries=retries,
            on_done=lambda s, why: self.done.append(why),
        )

    def take(self) -> list[codec.Packet]:
        sent, self.sent = self.sent, []
        return sent

    def blocks(self) -> list[int]:
        return [p.block for p in self.take() if isinstance(p, codec.Data)]

    def ack(self, block: int) -> None:
        self.session.datagram(codec.encode(codec.Ack(block)))


class LockStepTests(SynchronousTestCase):
    """
    RFC 1350 transfers (window 1).
    """

    def test_whole_file(self) -> None:
        """
        Every block is sent after the ACK of the one before; a file that is a
        multiple of the block size ends with an empty block; the session completes.
        """
        data = os.urandom(1024)
        h = Harness(data)
        h.session.start()
        received = b""
        for block in (1, 2, 3):
            (packet,) = h.take()
            assert isinstance(packet, codec.Data)
            self.assertEqual(packet.block, block)
            received += packet.payload
            h.ack(block)
        self.assertEqual(received, data)
        self.assertEqual(h.done, [None])
        self.assertEqual(h.take(), [])
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_lost_data(self) -> None:
        """
        A lost DATA is sent again when the timeout passes, and only then.
        """
        h = Harness(b"x" * 1000)
        h.session.start()
        self.assertEqual(h.blocks(), [1])  # lost
        h.clock.advance(0.9)
        self.assertEqual(h.blocks(), [])
        h.clock.advance(0.1)
        self.assertEqual(h.blocks(), [1])
        h.ack(1)
        self.assertEqual(h.blocks(), [2])
        h.ack(2)
        self.assertEqual(h.done, [None])
        self.assertEqual(h.session.retransmissions, 1)

    def test_lost_ack(self) -> None:
        """
        A lost ACK: the block is sent again after the timeout; the client's ACK of it
        (again) moves on.
        """
        h = Harness(b"x" * 600)
        h.session.start()
        self.assertEqual(h.blocks(), [1])
        h.clock.advance(1.0)  # the ACK of block 1 was lost
        self.assertEqual(h.blocks(), [1])
        h.ack(1)
        self.assertEqual(h.blocks(), [2])
        h.ack(2)
        self.assertEqual(h.done, [None])

    def test_duplicate_ack_sends_nothing(self) -> None:
        """
        A duplicate ACK (the client saw a block twice) sends nothing: no sorcerer's
        apprentice doubling.
        """
        h = Harness(b"x" * 2000)
        h.session.start()
        h.take()
        h.ack(1)
        self.assertEqual(h.blocks(), [2])
        for _ in range(3):
            h.ack(1)
        self.assertEqual(h.blocks(), [])
        self.assertEqual(h.session.duplicates, 3)
        h.ack(2)
        self.assertEqual(h.blocks(), [3])

    def test_stray_acks(self) -> None:
        """
        An ACK of a block not yet sent is ignored.
        """
        h = Harness(b"x" * 2000)
        h.session.start()
        h.take()
        h.ack(3)
        h.ack(60000)
        self.assertEqual(h.blocks(), [])
        self.assertEqual(h.done, [])

    def test_give_up(self) -> None:
        """
        After the timeout and every retry pass without an ACK the session sends an
        ERROR and ends, with the reason.
        """
        h = Harness(b"x" * 100, retries=3)
        h.session.start()
        for _ in range(3):
            h.clock.advance(1.0)
        self.assertEqual(h.blocks(), [1, 1, 1, 1])
        self.assertEqual(h.done, [])
        h.clock.advance(1.0)
        (error,) = h.take()
        assert isinstance(error, codec.Error)
        self.assertIn("timed out", error.message)
        self.assertEqual(len(h.done), 1)
        self.assertIn("timed out", h.done[0] or "")
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_progress_resets_retries(self) -> None:
        """
        Retries count per block: progress gives the next block all of them again.
        """
        h = Harness(b"x" * 2000, retries=1)
        h.session.start()
        h.clock.advance(1.0)
        h.ack(1)
        h.clock.advance(1.0)
        h.ack(2)
        self.assertEqual(h.done, [])

    def test_wrap(self) -> None:
        """
        Block numbers wrap past 65535 to 0 and go on; the client's ACK numbers map
        to the right blocks and the data arrives whole.
        """
        data = os.urandom(8 * 70000 + 3)
        h = Harness(data, Negotiated(blksize=8))
        h.session.start()
        received = bytearray()
        numbers = []
        while not h.done:
            (packet,) = h.take()
            assert isinstance(packet, codec.Data)
            numbers.append(packet.block)
            received += packet.payload
            h.ack(packet.block)
        self.assertEqual(bytes(received), data)
        self.assertEqual(h.done, [None])
        self.assertEqual(numbers[65534:65538], [65535, 0, 1, 2])
        self.assertEqual(len(numbers), 70001)

    def test_oack(self) -> None:
        """
        With options: the OACK first (sent again on timeout), data after ACK 0; ACK 1
        before ACK 0 is ignored.
        """
        h = Harness(b"y" * 3000, negotiate({"blksize": "1428", "tsize": "0"}, 3000))
        h.session.start()
        self.assertEqual(h.take(), [codec.OptionAck({"blksize": "1428", "tsize": "3000"})])
        h.clock.advance(1.0)
        self.assertEqual(h.take(), [codec.OptionAck({"blksize": "1428", "tsize": "3000"})])
        h.ack(1)
        self.assertEqual(h.take(), [])
        h.ack(0)
        packet = h.take()[0]
        assert isinstance(packet, codec.Data)
        self.assertEqual((packet.block, len(packet.payload)), (1, 1428))

    def test_client_error(self) -> None:
        """
        An ERROR from the client (e.g. 8, options refused) ends the session quietly.
        """
        h = Harness(b"z" * 10, negotiate({"blksize": "1428"}, 10))
        h.session.start()
        h.take()
        h.session.datagram(codec.encode(codec.Error(8, "no")))
        self.assertEqual(h.take(), [])
        self.assertEqual(len(h.done), 1)
        self.assertIn("error 8", h.done[0] or "")

    def test_other_packets(self) -> None:
        """
        Garbage is ignored; a DATA or request from the client gets ERROR 4 and ends it.
        """
        h = Harness(b"z" * 10)
        h.session.start()
        h.take()
        h.session.datagram(b"\x00\x04\x00")
        self.assertEqual(h.take(), [])
        h.session.datagram(codec.encode(codec.Data(1, b"x")))
        (error,) = h.take()
        assert isinstance(error, codec.Error)
        self.assertEqual(error.code, codec.ERR_ILLEGAL_OPERATION)
        self.assertEqual(len(h.done), 1)


class WindowTests(SynchronousTestCase):
    """
    RFC 7440 windows.
    """

    def test_window_of_16(self) -> None:
        """
        16 blocks go out per window; the ACK of the last moves on by 16.
        """
        data = os.urandom(512 * 40 + 7)
        h = Harness(data, Negotiated(windowsize=16))
        h.session.start()
        self.assertEqual(h.blocks(), list(range(1, 17)))
        h.ack(16)
        self.assertEqual(h.blocks(), list(range(17, 33)))
        h.ack(32)
        self.assertEqual(h.blocks(), list(range(33, 42)))
        h.ack(41)
        self.assertEqual(h.done, [None])

    def test_gap(self) -> None:
        """
        The client acknowledges the last block before a gap: the window starts after
        it (the rest is sent again).
        """
        h = Harness(b"x" * 512 * 40, Negotiated(windowsize=16))
        h.session.start()
        h.take()
        h.ack(5)  # block 6 was lost
        self.assertEqual(h.blocks(), list(range(6, 22)))

    def test_first_block_lost(self) -> None:
        """
        A duplicate ACK of the block before the window (its first block was lost)
        sends the window again once; more duplicates wait for the timeout.
        """
        h = Harness(b"x" * 512 * 40, Negotiated(windowsize=16))
        h.session.start()
        h.take()
        h.ack(16)
        self.assertEqual(h.blocks(), list(range(17, 33)))
        h.ack(16)
        self.assertEqual(h.blocks(), list(range(17, 33)))
        h.ack(16)
        h.ack(16)
        self.assertEqual(h.blocks(), [])
        h.clock.advance(1.0)
        self.assertEqual(h.blocks(), list(range(17, 33)))

    def test_lost_window_ack(self) -> None:
        """
        A lost ACK of a whole window: the window is sent again after the timeout.
        """
        h = Harness(b"x" * 512 * 20, Negotiated(windowsize=8))
        h.session.start()
        self.assertEqual(h.blocks(), list(range(1, 9)))
        h.clock.advance(1.0)
        self.assertEqual(h.blocks(), list(range(1, 9)))
        h.ack(8)
        self.assertEqual(h.blocks(), list(range(9, 17)))

    def test_window_wrap(self) -> None:
        """
        A window that crosses 65535 carries 65535, 0, 1 ...; an ACK of 0 there means
        block 65536.
        """
        data = os.urandom(8 * 65540)
        h = Harness(data, Negotiated(blksize=8, windowsize=16))
        h.session.start()
        received = bytearray()
        while not h.done:
            packets = [p for p in h.take() if isinstance(p, codec.Data)]
            for p in packets:
                received += p.payload
            h.ack(packets[-1].block)
        self.assertEqual(bytes(received), data)


class SlowReadTests(SynchronousTestCase):
    """
    Reads that answer later (a thread).
    """

    def test_sends_when_read(self) -> None:
        """
        The window goes out when its read answers.
        """
        reader = SlowReader(b"a" * 1000)
        h = Harness(b"", reader=reader)
        h.session.start()
        self.assertEqual(h.take(), [])
        reader.answer()
        self.assertEqual(h.blocks(), [1])

    def test_stale_read_dropped(self) -> None:
        """
        A read that answers after the session ended sends nothing.
        """
        reader = SlowReader(b"a" * 1000)
        h = Harness(b"", reader=reader)
        h.session.start()
        h.session.stop("server stopping")
        h.take()
        reader.answer()
        self.assertEqual(h.take(), [])

    def test_read_error(self) -> None:
        """
        A read that fails ends the session with an ERROR saying why.
        """
        reader = SlowReader(b"a" * 1000)
        h = Harness(b"", reader=reader)
        h.session.start()
        ((d, _),) = reader.pending
        d.errback(BackendError("the file changed while it was being sent"))
        (error,) = h.take()
        assert isinstance(error, codec.Error)
        self.assertIn("changed", error.message)
        self.assertEqual(h.done, ["the file changed while it was being sent"])
