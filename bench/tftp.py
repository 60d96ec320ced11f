# -*- test-case-name: tests.test_bench_tftp_smoke -*-
"""
The TFTP server's speed (issue 16) beside tftpd-hpa and atftpd, measured the same way
in the same run, on loopback:

    sudo .venv/bin/python -m bench.tftp [--size-mib 64] [--runs 5] [--servers ours,hpa,atftpd]
        [--small 400] [--concurrency 32]

Install: C{tools/setup.sh --bench} (Debian C{tftpd-hpa} and C{atftp}; C{atftpd}
unpacked into C{/opt/atftpd}, as it conflicts with C{tftpd-hpa}).

The servers, each serving the same temporary directory on 127.0.0.1:

- B{ours}: C{python -m hypervisor.tftp} (the daemon's L{TftpService} alone);
- B{hpa}: C{in.tftpd -L -s -a 127.0.0.1:PORT DIR} (lock-step only: it ignores
  C{windowsize});
- B{atftpd}: C{atftpd --daemon --no-fork} (grants C{windowsize}).

1. B{Throughput}: a C{--size-mib} file of random bytes fetched by C{atftp} with
   C{blksize 1428} and C{windowsize} 1, 8 and 16 (tftpd-hpa: 1 only), C{--runs}
   times per cell, the cells' runs interleaved so that load from other work on the
   machine falls on every server alike; MiB/s as the median (min-max beside), every
   fetched copy compared with the original.
2. B{Many small transfers}: C{--small} fetches of 64 KiB files (blksize 1428, no
   window) by a client in this process keeping C{--concurrency} transfers in flight
   (raw UDP sockets and C{selectors}, one socket per transfer), C{--runs} rounds with
   the servers interleaved; transfers per second (median of the rounds, min-max)
   and the median and p99 of a transfer's time over all rounds.

This machine has 2 vCPUs shared with other work: client, server and kernel compete
for them, so compare columns of one run, not runs. Exit status: 0 when every server
was measured, 1 when a measure failed, 2 when it cannot run here.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATFTPD = "/opt/atftpd/usr/sbin/atftpd"
SERVERS = ("ours", "hpa", "atftpd")
WINDOWS = (1, 8, 16)


def free_udp_port() -> int:
    """
    A UDP port on 127.0.0.1 free a moment ago.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class Server:
    """
    One TFTP server process serving C{root} on 127.0.0.1.
    """

    def __init__(self, kind: str, root: str) -> None:
        self.kind = kind
        self.port = free_udp_port()
        if kind == "ours":
            argv = [sys.executable, "-m", "hypervisor.tftp", "--root", root]
            argv += ["--port", str(self.port), "--interface", "127.0.0.1"]
        elif kind == "hpa":
            argv = ["in.tftpd", "-L", "-s", "-a", f"127.0.0.1:{self.port}", root]
        elif kind == "atftpd":
            argv = [ATFTPD, "--daemon", "--no-fork", "--port", str(self.port)]
            argv += ["--bind-address", "127.0.0.1", "--user", "root", "--group", "root"]
            argv += ["--logfile", "/dev/null", root]
        else:
            raise ValueError(kind)
        env = dict(os.environ, PYTHONPATH=REPO)
        self.process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=REPO
        )
        if kind == "ours":
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            if not line.startswith(b"ready"):
                raise RuntimeError(f"our server did not start: {line!r}")
        else:
            time.sleep(0.5)
        if self.process.poll() is not None:
            raise RuntimeError(f"{kind} exited at once ({self.process.returncode})")

    def stop(self) -> None:
        """
        Stop the server (SIGTERM, then SIGKILL after 10 s).
        """
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def available(kind: str) -> Optional[str]:
    """
    Why server C{kind} cannot run here (None: it can).
    """
    if kind == "hpa" and shutil.which("in.tftpd") is None:
        return "in.tftpd is not installed (Debian tftpd-hpa)"
    if kind == "atftpd" and not os.access(ATFTPD, os.X_OK):
        return f"{ATFTPD} is missing (tools/setup.sh --bench unpacks it)"
    return None


