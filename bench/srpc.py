"""
Benchmark: SRPC (TLS + JSON, as the Go tools speak it) beside this daemon's HTTPS JSON
API, against the real daemon, same run.

    .venv/bin/python -m bench.srpc [-n 300]

As root, with libvirtd running. Starts a daemon with TLS certificates (as the tests
do), sets up a subnet and one stopped VM, then measures from outside, each N times:

- connect: SRPC as Go's client does it (a TCP connection answered 404 on the gob
  endpoint, a second one with CONNECT, 200 and the TLS handshake) against an HTTPS
  connection (TCP + TLS handshake);
- GetVmInfo and ListVMs on a kept connection: an SRPC call against an HTTPS
  keep-alive POST;
- GetVmUserData of 64 KiB (SRPC: JSON then raw bytes; HTTPS: the same call).

Prints median, p90, min and max in milliseconds per row. The Go hypervisor (the real
peer) cannot run here (no Go toolchain or binaries on this machine): the table says
so instead of inventing its figures.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hypervisor.srpc import client as srpc  # noqa: E402
from tests import realrpc, support  # noqa: E402


class _Cleanups:
    """
    What the test helpers expect of a test case: somewhere to register clean-ups.
    """

    def __init__(self) -> None:
        self.cleanups: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def addCleanup(self, f: Callable[..., Any], *args: Any) -> None:
        self.cleanups.append((f, args))

    def run(self) -> None:
        for f, args in reversed(self.cleanups):
            try:
                f(*args)
            except Exception as e:  # noqa: BLE001 - best effort at exit
                print(f"cleanup {f!r}: {e}", file=sys.stderr)


def row(name: str, values: list[float]) -> str:
    values = sorted(v * 1000 for v in values)
    p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return (
        f"{name:<44} {statistics.median(values):>8.2f} {p90:>8.2f} "
        f"{values[0]:>8.2f} {values[-1]:>8.2f}"
    )


def timed(n: int, f: Callable[[], Any]) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=300, help="calls per row")
    args = parser.parse_args()
    support.require_libvirtd()
    cleanups = _Cleanups()
    try:
        d = realrpc.TlsDaemon(cleanups, {"admin": "Hypervisor.*"}, "-domainType=qemu")
        d.start(healthy=True)
        d.setup_network("10.84.0", 2, 0x54)
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

        def srpc_connect() -> None:
            srpc.connect("127.0.0.1", d.port, *cert).close()

        def https_connect() -> None:
            s = d.tls_socket("admin")
            s.close()

        rows = [
            ("SRPC connect (404 gob + CONNECT + TLS)", timed(args.n // 3, srpc_connect)),
            ("HTTPS connect (TCP + TLS)", timed(args.n // 3, https_connect)),
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
        ]
        print(f"{'ms per call':<44} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
        for name, values in rows:
            print(row(name, values))
        print(
            f"{'Go hypervisor (the real peer)':<44} not measured: no Go toolchain or "
            "binaries on this machine"
        )
        print(f"load average: {os.getloadavg()}")
        c.close()
        https.close()
    finally:
        cleanups.run()


if __name__ == "__main__":
    main()
