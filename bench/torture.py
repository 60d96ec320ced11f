# -*- test-case-name: tests.test_torture_smoke -*-
"""
Kill -9 torture: the real daemon SIGKILLed at random moments during a random mix of
VM operations, restarted each time, and checked from the outside after every restart.

    sudo .venv/bin/python -m bench.torture [--iterations 200] [--seed N] [--keep]

As root, with libvirtd answering on C{qemu:///system} (tools/start-libvirtd.sh).
What it does:

1. makes a CA and certificates with C{hypervisor make-certs}, starts
   C{python -m hypervisor ... run} (TCG, a private state and volume directory) and
   adds, through the RPC (C{POST /rpc/Hypervisor.<Method>} over HTTPS with a client
   certificate), subnet C{hvtest} (bridge C{br@hvtest}) on a /24 of 10.79.0.0/16 that
   no libvirt domain uses yet, and a pool of addresses on it;
2. loops: each iteration picks one of CreateVm (empty root volume of
   C{MinimumFreeBytes}, not started or started, or the tiny test guest started by
   direct kernel boot), AcknowledgeVm, StartVm, StopVm, DestroyVm, ChangeVmTags,
   ChangeVmSize; about one iteration in four (C{--kill-probability}) SIGKILLs the
   daemon, most of them while the request is in flight (sent from a thread, killed at
   a random moment within how long that kind of request took when not killed), the
   others between requests; then the daemon is started again on the same directories
   (the last iteration kills if none did yet);
3. after every restart, once the daemon had a moment to repair (checks are repeated
   for up to C{--settle} seconds until clean), checks from the outside: every VM the
   daemon reports has its C{VMs/<IP>/info.json}; no VM it should have is gone; no
   libvirt domain of our subnet without a VM; VM states agree with libvirt; no address
   both free in C{address-pool.json} and used by a VM, or used by two VMs, or
   registered but neither free nor used; no file or directory under the volume
   directory that no VM owns; no VM whose volume files are missing or of the wrong
   size, or (tiny guest) whose kernel and initrd copies are not whole; and between
   kills, that no acknowledged VM disappeared;
4. stops the daemon with C{hypervisor stop}, runs C{hypervisor check-vms}, prints a
   table and every violation with the iteration, the request in flight and the kill
   delay that preceded it, destroys every domain of its subnet and removes its files
   (unless C{--keep}).

Exit status: 0 when every must-be-zero count is zero, 1 otherwise, 2 when it cannot
run (not root, no libvirtd, the daemon does not start).

Every check reads only what an operator could: the RPC, the state directory's JSON
files, the volume directory and libvirt; nothing is imported from the manager.
Violations are counted once each (by kind and IP), however many checks see them.
Other tests on the same libvirtd (restarting libvirtd, or a daemon's
C{stop-vms-on-next-stop}) can disturb a run: the daemon's log (kept with C{--keep})
tells.

The smoke mode (C{--iterations 5}) is run by C{tests.test_torture_smoke}.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional
from xml.etree import ElementTree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MiB = 1024 * 1024
QEMU_URI = "qemu:///system"
SUBNET_ID = "hvtest"
BRIDGE = "br@hvtest"
METADATA_NAMESPACE = "https://smallstack-hypervisor.org/xmlns/vm/1"
POOL_SIZE = 8
USER = "torture"

# Kinds of violation, in table order: (key, table label).
MUST_BE_ZERO = [
    ("lost_vm", "lost VMs"),
    ("no_info", "reported VMs without info.json"),
    ("orphan_dir", "VM directories without a VM"),
    ("leaked_domain", "leaked domains"),
    ("state_mismatch", "VM state != libvirt state"),
    ("leaked_address", "leaked addresses"),
    ("double_address", "double-assigned addresses"),
    ("unregistered_address", "used but unregistered addresses"),
    ("leaked_volume", "leaked volume files"),
    ("bad_volume", "VMs with missing/wrong volumes"),
    ("check_vms", "check-vms problems"),
    ("restart_failure", "daemon restart failures"),
]
RUNNING_STATES = {"running", "debugging"}
IDLE_STATES = {"stopped", "failed to start", "crashed"}
TRANSITIONAL_STATES = {"starting", "stopping", "destroying"}


class CannotRun(Exception):
    """
    The torture cannot run here (not root, no libvirtd, the daemon does not start).
    """


# --- the outside view ----------------------------------------------------------------


@dataclass
class Reply:
    """
    One RPC's outcome: the HTTP status and the JSON messages (several for streams),
    or C{status=None} when the connection broke (the daemon was killed).
    """

    status: Optional[int]
    messages: list[dict[str, Any]] = field(default_factory=list)
    broken: str = ""

    @property
    def last(self) -> dict[str, Any]:
        """
        The last message (the final response of a stream), or an empty dict.
        """
        return self.messages[-1] if self.messages else {}

    @property
    def ok(self) -> bool:
        """
        HTTP 200 and no C{Error} in the last message.
        """
        return self.status == 200 and not self.last.get("Error")

    def describe(self) -> str:
        """
        A short text for logs: C{ok}, the status and error, or how it broke.
        """
        if self.status is None:
            return f"cut ({self.broken})"
        if self.ok:
            return "ok"
        return f"{self.status} {self.last.get('Error', '')}".strip()


class Rpc:
    """
    The daemon's JSON RPC over HTTPS with a client certificate.
    """

    def __init__(self, port: int, ca: str, cert: str, key: str) -> None:
        self.port = port
        self.context = ssl.create_default_context(cafile=ca)
        self.context.check_hostname = False
        self.context.load_cert_chain(cert, key)

    def call(self, method: str, body: dict[str, Any], timeout: float = 120.0) -> Reply:
        """
        POST C{/rpc/Hypervisor.<method>}; never raises for network errors.
        """
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=timeout, context=self.context
        )
        try:
            connection.request(
                "POST",
                f"/rpc/Hypervisor.{method}",
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as e:
            return Reply(None, broken=f"{type(e).__name__}: {e}")
        finally:
            connection.close()
        messages = []
        for line in data.splitlines():
            if line.strip():
                try:
                    messages.append(json.loads(line))
                except ValueError:
                    messages.append({"Error": f"not JSON: {line[:200]!r}"})
        return Reply(response.status, messages)


def http_status(port: int, path: str) -> Optional[int]:
    """
    The status of a plain HTTP GET, or None when nothing answers.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 right now.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_json(path: str) -> Any:
    """
    A JSON file's content, or None when it is missing or unreadable.
    """
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


