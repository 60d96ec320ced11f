"""
Garbage collection for a long-running daemon.

Python's cyclic collector walks every tracked object on each full (oldest
generation) collection: after start-up that is every module, class and function the
daemon imported plus its state (hundreds of thousands of objects), so a full
collection stalls the reactor for tens of milliseconds in the middle of whatever
request triggered it, which shows as latency spikes (p99). What exists once the
daemon is up lives as long as the process; L{settle} moves it out of the collector's
reach (C{gc.freeze}), so later collections walk only what requests and changes
create.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.logger import Logger

log = Logger()


def settle() -> int:
    """
    Collect what start-up left behind, then freeze the survivors (they are never
    collected or walked again). Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def settle_when_running(reactor: Any) -> None:
    """
    L{settle} once the reactor runs (every service started, the state loaded). A
    reactor already running (a service tree built inside a test) is left alone.
    """
    if getattr(reactor, "running", False):
        return

    def run() -> None:
        frozen = settle()
        log.debug("garbage collector: {n} start-up objects frozen", n=frozen)

    reactor.callWhenRunning(run)
