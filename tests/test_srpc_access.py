"""
The access matrix of L{tests.test_rpc_access} (the same callers, certificates,
requests and expected verdicts: one table drives both) run again over SRPC: each
call is a new connection made by L{hypervisor.srpc.client} as Go's client makes it
(C{CONNECT /_go_TLS_SRPC_/} -> 404, then C{CONNECT /_SRPC_/TLS/JSON}, TLS with the
caller's certificate), on the same port as HTTPS (the first-line hook of
L{hypervisor.tls.SniffingFactory}).

SRPC's method line says only "refused" (Go's C{access to method denied}, or why a
certificate is not accepted), and a refusal by the service layer (not an owner of
the VM) comes in the reply's C{Error} as Go's hypervisor sends it, so 401 and 403
are one verdict here, told by the method line or by the dispatcher's denial count; a
refused call must change nothing, an allowed one must not fail internally.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread

from hypervisor import codec
from hypervisor.api import METHODS, PROGRESS, UPDATES
from hypervisor.srpc import client as srpc
from hypervisor.srpc.protocol import SrpcFactory
from tests.test_rpc_access import REQUESTS, AccessMatrixTests, Caller

INTERNAL = "internal error"


class SrpcAccessMatrixTests(AccessMatrixTests):
    """
    Every method x every caller, over SRPC (TLS + JSON).
    """

    def connect_hook(self) -> Any:
        """
        SRPC on the test port.
        """
        return SrpcFactory(self.dispatcher, self.trust, self.tls_options, reactor).router

    def verdict(self, outcome: str) -> str:
        """
        401 and 403 are both a refusal line.
        """
        return "refused" if outcome in ("401", "403") else outcome

    def _call(self, caller: Caller, method: str) -> tuple[int, bytes]:
        cert, key = caller.cert if caller.cert is not None else (None, None)
        connection = srpc.connect(
            "127.0.0.1", self.port.getHost().port, cert, key, timeout=60, go_readahead=True
        )
        try:
            if connection.attempts[0] != ("/_go_TLS_SRPC_/", "404 Not Found"):
                raise AssertionError(f"gob endpoint not refused: {connection.attempts}")
            try:
                call = connection.open(method)
            except srpc.SrpcError as e:
                return 403, json.dumps({"Error": str(e)}).encode()
            spec = METHODS[method]
            if method != "GetUpdates":
                call.send(REQUESTS[method])
                if spec.upload is not None:
                    size = spec.upload(codec.decode(spec.request, json.dumps(REQUESTS[method])))
                    call.send_raw(b"\0" * size, size)
            if spec.kind in (PROGRESS, UPDATES):
                messages = []
                while True:
                    message = call.receive(timeout=60)
                    messages.append(message)
                    if spec.kind == UPDATES or message.get("Final") or message.get("Error"):
                        break
                last = messages[-1]
            else:
                # "\n" + JSON (request/reply), or a bare JSON message followed by
                # its Length of raw bytes (GetVmUserData), or an error line.
                line = call._decoder_line()
                if line == b"":
                    last = call.receive()
                elif line.startswith(b"{"):
                    last = json.loads(line)
                    call.read_raw(int(last.get("Length") or 0))
                else:
                    raise srpc.SrpcError(line.decode())
            code = 500 if INTERNAL in str(last.get("Error", "")) else 200
            return code, json.dumps(last).encode()
        finally:
            connection.close()

    async def call(self, caller: Caller, method: str) -> tuple[int, bytes]:
        """
        One SRPC call on a new connection (in a thread: the client blocks).
        """
        packets = None
        if method == "WatchDhcp":
            packets = LoopingCall(self.dhcp.watchers.publish, "br0", b"\x01" * 240)
            packets.start(0.02)
        before = self.denials()
        try:
            code, body = await deferToThread(self._call, caller, method)
            if code == 200 and self.denials() > before:
                # Refused by the service layer (VM ownership): Go's hypervisor says so
                # in the reply's Error; the dispatcher counted a denial.
                code = 403
            return code, body
        finally:
            if packets is not None:
                packets.stop()


del AccessMatrixTests  # run once, in its own module
