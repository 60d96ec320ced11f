"""
The DHCP server must neither answer on the machine's own network from a test nor
take the daemon down with it:

- every daemon the tests and benches start in the host's namespace serves DHCP on
  bridges only (C{-dhcpServerOnBridgesOnly}): the default serves every up Ethernet
  interface, and those daemons run as root beside the machine's C{eth0}; a real one
  (L{support.Daemon}) is started and its log checked;
- the real daemon in a private network world keeps running when port 67 of a bridge
  is taken by another program (it serves the other bridges, reports the problem and
  takes the port once it is free) and when a served bridge vanishes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

from twisted.trial.unittest import TestCase

from bench import scale, torture
from tests import netns, support
from tests.test_dhcp_real import GATEWAY, WorldDaemon, require_clients

FLAG = "-dhcpServerOnBridgesOnly"

BLOCKER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, sys.argv[1].encode())
s.bind(("0.0.0.0", 67))
print("bound", flush=True)
time.sleep(1000)
"""


def served(output: str) -> list[str]:
    """
    The interfaces a daemon's log says it started serving.
    """
    return re.findall(r"DHCP: serving (\S+)", output)


class HostDaemonTests(TestCase):
    """
    Daemons of tests and benches in the host's namespace.
    """

    timeout = 120

    def test_flags(self) -> None:
        """
        The daemons of tests (L{support.Daemon}, which the TLS, netguard and VM
        daemons extend) and of the scale and torture benches pass the flag.
        """
        root = tempfile.mkdtemp(prefix="hv-dhcp-safety-")
        self.addCleanup(os.rmdir, root)
        self.assertIn(FLAG, support.Daemon(self, "-domainType=qemu").flags)
        self.assertIn(FLAG, scale.Daemon(root, False).flags)
        self.assertIn(FLAG, torture.Daemon(root, None).flags)

    def test_real_daemon_serves_no_ethernet(self) -> None:
        """
        A test daemon started by L{support.Daemon} on libvirt's test driver serves
        no interface but bridges: whatever this machine's interfaces (C{eth0} here),
        its log names only bridges as served.
        """
        support.require(os.geteuid() == 0, "needs root to bind port 67")
        daemon = support.Daemon(self, "-libvirtUri=test:///default", "-domainType=qemu")
        daemon.start()  # pages answer: the first sockets were opened before (as root)
        output = daemon.output()
        for name in served(output):
            self.assertTrue(
                os.path.isdir(f"/sys/class/net/{name}/bridge"),
                f"a test daemon serves DHCP on {name}, which is no bridge:\n{output}",
            )
        ethernet = [
            name
            for name in os.listdir("/sys/class/net")
            if os.path.exists(f"/sys/class/net/{name}/device")
        ]
        for name in ethernet:
            self.assertNotIn(f"DHCP: serving {name}\n", output)


class ResilienceTests(TestCase):
    """
    The real daemon in a private world: port 67 taken, a bridge removed.
    """

    timeout = 300

    def test_port_busy_then_free_and_bridge_removed(self) -> None:
        """
        With port 67 of C{br1} held by another program (a plain UDP socket bound to
        that device, no C{SO_REUSEADDR}), the daemon starts, serves C{br0} and says
        why C{br1} is not served; once the program exits, the next refresh serves
        C{br1}; removing C{br0} ends its socket; the daemon runs on throughout and a
        client on C{br0} is answered before.
        """
        require_clients()
        world = netns.World()
        self.addCleanup(world.close)
        world.bridge("br0", f"{GATEWAY}/24")
        world.bridge("br1", "10.45.0.1/24", mac="02:00:00:00:45:01")
        world.add_client("c-alpha", "52:54:0a:2c:00:0b", "br0")
        blocker = world.spawn(
            [sys.executable, "-c", BLOCKER, "br1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert blocker.stdout is not None
        self.assertEqual(blocker.stdout.readline().strip(), b"bound")
        daemon = WorldDaemon(world)
        self.addCleanup(daemon.stop)
        output_file = open(daemon.output_path, "ab")
        daemon._output = output_file
        daemon.process = world.spawn(
            [sys.executable, "-m", "hypervisor", *daemon.flags, "run"],
            cwd=support.REPO,
            env=daemon.env,
            stdout=output_file,
            stderr=subprocess.STDOUT,
        )
        support.wait_for(
            lambda: daemon.exited() or "cannot listen on port 67 of br1" in daemon.output(),
            60,
            "the daemon to report port 67 of br1 taken",
        )
        self.assertFalse(daemon.exited(), daemon.output())
        self.assertIn("br0", served(daemon.output()))
        self.assertNotIn("br1", served(daemon.output()))
        self.assertIn("Address already in use", daemon.output())

        hook = netns.hook(world, "udhcpc.sh", netns.UDHCPC_HOOK)
        world.client(
            "c-alpha", "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-s", hook
        )
        got = netns.read_record(os.path.join(world.dir, "udhcpc.bound"))
        assert got is not None, daemon.output()
        self.assertEqual(got["ip"], "10.44.0.11")

        blocker.kill()
        blocker.wait(10)
        support.wait_for(
            lambda: "br1" in served(daemon.output()), 40, "br1 served once port 67 is free"
        )
        world.run("ip", "link", "del", "br0")
        support.wait_for(
            lambda: "DHCP: no longer serving br0" in daemon.output(), 40, "br0's socket closed"
        )
        self.assertFalse(daemon.exited(), daemon.output())
        self.assertNotIn("Traceback", daemon.output())
