"""
Server -> client raw bytes after a JSON reply (L{hypervisor.api.with_raw}:
GetVmUserData) over real TLS on loopback, read by the Go-faithful client with Go's
JSON read-ahead emulated (the decoder takes up to 512 bytes past the JSON;
srpc-transcripts README quirk 1, 03 steps 7-10). The user data is set through
ReplaceVmUserData (its upload) over SRPC too.

The control: with the JSON and the bytes in one TLS record the same client loses the
first 512 - len(JSON) bytes, as the Go client did in the captures.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hypervisor.certs import make_certificate, write_pair
from hypervisor.srpc import client as srpc
from hypervisor.srpc import codec as wire
from hypervisor.tls import SniffingFactory, _PromptCloseTLS
from tests.srpc_support import VM_IP, Backend, sleep


class DownloadTests(TestCase):
    """
    JSON, then raw bytes, to a client that reads ahead as Go's does.
    """

    timeout = 120

    async def setUp(self) -> None:
        self.backend = Backend(self)
        await self.backend.start()
        await self.backend.ensure_vm()
        b = self.backend
        factory = SniffingFactory(
            Factory.forProtocol(Protocol), b.tls_options, connect=b.factory.router
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        key, cert = make_certificate(*b.ca, "testuser", groups=["team-a"])
        self.cert = (f"{b.root}/user.cert", f"{b.root}/user.key")
        write_pair(*self.cert, key, cert)

    def fetch(self, timeout: float = 5) -> bytes:
        c = srpc.connect(
            "127.0.0.1", self.port.getHost().port, *self.cert, go_readahead=True, timeout=timeout
        )
        with c:
            reply = c.call_upload(
                "ReplaceVmUserData",
                {"IpAddress": VM_IP, "Size": len(self.payload)},
                [(self.payload, len(self.payload))],
            )
            if reply.get("Error"):
                raise AssertionError(reply)
            message, data = c.call_download("GetVmUserData", {"IpAddress": VM_IP})
            if message.get("Error"):
                raise AssertionError(message)
            return data

    async def test_raw_after_json(self) -> None:
        """
        235 bytes, 5000 bytes (the captures' sizes) and 300 KiB arrive whole.
        """
        for size in (235, 5000, 300 * 1024):
            self.payload = bytes((i * 7) % 251 for i in range(size))
            data = await deferToThread(self.fetch)
            self.assertEqual(data, self.payload, size)

    async def test_control_one_record_loses_bytes(self) -> None:
        """
        Without the record boundary the Go-faithful client loses bytes and hangs
        (times out), as Go's did.
        """
        self.patch(_PromptCloseTLS, "send_now", lambda self: None)
        self.payload = bytes(range(235))
        with self.assertRaises((socket.timeout, TimeoutError, srpc.SrpcError)):
            await deferToThread(self.fetch, 2)

    def updates_until_closed(self) -> float:
        c = srpc.connect("127.0.0.1", self.port.getHost().port, *self.cert, timeout=10)
        with c:
            updates = c.get_updates()
            updates.receive(timeout=5)
            self.ready.set()
            started = time.monotonic()
            try:
                while True:
                    updates.receive(timeout=5)
            except srpc.SrpcError:  # EOF: the server closed
                return time.monotonic() - started

    async def test_stream_end_closes_connection(self) -> None:
        """
        When the daemon ends a GetUpdates stream (a subscriber dropped for falling
        behind, or the daemon stopping), the connection closes at once: the stream's
        producer is unregistered first, since TLS does not shut down while one is
        registered.
        """
        self.ready = threading.Event()
        d = deferToThread(self.updates_until_closed)
        while not self.ready.is_set():
            await sleep(0.01)
        await sleep(0.2)
        self.backend.manager.ctx.hub.close_all()
        self.assertLess(await d, 3)

    def garbage_keepalive(self) -> tuple[bytes, float]:
        c = srpc.connect("127.0.0.1", self.port.getHost().port, *self.cert, timeout=10)
        with c:
            updates = c.get_updates()
            updates.receive(timeout=5)
            started = time.monotonic()
            c.write(b"not json\n")
            out = b""
            try:
                while True:
                    out += c.read_exactly(1)
            except srpc.SrpcError:  # EOF
                return out, time.monotonic() - started

    async def test_garbage_on_stream_closes_connection(self) -> None:
        """
        A malformed keepalive on a GetUpdates stream: the error line, then the
        connection closes at once (not held open by the stream's producer).
        """
        out, seconds = await deferToThread(self.garbage_keepalive)
        self.assertIn(b"malformed GetUpdatesRequest", out)
        self.assertLess(seconds, 3)

    def alpn_call(self) -> bytes:
        s = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=5)
        s.sendall(wire.connect_line(wire.SRPC_TLS_JSON))
        head = b""
        while not head.endswith(b"\n\n"):
            head += s.recv(1)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.load_cert_chain(*self.cert)
        context.set_alpn_protocols(["h2", "http/1.1"])
        with context.wrap_socket(s) as t:
            t.sendall(b"Hypervisor.ListVMs\n{}\n")
            out = b""
            while out.count(b"\n") < 3:
                out += t.recv(4096)
            return out

    async def test_client_offering_alpn(self) -> None:
        """
        A client that offers ALPN in the TLS after CONNECT still gets its calls
        answered (a TLS factory that cannot answer ALPN fails such handshakes).
        """
        out = await deferToThread(self.alpn_call)
        self.assertEqual(out, b'\n\n{"IpAddresses":["10.77.0.10"]}\n')
