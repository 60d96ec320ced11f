# -*- test-case-name: tests.test_control -*-
"""
The C{<stateDir>/control} unix socket: the Go hypervisor's stop protocol, exactly.

A client sends one line of at most 256 bytes ending in a newline:

    - C{stop}: the daemon answers C{ok}, stops its services leaving every VM running
      (unless C{stop-vms-on-next-stop} came first) and exits 0; the client waits for
      the connection to close.
    - C{stop-vms-on-next-stop}: the daemon answers C{ok}; its next stop shuts the VMs
      down first.
    - anything else: C{bad request}.

The server side is L{ControlProtocol} (Twisted); L{send_command} is the blocking
client used by the C{hypervisor} command. It reports every failure as a one-line
L{ControlError}, and retries for a few seconds when the daemon drops the connection
without answering (what a process out of file descriptors does: Twisted accepts and
closes the connection on its reserved descriptor). Port 6976 is kept from using the
daemon's last descriptors (L{hypervisor.netguard}), so the control socket stays
usable while clients flood that port.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable
from typing import Protocol as TypingProtocol

from twisted.internet import protocol
from twisted.logger import Logger

MAX_REQUEST = 256
OK = b"ok\n"
BAD_REQUEST = b"bad request\n"
COMMANDS = ("stop", "stop-vms-on-next-stop")


class IControlHandler(TypingProtocol):
    """
    What the control socket asks of the daemon.
    """

    def stop(self) -> None:
        """
        Stop the daemon (after the reply has been written).
        """

    def stop_vms_on_next_stop(self) -> None:
        """
        Make the next stop shut the VMs down first.
        """


class ControlProtocol(protocol.Protocol):
    """
    One control connection: read one request line, answer, act.
    """

    log = Logger()

    def __init__(self, handler: IControlHandler) -> None:
        self.handler = handler
        self._buffer = b""
        self._done = False

    def dataReceived(self, data: bytes) -> None:
        """
        Buffer until a newline; refuse requests longer than L{MAX_REQUEST}.
        """
        if self._done or self.transport is None:
            return
        self._buffer += data
        line, newline, _ = self._buffer.partition(b"\n")
        if not newline:
            if len(self._buffer) >= MAX_REQUEST:
                self._answer_bad("request longer than 256 bytes")
            return
        if len(line) + 1 > MAX_REQUEST:
            self._answer_bad("request longer than 256 bytes")
            return
        self._done = True
        command = line.rstrip(b"\r")
        if command == b"stop":
            self.log.info("control socket: stop requested")
            self.transport.write(OK)
            # The connection stays open until the process exits: that is how the
            # client knows the daemon has stopped.
            self.handler.stop()
        elif command == b"stop-vms-on-next-stop":
            self.log.info("control socket: VMs will be stopped on the next stop")
            self.handler.stop_vms_on_next_stop()
            self.transport.write(OK)
            self.transport.loseConnection()
        else:
            self._answer_bad(f"unknown command {command[:64]!r}")

    def _answer_bad(self, why: str) -> None:
        assert self.transport is not None
        self._done = True
        self.log.warn("control socket: bad request ({why})", why=why)
        self.transport.write(BAD_REQUEST)
        self.transport.loseConnection()


class ControlFactory(protocol.Factory):
    """
    Builds a L{ControlProtocol} per connection, all sharing one handler.
    """

    def __init__(self, handler: IControlHandler) -> None:
        self.handler = handler

    def buildProtocol(self, addr: object) -> ControlProtocol:
        """
        Make the protocol for one connection.
        """
        p = ControlProtocol(self.handler)
        p.factory = self
        return p


class ControlError(Exception):
    """
    The control request failed; the message (one line) says why, for the operator.
    """


RETRY_FOR = 30.0
"""Seconds the client keeps retrying while the daemon drops connections unanswered."""


class _NoAnswer(Exception):
    """
    The daemon accepted the connection but dropped it without answering (as a
    process out of file descriptors does): worth another try.
    """


def send_command(
    path: str,
    command: str,
    timeout: float = 600.0,
    retry_for: float = RETRY_FOR,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """
    Send C{command} to a running daemon's control socket and wait as the Go client does.

    For C{stop}, wait until the daemon closes the connection (it has exited). When
    the daemon drops the connection without an answer (reset, or closed before
    replying: it is out of file descriptors, say), try again for C{retry_for}
    seconds, waiting longer each time.

    @raise ControlError: the daemon is not running, cannot be reached, or answered
        something else than C{ok}; the message is one line.
    """
    if command not in COMMANDS:
        raise ControlError(f"unknown control command {command!r}")
    deadline = clock() + retry_for
    delay = 0.1
    while True:
        try:
            _send_once(path, command, timeout)
            return
        except _NoAnswer as e:
            if clock() + delay > deadline:
                raise ControlError(
                    f"the hypervisor did not answer {command!r} on {path}: {e} "
                    f"(tried for {retry_for:g}s; it may be out of file descriptors: "
                    "see its log)"
                ) from None
        sleep(delay)
        delay = min(1.0, delay * 2)


def _send_once(path: str, command: str, timeout: float) -> None:
    """
    One attempt of L{send_command}.

    @raise _NoAnswer: the connection was dropped before an answer came.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(path)
        except FileNotFoundError:
            raise ControlError(
                f"the hypervisor is not running: no control socket at {path} " "(wrong -stateDir?)"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"the hypervisor is not running: nothing listens on {path}"
            ) from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run this as root") from None
        except BlockingIOError:
            raise _NoAnswer("its control socket's queue is full") from None
        except socket.timeout:
            raise
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        try:
            s.sendall(command.encode("ascii") + b"\n")
            reply = b""
            while not reply.endswith(b"\n") and len(reply) < MAX_REQUEST:
                chunk = s.recv(MAX_REQUEST)
                if not chunk:
                    break
                reply += chunk
        except (ConnectionResetError, BrokenPipeError) as e:
            raise _NoAnswer(f"connection {_reason(e)} before an answer") from None
        if not reply:
            raise _NoAnswer("connection closed before an answer")
        if reply != OK:
            raise ControlError(
                f"the hypervisor answered {reply.decode('utf-8', 'replace').strip()!r}"
                f" to {command!r}"
            )
        if command == "stop":
            try:
                while s.recv(4096):
                    pass
            except ConnectionResetError:
                pass  # the process is gone: that is what we wait for
            except socket.timeout:
                raise ControlError(
                    f"the hypervisor accepted stop but had not exited after {timeout:g}s"
                ) from None
    except socket.timeout:
        raise ControlError(f"no answer from {path} within {timeout:g}s") from None
    except OSError as e:
        raise ControlError(f"talking to {path} failed: {e.strerror or e}") from None
    finally:
        s.close()


def _reason(e: OSError) -> str:
    return "reset" if isinstance(e, ConnectionResetError) else "closed"


class DaemonControl:
    """
    The daemon's L{IControlHandler}: stop the reactor, or flag the manager.
    """

    def __init__(self, manager: Any, reactor: Any) -> None:
        self.manager = manager
        self.reactor = reactor

    def stop(self) -> None:
        """
        Stop the daemon: the services stop in reverse order, then the process exits 0.
        """
        self.reactor.callLater(0, self.reactor.stop)

    def stop_vms_on_next_stop(self) -> None:
        """
        Make the manager power the VMs down on the next stop.
        """
        self.manager.stop_vms_on_next_stop = True
