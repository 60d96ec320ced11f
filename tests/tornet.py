"""
A private Tor network for tests, on loopback inside a private network namespace
(L{tests.netns.World}), started from Debian's C{tor}: three directory authorities
(keys made with C{tor-gencert}), two relays and any number of client tors, all with
C{TestingTorNetwork 1} and the fast voting schedule of Tor's own test networks
(chutney), so that a consensus exists within about 20 seconds and onion services
work within about 30.

Nothing reaches the real Tor network: the namespace has only C{lo}, and every tor is
told the private authorities. Ports are fixed (the namespace is ours alone).

Tear-down is reliable: every tor is a child of this process (C{nsenter} execs it, so
the child is tor itself), stopped by L{TorNetwork.close}; each is also started with
C{__OwningControllerProcess} set to this process, so tor exits by itself if this
process dies without cleaning up; and the namespace's holder is killed with the world.

Keys of the authorities and relays (C{tor-gencert} and the relays' identity keys: the
slow part of a start) are cached in C{CACHE} and copied into fresh data directories
for each network; the cache is remade when its certificates are near expiry or the
layout changes.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from tests import netns, support

CACHE = os.path.join(
    os.environ.get("HYPERVISOR_TEST_CACHE", "/var/cache/smallstack-hypervisor"), "tornet"
)
LAYOUT_VERSION = "1"
AUTHORITIES = 3
RELAYS = 2
OR_BASE = 5100
DIR_BASE = 7100
SOCKS_BASE = 9100
# Authority certificates are made valid for this many months, and remade when fewer
# than CERT_MARGIN_DAYS days are left.
CERT_MONTHS = 12
CERT_MARGIN_DAYS = 30

COMMON = """\
TestingTorNetwork 1
AssumeReachable 1
PathsNeededToBuildCircuits 0.25
TestingDirAuthVoteExit *
TestingDirAuthVoteGuard *
TestingDirAuthVoteHSDir *
TestingMinExitFlagThreshold 0
V3AuthNIntervalsValid 2
ShutdownWaitLength 0
SafeLogging 0
ProtocolWarnings 1
DisableDebuggerAttachment 0
"""

AUTHORITY = """\
AuthoritativeDirectory 1
V3AuthoritativeDirectory 1
ContactInfo auth@test.test
ExitPolicy reject *:*
TestingV3AuthInitialVotingInterval 5
V3AuthVotingInterval 10
TestingV3AuthInitialVoteDelay 2
V3AuthVoteDelay 2
TestingV3AuthInitialDistDelay 2
V3AuthDistDelay 2
"""

RELAY = """\
ExitRelay 1
ExitPolicy accept 127.0.0.0/8:*
ExitPolicy reject *:*
TestingServerDownloadInitialDelay 0
TestingServerConsensusDownloadInitialDelay 0
"""


def require_tor() -> None:
    """
    Skip (or fail in CI) unless Debian's tor and tor-gencert and the namespace tools
    are there.
    """
    netns.require_world()
    for tool in ("tor", "tor-gencert"):
        support.require(
            shutil.which(tool) is not None, f"{tool} is not installed (tools/setup.sh --test)"
        )


@dataclass
class Node:
    """
    One tor of the network.

    @ivar dir: its DataDirectory (mode 0700).
    @ivar process: the tor process (None until started).
    """

    name: str
    dir: str
    torrc: str
    socks_port: int = 0
    process: Optional["subprocess.Popen[bytes]"] = None
    extra: list[str] = field(default_factory=list)

    @property
    def control_socket(self) -> str:
        """
        The path of its control port (a unix socket, cookie authentication).
        """
        return os.path.join(self.dir, "control.sock")

    @property
    def log_path(self) -> str:
        """
        Its notice-level log.
        """
        return os.path.join(self.dir, "notice.log")

    def log(self) -> str:
        """
        What it logged so far.
        """
        return read_text(self.log_path)


def read_text(path: str) -> str:
    """
    A log file's text ("" while it does not exist).
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def stop_process(process: Optional["subprocess.Popen[bytes]"]) -> None:
    """
    Stop a tor we started: SIGTERM, SIGKILL after 10 s; wait for it.
    """
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _run(argv: list[str], input: Optional[str] = None) -> "subprocess.CompletedProcess[str]":
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, input=input)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result


