# -*- test-case-name: tests.test_console -*-
"""
The console methods (reference §1.8) over the manager's VMs:

- C{ConnectToVmSerialPort} (owners): port 0 only; the VM running; one connection
  per VM at a time (a second is refused with the Go hypervisor's words, "VM already
  has a serial port connection", until the first ends). The daemon connects to the
  serial port's unix socket, which libvirt made for the domain
  (L{hypervisor.virt.domainxml}). QEMU's chardev logs everything the guest writes to
  C{bootlog} itself, so the boot log is kept whether a console is connected or not
  (the Go hypervisor writes the boot log only while no console client is
  connected); a chardev socket has one reader, the console client.
- C{ConnectToVmConsole} (owners): the VM running with C{ConsoleType} C{vnc}: a raw
  RFB proxy to the VNC socket libvirt gave the domain. Several viewers may connect
  (QEMU's VNC server takes several clients, as the Go hypervisor dials one each).
- C{ChangeVmConsoleType} (owners): none/dummy/vnc, stopped VMs only (it takes effect
  at the next start, when the domain XML is built again).
- C{ConnectToVmManager} (admin): refused as not supported. The Go hypervisor owns
  its QEMU's QMP socket; here libvirt owns the monitor and the only way in is
  C{virDomainQemuMonitorCommand}, which libvirt documents as unsupported and which
  marks the domain tainted ("custom-monitor"): not offered.

Each successful call returns a connected L{hypervisor.console.pipe.VmPipe} that the
transport joins to its client connection after sending the C{{"Error":""}} answer.
"""

from __future__ import annotations

import errno
from typing import Any, Optional

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectError

from hypervisor.auth import Identity
from hypervisor.console.model import ConsoleType
from hypervisor.console.paths import serial_socket_path
from hypervisor.console.pipe import VmPipe, open_pipe
from hypervisor.errors import InvalidRequest, Unavailable, WrongState
from hypervisor.model import State

SERIAL_CLOSED = b"VM serial port closed\n"


class NotSupported(InvalidRequest):
    """
    A method this hypervisor does not offer (HTTP 501).
    """

    status = 501


class Consoles:
    """
    The console methods over one manager.

    @ivar serial_busy: IPs of VMs with a serial port connection now.
    """

    def __init__(self, manager: Any, reactor: Optional[Any] = None) -> None:
        self.manager = manager
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.serial_busy: set[str] = set()

    def _running_vm(self, identity: Identity, ip: str, method: str) -> Any:
        ctx = self.manager.ctx
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, identity, method)
        if vm.info.State != State.RUNNING:
            raise WrongState("VM is not running")
        return vm

    @inlineCallbacks
    def connect_serial(self, identity: Identity, ip: str, port: int) -> Any:
        """
        A pipe to the VM's serial port (module docstring).
        """
        if port > 0:
            raise InvalidRequest("only one serial port is supported")
        vm = self._running_vm(identity, ip, "ConnectToVmSerialPort")
        if vm.ip in self.serial_busy:
            raise WrongState("VM already has a serial port connection")
        self.serial_busy.add(vm.ip)
        pipe = VmPipe(SERIAL_CLOSED, release=lambda: self.serial_busy.discard(vm.ip))
        path = serial_socket_path(vm.directory)
        try:
            yield open_pipe(self.reactor, path, pipe)
        except (ConnectError, OSError) as e:
            self.serial_busy.discard(vm.ip)
            raise Unavailable(_no_device("serial input", e)) from None
        except BaseException:
            self.serial_busy.discard(vm.ip)
            raise
        return pipe

    @inlineCallbacks
    def connect_vnc(self, identity: Identity, ip: str) -> Any:
        """
        A pipe to the VM's VNC server.
        """
        vm = self._running_vm(identity, ip, "ConnectToVmConsole")
        if vm.info.ConsoleType != ConsoleType.VNC:
            raise WrongState("VNC console is not enabled")
        ctx = self.manager.ctx
        ctx.require_libvirt()
        path = yield ctx.domains.vnc_socket(vm.domain_uuid) if vm.domain_uuid else ""
        if not path:
            raise Unavailable(
                "the VM's domain has no VNC server (it was started before its console type "
                "was vnc: stop and start it)"
            )
        pipe = VmPipe()
        try:
            yield open_pipe(self.reactor, path, pipe)
        except (ConnectError, OSError) as e:
            raise Unavailable(_no_device("VNC", e)) from None
        return pipe

    def connect_manager(self, identity: Identity, ip: str) -> Any:
        """
        Refused: see the module docstring.
        """
        self.manager.ctx.table.get(ip)
        raise NotSupported(
            "ConnectToVmManager is not supported by this hypervisor: libvirt owns the "
            "VM's QEMU monitor and offers no supported raw access to it"
        )

    def change_console_type(self, identity: Identity, ip: str, console: ConsoleType) -> Any:
        """
        ChangeVmConsoleType: a stopped VM only.
        """
        if console not in (ConsoleType.NONE, ConsoleType.DUMMY, ConsoleType.VNC):
            raise InvalidRequest(f"unknown console type {console!r}")

        def change(vm: Any, info: Any) -> None:
            if info.State != State.STOPPED:
                raise WrongState(f"VM {ip} is not stopped")
            info.ConsoleType = console

        return self.manager.changes.change(identity, ip, "ChangeVmConsoleType", change)


def _no_device(what: str, error: BaseException) -> str:
    code = getattr(error, "osError", None)  # Twisted's ConnectError: the errno
    if isinstance(error, OSError):
        code = error.errno
    if code in (errno.ENOENT, errno.ECONNREFUSED):
        return (
            f"no {what} device for VM (its socket is missing: a VM started before this "
            "hypervisor served consoles needs a stop and start)"
        )
    return f"no {what} device for VM: {error}"
