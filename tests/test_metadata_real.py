"""
The metadata server for real, in a private network world (L{tests.netns}: C{unshare
-nm}): a bridge C{br0} holding the subnet's gateway 10.112.0.1, the daemon itself
(C{python -m hypervisor ... run}) inside the world on a state directory written
beforehand (subnet C{vms}, three stopped VMs, user data for one), and "VM"
namespaces attached to the bridge by veth pairs with the pool's MACs and IPs:

- C{curl http://169.254.169.254/...} from each VM namespace gets that VM's data, both
  when the guest routes 169.254.169.254 via its gateway (the bridge rule delivers it
  to the namespace) and when it is on-link (the namespace answers ARP);
- an unknown source gets 404; a namespace using a VM's IP with another MAC gets
  nothing (its frames are dropped on the bridge; replies would go to the VM's MAC);
- the hypervisor's own port answers at 169.254.169.254:<portNum>;
- cloud-init's own readers (Debian's C{cloud-init}, run by C{/usr/bin/python3} inside a
  VM namespace): the OpenStack C{MetadataReader} and the EC2 crawler return the VM's
  instance id, host name and user data;
- after the daemon stops, no namespace, veth or nftables table of ours remains; after
  a SIGKILL the leftovers are there, and a restart removes them and serves again.

Needs root, C{unshare}/C{nsenter}/C{ip}, C{nft} (nftables), curl and Debian's
C{cloud-init} (C{tools/setup.sh --test} installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Optional

from twisted.trial.unittest import TestCase

from hypervisor import codec
from hypervisor.model import Address, LocalVmInfo, State, Subnet, VmInfo
from tests import netns, support

GATEWAY = "10.112.0.1"
SUBNET = Subnet(
    Id="vms",
    IpGateway=GATEWAY,
    IpMask="255.255.255.0",
    DomainNameServers=["10.112.0.53"],
)
VMS = {
    "alpha": ("10.112.0.11", "52:54:0a:70:00:0b"),
    "beta": ("10.112.0.12", "52:54:0a:70:00:0c"),
    "gamma": ("10.112.0.13", "52:54:0a:70:00:0d"),
}
USER_DATA = b"#cloud-config\nruncmd:\n  - echo alpha-was-here\n"
MD = "http://169.254.169.254"

CLOUD_INIT_READERS = r"""
import json, sys
from cloudinit.sources.helpers import openstack
from cloudinit.sources.helpers import ec2
reader = openstack.MetadataReader("http://169.254.169.254")
results = reader.read_v2()
md = results["metadata"]
ud = results.get("userdata")
meta = ec2.get_instance_metadata("2009-04-04", "http://169.254.169.254")
user = ec2.get_instance_userdata("2009-04-04", "http://169.254.169.254")
print(json.dumps({
    "openstack_uuid": md.get("uuid") or md.get("instance-id"),
    "openstack_hostname": md.get("hostname") or md.get("local-hostname"),
    "openstack_userdata": (ud.decode() if isinstance(ud, bytes) else ud),
    "network_json": results.get("networkdata") is not None,
    "ec2_instance_id": meta.get("instance-id"),
    "ec2_hostname": meta.get("local-hostname"),
    "ec2_keys": sorted(meta.get("public-keys", {}) or {}),
    "ec2_userdata": (user.decode() if isinstance(user, bytes) else user),
}))
"""


def require_parts() -> None:
    """
    Skip (or fail in CI) unless the world, nft, curl and cloud-init are there.
    """
    netns.require_world()
    for tool, package in (("nft", "nftables"), ("curl", "curl")):
        support.require(
            shutil.which(tool) is not None, f"{tool} is not installed (Debian {package})"
        )


class WorldDaemon:
    """
    The daemon running inside a world, on a prepared state directory.
    """

    def __init__(self, world: netns.World, port: int = 6976) -> None:
        self.world = world
        self.dir = os.path.join(world.dir, "daemon")
        self.state = os.path.join(self.dir, "state")
        self.port = port
        self.flags = [
            f"-stateDir={self.state}",
            f"-logDir={self.dir}/log",
            f"-portNum={self.port}",
            "-libvirtUri=test:///default",
            "-domainType=qemu",
            f"-volumeDirectories={self.dir}/volumes",
            f"-CAfile={self.dir}/none.pem",
            f"-identityCAfile={self.dir}/none.pem",
        ]
        self.process: Optional[subprocess.Popen[bytes]] = None
        self.output_path = os.path.join(world.dir, "daemon.log")
        self.env = dict(os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=self.dir)
        os.makedirs(self.state)
        with open(os.path.join(self.state, "subnets.json"), "wb") as f:
            f.write(codec.encode([SUBNET], indent=4))
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
                Tags={"SshAuthorizedKeys": f"ssh-ed25519 AAAAkey{hostname} {hostname}@x"},
            )
            with open(os.path.join(directory, "info.json"), "wb") as f:
                f.write(codec.encode(LocalVmInfo(VmInfo=info), indent=4))
        with open(os.path.join(self.state, "VMs", VMS["alpha"][0], "user-data.raw"), "wb") as f:
            f.write(USER_DATA)

    def start(self) -> None:
        """
        Start the daemon in the world; wait until it serves br0's metadata.
        """
        self._output = open(self.output_path, "ab")
        mark = len(self.output())
        self.process = self.world.spawn(
            [sys.executable, "-m", "hypervisor", *self.flags, "run"],
            cwd=support.REPO,
            env=self.env,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        support.wait_for(
            lambda: self.exited() or "metadata: serving br0" in self.output()[mark:],
            60,
            "the daemon to serve br0's metadata",
        )
        assert not self.exited(), self.output()

    def exited(self) -> bool:
        """
        Whether the daemon process ended.
        """
        return self.process is not None and self.process.poll() is not None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """
        Stop the daemon (SIGTERM, or SIGKILL) and wait for it.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(60)
        self._output.close()

    def output(self) -> str:
        """
        What the daemon printed.
        """
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""