def fetch(port: int, name: str, out: str, window: int) -> float:
    """
    Fetch C{name} with atftp; the seconds it took.
    """
    argv = ["atftp", "--option", "blksize 1428"]
    if window > 1:
        argv += ["--option", f"windowsize {window}"]
    argv += ["-g", "-r", name, "-l", out, "127.0.0.1", str(port)]
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, timeout=300)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"atftp failed: {result.stdout!r} {result.stderr!r}")
    return seconds


def same(a: str, b: str) -> bool:
    """
    Whether files C{a} and C{b} hold the same bytes.
    """
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


class SmallTransfer:
    """
    One lock-step fetch by raw UDP (blksize 1428).
    """

    def __init__(self, port: int, name: str, expect: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.server = ("127.0.0.1", port)
        self.expect = expect
        self.received = 0
        self.start = time.perf_counter()
        self.last_send = self.start
        self.last_packet = b"\x00\x01" + name.encode() + b"\x00octet\x00blksize\x001428\x00"
        self.sock.sendto(self.last_packet, self.server)
        self.peer: Optional[tuple[str, int]] = None
        self.block = 0
        self.done = False

    def readable(self) -> None:
        """
        Take what arrived: OACK, DATA (in order: ACKed), or ERROR.
        """
        while True:
            try:
                data, addr = self.sock.recvfrom(2048)
            except BlockingIOError:
                return
            opcode = struct.unpack_from("!H", data)[0]
            if self.peer is None:
                self.peer = addr
            if opcode == 6:  # OACK
                self._send(struct.pack("!HH", 4, 0))
            elif opcode == 3:
                block = struct.unpack_from("!H", data, 2)[0]
                if block == (self.block + 1) & 0xFFFF:
                    self.block += 1
                    self.received += len(data) - 4
                    self._send(struct.pack("!HH", 4, block))
                    if len(data) - 4 < 1428:
                        self.done = True
                        return
            elif opcode == 5:
                raise RuntimeError(f"server error: {data!r}")

    def _send(self, packet: bytes) -> None:
        self.last_packet = packet
        self.last_send = time.perf_counter()
        assert self.peer is not None
        self.sock.sendto(packet, self.peer)

    def retry(self, now: float) -> None:
        """
        Send the last packet again after a second without progress.
        """
        if now - self.last_send > 1.0:
            self.last_send = now
            self.sock.sendto(self.last_packet, self.peer or self.server)


def many_small(
    port: int, names: list[str], size: int, total: int, concurrency: int
) -> tuple[float, list[float]]:
    """
    C{total} fetches of the small files, C{concurrency} at a time; (seconds, each
    transfer's seconds).
    """
    selector = selectors.DefaultSelector()
    started = 0
    times: list[float] = []
    active: dict[int, SmallTransfer] = {}
    begin = time.perf_counter()
    deadline = begin + 300
    while len(times) < total:
        while started < total and len(active) < concurrency:
            t = SmallTransfer(port, names[started % len(names)], size)
            active[t.sock.fileno()] = t
            selector.register(t.sock, selectors.EVENT_READ, t)
            started += 1
        for key, _ in selector.select(0.05):
            t = key.data
            t.readable()
            if t.done:
                if t.received != size:
                    raise RuntimeError(f"got {t.received} bytes, not {size}")
                times.append(time.perf_counter() - t.start)
                selector.unregister(t.sock)
                del active[t.sock.fileno()]
                t.sock.close()
        now = time.perf_counter()
        if now > deadline:
            raise RuntimeError("small transfers did not finish in 300 s")
        for t in list(active.values()):
            t.retry(now)
    return time.perf_counter() - begin, times


def main(argv: Optional[list[str]] = None) -> int:
    """
    Run the benchmark; print the tables; the exit status.
    """
    parser = argparse.ArgumentParser(prog="python -m bench.tftp")
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--small", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    servers = [s for s in args.servers.split(",") if s]
    if shutil.which("atftp") is None:
        print("atftp is not installed (Debian atftp): tools/setup.sh --bench", file=sys.stderr)
        return 2
    for kind in servers:
        why = available(kind)
        if why:
            print(f"{kind}: {why}", file=sys.stderr)
            return 2
    top = tempfile.mkdtemp(prefix="hv-bench-tftp-")
    os.chmod(top, 0o755)
    root = os.path.join(top, "root")
    os.makedirs(root)
    big = os.path.join(root, "big.bin")
    with open(big, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(1 << 20))
    small_size = 64 * 1024
    names = []
    for i in range(16):
        name = f"small{i}.bin"
        with open(os.path.join(root, name), "wb") as f:
            f.write(os.urandom(small_size))
        names.append(name)
    running: dict[str, Server] = {}
    failed = False
    try:
        for kind in servers:
            running[kind] = Server(kind, root)
        cells = [(k, w) for k in servers for w in WINDOWS if not (k == "hpa" and w > 1)]
        times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
        ok: dict[tuple[str, int], bool] = {c: True for c in cells}
        out = os.path.join(top, "out.bin")
        for run in range(args.runs):
            for cell in cells:
                kind, window = cell
                try:
                    times[cell].append(fetch(running[kind].port, "big.bin", out, window))
                    if run == 0:
                        ok[cell] = same(out, big)
                except Exception as e:
                    print(f"{kind} windowsize {window}: {e}", file=sys.stderr)
                    ok[cell] = False
                    failed = True
                if os.path.exists(out):
                    os.unlink(out)
        # The small phase as the throughput one: --runs rounds, servers interleaved;
        # each server's rates (one a round) and every transfer's time pooled.
        small: dict[str, tuple[list[float], list[float]]] = {}
        broken: set[str] = set()
        for run in range(args.runs if args.small > 0 else 0):
            for kind in servers:
                if kind in broken:
                    continue
                try:
                    seconds, each = many_small(
                        running[kind].port, names, small_size, args.small, args.concurrency
                    )
                except Exception as e:
                    print(f"{kind} small transfers: {e}", file=sys.stderr)
                    broken.add(kind)
                    small.pop(kind, None)
                    failed = True
                    continue
                rates, pooled = small.setdefault(kind, ([], []))
                rates.append(args.small / seconds)
                pooled.extend(each)
    finally:
        for server in running.values():
            server.stop()
        shutil.rmtree(top, ignore_errors=True)

    print()
    print(
        f"TFTP on loopback, {args.size_mib} MiB file, atftp client, blksize 1428, "
        f"median of {args.runs} runs (min-max), MiB/s"
    )
    header = f"{'windowsize':<12}" + "".join(f"{k:>24}" for k in servers)
    print(header)
    print("-" * len(header))
    for window in WINDOWS:
        row = f"{window:<12}"
        for kind in servers:
            cell = (kind, window)
            if cell not in times:
                row += f"{'(lock-step only)':>24}"
                continue
            rates = [args.size_mib / t for t in times[cell]]
            if not rates:
                row += f"{'failed':>24}"
                continue
            text = f"{statistics.median(rates):.1f} ({min(rates):.0f}-{max(rates):.0f})"
            if not ok[cell]:
                text += " BAD"
            row += f"{text:>24}"
        print(row)
    print()
    if args.small > 0:  # --small 0: throughput only
        print(
            f"{args.small} fetches of 64 KiB (blksize 1428, lock-step), {args.concurrency} in "
            f"flight, one raw UDP client; {args.runs} rounds: transfers/s as the median "
            "(min-max), times over all rounds"
        )
        header = f"{'':<24}" + "".join(f"{k:>18}" for k in servers)
        print(header)
        print("-" * len(header))
    rows = (
        []
        if args.small <= 0
        else [
            (
                "transfers/s",
                lambda s: f"{statistics.median(s[0]):.0f} ({min(s[0]):.0f}-{max(s[0]):.0f})",
            ),
            ("median transfer ms", lambda s: f"{statistics.median(s[1]) * 1000:.1f}"),
            (
                "p99 transfer ms",
                lambda s: f"{sorted(s[1])[max(0, int(len(s[1]) * 0.99) - 1)] * 1000:.1f}",
            ),
        ]
    )
    for label, show in rows:
        print(
            f"{label:<24}"
            + "".join(f"{(show(small[k]) if k in small else 'failed'):>18}" for k in servers)
        )
    print()
    print(
        f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
