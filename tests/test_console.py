"""
Fast tests of the console plumbing (real unix sockets and the real reactor; a small
stand-in for the manager): L{hypervisor.console.service.Consoles} (ownership, state,
port 0, one serial connection per VM, released when either side closes, a missing
socket) and L{hypervisor.console.pipe.VmPipe} (bytes both ways, bounded early
buffer, the farewell, flow control both ways).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol, reactor
from twisted.trial.unittest import TestCase

from hypervisor.auth import Identity
from hypervisor.console import pipe as pipes
from hypervisor.console.paths import SERIAL_SOCKET, serial_socket_path
from hypervisor.console.service import SERIAL_CLOSED, Consoles
from hypervisor.errors import AccessDenied, InvalidRequest, Unavailable, WrongState
from hypervisor.model import ConsoleType, State
from tests.support import until

OWNER = Identity(username="alice")
STRANGER = Identity(username="mallory")


@dataclass
class FakeInfo:
    State: State = State.RUNNING
    ConsoleType: ConsoleType = ConsoleType.NONE
    OwnerUsers: list[str] = field(default_factory=lambda: ["alice"])
    OwnerGroups: list[str] = field(default_factory=list)


@dataclass
class FakeVm:
    ip: str
    directory: str
    info: FakeInfo = field(default_factory=FakeInfo)
    domain_uuid: str = ""


class FakeTable:
    def __init__(self, vm: FakeVm) -> None:
        self.vm = vm

    def get(self, ip: str) -> FakeVm:
        from hypervisor.errors import NotFound

        if ip != self.vm.ip:
            raise NotFound(f"no VM with IP {ip}")
        return self.vm


class FakeCtx:
    def __init__(self, vm: FakeVm) -> None:
        self.table = FakeTable(vm)

    @staticmethod
    def check_owner(vm: FakeVm, identity: Identity, method: str) -> None:
        if identity.username not in vm.info.OwnerUsers:
            raise AccessDenied(f"no access to VM {vm.ip}")


class FakeManager:
    def __init__(self, vm: FakeVm) -> None:
        self.ctx = FakeCtx(vm)


class GuestSide(protocol.Protocol):
    """
    The QEMU end of the serial socket: records what it gets, can send and close.
    """

    def connectionMade(self) -> None:
        self.factory.connections.append(self)  # type: ignore[attr-defined]
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Sink:
    """
    The client side of a pipe: what it got, and whether it ended.
    """

    def __init__(self) -> None:
        self.data = b""
        self.ended: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data += data

    def end(self, farewell: bytes) -> None:
        self.ended.append(farewell)


class ConsoleServiceTests(TestCase):
    """
    Consoles over a real unix socket standing in for QEMU's chardev.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="console-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.vm = FakeVm("10.0.0.2", self.dir)
        self.consoles = Consoles(FakeManager(self.vm), reactor)
        self.factory = protocol.Factory.forProtocol(GuestSide)
        self.factory.connections = []  # type: ignore[attr-defined]
        self.port = reactor.listenUNIX(os.path.join(self.dir, SERIAL_SOCKET), self.factory)
        self.addCleanup(self.port.stopListening)

    def guest(self) -> GuestSide:
        return self.factory.connections[-1]  # type: ignore[attr-defined,no-any-return]

    async def test_serial_both_ways_and_one_at_a_time(self) -> None:
        """
        Bytes go both ways; a second connection is refused until the first closes;
        the VM's end sends the farewell and frees the port again.
        """
        pipe = await self.consoles.connect_serial(OWNER, "10.0.0.2", 0)
        sink = Sink()
        await until(lambda: self.factory.connections, 5, "the guest side")  # type: ignore[attr-defined]
        self.guest().transport.write(b"login: ")  # type: ignore[union-attr]
        pipe.attach(sink.write, sink.end)
        pipe.write(b"root\r")
        await until(lambda: self.guest().received == b"root\r", 5, "the input")
        await until(lambda: sink.data == b"login: ", 5, "the output")
        with self.assertRaises(WrongState) as e:
            await self.consoles.connect_serial(OWNER, "10.0.0.2", 0)
        self.assertEqual(str(e.exception), "VM already has a serial port connection")
        pipe.close()  # the client went away
        await pipe.closed
        self.assertEqual(sink.ended, [])  # nothing to tell a client that left
        second = await self.consoles.connect_serial(OWNER, "10.0.0.2", 0)
        second.attach(sink.write, sink.end)
        await until(lambda: len(self.factory.connections) == 2, 5, "2nd")  # type: ignore[attr-defined]
        self.guest().transport.loseConnection()  # type: ignore[union-attr]
        await second.closed
        self.assertEqual(sink.ended, [SERIAL_CLOSED])
        self.assertEqual(self.consoles.serial_busy, set())

    async def test_refusals(self) -> None:
        """
        Strangers, port 1, a stopped VM, a missing socket: refused, nothing held.
        """
        with self.assertRaises(AccessDenied):
            await self.consoles.connect_serial(STRANGER, "10.0.0.2", 0)
        with self.assertRaises(InvalidRequest) as e:
            await self.consoles.connect_serial(OWNER, "10.0.0.2", 1)
        self.assertEqual(str(e.exception), "only one serial port is supported")
        self.vm.info.State = State.STOPPED
        with self.assertRaises(WrongState) as e:
            await self.consoles.connect_serial(OWNER, "10.0.0.2", 0)
        self.assertEqual(str(e.exception), "VM is not running")
        self.vm.info.State = State.RUNNING
        with self.assertRaises(WrongState) as e:
            await self.consoles.connect_vnc(OWNER, "10.0.0.2")
        self.assertEqual(str(e.exception), "VNC console is not enabled")
        await self.port.stopListening()
        with self.assertRaises(Unavailable) as e:
            await self.consoles.connect_serial(OWNER, "10.0.0.2", 0)
        self.assertIn("no serial input device for VM", str(e.exception))
        self.assertEqual(self.consoles.serial_busy, set())


