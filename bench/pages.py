"""
Benchmark: latency of /listVMs (HTML, JSON, text) and / with 1000 VMs in the model.

    .venv/bin/python -m bench.pages [-n 200] [--vms 1000]

The pages are served by the real StatusPages resource on loopback; a client thread
makes sequential requests with http.client (one connection each, as a browser's first
load). As a reference point in the same run, a plain twisted.web resource serves the
very bytes of /listVMs from memory (the ceiling for one Python process). Prints
median and p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from twisted.internet import reactor  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Site  # noqa: E402

from hypervisor.manager.manager import Manager  # noqa: E402
from hypervisor.manager.vm import Vm  # noqa: E402
from hypervisor.model import (  # noqa: E402
    Address,
    LocalVmInfo,
    State,
    Subnet,
    VmInfo,
    Volume,
    VolumeLocation,
)
from hypervisor.store import StateDirectory  # noqa: E402
from hypervisor.testing import FakeHost  # noqa: E402
from hypervisor.virt.connection import LibvirtService  # noqa: E402
from web.status import StatusPages  # noqa: E402


class Static(Resource):
    """
    The same bytes, from memory.
    """

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return self.body


def populate(root: str, count: int) -> Manager:
    libvirt = LibvirtService("qemu:///system", reactor)
    manager = Manager(
        StateDirectory(os.path.join(root, "state")),
        libvirt,
        reactor,
        domain_type="qemu",
        volume_directories=[root],
        host=FakeHost(cpus=64, memory_mib=1 << 20),
    )
    manager.privilegedStartService()
    manager.admin.update_subnets(
        [Subnet(Id="net", IpGateway="10.0.0.1", IpMask="255.255.0.0")], [], []
    )
    states = list(State)
    for i in range(count):
        ip = f"10.0.{i // 250}.{i % 250 + 2}"
        info = VmInfo(
            Address=Address(ip, f"52:54:0a:00:{i // 250:02x}:{i % 250 + 2:02x}"),
            MemoryInMiB=1024,
            MilliCPUs=500,
            State=states[i % 5],
            OwnerUsers=[f"user{i % 17}"],
            SubnetId="net",
            Tags={"Name": f"vm-{i}"},
            Volumes=[Volume(Size=10 << 30)],
        )
        manager.table.add(
            Vm(
                LocalVmInfo(
                    VmInfo=info, VolumeLocations=[VolumeLocation(root, f"{root}/{ip}/root")]
                ),
                os.path.join(root, ip),
            )
        )
    return manager


def measure(port: int, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", port)
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}")
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=200, help="requests per page")
    parser.add_argument("--vms", type=int, default=1000, help="VMs in the model")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="hv-bench-pages-")
    manager = populate(root, args.vms)
    pages = StatusPages(manager, manager.libvirt, hostname="bench")
    port = reactor.listenTCP(0, Site(pages.resource()), interface="127.0.0.1")
    results: dict[str, list[float]] = {}
    sizes: dict[str, int] = {}

    def client() -> None:
        try:
            p = port.getHost().port
            c = http.client.HTTPConnection("127.0.0.1", p)
            c.request("GET", "/listVMs")
            body = c.getresponse().read()
            static = reactor_call(
                lambda: reactor.listenTCP(0, Site(Static(body)), interface="127.0.0.1")
            )
            for path in ("/listVMs", "/listVMs?output=json", "/listVMs?output=text", "/"):
                measure(p, path, 5)  # warm up
                results[path] = measure(p, path, args.n)
                c = http.client.HTTPConnection("127.0.0.1", p)
                c.request("GET", path)
                sizes[path] = len(c.getresponse().read())
            sp = static.getHost().port
            results["same bytes, static resource"] = measure(sp, "/", args.n)
            sizes["same bytes, static resource"] = len(body)
        finally:
            reactor.callFromThread(reactor.stop)

    def reactor_call(fn: Any) -> Any:
        done = threading.Event()
        box: list[Any] = []

        def run() -> None:
            box.append(fn())
            done.set()

        reactor.callFromThread(run)
        done.wait()
        return box[0]

    threading.Thread(target=client, daemon=True).start()
    reactor.run()
    manager.state.unlock()
    shutil.rmtree(root, ignore_errors=True)
    print(f"\nPage latency with {args.vms} VMs, N={args.n} sequential requests (ms)")
    print(f"{'page':<32} {'bytes':>9} {'median':>8} {'p99':>8}")
    for path, values in results.items():
        values.sort()
        p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
        print(f"{path:<32} {sizes[path]:>9} {statistics.median(values):>8.2f} {p99:>8.2f}")


if __name__ == "__main__":
    main()
