# -*- test-case-name: tests.test_console_real -*-
"""
C{vm-control connect-to-vm-serial-port} (and C{connect-to-vm-console}'s byte pipe):
a blocking console client over either transport, and the terminal loop.

- SRPC (L{open_srpc}): C{Hypervisor.ConnectToVmSerialPort}, the request JSON, the
  C{{"Error":""}} answer, then raw bytes both ways on the same TLS connection (as the
  Go tool does).
- HTTPS (L{open_websocket}): the daemon's console WebSocket (L{web.console}) on port
  6976 with the client certificate: the request JSON as the first (text) message,
  the answer as the first message back, then binary messages.

L{run_terminal} relays stdin to the console and the console to stderr (where the Go
tool writes it), with stdin in raw mode when it is a terminal; the Go tool's escape
key, Control-\\ (0x1c), ends it (exit 0), then a lone carriage return, as v0.3.4's
(whose output the transcript shows: no banner of its own). Piped stdin works too (for scripts and
tests): at its end nothing more is sent and the console is shown until it closes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import select
import socket
import ssl
import struct
from typing import IO, Any, Optional

from hypervisor.cli.client import CertPair, ClientError

ESCAPE = 0x1C
MAX_FRAME = 1 << 20
MAX_HEAD = 16 * 1024
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Channel:
    """
    A connected console: bytes both ways.
    """

    sock: socket.socket

    def fileno(self) -> int:
        """
        The socket to wait on.
        """
        return self.sock.fileno()

    def pending(self) -> bool:
        """
        Whether bytes are buffered (readable without waiting on the socket).
        """
        return isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0

    def recv(self) -> bytes:
        """
        Some console bytes; b"" when the console ended.
        """
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        """
        Bytes to the console.
        """
        raise NotImplementedError

    def close(self) -> None:
        """
        Disconnect.
        """
        try:
            self.sock.close()
        except OSError:
            pass


class SrpcChannel(Channel):
    """
    The raw bytes after an SRPC console call.
    """

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.sock = connection.sock
        self.early = bytes(connection._buffer)
        connection._buffer.clear()

    def pending(self) -> bool:
        return bool(self.early) or super().pending()

    def recv(self) -> bytes:
        if self.early:
            data, self.early = self.early, b""
            return data
        try:
            return self.sock.recv(65536)
        except (ssl.SSLError, OSError):
            return b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def open_srpc(
    host: str,
    port: int,
    pair: Optional[CertPair],
    ca_file: str,
    method: str,
    request: bytes,
    do_not_use_method_powers: bool = False,
) -> Channel:
    """
    Call a console method over SRPC; the connected channel.

    @raise ClientError: unreachable, refused, or the answer's C{Error}.
    """
    from hypervisor.srpc import client as srpc

    try:
        connection = srpc.connect(
            host,
            port,
            cert=pair.cert_path if pair else None,
            key=pair.key_path if pair else None,
            ca=ca_file if ca_file and os.path.exists(ca_file) else None,
            timeout=60.0,
            do_not_use_method_powers=do_not_use_method_powers,
        )
        call = connection.open(method)
        connection.write(request + b"\n")
        answer = call.receive()
    except srpc.SrpcError as e:
        raise ClientError(str(e) or type(e).__name__) from None
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"cannot reach {host}:{port} over SRPC: {e}") from None
    if answer.get("Error"):
        connection.close()
        raise ClientError(str(answer["Error"]))
    connection.sock.settimeout(None)
    return SrpcChannel(connection)


class WebSocketChannel(Channel):
    """
    A client WebSocket (RFC 6455) over TLS: masked frames out, bounded frames in.
    """

    def __init__(self, sock: socket.socket, early: bytes) -> None:
        self.sock = sock
        self.buffer = bytearray(early)
        self.closed = False

    def pending(self) -> bool:
        return bool(self.buffer) or super().pending()

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLError, OSError):
            data = b""
        if not data:
            return False
        self.buffer += data
        return True

    def _frame(self) -> Optional[tuple[int, bytes]]:
        """
        The next whole frame (opcode, payload), reading as needed; None at the end.
        """
        while True:
            frame = _parse_frame(self.buffer)
            if frame is not None:
                return frame
            if not self._fill():
                return None

    def message(self) -> Optional[tuple[int, bytes]]:
        """
        The next data message (opcode 1 or 2); control frames answered; None at the end.
        """
        while not self.closed:
            frame = self._frame()
            if frame is None:
                self.closed = True
                return None
            opcode, payload = frame
            if opcode == 8:  # close: answer it (the server may have closed already)
                self.closed = True
                try:
                    self._send_frame(8, payload[:2])
                except (OSError, ssl.SSLError):
                    pass
                return None
            if opcode == 9:
                self._send_frame(10, payload)
                continue
            if opcode in (1, 2):
                return opcode, payload
        return None

    def recv(self) -> bytes:
        message = self.message()
        return b"" if message is None else message[1]

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(encode_frame(opcode, payload))

    def send(self, data: bytes) -> None:
        if not self.closed:
            self._send_frame(2, data)

    def close(self) -> None:
        if not self.closed:
            try:
                self._send_frame(8, struct.pack("!H", 1000))
            except OSError:
                pass
        super().close()


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """
    A final, masked client frame.
    """
    head = bytearray([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head.append(0x80 | n)
    elif n < 1 << 16:
        head.append(0x80 | 126)
        head += struct.pack("!H", n)
    else:
        head.append(0x80 | 127)
        head += struct.pack("!Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes(head) + mask + masked


def _parse_frame(buffer: bytearray) -> Optional[tuple[int, bytes]]:
    """
    Take one whole frame from C{buffer} (server frames are not masked; fragments are
    not used by the daemon); None if incomplete.

    @raise ClientError: a frame over L{MAX_FRAME} or a masked one.
    """
    if len(buffer) < 2:
        return None
    opcode = buffer[0] & 0x0F
    if buffer[1] & 0x80:
        raise ClientError("the server sent a masked WebSocket frame")
    n = buffer[1] & 0x7F
    start = 2
    if n == 126:
        if len(buffer) < 4:
            return None
        n = struct.unpack("!H", buffer[2:4])[0]
        start = 4
    elif n == 127:
        if len(buffer) < 10:
            return None
        n = struct.unpack("!Q", buffer[2:10])[0]
        start = 10
    if n > MAX_FRAME:
        raise ClientError(f"a WebSocket frame of {n} bytes is over {MAX_FRAME}")
    if len(buffer) < start + n:
        return None
    payload = bytes(buffer[start : start + n])
    del buffer[: start + n]
    return opcode, payload


def open_websocket(
    host: str,
    port: int,
    pair: Optional[CertPair],
    ca_file: str,
    method: str,
    request: bytes,
) -> Channel:
    """
    Call a console method over the daemon's console WebSocket; the connected channel.

    @raise ClientError: unreachable, refused (the HTTP status), or the answer's C{Error}.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file and os.path.exists(ca_file):
        context.load_verify_locations(ca_file)
        context.check_hostname = False  # the CA is ours; certificates name no host
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if pair is not None:
        context.load_cert_chain(pair.cert_path, pair.key_path)
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        raw = socket.create_connection((host, port), timeout=60.0)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = context.wrap_socket(raw, server_hostname=host)
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws/%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % (method.encode(), netloc.encode(), key)
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                break
            head += data
            if len(head) > MAX_HEAD:
                raise ClientError("the server's WebSocket answer is too long")
    except (OSError, ssl.SSLError) as e:
        raise ClientError(f"cannot reach {netloc} over HTTPS: {e}") from None
    top, _, rest = head.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 101"):
        sock.close()
        raise ClientError(f"the console WebSocket was refused: {lines[0][9:] or 'no answer'}")
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    if headers.get("sec-websocket-accept") != accept:
        sock.close()
        raise ClientError("the server's WebSocket answer does not match our key")
    channel = WebSocketChannel(sock, rest)
    sock.settimeout(60.0)
    sock.sendall(encode_frame(1, request))
    answer = channel.message()
    if answer is None:
        raise ClientError("the console WebSocket closed before answering")
    try:
        reply = json.loads(answer[1])
    except ValueError:
        raise ClientError(f"malformed answer: {answer[1][:200]!r}") from None
    if not isinstance(reply, dict):
        raise ClientError(f"malformed answer: {answer[1][:200]!r}")
    if reply.get("Error"):
        channel.close()
        raise ClientError(str(reply["Error"]))
    sock.settimeout(None)
    return channel


