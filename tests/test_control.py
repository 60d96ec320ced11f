"""
Tests for L{hypervisor.control}: the control socket protocol and its client.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hypervisor import control


class RecordingHandler:
    """
    A control handler that records what it was asked.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []

    def stop(self) -> None:
        self.calls.append("stop")

    def stop_vms_on_next_stop(self) -> None:
        self.calls.append("stop-vms-on-next-stop")


class ControlProtocolTests(SynchronousTestCase):
    """
    Tests for L{control.ControlProtocol} in memory.
    """

    def connect(self) -> tuple[control.ControlProtocol, StringTransport, RecordingHandler]:
        handler = RecordingHandler()
        proto = control.ControlFactory(handler).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport, handler

    def test_stop(self) -> None:
        """
        C{stop} answers C{ok}, asks the daemon to stop and keeps the connection open
        (the client waits for the process to exit).
        """
        proto, transport, handler = self.connect()
        proto.dataReceived(b"stop\n")
        self.assertEqual(transport.value(), b"ok\n")
        self.assertEqual(handler.calls, ["stop"])
        self.assertFalse(transport.disconnecting)

    def test_stop_vms_on_next_stop(self) -> None:
        """
        C{stop-vms-on-next-stop} answers C{ok}, sets the flag and closes.
        """
        proto, transport, handler = self.connect()
        proto.dataReceived(b"stop-vms-on-next-stop\n")
        self.assertEqual(transport.value(), b"ok\n")
        self.assertEqual(handler.calls, ["stop-vms-on-next-stop"])
        self.assertTrue(transport.disconnecting)

    def test_request_in_pieces(self) -> None:
        """
        A request split across reads is assembled; a trailing CR is tolerated.
        """
        proto, transport, handler = self.connect()
        for piece in (b"st", b"op\r", b"\n"):
            proto.dataReceived(piece)
        self.assertEqual(transport.value(), b"ok\n")
        self.assertEqual(handler.calls, ["stop"])

    def test_bad_requests(self) -> None:
        """
        Unknown commands, empty lines and binary junk get C{bad request} and no action.
        """
        for data in (b"restart\n", b"\n", b"STOP\n", b"stop now\n", b"\x00\xff\n"):
            proto, transport, handler = self.connect()
            proto.dataReceived(data)
            self.assertEqual(transport.value(), b"bad request\n", data)
            self.assertEqual(handler.calls, [], data)
            self.assertTrue(transport.disconnecting)

    def test_oversized_request(self) -> None:
        """
        More than 256 bytes without a newline, or a line longer than 256 bytes, is a
        bad request; later data is ignored.
        """
        proto, transport, handler = self.connect()
        proto.dataReceived(b"s" * 300)
        proto.dataReceived(b"stop\n")
        self.assertEqual(transport.value(), b"bad request\n")
        self.assertEqual(handler.calls, [])
        proto, transport, handler = self.connect()
        proto.dataReceived(b" " * 251 + b"stop\n")
        self.assertEqual(transport.value(), b"bad request\n")
        self.assertEqual(handler.calls, [])

    def test_only_first_request_counts(self) -> None:
        """
        One request per connection: a second line is ignored.
        """
        proto, transport, handler = self.connect()
        proto.dataReceived(b"stop-vms-on-next-stop\nstop\n")
        self.assertEqual(handler.calls, ["stop-vms-on-next-stop"])


class ControlSocketTests(TestCase):
    """
    The real unix socket, with the blocking client L{control.send_command}.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "control")
        self.handler = RecordingHandler()
        self.port = reactor.listenUNIX(self.path, control.ControlFactory(self.handler),
                                       mode=0o600)
        self.addCleanup(self.port.stopListening)

    def test_socket_is_private(self) -> None:
        """
        The control socket is mode 0600.
        """
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    async def test_stop_waits_for_close(self) -> None:
        """
        The client gets C{ok} for stop, then waits until the server side closes (in
        the daemon: when the process exits), and only then returns.
        """
        live: list[control.ControlProtocol] = []
        build = self.port.factory.buildProtocol
        self.port.factory.buildProtocol = lambda addr: live.append(build(addr)) or live[-1]
        d = deferToThread(control.send_command, self.path, "stop", 10)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(self.handler.calls, ["stop"])
        self.assertFalse(d.called, "the client returned before the daemon exited")
        live[0].transport.loseConnection()
        await d

    async def test_stop_vms_on_next_stop(self) -> None:
        """
        The client returns after C{ok} for stop-vms-on-next-stop.
        """
        await deferToThread(control.send_command, self.path, "stop-vms-on-next-stop", 10)
        self.assertEqual(self.handler.calls, ["stop-vms-on-next-stop"])

    def test_not_running(self) -> None:
        """
        With no daemon, the client says the hypervisor is not running.
        """
        missing = os.path.join(self.dir, "nothing")
        e = self.assertRaises(control.ControlError, control.send_command, missing, "stop")
        self.assertIn("not running", str(e))
