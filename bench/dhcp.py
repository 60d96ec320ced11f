# -*- test-case-name: tests.test_bench_dhcp_smoke -*-
"""
The DHCP server's speed (issue 11) beside Kea and dnsmasq, measured the same way in
the same run: C{perfdhcp} sends DORA exchanges for the same static leases to each
server in turn, on the same private network.

    sudo .venv/bin/python -m bench.dhcp [--leases 1000] [--period 5]
        [--servers ours,kea,dnsmasq] [--latency-rate 1000] [--profile]

Install: C{tools/setup.sh --bench} (Debian C{kea-admin} for C{perfdhcp},
C{kea-dhcp4-server}, C{dnsmasq-base}, C{tcpdump}); as root (network namespaces).

The network (L{tests.netns.World}: C{unshare -nm}, vanishes with the run): bridge
C{br0} holding 10.50.0.1/16, and a namespace C{perf} whose C{eth0} (10.50.255.2/16)
is joined to it by a veth pair. C{perfdhcp -l eth0} runs there as a relay agent
(C{giaddr} 10.50.255.2, replies to port 67), each exchange for a MAC drawn from the
list of leased MACs (C{-M}). The servers, one at a time, serve C{br0}:

- B{ours}: the daemon itself (C{python -m hypervisor ... run}, libvirt's test
  driver) on a state directory holding subnet C{bench} (10.50.0.0/16, router, DNS,
  domain) and one stopped VM per lease (MAC, address, host name);
- B{kea}: C{kea-dhcp4} with one host reservation per lease (hardware address,
  address, host name) in the same subnet, the same options, in-memory leases not
  persisted, UDP sockets;
- B{dnsmasq}: C{dnsmasq} with one C{dhcp-host} per lease, C{static} range, the same
  options, C{--quiet-dhcp} (no log line per packet), lease file read-only.

Per server:

1. B{latency}: C{--latency-rate} DORA/s for C{--period} seconds while C{tcpdump}
   captures on the relay's C{eth0}; the time from each DISCOVER to its OFFER and each
   REQUEST to its ACK (kernel timestamps, pooled), median and p99; the server's CPU
   (C{utime}+C{stime} of its process) over that run divided by the DORAs completed;
2. B{rate}: C{perfdhcp -r R} for C{--period} seconds at rising R (doubling from
   C{--start-rate}), then bisected between the last rate with drops (DISCOVERs and
   REQUESTs unanswered within 1 s) under 1 % and the first at or above it; the
   highest such rate, as ACKs received per second. A step where perfdhcp could not send at
   the requested rate is marked C{(generator)}: the figure is then perfdhcp's limit on
   these cores, not the server's.

The table has one column per server; it says what bounds each figure. This machine
has 2 vCPUs shared with other work: perfdhcp, the server and the kernel's veth and
bridge all compete for them, so compare columns of one run, not runs.

C{--profile} attaches C{py-spy record} to our daemon during an extra run at the
highest rate it sustained and prints its top functions (self and cumulative).

Exit status: 0 when every server was measured, 1 when a measure failed, 2 when it
cannot run here. The smoke mode (our server only, a few seconds) is run by
C{tests.test_bench_dhcp_smoke}; CI never runs the real thing.
"""

from __future__ import annotations

import abc
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from hypervisor import codec  # noqa: E402
from hypervisor.model import Address, LocalVmInfo, State, Subnet, VmInfo  # noqa: E402
from tests import netns  # noqa: E402

BRIDGE = "br0"
GATEWAY = "10.50.0.1"
MASK = "255.255.0.0"
NETWORK = "10.50.0.0/16"
RELAY = "10.50.255.2"
DNS = "10.50.0.53"
DOMAIN = "bench.example"
LEASE_TIME = 48 * 3600
SERVERS = ("ours", "kea", "dnsmasq")
DROP_LIMIT = 1.0  # per cent


class CannotRun(Exception):
    """
    The bench cannot run here (not root, a tool missing, a server does not start).
    """


@dataclass(frozen=True)
class Lease:
    """
    One static lease, the same for every server.
    """

    mac: str
    ip: str
    hostname: str


