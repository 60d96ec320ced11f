"""
A private network world for tests of network code, as reference/environment.md
recommends: a network and mount namespace (C{unshare -nm}) held by a sleeping
process, in which tests make a bridge and, per client, a namespace joined to the
bridge by a veth pair. Everything vanishes with the holder process; nothing touches
the host's own interfaces.

Commands run inside with L{World.run} (C{nsenter} into the world), and inside a
client's namespace with L{World.client} (C{ip netns exec}). Never 192.0.2.0/24 (the
machines' own network): the world uses 10.x addresses.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Optional, Sequence

from tests import support


def require_world() -> None:
    """
    Skip (or fail in CI) unless this process may make namespaces (root, unshare,
    nsenter, ip).
    """
    support.require(os.geteuid() == 0, "needs root to make network namespaces")
    for tool in ("unshare", "nsenter", "ip"):
        support.require(shutil.which(tool) is not None, f"{tool} is not installed")


class World:
    """
    A private network namespace with its own C{/run/netns}, held by a sleeping
    process until L{close}.

    @ivar pid: the holder process (join its namespaces with C{nsenter -t PID -n -m}).
    @ivar dir: a temporary directory for files of the test (hooks, leases, logs).
    """

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hv-netns-")
        os.chmod(self.dir, 0o755)
        os.makedirs("/run/netns", exist_ok=True)
        # /sys is mounted again so that /sys/class/net shows this namespace's
        # interfaces (sysfs shows those of the namespace that mounted it).
        script = (
            "mount -t tmpfs none /run/netns && mount -t sysfs none /sys && "
            "ip link set lo up && echo ready && exec sleep 100000"
        )
        self.holder = subprocess.Popen(
            ["unshare", "-nm", "--propagation", "private", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        if line.strip() != b"ready":
            err = self.holder.stderr.read() if self.holder.stderr else b""
            self.holder.kill()
            raise RuntimeError(f"cannot make a network namespace: {line!r} {err!r}")
        self.pid = self.holder.pid
        self.clients: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    def prefix(self) -> list[str]:
        """
        The command prefix that runs something inside the world.
        """
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "--"]

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
        """
        Run a command inside the world; return its output.
        """
        result = subprocess.run(
            self.prefix() + list(argv), capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} failed ({result.returncode}): {result.stdout}{result.stderr}"
            )
        return result.stdout

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> "subprocess.Popen[bytes]":
        """
        Start a long-running command inside the world (killed by L{close}).
        """
        process = subprocess.Popen(self.prefix() + list(argv), **kwargs)
        self.processes.append(process)
        return process

    def bridge(self, name: str, address: str = "", mac: str = "02:00:00:00:44:01") -> None:
        """
        Make bridge C{name} (fixed MAC) with C{address} (CIDR) if given, up.
        """
        self.run("ip", "link", "add", name, "type", "bridge")
        self.run("ip", "link", "set", name, "address", mac)
        if address:
            self.run("ip", "addr", "add", address, "dev", name)
        self.run("ip", "link", "set", name, "up")

    def add_client(self, name: str, mac: str, bridge: str) -> None:
        """
        Make namespace C{name} whose C{eth0} (MAC C{mac}) is on C{bridge}.
        """
        self.run("ip", "netns", "add", name)
        host_end = f"{name}-h"
        self.run(
            "ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name
        )
        self.run("ip", "-n", name, "link", "set", "eth0", "address", mac)
        self.run("ip", "-n", name, "link", "set", "lo", "up")
        self.run("ip", "-n", name, "link", "set", "eth0", "up")
        self.run("ip", "link", "set", host_end, "master", bridge)
        self.run("ip", "link", "set", host_end, "up")
        self.clients.append(name)

    def client(
        self, name: str, *argv: str, timeout: float = 60, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """
        Run a command in client namespace C{name}.
        """
        result = subprocess.run(
            self.prefix() + ["ip", "netns", "exec", name] + list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(argv)} in {name} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}"
            )
        return result

    def spawn_client(
        self, name: str, argv: Sequence[str], **kwargs: Any
    ) -> "subprocess.Popen[bytes]":
        """
        Start a long-running command in client namespace C{name}.
        """
        return self.spawn(["ip", "netns", "exec", name] + list(argv), **kwargs)

    def client_until(
        self,
        name: str,
        argv: Sequence[str],
        path: str,
        timeout: float = 30,
        env: Any = None,
        grace: float = 0.5,
    ) -> bool:
        """
        Run a client in namespace C{name} until it exits or writes C{path}, then stop
        it (clients such as dhclient keep running once bound) C{grace} seconds later
        (dhclient writes its lease file after running its hook).

        @return: whether C{path} was written.
        """
        process = self.spawn_client(
            name, argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if os.path.exists(path):
                time.sleep(grace)
                break
            time.sleep(0.05)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        return os.path.exists(path)

    def file(self, name: str, content: str = "", mode: int = 0o644) -> str:
        """
        Write a file of the test; return its path.
        """
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def close(self) -> None:
        """
        Stop every process started inside and the holder: the world vanishes.
        """
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)
        for stream in (self.holder.stdout, self.holder.stderr):
            if stream is not None:
                stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


UDHCPC_HOOK = """#!/bin/sh
# Record what udhcpc was given, one KEY=VALUE per line, per event.
out="$OUT_DIR/udhcpc.$1"
{
  echo "ip=$ip"; echo "subnet=$subnet"; echo "router=$router"; echo "dns=$dns"
  echo "hostname=$hostname"; echo "domain=$domain"; echo "lease=$lease"
  echo "serverid=$serverid"; echo "siaddr=$siaddr"; echo "boot_file=$boot_file"
  echo "staticroutes=$staticroutes"; echo "mask=$mask"; echo "broadcast=$broadcast"
} > "$out.tmp" && mv "$out.tmp" "$out"
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    ;;
esac
exit 0
"""

DHCLIENT_HOOK = """#!/bin/sh
# Record what dhclient was given, per reason.
env | grep -E '^(new_|reason=)' | sort > "$OUT_DIR/dhclient.$reason"
case "$reason" in
  BOUND|RENEW|REBOOT|REBIND)
    ip addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface"
    ;;
esac
exit 0
"""

DHCPCD_HOOK = """#!/bin/sh
# Record what dhcpcd was given, per reason.
env | grep -E '^(new_|reason=)' | sort > "$OUT_DIR/dhcpcd.$reason"
exit 0
"""


def hook(world: World, name: str, text: str) -> str:
    """
    Write hook script C{name} recording into the world's directory (clients run hooks
    with a clean environment, so the directory is written into the script).
    """
    return world.file(name, text.replace("$OUT_DIR", world.dir), 0o755)


def read_record(path: str) -> Optional[dict[str, str]]:
    """
    A hook's KEY=VALUE file as a dict, or None if not written.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    out = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            out[key] = value.strip("'")
    return out
