# -*- test-case-name: tests.test_tftp_service -*-
"""
The named service C{tftp}: the TFTP server on UDP port C{-tftpPortNum} (69), bound
in C{privilegedStartService} (before twistd drops root), with its own small thread
pool for file reads so large transfers never wait behind state writes, and up to
C{transfer_threads} (C{-tftpTransferThreads}) transfers at a time each on a thread
of its own (L{hypervisor.tftp.threaded}): one that starts when no other transfer is
in progress (see L{hypervisor.tftp.protocol}). Such a thread polls for the client's
next ACK for C{spin_microseconds} (C{-tftpSpinMicroseconds}) before it sleeps.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from hypervisor.diskio import ThreadPoolRunner
from hypervisor.tftp import codec
from hypervisor.tftp.backend import DirectoryBackend, TftpBackend
from hypervisor.tftp.protocol import (
    SERVER_PORT,
    ITftpStats,
    TftpProtocol,
    TftpServer,
    session_ports,
)
from hypervisor.tftp.threaded import TransferThreads


class TftpService(Service):
    """
    The TFTP server's socket and thread pool around one L{TftpServer}.

    @ivar port: the listening port once started (C{None} before, or when binding
        failed: L{problem} says why; the daemon runs on without TFTP).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        files_for: Callable[[str], Mapping[str, bytes]] = lambda ip: {},
        directory: str = "",
        port: int = SERVER_PORT,
        interface: str = "",
        stats: Optional[ITftpStats] = None,
        max_blksize: int = codec.MAX_DATA,
        max_windowsize: int = 64,
        threads: int = 2,
        transfer_threads: int = 16,
        spin_microseconds: int = 200,
        enabled: bool = True,
    ) -> None:
        self.reactor = reactor
        self.runner = ThreadPoolRunner(reactor, "tftp", size=threads)
        self.transfer_threads = TransferThreads(
            reactor, transfer_threads, spin=spin_microseconds / 1e6
        )
        self.directory = directory
        backend = TftpBackend(
            files_for, DirectoryBackend(directory, self.runner) if directory else None
        )
        self.server = TftpServer(
            backend,
            reactor,
            session_ports(reactor),
            stats=stats,
            max_blksize=max_blksize,
            max_windowsize=max_windowsize,
            threads=self.transfer_threads,
        )
        self.port_number = port
        self.interface = interface
        self.port: Optional[IListeningPort] = None
        self.problem = "" if enabled else "off (-tftpPortNum=0)"
        self.enabled = enabled

    def privilegedStartService(self) -> None:
        """
        Bind the port (as root).
        """
        super().privilegedStartService()
        self._bind()

    def _bind(self) -> None:
        if self.port is not None or not self.enabled:
            return
        try:
            self.port = self.reactor.listenUDP(
                self.port_number,
                TftpProtocol(self.server),
                interface=self.interface,
                maxPacketSize=codec.MAX_PACKET,
            )
        except Exception as e:  # CannotListenError: say so, run on without TFTP
            self.problem = f"cannot listen on UDP port {self.port_number}: {e}"
            self.log.error("TFTP: {problem}", problem=self.problem)
            return
        self.problem = ""
        self.log.info(
            "TFTP: serving UDP port {port} (files from {where})",
            port=self.bound_port,
            where=self.directory or "NetbootMachine only: no -tftpbootDirectory",
        )

    @property
    def bound_port(self) -> Optional[int]:
        """
        The UDP port number listened on (C{None} when not listening).
        """
        if self.port is None:
            return None
        port: int = getattr(self.port.getHost(), "port")
        return port

    def startService(self) -> None:
        """
        Start the thread pool; bind if not done yet.
        """
        super().startService()
        self.runner.startService()
        self.server.stopping = False
        self._bind()

    def stopService(self) -> "Deferred[Any]":
        """
        End the transfers, close the port, stop the threads (once every transfer
        thread has ended).
        """
        super().stopService()
        self.server.stop()
        port, self.port = self.port, None
        stopped = port.stopListening() if port is not None else None
        d = stopped if isinstance(stopped, Deferred) else succeed(None)
        d.addCallback(lambda _: self.transfer_threads.idle())
        return d.addCallback(lambda _: self.runner.stopService())

    def status(self) -> dict[str, Any]:
        """
        What the status page shows.
        """
        status = self.server.status()
        status["port"] = self.bound_port
        status["problem"] = self.problem
        status["directory"] = self.directory
        return status
