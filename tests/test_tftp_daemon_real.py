"""
The daemon's named service C{tftp} in a PXE boot, end to end, in a private network
world (L{tests.netns}; the daemon as in L{tests.test_dhcp_real}, with
C{-tftpbootDirectory}):

1. C{NetbootMachine} (admin, HTTPS, by curl) gives 10.44.0.20 a lease and files;
2. a PXE-style C{udhcpc} in namespace C{c-pxe} gets that address, C{siaddr} (the
   bridge's address) and the boot file name;
3. C{tftp} (tftp-hpa) in C{c-pxe} fetches that boot file from C{siaddr}, port 69 (the
   boot directory), and its NetbootMachine file;
4. another machine (10.44.0.11) gets the boot file but not 10.44.0.20's file;
5. the status page shows the TFTP section and C{/metrics} counts the transfers.

Needs root, namespaces, busybox, curl and tftp-hpa (C{tools/setup.sh --test}).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess

from twisted.trial.unittest import TestCase

from tests import netns, support
from tests.test_dhcp_real import GATEWAY, NETBOOT, VMS, WorldDaemon, require_clients

BOOT_FILE = os.urandom(300_000)


class PxeTests(TestCase):
    """
    A netbooted machine fetches its files from the daemon's TFTP server.
    """

    timeout = 300

    def setUp(self) -> None:
        require_clients()
        support.require(shutil.which("tftp") is not None, "tftp is not installed (Debian tftp-hpa)")
        self.world = netns.World()
        self.addCleanup(self.world.close)
        self.world.bridge("br0", f"{GATEWAY}/24")
        self.world.bridge("br1", "10.45.0.1/24", mac="02:00:00:00:45:01")
        self.world.add_client("c-pxe", NETBOOT[1], "br0")
        self.world.add_client("c-other", VMS["alpha"][1], "br0")
        self.hook = netns.hook(self.world, "udhcpc.sh", netns.UDHCPC_HOOK)
        self.boot = os.path.join(self.world.dir, "tftpboot")
        os.makedirs(self.boot)
        with open(os.path.join(self.boot, "pxelinux.0"), "wb") as f:
            f.write(BOOT_FILE)
        self.daemon = WorldDaemon(self.world)
        self.daemon.flags.append(f"-tftpbootDirectory={self.boot}")
        self.addCleanup(self.daemon.stop)
        self.daemon.start()
        support.wait_for(
            lambda: "TFTP: serving UDP port 69" in self.daemon.output(), 30, "the TFTP server"
        )

    def tftp(self, client: str, name: str) -> tuple[str, bytes]:
        """
        tftp-hpa in namespace C{client} fetches C{name} from the gateway; its output
        and what it wrote.
        """
        out = os.path.join(self.world.dir, f"{client}-{name.replace('/', '_')}")
        result = self.world.client(
            client, "tftp", GATEWAY, "-m", "binary", "-c", "get", name, out, timeout=120
        )
        data = b""
        if os.path.exists(out):
            with open(out, "rb") as f:
                data = f.read()
        return result.stdout + result.stderr, data

    def test_pxe_boot(self) -> None:
        """
        The netbooted machine gets its lease, then its boot file and its own file by
        TFTP; another machine gets the boot file only; page and metrics show it.
        """
        ip, mac = NETBOOT
        body = {
            "Address": {"IpAddress": ip, "MacAddress": mac},
            "Hostname": "installer",
            "Files": {"/tftpboot/imagename": base64.b64encode(b"debian-12-installer").decode()},
            "NumAcknowledgementsToWaitFor": 1,
            "WaitTimeout": 60 * 10**9,
        }
        # --no-alpn: since the SRPC commit d365515 the daemon answers a TLS client hello
        # that offers ALPN (curl's default) with an internal-error alert; not TFTP's concern.
        command = self.daemon.curl("NetbootMachine", body)
        call = self.world.spawn(
            command[:1] + ["--no-alpn"] + command[1:],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            support.wait_for(
                lambda: "NetbootMachine: " + mac in self.daemon.output() or call.poll() is not None,
                30,
                "the netboot lease",
            )
        finally:
            if call.poll() is not None:
                assert call.stdout is not None
                self.fail(f"NetbootMachine ended: {call.stdout.read()!r} {self.daemon.output()}")
        lease = self.world.client(
            "c-pxe",
            "busybox",
            "udhcpc",
            "-i",
            "eth0",
            "-n",
            "-q",
            "-f",
            "-t",
            "3",
            "-T",
            "1",
            "-s",
            self.hook,
            "-V",
            "PXEClient:Arch:00000:UNDI:002001",
            "-x",
            "0x5d:0000",
            "-O",
            "bootfile",
            timeout=60,
        )
        record = netns.read_record(os.path.join(self.world.dir, "udhcpc.bound"))
        assert record is not None, lease.stdout + lease.stderr + self.daemon.output()
        self.assertEqual(record["ip"], ip)
        out, _ = call.communicate(timeout=60)
        self.assertEqual(json.loads(out), {"Error": ""})

        output, data = self.tftp("c-pxe", record["boot_file"])
        self.assertEqual(data, BOOT_FILE, output)
        self.assertEqual(record["siaddr"], GATEWAY)
        output, data = self.tftp("c-pxe", "imagename")
        self.assertEqual(data, b"debian-12-installer", output)

        self.world.client(
            "c-other", "ip", "addr", "add", f"{VMS['alpha'][0]}/24", "dev", "eth0", check=True
        )
        output, data = self.tftp("c-other", "/tftpboot/pxelinux.0")
        self.assertEqual(data, BOOT_FILE, output)
        output, _ = self.tftp("c-other", "imagename")
        self.assertIn("Error code 1", output)
        output, _ = self.tftp("c-other", "../daemon/pki/CA.pem")
        self.assertIn("Error code 2", output)

        page = self.world.run("curl", "-sS", f"http://127.0.0.1:{self.daemon.port}/")
        self.assertIn("<h2>TFTP</h2>", page)
        self.assertIn("Serving UDP port 69", page)
        self.assertIn("3 transfers completed", page)
        metrics = self.world.run("curl", "-sS", f"http://127.0.0.1:{self.daemon.port}/metrics")
        self.assertIn('hypervisor_tftp_transfers_total{outcome="completed"} 3.0', metrics)
        self.assertIn('hypervisor_tftp_refused_total{code="1"} 1.0', metrics)
        self.assertIn('hypervisor_tftp_transfer_seconds_count{file="/pxelinux.0"} 2.0', metrics)
