"""
Tests for L{hypervisor.gctune}.
"""

from __future__ import annotations

import gc

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import gctune


class _Running(Clock):
    """
    A clock that runs callWhenRunning functions when told to.
    """

    def __init__(self) -> None:
        super().__init__()
        self.when_running: list = []

    def callWhenRunning(self, f, *a, **kw):  # type: ignore[no-untyped-def]
        self.when_running.append((f, a, kw))


class SettleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)

    def test_settle_freezes_what_exists(self) -> None:
        """
        Objects that exist when the daemon settles are frozen: a full collection no
        longer walks them; objects made later are collected as usual.
        """
        kept = [object() for _ in range(10)]
        frozen = gctune.settle()
        self.assertGreater(frozen, 10)
        self.assertEqual(gc.get_freeze_count(), frozen)

        class Cycle:
            pass

        later = Cycle()
        later.me = later  # type: ignore[attr-defined]
        self.assertIn(later, gc.get_objects())
        del later
        self.assertGreaterEqual(gc.collect(), 1)
        self.assertTrue(kept)

    def test_settles_once_the_reactor_runs(self) -> None:
        """
        Nothing is frozen when the service tree is built, only when the reactor runs.
        """
        reactor = _Running()
        gc.unfreeze()
        gctune.settle_when_running(reactor)
        self.assertEqual(gc.get_freeze_count(), 0)
        self.assertEqual(len(reactor.when_running), 1)
        f, a, kw = reactor.when_running[0]
        f(*a, **kw)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_running_reactor_left_alone(self) -> None:
        """
        A service tree built under a running reactor (in a test) freezes nothing.
        """
        reactor = _Running()
        reactor.running = True  # type: ignore[attr-defined]
        gctune.settle_when_running(reactor)
        self.assertEqual(reactor.when_running, [])
