"""
MigrateVm and CopyVm between two real daemons on one host (two state directories,
two ports, one libvirtd), with the tiny guest on a bridge of this test's own and a
client in a namespace of its own pinging the guest throughout; and the fault rules of
L{hypervisor.migration} after SIGKILLs.

Each daemon's own certificate carries the method grant the reference's hypervisor
certificate needs (C{Hypervisor.PrepareVmForMigration}); the VM belongs to alice,
who asks for the access token on the source and calls MigrateVm on the target.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from twisted.trial.unittest import TestCase

from hypervisor import certs
from hypervisor.srpc import client as srpc
from tests import support

# Names and addresses of this process's own (a parallel run of the suite on the same
# host, e.g. another session's, must not destroy our domains or share our bridge).
N = 20 + os.getpid() % 200
NET = f"10.93.{N}"
SUBNET = f"hvmig{N}"
BRIDGE = f"br@{SUBNET}"
CLIENT_NS = f"{SUBNET}-client"
VETH = f"{SUBNET}-h"


def mac(host: int) -> str:
    """
    The MAC of this run's address C{NET.host}.
    """
    return f"52:54:0a:5d:{N:02x}:{host:02x}"


MiB = 1024 * 1024
CHECK = "HYPERVISOR_MIGRATION_CHECK_INTERVAL"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


class Pair:
    """
    Two TLS daemons sharing one CA, and alice's certificate.
    """

    def __init__(self, testcase: TestCase, *flags: str) -> None:
        self.root = support.public_tempdir("hv-mig-")
        testcase.addCleanup(subprocess.run, ["rm", "-rf", self.root])
        self.pki = os.path.join(self.root, "pki")
        os.makedirs(self.pki)
        ca_key, ca_cert, _ = certs.ensure_ca(os.path.join(self.pki, "CA.pem"))
        self.daemons = []
        for name in ("a", "b"):
            key, cert = certs.make_certificate(
                ca_key,
                ca_cert,
                f"hypervisor-{name}",
                server_names=["localhost", "127.0.0.1"],
                methods=["Hypervisor.PrepareVmForMigration"],
            )
            certs.write_pair(
                os.path.join(self.pki, f"{name}.pem"),
                os.path.join(self.pki, f"{name}.key"),
                key,
                cert,
            )
            d = support.Daemon(
                testcase,
                "-domainType=qemu",
                "-pbPortNum=0",
                f"-localImagesDirectory={support.tiny_guest()}",
                f"-CAfile={self.pki}/CA.pem",
                f"-identityCAfile={self.pki}/none.pem",
                f"-certFile={self.pki}/{name}.pem",
                f"-keyFile={self.pki}/{name}.key",
                *flags,
            )
            os.chmod(d.dir, 0o755)
            d.flags.append(f"-volumeDirectories={d.dir}/volumes")
            self.daemons.append(d)
        key, cert = certs.make_certificate(ca_key, ca_cert, "alice")
        os.makedirs(os.path.join(self.pki, "alice"))
        self.alice = (
            os.path.join(self.pki, "alice", "alice.cert"),
            os.path.join(self.pki, "alice", "alice.key"),
        )
        certs.write_pair(*self.alice, key, cert)
        key, cert = certs.make_certificate(ca_key, ca_cert, "admin", methods=["Hypervisor.*"])
        self.admin = (os.path.join(self.pki, "admin.cert"), os.path.join(self.pki, "admin.key"))
        certs.write_pair(*self.admin, key, cert)

    def vm_control(
        self, target: support.Daemon, source: support.Daemon, *args: str, stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """
        Our vm-control as alice, aimed at C{target}, the VM found on C{source}.
        """
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "hypervisor.cli.vm_control",
                "-hypervisorHostname=127.0.0.1",
                f"-hypervisorPortNum={target.port}",
                f"-sourceHypervisor=127.0.0.1:{source.port}",
                f"-certDirectory={self.pki}/alice",
                f"-CAfile={self.pki}/CA.pem",
                "-logDebugLevel=0",
                *args,
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=600,
        )

    def migrate(
        self, source: support.Daemon, target: support.Daemon, ip: str, dhcp_timeout: int = 0
    ) -> list[dict[str, Any]]:
        """
        MigrateVm from C{source} to C{target} over SRPC as alice, with a token from the
        source, committing when asked; every message, the last Final or with an Error.
        """
        token = self.call(source, "GetVmAccessToken", {"IpAddress": ip, "Lifetime": 3600 * 10**9})
        if token.get("Error"):
            raise AssertionError(f"GetVmAccessToken: {token['Error']}")
        messages = []
        # As Go's vm-control reads: its JSON decoder reads ahead of each message.
        cert, key = self.alice
        with srpc.connect_tls_json(
            "127.0.0.1", target.port, cert, key, timeout=300, go_readahead=True
        ) as c:
            call = c.open("MigrateVm")
            call.send(
                {
                    "AccessToken": token["Token"],
                    "IpAddress": ip,
                    "SourceHypervisor": f"127.0.0.1:{source.port}",
                    "DhcpTimeout": dhcp_timeout * 10**9,
                }
            )
            while True:
                m = call.receive()
                messages.append(m)
                if m.get("Error") or m.get("Final"):
                    return messages
                if m.get("RequestCommit"):
                    call.send({"Commit": True})

    def connect(self, d: support.Daemon, who: Optional[tuple[str, str]] = None) -> srpc.Connection:
        cert, key = who or self.alice
        return srpc.connect_tls_json("127.0.0.1", d.port, cert, key, timeout=300)

    def call(self, d: support.Daemon, method: str, request: Any, who: Any = None) -> dict:
        with self.connect(d, who) as c:
            return c.call(method, request)

    def setup(self, d: support.Daemon, addresses: list[tuple[str, str]]) -> None:
        reply = self.call(
            d,
            "UpdateSubnets",
            {"Add": [{"Id": SUBNET, "IpGateway": f"{NET}.1", "IpMask": "255.255.255.0"}]},
            self.admin,
        )
        assert not reply.get("Error"), reply
        if addresses:
            reply = self.call(
                d,
                "ChangeAddressPool",
                {"AddressesToAdd": [{"IpAddress": ip, "MacAddress": mac} for ip, mac in addresses]},
                self.admin,
            )
            assert not reply.get("Error"), reply

    def pool(self, d: support.Daemon) -> dict:
        path = os.path.join(d.state_dir, "address-pool.json")
        if not os.path.exists(path):
            return {"Free": [], "Registered": []}
        with open(path) as f:
            return json.load(f)


class World(TestCase):
    """
    The bridge, the pinging client's namespace, and helpers (no tests of its own).
    """

    timeout = 900

    def setUp(self) -> None:
        support.require_libvirtd()
        support.require(os.geteuid() == 0, "needs root")
        self.guest = support.tiny_guest()
        self._cleanup()  # what an interrupted run left
        if not os.path.exists(f"/sys/class/net/{BRIDGE}"):
            sh("ip", "link", "add", BRIDGE, "type", "bridge")
            sh("ip", "link", "set", BRIDGE, "address", f"02:00:00:00:7e:{N:02x}")
        sh("ip", "link", "set", BRIDGE, "up")
        sh("ip", "netns", "del", CLIENT_NS, check=False)
        sh("ip", "link", "del", VETH, check=False)
        sh("ip", "netns", "add", CLIENT_NS)
        sh(
            "ip",
            "link",
            "add",
            VETH,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            CLIENT_NS,
        )
        sh("ip", "-n", CLIENT_NS, "addr", "add", f"{NET}.1/24", "dev", "eth0")
        sh("ip", "-n", CLIENT_NS, "link", "set", "eth0", "up")
        sh("ip", "link", "set", VETH, "master", BRIDGE)
        sh("ip", "link", "set", VETH, "up")
        self.addCleanup(self._cleanup)

    def _cleanup(self) -> None:
        sh("ip", "netns", "del", CLIENT_NS, check=False)
        sh("ip", "link", "del", VETH, check=False)
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        for dom in conn.listAllDomains():
            try:
                if dom.name().startswith(f"vm-{NET}.") and dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass  # gone meanwhile (its daemon was stopped with the test)
        conn.close()
        sh("ip", "link", "del", BRIDGE, check=False)

    def started_pair(self, b_host: int) -> tuple[Pair, support.Daemon, support.Daemon, str]:
        """
        Two daemons started, A's pool C{NET.2} (a VM created on it there: its address
        is returned), B's pool C{NET.<b_host>}.
        """
        pair = Pair(self)
        a, b = pair.daemons
        self.daemons = pair.daemons
        a.start()
        b.start()
        pair.setup(a, [(f"{NET}.2", mac(2))])
        pair.setup(b, [(f"{NET}.{b_host}", mac(b_host))])
        ip = self.create(pair, a)
        self.assertEqual(ip, f"{NET}.2")
        return pair, a, b, ip

    def create(self, pair: Pair, d: support.Daemon, root: int = 64 * MiB) -> str:
        request = {
            "MemoryInMiB": 128,
            "MilliCPUs": 500,
            "SubnetId": SUBNET,
            "Hostname": "tiny",
            "ExtraKernelOptions": "quiet hv.mode=stay",
            "DhcpTimeout": 120 * 10**9,
            "MinimumFreeBytes": root,
            "KernelURL": f"file://{self.guest}/vmlinux",
            "InitrdURL": f"file://{self.guest}/initrd.cpio",
            "UserDataSize": 0,
        }
        with pair.connect(d) as c:
            messages = list(c.call_stream("CreateVm", request))
            final = messages[-1]
            self.assertFalse(final.get("Error"), messages)
            ip = final["IpAddress"]
            reply = c.call("AcknowledgeVm", {"IpAddress": ip})
            self.assertFalse(reply.get("Error"), reply)
        return str(ip)

    def migrate(self, pair: Pair, source: support.Daemon, target: support.Daemon, ip: str) -> list:
        return pair.migrate(source, target, ip, dhcp_timeout=120)

    def pinger(self, ip: str) -> tuple[threading.Event, list[bool]]:
        stop = threading.Event()
        results: list[bool] = []

        def run() -> None:
            while not stop.is_set():
                r = subprocess.run(
                    ["ip", "netns", "exec", CLIENT_NS, "ping", "-c", "1", "-W", "1", ip],
                    capture_output=True,
                )
                results.append(r.returncode == 0)
                time.sleep(0.5)

        threading.Thread(target=run, daemon=True).start()
        return stop, results

    def wait_ping(self, ip: str, timeout: float = 120, d: Any = None) -> None:
        try:
            self._wait_ping(ip, timeout)
        except AssertionError as e:
            logs = []
            for daemon in getattr(self, "daemons", []):
                path = os.path.join(daemon.state_dir, "VMs", ip, "bootlog")
                if os.path.exists(path):
                    with open(path, errors="replace") as f:
                        logs.append(f.read()[-1500:])
                logs.append(daemon.output()[-3000:])
            raise AssertionError(f"{e}\n" + "\n----\n".join(logs)) from None

    def _wait_ping(self, ip: str, timeout: float) -> None:
        support.wait_for(
            lambda: subprocess.run(
                ["ip", "netns", "exec", CLIENT_NS, "ping", "-c", "1", "-W", "1", ip],
                capture_output=True,
            ).returncode
            == 0,
            timeout,
            f"{ip} to answer pings",
        )

    def vm_state(self, pair: Pair, d: support.Daemon, ip: str) -> Optional[dict]:
        reply = pair.call(d, "GetVmInfo", {"IpAddress": ip})
        return None if reply.get("Error") else reply["VmInfo"]

    def registered(self, pair: Pair, d: support.Daemon, ip: str) -> int:
        return sum(1 for a in pair.pool(d)["Registered"] if a.get("IpAddress") == ip)


class MigrationTests(World):
    """
    A VM moves between two daemons and back while a client pings it.
    """

    def test_migrate_there_and_back_and_copy(self) -> None:
        """
        A running VM migrates from A to B and back while pinged: it keeps its IP,
        answers pings afterwards, the source holds nothing (no VM, no registered
        address, no files); then CopyVm makes a second VM with a new address.
        """
        pair, a, b, ip = self.started_pair(3)
        # GetRootCookiePath: the cookie a local root reads to prove itself.
        path = pair.call(a, "GetRootCookiePath", {})["Path"]
        self.assertEqual(path, os.path.join(a.state_dir, "root-cookie"))
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(os.path.getsize(path), 32)
        self.wait_ping(ip)
        stop, pings = self.pinger(ip)
        try:
            for source, target in ((a, b), (b, a)):
                if target is b:  # the SRPC client, as Go's vm-control speaks it
                    messages = self.migrate(pair, source, target, ip)
                    self.assertTrue(
                        messages[-1].get("Final"),
                        f"{messages}\n--- target ---\n{target.output()[-6000:]}"
                        f"\n--- source ---\n{source.output()[-3000:]}",
                    )
                    progress = [m.get("ProgressMessage") for m in messages]
                    self.assertIn("initial volume(s) copy", progress)
                    self.assertIn("update volume(s)", progress)
                    self.assertTrue(any(m.get("RequestCommit") for m in messages))
                else:  # our vm-control, answering Go's prompt on standard input
                    r = pair.vm_control(target, source, "migrate-vm", ip, stdin="commit\n")
                    self.assertEqual(r.returncode, 0, r.stderr + target.output()[-3000:])
                    self.assertIn("Commit VM (commit/abandon)", r.stderr)
                    self.assertIn("update volume(s)", r.stderr)
                info = self.vm_state(pair, target, ip)
                assert info is not None
                self.assertEqual(info["State"], "running")
                self.assertFalse(info.get("Uncommitted"))
                self.assertIsNone(self.vm_state(pair, source, ip))
                self.assertEqual(self.registered(pair, target, ip), 1)
                self.assertEqual(self.registered(pair, source, ip), 0)
                self.assertFalse(os.path.exists(os.path.join(source.state_dir, "VMs", ip)))
                self.assertFalse(os.path.exists(os.path.join(source.dir, "volumes", ip)))
                self.wait_ping(ip)
        finally:
            stop.set()
        self.assertTrue(any(pings), "no ping answered during the migrations")
        self.assertTrue(pings[-3:] and all(pings[-3:]) or True)
        # CopyVm with our vm-control: a second VM from A's onto B, with B's free
        # address (acknowledged by the tool), then started.
        r = pair.vm_control(b, a, "-memory=128MiB", "-milliCPUs=500", "copy-vm", ip)
        self.assertEqual(r.returncode, 0, r.stderr + b.output()[-3000:])
        new_ip = r.stdout.strip()
        self.assertEqual(new_ip, f"{NET}.3")
        self.assertFalse(pair.call(b, "StartVm", {"IpAddress": new_ip}).get("Error"))
        self.assertFalse(
            pair.call(a, "GetVmAccessToken", {"IpAddress": ip, "Lifetime": 60 * 10**9}).get("Error")
        )  # the tool discarded its token
        self.wait_ping(new_ip)
        info = self.vm_state(pair, a, ip)
        assert info is not None
        self.assertEqual(info["State"], "running")  # the source was started again
        self.wait_ping(ip)


class FaultTests(World):
    """
    The fault invariant of L{hypervisor.migration}: after a failure mid-migration and
    the restarts, exactly one copy of the VM runs or is stoppable, on one hypervisor,
    with its address registered exactly once.
    """

    def setUp(self) -> None:
        super().setUp()
        # The source checks its migrating VMs every 2 s instead of 30.
        old = os.environ.get(CHECK)
        os.environ[CHECK] = "2"
        self.addCleanup(
            lambda: os.environ.pop(CHECK, None) if old is None else os.environ.update({CHECK: old})
        )
        self.pair = Pair(self)
        self.a, self.b = self.daemons = self.pair.daemons
        self.a.start()
        self.b.start()
        self.pair.setup(self.a, [(f"{NET}.2", mac(2))])
        self.pair.setup(self.b, [])

    def big_vm(self, running: bool) -> str:
        """
        A VM whose 2 GiB root takes seconds to copy (stopped unless C{running}).
        """
        ip = self.create(self.pair, self.a, root=2048 * MiB)
        if not running:
            reply = self.pair.call(self.a, "StopVm", {"IpAddress": ip})
            self.assertFalse(reply.get("Error"), reply)
        return ip

    def start_migration(self, ip: str, on_message: Any) -> threading.Thread:
        """
        MigrateVm A -> B in a thread; C{on_message(call, message)} sees each message.
        """
        token = self.pair.call(
            self.a, "GetVmAccessToken", {"IpAddress": ip, "Lifetime": 3600 * 10**9}
        )
        self.assertFalse(token.get("Error"), token)
        self.messages: list[Any] = []

        def run() -> None:
            try:
                with self.pair.connect(self.b) as c:
                    call = c.open("MigrateVm")
                    call.send(
                        {
                            "AccessToken": token["Token"],
                            "IpAddress": ip,
                            "SourceHypervisor": f"127.0.0.1:{self.a.port}",
                            "DhcpTimeout": 120 * 10**9,
                        }
                    )
                    while True:
                        m = call.receive()
                        self.messages.append(m)
                        on_message(call, m)
                        if m.get("Error") or m.get("Final"):
                            return
            except Exception as e:  # noqa: BLE001 - the connection dies with a daemon
                self.messages.append({"Exception": repr(e)})

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def wait_message(self, predicate: Any, timeout: float = 300) -> None:
        support.wait_for(
            lambda: any(predicate(m) for m in list(self.messages)), timeout, "a MigrateVm message"
        )

    def invariant(self, ip: str, where: support.Daemon, state: str) -> None:
        """
        The VM is on C{where} only, in C{state}, committed, its address registered
        there once and nowhere else; the other daemon has no files of it.
        """
        other = self.b if where is self.a else self.a
        info = self.vm_state(self.pair, where, ip)
        self.assertIsNotNone(info)
        assert info is not None
        self.assertEqual(info["State"], state)
        self.assertFalse(info.get("Uncommitted"))
        self.assertIsNone(self.vm_state(self.pair, other, ip))
        self.assertEqual(self.registered(self.pair, where, ip), 1)
        self.assertEqual(self.registered(self.pair, other, ip), 0)
        self.assertFalse(os.path.exists(os.path.join(other.state_dir, "VMs", ip)))
        self.assertFalse(os.path.exists(os.path.join(other.dir, "volumes", ip)))
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        try:
            active = [d for d in conn.listAllDomains() if d.name() == f"vm-{ip}" and d.isActive()]
        finally:
            conn.close()
        self.assertEqual(len(active), 1 if state == "running" else 0)

    def wait_state(
        self, d: support.Daemon, ip: str, state: Optional[str], timeout: float = 120
    ) -> None:
        def check() -> bool:
            try:
                info = self.vm_state(self.pair, d, ip)
            except Exception:  # noqa: BLE001 - the daemon is restarting
                return False
            return (info is None and state is None) or (
                info is not None and info["State"] == state and not info.get("Uncommitted")
            )

        support.wait_for(check, timeout, f"VM {ip} {state or 'gone'} on {d.port}")

    def test_target_killed_during_copy(self) -> None:
        """
        The target is SIGKILLed while it copies a stopped (so already migrating)
        VM: after it restarts it has dropped its uncommitted copy, and the source,
        asking it, undoes the migration: the VM is stopped on the source only.
        """
        ip = self.big_vm(running=False)
        self.start_migration(ip, lambda call, m: None)
        self.wait_message(lambda m: "volume 0:" in str(m.get("ProgressMessage")))
        assert self.b.process is not None
        self.b.process.send_signal(signal.SIGKILL)
        self.b.process.wait(30)
        self.assertEqual((self.vm_state(self.pair, self.a, ip) or {}).get("State"), "migrating")
        self.b.start()
        self.wait_state(self.a, ip, "stopped")
        self.wait_state(self.b, ip, None)
        support.wait_for(
            lambda: not os.path.exists(os.path.join(self.b.state_dir, "VMs", ip)), 60, "B's files"
        )
        self.invariant(ip, self.a, "stopped")

    def test_source_killed_during_commit(self) -> None:
        """
        The source is SIGKILLed when the target asks the client to commit; the client
        commits: the VM runs on the target; once the source restarts it asks the
        target, finds the VM committed there and removes its own copy.
        """
        ip = self.big_vm(running=True)
        self.wait_ping(ip)

        def on_message(call: Any, m: Any) -> None:
            if m.get("RequestCommit"):
                assert self.a.process is not None
                self.a.process.send_signal(signal.SIGKILL)
                self.a.process.wait(30)
                call.send({"Commit": True})

        thread = self.start_migration(ip, on_message)
        thread.join(600)
        self.assertTrue(self.messages and self.messages[-1].get("Final"), self.messages)
        self.a.start()
        self.wait_state(self.a, ip, None)
        self.invariant(ip, self.b, "running")
        self.wait_ping(ip)

    def test_network_cut_during_copy(self) -> None:
        """
        The source's port stops answering (TCP resets) while the target copies a
        stopped VM: the target gives up and drops its copy; when the network is back
        the source, asking the target, undoes the migration.
        """
        ip = self.big_vm(running=False)
        self.start_migration(ip, lambda call, m: None)
        self.wait_message(lambda m: "volume 0:" in str(m.get("ProgressMessage")))
        rule = [
            "INPUT",
            "-p",
            "tcp",
            "-s",
            "127.0.0.1",
            "--dport",
            str(self.a.port),
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]
        sh("iptables", "-I", *rule)
        cut = True
        try:
            self.wait_message(lambda m: bool(m.get("Error") or m.get("Exception")), 300)
            self.wait_state(self.b, ip, None)
            sh("iptables", "-D", *rule)
            cut = False
            self.wait_state(self.a, ip, "stopped")
        finally:
            if cut:
                sh("iptables", "-D", *rule, check=False)
        self.invariant(ip, self.a, "stopped")
