# -*- test-case-name: tests.test_srpc_real -*-
"""
A blocking SRPC client (TLS + JSON) that behaves as SmallStack's Go client does
(lib/srpc/client.go, reference §12), for the tests and for our C{vm-control} and
C{hyper-control}. Standard library only (C{socket}, C{ssl}); use it from a thread
(C{deferToThread}) inside a Twisted program.

API::

    from hypervisor.srpc.client import connect, SrpcError

    client = connect("127.0.0.1", 6976, cert="user.cert", key="user.key", ca=None)
    # Request/reply: a dict (or a codec dataclass) in, the reply dict out. A reply's
    # non-empty "Error" is NOT raised (Go prints it): check reply.get("Error").
    reply = client.call("GetVmInfo", {"IpAddress": "10.0.0.2"})
    # Streams with uploads: CreateVm's progress messages until Final (or Error).
    # Each upload is (file object or bytes, size); files are sent in 1 MiB pieces.
    for message in client.call_stream("CreateVm", request, uploads=[(image, size), (b"ud", 2)]):
        print(message.get("ProgressMessage"))
    # GetUpdates: the stream object; receive() the next Update, ping() sends a
    # GetUpdatesRequest (answered with one Update).
    updates = client.get_updates()
    first = updates.receive(timeout=30)
    updates.ping()
    # A server->client raw download after a response ({"Length": n} style):
    info, data = client.call_download("GetVmUserData", {"IpAddress": ip}, length_field="Length")
    client.close()

    # Lower level: one call at a time on the connection.
    call = client.open("Hypervisor.X")      # method line, waits for the "\\n"
    call.send({...}); call.send_raw(b"...")  # JSON values, raw bytes
    call.receive_reply()                    # "\\n" + JSON (request/reply)
    call.receive()                          # a bare JSON value (streams)
    call.read_raw(n)                        # raw bytes after a response

Errors: L{SrpcError} for a refused method line or a failed call (its text is the
server's error line: C{"access to method denied"}, ...), L{NoSrpcEndpoint} when every
endpoint answered 404, L{ConnectRefused} for another CONNECT status (C{401} is "bad
certificate" as Go says), C{OSError}/C{ssl.SSLError}/C{socket.timeout} for the
network. After an error line the server has closed the connection: connect again.

How it connects, as Go does: endpoints C{/_go_TLS_SRPC_/}, C{/_SRPC_/TLS/JSON},
C{/_goSRPC_/}, C{/_SRPC_/unsecured/JSON} in that order (the gob ones answered 404
by a JSON-only server), a new TCP connection per try, only a 404 advancing; TLS
starts after the C{200 Connected to Go SRPC} head on the same socket; the server's
certificate is verified only when C{ca} is given (Go never verifies it); if the
plaintext CONNECT gets a malformed answer, the client retries with TLS first and
CONNECT inside it. TCP_NODELAY is set. Each call gets a new JSON decoder; with
C{go_readahead=True} the decoder reads ahead as Go's encoding/json does (up to 512
bytes beyond what it needs, lost when the call ends), so that tests see what a Go
client would lose when a server sends raw bytes in the same TLS record as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import select
import socket
import ssl
import time
from typing import IO, Any, Iterable, Iterator, Optional, Union

from hypervisor import codec
from hypervisor.srpc.codec import (
    ENDPOINTS_WITH_CERTS,
    SRPC_TLS_JSON,
    SRPC_UNSECURED_JSON,
    connect_line,
    head_complete,
    method_line,
    status_line,
)

PREFIX = "Hypervisor."
READ_AHEAD = 512
RECORD = 16384
CHUNK = 1 << 20
MAX_MESSAGE = 64 << 20
Upload = tuple[Union[bytes, IO[bytes]], int]


class SrpcError(Exception):
    """
    The server refused the method or failed the call; the message is its text.
    """


class NoSrpcEndpoint(SrpcError):
    """
    Every endpoint answered 404 (Go: C{no SRPC endpoint}).
    """


class ConnectRefused(SrpcError):
    """
    A CONNECT got a status other than 200 or 404.

    @ivar status: the status text (C{"401 Unauthorized"}).
    """

    def __init__(self, status: str) -> None:
        self.status = status
        text = (
            "bad certificate" if status.startswith("401") else f"unexpected HTTP response: {status}"
        )
        if status.startswith("405"):
            text = "missing certificate"
        super().__init__(text)


def _encode(request: Any) -> bytes:
    if request is None:
        return b"{}"
    if dataclasses.is_dataclass(request) and not isinstance(request, type):
        return codec.encode(request)
    if isinstance(request, (bytes, bytearray)):
        return bytes(request)
    return json.dumps(request, separators=(",", ":")).encode("utf-8")


def full_name(method: str) -> str:
    """
    C{"ListVMs"} -> C{"Hypervisor.ListVMs"}; names with a dot are kept.
    """
    return method if "." in method else PREFIX + method


class Connection:
    """
    One SRPC connection (after CONNECT and TLS), carrying calls one after another.

    @ivar endpoint: the endpoint it connected to.
    @ivar attempts: the CONNECT statuses seen, in order (C{[(path, status)]}).
    """

    def __init__(
        self, sock: socket.socket, endpoint: str, go_readahead: bool, timeout: Optional[float]
    ) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.go_readahead = go_readahead
        self.timeout = timeout
        self.attempts: list[tuple[str, str]] = []
        self._buffer = bytearray()  # the connection's bufio.Reader
        self.closed = False

    # Reading --------------------------------------------------------------------------

    def _recv(self) -> bytes:
        data = self.sock.recv(RECORD)  # at most one TLS record, as tls.Conn.Read
        if not data:
            raise SrpcError("EOF")
        return data

    def _fill(self) -> None:
        if not self._buffer:
            self._buffer += self._recv()

    def read_exactly(self, n: int) -> bytes:
        """
        Exactly C{n} bytes from the connection.
        """
        take = min(n, len(self._buffer))
        out = bytearray(self._buffer[:take])
        del self._buffer[:take]
        if take == n:
            return bytes(out)
        # The rest straight from the socket into place (a raw tail can be megabytes):
        # never past n, so nothing of what follows is taken.
        out.extend(bytes(n - take))
        view = memoryview(out)
        got = take
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if not k:
                raise SrpcError("EOF")
            got += k
        view.release()
        return bytes(out)

    def read_line(self, limit: int = MAX_MESSAGE) -> bytes:
        """
        One line from the connection, without its newline.
        """
        while True:
            i = self._buffer.find(b"\n")
            if i >= 0:
                line = bytes(self._buffer[:i])
                del self._buffer[: i + 1]
                return line
            if len(self._buffer) > limit:
                raise SrpcError(f"line longer than {limit} bytes")
            self._buffer += self._recv()

    def pending(self) -> bool:
        """
        Whether bytes wait (buffered or on the socket).
        """
        if self._buffer:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        return bool(select.select([self.sock], [], [], 0)[0])

    # Writing --------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """
        Send bytes.
        """
        self.sock.sendall(data)

    # Calls ----------------------------------------------------------------------------

    def open(self, method: str) -> "Call":
        """
        Start a call: the method line, then the server's accept line.

        @raise SrpcError: refused (the text of its line).
        """
        self.write(method_line(full_name(method)))
        line = self.read_line()
        if line:
            raise SrpcError(line.decode("utf-8", "replace"))
        return Call(self)

    def ping(self) -> None:
        """
        The empty method line; the server answers an empty line.
        """
        self.write(b"\n")
        line = self.read_line()
        if line:
            raise SrpcError(line.decode("utf-8", "replace"))

    def call(self, method: str, request: Any = None) -> dict[str, Any]:
        """
        A request/reply call: the reply as a dict (check its C{"Error"}).
        """
        call = self.open(method)
        call.send(request)
        return call.receive_reply()

    def call_upload(self, method: str, request: Any, uploads: Iterable[Upload]) -> dict[str, Any]:
        """
        A request/reply call whose request is followed by raw bytes
        (ReplaceVmUserData).
        """
        call = self.open(method)
        call.send(request)
        for data, size in uploads:
            call.send_raw(data, size)
        return call.receive_reply()

    def call_stream(
        self, method: str, request: Any = None, uploads: Iterable[Upload] = ()
    ) -> Iterator[dict[str, Any]]:
        """
        A progress stream (CreateVm, ReplaceVmImage...): send the request and the
        uploads, then yield messages until one is C{Final} or carries an C{Error}.
        """
        call = self.open(method)
        call.send(request)
        for data, size in uploads:
            call.send_raw(data, size)
        while True:
            message = call.receive()
            yield message
            if message.get("Error") or message.get("Final"):
                return

    def call_download(
        self, method: str, request: Any = None, length_field: str = "Length"
    ) -> tuple[dict[str, Any], bytes]:
        """
        A call answered with a JSON message and then C{message[length_field]} raw
        bytes (GetVmUserData, GetVmLastPatchLog).
        """
        call = self.open(method)
        call.send(request)
        message = call.receive()
        if message.get("Error"):
            return message, b""
        return message, call.read_raw(int(message.get(length_field) or 0))

    def get_updates(self) -> "Call":
        """
        Start GetUpdates: L{Call.receive} the Updates (the first one full),
        L{Call.ping} to ask for one.
        """
        return self.open("GetUpdates")

    def close(self) -> None:
        """
        Close the connection.
        """
        if self.closed:
            return
        self.closed = True
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                self.sock.settimeout(1.0)
                self.sock.unwrap()
        except (OSError, ValueError):
            pass
        self.sock.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Call:
    """
    One call in progress. Like Go's, each call has its own JSON decoder: with
    C{go_readahead} what it read beyond the values it decoded is lost at the end.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._decoder = bytearray()

    def send(self, request: Any) -> None:
        """
        A JSON value and its newline (Go's json.Encoder).
        """
        self.connection.write(_encode(request) + b"\n")

    def ping(self) -> None:
        """
        GetUpdates' keepalive: an empty GetUpdatesRequest.
        """
        self.send({"RegisterExternalLeasesRequest": None})

    def send_raw(self, data: Union[bytes, IO[bytes]], size: int) -> None:
        """
        C{size} raw bytes, from bytes or a file (read in 1 MiB pieces).
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) != size:
                raise ValueError(f"{len(data)} bytes given for an upload of {size}")
            self.connection.write(bytes(data))
            return
        left = size
        while left:
            chunk = data.read(min(CHUNK, left))
            if not chunk:
                raise ValueError(f"the file ended {left} bytes before the upload's size")
            self.connection.write(chunk)
            left -= len(chunk)

    def _decoder_line(self) -> bytes:
        connection = self.connection
        if not connection.go_readahead:
            return connection.read_line()
        while True:
            i = self._decoder.find(b"\n")
            if i >= 0:
                line = bytes(self._decoder[:i])
                del self._decoder[: i + 1]
                return line
            if len(self._decoder) > MAX_MESSAGE:
                raise SrpcError("message too long")
            # encoding/json's refill: read what the bufio.Reader has, at least 512
            # bytes of room; bufio refills from one TLS record.
            connection._fill()
            take = min(READ_AHEAD, len(connection._buffer))
            self._decoder += connection._buffer[:take]
            del connection._buffer[:take]

    def _value_line(self) -> bytes:
        while True:  # a JSON decoder skips whitespace between values
            line = self._decoder_line()
            if line.strip():
                return line

    def receive(self, timeout: Optional[float] = None) -> dict[str, Any]:
        """
        The next bare JSON value (stream messages); blank lines before it are
        skipped, as Go's decoder skips whitespace.

        @raise socket.timeout: nothing within C{timeout} seconds.
        """
        sock = self.connection.sock
        if timeout is not None:
            old = sock.gettimeout()
            sock.settimeout(timeout)
            try:
                return self._parse(self._value_line())
            finally:
                sock.settimeout(old)
        return self._parse(self._value_line())

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any]:
        try:
            value = json.loads(line)
        except ValueError:
            raise SrpcError(line.decode("utf-8", "replace")) from None
        if not isinstance(value, dict):
            raise SrpcError(f"not a JSON object: {line[:200]!r}")
        return value

    def receive_reply(self) -> dict[str, Any]:
        """
        A request/reply answer: C{"\\n"} then the JSON, or an error line.

        @raise SrpcError: the error line (the server closes the connection after it).
        """
        line = self._decoder_line()
        if line:
            # Go's client: a non-empty status line is the error.
            raise SrpcError(line.decode("utf-8", "replace"))
        return self._parse(self._decoder_line())

    def read_raw(self, n: int) -> bytes:
        """
        C{n} raw bytes after a response. In Go-read-ahead mode, what this call's
        decoder swallowed is not seen (and the read waits for bytes that will not
        come, as Go's client hangs).
        """
        return self.connection.read_exactly(n)


def _tls_context(cert: Optional[str], key: Optional[str], ca: Optional[str]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        context.load_verify_locations(ca)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # as Go's InsecureSkipVerify
    if cert:
        context.load_cert_chain(cert, key)
    return context


def _read_head(sock: socket.socket, limit: int = 4096) -> bytes:
    data = b""
    while head_complete(data) < 0:
        chunk = sock.recv(1)  # never read past the head: TLS follows
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    return data


def _dial(host: str, port: int, timeout: Optional[float]) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(
    host: str,
    port: int = 6976,
    cert: Optional[str] = None,
    key: Optional[str] = None,
    ca: Optional[str] = None,
    *,
    timeout: Optional[float] = 60.0,
    do_not_use_method_powers: bool = False,
    endpoints: Optional[tuple[str, ...]] = None,
    go_readahead: bool = False,
) -> Connection:
    """
    Connect as Go's client does (module docstring) and return the L{Connection}.

    @param cert: client certificate PEM file (with C{key}); without one only the
        unsecured endpoint can work (as Go, the TLS endpoints are still tried).
    @param ca: verify the server's certificate against this file (Go never does).
    @raise NoSrpcEndpoint: every endpoint answered 404.
    @raise ConnectRefused: another status.
    """
    context = _tls_context(cert, key, ca)
    attempts: list[tuple[str, str]] = []
    for path in endpoints or ENDPOINTS_WITH_CERTS:
        tls = "TLS" in path
        sock = _dial(host, port, timeout)
        try:
            sock.sendall(connect_line(path, do_not_use_method_powers))
            head = _read_head(sock)
            try:
                status = status_line(head)
            except ValueError:
                sock.close()
                if not tls:
                    raise
                return _connect_inside_tls(
                    host, port, context, path, timeout, do_not_use_method_powers, go_readahead
                )
            attempts.append((path, status))
            if status.startswith("404"):
                sock.close()
                continue
            if status != "200 Connected to Go SRPC":
                sock.close()
                raise ConnectRefused(status)
            if tls:
                sock = context.wrap_socket(sock, server_hostname=host)
            connection = Connection(sock, path, go_readahead, timeout)
            connection.attempts = attempts
            return connection
        except BaseException:
            sock.close()
            raise
    raise NoSrpcEndpoint("no SRPC endpoint")


def _connect_inside_tls(
    host: str,
    port: int,
    context: ssl.SSLContext,
    path: str,
    timeout: Optional[float],
    do_not_use_method_powers: bool,
    go_readahead: bool,
) -> Connection:
    """
    Go's fallback (client.go:141): TLS first, then CONNECT inside it.
    """
    sock = context.wrap_socket(_dial(host, port, timeout), server_hostname=host)
    try:
        sock.sendall(connect_line(path, do_not_use_method_powers))
        status = status_line(_read_head(sock))
        if status.startswith("404"):
            raise NoSrpcEndpoint("no SRPC endpoint")
        if status != "200 Connected to Go SRPC":
            raise ConnectRefused(status)
    except BaseException:
        sock.close()
        raise
    return Connection(sock, path, go_readahead, timeout)


def connect_tls_json(
    host: str, port: int, cert: Optional[str], key: Optional[str], **kwargs: Any
) -> Connection:
    """
    Straight to C{/_SRPC_/TLS/JSON} (one connection, no gob tries).
    """
    return connect(host, port, cert, key, endpoints=(SRPC_TLS_JSON,), **kwargs)


def connect_unsecured(host: str, port: int, **kwargs: Any) -> Connection:
    """
    Straight to C{/_SRPC_/unsecured/JSON} (the unauthenticated reads).
    """
    return connect(host, port, endpoints=(SRPC_UNSECURED_JSON,), **kwargs)


def wait_readable(connection: Connection, timeout: float) -> bool:
    """
    Whether something arrives within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if connection.pending():
            return True
        time.sleep(0.01)
    return connection.pending()
