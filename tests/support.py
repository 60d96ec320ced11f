"""
Helpers for tests that use real parts: libvirtd, a daemon subprocess, free ports.

A test needing a real part that is missing is skipped with the reason, except when
C{HYPERVISOR_REQUIRE_REAL_PARTS=1} (set by C{.ci/run}): then it fails, because CI
installs every part and nothing may be skipped there.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Optional

from twisted.trial.unittest import SkipTest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QEMU_URI = "qemu:///system"
LIBVIRTD_PIDFILE = "/run/libvirtd.pid"


def require(available: bool, reason: str) -> None:
    """
    Skip the test with C{reason} unless C{available}; in CI, fail instead.
    """
    if available:
        return
    if os.environ.get("HYPERVISOR_REQUIRE_REAL_PARTS") == "1":
        raise AssertionError(f"real part missing in CI: {reason}")
    raise SkipTest(reason)


def libvirtd_answers(uri: str = QEMU_URI) -> bool:
    """
    Whether libvirtd answers on C{uri} (checked with virsh, not in this process).
    """
    if shutil.which("virsh") is None:
        return False
    return (
        subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, timeout=30).returncode
        == 0
    )


def require_libvirtd() -> None:
    """
    Skip (or fail in CI) unless a real libvirtd answers on qemu:///system as root.
    """
    require(os.geteuid() == 0, "needs root to use qemu:///system")
    require(
        libvirtd_answers(),
        "libvirtd does not answer on qemu:///system " "(tools/start-libvirtd.sh starts it)",
    )


def libvirtd_pid() -> Optional[int]:
    """
    The running libvirtd's PID, from its pidfile.
    """
    try:
        with open(LIBVIRTD_PIDFILE) as f:
            pid = int(f.read().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def kill_libvirtd(timeout: float = 30.0) -> None:
    """
    Stop libvirtd (SIGTERM) and wait until it is gone. Running guests stay up.
    """
    pid = libvirtd_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"libvirtd (pid {pid}) did not exit within {timeout}s")


def start_libvirtd(timeout: float = 60.0) -> None:
    """
    Start libvirtd daemonized (it outlives the test) and wait until it answers.
    """
    subprocess.run(
        [os.path.join(REPO, "tools", "start-libvirtd.sh")],
        check=True,
        capture_output=True,
        timeout=timeout,
    )


def destroy_domains(
    names: Optional[list[str]] = None, *, prefix: str = "", within: str = "", uri: str = QEMU_URI
) -> int:
    """
    Destroy and undefine the domains of these C{names}, or named C{vm-<prefix>.*}, if
    they exist (what a test, or an interrupted earlier run of it, left behind); how
    many there were. With C{within} (a daemon's directory), only those whose
    definition names a file under it: that daemon's, not those of a test running
    beside it (C{trial -j}) on the same addresses.
    """
    import libvirt

    conn = libvirt.open(uri)
    count = 0
    try:
        for dom in conn.listAllDomains():
            name = dom.name()
            if not (name in names if names is not None else name.startswith(f"vm-{prefix}.")):
                continue
            try:
                if within and within.rstrip("/") + "/" not in dom.XMLDesc(0):
                    continue
                count += 1
                persistent = dom.isPersistent()  # a transient domain is gone once destroyed
                if dom.isActive():
                    dom.destroy()
                if persistent:
                    dom.undefine()
            except libvirt.libvirtError:
                pass  # gone meanwhile (its own daemon removed it): nothing left to do
    finally:
        conn.close()
    return count


def wait_booted(bootlog: str, timeout: float = 120.0) -> None:
    """
    Wait until the tiny guest whose boot log is at C{bootlog} says it booted (from
    then on it obeys ACPI's power button).
    """

    def booted() -> bool:
        try:
            with open(bootlog, errors="replace") as f:
                return "tiny-guest: booted" in f.read()
        except FileNotFoundError:
            return False

    wait_for(booted, timeout, f"the guest to boot ({bootlog})")


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """
    GET C{url}; return (status, body) for any HTTP status.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):  # type: ignore[no-untyped-def]
    """
    Poll C{predicate} until it returns a true value; fail with C{what} after C{timeout}.
    """
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as e:  # noqa: BLE001 - reported below if it never passes
            last = e
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Daemon:
    """
    The real daemon (C{python -m hypervisor ... run}) as a subprocess, for one test.
    """

    def __init__(self, testcase, *flags: str) -> None:  # type: ignore[no-untyped-def]
        self.dir = tempfile.mkdtemp(prefix="hv-daemon-")
        self.state_dir = os.path.join(self.dir, "state")
        self.log_dir = os.path.join(self.dir, "log")
        self.port = free_port()
        self.flags = [
            # DHCP on bridges only, never on the host's own Ethernet (eth0...): a test
            # daemon must not answer DHCP on the machine's network (it runs as root in
            # the host's namespace; the default serves every up Ethernet interface).
            "-dhcpServerOnBridgesOnly",
            f"-stateDir={self.state_dir}",
            f"-logDir={self.log_dir}",
            f"-portNum={self.port}",
            # No metadata namespaces on the host's bridges from daemons of tests that
            # do not test it (tests kill daemons: their leftovers would stay).
            "-metadataServer=false",
            # No TFTP on the host's port 69 either (tests of it run their own daemons).
            "-tftpPortNum=0",
            # Nor Perspective Broker on the shared port 8787 (tests of it pass their own).
            "-pbPortNum=0",
            *flags,
        ]
        self.output_path = os.path.join(self.dir, "output.log")
        self.process: Optional[subprocess.Popen[bytes]] = None
        # A command prefix for the daemon (e.g. nsenter into a network namespace).
        self.prefix: list[str] = []
        testcase.addCleanup(self.cleanup)

    @property
    def url(self) -> str:
        """
        Base URL of the status pages.
        """
        return f"http://127.0.0.1:{self.port}"

    def command(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """
        Run C{python -m hypervisor <flags> <args>} and return its result.
        """
        env = dict(os.environ, PYTHONPATH=REPO, HYPERVISOR_FLAGS_DIRECTORY=self.dir)
        return subprocess.run(
            [sys.executable, "-m", "hypervisor", *self.flags, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> None:
        """
        Start the daemon and wait until its pages answer.
        """
        env = dict(os.environ, PYTHONPATH=REPO, HYPERVISOR_FLAGS_DIRECTORY=self.dir)
        self._output = open(self.output_path, "wb")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "hypervisor", *self.flags, "run"],
            cwd=REPO,
            env=env,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.output()}")
            return self.answers()

        try:
            wait_for(up, 60, "the daemon's pages")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- daemon output ---\n{self.output()}") from None

    def answers(self) -> bool:
        """
        Whether the daemon's pages answer (C{/healthz}: 200, or 503 without libvirt).
        """
        return http_get(self.url + "/healthz", timeout=2)[0] in (200, 503)

    def output(self) -> str:
        """
        What the daemon printed so far.
        """
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait(self, timeout: float = 60.0) -> int:
        """
        Wait for the daemon to exit; return its exit status.
        """
        assert self.process is not None
        return self.process.wait(timeout)

    def cleanup(self) -> None:
        """
        Kill the daemon if still running; remove its files.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        if getattr(self, "_output", None) is not None:
            self._output.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TEST_BRIDGE = "br@hvtest"


def tiny_guest() -> str:
    """
    The tiny guest's directory (built once, cached); skip/fail if it cannot be built.
    """
    from tests.guest import build

    try:
        return build.build(build.DEFAULT_CACHE)
    except Exception as e:  # noqa: BLE001 - reported as the reason
        require(False, f"cannot build the tiny guest: {e}")
        raise


def ensure_bridge(name: str = TEST_BRIDGE) -> str:
    """
    A bridge with no host address for test VMs (its traffic stays inside it).
    """
    if not os.path.exists(f"/sys/class/net/{name}"):
        subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", name, "address", "02:00:00:00:7e:57"], check=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    return name


def public_tempdir(prefix: str) -> str:
    """
    A temporary directory QEMU (user libvirt-qemu) can traverse.
    """
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path


def tls_daemon(testcase, users: dict[str, str], *flags: str):  # type: ignore[no-untyped-def]
    """
    A real daemon with TLS: a CA, its certificate, and one certificate directory per
    user (name -> permitted methods), made with 'hypervisor make-certs'; started.

    @return: the daemon and C{cli(module, user, *args)} running vm-control or
        hyper-control against it as that user (a CompletedProcess).
    """
    d = Daemon(testcase, *flags)
    os.chmod(d.dir, 0o755)
    pki = os.path.join(d.dir, "pki")
    d.flags += [
        f"-CAfile={pki}/CA.pem",
        f"-identityCAfile={pki}/none.pem",
        f"-certFile={pki}/server.pem",
        f"-keyFile={pki}/server.key",
        f"-volumeDirectories={d.dir}/volumes",
    ]
    for user, methods in users.items():
        result = d.command(
            "make-certs", "--user", user, "--methods", methods, "--out", f"{pki}/{user}"
        )
        assert result.returncode == 0, result.stderr
    d.start()

    def cli(module: str, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            tool_argv(module, d.port, pki, user, *args),
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
            capture_output=True,
            text=True,
            timeout=120,
        )

    return d, cli


def tool_argv(module: str, port: int, pki: str, user: str, *args: str) -> list[str]:
    """
    The command line of C{hypervisor.cli.<module>} (vm_control, hyper_control) aimed at
    the daemon on C{port}, as C{user} (certificates in C{pki/<user>}, the CA in C{pki}).
    """
    return [
        sys.executable,
        "-m",
        f"hypervisor.cli.{module}",
        f"-hypervisorPortNum={port}",
        f"-certDirectory={pki}/{user}",
        f"-CAfile={pki}/CA.pem",
        *args,
    ]


async def until(
    predicate: Any, timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> None:
    """
    Wait on the running reactor (without blocking it) until C{predicate()} is true.

    @raise AssertionError: it was not true within C{timeout} seconds.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(max(1, int(timeout / interval))):
        if predicate():
            return
        await deferLater(reactor, interval, lambda: None)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
