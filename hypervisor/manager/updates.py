# -*- test-case-name: tests.test_manager_state -*-
"""
GetUpdates: one L{UpdateStream} per subscriber, fed by an L{UpdateHub}.

A stream's queue is bounded: a subscriber that does not keep up (its transport is
stuck, or it stopped reading) is dropped with a log line once its queue holds
L{MAX_QUEUED} updates, and its stream ends; memory never grows without bound.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hypervisor.model import Update

MAX_QUEUED = 1000


class UpdateStream:
    """
    One GetUpdates subscriber: a bounded queue of L{Update}s, the first one full.

    @ivar closed: the stream ended (closed by the subscriber, or dropped).
    @ivar dropped: the stream was dropped because it fell behind.
    """

    def __init__(
        self, close: Callable[["UpdateStream"], None], max_queued: int = MAX_QUEUED, name: str = ""
    ) -> None:
        self._queue: deque[Update] = deque()
        self._waiting: Optional[Deferred[Optional[Update]]] = None
        self._close = close
        self.max_queued = max_queued
        self.name = name
        self.closed = False
        self.dropped = False

    def __len__(self) -> int:
        return len(self._queue)

    def get(self) -> "Deferred[Optional[Update]]":
        """
        The next update (waits until there is one); None once the stream is closed.
        """
        d: Deferred[Optional[Update]] = Deferred()
        if self._queue:
            d.callback(self._queue.popleft())
        elif self.closed:
            d.callback(None)
        else:
            self._waiting = d
        return d

    def put(self, update: Update) -> None:
        """
        Queue an update; drop the subscriber if its queue is full.
        """
        if self.closed:
            return
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(update)
            return
        if len(self._queue) >= self.max_queued:
            self.dropped = True
            UpdateHub.log.warn(
                "GetUpdates subscriber {name} fell {n} updates behind: dropped (it "
                "can subscribe again and get a full update)",
                name=self.name or "?",
                n=len(self._queue),
            )
            self._queue.clear()
            self.close()
            return
        self._queue.append(update)

    def close(self) -> None:
        """
        Stop receiving updates; a reader waiting in L{get} gets None.
        """
        if self.closed:
            return
        self.closed = True
        self._close(self)
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(None)


class UpdateHub:
    """
    The subscribers of GetUpdates.
    """

    log = Logger()

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self.max_queued = max_queued
        self.streams: list[UpdateStream] = []

    def subscribe(self, first: Update, name: str = "") -> UpdateStream:
        """
        A new stream whose first update is C{first}.
        """
        stream = UpdateStream(self.streams.remove, self.max_queued, name)
        self.streams.append(stream)
        stream.put(first)
        return stream

    def publish(self, update: Update) -> None:
        """
        Send C{update} to every subscriber.
        """
        for stream in list(self.streams):
            stream.put(update)

    def close_all(self) -> None:
        """
        End every stream (the daemon stops).
        """
        for stream in list(self.streams):
            stream.close()
