# -*- test-case-name: tests.test_tftp_session -*-
"""
One read transfer, independent of sockets: option negotiation (L{negotiate}) and the
sender's state machine (L{ReadSession}), driven by received packets and an injected
clock.

- Blocks are counted from 1 without limit; on the wire a block number is that count
  modulo 65536 (after 65535 comes 0, as tftp-hpa, curl, atftp and busybox expect).
- A window (RFC 7440 C{windowsize}, 1 = RFC 1350 lock-step) of blocks is sent, then
  the session waits for an ACK. An ACK of block I{n} within the window moves the
  window to start after I{n} (the rest is sent again); an ACK of the block before the
  window is a duplicate: in lock-step it is ignored (no sorcerer's apprentice: only a
  timeout sends a block again), with a larger window it sends the window again once
  (the receiver saw a gap at its start).
- Without an ACK within the timeout the window (or the OACK) is sent again, at most
  C{retries} times; then the session gives up with an ERROR.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from hypervisor.tftp import codec
from hypervisor.tftp.backend import IReader

DEFAULT_BLKSIZE = 512
DEFAULT_TIMEOUT = 1.0
DEFAULT_RETRIES = 5
MAX_WINDOW_BYTES = 1 << 20
IP_UDP_TFTP_HEADERS = 20 + 8 + 4

_DATA = struct.Struct("!HH")
_DATA_OPCODE = codec.DATA
_ACK = codec.ACK


@dataclass
class Negotiated:
    """
    What a request's options came to: the transfer's parameters and the OACK (empty:
    send no OACK, start with block 1).
    """

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = DEFAULT_TIMEOUT
    oack: dict[str, str] = field(default_factory=dict)


def _int(text: str) -> Optional[int]:
    if not text.isdigit() or len(text) > 10:
        return None
    return int(text)


def negotiate(
    options: dict[str, str],
    size: int,
    *,
    max_blksize: int = codec.MAX_DATA,
    mtu: int = 0,
    max_windowsize: int = 64,
    default_timeout: float = DEFAULT_TIMEOUT,
) -> Negotiated:
    """
    The answer to a read request's C{options} for a file of C{size} bytes: C{blksize}
    (RFC 2348) clamped to C{max_blksize} and to what fits the path C{mtu} (if known),
    C{tsize} and C{timeout} (RFC 2349), C{windowsize} (RFC 7440) clamped to
    C{max_windowsize} and to L{MAX_WINDOW_BYTES} per window. Options with values out
    of range and unknown options are left out of the OACK (the client then uses the
    defaults), as the RFCs allow.
    """
    result = Negotiated(timeout=default_timeout)
    limit = max(8, min(max_blksize, codec.MAX_DATA))
    if mtu > IP_UDP_TFTP_HEADERS + 8:
        limit = min(limit, mtu - IP_UDP_TFTP_HEADERS)
    for name, value in options.items():
        number = _int(value)
        if name == "blksize" and number is not None and number >= 8:
            result.blksize = min(number, limit)
            result.oack[name] = str(result.blksize)
        elif name == "tsize" and number is not None:
            result.oack[name] = str(size)
        elif name == "timeout" and number is not None and 1 <= number <= 255:
            result.timeout = float(number)
            result.oack[name] = str(number)
        elif name == "windowsize" and number is not None and 1 <= number <= 65535:
            result.windowsize = number
            result.oack[name] = ""  # set below, once blksize is known
    if "windowsize" in result.oack:
        fits = max(1, MAX_WINDOW_BYTES // result.blksize)
        result.windowsize = max(1, min(result.windowsize, max_windowsize, fits))
        result.oack["windowsize"] = str(result.windowsize)
    return result


class ReadSession:
    """
    Sending one file to one client.

    @ivar send: writes one packet to the client.
    @ivar on_done: called once with the session and C{None} (the client has every
        block) or the reason it ended otherwise.
    @ivar acked: blocks the client acknowledged; C{sent_upto}: highest block sent.
    @ivar retransmissions: windows (or OACKs) sent again after a timeout or gap.
    """

    def __init__(
        self,
        reader: IReader,
        send: Callable[[bytes], object],
        clock: IReactorTime,
        negotiated: Optional[Negotiated] = None,
        *,
        retries: int = DEFAULT_RETRIES,
        on_done: Callable[["ReadSession", Optional[str]], None] = lambda s, why: None,
    ) -> None:
        self.reader = reader
        self.send = send
        self.clock = clock
        n = negotiated or Negotiated()
        self.blksize = n.blksize
        self.windowsize = n.windowsize
        self.timeout = n.timeout
        self.oack = n.oack
        self.retries = retries
        self.on_done = on_done
        self.size = reader.size
        self.last_block = self.size // self.blksize + 1
        self.base = 1  # first block not acknowledged
        self.sent_upto = 0
        self.acked = 0
        self.tries_left = retries
        self.retransmissions = 0
        self.duplicates = 0
        self.waiting_oack = bool(self.oack)
        self.finished = False
        self.reason: Optional[str] = None
        self.started = clock.seconds()
        self._timer: Optional[IDelayedCall] = None
        self._generation = 0
        self._gap_resent = False
        # Lock-step: the DATA packet of the block after the one in flight, made
        # ready while the client works, and the ACK (of the block in flight) that
        # lets it go; cleared whenever the window moves otherwise or the session ends.
        self._ready_ack: Optional[bytes] = None  # the ACK that lets it go
        self._ready_packet = b""

    # Progress ----------------------------------------------------------------------------

    @property
    def bytes_acked(self) -> int:
        """
        Bytes the client acknowledged.
        """
        return min(self.size, self.acked * self.blksize)

    def start(self) -> None:
        """
        Send the OACK (if options were accepted) or the first window.
        """
        if self.waiting_oack:
            self._send_oack()
        else:
            self._send_window()

    def datagram(self, data: bytes) -> None:
        """
        A packet from the client.
        """
        if data == self._ready_ack:
            # Lock-step, in order, the next block made ready: the common case. The
            # client waits for that block: it goes first, then the bookkeeping,
            # then the block after it is made ready (while the client works).
            self.send(self._ready_packet)
            self._advance(self.base)
            return
        if self.finished:
            return
        if len(data) == 4 and data[1] == _ACK and data[0] == 0:
            block = (data[2] << 8) | data[3]
            base = self.base
            if (
                block == base & 0xFFFF
                and self.windowsize == 1
                and base == self.sent_upto
                and base < self.last_block
                and not self.waiting_oack
            ):
                # Lock-step, in order, the next block not made ready yet.
                size = self.blksize
                payload = self.reader.read(base * size, size)
                if type(payload) is bytes:
                    self.send(_DATA.pack(_DATA_OPCODE, (base + 1) & 0xFFFF) + payload)
                    self._advance(base)
                    return
                # Not buffered: ack() below reads it again and waits (or fails).
                if isinstance(payload, Deferred):
                    payload.addErrback(lambda _: None)
            self.ack(block)
            return
        try:
            packet = codec.decode(data)
        except codec.MalformedPacket:
            return  # garbage from the client's port: the timeout covers a lost ACK
        if isinstance(packet, codec.Error):
            why = f"the client sent error {packet.code}"
            if packet.message:
                why += f" ({packet.message[:100]})"
            self._finish(why)
        elif not isinstance(packet, codec.Ack):
            self.send(codec.error_packet(codec.ERR_ILLEGAL_OPERATION, "only ACKs are expected"))
            self._finish("the client sent a packet other than an ACK")

    def _advance(self, base: int) -> None:
        """
        Lock-step: block C{base} was acknowledged and the next one just sent.
        """
        following = base + 1
        self.acked = base
        self.base = self.sent_upto = following
        self.tries_left = self.retries
        self._generation += 1
        timer = self._timer
        if timer is not None:
            timer.reset(self.timeout)
        else:
            self._arm()
        self._ready_ack = None
        if following < self.last_block:
            size = self.blksize
            after = self.reader.read(following * size, size)
            if type(after) is bytes:
                self._ready_packet = _DATA.pack(_DATA_OPCODE, (following + 1) & 0xFFFF) + after
                self._ready_ack = _DATA.pack(_ACK, following & 0xFFFF)
            elif isinstance(after, Deferred):
                after.addErrback(lambda _: None)  # asked for again when due

    def ack(self, block: int) -> None:
        """
        The client acknowledged wire block number C{block}.
        """
        if self.finished:
            return
        if self.waiting_oack:
            if block == 0:
                self.waiting_oack = False
                self.tries_left = self.retries
                self._send_window()
            return
        # The absolute block this ACK names: the one in [base - 1, sent_upto] with
        # that number modulo 65536.
        previous = self.base - 1
        acked = previous + ((block - previous) & 0xFFFF)
        if acked > self.sent_upto:
            return  # not sent yet: a stray or very old ACK
        if acked == previous:
            self.duplicates += 1
            if (
                self.windowsize > 1
                and not self._gap_resent
                and self.sent_upto == min(self.last_block, self.base + self.windowsize - 1)
            ):
                self._gap_resent = True
                self.retransmissions += 1
                self._send_window()
            return
        self.acked = acked
        self.base = acked + 1
        self._ready_ack = None
        self.tries_left = self.retries
        self._gap_resent = False
        if acked >= self.last_block:
            self._finish(None)
        else:
            self._send_window()

    def stop(self, reason: str, notify: bool = True) -> None:
        """
        End the transfer now (the server stops): the client gets an ERROR.
        """
        if self.finished:
            return
        if notify:
            self.send(codec.error_packet(codec.ERR_NOT_DEFINED, reason))
        self._finish(reason)

    # Sending -------------------------------------------------------------------------------

    def _arm(self) -> None:
        timer = self._timer
        if timer is not None:  # pending: it is set to None when it fires or is cancelled
            timer.reset(self.timeout)
        else:
            self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def _send_oack(self) -> None:
        self.send(codec.encode(codec.OptionAck(self.oack)))
        self._arm()

    def _send_window(self) -> None:
        first = self.base
        last = first + self.windowsize - 1
        if last > self.last_block:
            last = self.last_block
        self._generation += 1
        self._arm()
        data = self.reader.read((first - 1) * self.blksize, (last - first + 1) * self.blksize)
        if type(data) is bytes:
            self._send_now(first, last, data)
            return
        assert isinstance(data, Deferred)
        generation = self._generation
        data.addCallbacks(
            lambda d: self._send_blocks(generation, first, last, d),
            lambda f: self._read_failed(generation, f),
        )

    def _send_blocks(self, generation: int, first: int, last: int, data: bytes) -> None:
        if self.finished or generation != self._generation:
            return
        self._send_now(first, last, data)

    def _send_now(self, first: int, last: int, data: bytes) -> None:
        send = self.send
        if first == last:
            send(_DATA.pack(codec.DATA, first & 0xFFFF) + data)
        else:
            size = self.blksize
            pack = _DATA.pack
            at = 0
            for block in range(first, last + 1):
                send(pack(codec.DATA, block & 0xFFFF) + data[at : at + size])
                at += size
        if last > self.sent_upto:
            self.sent_upto = last

    def _read_failed(self, generation: int, reason: Failure) -> None:
        if self.finished or generation != self._generation:
            return
        message = str(reason.value) or "the file cannot be read"
        self.send(codec.error_packet(codec.ERR_NOT_DEFINED, message))
        self._finish(message)

    def _timed_out(self) -> None:
        self._timer = None
        if self.finished:
            return
        if self.tries_left <= 0:
            why = f"no ACK after {self.retries + 1} tries of {self.timeout:g}s"
            self.send(codec.error_packet(codec.ERR_NOT_DEFINED, f"timed out: {why}"))
            self._finish(f"timed out ({why})")
            return
        self.tries_left -= 1
        self.retransmissions += 1
        self._gap_resent = False
        if self.waiting_oack:
            self._send_oack()
        else:
            self._send_window()

    def _finish(self, reason: Optional[str]) -> None:
        if self.finished:
            return
        self.finished = True
        self._ready_ack = None
        self.reason = reason
        self._generation += 1
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self.reader.close()
        self.on_done(self, reason)


def describe(session: ReadSession) -> dict[str, Any]:
    """
    A session's progress for the status page.
    """
    return {
        "bytes": session.bytes_acked,
        "size": session.size,
        "blksize": session.blksize,
        "windowsize": session.windowsize,
        "retransmissions": session.retransmissions,
    }
