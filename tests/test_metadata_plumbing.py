"""
The metadata plumbing's decisions in memory: names (within Linux's limits, tagged,
per daemon), the nftables script (our table only, replaced in one transaction, rules
scoped by the bridge's subnets and the VMs' MAC/IP pairs), and the service's plans
from the manager (subnets with DisableMetadata and subnets without a bridge are not
served; VM addresses become neighbour entries). The real commands run in
L{tests.test_metadata_real}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hypervisor.metadata.backend import MetadataBackend
from hypervisor.metadata.plumbing import BridgePlan, Plumbing
from hypervisor.metadata.service import MetadataService
from hypervisor.model import Subnet
from tests import support
from tests.test_manager_clock import ClockDaemon


class NamesTests(SynchronousTestCase):
    """
    Names of what the plumbing makes.
    """

    def test_names(self) -> None:
        """
        Interface names fit IFNAMSIZ; names carry the tag; MACs are locally
        administered unicast and differ per end and per bridge.
        """
        p = Plumbing("0123456789abcdef")
        self.assertEqual(p.tag, "012345")
        self.assertEqual(p.table, "hvmd_012345")
        self.assertEqual(p.netns_name("br@vms"), "hvmd-012345-br@vms")
        for bridge in ("br0", "br@a-very-long-subnet-name"):
            veth = p.veth_name(bridge)
            self.assertLessEqual(len(veth), 15)
            self.assertTrue(veth.startswith("hm012345"))
            for mac in (p.veth_mac(bridge), p.veth_mac(bridge, host_end=True)):
                first = int(mac.split(":")[0], 16)
                self.assertEqual(first & 0b11, 0b10, mac)  # local, unicast
                self.assertEqual(len(mac.split(":")), 6)
        self.assertNotEqual(p.veth_mac("br0"), p.veth_mac("br0", host_end=True))
        self.assertNotEqual(p.veth_mac("br0"), p.veth_mac("br1"))
        self.assertNotEqual(Plumbing("aaaaaa").veth_name("br0"), p.veth_name("br0"))
        self.assertRaises(ValueError, Plumbing, "")
        self.assertRaises(ValueError, Plumbing, "ab;rm")


class RulesTests(SynchronousTestCase):
    """
    The nftables script.
    """

    def setUp(self) -> None:
        self.p = Plumbing("abcdef")
        self.plans = [
            BridgePlan(
                "br0",
                ("10.0.0.0/24",),
                (("10.0.0.2", "52:54:0A:00:00:02"), ("10.0.0.3", "52:54:0a:00:00:03")),
            ),
            BridgePlan("br@x", ("10.1.0.0/24", "10.2.0.0/24"), ()),
        ]

    def test_script(self) -> None:
        """
        The script makes sure our table exists, deletes it and makes it again (one
        transaction); per bridge, a drop rule for spoofed sources and a rule that sends
        169.254.169.254 to that bridge's namespace; it names no other table.
        """
        script = self.p.rules(self.plans)
        lines = script.splitlines()
        self.assertEqual(lines[0], "table bridge hvmd_abcdef {}")
        self.assertEqual(lines[1], "delete table bridge hvmd_abcdef")
        self.assertEqual(
            sorted({w for line in lines for w in line.split() if w.startswith("hvmd_")}),
            ["hvmd_abcdef"],
        )
        self.assertIn("52:54:0a:00:00:02 . 10.0.0.2", script)
        self.assertIn(f"ether daddr set {self.p.veth_mac('br0')}", script)
        self.assertIn(f"ether daddr set {self.p.veth_mac('br@x')}", script)
        self.assertIn("10.1.0.0/24, 10.2.0.0/24", script)
        self.assertEqual(script.count(" drop "), 2)
        self.assertEqual(self.p.rules([]).splitlines()[-1], "delete table bridge hvmd_abcdef")

    def test_nft_accepts_it(self) -> None:
        """
        nft parses the script (checked with C{nft -c}, in a namespace of its own).
        """
        support.require(shutil.which("nft") is not None, "nft is not installed (nftables)")
        support.require(shutil.which("unshare") is not None, "unshare is not installed")
        support.require(os.geteuid() == 0, "needs root to make a network namespace")
        result = subprocess.run(
            ["unshare", "-n", "nft", "-c", "-f", "-"],
            input=self.p.rules(self.plans),
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)


class PlansTests(SynchronousTestCase):
    """
    The service's plans from the manager.
    """

    def setUp(self) -> None:
        self.daemon = ClockDaemon(self).start().network()
        self.manager = self.daemon.manager
        self.ip = self.daemon.create()
        backend = MetadataBackend(self.manager, self.daemon.clock, self.daemon.runner)
        self.service = MetadataService(
            backend,
            self.daemon.clock,
            runner=self.daemon.runner,
            tag=lambda: "abcdef",
            discover=lambda: {"br0": 0},
        )
        self.service.bridges = {"br0": 0}

    def test_vm_addresses_are_neighbours(self) -> None:
        """
        The subnet's bridge is planned with its network and the VM's MAC/IP; the
        backend learns which bridge carries the subnet.
        """
        mac = self.manager.get_vm_info(self.ip).Address.MacAddress
        self.assertEqual(
            self.service.plans(), [BridgePlan("br0", ("10.5.0.0/24",), ((self.ip, mac),))]
        )
        self.assertEqual(self.service.backend.bridge_of_subnet, {"net": "br0"})

    def test_disable_metadata_and_missing_bridges(self) -> None:
        """
        A subnet with DisableMetadata is not served; nor one without a bridge (noted);
        C{only} limits the bridges.
        """
        subnets = self.manager.subnets.subnets
        subnets["net"] = Subnet(
            Id="net", IpGateway="10.5.0.1", IpMask="255.255.255.0", DisableMetadata=True
        )
        self.assertEqual(self.service.plans(), [])
        subnets["net"] = Subnet(Id="net", IpGateway="10.5.0.1", IpMask="255.255.255.0")
        self.service.bridges = {}
        self.assertEqual(self.service.plans(), [])
        self.assertTrue(any("no bridge" in note for note in self.service.notes))
        self.service.bridges = {"br0": 0}
        self.service.only = {"br1"}
        self.assertEqual(self.service.plans(), [])

    def test_disabled_service_makes_nothing(self) -> None:
        """
        With -metadataServer=false the service starts and stops without plumbing.
        """
        self.service.enabled = False
        self.service.startService()
        self.assertIsNone(self.service.plumbing)
        self.service.stopService()


class HeldRunner:
    """
    A runner that holds each call until the test releases it.
    """

    def __init__(self) -> None:
        self.held: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        self.held.append((fn, args, d))
        return d

    def from_thread(self, fn: Any, *args: Any) -> None:
        fn(*args)

    def release(self) -> None:
        fn, args, d = self.held.pop(0)
        d.callback(fn(*args))


class StopTests(TestCase):
    """
    Stopping while a sync runs.
    """

    async def test_stop_waits_for_a_running_sync(self) -> None:
        """
        The removal at stop waits until a sync running on a thread is over (else that
        sync would make the table again after the removal).
        """
        daemon = ClockDaemon(self).start().network()
        daemon.create()
        commands: list[list[str]] = []

        def command(argv: list[str], stdin: Any = None) -> str:
            commands.append(argv)
            return ""

        runner = HeldRunner()
        backend = MetadataBackend(daemon.manager, daemon.clock, daemon.runner)
        service = MetadataService(
            backend,
            reactor,
            runner=runner,
            tag=lambda: "abcdef",
            discover=lambda: {"no-such-bridge-hv": 0},
        )
        service.plumbing = Plumbing("abcdef", command=command)
        service.bridges = {"no-such-bridge-hv": 0}
        service._started = True
        daemon.manager.subnets.subnets["net"] = Subnet(
            Id="net", IpGateway="10.5.0.1", IpMask="255.255.255.0", VlanId=0
        )
        service.sync(force=True)
        self.assertEqual(len(runner.held), 1)
        stopped = service.stopService()
        await deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(stopped.called)
        self.assertNotIn(["nft", "list", "tables", "bridge"], commands)
        runner.release()  # the sync's _apply, then its table script
        await stopped
        self.assertIn(["nft", "list", "tables", "bridge"], commands)
        last_write = max(i for i, c in enumerate(commands) if c[:2] == ["nft", "-f"])
        last_list = max(i for i, c in enumerate(commands) if c[:3] == ["nft", "list", "tables"])
        self.assertLess(last_write, last_list)
