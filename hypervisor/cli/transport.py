# -*- test-case-name: tests.test_vm_control -*-
"""
How C{vm-control} and C{hyper-control} reach a hypervisor: a small L{Transport}
interface and its implementations, chosen with C{-transport}.

A transport calls C{Hypervisor.<Method>} with the request's JSON bytes (Go-exact, from
L{hypervisor.codec}) and optional raw bytes following it (uploads), and returns the
JSON bytes of the final reply; for streams, every message before the last goes to
C{on_message}. It raises L{ClientError} when the call could not be made or was
refused (unreachable, TLS, access denied, an error line); a reply carrying an
C{Error} field is returned, and the caller decides (as Go's tools do per command).

 - L{HttpsTransport}: C{POST /rpc/Hypervisor.<Method>} over HTTPS with a client
   certificate (NDJSON replies): this project's own HTTP API.
 - C{srpc}: SmallStack's SRPC (C{CONNECT /_SRPC_/TLS/JSON}) through
   L{hypervisor.srpc.client}: what the Go hypervisor and fleet-manager speak.
 - C{pb}: this hypervisor's Perspective Broker service (port 8787, or
   C{-pbEndpoint}) through L{hypervisor.client} (L{hypervisor.cli.pb_transport}).
"""

from __future__ import annotations

import io
import json
from typing import IO, Any, Callable, Optional, Protocol

from hypervisor.cli.client import (
    CertPair,
    ClientError,
    ClientTLSPolicy,
    ConcatFile,
    _describe,
    find_certificates,
)

Tail = tuple[list[IO[bytes]], list[int]]
OnMessage = Callable[[bytes], None]

TRANSPORTS = ("srpc", "https", "pb")

# Streams of progress messages ending with a Final (or Error) one.
PROGRESS_STREAMS = frozenset(
    {"CreateVm", "ReplaceVmImage", "DebugVmImage", "PatchVmImage", "CopyVm", "MigrateVm"}
)
# Streams with no final message: each message is given to on_message when it arrives.
ENDLESS_STREAMS = frozenset({"GetUpdates", "WatchDhcp", "TraceVmMetadata"})


class Transport(Protocol):
    """
    Calls to one hypervisor (or fleet manager).
    """

    description: str
    address: str  # host:port

    async def call(
        self,
        method: str,
        request: bytes,
        tail: Optional[Tail] = None,
        on_message: Optional[OnMessage] = None,
    ) -> bytes:
        """
        Call C{method} (C{"Hypervisor.ListVMs"}); return the final reply's JSON (b""
        when an endless stream ended). An empty C{request} sends no request message
        where the protocol allows (SRPC's GetUpdates).
        """

    async def call_download(self, method: str, request: bytes) -> tuple[bytes, bytes]:
        """
        A call answered with a JSON reply carrying C{Length}, then that many raw
        bytes (GetVmUserData): the reply's JSON and the bytes (none if it has an Error).
        """

    def close(self) -> None:
        """
        Drop any connection kept open.
        """


MAX_DOWNLOAD = 64 << 20


def split_download(body: bytes) -> tuple[bytes, bytes]:
    """
    A download's body: the JSON line, then C{Length} raw bytes.

    @raise ClientError: no JSON line, or fewer bytes than C{Length}.
    """
    line, sep, rest = body.partition(b"\n")
    if not sep:
        raise ClientError(f"malformed download: {body[:200]!r}")
    if error_of(line):
        return line, b""
    try:
        length = int(json.loads(line).get("Length") or 0)
    except (ValueError, AttributeError):
        raise ClientError(f"malformed download reply: {line[:200]!r}") from None
    if len(rest) < length:
        raise ClientError(f"the download ended after {len(rest)} of {length} bytes")
    return line, rest[:length]


def best_certificate(cert_directory: str) -> Optional[CertPair]:
    """
    The certificate the tools present: the widest grants, then the latest expiry.
    """
    pairs = find_certificates(cert_directory)
    return pairs[0] if pairs else None


def error_of(reply: bytes) -> str:
    """
    The C{Error} field of a JSON reply ("" if none or not an object).
    """
    try:
        value = json.loads(reply)
    except ValueError:
        return ""
    if isinstance(value, dict):
        error = value.get("Error")
        return error if isinstance(error, str) else ""
    return ""