class PipeTests(TestCase):
    """
    VmPipe alone.
    """

    def test_early_bytes_bounded(self) -> None:
        """
        What the VM sends before a client attaches is kept, at most MAX_EARLY bytes
        (the newest), and handed over first.
        """
        pipe = pipes.VmPipe()
        pipe.dataReceived(b"a" * pipes.MAX_EARLY)
        pipe.dataReceived(b"b" * 10)
        sink = Sink()
        pipe.attach(sink.write, sink.end)
        self.assertEqual(len(sink.data), pipes.MAX_EARLY)
        self.assertTrue(sink.data.endswith(b"b" * 10))

    async def test_flow_control(self) -> None:
        """
        The client transport pauses the VM side (through a producer that cannot close
        it); the VM side's transport pauses the client's network connection.
        """

        class Recorder:
            def __init__(self) -> None:
                self.calls: list[str] = []
                self.producer: Any = None

            def pauseProducing(self) -> None:
                self.calls.append("pause")

            def resumeProducing(self) -> None:
                self.calls.append("resume")

            def stopProducing(self) -> None:
                self.calls.append("stop")

            def registerProducer(self, producer: Any, streaming: bool) -> None:
                self.producer = producer

            def unregisterProducer(self) -> None:
                self.producer = None

        from twisted.internet.interfaces import IPushProducer
        from zope.interface import directlyProvides

        vm_transport, client = Recorder(), Recorder()
        directlyProvides(client, IPushProducer)  # the client's network connection
        pipe = pipes.VmPipe()
        pipe.transport = vm_transport  # type: ignore[assignment]
        pipe.attach(lambda data: None, lambda farewell: None, client)
        client.producer.pauseProducing()  # the client is behind
        client.producer.stopProducing()  # its transport goes away: not a close
        self.assertEqual(vm_transport.calls, ["pause"])
        vm_transport.producer.pauseProducing()  # the guest does not read
        vm_transport.producer.resumeProducing()
        self.assertEqual(client.calls, ["pause", "resume"])

    def test_long_state_directory(self) -> None:
        """
        A socket path too long for AF_UNIX is replaced by a short one under /run.
        """
        short = "/var/lib/hypervisor/VMs/10.0.0.2"
        self.assertEqual(serial_socket_path(short), f"{short}/{SERIAL_SOCKET}")
        deep = "/" + "d" * 120 + "/VMs/10.0.0.2"
        path = serial_socket_path(deep)
        self.assertLessEqual(len(path.encode()), 107)
        self.assertEqual(path, serial_socket_path(deep))
        self.assertNotEqual(path, serial_socket_path(deep + "0"))
