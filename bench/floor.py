"""
What the stack costs before the daemon does any work of its own (issue 10): the floor
under C{bench.scale}'s GetVmInfo latency and RSS rows.

    .venv/bin/python -m bench.floor [--calls 3000] [--runs 3]

1. B{Per-request floor.} One keep-alive HTTPS connection with a client certificate
   (the client of C{bench.scale}: C{http.client} over C{ssl}) POSTs a GetVmInfo-sized
   request C{--calls} times to servers that answer every request with the same canned
   reply, so that nothing but the transport is measured:

   - B{twisted TLS, canned}: a bare L{Protocol} under Twisted's TLS
     (C{TLSMemoryBIOProtocol} over pyOpenSSL), which is what port 6976 runs on; it
     splits the request at its blank line and C{Content-Length} and writes the
     reply. No HTTP library, no routing, no access check, no encoding.
   - B{twisted.web, canned}: a leaf C{Resource} of a twisted.web C{Site} under the
     same TLS, answering the canned body.
   - B{asyncio TLS, canned}: the bare protocol on asyncio with the standard library's
     C{ssl} (C code), for scale only: the daemon is on Twisted, and the standard
     library cannot give the client's chain (Python 3.13 adds it) nor accept any
     certificate in the handshake so that a refusal is an HTTP 401 with a sentence.

   Latency p50/p99 (the first tenth of the calls dropped as warm-up) and the server's
   CPU per call; the median of C{--runs} runs, the runs of the servers interleaved.
2. B{RSS floor.} C{VmRSS} (and its anonymous part) of a fresh interpreter after
   importing, with bytecode cached as an installed daemon has it:

   - nothing; Twisted's reactor; the stack the daemon cannot do without (Twisted's
     reactor and twisted.web, Klein, libvirt, pyOpenSSL, json, ElementTree), also
     with C{-OO} (no docstrings or asserts);
   - the daemon's own service tree (C{tap.service}, C{web.status},
     C{hypervisor.cli.hypervisor}), also with C{-OO}.

The Go daemon's figures (issue 10, same machines) are the reference column. This
machine has 2 noisy vCPUs: compare rows of one run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GO_GETVMINFO = (0.30, 0.67)  # ms, p50 / p99 (issue 10)
GO_RSS = 28.0  # MiB at 1000 VMs (issue 10)
RSS_GOAL = 60.0

REPLY_BODY = (
    b'{"VmInfo":{"Address":{"IpAddress":"10.0.0.1","MacAddress":"52:54:00:00:00:01"},'
    b'"Hostname":"x","State":"stopped"}}\n'
)
REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(REPLY_BODY),
    REPLY_BODY,
)

SERVERS = {
    "twisted": "twisted TLS, canned",
    "twistedweb": "twisted.web, canned",
    "asyncio": "asyncio TLS, canned (for scale)",
}

IMPORT_SETS = [
    ("interpreter alone", "pass", 0),
    ("Twisted's reactor", "import twisted.internet.reactor", 0),
    (
        "the stack: reactor, twisted.web, Klein, libvirt, pyOpenSSL",
        "import twisted.internet.reactor, twisted.web.server, klein, libvirt, OpenSSL, json, "
        "xml.etree.ElementTree",
        0,
    ),
    (
        "the stack, -OO",
        "import twisted.internet.reactor, twisted.web.server, klein, libvirt, OpenSSL, json, "
        "xml.etree.ElementTree",
        2,
    ),
    (
        "the daemon's modules",
        "import tap.service, web.status, hypervisor.cli.hypervisor",
        0,
    ),
    (
        "the daemon's modules, -OO",
        "import tap.service, web.status, hypervisor.cli.hypervisor",
        2,
    ),
]


def split_requests(buffer: bytes) -> tuple[int, bytes]:
    """
    How many whole requests C{buffer} holds (head, blank line, C{Content-Length}
    bytes of body) and what is left after them.
    """
    count = 0
    while True:
        head, blank, rest = buffer.partition(b"\r\n\r\n")
        if not blank:
            return count, buffer
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        if len(rest) < length:
            return count, buffer
        buffer = rest[length:]
        count += 1


def serve(kind: str, port: int, pki: str) -> None:
    """
    Run one canned server on 127.0.0.1:C{port} until killed.
    """
    cert, key, ca = f"{pki}/server.pem", f"{pki}/server.key", f"{pki}/CA.pem"
    if kind == "asyncio":
        import asyncio

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
        context.load_cert_chain(cert, key)
        context.verify_mode = ssl.CERT_OPTIONAL

        class Canned(asyncio.Protocol):
            buffer = b""

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def data_received(self, data: bytes) -> None:
                count, self.buffer = split_requests(self.buffer + data)
                if count:
                    self.transport.write(REPLY * count)  # type: ignore[attr-defined]

        async def main() -> None:
            loop = asyncio.get_running_loop()
            server = await loop.create_server(Canned, "127.0.0.1", port, ssl=context)
            await server.serve_forever()

        asyncio.run(main())
        return

    from twisted.internet import reactor
    from twisted.internet import ssl as tssl
    from twisted.internet.protocol import Factory, Protocol

    with open(ca, "rb") as f:
        authority = tssl.Certificate.loadPEM(f.read())
    with open(cert, "rb") as f, open(key, "rb") as g:
        options = tssl.PrivateCertificate.loadPEM(f.read() + g.read()).options(authority)
    if kind == "twisted":

        class TwistedCanned(Protocol):
            buffer = b""

            def dataReceived(self, data: bytes) -> None:
                count, self.buffer = split_requests(self.buffer + data)
                if count:
                    self.transport.write(REPLY * count)  # type: ignore[union-attr]

        reactor.listenSSL(  # type: ignore[attr-defined]
            port, Factory.forProtocol(TwistedCanned), options, interface="127.0.0.1"
        )
    else:
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        class Leaf(Resource):
            isLeaf = True

            def render_POST(self, request: object) -> bytes:
                request.content.read()  # type: ignore[attr-defined]
                request.setHeader(b"content-type", b"application/json")  # type: ignore
                return REPLY_BODY

        reactor.listenSSL(port, Site(Leaf()), options, interface="127.0.0.1")  # type: ignore
    reactor.run()


def cpu_seconds(pid: int) -> float:
    """
    User and system CPU of process C{pid} so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """
    Wait until 127.0.0.1:C{port} accepts TCP connections.
    """
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout:g}s")


