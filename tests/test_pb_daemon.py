"""
C{hyper-control -transport pb} end to end against the real daemon (a subprocess
with real certificates made by C{hypervisor make-certs}, its PB service on a port
of its own): an operator brings an empty hypervisor to a useful state (a subnet and
addresses), sees it in C{get-updates} and on C{/listSubnets}; disable, C{CreateVm}
refused, enable; the admin surface (log levels, clients, disconnect, reconcile);
and certificate rotation: a new CA and server certificate put in place and
C{reload-certificates}, after which new connections (PB and HTTPS) use them while
the daemon keeps running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from hypervisor import certs
from hypervisor.client import CallFailed, HypervisorClient, connect
from tests import support

SUBNET = ("pbnet", "10.97.0.1", "255.255.255.0", "10.97.0.1")
ADDRESSES = [(f"52:54:0a:61:00:{i:02x}", f"10.97.0.{i}") for i in range(10, 14)]


class PbDaemonTests(TestCase):
    """
    The daemon's PB service, driven by hyper-control and hypervisor.client.
    """

    timeout = 300

    def setUp(self) -> None:
        support.require(os.geteuid() == 0, "the daemon test runs as root (state, libvirt)")
        support.require_libvirtd()
        self.pb_port = support.free_port()
        self.d, self.cli = support.tls_daemon(
            self,
            {"admin": "*.*", "fleet": "Hypervisor.*", "alice": ""},
            "-domainType=qemu",
            f"-pbPortNum={self.pb_port}",
        )
        self.pki = os.path.join(self.d.dir, "pki")

    def hyper(self, user: str, *args: str) -> subprocess.CompletedProcess[str]:
        """
        hyper-control over PB as C{user}.
        """
        return self.cli(
            "hyper_control",
            user,
            "-transport=pb",
            f"-pbEndpoint=tcp:127.0.0.1:{self.pb_port}",
            *args,
        )

    def ok(self, user: str, *args: str) -> str:
        result = self.hyper(user, *args)
        self.assertEqual(result.returncode, 0, f"{args}: {result.stderr}{result.stdout}")
        return result.stdout

    def user_pair(self, user: str) -> tuple[str, str]:
        directory = os.path.join(self.pki, user)
        names = sorted(os.listdir(directory))
        cert = next(n for n in names if n.endswith(".cert"))
        return os.path.join(directory, cert), os.path.join(directory, cert[:-5] + ".key")

    async def connect_as(self, user: str, ca: str = "") -> HypervisorClient:
        cert, key = self.user_pair(user)
        return await connect(
            reactor,
            f"tcp:127.0.0.1:{self.pb_port}",
            cert,
            key,
            ca_file=ca or os.path.join(self.pki, "CA.pem"),
        )

    async def test_operator_session(self) -> None:
        """
        An empty hypervisor made useful over PB: subnet and addresses added with
        hyper-control, visible in get-updates and /listSubnets; disable refuses
        CreateVm, enable allows it again; a fleet certificate (Hypervisor.*) may do
        the Go methods but not the admin surface.
        """
        self.ok("admin", "add-subnet", *SUBNET)
        for mac, ip in ADDRESSES:
            self.ok("admin", "add-address", mac, ip)
        updates = self.ok("admin", "-maxUpdates=1", "get-updates")
        self.assertIn('"Id": "pbnet"', updates)
        for mac, ip in ADDRESSES:
            self.assertIn(ip, updates)
        status, page = support.http_get(self.d.url + "/listSubnets")
        self.assertEqual(status, 200)
        self.assertIn("pbnet", page)
        self.assertIn("10.97.0.1", page)
        self.assertIn('"Id": "pbnet"', self.ok("alice", "list-subnets"))

        self.ok("admin", "disable-hypervisor")
        self.assertIn('"Disabled": true', self.ok("admin", "disabled-state"))
        alice = await self.connect_as("alice")
        try:
            request = {
                "MemoryInMiB": 16,
                "MilliCPUs": 10,
                "MinimumFreeBytes": 65536,
                "SubnetId": "pbnet",
            }
            with self.assertRaises(CallFailed) as caught:
                await alice.stream("CreateVm", request, lambda m: True)
            self.assertEqual(caught.exception.status, 503)
            self.assertIn("disabled", caught.exception.message)
            self.ok("admin", "enable-hypervisor")
            self.assertIn('"Disabled": false', self.ok("admin", "disabled-state"))
            # Enabled: CreateVm is admitted (it then fails for want of an image, not
            # because the hypervisor is disabled).
            try:
                await alice.stream("CreateVm", request, lambda m: True)
            except CallFailed as e:
                self.assertNotIn("disabled", e.message)
        finally:
            await alice.close()

        refused = self.hyper("fleet", "list-clients")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("HypervisorAdmin.ListClients needs an admin certificate", refused.stderr)
        self.assertIn("pbnet", self.ok("fleet", "list-subnets"))
        self.assertTrue(
            "admin ListClients refused for fleet" in self.d.output(),
            "the refusal is logged with the caller",
        )

    async def test_admin_surface(self) -> None:
        """
        log-level sets and shows levels; list-clients shows a GetUpdates subscriber
        (identity, transport, since, its stream); disconnect-client ends it;
        reconcile runs; every action is logged with the caller.
        """
        self.ok("admin", "log-level", "hypervisor.dhcp", "warn")
        self.assertEqual(self.ok("admin", "log-level", "hypervisor.dhcp.protocol").strip(), "warn")
        levels = json.loads(self.ok("admin", "log-level"))
        self.assertEqual(levels["hypervisor.dhcp"], "warn")
        bad = self.hyper("admin", "log-level", "hypervisor", "loud")
        self.assertEqual(bad.returncode, 1)
        self.assertIn("unknown log level 'loud'", bad.stderr)

        alice = await self.connect_as("alice")
        updates: list[dict[str, Any]] = []
        subscription = alice.subscribe_updates(updates.append)
        await support.until(lambda: updates, 30, "the first update")
        listing = json.loads(self.ok("admin", "list-clients"))
        clients = listing["Clients"]
        self.assertEqual(listing["UpdateSubscribers"], [{"Identity": "alice", "Queued": 0}])
        mine = [c for c in clients if c["Identity"] == "alice"]
        self.assertEqual(len(mine), 1, clients)
        self.assertEqual(mine[0]["Transport"], "pb")
        self.assertEqual([s["Method"] for s in mine[0]["Streams"]], ["GetUpdates"])
        self.assertGreater(mine[0]["Since"], 0)
        self.ok("admin", "disconnect-client", str(mine[0]["Id"]))
        with self.assertRaises(CallFailed):
            await subscription.done
        listing = json.loads(self.ok("admin", "list-clients"))
        self.assertEqual([c for c in listing["Clients"] if c["Identity"] == "alice"], [])
        self.assertEqual(listing["UpdateSubscribers"], [])
        missing = self.hyper("admin", "disconnect-client", "99999")
        self.assertEqual(missing.returncode, 1)
        self.assertIn("no connected client 99999", missing.stderr)

        self.assertIn('"VMs": 0', self.ok("admin", "reconcile"))
        text = self.d.output()
        for action in ("SetLogLevel", "ListClients", "DisconnectClient", "Reconcile"):
            self.assertTrue(f"admin {action} by admin" in text, f"{action} logged")

    async def test_certificate_rotation(self) -> None:
        """
        A new CA and a server certificate from it, put in place of the old files,
        then reload-certificates: new PB and HTTPS connections get the new server
        certificate and accept only certificates of the new CA, while the daemon
        (same process) keeps running; a bad file changes nothing.
        """
        pid = self.d.process.pid
        old_ca = os.path.join(self.pki, "CA.pem")
        saved_ca = os.path.join(self.d.dir, "old-CA.pem")
        shutil.copy(old_ca, saved_ca)
        alice_before = await self.connect_as("alice")  # stays open across the rotation

        # A broken key: nothing changes.
        shutil.copy(os.path.join(self.pki, "server.key"), os.path.join(self.d.dir, "key.bak"))
        with open(os.path.join(self.pki, "server.key"), "wb") as f:
            f.write(b"not a key\n")
        broken = self.hyper("admin", "reload-certificates")
        self.assertEqual(broken.returncode, 1)
        self.assertIn("cannot use the server certificate", broken.stderr)
        shutil.copy(os.path.join(self.d.dir, "key.bak"), os.path.join(self.pki, "server.key"))
        await (await self.connect_as("alice")).close()  # still the old CA

        # The new PKI, made in a scratch directory, then moved into place.
        ca_key, ca = certs.make_ca("rotated CA")
        key, server = certs.make_certificate(
            ca_key, ca, "localhost", server_names=["localhost", "127.0.0.1"]
        )
        admin_key, admin = certs.make_certificate(ca_key, ca, "admin2", methods=["*.*"])
        new_admin = os.path.join(self.pki, "admin2")
        os.makedirs(new_admin)
        certs.write_pair(
            os.path.join(new_admin, "admin2.cert"),
            os.path.join(new_admin, "admin2.key"),
            admin_key,
            admin,
        )
        new_ca = os.path.join(self.d.dir, "new-CA.pem")
        with open(new_ca, "wb") as f:
            f.write(certs.cert_pem(ca))
        # The admin asks for the reload with its (old CA) certificate: the files
        # change under the running daemon first.
        certs.write_pair(
            os.path.join(self.pki, "server.pem"), os.path.join(self.pki, "server.key"), key, server
        )
        shutil.copy(new_ca, old_ca)
        reloaded = self.cli(
            "hyper_control",
            "admin",
            "-transport=pb",
            f"-pbEndpoint=tcp:127.0.0.1:{self.pb_port}",
            f"-CAfile={saved_ca}",
            "reload-certificates",
        )
        self.assertEqual(reloaded.returncode, 0, reloaded.stderr)
        summary = json.loads(reloaded.stdout)
        self.assertEqual(summary["ServerSerial"], format(server.serial_number, "x"))
        self.assertEqual(summary["CAs"], ["CN=rotated CA"])

        # New connections: the old CA's certificates are refused (401), the new one
        # is accepted, and the server presents the new certificate (verified
        # against the new CA only).
        with self.assertRaises(CallFailed) as caught:
            await self.connect_as("alice", ca=new_ca)
        self.assertEqual(caught.exception.status, 401)
        with self.assertRaises(CallFailed):
            await self.connect_as("admin2", ca=saved_ca)  # old CA: the server is not trusted
        admin2 = await self.connect_as("admin2", ca=new_ca)
        self.assertEqual((await admin2.whoami())["Username"], "admin2")
        await admin2.close()
        # The connection made before the rotation keeps its identity.
        self.assertEqual((await alice_before.whoami())["Username"], "alice")
        await alice_before.close()

        # HTTPS on port 6976 too: the new server certificate (the old CA does not
        # verify it) and the new CA's client certificate accepted.
        def curl(ca: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "--cacert", ca]
                + ["--cert", os.path.join(new_admin, "admin2.cert")]
                + ["--key", os.path.join(new_admin, "admin2.key")]
                + ["-X", "POST", "--data", "{}"]
                + [f"https://127.0.0.1:{self.d.port}/rpc/Hypervisor.GetCapacity"],
                capture_output=True,
                text=True,
                timeout=60,
            )

        result = curl(new_ca)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('"NumCPUs"', result.stdout)
        self.assertEqual(curl(saved_ca).returncode, 60)  # peer certificate not verified
        self.assertEqual(self.d.process.pid, pid)
        self.assertIsNone(self.d.process.poll())
