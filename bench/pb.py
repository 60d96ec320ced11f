"""
Benchmark: the Perspective Broker transport beside SRPC and HTTPS against the real
daemon, same run, same calls.

    .venv/bin/python -m bench.pb [-n 300]

As root, with libvirtd running. Starts a daemon with TLS certificates and a PB port
(as the tests do), sets up a subnet and one stopped VM with 64 KiB of user data, then
measures from outside, each N times: connecting (PB: TCP, TLS, the root object and
whoami; SRPC as Go's client does it; HTTPS: TCP and TLS), GetVmInfo, ListVMs and
GetVmUserData on a kept connection, and the first (full) GetUpdates message from a
new subscription. PB is measured from a Twisted client on its reactor
(L{hypervisor.client}), SRPC and HTTPS from blocking clients, one call at a time.

Prints median, p90, min and max in milliseconds per row. The Go hypervisor (the real
peer for SRPC) cannot run here (no Go toolchain or binaries on this machine), and it
has no PB service: the table says so instead of inventing figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.srpc import _Cleanups, row, timed  # noqa: E402
from hypervisor.srpc import client as srpc  # noqa: E402
from tests import realrpc, support  # noqa: E402


async def pb_rows(reactor: Any, d: Any, port: int, ip: str, n: int) -> list[tuple[str, Any]]:
    """
    The PB rows, measured on the running reactor.
    """
    from twisted.internet.defer import Deferred

    from hypervisor.client import connect

    cert = (f"{d.pki}/admin/admin.cert", f"{d.pki}/admin/admin.key")
    endpoint = f"tcp:127.0.0.1:{port}"
    ca = f"{d.pki}/CA.pem"

    async def timed_async(count: int, f: Any) -> list[float]:
        out = []
        for _ in range(count):
            start = time.perf_counter()
            await f()
            out.append(time.perf_counter() - start)
        return out

    async def connect_once() -> None:
        c = await connect(reactor, endpoint, *cert, ca_file=ca)
        await c.close()

    hv = await connect(reactor, endpoint, *cert, ca_file=ca)

    async def first_update() -> None:
        got: Deferred[None] = Deferred()
        subscription = hv.subscribe_updates(lambda u: got.called or got.callback(None))
        await got
        await subscription.stop()

    rows = [
        ("PB connect (TCP + TLS + root + whoami)", await timed_async(n // 3, connect_once)),
        (
            "PB GetVmInfo (kept connection)",
            await timed_async(n, lambda: hv.call_json("GetVmInfo", {"IpAddress": ip})),
        ),
        ("PB ListVMs", await timed_async(n, lambda: hv.call_json("ListVMs", {}))),
        (
            "PB GetVmUserData 64 KiB (JSON + raw)",
            await timed_async(n, lambda: hv.call_json("GetVmUserData", {"IpAddress": ip})),
        ),
        ("PB GetUpdates: subscribe to first update", await timed_async(n // 3, first_update)),
    ]
    await hv.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300, help="calls per row")
    args = parser.parse_args()
    support.require_libvirtd()
    cleanups = _Cleanups()
    try:
        pb_port = support.free_port()
        d = realrpc.TlsDaemon(
            cleanups, {"admin": "Hypervisor.*"}, "-domainType=qemu", f"-pbPortNum={pb_port}"
        )
        d.start(healthy=True)
        d.setup_network("10.85.0", 2, 0x55)
        cert = (f"{d.pki}/admin/admin.cert", f"{d.pki}/admin/admin.key")
        user_data = os.urandom(64 * 1024)
        c = srpc.connect("127.0.0.1", d.port, *cert)
        messages = list(
            c.call_stream(
                "CreateVm",
                {
                    "MemoryInMiB": 32,
                    "MilliCPUs": 10,
                    "SubnetId": "hvtest",
                    "MinimumFreeBytes": 1 << 20,
                    "DoNotStart": True,
                    "UserDataSize": len(user_data),
                },
                uploads=[(user_data, len(user_data))],
            )
        )
        ip = messages[-1]["IpAddress"]
        c.call("AcknowledgeVm", {"IpAddress": ip})
        https = http.client.HTTPSConnection("127.0.0.1", d.port, context=d.context("admin"))

        def post(method: str, body: dict[str, Any]) -> bytes:
            https.request(
                "POST",
                f"/rpc/Hypervisor.{method}",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            response = https.getresponse()
            data = response.read()
            assert response.status == 200, data
            return data

        def first_update_srpc() -> None:
            s = srpc.connect("127.0.0.1", d.port, *cert)
            call = s.open("GetUpdates")
            call.receive(timeout=30)
            s.close()

        rows = [
            (
                "SRPC connect (404 gob + CONNECT + TLS)",
                timed(args.n // 3, lambda: srpc.connect("127.0.0.1", d.port, *cert).close()),
            ),
            (
                "HTTPS connect (TCP + TLS)",
                timed(args.n // 3, lambda: d.tls_socket("admin").close()),
            ),
            (
                "SRPC GetVmInfo (kept connection)",
                timed(args.n, lambda: c.call("GetVmInfo", {"IpAddress": ip})),
            ),
            (
                "HTTPS GetVmInfo (keep-alive)",
                timed(args.n, lambda: post("GetVmInfo", {"IpAddress": ip})),
            ),
            ("SRPC ListVMs", timed(args.n, lambda: c.call("ListVMs", {}))),
            ("HTTPS ListVMs", timed(args.n, lambda: post("ListVMs", {}))),
            (
                "SRPC GetVmUserData 64 KiB (JSON + raw)",
                timed(args.n, lambda: c.call_download("GetVmUserData", {"IpAddress": ip})),
            ),
            (
                "HTTPS GetVmUserData 64 KiB",
                timed(args.n, lambda: post("GetVmUserData", {"IpAddress": ip})),
            ),
            (
                "SRPC GetUpdates: connect to first update",
                timed(args.n // 3, first_update_srpc),
            ),
        ]
        c.close()
        https.close()

        from twisted.internet import defer, task

        measured: list[tuple[str, Any]] = []

        async def go(reactor: Any) -> None:
            measured.extend(await pb_rows(reactor, d, pb_port, ip, args.n))

        try:
            task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
        except SystemExit as e:
            if e.code:
                raise
        rows += measured
        print(f"{'ms per call':<44} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
        for name, values in rows:
            print(row(name, values))
        print(
            f"{'Go hypervisor (the real peer)':<44} not measured: no Go toolchain or "
            "binaries on this machine; it has no PB service"
        )
        print(f"load average: {os.getloadavg()}")
    finally:
        cleanups.run()


if __name__ == "__main__":
    main()
