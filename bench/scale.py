# -*- test-case-name: tests.test_bench_scale_smoke -*-
"""
Speed at scale (issue 10): the real daemon with N registered VMs, measured from the
outside the way the Go daemon was, and printed beside the Go daemon's figures.

    sudo .venv/bin/python -m bench.scale [--vms 1000 | --vms 100,1000,5000]
        [--clients 8] [--keep] [--profile] [--dir /tmp]

As root, with libvirtd answering on C{qemu:///system} (tools/start-libvirtd.sh). For
each N, on a fresh daemon (C{python -m hypervisor ... run}, C{-domainType=qemu},
certificates from C{hypervisor make-certs}, its own state and volume directory under
C{--dir}), with subnet C{hvtest} (bridge C{br@hvtest}) on a /16 of 10.96.0.0/11 that
no libvirt domain uses and a pool of N addresses, all added through the RPC:

1. CreateVm rate: N VMs, each C{DoNotStart} with an empty 1 MiB root volume
   (C{MinimumFreeBytes} 1 MiB, C{RoundupPower} 0, 1 MiB of memory, 1 milliCPU) and
   acknowledged (C{AcknowledgeVm}) at once; the first half by one client, the second
   half by C{--clients} concurrent clients (threads, each its own connection); the
   rate is VMs per second of wall time, CreateVm and AcknowledgeVm included;
2. the daemon's RSS (C{VmRSS} of C{/proc/PID/status}, and its anonymous part
   C{RssAnon}: the rest is mapped files such as shared libraries) once the VMs exist,
   and for comparison right after start with no VMs;
3. GetVmInfo of random VMs (C{--getvminfo-calls}; as the Go daemon was measured),
   then of the same VMs in the same order again ("again": answered from kept
   encodings, if the daemon keeps them), and ListVMs (C{--listvms-calls}),
   sequentially over one HTTPS keep-alive connection with a client certificate,
   p50/p99 of the client's round trip; the daemon's CPU (utime + stime) per call;
   then GetVmInfo and ListVMs over one SRPC connection (TLS, JSON: how the Go tools
   reach the Go daemon, so the like-for-like row beside its figures);
4. the C{/listVMs} status page over one plain HTTP keep-alive connection
   (C{--page-loads}), p50/p99;
5. restart: SIGKILL, start again on the same directories, time until ListVMs over
   HTTPS returns all N addresses; the RSS then.

Clients keep one connection each (C{http.client} with keep-alive); a connection the
daemon closes is opened again and counted ("reconnects" below the table: it should
be 0). Then the daemon is killed, every libvirt domain of the run's /16 is destroyed
and undefined, and its directory removed (C{--keep} keeps the directory and leaves
the daemon's domains defined, for a look).

With more VMs than the host's CPUs allow at 1 milliCPU each (the daemon refuses CPU
overcommit: 2 CPUs hold 2000 VMs), the daemon runs in a private mount namespace where
C{/sys/devices/system/cpu/online} says 64 CPUs (C{os.cpu_count()}); nothing else
changes.

C{--profile} attaches C{py-spy record --nonblocking --idle} (pip install py-spy) to
the daemon during each phase (creates, GetVmInfo, ListVMs, the page, the restart,
attached within a few ms of the new process starting) and prints per phase how busy
each daemon thread was (samples whose innermost frame is not a wait: epoll, libvirt's
event poll, a pool thread's queue) and, for the reactor thread where every request
runs, the top functions by self time, by cumulative time, of our own packages by
cumulative time, and self time by file; for the other threads the top functions by
self time. Percentages are of the phase's wall time and of the thread's busy time.
The raw samples (collapsed stacks, C{flamegraph.pl} input) stay in the run's
directory with C{--keep}. py-spy takes CPU from the same cores (its blocking mode
made creates 8x slower here): a profiled run's table reads 20-40 % slow, so take
figures from an unprofiled run.

The table's reference column is the Go hypervisor (SmallStack v0.3.4) at 1000 VMs on
these machines, from issue 10; the ratio column is ours at 1000 over Go (for rates,
Go over ours, so above 1.0 is always worse). 2 shared vCPUs: compare ratios, not
absolutes, and expect ±20-30 % from run to run.

Exit status: 0 when every measure ran, 1 when a phase failed, 2 when it cannot run.
The smoke mode (C{--vms 5}) is run by C{tests.test_bench_scale_smoke}; CI never runs
the real thing.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import math
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.torture import destroy_subnet_domains, free_port, open_libvirt  # noqa: E402
from hypervisor.srpc import client as srpc_client  # noqa: E402

MiB = 1024 * 1024
QEMU_URI = "qemu:///system"
PYCACHE = "/tmp/hv-scale-pycache"  # the daemon's bytecode, kept between runs
SUBNET_ID = "hvtest"
BRIDGE = "br@hvtest"
USER = "scale"
FAKE_CPUS = 64
POOL_CHUNK = 1000  # ChangeAddressPool takes at most 4096 addresses per call


class CannotRun(Exception):
    """
    The bench cannot run here (not root, no libvirtd, the daemon does not start).
    """


class PhaseFailed(Exception):
    """
    A measure could not be taken (the daemon refused or answered wrongly).
    """


# --- the table's rows --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """
    One measure: its key in the results, label, unit, format, the Go daemon's figure
    at 1000 VMs (None: not measured there), whether higher is better (rates), and the
    issue's goal.
    """

    key: str
    label: str
    fmt: str
    go: Optional[float] = None
    higher_is_better: bool = False
    goal: str = ""


ROWS = [
    Row("getvminfo_p50", "GetVmInfo p50 (ms)", "{:.2f}", 0.30),
    Row("getvminfo_p99", "GetVmInfo p99 (ms)", "{:.2f}", 0.67, goal="<= 1.0x"),
    Row("getvminfo_again_p50", "GetVmInfo again p50 (ms)", "{:.2f}", 0.30),
    Row("getvminfo_again_p99", "GetVmInfo again p99 (ms)", "{:.2f}", 0.67, goal="<= 1.0x"),
    Row("srpc_getvminfo_p50", "GetVmInfo over SRPC p50 (ms)", "{:.2f}", 0.30),
    Row("srpc_getvminfo_p99", "GetVmInfo over SRPC p99 (ms)", "{:.2f}", 0.67, goal="<= 1.0x"),
    Row("listvms_p50", "ListVMs p50 (ms)", "{:.2f}", 2.6, goal="<= 1.0x"),
    Row("listvms_p99", "ListVMs p99 (ms)", "{:.2f}", 7.9, goal="<= 1.0x"),
    Row("srpc_listvms_p50", "ListVMs over SRPC p50 (ms)", "{:.2f}", 2.6, goal="<= 1.0x"),
    Row("srpc_listvms_p99", "ListVMs over SRPC p99 (ms)", "{:.2f}", 7.9, goal="<= 1.0x"),
    Row("page_p50", "/listVMs page p50 (ms)", "{:.1f}", 10.0, goal="<= 1.0x"),
    Row("page_p99", "/listVMs page p99 (ms)", "{:.1f}"),
    Row("create_rate_1", "CreateVm+Ack rate, 1 client (/s)", "{:.1f}", 93.0, True, ">= 1.0x"),
    Row("create_rate_n", "CreateVm+Ack rate, C clients (/s)", "{:.1f}", 93.0, True, ">= 1.0x"),
    Row("create_p50", "CreateVm+Ack p50, 1 client (ms)", "{:.1f}"),
    Row("restart", "restart to ready (s)", "{:.2f}", 0.21, goal="<= 1 s"),
    Row("rss_created", "RSS after creates (MiB)", "{:.0f}", 28.0, goal="<= 60 MiB"),
    Row("rss_restart", "RSS after restart (MiB)", "{:.0f}", 28.0, goal="<= 60 MiB"),
    Row("rss_anon_created", "  of which anonymous, after creates (MiB)", "{:.0f}"),
    Row("rss_anon_restart", "  of which anonymous, after restart (MiB)", "{:.0f}"),
    Row("rss_empty", "RSS at start, no VMs yet (MiB)", "{:.0f}"),
    Row("cpu_create", "daemon CPU per create+ack (ms)", "{:.1f}"),
    Row("cpu_getvminfo", "daemon CPU per GetVmInfo (ms)", "{:.2f}"),
    Row("cpu_getvminfo_again", "daemon CPU per GetVmInfo again (ms)", "{:.2f}"),
    Row("cpu_listvms", "daemon CPU per ListVMs (ms)", "{:.2f}"),
    Row("cpu_srpc_getvminfo", "daemon CPU per GetVmInfo over SRPC (ms)", "{:.2f}"),
    Row("cpu_srpc_listvms", "daemon CPU per ListVMs over SRPC (ms)", "{:.2f}"),
    Row("cpu_page", "daemon CPU per /listVMs page (ms)", "{:.1f}"),
    Row("cpu_restart", "daemon CPU to ready after restart (s)", "{:.2f}"),
]
GO_NOTES = (
    "Go reference: SmallStack v0.3.4 hypervisor at 1000 stopped VMs, Python client, same "
    "machines (issue 10); its CreateVm rate is 93/s from a Python client, 35/s through "
    "the Go vm-control."
)


def percentile(values: list[float], p: float) -> float:
    """
    The C{p}-th percentile (nearest rank) of C{values}.
    """
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(p / 100.0 * len(ordered)) - 1))
    return ordered[index]


# --- the outside view ----------------------------------------------------------------


class Connection:
    """
    One keep-alive connection to the daemon: HTTPS with a client certificate for the
    RPC, or plain HTTP for the pages. Counts how often it had to connect.
    """

    def __init__(self, port: int, context: Optional[ssl.SSLContext], timeout: float = 120.0):
        self.port = port
        self.context = context
        self.timeout = timeout
        self.connects = 0
        self.connection: Optional[http.client.HTTPConnection] = None

    def _open(self) -> http.client.HTTPConnection:
        if self.connection is None:
            if self.context is not None:
                self.connection = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, timeout=self.timeout, context=self.context
                )
            else:
                self.connection = http.client.HTTPConnection(
                    "127.0.0.1", self.port, timeout=self.timeout
                )
        if self.connection.sock is None:
            self.connects += 1
        return self.connection

    def close(self) -> None:
        """
        Close the connection (the next request opens a new one).
        """
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def request(
        self, method: str, path: str, body: Optional[bytes] = None, retry: bool = False
    ) -> tuple[int, bytes]:
        """
        One request; (status, body). With C{retry}, a request whose connection broke
        is sent once more on a new connection (only for requests that change nothing).
        """
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in range(2 if retry else 1):
            connection = self._open()
            try:
                connection.request(method, path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                return response.status, data
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt or not retry:
                    raise
        raise AssertionError("unreachable")

    def rpc(self, method: str, request: dict[str, Any], retry: bool = False) -> dict[str, Any]:
        """
        C{POST /rpc/Hypervisor.<method>}; the last JSON message of the reply.

        @raise PhaseFailed: not HTTP 200, not JSON, or an C{Error}.
        """
        status, data = self.request(
            "POST", f"/rpc/Hypervisor.{method}", json.dumps(request).encode(), retry
        )
        lines = [line for line in data.splitlines() if line.strip()]
        try:
            last = json.loads(lines[-1]) if lines else {}
        except ValueError:
            raise PhaseFailed(f"{method}: not JSON: {data[:300]!r}") from None
        if status != 200 or last.get("Error"):
            raise PhaseFailed(f"{method} {request}: HTTP {status}: {last.get('Error', data[:300])}")
        return last


# --- the daemon ------------------------------------------------------------------------


class Daemon:
    """
    C{python -m hypervisor <flags> run} as a subprocess, on its own directories; killed
    and started again for the restart measure.
    """

    def __init__(self, root: str, fake_cpus: bool, source: str = REPO) -> None:
        self.root = root
        self.source = source
        self.state_dir = os.path.join(root, "state")
        self.volume_dir = os.path.join(root, "volumes")
        self.pki = os.path.join(root, "pki")
        self.port = free_port()
        self.output_path = os.path.join(root, "daemon-output.log")
        self.fake_cpus = fake_cpus
        self.flags = [
            # DHCP on bridges only: never answer DHCP on the machine's own network.
            "-dhcpServerOnBridgesOnly",
            # No metadata namespaces on the host's bridges (killed daemons leave them).
            "-metadataServer=false",
            f"-stateDir={self.state_dir}",
            f"-logDir={root}/log",
            f"-portNum={self.port}",
            f"-libvirtUri={QEMU_URI}",
            "-domainType=qemu",
            f"-volumeDirectories={self.volume_dir}",
            f"-CAfile={self.pki}/CA.pem",
            f"-identityCAfile={self.pki}/none.pem",
            f"-certFile={self.pki}/server.pem",
            f"-keyFile={self.pki}/server.key",
            "-tftpPortNum=0",  # no TFTP server on the host's port 69
        ]
        self.env = dict(os.environ, PYTHONPATH=source, HYPERVISOR_FLAGS_DIRECTORY=root)
        # Bytecode cached as an installed daemon has it (pip compiles at install; the Go
        # daemon is a binary): without this, PYTHONDONTWRITEBYTECODE (set on these
        # machines) makes every start compile our modules again (~0.2 s of each restart).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env["PYTHONPYCACHEPREFIX"] = PYCACHE
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def command(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """
        Run C{python -m hypervisor <flags> <args>} (make-certs).
        """
        return subprocess.run(
            [sys.executable, "-m", "hypervisor", *self.flags, *args],
            cwd=self.source,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def make_certs(self) -> ssl.SSLContext:
        """
        The CA, the daemon's certificate and the bench user's (every method); a client
        TLS context with the user's certificate.
        """
        result = self.command(
            "make-certs", "--user", USER, "--methods", "*.*", "--out", f"{self.pki}/users"
        )
        if result.returncode != 0:
            raise CannotRun(f"hypervisor make-certs failed: {result.stderr}")
        context = ssl.create_default_context(cafile=f"{self.pki}/CA.pem")
        context.check_hostname = False
        context.load_cert_chain(f"{self.pki}/users/{USER}.cert", f"{self.pki}/users/{USER}.key")
        return context

    def spawn(self) -> None:
        """
        Start the process (do not wait for it to answer).
        """
        self.starts += 1
        argv = [sys.executable, "-m", "hypervisor", *self.flags, "run"]
        if self.fake_cpus:
            cpus = os.path.join(self.root, "cpu-online")
            with open(cpus, "w") as f:
                f.write(f"0-{FAKE_CPUS - 1}\n")
            # unshare and sh exec in place: the PID stays the daemon's
            argv = [
                "unshare",
                "-m",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'mount --bind "{cpus}" /sys/devices/system/cpu/online && exec "$@"',
                "sh",
                *argv,
            ]
        with open(self.output_path, "ab") as out:
            out.write(f"\n===== scale: start {self.starts} at {time.time():.3f} =====\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                argv, cwd=self.source, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def check_alive(self) -> None:
        """
        @raise CannotRun: the daemon exited.
        """
        assert self.process is not None
        if self.process.poll() is not None:
            raise CannotRun(
                f"the daemon exited with {self.process.returncode}; its output is in "
                f"{self.output_path}:\n" + self.tail(40)
            )

    def wait_healthy(self, timeout: float = 90.0) -> None:
        """
        Wait until C{/healthz} says 200 (libvirt connected, state loaded).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3)
                c.request("GET", "/healthz")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise CannotRun(f"the daemon did not become healthy within {timeout:g}s:\n" + self.tail(40))

    @property
    def pid(self) -> int:
        """
        The daemon's process ID.
        """
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """
        SIGKILL the daemon and reap it.
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(60)

    def rss_mib(self, field: str = "VmRSS") -> float:
        """
        The daemon's resident set (C{VmRSS}), or a part of it (C{RssAnon}: heap and
        stacks; C{RssFile}: mapped files, shared libraries), MiB.
        """
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise PhaseFailed(f"no {field} in /proc/PID/status")

    def cpu_seconds(self) -> float:
        """
        The daemon's CPU time so far (utime + stime, every thread), seconds.
        """
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, lines: int) -> str:
        """
        The last lines of the daemon's output.
        """
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


# --- the profiler ------------------------------------------------------------------------

# Leaf frames where a thread waits (py-spy's own idle test misses most of them here):
# the reactor's epoll_wait, libvirt's event loop poll, a pool thread waiting for work.
IDLE_LEAVES = {
    "EPollReactor.doPoll",
    "virEventRunDefaultImpl",
    "Condition.wait",
    "Event.wait",
    "Thread.join",
    "sleep",
    "select",
    "poll",
}
# Frames every sample of a thread has (the start of the process or of a thread).
BORING = {
    "<module>",
    "_run_code",
    "_run_module_as_main",
    "main",
    "_run",
    "runApp",
    "ApplicationRunner.run",
    "UnixApplicationRunner.postApplication",
    "runReactorWithLogging",
    "ApplicationRunner.startReactor",
    "ReactorBase.run",
    "ReactorBase.mainLoop",
    "Thread._bootstrap",
    "Thread._bootstrap_inner",
    "Thread.run",
    "ThreadWorker.__init__.<locals>.work",
    "EPollReactor.doPoll",
    "callWithLogger",
    "callWithContext",
    "ThreadedContextTracker.callWithContext",
    "ContextTracker.callWithContext",
    "_PollLikeMixin._doReadOrWrite",
}
OUR_PACKAGES = ("hypervisor/", "web/", "tap/")
# Stages of the reactor thread's busy time, first match wins: (label, where, substrings of
# a frame "function (file)"); where is "any" (some frame of the stack) or "leaf" (the
# innermost frame). Names the daemon no longer has simply stop matching ("other").
STAGES: list[tuple[str, str, tuple[str, ...]]] = [
    ("imports", "any", ("_find_and_load (",)),
    ("loading the state directory", "any", ("Manager.load (",)),
    (
        "logging (access log, observers)",
        "any",
        ("HTTPFactory.log (", "Logger.emit (", "LoggingFile.write (", "FileLogObserver.__call__ ("),
    ),
    ("metrics (prometheus_client)", "any", ("(prometheus_client/",)),
    ("page templates (jinja2, markupsafe)", "any", ("(jinja2/", "(markupsafe/", ".html)")),
    (
        "JSON encode (codec, json)",
        "any",
        ("encode (hypervisor/codec.py)", "dumps (hypervisor/codec.py)", "(json/encoder.py)"),
    ),
    (
        "JSON decode (codec, json)",
        "any",
        ("decode (hypervisor/codec.py)", "loads (hypervisor/codec.py)", "(json/decoder.py)"),
    ),
    (
        "socket send/recv",
        "any",
        ("Connection.writeSomeData (twisted/internet/tcp.py)", "readFromFD ("),
    ),
    ("socket send/recv", "leaf", ("Connection.doRead (twisted/internet/tcp.py)",)),
    (
        "handing work to threads, waking the reactor",
        "any",
        ("ReactorBase.wakeUp (", "Queue.put (", "callInThreadWithCallback ("),
    ),
    ("TLS (pyOpenSSL)", "leaf", ("(OpenSSL/", "(twisted/protocols/tls.py)")),
    ("service layer, manager", "any", ("(hypervisor/manager/", "(hypervisor/api.py)")),
    ("HTTP (twisted.web, klein)", "leaf", ("(twisted/web/", "(klein/")),
    ("status page code (web/status.py)", "leaf", ("(web/status.py)",)),
    (
        "our transport code (rpc, channel, netguard, dispatch, auth)",
        "leaf",
        ("(web/", "(hypervisor/netguard.py)", "(hypervisor/dispatch.py)", "(hypervisor/auth.py)"),
    ),
    ("reactor, Deferreds", "leaf", ("(twisted/internet/", "(twisted/python/")),
]


def stage(frames: list[str]) -> str:
    """
    The stage (L{STAGES}) a busy sample of the reactor thread belongs to.
    """
    for label, where, patterns in STAGES:
        scope = frames[-1:] if where == "leaf" else frames
        if any(p in frame for frame in scope for p in patterns):
            return label
    return "other"


@dataclass
class PhaseProfile:
    """
    The py-spy samples of one phase: collapsed stacks (thread first) and counts.
    """

    name: str
    pid: int
    seconds: float
    rate: int
    stacks: list[tuple[list[str], int]] = field(default_factory=list)
    error: str = ""
    gil: bool = False  # only the thread holding the GIL was sampled


class Profiler:
    """
    C{py-spy record} attached to the daemon for one phase at a time.
    """

    def __init__(
        self, directory: str, rate: int, nonblocking: bool = False, gil: bool = False
    ) -> None:
        self.directory = directory
        self.rate = rate
        self.nonblocking = nonblocking
        self.gil = gil
        self.executable = shutil.which("py-spy") or os.path.join(
            os.path.dirname(sys.executable), "py-spy"
        )
        if not os.access(self.executable, os.X_OK):
            raise CannotRun("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.phases: list[PhaseProfile] = []
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._phase: Optional[PhaseProfile] = None
        self._path = ""
        self._started = 0.0

    def start(self, name: str, pid: int, fresh: bool = False) -> None:
        """
        Attach to C{pid} for phase C{name}. With C{fresh} (a process that just
        started), retry for a moment until its interpreter can be read.
        """
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        self._path = os.path.join(self.directory, f"pyspy-{slug}.txt")
        self._phase = PhaseProfile(name, pid, 0.0, self.rate, gil=self.gil)
        deadline = time.monotonic() + (3.0 if fresh else 0.0)
        while True:
            with open(self._path + ".log", "wb") as log:
                self._process = subprocess.Popen(
                    [
                        self.executable,
                        "record",
                        "--pid",
                        str(pid),
                        "--rate",
                        str(self.rate),
                        "--format",
                        "raw",
                        "--nolineno",
                        "--threads",
                        "--idle",
                        *(["--nonblocking"] if self.nonblocking else []),
                        *(["--gil"] if self.gil else []),
                        "--output",
                        self._path,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            self._started = time.monotonic()
            # py-spy says "Sampling process" once attached, or exits at once
            while time.monotonic() - self._started < 5.0 and self._process.poll() is None:
                with open(self._path + ".log", "rb") as f:
                    if b"Sampling process" in f.read():
                        return
                time.sleep(0.005)
            if self._process.poll() is None or time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def stop(self) -> None:
        """
        Stop recording (SIGINT: py-spy writes its file) and read the samples.
        """
        if self._process is None or self._phase is None:
            return
        phase = self._phase
        phase.seconds = time.monotonic() - self._started
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGINT)
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
        self._phase = None
        try:
            with open(self._path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    stack, _, count = line.rstrip("\n").rpartition(" ")
                    if stack and count.isdigit():
                        phase.stacks.append((stack.split(";"), int(count)))
        except OSError as e:
            phase.error = f"no samples ({e})"
        if not phase.stacks and not phase.error:
            with open(self._path + ".log", encoding="utf-8", errors="replace") as f:
                phase.error = "no samples: " + f.read()[-500:]
        self.phases.append(phase)

    def report(self, top: int) -> str:
        """
        Per phase and thread: how busy it was, then for the reactor thread (where
        every request runs) the top functions by self and by cumulative time, and for
        the other threads their top functions by self time; percentages are of the
        phase's wall time (samples of that thread, idle ones included) and of the
        thread's busy time (samples not waiting in C{IDLE_LEAVES}).
        """
        out = []
        for phase in self.phases:
            out.append("")
            mode = "GIL holder only: CPU in Python" if phase.gil else "every thread: wall time"
            out.append(
                f"== profile: {phase.name} ({phase.seconds:.1f} s at {phase.rate}/s; {mode})"
            )
            if phase.error:
                out.append(f"   {phase.error}")
                continue
            ticks: Counter[str] = Counter()  # every sample of a thread kind, idle included
            threads: dict[str, set[str]] = {}
            busy: dict[str, list[tuple[list[str], int]]] = {}
            for frames, count in phase.stacks:
                thread_id, _, thread = frames[0].partition(": ")
                if thread_id == f"thread ({phase.pid})":
                    kind = "MainThread"  # unnamed while the process starts
                else:
                    kind = thread_kind(thread) or "unnamed"
                threads.setdefault(kind, set()).add(thread_id)
                ticks[kind] += count
                calls = frames[1:]
                if not calls or calls[-1].split(" (")[0] in IDLE_LEAVES:
                    continue
                busy.setdefault(kind, []).append((calls, count))

            def wall(kind: str) -> float:
                # samples one thread of this kind had in the phase, idle ones included
                if phase.gil:  # only the GIL holder was sampled: count the clock
                    return max(phase.seconds * phase.rate, 1.0)
                return ticks[kind] / len(threads[kind])

            summary = []
            for kind in sorted(ticks, key=lambda k: (k != "MainThread", k)):
                per_thread = wall(kind)
                busy_count = sum(c for _, c in busy.get(kind, []))
                summary.append(f"{kind} x{len(threads[kind])} {100 * busy_count / per_thread:.0f}%")
            out.append(
                "   busy (% of wall time, summed over threads of a kind): " + ", ".join(summary)
            )
            for kind in sorted(busy, key=lambda k: (k != "MainThread", k)):
                per_thread = wall(kind)
                samples = busy[kind]
                busy_count = sum(c for _, c in samples)
                own: Counter[str] = Counter()
                cumulative: Counter[str] = Counter()
                ours: Counter[str] = Counter()
                files: Counter[str] = Counter()
                for frames, count in samples:
                    own[frames[-1]] += count
                    files[frame_file(frames[-1])] += count
                    for name in set(frames):
                        if name.split(" (")[0] in BORING:
                            continue
                        cumulative[name] += count
                        if frame_file(name).startswith(OUR_PACKAGES):
                            ours[name] += count
                reactor = kind == "MainThread"
                n = top if reactor else max(3, top // 3)
                label = "reactor thread" if reactor else f"{kind} threads"

                def listing(title: str, counts: Counter[str], n: int) -> None:
                    out.append(f"   -- {label}: {title} (% of wall time, % of busy time)")
                    for name, count in counts.most_common(n):
                        out.append(
                            f"   {100 * count / per_thread:6.1f}% {100 * count / busy_count:6.1f}%"
                            f"  {name}"
                        )

                if reactor:
                    stages: Counter[str] = Counter()
                    for frames, count in samples:
                        stages[stage(frames)] += count
                    listing("by stage", stages, len(stages))
                listing(f"top {n} by self time", own, n)
                if reactor:
                    listing(f"top {n} by cumulative time", cumulative, n)
                    listing(f"top {n} of our code by cumulative time", ours, n)
                    listing("self time by file", files, min(n, 15))
        return "\n".join(out)


def thread_kind(name: str) -> str:
    """
    A thread's name without its number (pool threads grouped together).
    """
    return name.rstrip("0123456789-_ ") or name


def frame_file(frame: str) -> str:
    """
    The file of a collapsed-stack frame C{function (file)}.
    """
    if frame.endswith(")") and " (" in frame:
        return frame.rsplit(" (", 1)[1][:-1]
    return frame


# --- one run -----------------------------------------------------------------------------


@dataclass
class Settings:
    """
    What the command line asked for.
    """

    vms: list[int]
    clients: int
    keep: bool
    profile: bool
    directory: str
    getvminfo_calls: int
    listvms_calls: int
    page_loads: int
    seed: int
    rate: int
    top: int
    source: str = REPO
    gil: bool = False


class Run:
    """
    One N: the daemon, its VMs, the measures and the cleanup.
    """

    def __init__(self, n: int, settings: Settings) -> None:
        self.n = n
        self.settings = settings
        self.random = random.Random(settings.seed + n)
        self.results: dict[str, float] = {}
        self.notes: list[str] = []
        self.root = ""
        self.network = ipaddress.IPv4Network("10.96.0.0/16")
        self.daemon: Optional[Daemon] = None
        self.context: Optional[ssl.SSLContext] = None
        self.ips: list[str] = []
        self.profiler: Optional[Profiler] = None
        self.connects = 0
        self.started = time.monotonic()

    def log(self, text: str) -> None:
        """
        A progress line on stderr.
        """
        print(
            f"[N={self.n} {time.monotonic() - self.started:7.1f}s] {text}",
            file=sys.stderr,
            flush=True,
        )

    # setup and cleanup ----------------------------------------------------------------

    def pick_network(self) -> None:
        """
        A /16 of 10.96.0.0/11 that no libvirt domain uses (parallel runs stay apart).
        """
        conn = open_libvirt()
        try:
            names = [d.name() for d in conn.listAllDomains()]
        finally:
            conn.close()
        start = os.getpid() % 32
        for i in range(32):
            octet = 96 + (start + i) % 32
            if not any(name.startswith(f"vm-10.{octet}.") for name in names):
                self.network = ipaddress.IPv4Network(f"10.{octet}.0.0/16")
                return
        raise CannotRun("every /16 of 10.96.0.0/11 has libvirt domains")

    def addresses(self) -> list[dict[str, str]]:
        """
        N addresses (and MACs) of the network, from .1.2 on (.0.1 is the gateway).
        """
        second = int(str(self.network.network_address).split(".")[1])
        out = []
        for i in range(self.n):
            third, fourth = 1 + i // 250, 2 + i % 250
            ip = f"10.{second}.{third}.{fourth}"
            mac = f"52:54:0a:{second:02x}:{third:02x}:{fourth:02x}"
            out.append({"IpAddress": ip, "MacAddress": mac})
        return out

    def setup(self) -> None:
        """
        Directories, certificates, the bridge, the daemon, the subnet and the pool.
        """
        self.pick_network()
        if not os.path.exists(f"/sys/class/net/{BRIDGE}"):
            subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        os.makedirs(self.settings.directory, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=f"hv-scale-{self.n}-", dir=self.settings.directory)
        os.chmod(self.root, 0o755)  # QEMU (libvirt-qemu) must reach the volumes
        fake_cpus = self.n > (os.cpu_count() or 1) * 1000
        self.daemon = Daemon(self.root, fake_cpus, self.settings.source)
        if fake_cpus:
            self.notes.append(
                f"N={self.n}: more VMs than {os.cpu_count()} CPUs hold at 1 milliCPU each; "
                f"the daemon saw {FAKE_CPUS} CPUs (private mount namespace)"
            )
        self.context = self.daemon.make_certs()
        if self.settings.profile:
            self.profiler = Profiler(
                self.root, self.settings.rate, nonblocking=True, gil=self.settings.gil
            )
        self.daemon.spawn()
        self.daemon.wait_healthy()
        rpc = self.connection()
        gateway = str(self.network.network_address + 1)
        rpc.rpc(
            "UpdateSubnets",
            {"Add": [{"Id": SUBNET_ID, "IpGateway": gateway, "IpMask": "255.255.0.0"}]},
        )
        pool = self.addresses()
        for i in range(0, len(pool), POOL_CHUNK):
            rpc.rpc("ChangeAddressPool", {"AddressesToAdd": pool[i : i + POOL_CHUNK]})
        self.done_with(rpc)
        self.results["rss_empty"] = self.daemon.rss_mib()
        self.log(
            f"daemon pid {self.daemon.pid} on port {self.daemon.port}, subnet "
            f"{self.network} on {BRIDGE}, {self.n} addresses, state in {self.root}"
        )

    def cleanup(self) -> None:
        """
        Kill the daemon; destroy the network's domains; remove the directory.
        """
        if self.profiler is not None:
            self.profiler.stop()
        if self.daemon is not None:
            self.daemon.kill()
        if self.settings.keep:
            self.log(f"kept {self.root} and the domains of {self.network}")
            return
        try:
            destroyed = destroy_subnet_domains(self.network)
            if destroyed:
                self.log(f"destroyed {destroyed} domain(s) of {self.network}")
        except Exception as e:  # noqa: BLE001 - cleanup reports and goes on
            self.log(f"could not destroy the domains of {self.network}: {e}")
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)

    def connection(self, tls: bool = True) -> Connection:
        """
        A new keep-alive connection to the daemon.
        """
        assert self.daemon is not None
        return Connection(self.daemon.port, self.context if tls else None)

    def done_with(self, *connections: Connection) -> None:
        """
        Close connections; count their connects beyond the first.
        """
        for c in connections:
            self.connects += max(c.connects - 1, 0)
            c.close()

    def profiled(self, name: str, fresh: bool = False) -> Callable[[], None]:
        """
        Start profiling phase C{name} (when asked); return the function that stops it.
        """
        if self.profiler is None:
            return lambda: None
        assert self.daemon is not None
        self.profiler.start(name, self.daemon.pid, fresh)
        return self.profiler.stop

    # the measures --------------------------------------------------------------------

    def create_body(self) -> bytes:
        """
        CreateVm: not started, an empty 1 MiB root, the least memory and CPU.
        """
        return json.dumps(
            {
                "MemoryInMiB": 1,
                "MilliCPUs": 1,
                "SubnetId": SUBNET_ID,
                "DoNotStart": True,
                "MinimumFreeBytes": MiB,
                "RoundupPower": 0,
                "Tags": {"Name": "scale"},
            }
        ).encode()

    def create_one(self, rpc: Connection) -> tuple[str, float]:
        """
        CreateVm then AcknowledgeVm; the IP and the seconds both took.
        """
        t0 = time.perf_counter()
        status, data = rpc.request("POST", "/rpc/Hypervisor.CreateVm", self.create_body())
        lines = [json.loads(line) for line in data.splitlines() if line.strip()]
        last = lines[-1] if lines else {}
        if status != 200 or last.get("Error") or not last.get("Final"):
            raise PhaseFailed(f"CreateVm: HTTP {status}: {last.get('Error') or data[:300]!r}")
        ip = last["IpAddress"]
        rpc.rpc("AcknowledgeVm", {"IpAddress": ip})
        return ip, time.perf_counter() - t0

    def create(self) -> None:
        """
        N/2 VMs from one client, then the rest from C{--clients} threads.
        """
        assert self.daemon is not None
        first = self.n - self.n // 2
        rest = self.n - first
        stop = self.profiled("CreateVm+AcknowledgeVm")
        try:
            rpc = self.connection()
            cpu0 = self.daemon.cpu_seconds()
            t0 = time.perf_counter()
            times = []
            for i in range(first):
                ip, seconds = self.create_one(rpc)
                self.ips.append(ip)
                times.append(seconds)
                if (i + 1) % 250 == 0:
                    self.log(f"created {i + 1}/{self.n} (1 client)")
            elapsed = time.perf_counter() - t0
            self.done_with(rpc)
            self.results["create_rate_1"] = first / elapsed
            self.results["create_p50"] = statistics.median(times) * 1000
            clients = max(1, min(self.settings.clients, rest)) if rest else 0
            errors: list[BaseException] = []
            lock = threading.Lock()
            todo = list(range(rest))

            def client() -> None:
                c = self.connection()
                try:
                    while True:
                        with lock:
                            if not todo or errors:
                                return
                            todo.pop()
                        ip, _ = self.create_one(c)
                        with lock:
                            self.ips.append(ip)
                            if len(self.ips) % 250 == 0:
                                self.log(f"created {len(self.ips)}/{self.n} ({clients} clients)")
                except BaseException as e:  # noqa: BLE001 - reported by the main thread
                    with lock:
                        errors.append(e)
                finally:
                    with lock:
                        self.done_with(c)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            if errors:
                raise PhaseFailed(f"CreateVm with {clients} clients: {errors[0]}")
            if rest:
                self.results["create_rate_n"] = rest / elapsed
            self.results["cpu_create"] = (self.daemon.cpu_seconds() - cpu0) / self.n * 1000
        finally:
            stop()
        self.results["rss_created"] = self.daemon.rss_mib()
        self.results["rss_anon_created"] = self.daemon.rss_mib("RssAnon")
        self.log(
            f"created {self.n}: {self.results['create_rate_1']:.1f}/s with 1 client, "
            f"{self.results.get('create_rate_n', 0):.1f}/s with {clients}; "
            f"RSS {self.results['rss_created']:.0f} MiB"
        )

    def timed(
        self, name: str, key: str, calls: int, call: Callable[[int], None], warmup: int = 5
    ) -> None:
        """
        C{calls} sequential calls (after a few unmeasured ones): p50/p99 in ms and the
        daemon's CPU per call.
        """
        assert self.daemon is not None
        for i in range(warmup):
            call(i)
        stop = self.profiled(name)
        try:
            times = []
            cpu0 = self.daemon.cpu_seconds()
            for i in range(calls):
                t0 = time.perf_counter()
                call(i)
                times.append((time.perf_counter() - t0) * 1000)
            cpu = self.daemon.cpu_seconds() - cpu0
        finally:
            stop()
        self.results[f"{key}_p50"] = percentile(times, 50)
        self.results[f"{key}_p99"] = percentile(times, 99)
        self.results[f"cpu_{key}"] = cpu / calls * 1000
        self.log(
            f"{name}: p50 {self.results[f'{key}_p50']:.2f} ms, p99 "
            f"{self.results[f'{key}_p99']:.2f} ms, daemon CPU "
            f"{self.results[f'cpu_{key}']:.2f} ms per call"
        )

    def queries(self) -> None:
        """
        GetVmInfo, ListVMs (HTTPS keep-alive) and the /listVMs page (HTTP keep-alive).
        """
        rpc = self.connection()
        ips = [self.random.choice(self.ips) for _ in range(self.settings.getvminfo_calls + 5)]

        def get_vm_info(i: int) -> None:
            reply = rpc.rpc("GetVmInfo", {"IpAddress": ips[i]}, retry=True)
            got = (reply.get("VmInfo") or {}).get("Address", {}).get("IpAddress")
            if got != ips[i]:
                raise PhaseFailed(f"GetVmInfo {ips[i]} answered VM {got}")

        self.timed("GetVmInfo", "getvminfo", self.settings.getvminfo_calls, get_vm_info)
        # the same VMs again: what a daemon that keeps encodings answers once warm
        self.timed(
            "GetVmInfo, same VMs again",
            "getvminfo_again",
            self.settings.getvminfo_calls,
            get_vm_info,
        )
        expected = sorted(self.ips)

        def list_vms(i: int) -> None:
            reply = rpc.rpc("ListVMs", {}, retry=True)
            if len(reply.get("IpAddresses") or []) != self.n:
                raise PhaseFailed(
                    f"ListVMs returned {len(reply.get('IpAddresses') or [])} of {self.n} VMs"
                )

        reply = rpc.rpc("ListVMs", {})
        if sorted(reply.get("IpAddresses") or []) != expected:
            raise PhaseFailed("ListVMs does not return exactly the VMs created")
        self.timed("ListVMs", "listvms", self.settings.listvms_calls, list_vms)
        self.done_with(rpc)
        self.srpc_queries(ips, expected)
        page = self.connection(tls=False)
        status, body = page.request("GET", "/listVMs")
        text = body.decode("utf-8", "replace")
        missing = [ip for ip in (expected[0], expected[-1]) if ip not in text]
        if status != 200 or missing:
            raise PhaseFailed(f"/listVMs: HTTP {status}, VMs missing from the page: {missing}")
        self.page_bytes = len(body)

        def load(i: int) -> None:
            status, _ = page.request("GET", "/listVMs", retry=True)
            if status != 200:
                raise PhaseFailed(f"/listVMs: HTTP {status}")

        self.timed("/listVMs page", "page", self.settings.page_loads, load, warmup=2)
        self.done_with(page)

    def srpc_queries(self, ips: list[str], expected: list[str]) -> None:
        """
        GetVmInfo and ListVMs again over one SRPC connection (TLS, JSON), as the Go
        tools speak to the Go daemon: the like-for-like comparison with its figures.
        """
        assert self.daemon is not None
        users = f"{self.daemon.pki}/users"
        srpc = srpc_client.connect(
            "127.0.0.1", self.daemon.port, f"{users}/{USER}.cert", f"{users}/{USER}.key"
        )
        try:

            def get_vm_info(i: int) -> None:
                reply = srpc.call("GetVmInfo", {"IpAddress": ips[i]})
                got = (reply.get("VmInfo") or {}).get("Address", {}).get("IpAddress")
                if got != ips[i]:
                    raise PhaseFailed(f"SRPC GetVmInfo {ips[i]} answered VM {got}")

            def list_vms(i: int) -> None:
                reply = srpc.call("ListVMs", {})
                if len(reply.get("IpAddresses") or []) != self.n:
                    raise PhaseFailed("SRPC ListVMs did not return every VM")

            if sorted(srpc.call("ListVMs", {}).get("IpAddresses") or []) != expected:
                raise PhaseFailed("SRPC ListVMs does not return exactly the VMs created")
            self.timed(
                "GetVmInfo over SRPC",
                "srpc_getvminfo",
                self.settings.getvminfo_calls,
                get_vm_info,
            )
            self.timed("ListVMs over SRPC", "srpc_listvms", self.settings.listvms_calls, list_vms)
        finally:
            srpc.close()

    def restart(self) -> None:
        """
        SIGKILL, start, time until ListVMs over HTTPS returns all N; RSS then.
        """
        assert self.daemon is not None
        self.daemon.kill()
        t0 = time.perf_counter()
        self.daemon.spawn()
        stop = self.profiled("restart to ready", fresh=True)
        attempts = 0
        try:
            deadline = time.monotonic() + 600
            while True:
                self.daemon.check_alive()
                attempts += 1
                c = self.connection()
                try:
                    reply = c.rpc("ListVMs", {})
                    if len(reply.get("IpAddresses") or []) == self.n:
                        break
                except (OSError, http.client.HTTPException, PhaseFailed):
                    pass
                finally:
                    c.close()
                if time.monotonic() > deadline:
                    raise PhaseFailed("the restarted daemon did not list every VM in 600 s")
                time.sleep(0.01)
            self.results["restart"] = time.perf_counter() - t0
            self.results["cpu_restart"] = self.daemon.cpu_seconds()
        finally:
            stop()
        self.results["rss_restart"] = self.daemon.rss_mib()
        self.results["rss_anon_restart"] = self.daemon.rss_mib("RssAnon")
        self.log(
            f"restart to ready: {self.results['restart']:.2f} s ({attempts} ListVMs "
            f"attempts), RSS {self.results['rss_restart']:.0f} MiB"
        )

    def run(self) -> None:
        """
        Every measure, in order; cleanup whatever happens.
        """
        load = os.getloadavg()[0]
        try:
            self.setup()
            self.create()
            self.queries()
            self.restart()
        finally:
            self.notes.append(
                f"N={self.n}: host load average (1 min) {load:.2f} at the start, "
                f"{os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} CPUs shared by "
                "the daemon, the clients and anything else running)"
            )
            self.cleanup()


# --- the table ---------------------------------------------------------------------------


def table(runs: dict[int, dict[str, float]], clients: int) -> str:
    """
    Rows = the measures, columns = N, then Go at 1000, ours/Go at 1000 and the goal.
    """
    ns = sorted(runs)
    label_width = 44
    header = f"{'measure':<{label_width}}" + "".join(f"{f'N={n}':>10}" for n in ns)
    header += f"{'Go@1000':>10}{'ours/Go':>9}  goal"
    lines = [header, "-" * len(header)]
    for row in ROWS:
        label = row.label.replace("C clients", f"{clients} clients")
        line = f"{label:<{label_width}}"
        for n in ns:
            value = runs[n].get(row.key)
            line += f"{row.fmt.format(value) if value is not None else '-':>10}"
        if row.go is None:
            line += f"{'-':>10}{'':>9}"
        else:
            line += f"{row.fmt.format(row.go):>10}"
            ours = runs.get(1000, {}).get(row.key)
            if ours:
                ratio = row.go / ours if row.higher_is_better else ours / row.go
                line += f"{ratio:>8.2f}x"
            else:
                line += f"{'-':>9}"
        if row.goal:
            line += f"  {row.goal}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def describe_source(source: str) -> str:
    """
    The daemon's source tree, with its commit when it is a git checkout (and whether
    tracked files differ from it).
    """
    try:
        commit = subprocess.run(
            ["git", "-C", source, "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        changed = subprocess.run(
            ["git", "-C", source, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return source
    if commit.returncode != 0:
        return source
    dirty = " (+ uncommitted changes)" if changed.stdout.strip() else ""
    return f"{source} at {commit.stdout.strip()[:90]}{dirty}"


def preflight(settings: Settings) -> None:
    """
    Refuse to run without root, libvirtd or (for --profile) py-spy.
    """
    if os.geteuid() != 0:
        raise CannotRun("needs root (qemu:///system, the bridge, volume files)")
    if (
        shutil.which("virsh") is None
        or subprocess.run(
            ["virsh", "-c", QEMU_URI, "version"], capture_output=True, timeout=30
        ).returncode
        != 0
    ):
        raise CannotRun(
            "libvirtd does not answer on qemu:///system (tools/start-libvirtd.sh starts it)"
        )
    try:
        import libvirt
    except ImportError as e:
        raise CannotRun(f"the libvirt Python binding is missing: {e}") from e
    libvirt.registerErrorHandler(lambda context, error: None, None)
    if any(n > (os.cpu_count() or 1) * 1000 for n in settings.vms) and not shutil.which("unshare"):
        raise CannotRun("more VMs than CPUs allow needs unshare (util-linux)")
    if settings.profile:
        Profiler(settings.directory, settings.rate)


def parse(argv: Optional[list[str]] = None) -> Settings:
    """
    The command line.
    """
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--vms", default="1000", help="comma-separated VM counts, one fresh daemon each"
    )
    parser.add_argument(
        "--clients", type=int, default=8, help="concurrent clients for the second half of creates"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the directories and domains of each run"
    )
    parser.add_argument(
        "--profile", action="store_true", help="py-spy each phase; print the top functions"
    )
    parser.add_argument(
        "--gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (where the CPU goes)",
    )
    parser.add_argument(
        "--dir", default=tempfile.gettempdir(), help="where each run's directory is made"
    )
    parser.add_argument(
        "--source",
        default=REPO,
        help="the daemon's source tree (e.g. a 'git archive' of a commit to compare)",
    )
    parser.add_argument("--getvminfo-calls", type=int, default=2000)
    parser.add_argument("--listvms-calls", type=int, default=200)
    parser.add_argument("--page-loads", type=int, default=50)
    parser.add_argument("--seed", type=int, default=10, help="which VMs GetVmInfo asks for")
    parser.add_argument(
        "--rate", type=int, default=250, help="py-spy samples per second (non-blocking)"
    )
    parser.add_argument("--top", type=int, default=25, help="functions per profile table")
    args = parser.parse_args(argv)
    try:
        vms = [int(v) for v in args.vms.split(",") if v.strip()]
    except ValueError:
        parser.error(f"--vms: comma-separated numbers, not {args.vms!r}")
    if not vms or any(n < 2 for n in vms):
        parser.error("--vms: each count must be at least 2")
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    return Settings(
        vms=vms,
        clients=args.clients,
        keep=args.keep,
        profile=args.profile,
        directory=os.path.abspath(args.dir),
        getvminfo_calls=max(1, args.getvminfo_calls),
        listvms_calls=max(1, args.listvms_calls),
        page_loads=max(1, args.page_loads),
        seed=args.seed,
        rate=args.rate,
        top=args.top,
        source=os.path.abspath(args.source),
        gil=args.gil,
    )


def main(argv: Optional[list[str]] = None) -> int:
    """
    Run every N; print the table (and the profiles); the exit status.
    """
    settings = parse(argv)
    try:
        preflight(settings)
    except CannotRun as e:
        print(f"bench.scale: cannot run: {e}", file=sys.stderr)
        return 2
    results: dict[int, dict[str, float]] = {}
    notes: list[str] = []
    profiles: list[tuple[int, str]] = []
    failed = False
    for n in settings.vms:
        run = Run(n, settings)
        try:
            run.run()
        except CannotRun as e:
            print(f"bench.scale: cannot run N={n}: {e}", file=sys.stderr)
            return 2
        except (PhaseFailed, OSError, http.client.HTTPException) as e:
            failed = True
            notes.append(f"N={n}: FAILED: {type(e).__name__}: {e}")
            print(f"bench.scale: N={n} failed: {e}", file=sys.stderr)
        results[n] = run.results
        notes.extend(run.notes)
        if run.connects:
            notes.append(f"N={n}: reconnects: {run.connects} (the daemon closed keep-alives)")
        if run.profiler is not None:
            profiles.append((n, run.profiler.report(settings.top)))
    print()
    print(
        f"bench.scale: the real daemon with N stopped VMs (empty 1 MiB roots), one "
        f"keep-alive connection per client{'; PROFILED (py-spy attached)' if settings.profile else ''}"
    )
    print(f"daemon source: {describe_source(settings.source)}")
    print(table(results, settings.clients))
    print()
    print(GO_NOTES)
    print(
        f"CreateVm: the first half of N from 1 client, the second half from "
        f"{settings.clients}; GetVmInfo x{settings.getvminfo_calls} (random VMs), ListVMs "
        f"x{settings.listvms_calls}, /listVMs x{settings.page_loads}, sequential."
    )
    for note in notes:
        print(note)
    for n, report in profiles:
        print(f"\n######## profile at N={n} (py-spy, non-idle samples of the daemon)")
        print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
