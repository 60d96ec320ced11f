"""
The DHCP server against real Debian clients, in a private network world
(L{tests.netns}: C{unshare -nm}, a bridge C{br0} holding the subnet's gateway
10.44.0.1, one namespace and veth pair per client).

The daemon itself (C{python -m hypervisor ... run}) runs inside the world, on a state
directory written beforehand (subnet "vms" with a dynamic range, four stopped VMs
with host names), talking to libvirt's test driver. The clients:

- busybox C{udhcpc}, ISC C{dhclient} and C{dhcpcd} each get exactly the configured
  address, mask, router, DNS servers, domain and host name of their VM (and the
  metadata route, option 121, when they ask for it);
- a PXE-style C{udhcpc} (vendor class C{PXEClient:Arch:00000:UNDI:002001}, option 93)
  registered with C{NetbootMachine} (over HTTPS with a client certificate, by curl)
  gets the boot file C{pxelinux.0} and C{siaddr}, and the call returns after its ACK;
- a MAC nobody assigned times out; WatchDhcp streams its DISCOVER;
- C{udhcpc} renews (SIGUSR1) and is ACKed;
- a dynamic lease (a machine that is no VM) and the VM leases survive a restart of
  the daemon: C{dhclient} reboots into the same address (INIT-REBOOT, ACKed).

Needs root, C{unshare}/C{nsenter}/C{ip}, busybox, isc-dhcp-client, dhcpcd-base and
curl (C{tools/setup.sh --test} installs them); skipped with the reason otherwise (in
CI they must be there).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from twisted.trial.unittest import TestCase

from hypervisor import codec
from hypervisor.dhcp import codec as dhcp_codec
from hypervisor.model import Address, LocalVmInfo, State, Subnet, VmInfo
from tests import netns, support

GATEWAY = "10.44.0.1"
SUBNET = Subnet(
    Id="vms",
    IpGateway=GATEWAY,
    IpMask="255.255.255.0",
    DomainName="vms.example",
    DomainNameServers=["10.44.0.53", "10.44.0.54"],
    FirstDynamicIP="10.44.0.100",
    LastDynamicIP="10.44.0.110",
)
VMS = {
    "alpha": ("10.44.0.11", "52:54:0a:2c:00:0b"),
    "beta": ("10.44.0.12", "52:54:0a:2c:00:0c"),
    "gamma": ("10.44.0.13", "52:54:0a:2c:00:0d"),
    "delta": ("10.44.0.14", "52:54:0a:2c:00:0e"),
}
STATIC = Subnet(Id="static", IpGateway="10.45.0.1", IpMask="255.255.255.0")
NETBOOT = ("10.44.0.20", "52:54:0a:2c:00:14")
LAPTOP = "02:00:00:2c:00:64"  # not a VM: a dynamic lease
STRANGER = "02:00:00:2c:00:99"  # nobody's, on br1 (subnet "static": no dynamic range)

UDHCPC = ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-T", "1"]


def require_clients() -> None:
    """
    Skip (or fail in CI) unless the real clients are installed.
    """
    netns.require_world()
    for tool, package in (
        ("busybox", "busybox"),
        ("dhclient", "isc-dhcp-client"),
        ("dhcpcd", "dhcpcd-base"),
        ("curl", "curl"),
    ):
        support.require(
            shutil.which(tool) is not None, f"{tool} is not installed (Debian {package})"
        )


class WorldDaemon:
    """
    The daemon running inside a world, on a prepared state directory.
    """

    def __init__(self, world: netns.World) -> None:
        self.world = world
        self.dir = os.path.join(world.dir, "daemon")
        self.state = os.path.join(self.dir, "state")
        self.pki = os.path.join(self.dir, "pki")
        self.port = 6976
        self.flags = [
            f"-stateDir={self.state}",
            f"-logDir={self.dir}/log",
            f"-portNum={self.port}",
            "-libvirtUri=test:///default",
            "-domainType=qemu",
            f"-volumeDirectories={self.dir}/volumes",
            f"-CAfile={self.pki}/CA.pem",
            f"-identityCAfile={self.pki}/none.pem",
            f"-certFile={self.pki}/server.pem",
            f"-keyFile={self.pki}/server.key",
        ]
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.output_path = os.path.join(world.dir, "daemon.log")
        self.env = dict(os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=self.dir)
        os.makedirs(self.state)
        self.write_state()
        result = subprocess.run(
            [sys.executable, "-m", "hypervisor", *self.flags, "make-certs"]
            + ["--user", "admin", "--methods", "Hypervisor.*", "--out", f"{self.pki}/admin"],
            cwd=support.REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr

    def write_state(self) -> None:
        """
        C{subnets.json} and one C{VMs/<IP>/info.json} per VM (stopped).
        """
        with open(os.path.join(self.state, "subnets.json"), "wb") as f:
            f.write(codec.encode([SUBNET, STATIC], indent=4))
        for hostname, (ip, mac) in VMS.items():
            directory = os.path.join(self.state, "VMs", ip)
            os.makedirs(directory)
            info = VmInfo(
                Address=Address(ip, mac),
                Hostname=hostname,
                SubnetId="vms",
                State=State.STOPPED,
                MemoryInMiB=64,
                MilliCPUs=100,
                OwnerUsers=["test"],
            )
            with open(os.path.join(directory, "info.json"), "wb") as f:
                f.write(codec.encode(LocalVmInfo(VmInfo=info), indent=4))

    def start(self) -> None:
        """
        Start the daemon in the world; wait until it serves br0 and br1.
        """
        self._output = open(self.output_path, "ab")
        self.process = self.world.spawn(
            [sys.executable, "-m", "hypervisor", *self.flags, "run"],
            cwd=support.REPO,
            env=self.env,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        support.wait_for(
            lambda: self.exited()
            or ("DHCP: serving br0" in self.output() and "DHCP: serving br1" in self.output()),
            60,
            "the daemon to serve br0 and br1",
        )
        assert not self.exited(), self.output()

    def exited(self) -> bool:
        """
        Whether the daemon process ended.
        """
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        """
        Stop the daemon (SIGTERM) and wait for it.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)
        self._output.close()

    def output(self) -> str:
        """
        What the daemon printed.
        """
        with open(self.output_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def curl(self, method: str, body: dict[str, Any]) -> list[str]:
        """
        The curl command calling C{Hypervisor.<method>} as admin inside the world.
        """
        return [
            "curl",
            "-sS",
            "--max-time",
            "60",
            "--cacert",
            f"{self.pki}/CA.pem",
            "--cert",
            f"{self.pki}/admin/admin.cert",
            "--key",
            f"{self.pki}/admin/admin.key",
            "--data-binary",
            json.dumps(body),
            f"https://127.0.0.1:{self.port}/rpc/Hypervisor.{method}",
        ]

    def dynamic_leases(self) -> list[dict[str, Any]]:
        """
        C{dynamic-leases.json} as stored ([] if absent).
        """
        try:
            with open(os.path.join(self.state, "dynamic-leases.json")) as f:
                data: list[dict[str, Any]] = json.load(f)
                return data
        except FileNotFoundError:
            return []


class RealClientTests(TestCase):
    """
    Real DHCP clients against the daemon.
    """

    timeout = 300

    def setUp(self) -> None:
        require_clients()
        self.world = netns.World()
        self.addCleanup(self.world.close)
        self.world.bridge("br0", f"{GATEWAY}/24")
        self.world.bridge("br1", "10.45.0.1/24", mac="02:00:00:00:45:01")
        clients = {
            "c-alpha": VMS["alpha"][1],
            "c-beta": VMS["beta"][1],
            "c-gamma": VMS["gamma"][1],
            "c-delta": VMS["delta"][1],
            "c-pxe": NETBOOT[1],
            "c-laptop": LAPTOP,
        }
        for name, mac in clients.items():
            self.world.add_client(name, mac, "br0")
        self.world.add_client("c-stranger", STRANGER, "br1")
        self.udhcpc_hook = netns.hook(self.world, "udhcpc.sh", netns.UDHCPC_HOOK)
        self.dhclient_hook = netns.hook(self.world, "dhclient.sh", netns.DHCLIENT_HOOK)
        self.dhcpcd_hook = netns.hook(self.world, "dhcpcd.sh", netns.DHCPCD_HOOK)
        self.daemon = WorldDaemon(self.world)
        self.addCleanup(self.daemon.stop)
        self.daemon.start()

    def record(self, name: str) -> Optional[dict[str, str]]:
        return netns.read_record(os.path.join(self.world.dir, name))

    def forget(self, name: str) -> None:
        path = os.path.join(self.world.dir, name)
        if os.path.exists(path):
            os.unlink(path)

    def udhcpc(self, client: str, *extra: str) -> Optional[dict[str, str]]:
        """
        Run udhcpc once (-q); what its hook was given on "bound", or None.
        """
        self.forget("udhcpc.bound")
        self.world.client(client, *UDHCPC, "-s", self.udhcpc_hook, *extra)
        return self.record("udhcpc.bound")

    def dhclient(self, client: str, lease_file: str, reason: str) -> Optional[dict[str, str]]:
        """
        Run dhclient until its hook sees C{reason}; what it was given.
        """
        self.forget(f"dhclient.{reason}")
        argv = ["dhclient", "-1", "-d", "-lf", lease_file, "-pf", lease_file + ".pid"]
        argv += ["-sf", self.dhclient_hook, "eth0"]
        self.world.client_until(client, argv, os.path.join(self.world.dir, f"dhclient.{reason}"))
        return self.record(f"dhclient.{reason}")

    def test_clients_get_their_leases(self) -> None:
        """
        udhcpc, dhclient and dhcpcd each get their VM's address, mask, router, DNS
        servers, domain and host name; dhclient and dhcpcd (which ask for option
        121) the metadata route and the default route.
        """
        got = self.udhcpc("c-alpha")
        assert got is not None, self.daemon.output()
        self.assertEqual(got["ip"], VMS["alpha"][0])
        self.assertEqual(got["subnet"], "255.255.255.0")
        self.assertEqual(got["mask"], "24")
        self.assertEqual(got["router"], GATEWAY)
        self.assertEqual(got["dns"], "10.44.0.53 10.44.0.54")
        self.assertEqual(got["domain"], "vms.example")
        self.assertEqual(got["hostname"], "alpha")
        self.assertEqual(got["serverid"], GATEWAY)
        self.assertEqual(got["broadcast"], "10.44.0.255")
        self.assertEqual(got["lease"], str(48 * 3600))
        self.assertEqual(got["boot_file"], "")

        lease_file = os.path.join(self.world.dir, "beta.leases")
        got = self.dhclient("c-beta", lease_file, "BOUND")
        assert got is not None, self.daemon.output()
        self.assertEqual(got["new_ip_address"], VMS["beta"][0])
        self.assertEqual(got["new_subnet_mask"], "255.255.255.0")
        self.assertEqual(got["new_routers"], GATEWAY)
        self.assertEqual(got["new_domain_name_servers"], "10.44.0.53 10.44.0.54")
        self.assertEqual(got["new_domain_name"], "vms.example")
        self.assertEqual(got["new_host_name"], "beta")
        self.assertEqual(got["new_dhcp_server_identifier"], GATEWAY)
        self.assertEqual(
            got["new_rfc3442_classless_static_routes"],
            "32 169 254 169 254 10 44 0 1 0 10 44 0 1",
        )

        self.forget("dhcpcd.BOUND")
        script = (
            "mount -t tmpfs none /var/lib/dhcpcd && mount -t tmpfs none /run && "
            f"exec dhcpcd -1 -4 -B --noarp --noipv4ll -c {self.dhcpcd_hook} -t 20 eth0"
        )
        self.world.client_until(
            "c-gamma", ["sh", "-c", script], os.path.join(self.world.dir, "dhcpcd.BOUND")
        )
        got = self.record("dhcpcd.BOUND")
        assert got is not None, self.daemon.output()
        self.assertEqual(got["new_ip_address"], VMS["gamma"][0])
        self.assertEqual(got["new_subnet_mask"], "255.255.255.0")
        self.assertEqual(got["new_routers"], GATEWAY)
        self.assertEqual(got["new_domain_name_servers"], "10.44.0.53 10.44.0.54")
        self.assertEqual(got["new_domain_name"], "vms.example")
        self.assertEqual(got["new_host_name"], "gamma")
        self.assertEqual(
            got["new_classless_static_routes"], f"169.254.169.254/32 {GATEWAY} 0.0.0.0/0 {GATEWAY}"
        )

    def test_pxe_netboot(self) -> None:
        """
        NetbootMachine (admin, over HTTPS) for a MAC: a PXE-style udhcpc gets the
        address, C{siaddr} and the boot file for architecture 0, and the call
        returns after that ACK.
        """
        ip, mac = NETBOOT
        body = {
            "Address": {"IpAddress": ip, "MacAddress": mac},
            "Hostname": "installer",
            "NumAcknowledgementsToWaitFor": 1,
            "WaitTimeout": 60 * 10**9,
        }
        call = self.world.spawn(
            self.daemon.curl("NetbootMachine", body),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        support.wait_for(
            lambda: "NetbootMachine: " + mac in self.daemon.output(), 30, "the netboot lease"
        )
        got = self.udhcpc(
            "c-pxe",
            "-V",
            "PXEClient:Arch:00000:UNDI:002001",
            "-x",
            "0x5d:0000",
            "-O",
            "bootfile",
            "-O",
            "tftp",
        )
        assert got is not None, self.daemon.output()
        self.assertEqual(got["ip"], ip)
        self.assertEqual(got["siaddr"], GATEWAY)
        self.assertEqual(got["boot_file"], "pxelinux.0")
        out, _ = call.communicate(timeout=60)
        self.assertEqual(json.loads(out), {"Error": ""})

    def test_watch_dhcp(self) -> None:
        """
        WatchDhcp (admin, over HTTPS) streams the packets a client sends, with the
        interface they came on, and ends after MaxPackets.
        """
        call = self.world.spawn(
            self.daemon.curl("WatchDhcp", {"Interface": "br1", "MaxPackets": 1}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        time.sleep(1)  # the stream is open before the client's first DISCOVER (of 3)
        self.world.client("c-stranger", *UDHCPC, "-s", self.udhcpc_hook)
        out, _ = call.communicate(timeout=60)
        lines = out.splitlines()
        self.assertEqual(len(lines), 1, out)
        message = json.loads(lines[0])
        self.assertEqual(message["Interface"], "br1")
        self.assertEqual(message["Error"], "")
        packet = dhcp_codec.decode(base64.b64decode(message["Packet"]))
        self.assertEqual(packet.mac, STRANGER)
        self.assertEqual(packet.message_type, dhcp_codec.MessageType.DISCOVER)

    def test_unknown_mac_times_out(self) -> None:
        """
        A MAC nobody assigned, on a subnet without a dynamic range, gets no answer:
        udhcpc gives up.
        """
        started = time.monotonic()
        result = self.world.client("c-stranger", *UDHCPC, "-s", self.udhcpc_hook)
        self.assertNotEqual(result.returncode, 0)
        self.assertIsNone(self.record("udhcpc.bound"))
        self.assertGreater(time.monotonic() - started, 2)

    def test_renewal(self) -> None:
        """
        udhcpc renews its lease (SIGUSR1): a unicast REQUEST from its address, ACKed.
        """
        self.forget("udhcpc.bound")
        self.forget("udhcpc.renew")
        argv = ["busybox", "udhcpc", "-i", "eth0", "-f", "-t", "3", "-T", "1"]
        process = self.world.spawn_client(
            "c-delta",
            argv + ["-s", self.udhcpc_hook],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        support.wait_for(lambda: self.record("udhcpc.bound"), 30, "udhcpc bound")
        process.send_signal(signal.SIGUSR1)
        renewed = support.wait_for(lambda: self.record("udhcpc.renew"), 30, "udhcpc renew")
        self.assertEqual(renewed["ip"], VMS["delta"][0])
        self.assertEqual(renewed["hostname"], "delta")
        process.terminate()
        process.wait(10)

    def test_leases_survive_restart(self) -> None:
        """
        A dynamic lease is written to dynamic-leases.json; after a restart of the
        daemon dhclient reboots into the same address (INIT-REBOOT, ACKed) and the VMs'
        leases are served as before.
        """
        lease_file = os.path.join(self.world.dir, "laptop.leases")
        got = self.dhclient("c-laptop", lease_file, "BOUND")
        assert got is not None, self.daemon.output()
        address = got["new_ip_address"]
        self.assertEqual(address, "10.44.0.100")
        self.assertEqual(got["new_dhcp_lease_time"], str(2 * 3600))
        self.assertEqual(got["new_host_name"] if "new_host_name" in got else "", "")
        stored = self.daemon.dynamic_leases()
        self.assertEqual([(e["IpAddress"], e["MacAddress"]) for e in stored], [(address, LAPTOP)])
        self.daemon.stop()
        self.daemon.start()
        got = self.dhclient("c-laptop", lease_file, "REBOOT")
        assert got is not None, self.daemon.output()
        self.assertEqual(got["new_ip_address"], address)
        got = self.udhcpc("c-alpha")
        assert got is not None, self.daemon.output()
        self.assertEqual(got["ip"], VMS["alpha"][0])
