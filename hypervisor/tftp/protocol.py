# -*- test-case-name: tests.test_tftp_protocol -*-
"""
The TFTP server's sockets: L{TftpProtocol} on port 69 receives requests and hands
them to L{TftpServer}; each transfer runs on its own ephemeral UDP port (a new
transfer ID, as RFC 1350 requires), a socket connected to the client
(L{SessionProtocol}), so the kernel drops packets from anyone else and reports
the path MTU the block size is clamped to.

L{TftpServer} decides: a malformed packet is dropped (a request gets an ERROR 4 no
longer than itself), a write request gets ERROR 2 (this server is read-only), a
repeated request of a transfer in progress is ignored, more than C{max_sessions}
transfers (or C{max_per_client} from one address) get ERROR 0 (busy), and a file the backend cannot give gets its ERROR at
once; every outcome is counted (L{ITftpStats}).

A transfer whose file can be read without the reactor runs on a thread of its own
(L{hypervisor.tftp.threaded}) when it is the only transfer in progress (and fewer
than C{threads.limit} threads run): a lone lock-step transfer is a round trip per
block, cheaper on a blocking socket of its own. Transfers that start while others
are in progress run on the reactor, their socket read by it: together there they
do better than on threads handing the GIL to each other. Both drive the same
L{ReadSession}.
"""

from __future__ import annotations

import select
import socket
from typing import Any, Callable, Optional, Protocol

from twisted.internet.interfaces import IReactorTime, IReadDescriptor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hypervisor.tftp import codec
from hypervisor.tftp.backend import BackendError, IBackend, IReader, normalise
from hypervisor.tftp.session import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    Negotiated,
    ReadSession,
    describe,
    negotiate,
)
from hypervisor.tftp.threaded import TransferThread, TransferThreads

SERVER_PORT = 69
MAX_SESSIONS = 256
MAX_PER_CLIENT = 64
IP_MTU = getattr(socket, "IP_MTU", 14)

Address = tuple[str, int]


class ITftpStats(Protocol):
    """
    What the server counts (L{hypervisor.metrics.TftpMetrics} is the real one).
    """

    def started(self, name: str) -> None:
        """
        A transfer of C{name} started.
        """

    def finished(self, name: str, outcome: str, sent: int, seconds: float) -> None:
        """
        A transfer ended: C{outcome} is C{completed} or why it failed.
        """

    def refused(self, code: int) -> None:
        """
        A request was answered with ERROR C{code}.
        """

    def dropped(self, reason: str) -> None:
        """
        A packet was dropped.
        """


class NoStats:
    """
    Counts nothing.
    """

    def started(self, name: str) -> None:
        """
        Nothing.
        """

    def finished(self, name: str, outcome: str, sent: int, seconds: float) -> None:
        """
        Nothing.
        """

    def refused(self, code: int) -> None:
        """
        Nothing.
        """

    def dropped(self, reason: str) -> None:
        """
        Nothing.
        """


class ISessionPort(Protocol):
    """
    A transfer's own socket, connected to the client.
    """

    mtu: int

    def send(self, data: bytes) -> None:
        """
        Send a packet to the client.
        """

    def close(self) -> None:
        """
        Close the socket.
        """


class Transfer:
    """
    A transfer in progress: the client, the file and its session.
    """

    def __init__(self, client: Address, name: str, port: ISessionPort) -> None:
        self.client = client
        self.name = name
        self.port = port
        self.session: Optional[ReadSession] = None
        self.protocol: Optional[SessionProtocol] = None
        # On a thread of its own: the session is the thread's until it ends; the
        # reactor sees what it reports.
        self.thread: Optional[TransferThread] = None
        self.negotiated: Optional[Negotiated] = None
        self.size = 0
        self.progress = (0, 0)

    def status(self) -> dict[str, Any]:
        """
        The transfer as the status page shows it.
        """
        row: dict[str, Any] = {"client": f"{self.client[0]}:{self.client[1]}", "file": self.name}
        if self.thread is not None and self.negotiated is not None:
            sent, retransmissions = self.progress
            row.update(bytes=sent, size=self.size, blksize=self.negotiated.blksize)
            row.update(windowsize=self.negotiated.windowsize, retransmissions=retransmissions)
            row["started"] = self.thread.started
        elif self.session is not None:
            row.update(describe(self.session))
            row["started"] = self.session.started
        else:
            row.update(bytes=0, size=0, blksize=0, windowsize=0, retransmissions=0, started=0.0)
        return row