def leases(count: int) -> list[Lease]:
    """
    C{count} leases: MACs 52:54:0a:32:HH:LL, addresses from 10.50.1.10 on.
    """
    out = []
    for i in range(count):
        mac = f"52:54:0a:32:{i // 256:02x}:{i % 256:02x}"
        ip = f"10.50.{1 + i // 200}.{10 + i % 200}"
        out.append(Lease(mac, ip, f"vm{i}"))
    return out


# Servers ------------------------------------------------------------------------------


class Server(abc.ABC):
    """
    A DHCP server run inside the world (each peer says how it is started: L{argv}).
    """

    name = ""

    def __init__(self, world: netns.World, table: list[Lease]) -> None:
        self.world = world
        self.leases = table
        self.dir = os.path.join(world.dir, self.name)
        os.makedirs(self.dir)
        os.chmod(self.dir, 0o755)
        self.output_path = os.path.join(self.dir, "output.log")
        self.process: Optional[subprocess.Popen[bytes]] = None

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """
        The server's command line.
        """

    def env(self) -> Optional[dict[str, str]]:
        return None

    def cwd(self) -> str:
        return self.dir

    def ready(self) -> bool:
        """
        Whether it answers DHCP now (after the process started).
        """
        out = self.world.run("ss", "-Hlunp", "sport", "=", ":67", check=False)
        return f"pid={self.pid}," in out

    def start(self, timeout: float = 90) -> None:
        """
        Start it; wait until it is ready.
        """
        with open(self.output_path, "ab") as output:
            self.process = self.world.spawn(
                self.argv(), env=self.env(), stdout=output, stderr=subprocess.STDOUT, cwd=self.cwd()
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CannotRun(f"{self.name} exited:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise CannotRun(f"{self.name} did not start serving in {timeout:g}s:\n{self.tail()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float:
        """
        The process's CPU time so far (user + system, all its threads).
        """
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def tail(self, lines: int = 30) -> str:
        try:
            with open(self.output_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except FileNotFoundError:
            return ""

    def version(self) -> str:
        return ""


class Ours(Server):
    """
    The daemon (C{python -m hypervisor run}) with one stopped VM per lease.
    """

    name = "ours"

    source = REPO

    def __init__(self, world: netns.World, table: list[Lease]) -> None:
        super().__init__(world, table)
        self.state = os.path.join(self.dir, "state")
        os.makedirs(self.state)
        subnet = Subnet(
            Id="bench",
            IpGateway=GATEWAY,
            IpMask=MASK,
            DomainName=DOMAIN,
            DomainNameServers=[DNS],
        )
        with open(os.path.join(self.state, "subnets.json"), "wb") as f:
            f.write(codec.encode([subnet], indent=4))
        for lease in table:
            directory = os.path.join(self.state, "VMs", lease.ip)
            os.makedirs(directory)
            info = VmInfo(
                Address=Address(lease.ip, lease.mac),
                Hostname=lease.hostname,
                SubnetId="bench",
                State=State.STOPPED,
                MemoryInMiB=1,
                MilliCPUs=1,
                OwnerUsers=["bench"],
            )
            with open(os.path.join(directory, "info.json"), "wb") as f:
                f.write(codec.encode(LocalVmInfo(VmInfo=info)))

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "hypervisor",
            f"-stateDir={self.state}",
            f"-logDir={self.dir}/log",
            "-portNum=6976",
            "-libvirtUri=test:///default",
            "-domainType=qemu",
            f"-volumeDirectories={self.dir}/volumes",
            "run",
        ]

    def env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONPATH=self.source, HYPERVISOR_FLAGS_DIRECTORY=self.dir)

    def cwd(self) -> str:
        return self.source

    def ready(self) -> bool:
        return f"DHCP: serving {BRIDGE}" in self.tail(10**6)

    def version(self) -> str:
        commit = subprocess.run(
            ["git", "-C", self.source, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        where = "" if self.source == REPO else f" from {self.source}"
        return f"git {commit or '?'}{where}, Python {sys.version.split()[0]}"


class Kea(Server):
    """
    C{kea-dhcp4} with one host reservation per lease.
    """

    name = "kea"

    def __init__(self, world: netns.World, table: list[Lease]) -> None:
        super().__init__(world, table)
        config = {
            "Dhcp4": {
                "interfaces-config": {"interfaces": [BRIDGE], "dhcp-socket-type": "udp"},
                "lease-database": {"type": "memfile", "persist": False},
                "host-reservation-identifiers": ["hw-address"],
                "valid-lifetime": LEASE_TIME,
                "subnet4": [
                    {
                        "id": 1,
                        "subnet": NETWORK,
                        "option-data": [
                            {"name": "routers", "data": GATEWAY},
                            {"name": "domain-name-servers", "data": DNS},
                            {"name": "domain-name", "data": DOMAIN},
                        ],
                        "reservations": [
                            {"hw-address": x.mac, "ip-address": x.ip, "hostname": x.hostname}
                            for x in table
                        ],
                    }
                ],
                "loggers": [
                    {
                        "name": "kea-dhcp4",
                        "output_options": [{"output": "stdout"}],
                        "severity": "WARN",
                    }
                ],
            }
        }
        self.config = os.path.join(self.dir, "kea-dhcp4.conf")
        with open(self.config, "w") as f:
            json.dump(config, f)

    def argv(self) -> list[str]:
        return [_tool("kea-dhcp4"), "-c", self.config]

    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            KEA_PIDFILE_DIR=self.dir,
            KEA_LOCKFILE_DIR=self.dir,
            KEA_LOGGER_DESTINATION="stdout",
        )

    def version(self) -> str:
        return _first_line([_tool("kea-dhcp4"), "-v"])


class Dnsmasq(Server):
    """
    C{dnsmasq} (DHCP only) with one C{dhcp-host} per lease.
    """

    name = "dnsmasq"

    def __init__(self, world: netns.World, table: list[Lease]) -> None:
        super().__init__(world, table)
        self.hosts = os.path.join(self.dir, "hosts")
        with open(self.hosts, "w") as f:
            f.writelines(f"{x.mac},{x.ip},{x.hostname}\n" for x in table)

    def argv(self) -> list[str]:
        return [
            _tool("dnsmasq"),
            "--keep-in-foreground",
            "--no-daemon",
            "--port=0",
            "--conf-file=/dev/null",
            f"--interface={BRIDGE}",
            "--bind-interfaces",
            f"--dhcp-range={NETWORK.split('/')[0]},static,{MASK},{LEASE_TIME}",
            f"--dhcp-hostsfile={self.hosts}",
            f"--dhcp-option=option:router,{GATEWAY}",
            f"--dhcp-option=option:dns-server,{DNS}",
            f"--dhcp-option=option:domain-name,{DOMAIN}",
            "--leasefile-ro",
            "--quiet-dhcp",
            f"--pid-file={self.dir}/dnsmasq.pid",
        ]

    def version(self) -> str:
        return _first_line([_tool("dnsmasq"), "--version"])


SERVER_TYPES: dict[str, Callable[[netns.World, list[Lease]], Server]] = {
    "ours": Ours,
    "kea": Kea,
    "dnsmasq": Dnsmasq,
}

PEER_TOOLS = {"kea": "kea-dhcp4 (Debian kea-dhcp4-server)", "dnsmasq": "dnsmasq (dnsmasq-base)"}


def _tool(name: str) -> str:
    for directory in ("/usr/sbin", "/usr/bin", "/sbin"):
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name) or name


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


# perfdhcp -----------------------------------------------------------------------------


@dataclass
class PerfResult:
    """
    What one perfdhcp run reported.
    """

    requested: int
    period: float = 1.0
    sent: dict[str, int] = field(default_factory=dict)  # "DO"/"RA" -> sent
    received: dict[str, int] = field(default_factory=dict)
    cpu: float = 0.0  # server CPU seconds over the run
    output: str = ""

    @property
    def rate(self) -> float:
        """
        DORA/s completed (ACKs received over the period).
        """
        return self.doras / self.period

    @property
    def drops(self) -> float:
        """
        Unanswered DISCOVERs and REQUESTs, per cent of those sent.
        """
        sent = sum(self.sent.values())
        if not sent:
            return 100.0
        return 100.0 * (sent - sum(self.received.values())) / sent

    @property
    def doras(self) -> int:
        """
        Completed DORA exchanges (ACKs received).
        """
        return self.received.get("RA", 0)

    @property
    def generator_bound(self) -> bool:
        """
        Whether perfdhcp failed to send DISCOVERs at the requested rate.
        """
        return self.sent.get("DO", 0) < 0.9 * self.requested * self.period


def parse_perfdhcp(text: str, requested: int, period: float) -> PerfResult:
    """
    perfdhcp's final report.
    """
    result = PerfResult(requested, period, output=text)
    for label, key in (("DISCOVER-OFFER", "DO"), ("REQUEST-ACK", "RA")):
        section = text.split(f"Statistics for: {label}", 1)
        if len(section) < 2:
            continue
        body = section[1].lstrip("*").split("***", 1)[0]
        sent = re.search(r"^sent packets: (\d+)", body, re.M)
        received = re.search(r"^received packets: (\d+)", body, re.M)
        result.sent[key] = int(sent.group(1)) if sent else 0
        result.received[key] = int(received.group(1)) if received else 0
    return result


def perfdhcp(world: netns.World, server: Server, macs: str, rate: int, period: float) -> PerfResult:
    """
    One perfdhcp run at C{rate} DORA/s for C{period} seconds against C{server}.
    """
    argv = ["perfdhcp", "-4", "-l", "eth0", "-r", str(rate), "-p", f"{period:g}", "-M", macs]
    argv += ["-W", "1000000", GATEWAY]
    before = server.cpu_seconds()
    result = world.client("perf", *argv, timeout=period + 60)
    after = server.cpu_seconds()
    parsed = parse_perfdhcp(result.stdout, rate, period)
    parsed.cpu = after - before
    if not parsed.sent:
        raise RuntimeError(f"perfdhcp reported nothing:\n{result.stdout}{result.stderr}")
    return parsed


# Packet capture -----------------------------------------------------------------------


class Capture:
    """
    tcpdump on the relay's eth0, to a pcap file.
    """

    def __init__(self, world: netns.World, path: str) -> None:
        self.path = path
        self.errors = os.path.join(world.dir, "tcpdump.err")
        with open(self.errors, "wb") as err:
            self.process = world.spawn(
                ["ip", "netns", "exec", "perf", "tcpdump", "-i", "eth0", "-n", "-s", "600"]
                + ["-B", "16384", "-U", "-w", path, "udp port 67 or udp port 68"],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if "listening on" in self._errors():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise CannotRun(f"tcpdump did not start: {self._errors()}")

    def _errors(self) -> str:
        with open(self.errors, errors="replace") as f:
            return f.read()

    def stop(self) -> str:
        """
        Stop the capture; return tcpdump's summary (with kernel drops).
        """
        time.sleep(0.2)
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        return self._errors()


REQUEST_KIND = {1: "DO", 3: "RA"}  # DISCOVER, REQUEST
REPLY_KIND = {2: "DO", 5: "RA", 6: "RA"}  # OFFER, ACK, NAK


def read_pcap(path: str) -> list[tuple[float, bytes]]:
    """
    The (timestamp, frame) records of a pcap file (micro- or nanosecond).
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    else:
        endian = ">"
    (magic_value,) = struct.unpack(endian + "I", magic)
    scale = 1e-9 if magic_value == 0xA1B23C4D else 1e-6
    out = []
    offset = 24
    while offset + 16 <= len(data):
        seconds, fraction, length, _ = struct.unpack_from(endian + "IIII", data, offset)
        offset += 16
        out.append((seconds + fraction * scale, data[offset : offset + length]))
        offset += length
    return out


def dhcp_of(frame: bytes) -> Optional[tuple[int, int]]:
    """
    C{(xid, message type)} of an Ethernet/IPv4/UDP DHCP frame, or None.
    """
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    ip = 14
    header = (frame[ip] & 0x0F) * 4
    bootp = ip + header + 8
    if len(frame) < bootp + 240 or frame[bootp + 236 : bootp + 240] != b"\x63\x82\x53\x63":
        return None
    (xid,) = struct.unpack_from("!I", frame, bootp + 4)
    i = bootp + 240
    while i < len(frame):
        code = frame[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= len(frame):
            break
        length = frame[i + 1]
        if code == 53 and length == 1 and i + 2 < len(frame):
            return xid, frame[i + 2]
        i += 2 + length
    return None


def latencies(path: str) -> list[float]:
    """
    Seconds from each DISCOVER/REQUEST to the first OFFER/ACK with its xid.
    """
    sent: dict[tuple[int, str], float] = {}
    out = []
    for stamp, frame in read_pcap(path):
        found = dhcp_of(frame)
        if found is None:
            continue
        xid, kind = found
        if kind in REQUEST_KIND:
            sent.setdefault((xid, REQUEST_KIND[kind]), stamp)
        elif kind in REPLY_KIND:
            start = sent.pop((xid, REPLY_KIND[kind]), None)
            if start is not None:
                out.append(stamp - start)
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(p / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


# The measures -------------------------------------------------------------------------


@dataclass
class Measures:
    """
    One server's row of figures.
    """

    name: str
    version: str = ""
    max_rate: Optional[PerfResult] = None
    first_failing: Optional[PerfResult] = None
    steps: list[PerfResult] = field(default_factory=list)
    latency_run: Optional[PerfResult] = None
    latency: list[float] = field(default_factory=list)
    error: str = ""
    profile: str = ""


def find_max_rate(
    run: Callable[[int], PerfResult], start: int, limit: int, bisections: int
) -> tuple[Optional[PerfResult], Optional[PerfResult], list[PerfResult]]:
    """
    The highest rate with drops under 1 %: doubling from C{start} up to C{limit},
    then C{bisections} halvings of the interval between the last good rate and the
    first bad one. A rate perfdhcp could not send at ends the search.
    """
    steps: list[PerfResult] = []
    good: Optional[PerfResult] = None
    bad: Optional[PerfResult] = None
    rate = start
    while rate <= limit:
        result = run(rate)
        steps.append(result)
        if result.drops >= DROP_LIMIT:
            bad = result
            break
        good = result
        if result.generator_bound:
            return good, bad, steps
        rate *= 2
    low = good.requested if good is not None else 0
    for _ in range(bisections if bad is not None else 0):
        assert bad is not None
        middle = (low + bad.requested) // 2
        if middle <= low or middle >= bad.requested:
            break
        result = run(middle)
        steps.append(result)
        if result.drops >= DROP_LIMIT:
            bad = result
        else:
            good = result
            low = middle
    return good, bad, steps


def measure(
    world: netns.World, server: Server, macs: str, settings: argparse.Namespace, log: Any
) -> Measures:
    """
    Every figure of one server.
    """
    m = Measures(server.name, server.version())
    server.start()
    try:
        # Warm up: every lease once (the servers' first answers build their state).
        perfdhcp(world, server, macs, max(50, settings.latency_rate // 4), 1)
        capture_path = os.path.join(world.dir, f"{server.name}.pcap")
        capture = Capture(world, capture_path)
        try:
            m.latency_run = perfdhcp(world, server, macs, settings.latency_rate, settings.period)
        finally:
            summary = capture.stop()
        m.latency = latencies(capture_path)
        log(
            f"{server.name}: {settings.latency_rate}/s: drops {m.latency_run.drops:.2f} %, "
            f"{len(m.latency)} replies timed; tcpdump: "
            + " ".join(line for line in summary.splitlines() if "dropped" in line)
        )

        def step(rate: int) -> PerfResult:
            result = perfdhcp(world, server, macs, rate, settings.period)
            log(
                f"{server.name}: -r {rate}: achieved {result.rate:.0f}/s, drops "
                f"{result.drops:.2f} %, CPU {result.cpu:.2f} s"
            )
            return result

        m.max_rate, m.first_failing, m.steps = find_max_rate(
            step, settings.start_rate, settings.max_rate, settings.bisections
        )
        if settings.profile and server.name == "ours":
            rate = m.max_rate.requested if m.max_rate is not None else settings.latency_rate
            m.profile = profile(world, server, macs, rate, settings.period, settings.profile_out)
    finally:
        server.stop()
    return m


def profile(
    world: netns.World, server: Server, macs: str, rate: int, period: float, keep: str = ""
) -> str:
    """
    py-spy's top functions of our daemon during a run at C{rate}.
    """
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    out = os.path.join(world.dir, "profile.txt")
    recorder = subprocess.Popen(
        [spy, "record", "--nonblocking", "-r", "250", "-f", "raw", "-o", out]
        + ["-d", f"{period + 1:g}", "-p", str(server.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    perfdhcp(world, server, macs, rate, period)
    recorder.wait(60)
    return summarize_profile(out, keep=keep)


def summarize_profile(path: str, top: int = 25, keep: str = "") -> str:
    """
    Self and cumulative time of the top functions in py-spy's collapsed stacks.
    """
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return "(no profile: py-spy failed)"
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        try:
            count = int(count_text)
        except ValueError:
            continue
        frames = stack.split(";")
        if any("epoll" in f or "select" in f.split(" ")[0] for f in frames[-1:]):
            continue
        samples += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    lines_out = [f"busy samples: {samples}", "self:"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines_out.append(f"  {100 * count / max(samples, 1):5.1f} %  {frame}")
    lines_out.append("cumulative, frames of hypervisor/ (the DHCP server's own code):")
    ours = [(frame, count) for frame, count in total.items() if "hypervisor/" in frame]
    for frame, count in sorted(ours, key=lambda kv: -kv[1])[:top]:
        lines_out.append(f"  {100 * count / max(samples, 1):5.1f} %  {frame}")
    if keep:
        shutil.copyfile(path, keep)
        lines_out.append(f"(collapsed stacks kept in {keep})")
    return "\n".join(lines_out)


# The table ----------------------------------------------------------------------------


def table(results: list[Measures], settings: argparse.Namespace) -> str:
    """
    One column per server.
    """
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, cell: Callable[[Measures], str]) -> None:
        rows.append((label, [cell(m) if not m.error else "failed" for m in results]))

    def max_rate(m: Measures) -> str:
        if m.max_rate is None:
            return "<" + str(settings.start_rate)
        text = f"{m.max_rate.rate:.0f}"
        if m.max_rate.generator_bound:
            return text + " (generator)"
        if m.first_failing is None:
            return text + " (limit)"
        return text

    def first_bad(m: Measures) -> str:
        if m.first_failing is None:
            return "-"
        return f"{m.first_failing.requested}: {m.first_failing.drops:.1f} %"

    def ms(values: list[float], p: float) -> str:
        return f"{percentile(values, p) * 1000:.2f}" if values else "-"

    def cpu(run: Optional[PerfResult]) -> str:
        if run is None or not run.doras:
            return "-"
        return f"{run.cpu / run.doras * 1e6:.0f}"

    rl = settings.latency_rate
    add("DORA/s with drops < 1 %", max_rate)
    add("first rate >= 1 %: drops", first_bad)
    add(f"latency median at {rl}/s (ms)", lambda m: ms(m.latency, 50))
    add(f"latency p99 at {rl}/s (ms)", lambda m: ms(m.latency, 99))
    add(f"drops at {rl}/s (%)", lambda m: f"{m.latency_run.drops:.2f}" if m.latency_run else "-")
    add(f"server CPU us per DORA at {rl}/s", lambda m: cpu(m.latency_run))
    add("server CPU us per DORA at max", lambda m: cpu(m.max_rate))
    width = max(len(label) for label, _ in rows) + 2
    columns = [max(len(m.name), *(len(r[1][i]) for r in rows)) + 2 for i, m in enumerate(results)]
    lines = [
        f"DHCP servers, {settings.leases} static leases, perfdhcp DORA through a relay on a "
        f"veth+bridge in a private netns, {settings.period:g} s per step",
        "".ljust(width) + "".join(m.name.rjust(c) for m, c in zip(results, columns)),
    ]
    for label, cells in rows:
        lines.append(label.ljust(width) + "".join(v.rjust(c) for v, c in zip(cells, columns)))
    lines.append("")
    for m in results:
        lines.append(f"{m.name}: {m.version}" + (f"; FAILED: {m.error}" if m.error else ""))
    load = os.getloadavg()
    lines.append(
        f"host: {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    lines.append(
        "latency: DISCOVER->OFFER and REQUEST->ACK pooled, tcpdump kernel timestamps on the "
        "relay's eth0; CPU: utime+stime of the server process / ACKs received"
    )
    return "\n".join(lines)


# Running ------------------------------------------------------------------------------


def check_tools(servers: list[str]) -> None:
    """
    @raise CannotRun: not root, or a tool is missing.
    """
    if os.geteuid() != 0:
        raise CannotRun("needs root (network namespaces)")
    needed = {"perfdhcp": "kea-admin", "tcpdump": "tcpdump", "unshare": "util-linux"}
    needed.update({"nsenter": "util-linux", "ip": "iproute2", "ss": "iproute2"})
    if "kea" in servers:
        needed["kea-dhcp4"] = "kea-dhcp4-server"
    if "dnsmasq" in servers:
        needed["dnsmasq"] = "dnsmasq-base"
    for tool, package in needed.items():
        if not os.access(_tool(tool), os.X_OK):
            raise CannotRun(f"{tool} is missing (Debian {package}; tools/setup.sh --bench)")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.dhcp", description=__doc__)
    parser.add_argument("--leases", type=int, default=1000, help="static leases (default 1000)")
    parser.add_argument("--period", type=float, default=5.0, help="seconds per perfdhcp run")
    parser.add_argument("--servers", default=",".join(SERVERS), help="ours,kea,dnsmasq")
    parser.add_argument("--latency-rate", type=int, default=1000, help="DORA/s of the latency run")
    parser.add_argument("--start-rate", type=int, default=500, help="first rate of the search")
    parser.add_argument("--max-rate", type=int, default=64000, help="last rate of the search")
    parser.add_argument("--bisections", type=int, default=3, help="halvings after doubling")
    parser.add_argument("--profile", action="store_true", help="py-spy our daemon at its max")
    parser.add_argument("--profile-out", default="", help="keep py-spy's collapsed stacks here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--source", default=REPO, help="the tree whose daemon is ours")
    settings = parser.parse_args(argv)
    settings.server_list = [s for s in settings.servers.split(",") if s]
    unknown = [s for s in settings.server_list if s not in SERVER_TYPES]
    if unknown or not settings.server_list:
        parser.error(f"--servers: unknown {unknown}; choose from {', '.join(SERVERS)}")
    if settings.leases < 1 or settings.leases > 60000:
        parser.error("--leases: 1 to 60000")
    return settings


def main(argv: Optional[list[str]] = None) -> int:
    settings = parse_args(argv)

    def log(text: str) -> None:
        if not settings.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    try:
        check_tools(settings.server_list)
        netns.require_world()
    except (CannotRun, Exception) as e:
        print(f"bench.dhcp cannot run: {e}", file=sys.stderr)
        return 2
    Ours.source = os.path.abspath(settings.source)
    table_leases = leases(settings.leases)
    world = netns.World()
    results: list[Measures] = []
    try:
        world.bridge(BRIDGE, f"{GATEWAY}/16", mac="02:00:00:00:50:01")
        world.add_client("perf", "02:00:00:50:ff:02", BRIDGE)
        world.client("perf", "ip", "addr", "add", f"{RELAY}/16", "dev", "eth0", check=True)
        macs = world.file("macs", "".join(f"{x.mac}\n" for x in table_leases))
        for name in settings.server_list:
            log(f"{name}: starting")
            server = SERVER_TYPES[name](world, table_leases)
            try:
                results.append(measure(world, server, macs, settings, log))
            except (CannotRun, RuntimeError, OSError, subprocess.SubprocessError) as e:
                results.append(Measures(name, server.version(), error=str(e).splitlines()[0]))
                log(f"{name}: failed: {e}")
    finally:
        world.close()
    print(table(results, settings))
    for m in results:
        if m.profile:
            print(f"\nprofile of {m.name} at its max rate:\n{m.profile}")
    return 1 if any(m.error for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