def run_terminal(channel: Channel, stdin: IO[bytes], out: IO[bytes]) -> int:
    """
    Relay until Control-\\ on stdin (0) or the console closes (0).
    """
    fd = stdin.fileno()
    saved = None
    if os.isatty(fd):
        import termios
        import tty

        saved = termios.tcgetattr(fd)
        tty.setraw(fd)
    stdin_open = True
    try:
        while True:
            if channel.pending():
                ready = [channel]
            else:
                waiting: list[Any] = [channel] + ([fd] if stdin_open else [])
                ready = select.select(waiting, [], [])[0]
            if channel in ready:
                data = channel.recv()
                if not data:
                    return 0
                out.write(data)
                out.flush()
            if stdin_open and fd in ready:
                data = os.read(fd, 4096)
                if not data:
                    stdin_open = False
                    continue
                escape = data.find(bytes([ESCAPE]))
                if escape >= 0:
                    if escape:
                        channel.send(data[:escape])
                    return 0
                channel.send(data)
    finally:
        if saved is not None:
            import termios

            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        channel.close()
        out.write(b"\r")
        out.flush()


def serve_vnc_once(channel: Channel, viewer: str, log: Any) -> int:
    """
    Go's connect-to-vm-console after the call was answered: listen on a localhost port,
    run C{viewer ::<port>} (or, without one, log the port), relay the first
    connection to the console both ways until either side ends.

    @raise ClientError: the viewer cannot be started.
    """
    import subprocess

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("localhost", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        if viewer:
            try:
                subprocess.Popen([viewer, f"::{port}"])
            except OSError as e:
                raise ClientError(f"exec: {viewer!r}: {e.strerror}") from None
        else:
            log(f"listening on port {port} for VNC connection")
        client, _ = listener.accept()
    finally:
        listener.close()
    try:
        while True:
            if channel.pending():
                ready: list[Any] = [channel]
            else:
                waiting: list[Any] = [channel, client]
                ready = select.select(waiting, [], [])[0]
            if channel in ready:
                data = channel.recv()
                if not data:
                    return 0
                client.sendall(data)
            if client in ready:
                data = client.recv(65536)
                if not data:
                    return 0
                channel.send(data)
    except OSError:
        return 0
    finally:
        client.close()
        channel.close()
