"""
Every command vm-control and hyper-control run, end to end against the real daemon
(real TLS, real certificates, real libvirtd), over SRPC (the default) and over the
HTTPS JSON transport, from one table; vm-control through a fleet manager; bad input.
Booting guests (start-vm, stop-vm, reboot-vm) is in L{tests.test_vm_control}.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from twisted.trial.unittest import SynchronousTestCase

from tests import support

Cli = Callable[..., Any]


class FakeFleetManager:
    """
    A fleet manager's SRPC side for C{FleetManager.GetHypervisorForVM} and
    C{ListHypervisorsInLocation} only (there is no Go fleet-manager binary on these
    machines): 404 to the gob endpoint, 200 and TLS on C{/_SRPC_/TLS/JSON}, then
    method lines and JSON as SRPC frames them.

    @ivar vms: IP -> "host:port" it answers; other IPs get an Error.
    @ivar hypervisors: the "host:port"s of ListHypervisorsInLocation.
    @ivar asked: the requests it was sent.
    """

    def __init__(self, cert: str, key: str, vms: dict[str, str], hypervisors: list[str]) -> None:
        self.vms = vms
        self.hypervisors = hypervisors
        self.asked: list[tuple[str, dict[str, Any]]] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                self.one(conn)
            except (OSError, ValueError):
                pass
            finally:
                conn.close()

    def one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        head = b""
        while not head.endswith(b"\n\n"):
            chunk = conn.recv(1)
            if not chunk:
                return
            head += chunk
        path = head.split()[1].decode()
        if not path.startswith("/_SRPC_/TLS/JSON"):
            conn.sendall(b"HTTP/1.0 404 Not Found\n\n")
            return
        conn.sendall(b"HTTP/1.0 200 Connected to Go SRPC\n\n")
        tls = self.context.wrap_socket(conn, server_side=True)
        reader = tls.makefile("rb")
        while True:
            method = reader.readline()
            if not method:
                return
            name = method.decode().strip()
            if name not in (
                "FleetManager.GetHypervisorForVM",
                "FleetManager.ListHypervisorsInLocation",
            ):
                tls.sendall(f"unknown method: {name}\n".encode())
                return
            tls.sendall(b"\n")
            request = json.loads(reader.readline())
            self.asked.append((name, request))
            if name == "FleetManager.ListHypervisorsInLocation":
                reply: dict[str, Any] = {"HypervisorAddresses": self.hypervisors, "Error": ""}
            elif request.get("IpAddress", "") in self.vms:
                reply = {"HypervisorAddress": self.vms[request["IpAddress"]], "Error": ""}
            else:
                reply = {"HypervisorAddress": "", "Error": "no hypervisor has this VM"}
            tls.sendall(b"\n" + json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


class ToolsEndToEndTests(SynchronousTestCase):
    """
    One table of commands, run over each transport against a real daemon.
    """

    def daemon(self) -> tuple[Any, Cli]:
        support.require_libvirtd()
        support.ensure_bridge()
        return support.tls_daemon(self, {"admin": "Hypervisor.*", "bob": ""}, "-domainType=qemu")

    def ok(self, cli: Cli, *args: str, **kwargs: str) -> str:
        r = cli(*args, **kwargs)
        self.assertEqual(r.returncode, 0, f"{args}: {r.stderr}")
        return str(r.stdout)

    def fails(self, cli: Cli, *args: str, words: str, code: int = 1, **kwargs: str) -> None:
        r = cli(*args, **kwargs)
        self.assertEqual(r.returncode, code, f"{args}: {r.stdout} {r.stderr}")
        self.assertIn(words, r.stderr, args)

    def every_command(self, transport: str) -> None:
        d, run = self.daemon()

        def cli(module: str, user: str, *args: str) -> Any:
            return run(module, user, f"-transport={transport}", *args)

        def hc(*args: str) -> Any:
            return cli("hyper_control", "admin", *args)

        def vc(*args: str, user: str = "admin") -> Any:
            return cli("vm_control", user, *args)

        self.ok(hc, "add-subnet", "hvtest", "10.77.0.1", "255.255.255.0", "10.77.0.1")
        subnets = self.ok(hc, "list-subnets")
        self.assertEqual(json.loads(subnets)["Id"], "hvtest")
        for i in (2, 3, 4, 5):
            self.ok(hc, "add-address", f"52:54:0a:4d:00:{i:02x}", f"10.77.0.{i}")
        self.ok(hc, "remove-ip-address", "10.77.0.5")
        self.ok(hc, "remove-mac-address", "52:54:0a:4d:00:04")
        self.ok(hc, "remove-excess-addresses", "5")
        capacity = json.loads(self.ok(hc, "get-capacity"))
        self.assertGreater(capacity["NumCPUs"], 0)
        update = json.loads(self.ok(hc, "-maxUpdates=1", "get-updates"))
        self.assertEqual(
            sorted(a["IpAddress"] for a in update["AddressPool"]), ["10.77.0.2", "10.77.0.3"]
        )
        self.assertEqual(update["NumFreeAddresses"], {"hvtest": 2})
        self.ok(
            hc, "-externalLeaseAddresses=52:54:0a:4d:00:63;10.77.0.99", "register-external-leases"
        )
        self.fails(
            lambda *a: cli("hyper_control", "bob", *a),
            "add-address",
            "52:54:0a:4d:00:09",
            words="error adding address: ",
        )
        if transport == "srpc":
            # Without its method powers (Go's -srpcClientDoNotUseMethodPowers) the
            # admin certificate grants nothing.
            self.fails(
                hc,
                "-srpcClientDoNotUseMethodPowers",
                "add-address",
                "52:54:0a:4d:00:09",
                words="error adding address: ",
            )
            self.interrupt_get_updates(d, pki=os.path.join(d.dir, "pki"))
        r = hc("-netbootTimeout=1s", "netboot-machine", "52:54:0a:4d:00:30", "10.77.0.30", "pxe30")
        self.assertEqual(r.returncode, 1, r.stderr)
        # The daemon served the temporary lease and waited for Go's default of 2 ACKs.
        self.assertIn("error netbooting machine: timed out receiving lease", r.stderr)
        self.assertIn("(0 of 2 ACKs sent)", r.stderr)
        self.fails(hc, "watch-dhcp", "nope0", words="error watching DHCP: interface 'nope0'")
        self.ok(hc, "disable-hypervisor")
        create = ["-memory=64MiB", "-minFreeBytes=1MiB", "-roundupPower=0", "-doNotStart"]
        self.fails(vc, *create, "create-vm", words="error creating VM: Hypervisor is disabled")
        self.ok(hc, "enable-hypervisor")
        self.assertEqual(self.ok(vc, "list-vms"), "")

        ip = self.ok(
            vc,
            *create,
            "-vmTags=Name=one,env=test",
            "-vmHostname=one",
            "-ownerGroups=g1",
            "create-vm",
        ).strip()
        self.assertEqual(ip, "10.77.0.2")
        self.assertEqual(self.ok(vc, "list-vms", user="bob").split(), [ip])
        self.assertEqual(self.ok(vc, "-state=stopped", "list-vms").split(), [ip])
        self.assertEqual(self.ok(vc, "-state=running", "list-vms").split(), [])
        self.assertEqual(self.ok(vc, "-vmTagsToMatch=env=test", "list-vms").split(), [ip])
        self.assertEqual(self.ok(vc, "-vmTagsToMatch=env=prod", "list-vms").split(), [])
        info = json.loads(self.ok(vc, "get-vm-info", ip))
        self.assertEqual(
            (info["State"], info["MilliCPUs"], info["MemoryInMiB"]), ("stopped", 250, 64)
        )
        self.assertEqual((info["Hostname"], info["OwnerGroups"]), ("one", ["g1"]))
        request = json.loads(self.ok(vc, "get-vm-create-request", ip))
        self.assertEqual(request["DhcpTimeout"], 60_000_000_000)
        self.assertEqual(len(self.ok(vc, "get-vm-infos").split('"IpAddress"')), 2)

        self.ok(vc, "-vmTags=env=prod,role=db", "change-vm-tags", ip)
        self.ok(vc, "-ownerUsers=admin,carol", "change-vm-owner-users", ip)
        self.ok(vc, "-ownerGroups=g2", "change-vm-owner-groups", ip)
        self.ok(vc, "-vmHostname=renamed", "change-vm-hostname", ip)
        self.ok(vc, "-milliCPUs=500", "change-vm-cpus", ip)
        self.ok(vc, "-vCPUs=2", "change-vm-vcpus", ip)
        self.ok(vc, "-memory=96MiB", "change-vm-memory", ip)
        self.ok(vc, "-destroyProtection", "change-vm-destroy-protection", ip)
        self.ok(vc, "become-primary-vm-owner", ip)
        info = json.loads(self.ok(vc, "get-vm-info", ip))
        self.assertEqual(info["Tags"], {"Name": "one", "env": "prod", "role": "db"})
        self.assertEqual(info["OwnerUsers"][:2], ["admin", "carol"])
        self.assertEqual(info["OwnerGroups"], ["g2"])
        self.assertEqual(info["Hostname"], "renamed")
        self.assertEqual(
            (info["MilliCPUs"], info["VirtualCPUs"], info["MemoryInMiB"]), (500, 2, 96)
        )
        self.assertTrue(info["DestroyProtection"])
        self.volume_image_and_user_data_commands(d, vc, ip)
        # The test daemons run no metadata server: the call is made and refused.
        self.fails(vc, "trace-vm-metadata", ip, words="error tracing VM metadata: ")
        self.fails(vc, "stop-vm", ip, user="bob", words="error stopping VM: ")
        self.fails(vc, "get-vm-info", "10.77.0.77", words="error getting VM info: no VM with IP")
        self.fails(vc, "destroy-vm", "10.77.0.77", words="error destroying VM: no VM with IP")
        self.ok(vc, "destroy-vm", ip)
        self.assertEqual(self.ok(vc, "list-vms"), "")
        # Commands whose method is not served, and bad input, change nothing.
        self.fails(vc, "patch-vm-image", ip, words="not available", code=2)
        # As Go's: migrate-vm finds the source through a fleet manager (or our
        # -sourceHypervisor); tests/test_migration_real.py runs it between two daemons.
        self.fails(vc, "migrate-vm", ip, words="no fleet manager specified", code=1)
        self.fails(vc, "-memory=lots", "create-vm", words="-memory", code=2)
        self.assertEqual(self.ok(vc, "list-vms"), "")

    def volume_image_and_user_data_commands(self, d: Any, vc: Cli, ip: str) -> None:
        """
        The volume, snapshot, image and user data commands on a stopped VM.
        """

        def volumes() -> list[dict[str, Any]]:
            return list(json.loads(self.ok(vc, "get-vm-info", ip))["Volumes"])

        mib = 1 << 20
        self.ok(vc, "-secondaryVolumeSizes=1MiB,2MiB", "add-vm-volumes", ip)
        self.assertEqual([v["Size"] for v in volumes()[1:]], [mib, 2 * mib])
        self.ok(vc, "-volumeIndices=0,2,1", "reorder-vm-volumes", ip)
        self.assertEqual([v["Size"] for v in volumes()[1:]], [2 * mib, mib])
        self.ok(vc, "-volumeIndex=2", "-volumeSize=3MiB", "change-vm-volume-size", ip)
        self.assertEqual(volumes()[2]["Size"], 3 * mib)
        self.ok(vc, "-volumeIndex=2", "delete-vm-volume", ip)
        self.assertEqual(len(volumes()), 2)
        self.ok(vc, "-snapshotRootOnly", "snapshot-vm", ip)
        self.assertIn("Snapshots", volumes()[0])
        self.ok(vc, "restore-vm-from-snapshot", ip)
        self.ok(vc, "snapshot-vm", ip)
        self.ok(vc, "discard-vm-snapshot", ip)
        self.assertNotIn("Snapshots", volumes()[0])

        vm_dir = os.path.join(d.state_dir, "VMs", ip)
        user_data = os.path.join(d.dir, "user-data")
        for text in (b"#cloud-config\nhostname: one\n", b"#cloud-config\nhostname: two\n"):
            with open(user_data, "wb") as out:
                out.write(text)
            self.ok(vc, f"-userDataFile={user_data}", "replace-vm-user-data", ip)
            with open(os.path.join(vm_dir, "user-data.raw"), "rb") as f:
                self.assertEqual(f.read(), text)
            self.ok(vc, f"-userDataFile={user_data}.got", "get-vm-user-data", ip)
            with open(f"{user_data}.got", "rb") as f:
                self.assertEqual(f.read(), text)
        self.ok(vc, "restore-vm-user-data", ip)
        with open(os.path.join(vm_dir, "user-data.raw"), "rb") as f:
            self.assertEqual(f.read(), b"#cloud-config\nhostname: one\n")
        self.ok(vc, "discard-vm-old-user-data", ip)
        self.fails(vc, "replace-vm-user-data", ip, words="no -userDataFile given")
        self.fails(vc, "get-vm-user-data", ip, words="no -userDataFile given")

        image = os.path.join(d.dir, "image.raw")
        with open(image, "wb") as out:
            out.write(b"\x01" * (2 * mib))
        self.ok(
            vc,
            f"-imageFile={image}",
            "-minFreeBytes=1MiB",
            "-roundupPower=0",
            "replace-vm-image",
            ip,
        )
        # The 2 MiB image and -minFreeBytes of free space after it.
        self.assertEqual(volumes()[0]["Size"], 3 * mib)
        self.ok(vc, "restore-vm-image", ip)
        self.assertEqual(volumes()[0]["Size"], mib)
        self.ok(
            vc,
            f"-imageFile={image}",
            "-minFreeBytes=1MiB",
            "-roundupPower=0",
            "replace-vm-image",
            ip,
        )
        self.ok(vc, "discard-vm-old-image", ip)
        self.fails(vc, "restore-vm-image", ip, words="error restoring VM image: ")
        self.fails(vc, "replace-vm-image", ip, words="no -imageName, -imageURL or -imageFile")

    def interrupt_get_updates(self, d: Any, pki: str) -> None:
        """
        get-updates (endless) prints the first Update, and ^C ends it at once even
        though a thread is blocked reading the connection.
        """
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hypervisor.cli.hyper_control",
                f"-hypervisorPortNum={d.port}",
                f"-certDirectory={pki}/admin",
                f"-CAfile={pki}/CA.pem",
                "get-updates",
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        assert process.stdout is not None
        first = process.stdout.readline()
        if first != b"{\n":
            process.kill()
            self.fail(f"get-updates printed {first!r}: {process.communicate()[1]!r}")
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        # Drain its output while waiting: a tool blocked writing to a full pipe (the
        # first Update is large) cannot handle the interrupt.
        process.communicate(timeout=20)
        self.assertLess(time.monotonic() - started, 10)

    def test_every_command_over_srpc(self) -> None:
        """
        The table over SRPC.
        """
        self.every_command("srpc")

    def test_every_command_over_https(self) -> None:
        """
        The table over the HTTPS JSON transport.
        """
        self.every_command("https")

    def test_through_a_fleet_manager(self) -> None:
        """
        With C{-fleetManagerHostname}, vm-control creates a VM on the first of the
        fleet manager's hypervisors in C{-location} that takes it (as Go's does), asks
        it which hypervisor holds a VM and calls that one; the fleet manager's error is
        shown; over HTTPS it says a fleet manager needs SRPC; listing through it says
        it is not implemented.
        """
        d, run = self.daemon()
        pki = os.path.join(d.dir, "pki")
        self.ok(
            lambda *a: run("hyper_control", "admin", *a),
            "add-subnet",
            "hvtest",
            "10.77.0.1",
            "255.255.255.0",
        )
        self.ok(
            lambda *a: run("hyper_control", "admin", *a),
            "add-address",
            "52:54:0a:4d:00:02",
            "10.77.0.2",
        )
        nowhere = support.free_port()
        fm = FakeFleetManager(
            f"{pki}/server.pem",
            f"{pki}/server.key",
            {"10.77.0.2": f"127.0.0.1:{d.port}"},
            [f"127.0.0.1:{nowhere}", f"127.0.0.1:{d.port}"],
        )
        self.addCleanup(fm.close)

        def via(*args: str) -> Any:
            # The hypervisor's host name is not given: the fleet manager decides
            # (-hypervisorPortNum, set by cli, points nowhere).
            return run(
                "vm_control",
                "admin",
                "-fleetManagerHostname=127.0.0.1",
                f"-fleetManagerPortNum={fm.port}",
                "-hypervisorPortNum=1",
                *args,
            )

        r = via("-memory=64MiB", "-minFreeBytes=1MiB", "-doNotStart", "-location=lab", "create-vm")
        self.assertEqual(r.returncode, 0, r.stderr)
        ip = r.stdout.strip()
        self.assertEqual(ip, "10.77.0.2")
        self.assertIn(f"error creating VM on 127.0.0.1:{nowhere}", r.stderr)
        self.assertEqual(fm.asked[0][0], "FleetManager.ListHypervisorsInLocation")
        self.assertEqual((fm.asked[0][1]["Location"], fm.asked[0][1]["SubnetId"]), ("lab", ""))
        del fm.asked[:]
        info = json.loads(self.ok(via, "get-vm-info", ip))
        self.assertEqual(info["State"], "stopped")
        self.assertEqual(fm.asked, [("FleetManager.GetHypervisorForVM", {"IpAddress": ip})])
        self.fails(via, "get-vm-info", "10.77.0.50", words="no hypervisor has this VM")
        self.fails(
            via,
            "-transport=https",
            "get-vm-info",
            ip,
            words="a fleet manager is reached over SRPC only",
        )
        self.fails(via, "list-vms", words="give -hypervisorHostname")
        self.ok(via, "destroy-vm", ip)