class TftpServer:
    """
    Requests in, transfers out.

    @ivar open_port: makes a transfer's socket connected to a client; the protocol
        given receives its packets.
    @ivar transfers: in progress (or opening their file), by client address.
    """

    log = Logger()

    def __init__(
        self,
        backend: IBackend,
        clock: IReactorTime,
        open_port: Callable[[Address, "SessionProtocol"], ISessionPort],
        *,
        stats: Optional[ITftpStats] = None,
        max_blksize: int = codec.MAX_DATA,
        max_windowsize: int = 64,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        max_sessions: int = MAX_SESSIONS,
        max_per_client: int = MAX_PER_CLIENT,
        threads: Optional[TransferThreads] = None,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.open_port = open_port
        self.stats: ITftpStats = stats or NoStats()
        self.max_blksize = max_blksize
        self.max_windowsize = max_windowsize
        self.timeout = timeout
        self.retries = retries
        self.max_sessions = max_sessions
        self.max_per_client = max_per_client
        self.threads = threads
        self.transfers: dict[Address, Transfer] = {}
        self._per_client: dict[str, int] = {}
        self.completed = 0
        self.failed = 0
        self.stopping = False

    def request(self, data: bytes, client: Address, reply: Callable[[bytes], None]) -> None:
        """
        A packet arrived on port 69 from C{client}; C{reply} answers from port 69.
        """
        if self.stopping:
            return
        try:
            packet = codec.decode(data)
        except codec.MalformedPacket as e:
            self.stats.dropped("malformed")
            self.log.debug("malformed TFTP packet from {client}: {e}", client=client, e=e)
            if len(data) >= 2 and data[1] in (codec.RRQ, codec.WRQ) and data[0] == 0:
                # Never a reply larger than the request (no amplification).
                reply(
                    codec.error_packet(codec.ERR_ILLEGAL_OPERATION, str(e))[: len(data) - 1] + b"\0"
                )
            return
        if not isinstance(packet, codec.Request):
            self.stats.dropped("not a request")
            return
        if packet.opcode == codec.WRQ:
            self.stats.refused(codec.ERR_ACCESS_VIOLATION)
            reply(codec.error_packet(codec.ERR_ACCESS_VIOLATION, "this TFTP server is read-only"))
            return
        if client in self.transfers:
            self.stats.dropped("repeated request")
            return
        if packet.mode == "mail":
            self.stats.refused(codec.ERR_ILLEGAL_OPERATION)
            reply(codec.error_packet(codec.ERR_ILLEGAL_OPERATION, "mail mode is for writes"))
            return
        if len(self.transfers) >= self.max_sessions:
            self.stats.refused(codec.ERR_NOT_DEFINED)
            reply(codec.error_packet(codec.ERR_NOT_DEFINED, "server busy: try again later"))
            return
        if self._per_client.get(client[0], 0) >= self.max_per_client:
            self.stats.refused(codec.ERR_NOT_DEFINED)
            reply(
                codec.error_packet(
                    codec.ERR_NOT_DEFINED,
                    f"{self.max_per_client} transfers to this address are in progress: "
                    "try again when one ends",
                )
            )
            return
        self._start(packet, client)

    def _start(self, request: codec.Request, client: Address) -> None:
        try:
            name = normalise(request.filename)
        except BackendError:
            name = "(refused)"
        protocol = SessionProtocol()
        try:
            port = self.open_port(client, protocol)
        except OSError as e:
            self.stats.refused(codec.ERR_NOT_DEFINED)
            self.log.error("cannot open a TFTP transfer port for {client}: {e}", client=client, e=e)
            return
        transfer = Transfer(client, name, port)
        transfer.protocol = protocol
        protocol.transfer = transfer
        protocol.server = self
        self._add(transfer)
        opened = self.backend.open(client[0], request.filename, request.mode == "netascii")
        opened.addCallbacks(
            lambda reader: self._opened(transfer, request, reader),
            lambda reason: self._refused(transfer, reason),
        )

    def _refused(self, transfer: Transfer, reason: Failure) -> None:
        if reason.check(BackendError):
            code = getattr(reason.value, "code", 0)
            message = str(reason.value) or "cannot send the file"
        else:
            self.log.failure("TFTP backend failed for {name}", reason, name=transfer.name)
            code, message = codec.ERR_NOT_DEFINED, "cannot send the file"
        self.stats.refused(code)
        self.log.debug(
            "TFTP {client} {name}: error {code} {message}",
            client=transfer.client,
            name=transfer.name,
            code=code,
            message=message,
        )
        self._remove(transfer)
        transfer.port.send(codec.error_packet(code, message))
        transfer.port.close()

    def _opened(self, transfer: Transfer, request: codec.Request, reader: IReader) -> None:
        if self.transfers.get(transfer.client) is not transfer:
            reader.close()  # the server stopped meanwhile
            transfer.port.close()
            return
        negotiated = negotiate(
            request.options,
            reader.size,
            max_blksize=self.max_blksize,
            mtu=transfer.port.mtu,
            max_windowsize=self.max_windowsize,
            default_timeout=self.timeout,
        )
        if self._on_thread(transfer, reader, negotiated):
            return
        session = ReadSession(
            reader,
            transfer.port.send,
            self.clock,
            negotiated,
            retries=self.retries,
            on_done=lambda s, why: self._done(transfer, why),
        )
        transfer.session = session
        if transfer.protocol is not None:
            transfer.protocol.deliver = session.datagram
        self.stats.started(transfer.name)
        session.start()

    def _on_thread(self, transfer: Transfer, reader: IReader, negotiated: Negotiated) -> bool:
        """
        Run the transfer on a thread of its own if one is free and its file and socket
        can be used there; False: it runs on the reactor.
        """
        threads = self.threads
        detach = getattr(transfer.port, "detach", None)
        blocking = getattr(reader, "blocking", None)
        if threads is None or detach is None or blocking is None or not threads.available():
            return False
        if len(self.transfers) > 1:
            # Not alone: several transfers run better together on the reactor than
            # on threads taking the GIL from each other and from it (measured: 32
            # small transfers at a time went from ~600/s with a p99 of 90 ms on the
            # reactor to ~440/s with a p99 of 440 ms on 16 threads).
            return False
        fast: Optional[IReader] = blocking()
        if fast is None:
            return False
        thread = TransferThread(
            threads.reactor,
            detach(),
            fast,
            negotiated,
            retries=self.retries,
            on_progress=lambda sent, again: setattr(transfer, "progress", (sent, again)),
            on_done=lambda t, why: self._thread_done(transfer, t, why),
            name=f"tftp {transfer.client[0]}:{transfer.client[1]}",
            spinner=threads.spinner,
        )
        transfer.thread = thread
        transfer.negotiated = negotiated
        transfer.size = reader.size
        if threads.start(thread):
            self.stats.started(transfer.name)
        else:
            # No thread after all (the system has none to give): busy.
            self.log.error("TFTP: cannot start a transfer thread")
            transfer.thread = None
            self._remove(transfer)
            self.stats.refused(codec.ERR_NOT_DEFINED)
            thread.sock.send(codec.error_packet(codec.ERR_NOT_DEFINED, "server busy"))
            thread.sock.close()
            threads.reactor.callInThread(fast.close)
            transfer.port.close()
        return True

    def _thread_done(self, transfer: Transfer, thread: TransferThread, why: Optional[str]) -> None:
        transfer.progress = thread.progress
        if thread.session is not None:
            transfer.session = thread.session
            self._done(transfer, why)
            return
        self._remove(transfer)
        self.failed += 1
        self.stats.finished(transfer.name, "error", 0, self.clock.seconds() - thread.started)
        transfer.port.close()

    def _done(self, transfer: Transfer, why: Optional[str]) -> None:
        session = transfer.session
        assert session is not None
        self._remove(transfer)
        seconds = self.clock.seconds() - session.started
        if why is None:
            self.completed += 1
            self.stats.finished(transfer.name, "completed", session.size, seconds)
        else:
            self.failed += 1
            self.stats.finished(transfer.name, _outcome(why), session.bytes_acked, seconds)
            self.log.info(
                "TFTP {client} {name}: failed after {sent} of {size} bytes: {why}",
                client=transfer.client[0],
                name=transfer.name,
                sent=session.bytes_acked,
                size=session.size,
                why=why,
            )
        transfer.port.close()

    def _add(self, transfer: Transfer) -> None:
        self.transfers[transfer.client] = transfer
        ip = transfer.client[0]
        self._per_client[ip] = self._per_client.get(ip, 0) + 1
        self._alone()

    def _remove(self, transfer: Transfer) -> None:
        if self.transfers.get(transfer.client) is not transfer:
            return
        del self.transfers[transfer.client]
        ip = transfer.client[0]
        left = self._per_client.get(ip, 1) - 1
        if left > 0:
            self._per_client[ip] = left
        else:
            self._per_client.pop(ip, None)
        self._alone()

    def _alone(self) -> None:
        # A transfer thread polls only while it is the only transfer: the others
        # run on the reactor, which needs the GIL a polling thread keeps.
        if self.threads is not None:
            self.threads.spinner.alone = len(self.transfers) <= 1

    def stop(self) -> None:
        """
        End every transfer (the clients get an ERROR); take no more requests.
        """
        self.stopping = True
        for transfer in list(self.transfers.values()):
            if transfer.thread is not None:
                transfer.thread.stop("the server is stopping")
            elif transfer.session is not None:
                transfer.session.stop("the server is stopping")
            else:
                self._remove(transfer)
                transfer.port.close()

    def status(self) -> dict[str, Any]:
        """
        Transfers in progress and totals, for the status page.
        """
        now = self.clock.seconds()
        rows = []
        for transfer in sorted(self.transfers.values(), key=lambda t: t.client):
            row = transfer.status()
            row["seconds"] = max(0.0, now - row["started"]) if row["started"] else 0.0
            rows.append(row)
        return {"transfers": rows, "completed": self.completed, "failed": self.failed}


def _outcome(why: str) -> str:
    """
    A failure's label for the metrics (a few fixed values).
    """
    if why.startswith("timed out"):
        return "timeout"
    if why.startswith("the client"):
        return "client_error"
    if "stopping" in why:
        return "stopped"
    return "error"


class SessionProtocol:
    """
    A transfer's socket: packets from the client go to its session.
    """

    def __init__(self) -> None:
        self.transfer: Optional[Transfer] = None
        self.server: Optional[TftpServer] = None
        # Where packets go: nowhere while the file opens (the client sends nothing
        # before the first DATA or OACK), then straight to the session.
        self.deliver: Callable[[bytes], None] = lambda datagram: None

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        As L{deliver} (the socket is connected: C{addr} is the client).
        """
        self.deliver(datagram)

    def connectionRefused(self) -> None:
        """
        The client's port is gone (ICMP port unreachable): end the transfer.
        """
        transfer = self.transfer
        if transfer is not None and transfer.session is not None:
            transfer.session.stop("the client went away", notify=False)

    def failed(self, error: OSError) -> None:
        """
        Sending failed for another reason: end the transfer.
        """
        transfer = self.transfer
        if transfer is not None and transfer.session is not None:
            transfer.session.stop(f"cannot send: {error.strerror}", notify=False)


@implementer(IReadDescriptor)
class SessionPorts:
    """
    The reactor's transfer sockets behind one descriptor the reactor watches: an
    epoll set of their own, read when it is readable, each ready socket handed its
    packets in turn. With many transfers at once the reactor then dispatches once a
    turn, not once a socket (its dispatch, with its log context, was as long as a
    session's work on a packet).
    """

    log = Logger()

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.epoll = select.epoll()
        self.ports: dict[int, "UdpSessionPort"] = {}

    def fileno(self) -> int:
        """
        The epoll set's descriptor.
        """
        return self.epoll.fileno()

    def logPrefix(self) -> str:
        """
        How the reactor names this descriptor in logs.
        """
        return "TFTP transfers"

    def add(self, port: "UdpSessionPort") -> None:
        """
        Read C{port} (watched from now on).
        """
        if not self.ports:
            self.reactor.addReader(self)
        self.epoll.register(port._fileno, select.EPOLLIN)
        self.ports[port._fileno] = port

    def remove(self, port: "UdpSessionPort") -> None:
        """
        No longer read C{port} (before its socket closes or goes to a thread).
        """
        if self.ports.pop(port._fileno, None) is None:
            return
        try:
            self.epoll.unregister(port._fileno)
        except OSError:
            # Its socket was closed already (not by us): the kernel dropped it
            # from the set with its last descriptor; nothing is left to unregister.
            pass
        if not self.ports:
            self.reactor.removeReader(self)

    def doRead(self) -> None:
        """
        Hand each ready socket its packets; a socket whose reading fails is closed
        (and its transfer ends), the others go on.
        """
        for fd, _ in self.epoll.poll(0):
            port = self.ports.get(fd)
            if port is None:
                continue
            try:
                port.doRead()
            except Exception:
                self.log.failure("TFTP transfer socket failed")
                port.protocol.failed(OSError(0, "internal error"))
                port.close()

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the epoll set (it stops): every socket closes.
        """
        for port in list(self.ports.values()):
            port.close()


@implementer(IReadDescriptor)
class UdpSessionPort:
    """
    A transfer's socket on the real reactor: an ephemeral port connected to the
    client, read through L{SessionPorts} (or by the reactor directly without one; no
    C{udp.Port}: that logs two lines per socket, which is per transfer here).
    """

    def __init__(
        self,
        reactor: Any,
        client: Address,
        protocol: "SessionProtocol",
        ports: Optional[SessionPorts] = None,
    ) -> None:
        self.reactor = reactor
        self.client = client
        self.protocol = protocol
        self.ports = ports
        family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_DGRAM)
        self.closed = False
        try:
            self.socket.setblocking(False)
            self.socket.bind(("", 0))
            self.socket.connect(client)
            try:
                self.mtu = self.socket.getsockopt(socket.IPPROTO_IP, IP_MTU)
            except OSError:
                self.mtu = 0
        except BaseException:
            self.socket.close()
            raise
        self._fileno = self.socket.fileno()
        self.detached = False
        if ports is not None:
            ports.add(self)
        else:
            reactor.addReader(self)

    def fileno(self) -> int:
        """
        The socket's descriptor (-1 once closed).
        """
        return -1 if self.closed else self._fileno

    def logPrefix(self) -> str:
        """
        How the reactor names this socket in logs.
        """
        return "TFTP transfer"

    def doRead(self) -> None:
        """
        Hand waiting packets to the protocol (a bounded batch per turn).
        """
        recv = self.socket.recv
        deliver = self.protocol.deliver
        for _ in range(64):
            if self.closed:
                return
            try:
                data = recv(codec.MAX_CLIENT_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                self.protocol.connectionRefused()
                return
            except OSError as e:
                self.protocol.failed(e)
                return
            deliver(data)

    def connectionLost(self, reason: Failure) -> None:
        """
        The reactor dropped the socket.
        """
        self.close()

    def send(self, data: bytes) -> None:
        """
        Send to the client. A full socket buffer or an oversized packet drops the
        packet (the timeout sends it again); a refusal (ICMP port unreachable) ends
        the transfer, after this call.
        """
        if self.closed:
            return
        try:
            self.socket.send(data)
        except (BlockingIOError, InterruptedError):
            pass
        except ConnectionRefusedError:
            self.reactor.callLater(0, self.protocol.connectionRefused)
        except OSError as e:
            self.reactor.callLater(0, self.protocol.failed, e)

    def detach(self) -> socket.socket:
        """
        Hand the socket to a transfer thread: the reactor no longer reads it, this
        port no longer sends, and L{close} leaves it to the thread.
        """
        if not self.closed:
            self._unwatch()
            self.closed = self.detached = True
        return self.socket

    def _unwatch(self) -> None:
        if self.ports is not None:
            self.ports.remove(self)
        else:
            self.reactor.removeReader(self)

    def close(self) -> None:
        """
        Close the socket.
        """
        if not self.closed:
            self._unwatch()
            self.closed = True
            self.socket.close()


class TftpProtocol(DatagramProtocol):
    """
    Port 69: every packet goes to the server.
    """

    noisy = False

    def __init__(self, server: TftpServer) -> None:
        self.server = server

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        """
        A request (or anything else) from a client.
        """
        client = (addr[0], addr[1])
        transport = self.transport
        assert transport is not None
        self.server.request(datagram, client, lambda data: transport.write(data, client))


def session_ports(reactor: Any) -> Callable[[Address, SessionProtocol], ISessionPort]:
    """
    The real L{TftpServer.open_port}.
    """
    ports = SessionPorts(reactor)
    return lambda client, protocol: UdpSessionPort(reactor, client, protocol, ports)
