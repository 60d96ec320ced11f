"""
The serial console over Perspective Broker, end to end: a real daemon with its PB
port, the tiny guest with a shell on its serial port under the real libvirtd, and
real PB clients (L{hypervisor.client} through vm-control's L{PbChannel}, and
C{vm-control -transport pb connect-to-vm-serial-port}): a command typed, its output
read; a second connection refused on PB and on SRPC while one is open (the same lock
as every transport); strangers refused; the VM's end ("VM serial port closed"); and
the graphical console (VNC) through C{vm-control -transport pb connect-to-vm-console}.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests import support
from tests.test_console_real import ShellGuestCase, read_until

PB_PORT = support.free_port()


class PbSerialConsoleTests(ShellGuestCase, TestCase):
    """
    The serial console over PB against the real daemon and guest. The PB client lives
    in trial's reactor; the blocking channel is used from threads, as vm-control's
    terminal loop uses it.
    """

    daemon_flags = (f"-pbPortNum={PB_PORT}",)

    async def open_pb(self, user: str = "owner", port: int = 0) -> Any:
        """
        A console over PB as vm-control opens it (a blocking channel).
        """
        from hypervisor.cli.pb_console import open_pb
        from hypervisor.cli.pb_transport import PbTransport

        transport = PbTransport(
            reactor, f"tcp:127.0.0.1:{PB_PORT}", self.pair(user), f"{self.pki}/CA.pem", "localhost"
        )
        self.addCleanup(transport.close)
        request = f'{{"IpAddress":"{self.ip}","PortNumber":{port}}}'.encode()
        return await open_pb(reactor, transport, "Hypervisor.ConnectToVmSerialPort", request)

    async def free_again(self) -> Any:
        """
        A PB console once the daemon has released the previous one.
        """
        from hypervisor.cli.client import ClientError

        deadline = time.monotonic() + 10
        while True:
            try:
                return await self.open_pb()
            except ClientError:
                if time.monotonic() > deadline:
                    raise
                await deferLater(reactor, 0.1, lambda: None)

    async def test_pb_console(self) -> None:
        """
        Over PB: a command typed, its output read; a second console refused on PB and
        SRPC; a stranger refused; after close the console is free again (SRPC gets
        it, then PB again); the VM stopping ends it with "VM serial port closed".
        """
        from hypervisor.cli.client import ClientError

        console = await self.open_pb()
        await deferToThread(console.send, b"echo pb$((6*7))console\n")
        await deferToThread(read_until, console, b"pb42console")
        with self.assertRaises(ClientError) as e:
            await self.open_pb()
        self.assertEqual(str(e.exception), "VM already has a serial port connection")
        with self.assertRaises(ClientError) as e:
            await deferToThread(self.open, "srpc")
        self.assertEqual(str(e.exception), "VM already has a serial port connection")
        with self.assertRaises(ClientError) as e:
            await self.open_pb("other")
        self.assertIn("no access to VM", str(e.exception))
        with self.assertRaises(ClientError) as e:
            await self.open_pb(port=1)
        self.assertEqual(str(e.exception), "only one serial port is supported")
        console.close()
        srpc = await deferToThread(
            support.wait_for, lambda: self.open("srpc"), 10, "the console to be free again"
        )
        srpc.send(b"echo back$((40+2))\n")
        await deferToThread(read_until, srpc, b"back42")
        srpc.close()
        console = await self.free_again()
        await deferToThread(console.send, b"echo again$((40+2))\n")
        await deferToThread(read_until, console, b"again42")
        self.assertIn("pb42console", self._bootlog())  # the boot log is kept meanwhile
        r = await deferToThread(self.cli, "vm_control", "owner", "stop-vm", self.ip)
        self.assertEqual(r.returncode, 0, r.stderr)
        tail = await deferToThread(read_until, console, b"VM serial port closed\n", 60)
        self.assertTrue(tail.endswith(b"VM serial port closed\n"), tail[-200:])
        self.assertEqual(await deferToThread(console.recv), b"")
        console.close()

    def test_vm_control_pb(self) -> None:
        """
        vm-control -transport pb connect-to-vm-serial-port with piped stdin: a
        command typed, its output on stderr, Control-\\ ends it with status 0.
        """
        self.vm_control_console(
            7,
            "-transport=pb",
            "-hypervisorHostname=localhost",
            f"-pbEndpoint=tcp:127.0.0.1:{PB_PORT}",
        )


class PbVncTests(ShellGuestCase):
    """
    The graphical console over PB: a VM created with ConsoleType vnc, reached with
    vm-control -transport pb connect-to-vm-console.
    """

    daemon_flags = (f"-pbPortNum={PB_PORT}",)
    create_flags = ("-consoleType", "vnc")

    def test_vnc_over_pb(self) -> None:
        """
        The localhost port vm-control opens relays the guest's RFB server (its banner).
        """
        self.vnc_with_vm_control(
            "-transport=pb", "-hypervisorHostname=localhost", f"-pbEndpoint=tcp:127.0.0.1:{PB_PORT}"
        )


class ConsoleChannelFlowTests(SynchronousTestCase):
    """
    L{hypervisor.pb.console.ConsoleChannel}'s flow control with a fake VM side (in
    addition to the real tests above): the VM socket is not read while the client has
    L{WINDOW} data messages unanswered; the client's writes wait while the VM socket's
    send buffer is full.
    """

    def setUp(self) -> None:
        from twisted.internet.testing import StringTransport

        from hypervisor.console.pipe import VmPipe
        from hypervisor.pb.console import ConsoleChannel

        self.vm = StringTransport()
        self.pipe = VmPipe(b"bye\n")
        self.pipe.makeConnection(self.vm)
        self.observer = _Observer()
        self.channel = ConsoleChannel(self.pipe, self.observer, lambda: None)  # type: ignore[arg-type]
        self.channel.start()

    def test_window(self) -> None:
        """
        The VM side pauses at WINDOW unanswered messages, resumes at half of it.
        """
        from hypervisor.pb.console import WINDOW

        for i in range(WINDOW):
            self.pipe.dataReceived(b"x%d" % i)
        self.assertEqual(self.vm.producerState, "paused")
        self.assertEqual(
            [a for _, a in self.observer.calls], [(b"x%d" % i,) for i in range(WINDOW)]
        )
        for d in self.observer.pending[: WINDOW // 2 - 1]:
            d.callback(None)
        self.assertEqual(self.vm.producerState, "paused")
        self.observer.pending[WINDOW // 2 - 1].callback(None)
        self.assertEqual(self.vm.producerState, "producing")

    def test_writes_wait_for_room(self) -> None:
        """
        A write while the VM socket's buffer is full is answered once it drained.
        """
        self.assertIs(self.vm.producer, self.channel)
        self.successResultOf(self.channel.remote_write(b"ls\n"))  # room: answered at once
        self.channel.pauseProducing()
        waiting = self.channel.remote_write(b"more\n")
        self.assertNoResult(waiting)
        self.channel.resumeProducing()
        self.successResultOf(waiting)
        self.assertEqual(self.vm.value(), b"ls\nmore\n")

    def test_end(self) -> None:
        """
        The VM side's end: the farewell, then closed(); later writes are refused.
        """
        from hypervisor.pb.wire import CallError

        self.channel.pauseProducing()
        waiting = self.channel.remote_write(b"x")
        self.pipe.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(waiting)
        self.assertEqual([m for m, _ in self.observer.calls], ["data", "closed"])
        self.assertEqual(self.observer.calls[0][1], (b"bye\n",))
        self.assertRaises(CallError, self.channel.remote_write, b"y")


class _Observer:
    """
    A fake client observer: remembers calls, answers when told.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.pending: list[Deferred[None]] = []

    def callRemote(self, method: str, *args: Any) -> "Deferred[None]":
        self.calls.append((method, args))
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d
