"""
The daemon's PB service over a Tor onion service, end to end on a private Tor network
(L{tests.tornet}: three authorities, two relays, two client tors, all Debian's C{tor}
on loopback inside a private network namespace, nothing reaching the real Tor
network).

Slow (about one to three minutes: the network's first consensus, then the onion
service's descriptor): run by C{.ci/run} with the rest of the suite.

The daemon runs inside the namespace with C{-pbOnion -torControl=unix:...} (the tor
an operator runs) and C{-pbPortNum=0}: PB is reachable over Tor only, no TCP port is
open for it. C{hyper-control -transport pb -pbEndpoint tor:<address>.onion:8787}
(through the other client tor's SOCKS port 9050, as with Debian's tor) adds a subnet
and sees it with an admin certificate; a certificate of another CA is refused over
Tor too; the status page shows the address as published; a restart publishes the
same address again, reachable again; nothing is left running afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from twisted.trial.unittest import TestCase

from tests import support, tornet

SUBNET = ("onionnet", "10.96.0.1", "255.255.255.0", "10.96.0.1")
OTHER_SOCKS = 9111


class WorldDaemon(support.Daemon):
    """
    L{support.Daemon} run inside a network namespace (its pages are reached with curl
    from inside the namespace too).
    """

    def __init__(self, testcase, world, *flags: str) -> None:  # type: ignore[no-untyped-def]
        super().__init__(testcase, *flags)
        self.world = world
        self.prefix = world.prefix()

    def page(self, path: str) -> str:
        """
        A status page, fetched inside the namespace.
        """
        return self.world.run("curl", "-sS", "--max-time", "5", self.url + path, check=False)

    def answers(self) -> bool:
        """
        Whether C{/healthz} answers, asked from inside the namespace.
        """
        code = self.world.run(
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            self.url + "/healthz",
            check=False,
        )
        return code in ("200", "503")

    def stop(self) -> None:
        """
        Stop the daemon as an operator does (SIGTERM) and wait for it.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


