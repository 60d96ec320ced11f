"""
End to end: the tiny test guest (L{tests.guest.build}) created by the manager on the
real libvirtd (TCG) on a bridge of its own, with C{DhcpTimeout}; the DHCP service made
by the daemon's own factory (C{tap.service._make_dhcp_service}) serves that bridge.
The guest's C{/init} runs udhcpc: its serial log (C{VMs/<IP>/bootlog}) shows the
lease from our server (address, mask, router and the VM's host name, which only our
server knows), and CreateVm answers C{DhcpTimedOut=false} because our ACK reached the
manager through the acknowledgement seam.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

import tap
from hypervisor import codec
from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT, Identity
from hypervisor.manager.acks import DhcpAcknowledgements
from hypervisor.manager.manager import Manager
from hypervisor.model import (
    AccessRequest,
    Address,
    ChangeAddressPoolRequest,
    CreateVmRequest,
    IpRequest,
    Subnet,
    UpdateSubnetsRequest,
    VmInfo,
)
from hypervisor.store import StateDirectory
from hypervisor.virt.connection import LibvirtService, start_event_loop
from tap.service import _make_dhcp_service
from tests import support
from tests.support import until

ALICE = Identity(username="alice")
BRIDGE = "br@hvdhcp"
BRIDGE_MAC = "02:00:00:00:7e:58"
MiB = 1024 * 1024


def ensure_bridge() -> None:
    """
    A bridge of this test's own (no host address), up.
    """
    if not os.path.exists(f"/sys/class/net/{BRIDGE}"):
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        subprocess.run(["ip", "link", "set", BRIDGE, "address", BRIDGE_MAC], check=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)


class GuestLeaseTests(TestCase):
    """
    A real guest takes its lease from our DHCP server.
    """

    timeout = 300

    def setUp(self) -> None:
        support.require_libvirtd()
        self.guest = support.tiny_guest()
        ensure_bridge()
        start_event_loop()
        self.root = support.public_tempdir("hv-dhcp-guest-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.services: list[Any] = []
        self.addCleanup(self.stop_services)

    async def stop_services(self) -> None:
        for service in reversed(self.services):
            if service.running:
                await service.stopService()
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        for dom in conn.listAllDomains():
            if dom.name().startswith("vm-10.78.0.") and dom.isActive():  # ours only
                dom.destroy()
        conn.close()

    def bootlog(self, ip: str) -> str:
        try:
            with open(
                os.path.join(self.root, "state", "VMs", ip, "bootlog"), errors="replace"
            ) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def test_guest_lease(self) -> None:
        """
        CreateVm with DhcpTimeout boots the guest; udhcpc in the guest gets the VM's
        address, mask, router and host name from us; CreateVm says
        DhcpTimedOut=false; the DHCP page's data shows the ACKed static lease.
        """
        state = os.path.join(self.root, "state")
        libvirt = LibvirtService(support.QEMU_URI, reactor, max_backoff=1.0)
        acks = DhcpAcknowledgements(reactor)
        manager = Manager(
            StateDirectory(state),
            libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[os.path.join(self.root, "volumes")],
            images_directory=self.guest,
            stop_timeout=20,
            acks=acks,
        )
        options = tap.Options(flags_directory=tempfile.mkdtemp(dir=self.root))
        options.parseOptions([f"-stateDir={state}"])
        dhcp = _make_dhcp_service(options, manager, acks, reactor)
        dhcp.only = {BRIDGE}  # this test's bridge only: the host's other interfaces are not ours
        manager.privilegedStartService()
        dhcp.privilegedStartService()
        libvirt.startService()
        manager.startService()
        dhcp.startService()
        self.services = [libvirt, manager, dhcp]
        self.assertEqual(sorted(dhcp.ports), [BRIDGE], dhcp.problems)
        api = HypervisorApi(manager, dhcp)
        await until(lambda: libvirt.connected, 30, "libvirt")
        # The first reconciliation must be over: one that listed the domains before
        # CreateVm and finished after it races the creation's own start (seen on a
        # loaded host: "domain 'vm-10.78.0.2' already exists"; the manager's race is
        # noted in issue 11's report, and test_metadata_guest waits the same way).
        await until(
            lambda: manager.domains_current and manager.reconciler.reconciling is None,
            60,
            "the first reconciliation",
        )
        await api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[
                    Subnet(
                        Id="hvdhcp",
                        IpGateway="10.78.0.1",
                        IpMask="255.255.255.0",
                        DomainNameServers=["10.78.0.53"],
                    )
                ]
            ),
        )
        await api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(AddressesToAdd=[Address("10.78.0.2", "52:54:0a:4e:00:02")]),
        )
        response = await api.CreateVm(
            ALICE,
            CreateVmRequest(
                VmInfo=VmInfo(
                    MemoryInMiB=128,
                    MilliCPUs=500,
                    SubnetId="hvdhcp",
                    Hostname="tiny",
                    ExtraKernelOptions="quiet hv.mode=poweroff",
                ),
                DhcpTimeout=codec.Duration(120),
                MinimumFreeBytes=MiB,
                KernelURL=f"file://{self.guest}/vmlinux",
                InitrdURL=f"file://{self.guest}/initrd.cpio",
            ),
        )
        ip = response.IpAddress
        self.assertEqual(ip, "10.78.0.2")
        self.assertFalse(response.DhcpTimedOut, self.bootlog(ip)[-2000:])
        await api.AcknowledgeVm(ALICE, IpRequest(ip))
        # the whole line (the serial console may deliver it in pieces)
        await until(
            lambda: re.search(r"tiny-guest: dhcp [^\n]*\n", self.bootlog(ip)) is not None,
            60,
            f"the guest's DHCP (bootlog: {self.bootlog(ip)[-800:]!r})",
        )
        log = self.bootlog(ip)
        self.assertIn("tiny-guest: lease 10.78.0.2/24 router=10.78.0.1 hostname=tiny", log)
        self.assertIn("tiny-guest: dhcp ok 10.78.0.2/24", log)
        status = dhcp.status()
        self.assertEqual([s["ip"] for s in status["static"]], ["10.78.0.2"])
        await api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(dhcp.status()["static"], [])
