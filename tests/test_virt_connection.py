"""
Tests for L{hypervisor.virt.connection.LibvirtService}.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

import libvirt
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from hypervisor.testing import FakeOpener
from hypervisor.virt.connection import LibvirtService, NotConnected, start_event_loop


class RecordingListener:
    """
    Records what the service tells its listeners; fires Deferreds on demand.
    """

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.waiters: list[tuple[str, Deferred[None]]] = []

    def _record(self, *event: Any) -> None:
        self.events.append(event)
        for kind, d in list(self.waiters):
            if event[0] == kind:
                self.waiters.remove((kind, d))
                d.callback(None)

    def wait(self, kind: str) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiters.append((kind, d))
        return d

    def libvirt_connected(self) -> None:
        self._record("connected")

    def libvirt_disconnected(self, reason: str) -> None:
        self._record("disconnected", reason)

    def domain_lifecycle(self, name: str, uuid: str, event: int, detail: int) -> None:
        self._record("lifecycle", name, event)


def with_timeout(d: Deferred[Any], seconds: float = 10) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


class ReconnectTests(TestCase):
    """
    Connection loss and reconnection, with a fake C{libvirt.open}.
    """

    def make(self, opener: FakeOpener) -> tuple[LibvirtService, RecordingListener]:
        service = LibvirtService(
            "qemu:///fake",
            reactor,
            open_connection=opener,
            min_backoff=0.01,
            max_backoff=0.05,
            use_event_loop=False,
        )
        listener = RecordingListener()
        service.add_listener(listener)
        self.addCleanup(lambda: service.running and service.stopService())
        return service, listener

    async def test_retries_until_libvirtd_answers(self) -> None:
        """
        While libvirtd refuses, the service retries with back-off and explains the
        state; once it answers the service is connected.
        """
        opener = FakeOpener(failures=3)
        service, listener = self.make(opener)
        service.startService()
        await deferLater(reactor, 0, lambda: None)
        self.assertFalse(service.connected)
        await with_timeout(listener.wait("connected"))
        self.assertEqual(opener.attempts, 4)
        self.assertTrue(service.connected)
        self.assertEqual(service.describe(), "connected to libvirt at qemu:///fake")
        self.assertEqual(opener.connections[0].keepalive, None)

    async def test_describe_while_down(self) -> None:
        """
        While down, describe() says why and when the next attempt is.
        """
        opener = FakeOpener(failures=1000)
        service, _ = self.make(opener)
        service._min_backoff = service._backoff = 30
        service.startService()
        await deferLater(reactor, 0.2, lambda: None)
        text = service.describe()
        self.assertIn("not connected to libvirt at qemu:///fake", text)
        self.assertIn("Connection refused", text)
        self.assertIn("reconnect attempt 2 in", text)

    async def test_lost_and_reconnected(self) -> None:
        """
        When libvirt reports the connection closed, listeners hear of it, calls fail
        with L{NotConnected}, and the service reconnects and tells listeners again.
        """
        opener = FakeOpener()
        service, listener = self.make(opener)
        service.startService()
        await with_timeout(listener.wait("connected"))
        first = opener.connections[0]
        opener.failures = 2
        lost = listener.wait("disconnected")
        reconnected = listener.wait("connected")
        first.simulate_close(reason=1)
        await with_timeout(lost)
        self.assertIn(("disconnected", "connection lost (end of file)"), listener.events)
        await self.assertFailure(service.call(lambda conn: None), NotConnected)
        await with_timeout(reconnected)
        self.assertEqual((service.connects, service.disconnects), (2, 1))
        self.assertTrue(first.closed)
        self.assertIsNone(first.close_callback)
        self.assertEqual(first.event_callbacks, {})

    async def test_stale_close_ignored(self) -> None:
        """
        A close callback from a connection already replaced changes nothing.
        """
        opener = FakeOpener()
        service, listener = self.make(opener)
        service.startService()
        await with_timeout(listener.wait("connected"))
        stale = opener.connections[0]
        callback = stale.close_callback
        service.lose_connection("test")
        await with_timeout(listener.wait("connected"))
        assert callback is not None
        callback(stale, 1, None)
        await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(service.connected)
        self.assertEqual(service.disconnects, 1)

    async def test_stop_waits_for_holds(self) -> None:
        """
        stopService keeps the connection open until held work finishes, then closes
        it.
        """
        opener = FakeOpener()
        service, listener = self.make(opener)
        service.startService()
        await with_timeout(listener.wait("connected"))
        hold: Deferred[None] = Deferred()
        service.keep_open_until(hold)
        stopped = service.stopService()
        await deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(opener.connections[0].closed)
        hold.callback(None)
        await with_timeout(stopped)
        self.assertTrue(opener.connections[0].closed)
        self.assertIn("stopped", service.describe())

    async def test_stop_waits_for_calls_in_flight(self) -> None:
        """
        A call still running when the service stops keeps the connection open until
        it returns (closing under it makes libvirt misbehave).
        """
        opener = FakeOpener()
        service, listener = self.make(opener)
        service.startService()
        await with_timeout(listener.wait("connected"))
        release = threading.Event()
        call = service.call(lambda conn: release.wait(10) and not conn.closed)
        stopped = service.stopService()
        await deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(opener.connections[0].closed)
        release.set()
        self.assertTrue(await with_timeout(call), "the call saw a closed connection")
        await with_timeout(stopped)
        self.assertTrue(opener.connections[0].closed)


class TestDriverTests(TestCase):
    """
    The service against libvirt's in-process C{test:///default} driver.
    """

    async def test_calls_and_lifecycle_events(self) -> None:
        """
        Calls run on the pool with the connection; lifecycle events of a domain
        started from another connection reach the listener on the reactor thread.
        """
        start_event_loop()
        service = LibvirtService("test:///default", reactor)
        listener = RecordingListener()
        service.add_listener(listener)
        service.startService()
        self.addCleanup(service.stopService)
        await with_timeout(listener.wait("connected"))
        names = await service.call(lambda conn: [d.name() for d in conn.listAllDomains()])
        self.assertIn("test", names)
        name = f"hv-test-{uuid.uuid4().hex[:8]}"
        other = libvirt.open("test:///default")
        self.addCleanup(other.close)
        started = listener.wait("lifecycle")
        dom = other.createXML(
            f"<domain type='test'><name>{name}</name><memory>8192</memory>"
            "<os><type>hvm</type></os></domain>",
            0,
        )
        self.addCleanup(lambda: dom.isActive() and dom.destroy())
        await with_timeout(started)
        self.assertIn(("lifecycle", name, libvirt.VIR_DOMAIN_EVENT_STARTED), listener.events)

    async def test_bad_uri_reported(self) -> None:
        """
        A URI libvirt cannot open leaves the service disconnected with libvirt's
        reason, retrying.
        """
        start_event_loop()
        service = LibvirtService("test:///nonexistent/file.xml", reactor, min_backoff=10)
        service.startService()
        self.addCleanup(service.stopService)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(service.connected)
        self.assertIn("last attempt failed", service.describe())
