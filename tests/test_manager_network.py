"""
Tests for L{hypervisor.manager.network}: bridges and subnet helpers.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.errors import InvalidRequest
from hypervisor.manager import network
from hypervisor.model import Subnet


class BridgeTests(SynchronousTestCase):
    """
    Bridge discovery from sysfs and the subnet -> bridge rule.
    """

    def test_discover(self) -> None:
        """
        Bridges are directories with a bridge/ entry; an uplink VLAN device gives
        the bridge its VLAN id.
        """
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root)
        for name, ports in (
            ("br0", ["eth0"]),
            ("br1", ["eth0.20", "tap1"]),
            ("br@x", []),
            ("eth0", None),
        ):
            os.makedirs(os.path.join(root, name))
            if ports is not None:
                os.makedirs(os.path.join(root, name, "bridge"))
                os.makedirs(os.path.join(root, name, "brif"))
                for port in ports:
                    os.makedirs(os.path.join(root, name, "brif", port))
        vlan = os.path.join(root, "vlan-config")
        with open(vlan, "w") as f:
            f.write(
                "VLAN Dev name | VLAN ID\nName-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\n"
                "eth0.20        | 20  | eth0\n"
            )
        self.assertEqual(network.discover_bridges(root, vlan), {"br0": 0, "br1": 20, "br@x": 0})

    def test_bridge_for_subnet(self) -> None:
        """
        br@<Id> first, then the bridge on the subnet's VLAN; otherwise a clear error.
        """
        bridges = {"br0": 0, "br1": 20, "br@special": 0}
        self.assertEqual(network.bridge_for_subnet(Subnet(Id="special"), bridges), "br@special")
        self.assertEqual(network.bridge_for_subnet(Subnet(Id="a", VlanId=20), bridges), "br1")
        self.assertEqual(network.bridge_for_subnet(Subnet(Id="b"), bridges), "br0")
        e = self.assertRaises(
            InvalidRequest, network.bridge_for_subnet, Subnet(Id="c", VlanId=30), bridges
        )
        self.assertIn("br@c", str(e))

    def test_macs(self) -> None:
        """
        MACs are normalised; garbage is refused.
        """
        self.assertEqual(network.normalize_mac("52-54-0A-00-00-01"), "52:54:0a:00:00:01")
        self.assertRaises(InvalidRequest, network.normalize_mac, "52:54:0a")
