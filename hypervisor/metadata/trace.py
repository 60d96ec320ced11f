# -*- test-case-name: tests.test_metadata_paths -*-
"""
C{TraceVmMetadata} (reference §1.4): a stream of the metadata paths a VM requests, for
its owners. The first message is an empty response (the call was accepted, as the Go
daemon answers before it streams); then one message per request with its C{Path}; when
the VM is destroyed a last message says C{VM destroyed} and the stream ends.

The queue is bounded: a subscriber that falls L{MAX_QUEUED} paths behind gets a last
message saying so and its stream ends (memory never grows with a slow reader).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet.defer import Deferred

from hypervisor.metadata.backend import MetadataBackend, Trace
from hypervisor.model import MessageText

MAX_QUEUED = 256
VM_DESTROYED = "VM destroyed"
NOT_KEEPING_UP = "receiver not keeping up with the VM's metadata requests"


@dataclass
class TraceVmMetadataResponse:
    """
    One message of TraceVmMetadata: a requested path, or the stream's end (C{Error}).
    """

    Error: MessageText = ""
    Path: str = ""


class TraceStream:
    """
    One TraceVmMetadata subscriber (the transport drains it with L{get}).
    """

    def __init__(self, max_queued: int = MAX_QUEUED) -> None:
        self.max_queued = max_queued
        self.closed = False
        self._queue: deque[TraceVmMetadataResponse] = deque([TraceVmMetadataResponse()])
        self._waiting: Optional[Deferred[Optional[TraceVmMetadataResponse]]] = None
        self._cancel: Callable[[], None] = lambda: None

    def __len__(self) -> int:
        return len(self._queue)

    def get(self) -> "Deferred[Optional[TraceVmMetadataResponse]]":
        """
        The next message (waits for one); None once the stream ended.
        """
        d: Deferred[Optional[TraceVmMetadataResponse]] = Deferred()
        if self._queue:
            d.callback(self._queue.popleft())
        elif self.closed:
            d.callback(None)
        else:
            self._waiting = d
        return d

    def _put(self, message: TraceVmMetadataResponse) -> None:
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(message)
        else:
            self._queue.append(message)

    def path(self, path: str) -> None:
        """
        The VM requested C{path}.
        """
        if self.closed:
            return
        if len(self._queue) >= self.max_queued:
            self._queue.clear()
            self._put(TraceVmMetadataResponse(Error=NOT_KEEPING_UP))
            self.close()
            return
        self._put(TraceVmMetadataResponse(Path=path))

    def destroyed(self) -> None:
        """
        The VM is gone: a last message, then the end.
        """
        if not self.closed:
            self._put(TraceVmMetadataResponse(Error=VM_DESTROYED))
            self.close()

    def close(self) -> None:
        """
        End the stream (the subscriber left, or the VM is gone); a reader waiting in
        L{get} gets None.
        """
        if self.closed:
            return
        self.closed = True
        self._cancel()
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(None)


def subscribe(backend: MetadataBackend, vm_ip: str, max_queued: int = MAX_QUEUED) -> TraceStream:
    """
    A stream of the paths the VM with primary IP C{vm_ip} requests.
    """
    stream = TraceStream(max_queued)
    stream._cancel = backend.trace(vm_ip, Trace(stream.path, stream.destroyed, stream.close))
    return stream