@dataclass
class DomainView:
    """
    One libvirt domain of our subnet.
    """

    name: str
    uuid: str
    active: bool
    ip: str


def open_libvirt(patience: float = 180.0) -> Any:
    """
    A fresh connection to libvirtd, waiting up to C{patience} seconds for it (other
    tests on this host may be restarting it).

    @raise CannotRun: libvirtd did not come back.
    """
    import libvirt

    deadline = time.monotonic() + patience
    while True:
        try:
            return libvirt.open(QEMU_URI)
        except libvirt.libvirtError as e:
            if time.monotonic() >= deadline:
                raise CannotRun(f"libvirtd did not answer for {patience:g}s: {e}") from e
            time.sleep(1)


def subnet_domains(network: ipaddress.IPv4Network, patience: float = 180.0) -> list[DomainView]:
    """
    The libvirt domains named C{vm-<IP>} or tagged with our C{<metadata>} for an IP
    in C{network} (a fresh connection each time, retried for up to C{patience}
    seconds: other tests on this host may be restarting libvirtd).
    """
    import libvirt

    deadline = time.monotonic() + patience
    while True:
        try:
            return _subnet_domains(network)
        except libvirt.libvirtError as e:
            if time.monotonic() >= deadline:
                raise CannotRun(f"cannot list libvirt's domains: {e}") from e
            time.sleep(1)


def _subnet_domains(network: ipaddress.IPv4Network) -> list[DomainView]:
    import libvirt

    conn = open_libvirt()
    try:
        out = []
        for dom in conn.listAllDomains():
            try:
                name = dom.name()
                uuid = dom.UUIDString()
                active = bool(dom.isActive())
            except libvirt.libvirtError:
                continue  # gone meanwhile
            ip = ""
            try:
                text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NAMESPACE, 0)
                element = ElementTree.fromstring(text).find("ipAddress")
                ip = (element.text or "") if element is not None else ""
            except (libvirt.libvirtError, ElementTree.ParseError):
                pass
            if not ip and name.startswith("vm-"):
                ip = name[3:]
            try:
                if ipaddress.ip_address(ip) not in network:
                    continue
            except ValueError:
                continue
            out.append(DomainView(name, uuid, active, ip))
        return out
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def destroy_subnet_domains(network: ipaddress.IPv4Network) -> int:
    """
    Destroy (and undefine) every domain of C{network}; return how many.
    """
    import libvirt

    conn = open_libvirt()
    count = 0
    try:
        for view in subnet_domains(network):
            try:
                dom = conn.lookupByUUIDString(view.uuid)
                persistent = dom.isPersistent()
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefine()
                count += 1
            except libvirt.libvirtError:
                pass
    finally:
        conn.close()
    return count


# --- the daemon ------------------------------------------------------------------------


