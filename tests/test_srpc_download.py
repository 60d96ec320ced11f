"""
Server -> client raw bytes after a JSON reply (L{hypervisor.api.with_raw}: the
reference's GetVmUserData and GetVmLastPatchLog) over real TLS on loopback, read by
the Go-faithful client with Go's JSON read-ahead emulated (the decoder takes up to
512 bytes past the JSON; srpc-transcripts README quirk 1, 03 steps 7-10).

The service layer has no such method yet, so a test method is registered for the
test (a fake in addition to the real path, which is the same SRPC writer). The
control: with the JSON and the bytes in one TLS record the same client loses the
first 512 - len(JSON) bytes, as the Go client did in the captures.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hypervisor import dispatch
from hypervisor.api import METHODS, PUBLIC, MethodSpec, with_raw
from hypervisor.certs import make_certificate, write_pair
from hypervisor.model import IpRequest
from hypervisor.srpc import client as srpc
from hypervisor.tls import SniffingFactory, _PromptCloseTLS
from tests.srpc_support import Backend

METHOD = "GetTestRawData"


@dataclass
class RawResponse:
    """
    Like GetVmUserDataResponse: an error and the length of what follows.
    """

    Error: str = ""
    Length: int = 0


class DownloadTests(TestCase):
    """
    JSON, then raw bytes, to a client that reads ahead as Go's does.
    """

    timeout = 120

    async def setUp(self) -> None:
        self.backend = Backend(self)
        await self.backend.start()
        METHODS[METHOD] = MethodSpec(IpRequest, PUBLIC)
        dispatch.ACCESS[METHOD] = PUBLIC
        self.addCleanup(METHODS.pop, METHOD)
        self.addCleanup(dispatch.ACCESS.pop, METHOD)
        self.payload = b""

        def handler(identity: object, request: IpRequest) -> RawResponse:
            return with_raw(RawResponse(Length=len(self.payload)), self.payload)

        setattr(self.backend.api, METHOD, handler)
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
            message, data = c.call_download(METHOD, {"IpAddress": "10.77.0.10"})
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