def _fingerprint(data_dir: str) -> str:
    """
    The relay identity fingerprint of the tor whose keys are in C{data_dir} (made if
    missing), without starting it.
    """
    result = _run(
        [
            "tor",
            "--list-fingerprint",
            "--DataDirectory",
            data_dir,
            "--ORPort",
            "1",
            "--DirAuthority",
            "placeholder 127.0.0.1:1 " + "0" * 40,
            "--quiet",
            "-f",
            "/dev/null",
            "--ignore-missing-torrc",
        ]
    )
    del result
    return _read_fingerprint(data_dir)


def _read_fingerprint(data_dir: str) -> str:
    """
    The relay identity fingerprint tor wrote in C{data_dir}.
    """
    with open(os.path.join(data_dir, "fingerprint")) as f:
        match = re.search(r"\b([0-9A-F]{40})\s*$", f.read())
    if match is None:
        raise RuntimeError(f"tor --list-fingerprint wrote no fingerprint in {data_dir}")
    return match.group(1)


def _cache_fresh(path: str) -> bool:
    """
    Whether the cached keys in C{path} are of this layout and not near expiry.
    """
    try:
        with open(os.path.join(path, "version")) as f:
            if f.read().strip() != LAYOUT_VERSION:
                return False
        for i in range(AUTHORITIES):
            with open(os.path.join(path, f"auth{i}", "keys", "authority_certificate")) as f:
                text = f.read()
            match = re.search(r"^dir-key-expires (\S+ \S+)", text, re.M)
            if match is None:
                return False
            expires = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            if expires - time.time() < CERT_MARGIN_DAYS * 86400:
                return False
        for i in range(RELAYS):
            if not os.path.exists(os.path.join(path, f"relay{i}", "fingerprint")):
                return False
    except (OSError, ValueError):
        return False
    return True


