"""
The private Tor network harness (L{tests.tornet}) leaves nothing behind: closing it
stops every tor, and if the test process died without closing it, every tor exits by
itself (C{__OwningControllerProcess}).
"""

from __future__ import annotations

import os
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests import netns, support, tornet


class HarnessTests(SynchronousTestCase):
    """
    Tear-down of the private Tor network.
    """

    def test_close_stops_every_tor(self) -> None:
        """
        After L{tornet.TorNetwork.close} no tor of the network runs, and the cached
        keys give every authority its certificate.
        """
        tornet.require_tor()
        world = netns.World()
        self.addCleanup(world.close)
        network = tornet.TorNetwork(world)
        self.addCleanup(network.close)
        network.start()
        network.add_client("c")
        self.assertEqual(len(network.pids()), tornet.AUTHORITIES + tornet.RELAYS + 1)
        support.wait_for(
            lambda: all(
                "Opening Control listener" in n.log() or "Bootstrapped" in n.log()
                for n in network.nodes
            ),
            60,
            "every tor to start",
        )
        self.assertEqual(network.dir_authorities.count("DirAuthority"), tornet.AUTHORITIES)
        network.close()
        self.assertEqual(network.pids(), [])
        self.assertEqual(tornet.tor_pids_using(network.dir), [])

    def test_owner_gone_tor_exits(self) -> None:
        """
        When the owning process ends without any clean-up, the network's tors exit by
        themselves (tor checks its owner every few seconds).
        """
        tornet.require_tor()
        owner = subprocess.Popen(["sleep", "1000"])
        self.addCleanup(lambda: owner.poll() is None and owner.kill())
        world = netns.World()
        self.addCleanup(world.close)
        network = tornet.TorNetwork(world, owner=owner.pid)
        self.addCleanup(network.close)
        network.start()
        support.wait_for(
            lambda: len(tornet.tor_pids_using(network.dir)) == tornet.AUTHORITIES + tornet.RELAYS,
            30,
            "the tors to run",
        )
        owner.kill()
        owner.wait()
        support.wait_for(
            lambda: not tornet.tor_pids_using(network.dir), 60, "the tors to exit by themselves"
        )
