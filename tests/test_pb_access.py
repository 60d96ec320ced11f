"""
The access matrix of L{tests.test_rpc_access} (the same callers, certificates,
requests and expected verdicts: one table drives HTTPS, SRPC and PB) over Perspective
Broker: each call is a new real TLS connection made by L{hypervisor.client} with the
caller's certificate, to a PB listener made by L{hypervisor.pb.server.make_pb_factory}
over the same dispatcher as the HTTPS port.

PB tells 401 from 403 (a refused call's error carries its status). The one
difference from HTTPS is by design: PB is TLS with a client certificate only, so a
caller without one is refused (401) even for the unauthenticated reads that
C{-allowUnauthenticatedReads} opens on port 6976.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from hypervisor.api import METHODS, PROGRESS, UPDATES
from hypervisor.client import CallFailed, HypervisorClient, connect
from hypervisor.pb.server import make_pb_factory
from hypervisor.tlsreload import ReloadableTLS
from tests.test_rpc_access import REQUESTS, AccessMatrixTests, Caller

STREAM_WAIT = 20.0


@dataclass
class _NoCertificateOverPb(Caller):
    """
    No certificate: PB refuses every method, reads included.
    """

    def expected(self, method: str, unauthenticated_reads: bool = False) -> str:
        return "401"


class PbAccessMatrixTests(AccessMatrixTests):
    """
    Every method x every caller, over PB (TLS, client certificates).
    """

    async def start(self, unauthenticated_reads: bool = False) -> None:
        """
        The HTTPS fixture, plus a PB listener over its dispatcher and certificates.
        """
        await super().start(unauthenticated_reads)
        tls = ReloadableTLS("", "", "", "", self.trust, self.tls_options)
        self.pb = make_pb_factory(self.dispatcher, tls, reactor)
        self.pb_port = reactor.listenTCP(0, self.pb.factory, interface="127.0.0.1")
        self.addCleanup(self.pb_port.stopListening)
        self.callers = [
            (
                _NoCertificateOverPb(c.name, c.cert, c.refused, c.presented, c.patterns, c.owner)
                if c.cert is None
                else c
            )
            for c in self.callers
        ]

    async def _client(self, caller: Caller) -> HypervisorClient:
        cert, key = caller.cert if caller.cert is not None else (None, None)
        ca = f"{self.root}/CA.pem"
        return await connect(
            reactor,
            f"tcp:127.0.0.1:{self.pb_port.getHost().port}",
            cert,
            key,
            ca_file=ca,
            hostname="localhost",
        )

    async def call(self, caller: Caller, method: str) -> tuple[int, bytes]:
        """
        One call on a new PB connection; (status, JSON) as HTTPS would answer.
        """
        packets = None
        if method == "WatchDhcp":
            packets = LoopingCall(self.dhcp.watchers.publish, "br0", b"\x01" * 240)
            packets.start(0.02)
        client: Optional[HypervisorClient] = None
        try:
            client = await self._client(caller)
            spec = METHODS[method]
            request = json.dumps(REQUESTS[method]).encode()
            if spec.kind == "raw-stream":
                # Consoles over PB (hypervisor.pb.console): opened, then closed. Past
                # access, the fixture VM has no console socket (test:///default) and
                # ConnectToVmManager is not supported: as over the WebSocket, those
                # answers count as admitted (only 401 and 403 are refusals).
                try:
                    console = await client.console(method, request, lambda data: None, lambda: None)
                except CallFailed as e:
                    if e.status in (401, 403):
                        raise
                    return 200, json.dumps({"Error": e.message}).encode()
                await console.close()
                return 200, b'{"Error":""}'
            if spec.kind in (PROGRESS, UPDATES):
                first: Deferred[bytes] = Deferred()
                messages: list[bytes] = []

                def one(data: bytes) -> Any:
                    messages.append(data)
                    if not first.called:
                        first.callback(data)
                    return spec.kind != UPDATES  # an endless stream: one message is enough

                done = client.stream(method, request, one)
                from twisted.internet.defer import DeferredList, ensureDeferred

                finished = ensureDeferred(done)
                timer = reactor.callLater(STREAM_WAIT, finished.cancel)
                try:
                    reply = await finished
                finally:
                    if timer.active():
                        timer.cancel()
                return 200, reply or (messages[-1] if messages else b"{}")
            data, _ = await client.call_json(method, request)
            return 200, data
        except CallFailed as e:
            return e.status or 599, json.dumps({"Error": e.message}).encode()
        finally:
            if packets is not None:
                packets.stop()
            if client is not None:
                await client.close()


del AccessMatrixTests  # run once, in its own module
