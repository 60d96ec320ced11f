# -*- test-case-name: tests.test_dhcp_policy -*-
"""
WatchDhcp: every datagram the DHCP server receives, with the interface it came on,
streamed to subscribers (admin only).

Each subscriber has a bounded queue (L{MAX_QUEUED}); one that does not keep up gets a
last message C{{"Error": "receiver not keeping up with DHCP packets"}} and its stream
ends, as in the reference, so memory never grows without bound. A stream has the
interface of L{hypervisor.manager.updates.UpdateStream} (C{get}, C{close},
C{closed}), so the transports drain it as they drain GetUpdates.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hypervisor.model import WatchDhcpResponse

MAX_QUEUED = 64
NOT_KEEPING_UP = "receiver not keeping up with DHCP packets"


class WatchStream:
    """
    One WatchDhcp subscriber.

    @ivar interface: only packets from this interface ("" = all).
    @ivar remaining: packets still to send (None = no limit).
    """

    def __init__(
        self,
        watchers: "PacketWatchers",
        interface: str = "",
        max_packets: int = 0,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.watchers = watchers
        self.interface = interface
        self.remaining: Optional[int] = max_packets or None
        self.max_queued = max_queued
        self.closed = False
        self.dropped = False
        self._queue: deque[WatchDhcpResponse] = deque()
        self._waiting: Optional[Deferred[Optional[WatchDhcpResponse]]] = None

    def __len__(self) -> int:
        return len(self._queue)

    def get(self) -> "Deferred[Optional[WatchDhcpResponse]]":
        """
        The next message (waits for one); None once the stream ended.
        """
        d: Deferred[Optional[WatchDhcpResponse]] = Deferred()
        if self._queue:
            d.callback(self._queue.popleft())
        elif self.closed:
            d.callback(None)
        else:
            self._waiting = d
        return d

    def put(self, interface: str, data: bytes) -> None:
        """
        A datagram arrived.
        """
        if self.closed or (self.interface and interface != self.interface):
            return
        message = WatchDhcpResponse(Interface=interface, Packet=data)
        if self.remaining is not None:
            self.remaining -= 1
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(message)
        elif len(self._queue) >= self.max_queued:
            self.dropped = True
            PacketWatchers.log.warn(
                "WatchDhcp subscriber fell {n} packets behind: its stream ends", n=len(self._queue)
            )
            self._queue.clear()
            self._queue.append(WatchDhcpResponse(Error=NOT_KEEPING_UP))
            self.close()
            return
        else:
            self._queue.append(message)
        if self.remaining == 0:
            self.close()

    def close(self) -> None:
        """
        End the stream (MaxPackets reached, the subscriber left, or the server
        stopped); a reader waiting in L{get} gets None.
        """
        if self.closed:
            return
        self.closed = True
        self.watchers.remove(self)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(None)


class PacketWatchers:
    """
    The WatchDhcp subscribers.
    """

    log = Logger()

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self.max_queued = max_queued
        self.streams: list[WatchStream] = []

    def subscribe(self, interface: str = "", max_packets: int = 0) -> WatchStream:
        """
        A new stream of the datagrams received on C{interface} (all if ""), ending
        after C{max_packets} (0 = never).
        """
        stream = WatchStream(self, interface, max_packets, self.max_queued)
        self.streams.append(stream)
        return stream

    def remove(self, stream: WatchStream) -> None:
        """
        Forget a stream.
        """
        if stream in self.streams:
            self.streams.remove(stream)

    def publish(self, interface: str, data: bytes) -> None:
        """
        Give a datagram to every subscriber.
        """
        if not self.streams:
            return
        for stream in list(self.streams):
            stream.put(interface, data)

    def close_all(self) -> None:
        """
        End every stream (the server stops).
        """
        for stream in list(self.streams):
            stream.close()
