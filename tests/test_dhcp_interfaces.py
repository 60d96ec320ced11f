"""
Tests for L{hypervisor.dhcp.interfaces}: the reference's rules for the interfaces the
DHCP server serves, on fake C{/sys/class/net} and C{/proc/net/vlan} trees, and the
netlink address dump of this host.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.dhcp import interfaces

UP_BROADCAST = "0x1003"


class FakeSys:
    """
    A fake C{/sys/class/net} and C{/proc/net/vlan}.
    """

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.root = tempfile.mkdtemp()
        testcase.addCleanup(shutil.rmtree, self.root, True)
        self.net = os.path.join(self.root, "net")
        self.vlan = os.path.join(self.root, "vlan")
        os.makedirs(self.net)
        os.makedirs(self.vlan)
        self.next_index = 2

    def add(
        self,
        name: str,
        kind: str,
        flags: str = UP_BROADCAST,
        ports: tuple[str, ...] = (),
        vid: int = -1,
    ) -> int:
        """
        An interface of C{kind} (bridge, ethernet, veth, tap, bonding, vlan); its index.
        """
        base = os.path.join(self.net, name)
        os.makedirs(base)
        index = self.next_index
        self.next_index += 1
        for filename, content in (("flags", flags), ("ifindex", str(index))):
            with open(os.path.join(base, filename), "w") as f:
                f.write(content + "\n")
        if kind == "bridge":
            os.makedirs(os.path.join(base, "bridge"))
            os.makedirs(os.path.join(base, "brif"))
            for port in ports:
                os.makedirs(os.path.join(base, "brif", port))
        elif kind == "ethernet":
            os.makedirs(os.path.join(base, "device"))
        elif kind == "bonding":
            os.makedirs(os.path.join(base, "bonding"))
        elif kind == "tap":
            with open(os.path.join(base, "tun_flags"), "w") as f:
                f.write("0x1002\n")
        if vid >= 0:
            with open(os.path.join(self.vlan, name), "w") as f:
                f.write(f"{name}  VID: {vid}\t REORDER_HDR: 1  dev->priv_flags: 1\n")
        return index

    def discover(self, bridges_only: bool, addresses: dict | None = None) -> interfaces.Discovery:
        return interfaces.discover(bridges_only, self.net, self.vlan, addresses or {})


class DiscoveryTests(SynchronousTestCase):
    """
    Which interfaces are served.
    """

    def test_default_serves_ethernet_bridges_vlans(self) -> None:
        """
        Without -dhcpServerOnBridgesOnly: every up broadcast Ethernet, bridge and VLAN
        interface; not bonding, TUN/TAP, veth (no device), down or loopback ones.
        """
        fake = FakeSys(self)
        fake.add("eth0", "ethernet")
        fake.add("br0", "bridge", ports=("eth1",))
        fake.add("eth1.5", "vlan", vid=5)
        fake.add("bond0", "bonding")
        fake.add("tap0", "tap")
        fake.add("veth0", "veth")
        fake.add("eth2", "ethernet", flags="0x1002")
        fake.add("lo", "loopback", flags="0x9")
        found = fake.discover(False)
        self.assertEqual(sorted(found.serving), ["br0", "eth0", "eth1.5"])
        self.assertEqual(found.serving["eth1.5"].kind, "vlan")
        self.assertEqual(found.notes, [])

    def test_bridges_only(self) -> None:
        """
        With -dhcpServerOnBridgesOnly: bridges with an Ethernet port; a bridge whose
        ports are only taps, C{*-ll} or TUN/TAP devices is left out when there are
        others.
        """
        fake = FakeSys(self)
        fake.add("eth0", "ethernet")
        fake.add("br0", "bridge", ports=("eth0", "tap3"))
        fake.add("tap7", "tap")
        fake.add("br@vms", "bridge", ports=("tap1", "br@vms-ll", "tap7"))
        found = fake.discover(True)
        self.assertEqual(sorted(found.serving), ["br0"])
        self.assertEqual(found.notes, ["bridge br@vms has no Ethernet port: not served"])

    def test_only_bridge_used_in_hope(self) -> None:
        """
        A bridge with no Ethernet port that is the only bridge is served "in hope".
        """
        fake = FakeSys(self)
        fake.add("eth0", "ethernet")
        fake.add("br@vms", "bridge", ports=("tap1",))
        found = fake.discover(True)
        self.assertEqual(sorted(found.serving), ["br@vms"])
        self.assertIn("the only bridge", found.notes[0])

    def test_bridge_vlan_id(self) -> None:
        """
        The VLAN id of a bridge's uplink, 0 when untagged, -1 without one.
        """
        fake = FakeSys(self)
        fake.add("eth0.7", "vlan", vid=7)
        fake.add("br7", "bridge", ports=("tap1", "eth0.7"))
        fake.add("br0", "bridge", ports=("veth1",))
        fake.add("brx", "bridge")
        self.assertEqual(interfaces.bridge_vlan_id("br7", fake.net, fake.vlan), 7)
        self.assertEqual(interfaces.bridge_vlan_id("br0", fake.net, fake.vlan), 0)
        self.assertEqual(interfaces.bridge_vlan_id("brx", fake.net, fake.vlan), -1)

    def test_addresses(self) -> None:
        """
        Each interface carries its addresses; the host's addresses are every
        non-loopback one.
        """
        fake = FakeSys(self)
        br = fake.add("br0", "bridge", ports=("eth0",))
        eth = fake.add("eth0", "ethernet")
        lo = fake.add("lo", "loopback", flags="0x9")
        addresses = {
            br: [ipaddress.IPv4Interface("10.1.0.1/24")],
            eth: [ipaddress.IPv4Interface("10.2.0.5/16")],
            lo: [ipaddress.IPv4Interface("127.0.0.1/8")],
        }
        found = fake.discover(False, addresses)
        self.assertEqual(found.serving["br0"].addresses, (ipaddress.IPv4Interface("10.1.0.1/24"),))
        self.assertEqual(found.host.my_ips, frozenset({"10.1.0.1", "10.2.0.5"}))
        self.assertEqual(found.host.first_ip, "10.1.0.1")

    def test_netlink(self) -> None:
        """
        The netlink dump finds the loopback address (every namespace has it when lo is
        up) and parses prefixes.
        """
        found = interfaces.ipv4_addresses()
        lo = socket.if_nametoindex("lo")
        if lo in found:
            self.assertIn(ipaddress.IPv4Interface("127.0.0.1/8"), found[lo])
        for addresses in found.values():
            for address in addresses:
                self.assertIsInstance(address, ipaddress.IPv4Interface)
