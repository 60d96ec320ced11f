# -*- test-case-name: tests.test_console -*-
"""
The daemon's end of a VM console socket (serial port, VNC), joined to one client
connection of any transport (SRPC, a WebSocket).

L{open_pipe} connects to the unix socket with Twisted (non-blocking); the returned
L{VmPipe} holds what the VM sends until the transport attaches (at most
L{MAX_EARLY} bytes, older bytes dropped: a console shows what comes next), then
relays both ways with flow control, bounding every buffer:

- VM -> client: the VM side's transport is the client transport's streaming
  producer: when the client does not read, its send buffer fills, the VM socket is
  no longer read, and QEMU's chardev (or VNC server) waits.
- client -> VM: the client's network connection is the VM side's producer: when the
  guest does not read (QEMU stops reading a full serial port), the client
  connection is no longer read.

When the VM side closes (the VM stopped), the transport is told with the
pipe's C{farewell} (the serial port's C{"VM serial port closed\\n"}, as the Go
hypervisor sends); when the client goes away the VM socket is closed. Either way
L{VmPipe.closed} fires once and the pipe's C{release} runs (the one-connection lock).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from hypervisor.srpc.protocol import network_producer

MAX_EARLY = 64 * 1024
CONNECT_TIMEOUT = 5


@implementer(IPushProducer)
class PauseOnly:
    """
    A producer's pause and resume only: a consumer that goes away calls
    C{stopProducing} on its producer, which for a connection closes it; closing is
    decided by the pipe instead (the farewell must go out first).
    """

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def pauseProducing(self) -> None:
        """
        Pause the wrapped producer.
        """
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        """
        Resume the wrapped producer.
        """
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        """
        Nothing: the pipe closes its sides itself.
        """


def take_producer_slot(consumer: Any, producer: Any) -> None:
    """
    Make C{producer} the streaming producer of C{consumer}, replacing any (the HTTP
    channel registers itself on its transport; the SRPC session too).
    """
    if (
        getattr(consumer, "producer", None) is not None
        or getattr(consumer, "_producer", None) is not None
    ):
        try:
            consumer.unregisterProducer()
        except (AttributeError, RuntimeError):
            pass
    consumer.registerProducer(producer, True)


class VmPipe(protocol.Protocol):
    """
    One connection to a VM's console socket (module docstring).

    @ivar farewell: what the client gets when the VM side closes (may be empty).
    @ivar closed: fires (with None) once both sides are done.
    """

    def __init__(self, farewell: bytes = b"", release: Callable[[], None] = lambda: None) -> None:
        self.farewell = farewell
        self.release: Optional[Callable[[], None]] = release
        self.closed: Deferred[None] = Deferred()
        self.early = bytearray()
        self.sink: Optional[Callable[[bytes], None]] = None
        self.on_end: Optional[Callable[[bytes], None]] = None
        self.ended = False
        self.vm_gone = False

    # The VM side ------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """
        Bytes from the VM: to the client, or kept (bounded) until it attaches.
        """
        if self.sink is not None:
            self.sink(data)
            return
        self.early += data
        if len(self.early) > MAX_EARLY:
            del self.early[: len(self.early) - MAX_EARLY]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        """
        The VM side closed (the VM stopped) or we closed it: tell the client once.
        """
        self.vm_gone = True
        self._end(self.farewell)

    def _end(self, farewell: bytes) -> None:
        if self.ended:
            return
        self.ended = True
        release, self.release = self.release, None
        if release is not None:
            release()
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end(farewell)
        self.closed.callback(None)

    # The client side ---------------------------------------------------------------

    def attach(
        self,
        sink: Callable[[bytes], None],
        on_end: Callable[[bytes], None],
        client_transport: Any = None,
    ) -> None:
        """
        Start relaying: VM bytes go to C{sink}; when the VM side closes,
        C{on_end(farewell)} is called (once). With C{client_transport}, flow control
        both ways (module docstring).
        """
        self.sink = sink
        self.on_end = on_end
        early, self.early = bytes(self.early), bytearray()
        if early:
            sink(early)
        if self.ended:
            on_end(self.farewell)
            self.on_end = None
            return
        vm_side: Any = self.transport
        if client_transport is not None and vm_side is not None:
            take_producer_slot(client_transport, PauseOnly(vm_side))
            producer = network_producer(client_transport)
            if producer is not None:
                vm_side.registerProducer(PauseOnly(producer), True)

    def write(self, data: bytes) -> None:
        """
        Bytes from the client to the VM.
        """
        if not self.ended and self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        """
        The client went away: close the VM socket (no farewell to send).
        """
        self.on_end = None
        self.sink = None
        if self.transport is not None and not self.vm_gone:
            self.transport.loseConnection()
        else:
            self._end(b"")


def open_pipe(reactor: Any, path: str, pipe: VmPipe) -> "Deferred[VmPipe]":
    """
    Connect C{pipe} to the unix socket at C{path} (non-blocking).
    """
    endpoint = UNIXClientEndpoint(reactor, path, timeout=CONNECT_TIMEOUT)
    return connectProtocol(endpoint, pipe)