class Daemon:
    """
    C{python -m hypervisor <flags> run} as a subprocess that can be SIGKILLed and
    started again on the same directories; its output from every start goes to one
    file.
    """

    def __init__(self, root: str, guest: Optional[str]) -> None:
        self.root = root
        self.state_dir = os.path.join(root, "state")
        self.volume_dir = os.path.join(root, "volumes")
        self.pki = os.path.join(root, "pki")
        self.port = free_port()
        self.output_path = os.path.join(root, "daemon-output.log")
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
        ]
        if guest:
            self.flags.append(f"-localImagesDirectory={guest}")
        self.env = dict(os.environ, PYTHONPATH=REPO, HYPERVISOR_FLAGS_DIRECTORY=root)
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def command(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """
        Run C{python -m hypervisor <flags> <args>} (make-certs, stop, check-vms).
        """
        return subprocess.run(
            [sys.executable, "-m", "hypervisor", *self.flags, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def make_certs(self) -> None:
        """
        The CA, the daemon's certificate and the torture user's (every method).
        """
        result = self.command(
            "make-certs", "--user", USER, "--methods", "*.*", "--out", f"{self.pki}/users"
        )
        if result.returncode != 0:
            raise CannotRun(f"hypervisor make-certs failed: {result.stderr}")

    def rpc(self) -> Rpc:
        """
        An RPC client with the torture user's certificate.
        """
        return Rpc(
            self.port,
            f"{self.pki}/CA.pem",
            f"{self.pki}/users/{USER}.cert",
            f"{self.pki}/users/{USER}.key",
        )

    def start(self, timeout: float = 90.0) -> None:
        """
        Start the daemon; return once C{/healthz} says libvirt is connected.

        @raise CannotRun: it exited or did not become healthy in time.
        """
        self.starts += 1
        with open(self.output_path, "ab") as out:
            out.write(
                f"\n===== torture: start {self.starts} at {time.time():.3f} " "=====\n".encode()
            )
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hypervisor", *self.flags, "run"],
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CannotRun(
                    f"the daemon exited with {self.process.returncode}; "
                    f"its output is in {self.output_path}:\n" + self.tail(40)
                )
            if http_status(self.port, "/healthz") == 200:
                return
            time.sleep(0.1)
        raise CannotRun(f"the daemon did not become healthy within {timeout:g}s:\n" + self.tail(40))

    def kill(self) -> None:
        """
        SIGKILL the daemon and reap it.
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(60)

    def stop(self) -> int:
        """
        C{hypervisor stop} (VMs keep running) and wait; return the exit status.
        """
        if self.process is None or self.process.poll() is not None:
            return 0
        result = self.command("stop")
        if result.returncode != 0:
            self.kill()
            return result.returncode
        try:
            return self.process.wait(90)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    @property
    def running(self) -> bool:
        """
        Whether the daemon process is alive.
        """
        return self.process is not None and self.process.poll() is None

    def tail(self, lines: int) -> str:
        """
        The last lines of the daemon's output.
        """
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def lines_about(self, ip: str, limit: int = 8) -> list[str]:
        """
        Daemon output lines that name C{ip} (warnings and errors first).
        """
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as f:
                found = [
                    line.rstrip()
                    for line in f
                    if ip + " " in line or ip + ":" in line or line.rstrip().endswith(ip)
                ]
        except OSError:
            return []
        important = [
            line
            for line in found
            if any(w in line.lower() for w in ("warn", "error", "fail", "traceback", "cannot"))
        ]
        return (important or found)[-limit:]


# --- the torture ------------------------------------------------------------------------


@dataclass
class Violation:
    """
    One broken invariant, first seen after C{iteration} (with what preceded it).
    """

    kind: str
    key: str
    detail: str
    iteration: int
    context: str


@dataclass
class Snapshot:
    """
    Everything the checks read, taken together.
    """

    reported: dict[str, dict[str, Any]]
    infos: dict[str, Optional[dict[str, Any]]]
    pool: dict[str, Any]
    domains: list[DomainView]
    volume_entries: list[str]


class Torture:
    """
    One torture run: the daemon, the random mix, the checks and the counts.
    """

    def __init__(
        self,
        iterations: int,
        seed: int,
        settle: float,
        kill_probability: float,
        guest_mode: str,
        keep: bool,
        verbose: bool,
    ) -> None:
        self.iterations = iterations
        self.seed = seed
        self.random = random.Random(seed)
        self.settle = settle
        self.kill_probability = kill_probability
        self.guest_mode = guest_mode
        self.keep = keep
        self.verbose = verbose
        self.guest: Optional[str] = None
        self.network = ipaddress.IPv4Network("10.79.0.0/24")
        self.addresses: list[tuple[str, str]] = []
        self.known: set[str] = set()  # VMs that must exist (created and acknowledged)
        self.pending_ack: set[str] = set()
        self.unheard_of: set[tuple[str, str]] = set()  # (IP, CreatedOn) from cut requests
        self.violations: dict[tuple[str, str], Violation] = {}
        self.counts: dict[str, int] = {
            "iterations": 0,
            "kills": 0,
            "kills_mid_request": 0,
            "created": 0,
            "adopted": 0,
            "requests": 0,
            "requests_ok": 0,
            "requests_refused": 0,
            "requests_cut": 0,
            "restart_checks": 0,
        }
        self.op_counts: dict[str, int] = {}
        self.durations: dict[str, list[float]] = {}  # seconds, by kind, unkilled
        self.context = "setup"
        self.iteration = 0
        self.root = ""
        self.daemon: Optional[Daemon] = None
        self.rpc: Optional[Rpc] = None
        self.started = time.monotonic()

    # setup and teardown ------------------------------------------------------------

    def log(self, text: str) -> None:
        """
        A progress line on stderr (every line with --verbose).
        """
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def preflight(self) -> None:
        """
        Refuse to run without root or libvirtd.
        """
        if os.geteuid() != 0:
            raise CannotRun("needs root (qemu:///system, bridges, volume files)")
        if (
            shutil.which("virsh") is None
            or subprocess.run(
                ["virsh", "-c", QEMU_URI, "version"], capture_output=True, timeout=30
            ).returncode
            != 0
        ):
            raise CannotRun(
                "libvirtd does not answer on qemu:///system " "(tools/start-libvirtd.sh starts it)"
            )
        try:
            import libvirt
        except ImportError as e:
            raise CannotRun(f"the libvirt Python binding is missing: {e}") from e
        # errors are handled where they happen; do not print them on stderr too
        libvirt.registerErrorHandler(lambda context, error: None, None)

    def pick_network(self) -> None:
        """
        A /24 of 10.79.0.0/16 that no libvirt domain uses (parallel runs stay apart).
        """
        conn = open_libvirt()
        try:
            names = [d.name() for d in conn.listAllDomains()]
        finally:
            conn.close()
        start = os.getpid() % 256
        for i in range(256):
            octet = (start + i) % 256
            if not any(n.startswith(f"vm-10.79.{octet}.") for n in names):
                self.network = ipaddress.IPv4Network(f"10.79.{octet}.0/24")
                return
        raise CannotRun("every /24 of 10.79.0.0/16 has libvirt domains")

    def find_guest(self) -> None:
        """
        The tiny guest (kernel + initrd) when wanted and buildable, else None.
        """
        if self.guest_mode == "none":
            return
        try:
            from tests.guest import build

            self.guest = build.build(build.DEFAULT_CACHE)
        except Exception as e:  # noqa: BLE001 - reported, then run without it
            if self.guest_mode == "require":
                raise CannotRun(f"cannot build the tiny guest: {e}") from e
            self.log(f"no tiny guest ({e}); every VM gets an empty root volume")

    def setup(self) -> None:
        """
        Directories, certificates, the bridge, the daemon, the subnet and the pool.
        """
        self.preflight()
        self.pick_network()
        self.find_guest()
        if not os.path.exists(f"/sys/class/net/{BRIDGE}"):
            subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
        import tempfile

        self.root = tempfile.mkdtemp(prefix="hv-torture-")
        os.chmod(self.root, 0o755)  # QEMU (libvirt-qemu) must reach the volumes
        self.daemon = Daemon(self.root, self.guest)
        self.daemon.make_certs()
        self.daemon.start()
        self.rpc = self.daemon.rpc()
        hosts = list(self.network.hosts())
        gateway = str(hosts[0])
        octets = str(self.network.network_address).split(".")
        self.addresses = [
            (str(hosts[9 + i]), f"52:54:0a:4f:{int(octets[2]):02x}:{10 + i:02x}")
            for i in range(POOL_SIZE)
        ]
        for method, body in (
            (
                "UpdateSubnets",
                {"Add": [{"Id": SUBNET_ID, "IpGateway": gateway, "IpMask": "255.255.255.0"}]},
            ),
            (
                "ChangeAddressPool",
                {
                    "AddressesToAdd": [
                        {"IpAddress": ip, "MacAddress": mac} for ip, mac in self.addresses
                    ]
                },
            ),
        ):
            reply = self.rpc.call(method, body)
            if not reply.ok:
                raise CannotRun(f"{method} failed: {reply.describe()}")
        self.log(
            f"daemon on port {self.daemon.port}, subnet {self.network} on "
            f"{BRIDGE}, {POOL_SIZE} addresses, state in {self.root}, guest "
            f"{self.guest or 'none'}, seed {self.seed}"
        )

    def cleanup(self) -> None:
        """
        Kill the daemon if still running, destroy our domains, remove our files.
        """
        if self.daemon is not None:
            self.daemon.kill()
        try:
            destroyed = destroy_subnet_domains(self.network)
            if destroyed:
                self.log(f"destroyed {destroyed} domain(s) of {self.network}")
        except Exception as e:  # noqa: BLE001 - cleanup reports and goes on
            self.log(f"could not destroy the domains of {self.network}: {e}")
        if self.root and not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.root:
            self.log(f"kept {self.root}")

    # the outside view ----------------------------------------------------------------

    def vm_infos(self) -> Optional[dict[str, dict[str, Any]]]:
        """
        The VMs the daemon reports (GetVmInfos), by IP; None if it did not answer.
        """
        assert self.rpc is not None
        reply = self.rpc.call("GetVmInfos", {}, timeout=30)
        if not reply.ok:
            return None
        return {vm["Address"]["IpAddress"]: vm for vm in reply.last.get("VmInfos") or []}

    def snapshot(self) -> Optional[Snapshot]:
        """
        The daemon's VMs, the state directory, the volume directory and libvirt.
        """
        assert self.daemon is not None
        reported = self.vm_infos()
        if reported is None:
            return None
        vms_path = os.path.join(self.daemon.state_dir, "VMs")
        infos: dict[str, Optional[dict[str, Any]]] = {}
        try:
            names = [n for n in os.listdir(vms_path) if not n.startswith(".")]
        except FileNotFoundError:
            names = []
        for name in names:
            infos[name] = read_json(os.path.join(vms_path, name, "info.json"))
        pool = read_json(os.path.join(self.daemon.state_dir, "address-pool.json")) or {}
        try:
            volume_entries = sorted(os.listdir(self.daemon.volume_dir))
        except FileNotFoundError:
            volume_entries = []
        return Snapshot(reported, infos, pool, subnet_domains(self.network), volume_entries)

    def problems(self, snap: Snapshot) -> dict[tuple[str, str], str]:
        """
        Every broken invariant in C{snap}: (kind, key) -> a sentence.
        """
        assert self.daemon is not None
        found: dict[tuple[str, str], str] = {}
        reported = snap.reported
        for ip in sorted(self.known - set(reported)):
            found[("lost_vm", ip)] = (
                f"VM {ip} was created and acknowledged, never "
                "destroyed, and the daemon no longer has it"
            )
        for ip in sorted(reported):
            if snap.infos.get(ip) is None:
                found[("no_info", ip)] = (
                    f"the daemon reports VM {ip} but "
                    f"VMs/{ip}/info.json is missing or unreadable"
                )
        for ip in sorted(set(snap.infos) - set(reported)):
            has = "with" if snap.infos[ip] else "without"
            found[("orphan_dir", ip)] = (
                f"VMs/{ip} exists ({has} info.json) but the " "daemon reports no such VM"
            )
        by_ip: dict[str, list[DomainView]] = {}
        for d in snap.domains:
            by_ip.setdefault(d.ip, []).append(d)
            if d.ip not in reported:
                found[("leaked_domain", d.name)] = (
                    f"libvirt domain {d.name} ({'running' if d.active else 'inactive'}) "
                    "has no VM in the daemon"
                )
        for ip, vm in sorted(reported.items()):
            state = vm.get("State", "")
            active = any(d.active for d in by_ip.get(ip, []))
            if state in RUNNING_STATES and not active:
                found[("state_mismatch", ip)] = f"VM {ip} is {state!r} but no domain runs"
            elif state in IDLE_STATES and active:
                found[("state_mismatch", ip)] = f"VM {ip} is {state!r} but its domain runs"
            elif state in TRANSITIONAL_STATES:
                found[("state_mismatch", ip)] = (
                    f"VM {ip} is stuck in {state!r} (domain "
                    f"{'running' if active else 'not running'})"
                )
        # addresses: the pool file against the VMs on disk (the durable truth)
        used: dict[str, list[str]] = {}
        for ip, info in snap.infos.items():
            if not info:
                continue
            for a in [info.get("Address") or {}] + list(info.get("SecondaryAddresses") or []):
                key = a.get("IpAddress") or a.get("MacAddress", "")
                used.setdefault(key, []).append(ip)
        free = [a.get("IpAddress") or a.get("MacAddress", "") for a in snap.pool.get("Free") or []]
        registered = [
            a.get("IpAddress") or a.get("MacAddress", "") for a in snap.pool.get("Registered") or []
        ]
        for key, holders in sorted(used.items()):
            if len(holders) > 1:
                found[("double_address", key)] = f"address {key} is used by VMs {holders}"
            if key in free:
                found[("double_address", key)] = (
                    f"address {key} is free in " f"address-pool.json and used by {holders}"
                )
            if key not in registered:
                found[("unregistered_address", key)] = (
                    f"address {key} is used by {holders} " "but not registered in the pool"
                )
        for key in free:
            if free.count(key) > 1:
                found[("double_address", key)] = f"address {key} is free twice"
        for key in registered:
            if key not in free and key not in used:
                found[("leaked_address", key)] = (
                    f"address {key} is registered but neither " "free nor used by a VM"
                )
        # volumes: every entry of the volume directory belongs to a VM on disk
        owned: set[str] = set()
        for ip, info in snap.infos.items():
            owned.add(ip)
            for location in (info or {}).get("VolumeLocations") or []:
                for path in (location.get("DirectoryToCleanup"), location.get("Filename")):
                    if path and os.path.dirname(path.rstrip("/")) == self.daemon.volume_dir:
                        owned.add(os.path.basename(path.rstrip("/")))
                    elif path and path.startswith(self.daemon.volume_dir + "/"):
                        owned.add(path[len(self.daemon.volume_dir) + 1 :].split("/")[0])
        for entry in snap.volume_entries:
            if entry not in owned:
                found[("leaked_volume", entry)] = (
                    f"{self.daemon.volume_dir}/{entry} belongs to no VM"
                )
        for ip in sorted(reported):
            info = snap.infos.get(ip)
            if not info:
                continue
            volumes = info.get("Volumes") or []
            for index, location in enumerate(info.get("VolumeLocations") or []):
                path = location.get("Filename", "")
                expected = volumes[index].get("Size", 0) if index < len(volumes) else 0
                try:
                    size = os.stat(path).st_size
                except OSError as e:
                    found[("bad_volume", ip)] = f"VM {ip} volume {index} ({path}): {e.strerror}"
                    break
                if expected and size != expected:
                    found[("bad_volume", ip)] = (
                        f"VM {ip} volume {index} ({path}): size "
                        f"{size}, info.json says {expected}"
                    )
                    break
            if ("bad_volume", ip) not in found:
                problem = self.boot_files_problem(ip, info)
                if problem:
                    found[("bad_volume", ip)] = problem
        return found

    def boot_files_problem(self, ip: str, info: dict[str, Any]) -> str:
        """
        For a VM of the tiny guest: its copies of the kernel and initrd (beside its
        root volume) must be whole copies of the guest's files.
        """
        if not self.guest or not (info.get("ExtraKernelOptions") or "").count("hv.mode"):
            return ""
        locations = info.get("VolumeLocations") or []
        if not locations:
            return ""
        directory = os.path.dirname(locations[0].get("Filename", ""))
        for copy, source in (("kernel", "vmlinux"), ("initrd", "initrd.cpio")):
            path = os.path.join(directory, copy)
            try:
                size = os.stat(path).st_size
            except OSError as e:
                return f"VM {ip}: its {copy} ({path}): {e.strerror}"
            whole = os.stat(os.path.join(self.guest, source)).st_size
            if size != whole:
                return (
                    f"VM {ip}: its {copy} ({path}) has {size} of the {whole} bytes " f"of {source}"
                )
        return ""

    def record(self, found: dict[tuple[str, str], str]) -> None:
        """
        Remember violations not seen before, with the context that preceded them.
        """
        for (kind, key), detail in found.items():
            if (kind, key) not in self.violations:
                self.violations[(kind, key)] = Violation(
                    kind, key, detail, self.iteration, self.context
                )
                self.log(
                    f"VIOLATION after iteration {self.iteration} ({self.context}): " f"{detail}"
                )

    def settle_and_check(self) -> None:
        """
        After a restart: check until clean or C{--settle} seconds passed; record what
        is still broken.

        VMs the daemon reports that the client never heard of (made by a CreateVm the
        kill cut) are counted but never adopted as VMs that must exist: the client got
        no address, and a daemon may rightly remove such a half-made or unacknowledged
        VM later. Only a VM whose creation and acknowledgement were answered counts.
        """
        self.counts["restart_checks"] += 1
        deadline = time.monotonic() + self.settle
        found: dict[tuple[str, str], str] = {}
        snap = None
        while True:
            snap = self.snapshot()
            if snap is not None:
                found = self.problems(snap)
                if not found:
                    break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        if snap is None:
            found[("restart_failure", f"answer-{self.iteration}")] = (
                "the restarted daemon did not answer GetVmInfos"
            )
        self.record(found)
        if snap is not None:
            # count each lost VM once
            self.known -= {key for kind, key in found if kind == "lost_vm"}
            for ip, vm in snap.reported.items():
                if ip not in self.known and ip not in self.pending_ack:
                    self.unheard_of.add((ip, str(vm.get("CreatedOn", ""))))
            self.counts["adopted"] = len(self.unheard_of)
            self.pending_ack &= set(snap.reported)

    def check_not_lost(self) -> None:
        """
        Between kills: every VM that must exist is still reported.
        """
        reported = self.vm_infos()
        if reported is None:
            return
        lost = {
            ("lost_vm", ip): (
                f"VM {ip} was created and acknowledged, never "
                "destroyed, and the daemon no longer has it (no kill)"
            )
            for ip in self.known - set(reported)
        }
        self.record(lost)
        self.known -= {ip for _, ip in lost}

    # operations ------------------------------------------------------------------------

    def call(self, method: str, body: dict[str, Any], timeout: float = 120.0) -> Reply:
        """
        One RPC, counted.
        """
        assert self.rpc is not None
        reply = self.rpc.call(method, body, timeout)
        self.counts["requests"] += 1
        if reply.status is None:
            self.counts["requests_cut"] += 1
        elif reply.ok:
            self.counts["requests_ok"] += 1
        else:
            self.counts["requests_refused"] += 1
        if self.verbose:
            self.log(f"  {method} {body.get('IpAddress', '')} -> {reply.describe()[:160]}")
        return reply

    def create_body(self, kind: str) -> dict[str, Any]:
        """
        A CreateVm request: C{empty-stopped}, C{empty-started} or C{guest}.
        """
        body: dict[str, Any] = {
            "MemoryInMiB": 32,
            "MilliCPUs": 100,
            "SubnetId": SUBNET_ID,
            "MinimumFreeBytes": self.random.choice([1, 4, 16]) * MiB,
            "Tags": {"torture": str(self.seed)},
        }
        if kind == "empty-stopped":
            body["DoNotStart"] = True
        if kind == "guest" and self.guest:
            body.update(
                MemoryInMiB=128,
                MilliCPUs=200,
                ExtraKernelOptions="quiet hv.dhcp=no hv.mode=stay",
                KernelURL=f"file://{self.guest}/vmlinux",
                InitrdURL=f"file://{self.guest}/initrd.cpio",
            )
        return body

    def plan(self, vms: dict[str, dict[str, Any]]) -> tuple[str, str, Callable[[], None]]:
        """
        Pick the next operation from what the daemon has now.

        @return: its name, its target (an IP or a kind) and a function doing it
            (safe to run in a thread; it records outcomes on C{self}).
        """
        stopped = [ip for ip, vm in vms.items() if vm.get("State") in IDLE_STATES]
        running = [ip for ip, vm in vms.items() if vm.get("State") in RUNNING_STATES]
        every = sorted(vms)
        choices: list[tuple[float, str]] = [
            (4.0 if len(vms) < POOL_SIZE else 0.5, "CreateVm"),
            (1.0 if self.pending_ack else 0.0, "AcknowledgeVm"),
            (2.0 if stopped else 0.0, "StartVm"),
            (2.0 if running else 0.0, "StopVm"),
            ((1.0 + len(vms) / 2) if vms else 0.0, "DestroyVm"),
            (1.5 if vms else 0.0, "ChangeVmTags"),
            (1.0 if vms else 0.0, "ChangeVmSize"),
        ]
        total = sum(w for w, _ in choices)
        r = self.random.uniform(0, total)
        name = choices[-1][1]
        for weight, option in choices:
            if r < weight:
                name = option
                break
            r -= weight
        rnd = self.random
        if name == "CreateVm":
            kind = rnd.choices(
                ["empty-stopped", "empty-started", "guest"], [5, 2, 3 if self.guest else 0]
            )[0]
            body = self.create_body(kind)
            ack_now = rnd.random() < 0.85

            def create() -> None:
                reply = self.call("CreateVm", body)
                ip = reply.last.get("IpAddress", "") if reply.ok else ""
                if not (ip and reply.last.get("Final")):
                    return
                self.counts["created"] += 1
                self.pending_ack.add(ip)
                if ack_now and self.call("AcknowledgeVm", {"IpAddress": ip}).ok:
                    self.pending_ack.discard(ip)
                    self.known.add(ip)

            return name, kind + ("" if ack_now else ", not acknowledged"), create
        if name == "AcknowledgeVm":
            ip = rnd.choice(sorted(self.pending_ack))

            def acknowledge() -> None:
                if self.call("AcknowledgeVm", {"IpAddress": ip}).ok:
                    self.pending_ack.discard(ip)
                    self.known.add(ip)

            return name, ip, acknowledge
        if name == "StartVm":
            ip = rnd.choice(stopped)
            return name, ip, self.sender("StartVm", {"IpAddress": ip})
        if name == "StopVm":
            ip = rnd.choice(running)
            return name, ip, self.sender("StopVm", {"IpAddress": ip})
        if name == "DestroyVm":
            ip = rnd.choice(every)
            was_known = ip in self.known

            def destroy() -> None:
                # from now on the VM may be gone: it is not lost if it is
                self.known.discard(ip)
                self.pending_ack.discard(ip)
                reply = self.call("DestroyVm", {"IpAddress": ip})
                if reply.status is not None and 400 <= reply.status < 500 and was_known:
                    self.known.add(ip)  # refused: it must still exist

            return name, ip, destroy
        if name == "ChangeVmTags":
            ip = rnd.choice(every)
            tags = {"torture": str(self.seed), "n": str(rnd.randrange(1000))}
            return name, ip, self.sender("ChangeVmTags", {"IpAddress": ip, "Tags": tags})
        ip = rnd.choice(every)
        if vms[ip].get("State") in IDLE_STATES:
            size = {"MemoryInMiB": rnd.choice([32, 48, 64])}
        else:
            size = {"MilliCPUs": rnd.choice([100, 150, 200])}
        return name, ip, self.sender("ChangeVmSize", {"IpAddress": ip, **size})

    def sender(self, method: str, body: dict[str, Any]) -> Callable[[], None]:
        """
        A function sending one request whose outcome changes no bookkeeping.
        """

        def send() -> None:
            self.call(method, body)

        return send

    def kill_delay(self, kind: str) -> float:
        """
        How long after sending the request to SIGKILL: a random moment within how
        long requests of this kind took when not killed (so most kills land while
        the daemon works on it), sometimes at once or a little after.
        """
        took = self.durations.get(kind)
        typical = max(took) if took else 0.5
        return self.random.choice(
            [
                0.0,
                self.random.uniform(0, typical),
                self.random.uniform(0, typical),
                self.random.uniform(0, typical),
                self.random.uniform(0, 1.5 * typical),
            ]
        )

    def restart(self) -> None:
        """
        Start the daemon again after a kill, then check the invariants.
        """
        assert self.daemon is not None
        try:
            self.daemon.start()
        except CannotRun as e:
            self.record({("restart_failure", f"start-{self.iteration}"): str(e)})
            raise
        self.settle_and_check()

    def iterate(self) -> None:
        """
        One iteration: an operation, maybe a SIGKILL (mid-request or between), and
        after a kill a restart and the checks.
        """
        assert self.daemon is not None
        vms = self.vm_infos()
        if vms is None:
            self.log("GetVmInfos failed; restarting the daemon")
            self.daemon.kill()
            self.restart()
            vms = self.vm_infos() or {}
        name, target, run = self.plan(vms)
        self.op_counts[name] = self.op_counts.get(name, 0) + 1
        if self.verbose:
            self.log(f"iteration {self.iteration}: {name} {target}")
        last = self.iteration == self.iterations and self.counts["kills"] == 0
        kill = last or self.random.random() < self.kill_probability
        kind = f"{name} {target.split(',')[0]}" if name == "CreateVm" else name
        if not kill:
            self.context = f"{name} {target}, no kill"
            began = time.monotonic()
            run()
            self.durations.setdefault(kind, []).append(time.monotonic() - began)
            del self.durations[kind][:-20]
            self.check_not_lost()
            return
        mid_request = self.random.random() < 0.8
        if mid_request:
            delay = self.kill_delay(kind)
            self.context = f"{name} {target}, SIGKILL {delay * 1000:.0f} ms after " "sending it"
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            time.sleep(delay)
            finished = not thread.is_alive()
            self.daemon.kill()
            thread.join(150)
            if finished:
                self.context += " (it had already finished)"
            else:
                self.counts["kills_mid_request"] += 1
        else:
            self.context = f"{name} {target}, then SIGKILL between requests"
            run()
            self.daemon.kill()
        self.counts["kills"] += 1
        if self.verbose:
            self.log(f"killed: {self.context}")
        self.restart()

    def finish(self) -> None:
        """
        The final checks: settle, C{hypervisor stop}, C{check-vms}, the pool file
        against the VMs on disk once more.
        """
        assert self.daemon is not None
        self.iteration = self.iterations
        self.context = "the final check"
        if not self.daemon.running:
            self.restart()
        else:
            self.settle_and_check()
        status = self.daemon.stop()
        if status != 0:
            self.record({("restart_failure", "final-stop"): f"hypervisor stop: exit {status}"})
        self.context = "check-vms after the final stop"
        result = self.daemon.command("check-vms")
        if result.returncode != 0:
            lines = [
                line
                for line in result.stdout.splitlines() + result.stderr.splitlines()
                if line.strip()
                and not line.startswith("Total allocation")
                and not line.endswith("volumes checked")
            ]
            for line in lines or [f"check-vms exited {result.returncode}"]:
                self.record({("check_vms", line): f"check-vms: {line}"})

    # the run -------------------------------------------------------------------------

    def run(self) -> int:
        """
        Set up, loop, check, report, clean up; return the exit status.
        """
        try:
            self.setup()
            for self.iteration in range(1, self.iterations + 1):
                self.iterate()
                self.counts["iterations"] = self.iteration
                if self.iteration % 10 == 0 or self.iterations <= 10:
                    self.log(
                        f"iteration {self.iteration}/{self.iterations}: "
                        f"{self.counts['kills']} kills, "
                        f"{self.counts['created']} VMs created, "
                        f"{len(self.violations)} violations"
                    )
            self.finish()
        except CannotRun as e:
            print(f"torture: cannot run: {e}", file=sys.stderr)
            if self.daemon is not None and self.counts["iterations"]:
                self.report()
            self.cleanup()
            return 2
        except BaseException:
            if self.daemon is not None and self.counts["iterations"]:
                self.report()
            self.cleanup()
            raise
        bad = self.report()
        self.cleanup()
        return 1 if bad else 0

    def report(self) -> bool:
        """
        Print the table and the violations; return whether any must-be-zero count is
        not zero.
        """
        per_kind = {kind: 0 for kind, _ in MUST_BE_ZERO}
        for kind, _ in self.violations:
            per_kind[kind] = per_kind.get(kind, 0) + 1
        elapsed = time.monotonic() - self.started
        c = self.counts
        print()
        print(
            f"kill -9 torture: seed {self.seed}, {elapsed / 60:.1f} min, subnet "
            f"{self.network}, guest {'tiny guest' if self.guest else 'none'}"
        )
        rows: list[tuple[str, int, str]] = [
            ("iterations", c["iterations"], ""),
            ("kills (SIGKILL + restart)", c["kills"], ""),
            ("  of which with a request in flight", c["kills_mid_request"], ""),
            ("VMs created (CreateVm answered)", c["created"], ""),
            ("VMs seen from cut CreateVm requests", c["adopted"], ""),
            (
                "requests",
                c["requests"],
                f"{c['requests_ok']} ok, {c['requests_refused']} "
                f"refused, {c['requests_cut']} cut by a kill",
            ),
            ("restart checks", c["restart_checks"], ""),
        ]
        print(f"{'run':<36} {'count':>7}")
        for label, value, note in rows:
            print(f"{label:<36} {value:>7}  {note}".rstrip())
        print(f"{'invariants (each must be 0)':<36} {'count':>7}")
        for kind, label in MUST_BE_ZERO:
            value = per_kind.get(kind, 0)
            print(f"{label:<36} {value:>7}  {'<-- FAIL' if value else ''}".rstrip())
        print("operations: " + ", ".join(f"{k} {v}" for k, v in sorted(self.op_counts.items())))
        if self.violations:
            print()
            print(
                f"violations (reproduce: .venv/bin/python -m bench.torture --seed "
                f"{self.seed} --iterations {self.iterations} --keep --verbose; timing "
                "makes runs differ, the context says what preceded each):"
            )
            for v in sorted(self.violations.values(), key=lambda v: (v.iteration, v.kind)):
                print(f"- [{v.kind}] {v.detail}")
                print(f"    first seen after iteration {v.iteration}: {v.context}")
                if self.daemon is not None and v.kind not in ("check_vms", "restart_failure"):
                    ip = v.key if v.key.count(".") == 3 else v.key[3:]
                    for line in self.daemon.lines_about(ip, 4):
                        print(f"    daemon: {line[:220]}")
        return any(per_kind.values())


def main(argv: Optional[list[str]] = None) -> int:
    """
    Parse the options and run the torture.
    """
    parser = argparse.ArgumentParser(
        prog="python -m bench.torture",
        description="SIGKILL the real daemon at random moments during random VM "
        "operations; check the invariants after each restart.",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=200,
        help="operations to run (default 200; 5 is a smoke test)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: random, printed)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="seconds a restarted daemon gets to repair before a " "violation counts (default 10)",
    )
    parser.add_argument(
        "--kill-probability",
        type=float,
        default=0.25,
        help="chance that an iteration SIGKILLs the daemon (0.25)",
    )
    parser.add_argument(
        "--guest",
        choices=("auto", "none", "require"),
        default="auto",
        help="use the tiny guest from tests/guest (built if missing) "
        "for some VMs: auto (if it builds), none, require",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the state, volume and log directories"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    torture = Torture(
        args.iterations,
        seed,
        args.settle,
        args.kill_probability,
        args.guest,
        args.keep,
        args.verbose,
    )
    return torture.run()


if __name__ == "__main__":
    sys.exit(main())
