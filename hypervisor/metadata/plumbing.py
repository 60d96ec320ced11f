# -*- test-case-name: tests.test_metadata_real -*-
"""
The metadata server's network plumbing, per bridge, as the reference's metadatad
(reference §6) but without touching anything that is not ours:

- a network namespace C{hvmd-<tag>-<bridge>} (C{ip netns}) holding
  C{169.254.169.254/32} on its C{eth0};
- a veth pair: C{eth0} in the namespace, the host end C{hm<tag><hash>} enslaved to
  the bridge; both with the MTU of the bridge and fixed locally administered MACs
  C{fe:...} (high: never the bridge's own address);
- in the namespace, an on-link route for every subnet of that bridge with metadata
  enabled, and a permanent neighbour entry (IP -> MAC) for every VM address on
  them;
- one nftables table of ours, C{bridge hvmd_<tag>}, replaced whole in one
  transaction: per bridge, frames for 169.254.169.254 from its subnets get the
  veth's MAC as destination (so guests that route 169.254.169.254 via their gateway
  reach the namespace), and frames for 169.254.169.254 whose source IP belongs to a
  VM but whose source MAC is not that VM's are dropped.

C{<tag>} is the first hex digits of the hypervisor's UUID: leftovers of a daemon that
was killed are found by that tag and removed at start (L{Plumbing.clean_stale}); the
host's other tables, namespaces and links are never listed for removal, flushed or
changed. C{--logical-in} (the Go daemon's ebtables rule) cannot be used here (the
kernel lacks C{NFT_BRIDGE_META}): rules are scoped by source subnet instead.

Why a spoofed source gets nothing useful: the server answers only TCP connections,
so a client must receive the SYN-ACK. Replies leave the namespace to the MAC of its
permanent neighbour entry for that IP (the VM's own MAC, from the manager), never to
an address learnt from ARP, so a VM claiming another VM's IP cannot receive the
answer; the bridge rule also drops such frames before they reach the namespace
unless the sender forges the victim's MAC as well, which (as for any bridged
network) only per-port source filtering (libvirt's C{clean-traffic} nwfilter)
prevents. A source that is no VM's address gets 404 (L{hypervisor.metadata.backend}).

The listening sockets are made inside the namespace by a thread that enters it
(C{setns}) and hands the bound socket back (L{open_socket}); the reactor adopts it.
Every function here blocks (it runs C{ip} and C{nft}): call them on a thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import socket
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

METADATA_ADDRESS = "169.254.169.254"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
LISTEN_BACKLOG = 128


class PlumbingError(Exception):
    """
    A command of the plumbing failed (the message says which and why).
    """


@dataclass(frozen=True)
class BridgePlan:
    """
    What one bridge's namespace should hold.

    @ivar networks: the CIDRs of the bridge's subnets with metadata enabled.
    @ivar neighbours: VM IP -> MAC for every VM address on those subnets.
    """

    bridge: str
    networks: tuple[str, ...]
    neighbours: tuple[tuple[str, str], ...] = ()


@dataclass
class BridgeState:
    """
    What was made for a bridge.
    """

    netns: str
    veth: str
    mac: str
    created: bool = False
    sockets: list[socket.socket] = field(default_factory=list)


def run(argv: list[str], stdin: Optional[str] = None) -> str:
    """
    Run a command; raise L{PlumbingError} with its output if it fails.
    """
    try:
        result = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PlumbingError(f"{' '.join(argv)}: {e}") from None
    if result.returncode != 0:
        raise PlumbingError(
            f"{' '.join(argv)} failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}"
        )
    return result.stdout


_libc: Optional[ctypes.CDLL] = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def in_namespace(netns: str, fn: Callable[[], socket.socket]) -> socket.socket:
    """
    Run C{fn} on a fresh thread that has entered network namespace C{netns} (the
    thread ends with it, so no thread of ours stays in a namespace); return its result.
    """
    result: list[socket.socket] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            error.append(e)

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def open_socket(netns: str, port: int, address: str = METADATA_ADDRESS) -> socket.socket:
    """
    A listening TCP socket on C{address:port} inside C{netns} (non-blocking).
    """

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((address, port))
            s.listen(LISTEN_BACKLOG)
            s.setblocking(False)
        except OSError:
            s.close()
            raise
        return s

    return in_namespace(netns, make)


class Plumbing:
    """
    Namespaces, veths and the nftables table of one daemon (C{tag}).
    """

    def __init__(self, tag: str, command: Callable[..., str] = run) -> None:
        if not tag or not tag.isalnum():
            raise ValueError(f"plumbing tag {tag!r} must be letters and digits")
        self.tag = tag[:6].lower()
        self.command = command
        self.table = f"hvmd_{self.tag}"

    # Names ------------------------------------------------------------------------------

    def netns_name(self, bridge: str) -> str:
        """
        The namespace of C{bridge}'s metadata server.
        """
        return f"hvmd-{self.tag}-{bridge}"

    def _hash(self, bridge: str) -> str:
        return hashlib.sha256(f"{self.tag}/{bridge}".encode()).hexdigest()

    def veth_name(self, bridge: str) -> str:
        """
        The host end of the veth pair (15 characters at most).
        """
        return f"hm{self.tag}{self._hash(bridge)[:6]}"

    def veth_mac(self, bridge: str, host_end: bool = False) -> str:
        """
        The MAC of the namespace's C{eth0} (where the bridge rule sends frames), or of
        the host end: locally administered unicast C{fe:...} (high, so the bridge
        never takes it as its own address).
        """
        h = self._hash(bridge)
        start = 18 if host_end else 8
        return "fe:" + ":".join(h[i : i + 2] for i in range(start, start + 10, 2))

    # Listing what is ours ----------------------------------------------------------------

    def namespaces(self) -> list[str]:
        """
        Our namespaces that exist.
        """
        prefix = f"hvmd-{self.tag}-"
        try:
            names = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if n.startswith(prefix))

    def links(self) -> list[str]:
        """
        Our host-side veth ends that exist.
        """
        prefix = f"hm{self.tag}"
        return sorted(n for n in os.listdir("/sys/class/net") if n.startswith(prefix))

    def has_table(self) -> bool:
        """
        Whether our nftables table exists.
        """
        out = self.command(["nft", "list", "tables", "bridge"])
        return any(line.split()[-1:] == [self.table] for line in out.splitlines())

    # Clean-up ---------------------------------------------------------------------------

    def clean_stale(self) -> list[str]:
        """
        Remove every namespace, veth and table of ours (leftovers of a daemon that
        did not stop cleanly); return what was removed.
        """
        removed = []
        if self.has_table():
            self.command(["nft", "delete", "table", "bridge", self.table])
            removed.append(f"nftables table bridge {self.table}")
        for name in self.namespaces():
            self._delete_netns(name)
            removed.append(f"network namespace {name}")
        for link in self.links():
            self._delete_link(link)
            removed.append(f"interface {link}")
        return removed

    def _delete_netns(self, name: str) -> None:
        try:
            self.command(["ip", "netns", "delete", name])
        except PlumbingError:
            if os.path.exists(os.path.join(NETNS_DIR, name)):
                raise

    def _delete_link(self, name: str) -> None:
        try:
            self.command(["ip", "link", "delete", name])
        except PlumbingError:
            if os.path.exists(f"/sys/class/net/{name}"):
                raise

    def remove(self, bridge: str) -> None:
        """
        Remove C{bridge}'s namespace and veth.
        """
        self._delete_netns(self.netns_name(bridge))
        if os.path.exists(f"/sys/class/net/{self.veth_name(bridge)}"):
            self._delete_link(self.veth_name(bridge))

    def remove_all(self) -> None:
        """
        Remove everything of ours (at stop).
        """
        self.clean_stale()

    # Making -------------------------------------------------------------------------------

    def ensure(self, plan: BridgePlan) -> BridgeState:
        """
        Make (or repair) C{plan.bridge}'s namespace and veth; set its routes and
        neighbour entries to the plan's.
        """
        bridge = plan.bridge
        netns = self.netns_name(bridge)
        veth = self.veth_name(bridge)
        mac = self.veth_mac(bridge)
        created = False
        if not os.path.exists(os.path.join(NETNS_DIR, netns)):
            if os.path.exists(f"/sys/class/net/{veth}"):
                self._delete_link(veth)
            self.command(["ip", "netns", "add", netns])
            created = True
        if not os.path.exists(f"/sys/class/net/{veth}"):
            # a veth whose peer is gone (namespace removed by hand): start over
            self._delete_netns(netns)
            self.command(["ip", "netns", "add", netns])
            self.command(
                ["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns]
            )
            created = True
        with open(f"/sys/class/net/{bridge}/mtu") as f:
            mtu = f.read().strip()
        master = os.path.join("/sys/class/net", veth, "master")
        current_master = os.path.basename(os.readlink(master)) if os.path.islink(master) else ""
        if created or current_master != bridge:
            self.command(
                [
                    "ip",
                    "link",
                    "set",
                    veth,
                    "address",
                    self.veth_mac(bridge, host_end=True),
                    "mtu",
                    mtu,
                    "master",
                    bridge,
                    "up",
                ]
            )
            batch = [
                "link set lo up",
                f"link set eth0 address {mac} mtu {mtu} up",
                f"addr replace {METADATA_ADDRESS}/32 dev eth0",
            ]
            self.command(["ip", "-n", netns, "-force", "-batch", "-"], "\n".join(batch) + "\n")
        self._sync_routes(netns, plan)
        return BridgeState(netns, veth, mac, created)

    def _sync_routes(self, netns: str, plan: BridgePlan) -> None:
        routes = self.command(["ip", "-n", netns, "-4", "route", "show", "dev", "eth0"])
        have = {line.split()[0] for line in routes.splitlines() if line.strip()}
        neigh = self.command(["ip", "-n", netns, "-4", "neigh", "show", "nud", "permanent"])
        have_neigh = {}
        for line in neigh.splitlines():
            parts = line.split()
            if len(parts) >= 5 and parts[3] == "lladdr":
                have_neigh[parts[0]] = parts[4].lower()
        batch = []
        for cidr in sorted(set(plan.networks) - have):
            batch.append(f"route replace {cidr} dev eth0")
        for cidr in sorted(have - set(plan.networks)):
            batch.append(f"route delete {cidr} dev eth0")
        wanted = {ip: mac.lower() for ip, mac in plan.neighbours}
        for ip, mac in sorted(wanted.items()):
            if have_neigh.get(ip) != mac:
                batch.append(f"neigh replace {ip} lladdr {mac} dev eth0 nud permanent")
        for ip in sorted(set(have_neigh) - set(wanted)):
            batch.append(f"neigh delete {ip} dev eth0")
        if batch:
            self.command(["ip", "-n", netns, "-force", "-batch", "-"], "\n".join(batch) + "\n")

    def rules(self, plans: list[BridgePlan]) -> str:
        """
        The C{nft -f} script that replaces our table with one for C{plans}.
        """
        lines = [f"table bridge {self.table} {{}}", f"delete table bridge {self.table}"]
        if not plans:
            return "\n".join(lines) + "\n"
        lines.append(f"table bridge {self.table} {{")
        chain = []
        for index, plan in enumerate(plans):
            if not plan.networks:
                continue
            nets = ", ".join(sorted(plan.networks))
            lines.append(f"  set nets_{index} {{ type ipv4_addr; flags interval; ")
            lines.append(f"    elements = {{ {nets} }} }}")
            lines.append(f"  set vmips_{index} {{ type ipv4_addr; ")
            pairs = sorted(set(plan.neighbours))
            if pairs:
                ips = ", ".join(sorted({ip for ip, _ in pairs}))
                lines.append(f"    elements = {{ {ips} }}")
            lines.append("  }")
            lines.append(f"  set vms_{index} {{ type ether_addr . ipv4_addr; ")
            if pairs:
                elements = ", ".join(f"{mac.lower()} . {ip}" for ip, mac in pairs)
                lines.append(f"    elements = {{ {elements} }}")
            lines.append("  }")
            comment = f'comment "hvmd {plan.bridge}"'
            chain.append(
                f"    ip daddr {METADATA_ADDRESS} ip saddr @vmips_{index} "
                f"ether saddr . ip saddr != @vms_{index} counter drop {comment}"
            )
            chain.append(
                f"    ip daddr {METADATA_ADDRESS} ip saddr @nets_{index} "
                f"ether daddr set {self.veth_mac(plan.bridge)} meta pkttype set host "
                f"counter {comment}"
            )
        lines.append("  chain prerouting {")
        lines.append("    type filter hook prerouting priority -300; policy accept;")
        lines.extend(chain)
        lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def write_rules(self, plans: list[BridgePlan]) -> None:
        """
        Replace our nftables table (one transaction; nothing else is touched).
        """
        self.command(["nft", "-f", "-"], self.rules(plans))
