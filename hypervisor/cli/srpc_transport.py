# -*- test-case-name: tests.test_vm_control_srpc -*-
"""
The SRPC transport of C{vm-control} and C{hyper-control}: L{hypervisor.srpc.client}
(a blocking client that connects as Go's does) run in a thread of the reactor's pool,
one connection per hypervisor kept for the run's calls (as Go's tools make
C{GetVmInfo} then C{StopVm} on one connection).

Which methods stream is decided here from the method name: progress streams
(C{CreateVm}...) end at a C{Final} or C{Error} message; C{GetUpdates} and
C{WatchDhcp} go on until the server closes or the caller's C{on_message} raises; the
rest are request/reply (with raw bytes after the request when a tail is given).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
from typing import Any, Callable, Optional

from twisted.internet.threads import deferToThread

from hypervisor.cli.client import CertPair, ClientError
from hypervisor.cli.transport import ENDLESS_STREAMS, PROGRESS_STREAMS, OnMessage, Tail
from hypervisor.srpc import client as srpc

CONNECT_TIMEOUT = 60.0


def _dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


class SrpcTransport:
    """
    SmallStack's SRPC (C{CONNECT /_SRPC_/TLS/JSON}, TLS, JSON) to one server.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        pair: Optional[CertPair],
        do_not_use_method_powers: bool = False,
        ca_file: str = "",
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.pair = pair
        self.ca_file = ca_file if ca_file and os.path.exists(ca_file) else None
        self.do_not_use_method_powers = do_not_use_method_powers
        self.address = f"{host}:{port}"
        self.description = f"srpc://{self.address}"
        self._connection: Optional[srpc.Connection] = None
        # MigrateVm's answer to RequestCommit (vm-control migrate-vm sets it).
        self.on_commit: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None

    def _connect(self) -> srpc.Connection:
        if self._connection is None or self._connection.closed:
            self._connection = srpc.connect(
                self.host,
                self.port,
                cert=self.pair.cert_path if self.pair else None,
                key=self.pair.key_path if self.pair else None,
                ca=self.ca_file,
                timeout=CONNECT_TIMEOUT,
                do_not_use_method_powers=self.do_not_use_method_powers,
            )
        return self._connection

    def _call(
        self, method: str, request: bytes, tail: Optional[Tail], on_message: Optional[OnMessage]
    ) -> bytes:
        """
        The blocking call (in a pool thread).
        """
        short = method.rpartition(".")[2]
        uploads = list(zip(*tail)) if tail else []
        try:
            connection = self._connect()
            if short == "MigrateVm":
                return self._migrate(connection, method, request, on_message)
            if short in PROGRESS_STREAMS:
                last: Optional[dict[str, Any]] = None
                for message in connection.call_stream(method, request, uploads):
                    if last is not None and on_message is not None:
                        on_message(_dumps(last))
                    last = message
                return _dumps(last or {})
            if short in ENDLESS_STREAMS:
                connection.sock.settimeout(None)
                call = connection.open(method)
                if request:
                    call.send(request)
                while True:
                    try:
                        message = call.receive()
                    except srpc.SrpcError as e:
                        if str(e) == "EOF":
                            return b""
                        raise
                    if on_message is not None:
                        on_message(_dumps(message))
            if uploads:
                return _dumps(connection.call_upload(method, request, uploads))
            return _dumps(connection.call(method, request))
        except srpc.SrpcError as e:
            self._drop()
            raise ClientError(str(e) or type(e).__name__) from None
        except (OSError, ssl.SSLError, socket.timeout) as e:
            self._drop()
            raise ClientError(
                f"cannot reach {self.host}:{self.port} over SRPC: {e.strerror or e}"
                if isinstance(e, OSError) and e.strerror
                else f"cannot reach {self.host}:{self.port} over SRPC: {e}"
            ) from None

    def _migrate(
        self,
        connection: srpc.Connection,
        method: str,
        request: bytes,
        on_message: Optional[OnMessage],
    ) -> bytes:
        """
        MigrateVm: its progress, and the answer to C{RequestCommit} from
        C{on_commit} (vm-control's prompt) sent mid-stream, as Go's client does.
        """
        connection.sock.settimeout(None)  # the target copies volumes meanwhile
        call = connection.open(method)
        call.send(request)
        while True:
            message = call.receive()
            if message.get("Error") or message.get("Final"):
                return _dumps(message)
            if on_message is not None:
                on_message(_dumps(message))
            if message.get("RequestCommit"):
                answer = self.on_commit(message) if self.on_commit else {"Commit": False}
                call.send(answer)

    async def call(
        self,
        method: str,
        request: bytes,
        tail: Optional[Tail] = None,
        on_message: Optional[OnMessage] = None,
    ) -> bytes:
        """
        Call C{method} in a pool thread; see L{hypervisor.cli.transport.Transport}.
        """
        result: bytes = await deferToThread(self._call, method, request, tail, on_message)
        return result

    def _download(self, method: str, request: bytes) -> tuple[bytes, bytes]:
        try:
            reply, data = self._connect().call_download(method, request, length_field="Length")
        except srpc.SrpcError as e:
            self._drop()
            raise ClientError(str(e) or type(e).__name__) from None
        except (OSError, ssl.SSLError, socket.timeout) as e:
            self._drop()
            raise ClientError(f"cannot reach {self.host}:{self.port} over SRPC: {e}") from None
        return _dumps(reply), data

    async def call_download(self, method: str, request: bytes) -> tuple[bytes, bytes]:
        """
        A reply with C{Length} raw bytes after it, in a pool thread.
        """
        result: tuple[bytes, bytes] = await deferToThread(self._download, method, request)
        return result

    def _drop(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def close(self) -> None:
        """
        Close the connection; safe from the reactor thread while a pool thread is
        blocked reading it (the read then fails and the thread ends).
        """
        connection = self._connection
        if connection is None:
            return
        try:
            connection.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