def _make_cache(path: str) -> None:
    """
    Make the authorities' keys (tor-gencert) and every relay's identity keys in
    C{path}, replacing what was there (built aside, then renamed into place).
    """
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    build = tempfile.mkdtemp(prefix="tornet-", dir=parent)
    try:
        for i in range(AUTHORITIES):
            node = os.path.join(build, f"auth{i}")
            keys = os.path.join(node, "keys")
            os.makedirs(keys, mode=0o700)
            os.chmod(node, 0o700)
            _run(
                [
                    "tor-gencert",
                    "--create-identity-key",
                    "--passphrase-fd",
                    "0",
                    "-m",
                    str(CERT_MONTHS),
                    "-a",
                    f"127.0.0.1:{DIR_BASE + i}",
                    "-i",
                    os.path.join(keys, "authority_identity_key"),
                    "-s",
                    os.path.join(keys, "authority_signing_key"),
                    "-c",
                    os.path.join(keys, "authority_certificate"),
                ],
                input="\n",
            )
            _fingerprint(node)
        for i in range(RELAYS):
            node = os.path.join(build, f"relay{i}")
            os.makedirs(node, mode=0o700)
            _fingerprint(node)
        with open(os.path.join(build, "version"), "w") as f:
            f.write(LAYOUT_VERSION + "\n")
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(build, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(build, ignore_errors=True)


def cached_keys(path: str = CACHE) -> str:
    """
    The directory of cached keys, made first if missing or stale (one process at a
    time: test runs in parallel wait for the first to make it).
    """
    if _cache_fresh(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cache_fresh(path):
            _make_cache(path)
    return path


def _v3ident(certificate_path: str) -> str:
    with open(certificate_path) as f:
        match = re.search(r"^fingerprint (\S+)", f.read(), re.M)
    if match is None:
        raise RuntimeError(f"{certificate_path}: no fingerprint line")
    return match.group(1)


class TorNetwork:
    """
    A private Tor network inside C{world}: call L{start}, then L{add_client} for the
    tors that tests use (onion services, SOCKS clients), and L{close} at the end
    (registered as the test's cleanup by L{start_network}).
    """

    def __init__(self, world: netns.World, owner: int = 0) -> None:
        """
        @param owner: the process whose end makes every tor exit by itself (default:
            this one).
        """
        self.world = world
        self.owner = owner or os.getpid()
        self.dir = tempfile.mkdtemp(prefix="tornet-", dir=world.dir)
        os.chmod(self.dir, 0o755)
        self.nodes: list[Node] = []
        self.keys = cached_keys()
        self.dir_authorities = self._dir_authority_lines()

    def _dir_authority_lines(self) -> str:
        lines = []
        for i in range(AUTHORITIES):
            node = os.path.join(self.keys, f"auth{i}")
            v3ident = _v3ident(os.path.join(node, "keys", "authority_certificate"))
            fingerprint = _read_fingerprint(node)
            lines.append(
                f"DirAuthority auth{i} orport={OR_BASE + i} no-v2 v3ident={v3ident} "
                f"127.0.0.1:{DIR_BASE + i} {fingerprint}"
            )
        return "\n".join(lines) + "\n"

    def client_config(self) -> str:
        """
        The torrc lines a tor started elsewhere needs to join this network (the daemon's
        own tor, through C{-torConfigFile}).
        """
        return COMMON + self.dir_authorities

    def _node(self, name: str, role: str, copy_from: Optional[str] = None) -> Node:
        path = os.path.join(self.dir, name)
        if copy_from is not None:
            shutil.copytree(copy_from, path, ignore=shutil.ignore_patterns("lock"))
        else:
            os.makedirs(path)
        os.chmod(path, 0o700)
        torrc = os.path.join(path, "torrc")
        text = (
            COMMON
            + self.dir_authorities
            + f"Nickname {name}\nDataDirectory {path}\n"
            + f"Log notice file {path}/notice.log\n"
            + f"__OwningControllerProcess {self.owner}\n"
            + role
        )
        with open(torrc, "w") as f:
            f.write(text)
        node = Node(name, path, torrc)
        self.nodes.append(node)
        return node

    def _spawn(self, node: Node) -> None:
        with open(os.path.join(node.dir, "output.log"), "wb") as output:
            node.process = self.world.spawn(
                ["tor", "-f", node.torrc], stdout=output, stderr=subprocess.STDOUT
            )

    def start(self) -> None:
        """
        Start the authorities and relays (does not wait: clients wait for bootstrap).
        """
        for i in range(AUTHORITIES):
            role = (
                AUTHORITY
                + f"Address 127.0.0.1\nORPort {OR_BASE + i}\nDirPort {DIR_BASE + i}\n"
                + "SocksPort 0\n"
            )
            self._spawn(self._node(f"auth{i}", role, os.path.join(self.keys, f"auth{i}")))
        for i in range(RELAYS):
            n = AUTHORITIES + i
            role = RELAY + f"Address 127.0.0.1\nORPort {OR_BASE + n}\nDirPort {DIR_BASE + n}\n"
            role += "SocksPort 0\n"
            self._spawn(self._node(f"relay{i}", role, os.path.join(self.keys, f"relay{i}")))

    def add_client(
        self, name: str, socks: bool = True, extra: str = "", socks_port: int = 0
    ) -> Node:
        """
        Start a client tor C{name} with a control socket (cookie authentication) and,
        if C{socks}, a SOCKS port on 127.0.0.1 (L{Node.socks_port}: C{socks_port}, or
        one of ours).
        """
        if socks and not socks_port:
            socks_port = SOCKS_BASE + len(self.nodes)
        if not socks:
            socks_port = 0
        role = (
            f"SocksPort {'127.0.0.1:%d' % socks_port if socks else '0'}\n"
            f"ControlPort unix:{os.path.join(self.dir, name, 'control.sock')}\n"
            "CookieAuthentication 1\n" + extra
        )
        node = self._node(name, role)
        node.socks_port = socks_port
        self._spawn(node)
        return node

    def wait_bootstrapped(self, node: Node, timeout: float = 120) -> None:
        """
        Wait until C{node} logged C{Bootstrapped 100%}.
        """

        def done() -> bool:
            if node.process is not None and node.process.poll() is not None:
                raise AssertionError(f"tor {node.name} exited:\n{node.log()}")
            return "Bootstrapped 100%" in node.log()

        try:
            support.wait_for(done, timeout, f"tor {node.name} to bootstrap", interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.describe()}") from None

    def describe(self) -> str:
        """
        The tail of every node's log (for failure messages).
        """
        out = []
        for node in self.nodes:
            tail = "\n".join(node.log().splitlines()[-8:])
            out.append(f"--- {node.name} ---\n{tail}")
        return "\n".join(out)

    def pids(self) -> list[int]:
        """
        The PIDs of our tors still running.
        """
        return [
            n.process.pid for n in self.nodes if n.process is not None and n.process.poll() is None
        ]

    def stop(self, node: Node) -> None:
        """
        Stop one tor (SIGTERM; SIGKILL after 10 s).
        """
        stop_process(node.process)

    def close(self) -> None:
        """
        Stop every tor of the network.
        """
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            self.stop(node)


def start_network(testcase) -> tuple[netns.World, TorNetwork]:  # type: ignore[no-untyped-def]
    """
    A world with a private Tor network started in it, both closed when C{testcase}
    ends (whatever happened).
    """
    require_tor()
    world = netns.World()
    testcase.addCleanup(world.close)
    network = TorNetwork(world)
    testcase.addCleanup(network.close)
    network.start()
    return world, network


class OfflineTor:
    """
    A lone tor with C{DisableNetwork 1} (it never touches the network, yet answers its
    control port at once: C{ADD_ONION} works), a control socket with cookie
    authentication, in a temporary directory: for fast tests of the onion service.
    """

    def __init__(self, testcase, control_path: str = "") -> None:  # type: ignore[no-untyped-def]
        support.require(
            shutil.which("tor") is not None, "tor is not installed (tools/setup.sh --test)"
        )
        self.dir = tempfile.mkdtemp(prefix="hv-tor-")
        os.chmod(self.dir, 0o700)
        self.control_path = control_path or os.path.join(self.dir, "control.sock")
        self.torrc = os.path.join(self.dir, "torrc")
        with open(self.torrc, "w") as f:
            f.write(
                f"DataDirectory {self.dir}/data\nDisableNetwork 1\nSocksPort 0\n"
                f"ControlPort unix:{self.control_path}\nCookieAuthentication 1\n"
                f"Log notice file {self.dir}/notice.log\n"
                f"__OwningControllerProcess {os.getpid()}\n"
            )
        self.process: Optional["subprocess.Popen[bytes]"] = None
        testcase.addCleanup(self.close)

    @property
    def endpoint(self) -> str:
        """
        Its control port as a Twisted client endpoint string.
        """
        return f"unix:{self.control_path}"

    def start(self, timeout: float = 30) -> None:
        """
        Start it and wait until its control socket is there.
        """
        os.makedirs(os.path.join(self.dir, "data"), mode=0o700, exist_ok=True)
        self.process = subprocess.Popen(
            ["tor", "-f", self.torrc], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"tor exited: {self.log()}")
            return os.path.exists(self.control_path)

        support.wait_for(up, timeout, "tor's control socket")

    def log(self) -> str:
        """
        What it logged.
        """
        return read_text(os.path.join(self.dir, "notice.log"))

    def stop(self) -> None:
        """
        Stop it (SIGTERM, then SIGKILL).
        """
        stop_process(self.process)

    def close(self) -> None:
        """
        Stop it and remove its files.
        """
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def tor_pids_using(path: str) -> list[int]:
    """
    PIDs of tor processes whose command line mentions C{path} (stray tors of a test).
    """
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"tor" and any(path.encode() in a for a in argv):
            out.append(int(entry))
    return out
