"""
Tests for L{hypervisor.tftp.threaded}: the loop clock, and transfers on threads of
their own over real UDP sockets on 127.0.0.1 against a scripted client (itself on a
thread, so the reactor runs meanwhile): lost ACK, duplicate ACKs (no sorcerer's
apprentice), timeout and give-up, the block-number wrap, a window with a lost
block, a client's ERROR, a file that shrinks; the thread bound of the server (the
transfer beyond it runs on the reactor) and a stop in the middle of transfers that
leaves no thread.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hypervisor.tftp import codec
from hypervisor.tftp.backend import BlockingFileReader, MemoryReader
from hypervisor.tftp.service import TftpService
from hypervisor.tftp.session import Negotiated
from hypervisor.tftp.threaded import LoopClock, TransferThread, TransferThreads


class LoopClockTests(SynchronousTestCase):
    """
    The clock a transfer thread's session runs on.
    """

    def test_calls(self) -> None:
        """
        A call runs once when due; reset moves it from the loop's time; a cancelled
        call does not run; the earliest due time is known.
        """
        clock = LoopClock()
        clock.now = 100.0
        ran: list[str] = []
        a = clock.callLater(1.0, ran.append, "a")
        b = clock.callLater(2.0, ran.append, "b")
        c = clock.callLater(0.5, ran.append, "c")
        self.assertEqual(clock.next_due(), 100.5)
        c.cancel()
        self.assertFalse(c.active())
        self.assertEqual(clock.next_due(), 101.0)
        clock.now = 100.9
        a.reset(1.0)
        self.assertEqual(a.getTime(), 101.9)
        clock.run_due(101.5)
        self.assertEqual(ran, [])
        clock.run_due(102.0)
        self.assertEqual(ran, ["a", "b"])
        self.assertEqual((a.active(), clock.next_due(), clock.getDelayedCalls()), (False, None, []))


def sockets() -> tuple[socket.socket, socket.socket]:
    """
    A transfer socket (as the server makes it: ephemeral port, connected) and the
    client's socket, both on 127.0.0.1.
    """
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client.bind(("127.0.0.1", 0))
    server.connect(client.getsockname())
    client.connect(server.getsockname())
    server.setblocking(False)
    client.settimeout(5)
    return server, client


def ack(block: int) -> bytes:
    return struct.pack("!HH", codec.ACK, block & 0xFFFF)


class Client:
    """
    A scripted lock-step (or windowed) client on a blocking socket.

    @ivar data: every DATA packet received, as (wire block, payload length).
    """

    def __init__(self, sock: socket.socket, blksize: int, window: int = 1) -> None:
        self.sock = sock
        self.blksize = blksize
        self.window = window
        self.data: list[tuple[int, int]] = []
        self.content = bytearray()
        self.error: Optional[bytes] = None

    def receive(self) -> bytes:
        packet = self.sock.recv(65536)
        if packet[1] == codec.ERROR:
            self.error = packet
        elif packet[1] == codec.DATA:
            self.data.append((struct.unpack_from("!H", packet, 2)[0], len(packet) - 4))
        return packet

    def fetch(
        self,
        drop_ack: tuple[int, ...] = (),
        duplicate_ack: tuple[int, ...] = (),
        stop_after: int = 0,
        error_after: int = 0,
        lose_data: tuple[int, ...] = (),
        delay: float = 0.0,
    ) -> bytes:
        """
        Receive the file: the ACKs of blocks in C{drop_ack} are not sent the first
        time, those in C{duplicate_ack} twice; stop answering (C{stop_after}) or send
        an ERROR (C{error_after}) after that many blocks; blocks in C{lose_data} are
        ignored the first time (windowed); each ACK waits C{delay} seconds first.
        """
        expected = 1
        dropped: set[int] = set()
        lost: set[int] = set()
        while True:
            packet = self.receive()
            if packet[1] == codec.ERROR:
                return bytes(self.content)
            wire = struct.unpack_from("!H", packet, 2)[0]
            if wire != expected & 0xFFFF:
                if self.window > 1 and expected > 1:
                    self.sock.send(ack(expected - 1))  # a gap: ask for the rest
                continue
            if expected in lose_data and expected not in lost:
                lost.add(expected)
                continue
            self.content += packet[4:]
            last = len(packet) - 4 < self.blksize
            if error_after and expected == error_after:
                self.sock.send(codec.error_packet(codec.ERR_NOT_DEFINED, "disk full"))
                return bytes(self.content)
            if stop_after and expected == stop_after:
                return bytes(self.content)
            if expected in drop_ack and expected not in dropped:
                dropped.add(expected)
                del self.content[len(self.content) - (len(packet) - 4) :]
                continue  # no ACK: the block comes again after the timeout
            if expected % self.window == 0 or last:
                if delay:
                    time.sleep(delay)
                self.sock.send(ack(expected))
                if expected in duplicate_ack:
                    self.sock.send(ack(expected))
            if last:
                return bytes(self.content)
            expected += 1

    def drain(self, seconds: float) -> int:
        """
        Packets received within C{seconds} (after a transfer).
        """
        self.sock.settimeout(seconds)
        count = 0
        try:
            while True:
                self.receive()
                count += 1
        except socket.timeout:
            return count


class TransferThreadTests(TestCase):
    """
    One transfer on its own thread, over real sockets (its thread blocks at once
    for each packet: no polling).
    """

    timeout = 60
    spin = 0.0

    def setUp(self) -> None:
        self.threads = TransferThreads(reactor, 4, spin=self.spin)
        self.dir = tempfile.mkdtemp(prefix="hv-tftp-threaded-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def file(self, data: bytes) -> BlockingFileReader:
        path = os.path.join(self.dir, "f")
        with open(path, "wb") as f:
            f.write(data)
        fd = os.open(path, os.O_RDONLY)
        return BlockingFileReader(fd, len(data), chunk=4096)

    def start(
        self, reader: Any, negotiated: Negotiated, retries: int = 5
    ) -> tuple[TransferThread, socket.socket, "Deferred[Optional[str]]"]:
        server, client = sockets()
        self.addCleanup(client.close)
        done: Deferred[Optional[str]] = Deferred()
        transfer = TransferThread(
            reactor,
            server,
            reader,
            negotiated,
            retries=retries,
            on_done=lambda t, why: done.callback(why),
            spinner=self.threads.spinner,
        )
        self.assertTrue(self.threads.start(transfer))
        return transfer, client, done

    async def finish(
        self, transfer: TransferThread, done: "Deferred[Optional[str]]"
    ) -> Optional[str]:
        why = await done
        await self.threads.idle()
        self.assertFalse(transfer.thread.is_alive())
        self.assertEqual((self.threads.running, self.threads.exiting), (set(), set()))
        if isinstance(transfer.reader, BlockingFileReader):
            self.assertEqual(transfer.reader.fd, -1)  # closed by the thread
        return why

    def test_whole_file_and_duplicate_acks(self) -> None:
        """
        A file of several chunks arrives intact; ACKs sent twice get no block sent
        twice (no sorcerer's apprentice).
        """
        data = os.urandom(100_000)
        transfer, sock, done = self.start(self.file(data), Negotiated(blksize=1428))
        client = Client(sock, 1428)

        async def go() -> None:
            got = await deferToThread(client.fetch, duplicate_ack=(3, 4, 40))
            self.assertEqual(got, data)
            self.assertIsNone(await self.finish(transfer, done))
            self.assertEqual(await deferToThread(client.drain, 0.3), 0)
            self.assertEqual([b for b, _ in client.data], list(range(1, 72)))
            assert transfer.session is not None
            self.assertEqual(transfer.session.duplicates, 3)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_lost_ack(self) -> None:
        """
        An ACK that does not arrive: the block is sent again after the timeout, and
        the transfer goes on (also for the last block).
        """
        data = os.urandom(10 * 512 + 7)
        transfer, sock, done = self.start(MemoryReader(data), Negotiated(timeout=0.2))
        client = Client(sock, 512)

        async def go() -> None:
            got = await deferToThread(client.fetch, drop_ack=(4, 11))
            self.assertEqual(got, data)
            self.assertIsNone(await self.finish(transfer, done))
            blocks = [b for b, _ in client.data]
            self.assertEqual(blocks, [1, 2, 3, 4] + list(range(4, 12)) + [11])
            assert transfer.session is not None
            self.assertEqual(transfer.session.retransmissions, 2)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_give_up(self) -> None:
        """
        A client that stops answering gets the block retries + 1 times, then an
        ERROR; the transfer ends as timed out and its thread is gone.
        """
        transfer, sock, done = self.start(
            MemoryReader(os.urandom(5000)), Negotiated(timeout=0.1), retries=3
        )
        client = Client(sock, 512)

        async def go() -> None:
            await deferToThread(client.fetch, stop_after=2)
            why = await self.finish(transfer, done)
            assert why is not None
            self.assertTrue(why.startswith("timed out"), why)
            await deferToThread(client.drain, 0.3)
            self.assertEqual([b for b, _ in client.data], [1, 2, 2, 2, 2])
            assert client.error is not None
            self.assertIn(b"timed out", client.error)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_wrap(self) -> None:
        """
        70001 blocks of 8 bytes: block numbers go 65535, 0, 1, ... and the file is
        intact.
        """
        data = os.urandom(70_000 * 8 + 3)
        transfer, sock, done = self.start(self.file(data), Negotiated(blksize=8))
        client = Client(sock, 8)

        async def go() -> None:
            got = await deferToThread(client.fetch)
            self.assertEqual(got, data)
            self.assertIsNone(await self.finish(transfer, done))
            blocks = [b for b, _ in client.data]
            self.assertEqual(len(blocks), 70_001)
            self.assertEqual(blocks[65534:65538], [65535, 0, 1, 2])

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_window_with_lost_block(self) -> None:
        """
        windowsize 4 with a block lost: the client's ACK of the block before the gap
        makes the window start again there; the file is intact.
        """
        data = os.urandom(30 * 512 + 100)
        transfer, sock, done = self.start(self.file(data), Negotiated(windowsize=4, timeout=0.3))
        client = Client(sock, 512, window=4)

        async def go() -> None:
            got = await deferToThread(client.fetch, lose_data=(6, 17))
            self.assertEqual(got, data)
            self.assertIsNone(await self.finish(transfer, done))

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_client_error(self) -> None:
        """
        A client's ERROR ends the transfer at once, without a reply.
        """
        transfer, sock, done = self.start(MemoryReader(os.urandom(9000)), Negotiated())
        client = Client(sock, 512)

        async def go() -> None:
            await deferToThread(client.fetch, error_after=3)
            why = await self.finish(transfer, done)
            self.assertEqual(why, "the client sent error 0 (disk full)")
            self.assertEqual(await deferToThread(client.drain, 0.3), 0)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_file_shrinks(self) -> None:
        """
        A file cut short while it is sent: the client gets an ERROR, the transfer
        fails (no short file passed off as complete).
        """
        data = os.urandom(50_000)
        reader = self.file(data)
        os.truncate(os.path.join(self.dir, "f"), 10_000)
        transfer, sock, done = self.start(reader, Negotiated(blksize=1024))
        client = Client(sock, 1024)

        async def go() -> None:
            await deferToThread(client.fetch)
            why = await self.finish(transfer, done)
            self.assertEqual(why, "the file changed while it was being sent")
            assert client.error is not None
            self.assertIn(b"changed", client.error)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_stop(self) -> None:
        """
        Stopping a transfer whose client is silent (a long timeout) ends it at once:
        the client gets the ERROR, the thread is gone.
        """
        transfer, sock, done = self.start(MemoryReader(os.urandom(9000)), Negotiated(timeout=60))
        client = Client(sock, 512)

        async def go() -> None:
            await deferToThread(client.fetch, stop_after=2)
            started = time.monotonic()
            idle = self.threads.stop("the server is stopping")
            why = await self.finish(transfer, done)
            await idle
            self.assertLess(time.monotonic() - started, 5)
            self.assertEqual(why, "the server is stopping")
            await deferToThread(client.drain, 0.3)
            assert client.error is not None
            self.assertIn(b"the server is stopping", client.error)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]


class PollingTransferThreadTests(TransferThreadTests):
    """
    The same transfers with their thread polling for a moment before it blocks; how
    polling is given up for a slow client, and shared.
    """

    spin = 0.002

    def test_polls_catch(self) -> None:
        """
        A client that answers at once: its ACKs are caught by polling.
        """
        data = os.urandom(300 * 512)
        transfer, sock, done = self.start(MemoryReader(data), Negotiated())
        client = Client(sock, 512)

        async def go() -> None:
            self.assertEqual(await deferToThread(client.fetch), data)
            self.assertIsNone(await self.finish(transfer, done))
            spinner = self.threads.spinner
            self.assertGreater(spinner.caught, 0)
            self.assertLessEqual(spinner.caught + spinner.missed, 302)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_slow_client_waited_for_asleep(self) -> None:
        """
        A client slower than the polling moment (5 ms an ACK): after 8 misses the
        thread blocks for 64 waits, after 8 more for 128: 16 polls of 151 waits.
        """
        data = os.urandom(150 * 512)
        transfer, sock, done = self.start(MemoryReader(data), Negotiated())
        client = Client(sock, 512)

        async def go() -> None:
            self.assertEqual(await deferToThread(client.fetch, delay=0.005), data)
            self.assertIsNone(await self.finish(transfer, done))
            spinner = self.threads.spinner
            # A caught ACK (a wait the client's sleep happened to cover) starts the
            # count again: at most 8 more misses each.
            self.assertGreaterEqual(spinner.missed, 8)
            self.assertLessEqual(spinner.missed, 16 + 8 * spinner.caught)
            self.assertLessEqual(spinner.caught, 2)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def assert_never_polls(self) -> "Deferred[None]":
        """
        A transfer started now blocks at once for every packet, and completes.
        """
        data = os.urandom(50 * 512)
        spinner = self.threads.spinner
        transfer, sock, done = self.start(MemoryReader(data), Negotiated())
        client = Client(sock, 512)

        async def go() -> None:
            self.assertEqual(await deferToThread(client.fetch), data)
            self.assertIsNone(await self.finish(transfer, done))
            self.assertEqual((spinner.caught, spinner.missed), (0, 0))

        return Deferred.fromCoroutine(go())

    def test_one_poller(self) -> None:
        """
        While another thread polls (holds the spinner's lock), a transfer does not.
        """
        self.threads.spinner.lock.acquire()
        self.addCleanup(self.threads.spinner.lock.release)
        return self.assert_never_polls()  # type: ignore[return-value]

    def test_not_alone(self) -> None:
        """
        While other transfers are in progress (on the reactor), the thread does not
        poll.
        """
        self.threads.spinner.alone = False
        return self.assert_never_polls()  # type: ignore[return-value]

    def test_stop_while_polling(self) -> None:
        """
        A stop reaches a thread in the middle of a long poll at once (the socket's
        read side shut down ends the poll as it ends a blocking receive).
        """
        self.threads.spinner.seconds = 30.0
        transfer, sock, done = self.start(MemoryReader(os.urandom(9000)), Negotiated(timeout=60))
        client = Client(sock, 512)

        async def go() -> None:
            await deferToThread(client.fetch, stop_after=2)
            await deferLater(reactor, 0.1, lambda: None)
            started = time.monotonic()
            self.threads.stop("the server is stopping")
            why = await self.finish(transfer, done)
            self.assertLess(time.monotonic() - started, 5)
            self.assertEqual(why, "the server is stopping")
            await deferToThread(client.drain, 0.3)
            assert client.error is not None
            self.assertIn(b"the server is stopping", client.error)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]


def transfer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("tftp 127.0.0.1:")]


class ServiceTests(TestCase):
    """
    The server's thread bound and its stop, through the real service on 127.0.0.1.
    """

    timeout = 60

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="hv-tftp-threaded-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.data = os.urandom(200_000)
        with open(os.path.join(self.root, "f.bin"), "wb") as f:
            f.write(self.data)
        self.service = TftpService(
            reactor, directory=self.root, port=0, interface="127.0.0.1", transfer_threads=1
        )
        self.service.privilegedStartService()
        self.service.startService()
        self.stopped = False

        def stop() -> Any:
            if not self.stopped:
                return self.service.stopService()

        self.addCleanup(stop)
        self.clients: list[socket.socket] = []

    def request(self) -> socket.socket:
        """
        A client that asked for f.bin (blksize 1024, timeout 30) and got the OACK.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.settimeout(5)
        sock.sendto(
            b"\0\1f.bin\0octet\0blksize\x001024\0timeout\x0030\0",
            ("127.0.0.1", self.service.bound_port),
        )
        return sock

    async def wait_for(self, count: int) -> None:
        for _ in range(500):
            if len(self.service.server.transfers) == count and all(
                t.session is not None or t.thread is not None
                for t in self.service.server.transfers.values()
            ):
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"not {count} transfers: {self.service.server.status()}")

    def test_bound_then_reactor(self) -> None:
        """
        The first transfer, alone, has a thread; the second, started while the first
        runs, is on the reactor; both finish intact; the status shows both meanwhile.
        """

        def oack(sock: socket.socket) -> tuple[str, int]:
            packet, peer = sock.recvfrom(2048)
            assert packet[1] == codec.OACK, packet
            return peer

        async def go() -> None:
            a = self.request()
            await self.wait_for(1)
            b = self.request()
            await self.wait_for(2)
            threaded = [t for t in self.service.server.transfers.values() if t.thread]
            self.assertEqual(len(threaded), 1)
            # The thread does not poll while another transfer needs the reactor.
            self.assertFalse(self.service.transfer_threads.spinner.alone)
            self.assertEqual(len(transfer_threads()), 1)
            rows = self.service.status()["transfers"]
            self.assertEqual(sorted(r["blksize"] for r in rows), [1024, 1024])
            for sock in (a, b):
                sock.connect(await deferToThread(oack, sock))
                sock.send(ack(0))
            got = await deferToThread(Client(a, 1024).fetch)
            self.assertEqual(got, self.data)
            got = await deferToThread(Client(b, 1024).fetch)
            self.assertEqual(got, self.data)
            for _ in range(500):
                if not self.service.server.transfers:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(self.service.server.completed, 2)
            self.assertTrue(self.service.transfer_threads.spinner.alone)
            await self.service.transfer_threads.idle()
            self.assertEqual(transfer_threads(), [])

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_not_alone_on_the_reactor(self) -> None:
        """
        Transfers that start together run on the reactor even with threads to spare:
        a transfer has a thread only when no other is in progress.
        """
        self.service.transfer_threads.limit = 4

        async def go() -> None:
            socks = [self.request(), self.request()]
            await self.wait_for(2)
            self.assertEqual(
                [t.thread for t in self.service.server.transfers.values()], [None, None]
            )
            self.assertEqual(transfer_threads(), [])
            for sock in socks:
                packet, peer = await deferToThread(sock.recvfrom, 2048)
                self.assertEqual(packet[1], codec.OACK)
                sock.connect(peer)
                sock.send(ack(0))
            for sock in socks:
                got = await deferToThread(Client(sock, 1024).fetch)
                self.assertEqual(got, self.data)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_stop_mid_transfer(self) -> None:
        """
        Stopping the service in the middle of a threaded and a reactor transfer
        sends both clients an ERROR and leaves no transfer thread.
        """

        async def go() -> None:
            socks = [self.request()]
            await self.wait_for(1)
            socks.append(self.request())
            await self.wait_for(2)
            self.assertEqual(len(transfer_threads()), 1)
            for sock in socks:
                packet, peer = await deferToThread(sock.recvfrom, 2048)
                sock.connect(peer)
                sock.send(ack(0))
                packet = await deferToThread(sock.recv, 2048)
                self.assertEqual(packet[:4], b"\0\3\0\1")
            self.stopped = True
            await self.service.stopService()
            self.assertEqual(transfer_threads(), [])
            for sock in socks:
                packet = await deferToThread(sock.recv, 2048)
                self.assertEqual(packet[:2], b"\0\5")
                self.assertIn(b"the server is stopping", packet)
            self.assertEqual(self.service.server.transfers, {})
            self.assertEqual(self.service.server.failed, 2)

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]

    def test_no_thread_to_give(self) -> None:
        """
        When the system gives no thread, the client gets ERROR 0 at once and the
        server holds nothing of the transfer (its file is closed).
        """

        def refuse(self: TransferThread) -> None:
            raise RuntimeError("can't start new thread")

        self.patch(TransferThread, "start", refuse)
        opened: list[int] = []
        real_close = BlockingFileReader.close

        def close(reader: BlockingFileReader) -> None:
            opened.append(reader.fd)
            real_close(reader)

        self.patch(BlockingFileReader, "close", close)

        async def go() -> None:
            sock = self.request()
            packet = await deferToThread(sock.recv, 2048)
            self.assertEqual(packet[:4], b"\0\5\0\0")
            self.assertIn(b"server busy", packet)
            for _ in range(500):
                if opened:
                    break
                await deferLater(reactor, 0.01, lambda: None)
            self.assertEqual(len(opened), 1)
            self.assertGreaterEqual(opened[0], 0)
            self.assertEqual(self.service.server.transfers, {})
            self.assertEqual(self.service.transfer_threads.running, set())

        return Deferred.fromCoroutine(go())  # type: ignore[return-value]