class HttpsTransport:
    """
    This project's HTTPS JSON API: C{POST https://host:port/rpc/<Method>}.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        pair: Optional[CertPair],
        ca_file: str,
    ) -> None:
        import treq
        from twisted.web.client import Agent, HTTPConnectionPool

        self.host = host
        self.port = port
        self.address = self._netloc()
        self.description = f"https://{self.address}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, contextFactory=ClientTLSPolicy(pair, ca_file), pool=pool)
        self.http = treq.client.HTTPClient(agent)

    def _netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def url(self, method: str) -> str:
        """
        The URL of a method (C{Hypervisor.ListVMs}).
        """
        return f"https://{self._netloc()}/rpc/{method}"

    async def call(
        self,
        method: str,
        request: bytes,
        tail: Optional[Tail] = None,
        on_message: Optional[OnMessage] = None,
    ) -> bytes:
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        line = (request or b"{}") + b"\n"
        body: Any
        if tail is None:
            body = io.BytesIO(line)
        else:
            parts, sizes = tail
            body = ConcatFile([io.BytesIO(line)] + parts, [len(line)] + sizes)
        try:
            response = await self.http.post(
                self.url(method),
                data=FileBodyProducer(body),
                headers=Headers({b"Content-Type": [b"application/json"]}),
                unbuffered=True,
            )
        except Exception as e:  # noqa: BLE001 - shown to the user
            raise ClientError(
                f"cannot reach the hypervisor at {self._netloc()}: {_describe(e)}"
            ) from None
        messages: list[bytes] = []
        buffer = [b""]
        endless = response.code == 200 and method.rpartition(".")[2] in ENDLESS_STREAMS

        def collect(data: bytes) -> None:
            buffer[0] += data
            while b"\n" in buffer[0]:
                raw, buffer[0] = buffer[0].split(b"\n", 1)
                if not raw.strip():
                    continue
                if endless and on_message is not None:
                    on_message(raw)
                    continue
                if messages and on_message is not None:
                    on_message(messages[-1])
                messages.append(raw)

        await response.collect(collect)
        if buffer[0].strip():
            messages.append(buffer[0])
        if endless:
            return messages[-1] if messages else b""
        if not messages:
            raise ClientError(f"empty answer from the hypervisor (HTTP {response.code})")
        last = messages[-1]
        if response.code != 200:
            raise ClientError(error_of(last) or f"HTTP {response.code}")
        return last

    async def call_download(self, method: str, request: bytes) -> tuple[bytes, bytes]:
        """
        The reply's JSON line, then C{Length} raw bytes, in one HTTP body (bounded).
        """
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        try:
            response = await self.http.post(
                self.url(method),
                data=FileBodyProducer(io.BytesIO(request + b"\n")),
                headers=Headers({b"Content-Type": [b"application/json"]}),
                unbuffered=True,
            )
        except Exception as e:  # noqa: BLE001 - shown to the user
            raise ClientError(
                f"cannot reach the hypervisor at {self._netloc()}: {_describe(e)}"
            ) from None
        chunks: list[bytes] = []
        size = [0]

        def collect(data: bytes) -> None:
            size[0] += len(data)
            if size[0] > MAX_DOWNLOAD:
                raise ClientError(f"download larger than {MAX_DOWNLOAD} bytes")
            chunks.append(data)

        await response.collect(collect)
        body = b"".join(chunks)
        if response.code != 200:
            raise ClientError(error_of(body.split(b"\n", 1)[0]) or f"HTTP {response.code}")
        return split_download(body)

    def close(self) -> None:
        """
        Nothing is kept open (connections are not persistent).
        """


def srpc_available() -> bool:
    """
    Whether the SRPC client library is present.
    """
    try:
        import hypervisor.srpc.client  # noqa: F401
    except ImportError:
        return False
    return True


def make_transport(
    name: str,
    reactor: Any,
    host: str,
    port: int,
    pair: Optional[CertPair],
    ca_file: str,
    do_not_use_method_powers: bool = False,
    pb_endpoint: str = "",
) -> Transport:
    """
    The transport called C{name} (C{srpc}, C{https} or C{pb}) to C{host:port}; for
    C{pb}, to C{pb_endpoint} (a Twisted client endpoint string) or C{host}'s port 8787.

    @raise ClientError: an unknown name, or SRPC without its client library.
    """
    if name == "https":
        return HttpsTransport(reactor, host, port, pair, ca_file)
    if name == "pb":
        from hypervisor.cli.pb_transport import PbTransport, default_endpoint

        endpoint = pb_endpoint or default_endpoint(host)
        return PbTransport(reactor, endpoint, pair, ca_file, host if not pb_endpoint else "")
    if name == "srpc":
        from hypervisor.cli.srpc_transport import SrpcTransport

        return SrpcTransport(reactor, host, port, pair, do_not_use_method_powers, ca_file)
    raise ClientError(f"unknown transport {name!r} (use one of {', '.join(TRANSPORTS)})")
