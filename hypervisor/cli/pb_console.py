# -*- test-case-name: tests.test_console_pb -*-
"""
C{vm-control -transport pb connect-to-vm-serial-port} (and C{connect-to-vm-console}):
a console opened over PB (L{hypervisor.client.HypervisorClient.console}) as a
blocking L{hypervisor.cli.console.Channel} for the terminal loop, which runs in a
thread while the PB connection lives in the reactor.

The VM's bytes reach the terminal thread through a socket pair: the reactor side
writes each piece on a worker thread, one after the other (a L{DeferredLock} keeps
them in order), and answers the hypervisor only once it is written, so a terminal
that does not read holds the console back instead of filling memory. The VM's end
shuts the pair down (the terminal loop then sees the end of the console).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import DeferredLock
from twisted.internet.threads import blockingCallFromThread, deferToThread

from hypervisor.cli.client import ClientError
from hypervisor.cli.console import Channel
from hypervisor.client import CallFailed, Console


class PbChannel(Channel):
    """
    A PB console seen from the terminal thread.
    """

    def __init__(self, reactor: Any, sock: socket.socket, inner: socket.socket) -> None:
        self.reactor = reactor
        self.sock = sock
        self.inner = inner
        self.console: Any = None

    def recv(self) -> bytes:
        try:
            return self.sock.recv(65536)
        except OSError:
            return b""

    def send(self, data: bytes) -> None:
        try:
            blockingCallFromThread(self.reactor, self.console.write, data)
        except CallFailed as e:
            raise ClientError(e.message) from None

    def close(self) -> None:
        if self.console is not None:
            self.reactor.callFromThread(self.console.close)
        super().close()
        try:
            self.inner.close()
        except OSError:
            pass


async def open_pb(reactor: Any, transport: Any, method: str, request: bytes) -> PbChannel:
    """
    Open C{method}'s console over C{transport} (a L{hypervisor.cli.pb_transport.PbTransport}).

    @raise ClientError: refused.
    """
    outer, inner = socket.socketpair()
    channel = PbChannel(reactor, outer, inner)
    lock = DeferredLock()

    def on_data(data: bytes) -> Any:
        return lock.run(deferToThread, inner.sendall, data)

    def shut() -> None:
        try:
            inner.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def on_closed() -> Any:
        return lock.run(deferToThread, shut)

    client = await transport.client()
    try:
        console: Console = await client.console(method, request, on_data, on_closed)
    except CallFailed as e:
        outer.close()
        inner.close()
        raise ClientError(e.message) from None
    channel.console = console
    return channel
