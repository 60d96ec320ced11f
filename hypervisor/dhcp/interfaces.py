# -*- test-case-name: tests.test_dhcp_interfaces -*-
"""
Which interfaces the DHCP server serves, and this host's IPv4 addresses: blocking
reads of C{/sys/class/net}, C{/proc/net/vlan} and a netlink address dump, run on a
thread by the service.

The rules are the reference's (C{cmd/hypervisor/main.go}, C{lib/net}):

- an interface's type is, in this order: bonding (C{bonding/}), bridge
  (C{bridge/}), Ethernet (C{device}), VLAN (C{/proc/net/vlan/<name>}), TUN/TAP
  (C{tun_flags}), else unknown; only up broadcast interfaces count;
- without C{-dhcpServerOnBridgesOnly}: every up broadcast Ethernet, bridge and VLAN
  interface;
- with it: the bridges, where a bridge without an Ethernet port (its ports other than
  C{tap*}, C{*-ll} and TUN/TAP devices) is ignored, unless it is the only bridge:
  then it is used "in hope".
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional

from hypervisor.dhcp.policy import HostInterface, HostView

SYS_CLASS_NET = "/sys/class/net"
PROC_NET_VLAN = "/proc/net/vlan"
IFF_UP = 0x1
IFF_BROADCAST = 0x2

NETLINK_ROUTE = 0
RTM_NEWADDR = 20
RTM_GETADDR = 22
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 1
NLM_F_DUMP = 0x300
IFA_ADDRESS = 1
IFA_LOCAL = 2


@dataclass
class Discovery:
    """
    The result of one look at the host.

    @ivar serving: the interfaces to serve, by name.
    @ivar notes: sentences about interfaces left out or used in hope (for the log
        and the page).
    """

    host: HostView
    serving: dict[str, HostInterface] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def interface_type(name: str, sys_class_net: str, proc_net_vlan: str) -> str:
    """
    C{bonding}, C{bridge}, C{ethernet}, C{vlan}, C{tuntap} or C{unknown} (the
    reference's C{includeType} order).
    """
    base = os.path.join(sys_class_net, name)
    if os.path.exists(os.path.join(base, "bonding")):
        return "bonding"
    if os.path.exists(os.path.join(base, "bridge")):
        return "bridge"
    if os.path.exists(os.path.join(base, "device")):
        return "ethernet"
    if os.path.exists(os.path.join(proc_net_vlan, name)):
        return "vlan"
    if os.path.exists(os.path.join(base, "tun_flags")):
        return "tuntap"
    return "unknown"


def bridge_vlan_id(name: str, sys_class_net: str, proc_net_vlan: str) -> int:
    """
    The VLAN id of a bridge's uplink (0 if untagged), or -1 if it has no Ethernet
    port (the reference's C{GetBridgeVlanId}).
    """
    try:
        ports = sorted(os.listdir(os.path.join(sys_class_net, name, "brif")))
    except OSError:
        return -1
    for port in ports:
        if port.startswith("tap") or port.endswith("-ll"):
            continue
        if os.path.exists(os.path.join(sys_class_net, port, "tun_flags")):
            continue
        text = _read(os.path.join(proc_net_vlan, port))
        if text is None:
            return 0
        words = text.split()
        try:
            return int(words[words.index("VID:") + 1])
        except (ValueError, IndexError):
            return 0
    return -1


def ipv4_addresses() -> dict[int, list[ipaddress.IPv4Interface]]:
    """
    Every IPv4 address of this network namespace, by interface index (a netlink
    C{RTM_GETADDR} dump).
    """
    out: dict[int, list[ipaddress.IPv4Interface]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE) as s:
        s.bind((0, 0))
        request = struct.pack("=IHHII", 24, RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
        s.send(request + struct.pack("=BBBBI", socket.AF_INET, 0, 0, 0, 0))
        while True:
            data = s.recv(65536)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                if length < 16:
                    return out
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    raise OSError("netlink refused the address dump")
                if kind == RTM_NEWADDR:
                    _parse_address(data[offset + 16 : offset + length], out)
                offset += (length + 3) & ~3


def _parse_address(body: bytes, out: dict[int, list[ipaddress.IPv4Interface]]) -> None:
    family, prefix, _, _, index = struct.unpack_from("=BBBBI", body)
    if family != socket.AF_INET:
        return
    attrs: dict[int, bytes] = {}
    offset = 8
    while offset + 4 <= len(body):
        length, kind = struct.unpack_from("=HH", body, offset)
        if length < 4:
            break
        attrs[kind] = body[offset + 4 : offset + length]
        offset += (length + 3) & ~3
    raw = attrs.get(IFA_LOCAL) or attrs.get(IFA_ADDRESS)
    if raw is None or len(raw) != 4:
        return
    out.setdefault(index, []).append(ipaddress.IPv4Interface(f"{socket.inet_ntoa(raw)}/{prefix}"))


def discover(
    bridges_only: bool,
    sys_class_net: str = SYS_CLASS_NET,
    proc_net_vlan: str = PROC_NET_VLAN,
    addresses: Optional[dict[int, list[ipaddress.IPv4Interface]]] = None,
) -> Discovery:
    """
    The interfaces to serve and the host's addresses (blocking: run on a thread).
    """
    if addresses is None:
        addresses = ipv4_addresses()
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        names = []
    interfaces: dict[str, HostInterface] = {}
    kinds: dict[str, str] = {}
    all_ips: list[str] = []
    for name in names:
        flags_text = _read(os.path.join(sys_class_net, name, "flags"))
        index_text = _read(os.path.join(sys_class_net, name, "ifindex"))
        try:
            flags = int(flags_text or "0", 16)
            index = int(index_text or "0")
        except ValueError:
            continue
        own = tuple(addresses.get(index, []))
        all_ips.extend(str(a.ip) for a in own if not a.ip.is_loopback)
        if not flags & IFF_UP or not flags & IFF_BROADCAST:
            continue
        kind = interface_type(name, sys_class_net, proc_net_vlan)
        kinds[name] = kind
        interfaces[name] = HostInterface(name, index, kind, own)
    notes: list[str] = []
    serving: dict[str, HostInterface] = {}
    bridges = [name for name, kind in kinds.items() if kind == "bridge"]
    if bridges_only:
        for name in bridges:
            if bridge_vlan_id(name, sys_class_net, proc_net_vlan) < 0:
                if len(bridges) > 1:
                    notes.append(f"bridge {name} has no Ethernet port: not served")
                    continue
                notes.append(f"bridge {name} has no Ethernet port but is the only bridge: served")
            serving[name] = interfaces[name]
    else:
        for name, kind in kinds.items():
            if kind in ("ethernet", "bridge", "vlan"):
                serving[name] = interfaces[name]
    host = HostView(
        interfaces=interfaces,
        my_ips=frozenset(all_ips),
        first_ip=all_ips[0] if all_ips else "",
    )
    return Discovery(host, serving, notes)
