"""
Tests for L{hypervisor.control}: the control socket protocol and its client.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from contextlib import redirect_stderr, redirect_stdout

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
        self.port = reactor.listenUNIX(self.path, control.ControlFactory(self.handler), mode=0o600)
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


class DroppingServer:
    """
    A control socket served by a thread that drops its first C{drops} connections
    unanswered (closed, or reset when C{reset}), as a daemon out of file
    descriptors does, and answers C{ok} to the rest.
    """

    def __init__(self, path: str, drops: int, reset: bool = False) -> None:
        self.drops = drops
        self.reset = reset
        self.seen = 0
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.seen += 1
            with conn:
                if self.seen <= self.drops:
                    if self.reset:
                        conn.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    continue
                conn.recv(256)
                conn.sendall(b"ok\n")

    def close(self) -> None:
        """
        Stop listening.
        """
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


class DroppedConnectionTests(SynchronousTestCase):
    """
    The client when the daemon drops control connections without answering.
    """

    def server(self, drops: int, reset: bool = False) -> tuple[str, DroppingServer]:
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "control")
        server = DroppingServer(path, drops, reset)
        self.addCleanup(server.close)
        return directory, server

    def test_retries_dropped_connections(self) -> None:
        """
        Connections closed or reset before an answer are retried; the command
        succeeds once the daemon answers.
        """
        for reset in (False, True):
            directory, server = self.server(drops=3, reset=reset)
            control.send_command(
                os.path.join(directory, "control"), "stop-vms-on-next-stop", timeout=5, retry_for=10
            )
            self.assertEqual(server.seen, 4)

    def test_gives_up_with_one_line(self) -> None:
        """
        When every connection is dropped, the client gives up after C{retry_for}
        with a one-line error that says what may be wrong.
        """
        directory, server = self.server(drops=1000, reset=True)
        started = time.monotonic()
        e = self.assertRaises(
            control.ControlError,
            control.send_command,
            os.path.join(directory, "control"),
            "stop",
            timeout=5,
            retry_for=1,
        )
        self.assertLess(time.monotonic() - started, 3)
        self.assertGreater(server.seen, 2)
        self.assertNotIn("\n", str(e))
        self.assertIn("did not answer 'stop'", str(e))
        self.assertIn("out of file descriptors", str(e))

    def test_hypervisor_stop_prints_one_line(self) -> None:
        """
        C{hypervisor stop} against a daemon that drops the connection exits 1 with
        one line on stderr and no traceback.
        """
        from hypervisor.cli.hypervisor import main

        directory, _ = self.server(drops=1000, reset=True)
        self.patch(control, "send_command", functools.partial(control.send_command, retry_for=0.5))
        os.environ["HYPERVISOR_FLAGS_DIRECTORY"] = directory
        self.addCleanup(os.environ.pop, "HYPERVISOR_FLAGS_DIRECTORY")
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main([f"-stateDir={directory}", "stop"])
        self.assertEqual(code, 1)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, err.getvalue())
        self.assertTrue(
            lines[0].startswith("hypervisor stop: the hypervisor did not " "answer"), lines[0]
        )
