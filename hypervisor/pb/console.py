# -*- test-case-name: tests.test_console_pb -*-
"""
Consoles over Perspective Broker: C{root.callRemote("console", method,
request_chunks, observer)} (L{hypervisor.pb.server.SessionRoot.remote_console}) for
C{ConnectToVmSerialPort} and C{ConnectToVmConsole}, admitted by the dispatcher as on
every transport (the same one-connection-per-VM lock, the same refusals).

The answer is C{{"json": <ConsoleResponse chunks>, "console": <ConsoleChannel>}}:

- VM -> client: C{observer.data(bytes)} for each piece (at most L{PIECE} bytes), in
  order; at most L{WINDOW} unanswered at a time, beyond which the VM socket is no
  longer read (QEMU's chardev then waits: the same flow control as the other
  transports). When the VM side ends: the farewell (C{"VM serial port closed\\n"})
  as a last C{data}, then C{observer.closed()}.
- client -> VM: C{channel.write(bytes)}, answered once the VM socket's send buffer
  has room (the channel is that socket's producer: a guest that does not read holds
  the client's writes back instead of filling the daemon's memory);
  C{channel.close()} ends the console.

The console counts as one of the session's streams; the connection's loss closes
the VM socket (and releases the VM's console lock).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from hypervisor.pb.wire import CallError

WINDOW = 8
"""Data messages sent to the client and not yet answered, before the VM side pauses."""
PIECE = 64 * 1024
"""Bytes of one data message at most."""


@implementer(IPushProducer)
class ConsoleChannel(pb.Referenceable):
    """
    The client's handle on one console; relays a L{hypervisor.console.pipe.VmPipe}.
    """

    log = Logger()

    def __init__(
        self, pipe: Any, observer: pb.RemoteReference, activity: Callable[[], None]
    ) -> None:
        self.pipe = pipe
        self.observer = observer
        self.activity = activity
        self.in_flight = 0
        self.paused = False
        self.ended = False
        self.writes_paused = False
        self._room: list[Deferred[None]] = []

    def start(self) -> None:
        """
        Begin relaying (the VM bytes kept since the connection come first).
        """
        self.pipe.attach(self._output, self._ended)
        side = self._vm_side()
        if side is not None and not self.ended:
            side.registerProducer(self, True)

    # The VM socket's producer (its send buffer full: the client's writes wait) --------

    def pauseProducing(self) -> None:
        """
        The VM socket's send buffer is full.
        """
        self.writes_paused = True

    def resumeProducing(self) -> None:
        """
        There is room again: answer the waiting writes.
        """
        self.writes_paused = False
        room, self._room = self._room, []
        for d in room:
            d.callback(None)

    def stopProducing(self) -> None:
        """
        The VM socket closed: waiting writes are answered (the end follows).
        """
        self.resumeProducing()

    # VM -> client ---------------------------------------------------------------------

    def _vm_side(self) -> Optional[Any]:
        return getattr(self.pipe, "transport", None)

    def _send(self, method: str, *args: Any) -> None:
        try:
            d = self.observer.callRemote(method, *args)
        except pb.DeadReferenceError:
            self.pipe.close()
            return
        self.in_flight += 1
        d.addBoth(self._answered)

    def _output(self, data: bytes) -> None:
        for start in range(0, len(data), PIECE):
            self._send("data", data[start : start + PIECE])
        if self.in_flight >= WINDOW and not self.paused:
            side = self._vm_side()
            if side is not None:
                self.paused = True
                side.pauseProducing()

    def _answered(self, result: Any) -> None:
        self.in_flight -= 1
        if isinstance(result, Failure):
            # The observer failed or the connection went: nobody reads this console.
            if not self.ended:
                self.pipe.close()
            return None
        if self.paused and self.in_flight <= WINDOW // 2:
            self.paused = False
            side = self._vm_side()
            if side is not None:
                side.resumeProducing()
        self.activity()
        return None

    def _ended(self, farewell: bytes) -> None:
        self.ended = True
        self.resumeProducing()
        if farewell:
            self._send("data", farewell)
        self._send("closed")

    # client -> VM ---------------------------------------------------------------------

    def remote_write(self, data: bytes) -> "Deferred[None]":
        """
        Bytes typed by the client, to the VM; answered when the VM socket can take
        more.
        """
        if not isinstance(data, bytes):
            raise CallError("400 console data must be bytes")
        if self.ended:
            raise CallError("409 the console is closed")
        self.pipe.write(data)
        self.activity()
        if self.writes_paused and not self.ended:
            d: Deferred[None] = Deferred()
            self._room.append(d)
            return d
        return succeed(None)

    def remote_close(self) -> None:
        """
        The client is done: close the VM socket (the VM's console is free again).
        """
        self.pipe.close()