class OnionNetworkTests(TestCase):
    """
    hyper-control reaches the daemon's PB service through Tor.
    """

    timeout = 900
    slow = True

    def setUp(self) -> None:
        support.require(os.geteuid() == 0, "the daemon test runs as root (state, libvirt)")
        support.require_libvirtd()
        self.world, self.network = tornet.start_network(self)
        # The operator's tor (control socket, cookie) and a client tor with Debian's
        # default SOCKS port, 9050.
        self.hs = self.network.add_client("hs", socks=False)
        self.client_tor = self.network.add_client(
            "client", socks_port=9050, extra=f"SocksPort 127.0.0.1:{OTHER_SOCKS}\n"
        )
        # Should the test fail, the daemon's own tor (launched in the last part) is
        # stopped after the daemon is killed (it would exit by itself within seconds).
        self.addCleanup(self.kill_launched)
        self.d = WorldDaemon(
            self,
            self.world,
            "-domainType=qemu",
            "-pbPortNum=0",
            "-pbOnion",
            f"-torControl=unix:{self.hs.control_socket}",
        )
        os.chmod(self.d.dir, 0o755)
        self.pki = os.path.join(self.d.dir, "pki")
        self.d.flags += [
            f"-CAfile={self.pki}/CA.pem",
            f"-identityCAfile={self.pki}/none.pem",
            f"-certFile={self.pki}/server.pem",
            f"-keyFile={self.pki}/server.key",
            f"-volumeDirectories={self.d.dir}/volumes",
        ]
        # With -pbOnion, make-certs puts the onion address in the daemon's certificate
        # (clients verify it for the .onion name).
        made = self.d.command(
            "make-certs", "--user", "admin", "--methods", "*.*", "--out", f"{self.pki}/admin"
        )
        self.assertEqual(made.returncode, 0, made.stderr)
        address = self.d.command("onion-address")
        self.assertEqual(address.returncode, 0, address.stderr)
        self.address = address.stdout.strip()
        self.assertIn(self.address, made.stdout)
        # A certificate of another CA (an unknown client).
        other = os.path.join(self.d.dir, "other")
        stranger = subprocess.run(
            [
                sys.executable,
                "-m",
                "hypervisor",
                f"-CAfile={other}/CA.pem",
                f"-certFile={other}/server.pem",
                f"-keyFile={other}/server.key",
                f"-stateDir={other}/state",
                "make-certs",
                "--user",
                "stranger",
                "--methods",
                "*.*",
                "--out",
                f"{other}/stranger",
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=other),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(stranger.returncode, 0, stranger.stderr)
        self.other = other

    def kill_launched(self) -> None:
        for pid in tornet.tor_pids_using(os.path.join(self.d.state_dir, "tor")):
            os.kill(pid, signal.SIGKILL)

    def hyper(
        self, cert_directory: str, *args: str, endpoint: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """
        hyper-control over PB through Tor, inside the namespace (to C{endpoint}, by
        default C{tor:ADDRESS:8787}, which uses SOCKS port 9050).
        """
        return subprocess.run(
            self.world.prefix()
            + [
                sys.executable,
                "-m",
                "hypervisor.cli.hyper_control",
                f"-certDirectory={cert_directory}",
                f"-CAfile={self.pki}/CA.pem",
                "-transport=pb",
                f"-pbEndpoint={endpoint or f'tor:{self.address}:8787'}",
                *args,
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            capture_output=True,
            text=True,
            timeout=180,
        )

    def until_reachable(self, timeout: float = 180) -> str:
        """
        list-subnets as admin over Tor, tried until the service is reachable (its
        descriptor is published and fetched); return its output.
        """
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = self.hyper(f"{self.pki}/admin", "list-subnets")
            if last.returncode == 0:
                return last.stdout
            time.sleep(2)
        raise AssertionError(
            f"hyper-control never reached {self.address} over Tor: {last}\n"
            f"--- daemon ---\n{self.d.output()[-3000:]}\n{self.network.describe()}"
        )

    def test_pb_over_onion(self) -> None:
        """
        Published, reachable with an admin certificate (add a subnet, see it), refused
        to a certificate of another CA, the same address after a restart.
        """
        self.network.wait_bootstrapped(self.hs, 180)
        self.network.wait_bootstrapped(self.client_tor, 180)
        self.d.start()
        # No TCP port for PB: Tor is the only way in.
        listening = self.world.run("ss", "-ltnH")
        self.assertNotIn(":8787 ", listening)
        self.until_reachable()
        output = self.d.output()
        self.assertIn(f"onion service {self.address}: added to tor", output)
        support.wait_for(
            lambda: ">published</span>" in self.d.page("/"), 120, "the status page to say published"
        )
        self.assertIn(f"tor:{self.address}:8787", self.d.page("/"))

        added = self.hyper(f"{self.pki}/admin", "add-subnet", *SUBNET)
        self.assertEqual(added.returncode, 0, added.stderr + added.stdout)
        self.assertIn('"Id": "onionnet"', self.until_reachable())
        # A tor whose SOCKS port is not the default one: named in the endpoint string.
        explicit = self.hyper(
            f"{self.pki}/admin",
            "list-subnets",
            endpoint=f"tor:host={self.address}:port=8787:socksHostname=127.0.0.1"
            f":socksPort={OTHER_SOCKS}",
        )
        self.assertEqual(explicit.returncode, 0, explicit.stderr)
        self.assertIn('"Id": "onionnet"', explicit.stdout)

        # The admin surface sees this session as an onion one.
        clients = self.hyper(f"{self.pki}/admin", "list-clients")
        self.assertEqual(clients.returncode, 0, clients.stderr)
        sessions = json.loads(clients.stdout)["Clients"]
        self.assertIn(("admin", "pb-onion"), [(c["Identity"], c["Transport"]) for c in sessions])

        refused = self.hyper(f"{self.other}/stranger", "list-subnets")
        self.assertNotEqual(refused.returncode, 0, refused.stdout)
        self.assertIn("client certificate 'stranger' does not verify", refused.stderr)

        # Restart: the same key, the same address, reachable again.
        self.d.stop()
        self.d.start()
        self.assertIn('"Id": "onionnet"', self.until_reachable(240))
        self.assertIn(f"onion service {self.address}: added to tor", self.d.output())

        # The daemon's own tor (no -torControl), joined to the network by
        # -torConfigFile: the same key, the same address, reachable again.
        self.d.stop()
        config = self.world.file("daemon-torrc", self.network.client_config())
        self.d.flags = [f for f in self.d.flags if not f.startswith("-torControl=")]
        self.d.flags.append(f"-torConfigFile={config}")
        self.d.start()
        self.assertIn('"Id": "onionnet"', self.until_reachable(240))
        self.assertIn(f"onion service {self.address}: added to tor (launched)", self.d.output())
        launched = os.path.join(self.d.state_dir, "tor")
        self.assertEqual(len(tornet.tor_pids_using(launched)), 1)

        # Nothing left behind: the daemon's tor goes with it, and every tor of the
        # network stops.
        self.d.stop()
        support.wait_for(
            lambda: not tornet.tor_pids_using(launched), 30, "the launched tor to exit"
        )
        self.network.close()
        self.assertEqual(tornet.tor_pids_using(self.network.dir), [])