def measure(kind: str, pki: str, calls: int, context: ssl.SSLContext) -> tuple[float, ...]:
    """
    One run against a fresh C{kind} server: (p50 ms, p99 ms, server CPU ms per call).
    """
    from bench.scale import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.floor", "--serve", kind, str(port), pki], cwd=REPO
    )
    try:
        wait_listening(port)
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context)
        body = json.dumps({"IpAddress": "10.0.0.1"}).encode()
        headers = {"Content-Type": "application/json"}
        latencies = []
        before = cpu_seconds(server.pid)
        for _ in range(calls):
            start = time.perf_counter()
            connection.request("POST", "/rpc/Hypervisor.GetVmInfo", body=body, headers=headers)
            response = connection.getresponse()
            if response.read() != REPLY_BODY:
                raise RuntimeError(f"{kind}: not the canned reply")
            latencies.append(time.perf_counter() - start)
        used = cpu_seconds(server.pid) - before
        connection.close()
    finally:
        server.kill()
        server.wait()
    kept = sorted(latencies[calls // 10 :])
    return (
        kept[len(kept) // 2] * 1e3,
        kept[min(len(kept) - 1, int(len(kept) * 0.99))] * 1e3,
        used / calls * 1e3,
    )


def rss_of_imports(statement: str, optimize: int, pycache: str) -> tuple[float, float]:
    """
    (VmRSS, RssAnon) in MiB of a fresh interpreter after C{statement}; run twice, the
    second run's figures (bytecode cached by the first).
    """
    probe = (
        f"{statement}\nimport gc, re\ngc.collect()\n"
        "s = open('/proc/self/status').read()\n"
        "print(*(int(re.search(k + r':\\s+(\\d+)', s).group(1)) for k in ('VmRSS', 'RssAnon')))"
    )
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONPYCACHEPREFIX=pycache)
    env["PYTHONOPTIMIZE"] = str(optimize)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = ""
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True
        ).stdout
    rss, anon = (int(v) / 1024 for v in out.split())
    return rss, anon


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").strip().split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=3000, help="requests per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per server (median kept)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="which canned servers")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve[0], int(args.serve[1]), args.serve[2])
        return 0
    kinds = [k for k in args.servers.split(",") if k]
    unknown = [k for k in kinds if k not in SERVERS]
    if unknown:
        parser.error(f"--servers: unknown {unknown}; choose from {','.join(SERVERS)}")

    from bench.scale import Daemon

    work = tempfile.mkdtemp(prefix="bench-floor-")
    daemon = Daemon(work, fake_cpus=False)
    for d in (daemon.pki + "/users", daemon.state_dir):
        os.makedirs(d, exist_ok=True)
    context = daemon.make_certs()  # CA.pem, server.pem/.key, a user's certificate

    runs: dict[str, list[tuple[float, ...]]] = {k: [] for k in kinds}
    for run in range(args.runs):
        for kind in kinds:
            result = measure(kind, daemon.pki, args.calls, context)
            runs[kind].append(result)
            print(
                f"run {run + 1}: {SERVERS[kind]}: p50 {result[0]:.3f} ms, p99 "
                f"{result[1]:.3f} ms, server CPU {result[2]:.3f} ms per call",
                file=sys.stderr,
                flush=True,
            )

    print(f"\nbench.floor: one keep-alive HTTPS connection, {args.calls} calls per run")
    print(f"{'canned reply (ms)':40s} {'p50':>7s} {'p99':>7s} {'CPU/call':>9s}  p50/Go  p99/Go")
    print(
        f"{'Go hypervisor, GetVmInfo (issue 10)':40s} {GO_GETVMINFO[0]:7.3f} {GO_GETVMINFO[1]:7.3f}"
        f" {'-':>9s}"
    )
    for kind in kinds:
        p50, p99, cpu = (statistics.median(r[i] for r in runs[kind]) for i in range(3))
        print(
            f"{SERVERS[kind]:40s} {p50:7.3f} {p99:7.3f} {cpu:9.3f}  "
            f"{p50 / GO_GETVMINFO[0]:5.2f}x  {p99 / GO_GETVMINFO[1]:5.2f}x"
        )

    pycache = os.path.join(work, "pycache")
    print(
        f"\n{'imported (bytecode cached)':58s} {'RSS MiB':>8s} {'anon':>6s}  goal <= {RSS_GOAL:g}"
    )
    for label, statement, optimize in IMPORT_SETS:
        rss, anon = rss_of_imports(statement, optimize, pycache)
        print(f"{label:58s} {rss:8.1f} {anon:6.1f}")
    print(f"(Go hypervisor at 1000 VMs: {GO_RSS:g} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