class MetadataWorldTests(TestCase):
    """
    The daemon's metadata server from VM namespaces on a bridge.
    """

    timeout = 300

    def setUp(self) -> None:
        require_parts()
        self.world = netns.World()
        self.addCleanup(self.world.close)
        self.world.bridge("br0", f"{GATEWAY}/24", mac="02:00:00:70:00:01")
        alpha_ip, alpha_mac = VMS["alpha"]
        beta_ip, beta_mac = VMS["beta"]
        # alpha routes 169.254.169.254 via its gateway (DHCP option 121's route)
        self.vm("alpha", alpha_mac, alpha_ip, via=GATEWAY)
        # beta has it on-link (ARP for 169.254.169.254)
        self.vm("beta", beta_mac, beta_ip, via="")
        # a machine that is no VM
        self.vm("rogue", "02:00:00:70:00:63", "10.112.0.99", via=GATEWAY)
        # a machine using alpha's IP with its own MAC
        self.vm("spoof", "02:00:00:70:00:64", alpha_ip, via=GATEWAY)
        self.daemon = WorldDaemon(self.world)
        self.addCleanup(self.daemon.stop, signal.SIGKILL)

    def vm(self, name: str, mac: str, ip: str, via: str) -> None:
        """
        A namespace on br0 with C{ip}/24 and a route to 169.254.169.254.
        """
        self.world.add_client(name, mac, "br0")
        self.world.client(name, "ip", "addr", "add", f"{ip}/24", "dev", "eth0", check=True)
        route = ["ip", "route", "add", "169.254.169.254/32"]
        route += ["via", via] if via else ["dev", "eth0"]
        self.world.client(name, *route, check=True)

    def curl(self, name: str, url: str, timeout: float = 5) -> tuple[int, str, str]:
        """
        C{curl} in namespace C{name}: (exit status, HTTP status, body).
        """
        result = self.world.client(
            name,
            "curl",
            "-sS",
            "--max-time",
            str(timeout),
            "-o",
            "/dev/stdout",
            "-w",
            "\n%{http_code}",
            url,
            timeout=timeout + 30,
        )
        body, _, code = result.stdout.rpartition("\n")
        return result.returncode, code, body

    def ours(self) -> dict[str, list[str]]:
        """
        Our namespaces, links and nftables tables in the world.
        """
        namespaces = self.world.run("ip", "netns", "list").split()
        links = self.world.run("ip", "-o", "link", "show").splitlines()
        tables = self.world.run("nft", "list", "tables").splitlines()
        return {
            "netns": [n for n in namespaces if n.startswith("hvmd-")],
            "links": [line.split(":")[1].strip().split("@")[0] for line in links if ": hm" in line],
            "tables": [t for t in tables if "hvmd_" in t],
        }

    def test_vms_get_their_own_data(self) -> None:
        """
        Each VM namespace gets its own host name, instance id and user data, by either
        route; unknown and spoofed sources get nothing useful.
        """
        self.daemon.start()
        status, code, body = self.curl("alpha", f"{MD}/latest/meta-data/hostname")
        self.assertEqual((status, code, body), (0, "200", "alpha"), self.daemon.output()[-3000:])
        self.assertEqual(self.curl("beta", f"{MD}/latest/meta-data/hostname")[1:], ("200", "beta"))
        self.assertEqual(
            self.curl("alpha", f"{MD}/latest/user-data")[1:], ("200", USER_DATA.decode())
        )
        self.assertEqual(self.curl("beta", f"{MD}/latest/user-data")[1], "404")
        alpha_id = self.curl("alpha", f"{MD}/openstack/latest/meta_data.json")[2]
        beta_id = self.curl("beta", f"{MD}/openstack/latest/meta_data.json")[2]
        self.assertNotEqual(json.loads(alpha_id)["uuid"], json.loads(beta_id)["uuid"])
        self.assertEqual(json.loads(alpha_id)["hostname"], "alpha")
        # no VM has 10.112.0.99: 404
        self.assertEqual(self.curl("rogue", f"{MD}/latest/meta-data/hostname")[1], "404")
        # alpha's IP with another MAC: dropped on the bridge, nothing comes back
        status, code, body = self.curl("spoof", f"{MD}/latest/user-data", timeout=3)
        self.assertNotEqual(status, 0)
        self.assertNotIn("alpha", body)
        self.assertEqual(code, "000")
        # the hypervisor's own port is there too
        status, code, _ = self.curl("alpha", f"{MD}:6976/healthz")
        self.assertIn(code, ("200", "503"))
        self.daemon.stop()
        self.assertEqual(self.ours(), {"netns": [], "links": [], "tables": []})
        self.assertEqual(self.world.run("ip", "-o", "link", "show", "br0").count("br0"), 1)

    def test_cloud_init_readers(self) -> None:
        """
        Debian's cloud-init reads our server with its OpenStack and EC2 readers.
        """
        support.require(
            os.path.exists("/usr/lib/python3/dist-packages/cloudinit"),
            "cloud-init is not installed (Debian cloud-init)",
        )
        self.daemon.start()
        result = self.world.client(
            "alpha", "/usr/bin/python3", "-c", CLOUD_INIT_READERS, timeout=120
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        got = json.loads(result.stdout.strip().splitlines()[-1])
        instance_id = self.curl("alpha", f"{MD}/latest/meta-data/instance-id")[2]
        self.assertEqual(got["openstack_uuid"], instance_id)
        self.assertEqual(got["ec2_instance_id"], instance_id)
        self.assertEqual(got["openstack_hostname"], "alpha")
        self.assertEqual(got["ec2_hostname"], "alpha")
        self.assertEqual(got["openstack_userdata"], USER_DATA.decode())
        self.assertEqual(got["ec2_userdata"], USER_DATA.decode())
        self.assertTrue(got["network_json"])
        self.assertEqual(got["ec2_keys"], ["key-0"])

    def test_kill_and_restart(self) -> None:
        """
        After a SIGKILL our namespace, veth and table remain; a restart removes them
        (says so) and serves again, with exactly one of each.
        """
        self.daemon.start()
        self.assertEqual(self.curl("beta", f"{MD}/latest/meta-data/hostname")[1:], ("200", "beta"))
        self.daemon.stop(signal.SIGKILL)
        left = self.ours()
        self.assertEqual((len(left["netns"]), len(left["links"]), len(left["tables"])), (1, 1, 1))
        self.daemon.start()
        self.assertIn("left by a daemon that did not stop cleanly", self.daemon.output())
        self.assertEqual(
            self.curl("alpha", f"{MD}/latest/meta-data/hostname")[1:], ("200", "alpha")
        )
        now = self.ours()
        self.assertEqual((len(now["netns"]), len(now["links"]), len(now["tables"])), (1, 1, 1))
        self.daemon.stop()
        self.assertEqual(self.ours(), {"netns": [], "links": [], "tables": []})
