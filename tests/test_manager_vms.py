"""
Tests for the VM manager and the service layer (L{hypervisor.api.HypervisorApi})
against libvirt's C{test:///default} driver: every method, state transitions, pool
and subnet rules, filters, capacity refusals, bad requests changing nothing, and
reconciliation across a daemon restart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

import libvirt
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from hypervisor import codec, errors
from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT, Identity
from hypervisor.manager.manager import Manager
from hypervisor.model import (
    AccessRequest,
    Address,
    ChangeAddressPoolRequest,
    ChangeVmSizeRequest,
    CreateVmRequest,
    IpRequest,
    ListVMsRequest,
    RebootVmRequest,
    SetDisabledStateRequest,
    StartVmRequest,
    State,
    Subnet,
    UpdateSubnetsRequest,
    VmFilter,
    VmInfo,
    Volume,
    VolumeFormat,
)
from hypervisor.store import StateDirectory
from hypervisor.testing import FakeHost
from hypervisor.virt.connection import LibvirtService, start_event_loop
from tests.support import until

MiB = 1024 * 1024
ALICE = Identity(username="alice", groups=frozenset({"team"}))
BOB = Identity(username="bob", groups=frozenset({"other"}))
CAROL = Identity(username="carol", groups=frozenset({"team"}))
TEST_URI = "test:///default"


def destroy_test_domains() -> None:
    conn = libvirt.open(TEST_URI)
    for dom in conn.listAllDomains():
        if dom.name().startswith("vm-") and dom.isActive():
            dom.destroy()
    conn.close()


class Daemon:
    """
    A manager + libvirt service on test:///default with a state directory, a volume
    directory and an images directory, as one daemon would have.
    """

    def __init__(self, testcase: TestCase, root: str, host: FakeHost, **extra: Any) -> None:
        self.root = root
        self.host = host
        self.libvirt = LibvirtService(TEST_URI, reactor)
        self.manager = Manager(
            StateDirectory(os.path.join(root, "state")),
            self.libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[os.path.join(root, "volumes")],
            images_directory=os.path.join(root, "images"),
            host=host,
            bridges=lambda: {"br@net": 0, "br@other": 0},
            stop_timeout=2,
            acknowledge_timeout=15,
            **extra,
        )
        self.api = HypervisorApi(self.manager)
        self.running = False
        testcase.addCleanup(self.stop)

    async def start(self) -> None:
        self.manager.privilegedStartService()
        self.libvirt.startService()
        self.manager.startService()
        self.running = True
        await until(lambda: self.manager.domains_current, what="libvirt connection")
        if self.manager.reconciler.reconciling is not None:
            await self.manager.reconciler.reconciling

    async def stop(self) -> None:
        if not self.running:
            return
        self.running = False
        d1 = self.manager.stopService()
        d2 = self.libvirt.stopService()
        await d1
        await d2


class ManagerTestCase(TestCase):
    """
    Shared set-up: a daemon with one subnet 10.5.0.0/24 ("net") and three addresses.
    """

    def setUp(self) -> None:
        start_event_loop()
        destroy_test_domains()
        self.addCleanup(destroy_test_domains)
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        os.makedirs(os.path.join(self.root, "images"))
        self.host = FakeHost(cpus=4, memory_mib=8192)
        self.daemon = Daemon(self, self.root, self.host)
        self.api = self.daemon.api
        self.manager = self.daemon.manager

    async def raises(self, error: Any, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """
        Assert that C{fn(*args, **kwargs)} fails with C{error}, raising or through its
        Deferred; return the exception.
        """
        from twisted.internet.defer import maybeDeferred

        return await self.assertFailure(maybeDeferred(fn, *args, **kwargs), error)

    async def prepare(self) -> None:
        await self.daemon.start()
        await self.api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[
                    Subnet(
                        Id="net",
                        IpGateway="10.5.0.1",
                        IpMask="255.255.255.0",
                        DomainNameServers=["10.5.0.1"],
                    )
                ]
            ),
        )
        await self.api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(
                AddressesToAdd=[
                    Address(f"10.5.0.{i}", f"52:54:0a:05:00:{i:02x}") for i in (2, 3, 4)
                ]
            ),
        )

    def image(self, name: str, data: bytes) -> str:
        path = os.path.join(self.root, "images", name)
        with open(path, "wb") as f:
            f.write(data)
        return "file://" + path

    def create(self, identity: Identity = ALICE, **fields: Any) -> "Deferred[str]":
        return Deferred.fromCoroutine(self._create(identity, **fields))

    async def _create(self, identity: Identity = ALICE, **fields: Any) -> str:
        request = CreateVmRequest(
            VmInfo=VmInfo(
                MemoryInMiB=fields.pop("MemoryInMiB", 64),
                MilliCPUs=fields.pop("MilliCPUs", 500),
                **{k: fields.pop(k) for k in list(fields) if k in VmInfo.__dataclass_fields__},
            ),
            MinimumFreeBytes=fields.pop("MinimumFreeBytes", MiB),
            **fields,
        )
        messages: list[str] = []
        response = await self.api.CreateVm(
            identity, request, lambda r: messages.append(r.ProgressMessage)
        )
        self.assertTrue(response.Final)
        await self.api.AcknowledgeVm(identity, IpRequest(response.IpAddress))
        return response.IpAddress

    def info_file(self, ip: str) -> dict[str, Any]:
        with open(os.path.join(self.root, "state", "VMs", ip, "info.json")) as f:
            return json.load(f)

    def domain_active(self, ip: str) -> bool:
        conn = libvirt.open(TEST_URI)
        try:
            return bool(conn.lookupByName(f"vm-{ip}").isActive())
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()

    def outside(self, ip: str, action: str) -> None:
        """
        Act on a VM's domain from another libvirt connection (as the guest would).
        """
        conn = libvirt.open(TEST_URI)
        getattr(conn.lookupByName(f"vm-{ip}"), action)()
        conn.close()


class CreateTests(ManagerTestCase):
    """
    CreateVm, AcknowledgeVm and the state directory they write.
    """

    async def test_create_empty_root(self) -> None:
        """
        A VM with an empty root volume is created, runs, and is persisted with the
        reference's fields; the creator is the primary owner; the address leaves the
        free pool.
        """
        await self.prepare()
        ip = await self.create(OwnerUsers=["bob", "alice"], Tags={"Name": "web"})
        self.assertEqual(ip, "10.5.0.2")
        info = self.api.GetVmInfo(BOB, IpRequest(ip)).VmInfo
        self.assertEqual(info.State, State.RUNNING)
        self.assertEqual(info.OwnerUsers, ["alice", "bob"])
        self.assertEqual(info.Address.MacAddress, "52:54:0a:05:00:02")
        self.assertEqual(info.SubnetId, "net")
        self.assertEqual(info.Volumes[0].Size, MiB)
        on_disk = self.info_file(ip)
        self.assertEqual(on_disk["State"], "running")
        self.assertEqual(on_disk["Address"]["IpAddress"], ip)
        root = on_disk["VolumeLocations"][0]["Filename"]
        self.assertEqual(os.path.getsize(root), MiB)
        self.assertGreaterEqual(os.stat(root).st_blocks * 512, MiB)
        self.assertTrue(self.domain_active(ip))
        self.assertNotIn(ip, [a.IpAddress for a in self.manager.pool.free])
        self.assertEqual(self.manager.check_invariants(), [])
        request = (await self.api.GetVmCreateRequest(ALICE, IpRequest(ip))).CreateRequest
        self.assertEqual(request.MinimumFreeBytes, MiB)

    async def test_create_from_images_and_kernel(self) -> None:
        """
        Raw and qcow2 images under -localImagesDirectory become the root volume
        (raw rounded up by RoundupPower); kernel and initrd are copied beside it.
        """
        await self.prepare()
        raw = self.image("disk.raw", b"\x01" * 3000)
        qcow2 = "file://" + os.path.join(self.root, "images", "disk.qcow2")
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", qcow2[7:], str(10 * MiB)], check=True
        )
        kernel = self.image("vmlinux", b"kernel")
        initrd = self.image("initrd", b"initrd")
        ip = await self.create(
            ImageURL=raw,
            MinimumFreeBytes=0,
            RoundupPower=20,
            KernelURL=kernel,
            InitrdURL=initrd,
            DoNotStart=True,
        )
        info = self.api.GetVmInfo(ALICE, IpRequest(ip)).VmInfo
        self.assertEqual(info.State, State.STOPPED)
        self.assertEqual(info.Volumes[0].Size, MiB)
        root = self.info_file(ip)["VolumeLocations"][0]["Filename"]
        with open(root, "rb") as f:
            self.assertEqual(f.read(3000), b"\x01" * 3000)
        with open(os.path.join(os.path.dirname(root), "kernel"), "rb") as f:
            self.assertEqual(f.read(), b"kernel")
        ip2 = await self.create(ImageURL=qcow2, MinimumFreeBytes=0, DoNotStart=True)
        info2 = self.api.GetVmInfo(ALICE, IpRequest(ip2)).VmInfo
        self.assertEqual(info2.Volumes[0].Format, VolumeFormat.QCOW2)
        self.assertEqual(info2.Volumes[0].VirtualSize, 10 * MiB)

    async def test_bad_requests_change_nothing(self) -> None:
        """
        Malformed or impossible requests are refused with a clear error, and the pool,
        the VM table and the state directory are unchanged.
        """
        await self.prepare()
        free_before = list(self.manager.pool.free)
        outside = os.path.join(self.root, "secret")
        open(outside, "w").close()
        os.symlink(outside, os.path.join(self.root, "images", "link"))
        cases = [
            (dict(MemoryInMiB=0), errors.InvalidRequest, "MemoryInMiB"),
            (dict(MinimumFreeBytes=0), errors.InvalidRequest, "ImageURL"),
            (dict(SubnetId="nope"), errors.NotFound, "known subnets: net"),
            (dict(ImageURL="http://x/y"), errors.InvalidRequest, "-objectCacheDirectory"),
            (dict(ImageURL="ftp://x/y"), errors.InvalidRequest, "only file://, http://"),
            (dict(ImageURL="file://" + outside), errors.InvalidRequest, "outside"),
            (
                dict(ImageURL="file://" + self.root + "/images/link"),
                errors.InvalidRequest,
                "outside",
            ),
            (
                dict(ImageURL="file://" + self.root + "/images/none"),
                errors.NotFound,
                "no such file",
            ),
            (dict(ImageName="debian"), errors.InvalidRequest, "image cache"),
            (dict(MilliCPUs=5000), errors.InsufficientCapacity, "1000 short"),
            (dict(MemoryInMiB=9000), errors.InsufficientCapacity, "808 MiB short"),
            (
                dict(Address=Address("10.5.0.9")),
                errors.InsufficientCapacity,
                "not found in free pool",
            ),
            (dict(SecondaryVolumes=[Volume(Size=-1)]), errors.InvalidRequest, "positive"),
        ]
        for fields, error, words in cases:
            e = await self.assertFailure(self.create(**fields), error)
            self.assertIn(words, str(e), fields)
        self.assertEqual(self.manager.pool.free, free_before)
        self.assertEqual(self.manager.vms, {})
        self.assertEqual(os.listdir(os.path.join(self.root, "state", "VMs")), [])

    async def test_start_failure_leaves_nothing(self) -> None:
        """
        If libvirt refuses to start the new domain, CreateVm fails and the VM, its
        files and its address are gone.
        """
        await self.prepare()
        conn = libvirt.open(TEST_URI)
        self.addCleanup(conn.close)
        blocker = conn.createXML(
            "<domain type='test'><name>vm-10.5.0.2</name>"
            "<memory>8192</memory><os><type>hvm</type></os>"
            "</domain>",
            0,
        )
        self.addCleanup(lambda: blocker.isActive() and blocker.destroy())
        e = await self.assertFailure(self.create(), errors.WrongState)
        self.assertIn("failed to start", str(e))
        self.assertEqual(self.manager.vms, {})
        self.assertIn("10.5.0.2", [a.IpAddress for a in self.manager.pool.free])
        self.assertEqual(os.listdir(os.path.join(self.root, "volumes")), [])

    async def test_unacknowledged_vm_destroyed(self) -> None:
        """
        A VM not acknowledged within the timeout is destroyed and its address freed.
        """
        await self.prepare()
        self.manager.ctx.settings.acknowledge_timeout = 0.2
        response = await self.api.CreateVm(
            ALICE,
            CreateVmRequest(VmInfo=VmInfo(MemoryInMiB=64, MilliCPUs=100), MinimumFreeBytes=MiB),
        )
        ip = response.IpAddress
        await until(lambda: ip not in self.manager.vms, what="auto-destroy")
        await until(lambda: not self.domain_active(ip), what="domain gone")
        self.assertIn(ip, [a.IpAddress for a in self.manager.pool.free])

    async def test_disabled_refuses_create_and_start(self) -> None:
        """
        While disabled, CreateVm and StartVm are refused; enabling allows them again.
        """
        await self.prepare()
        ip = await self.create(DoNotStart=True)
        await self.api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=True))
        self.assertTrue(os.path.exists(os.path.join(self.root, "state", "disabled")))
        await self.assertFailure(self.create(), errors.Unavailable)
        await self.assertFailure(
            self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip)), errors.Unavailable
        )
        await self.api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=False))
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        self.assertEqual(self.manager.vms[ip].info.State, State.RUNNING)


class LifecycleTests(ManagerTestCase):
    """
    The state machine, driven by calls and by libvirt events.
    """

    async def test_stop_start_destroy(self) -> None:
        """
        running -> StopVm -> stopped -> StartVm -> running -> DestroyVm -> gone, with
        the address back in the pool and the files removed.
        """
        await self.prepare()
        ip = await self.create()
        await self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(self.manager.vms[ip].info.State, State.STOPPED)
        self.assertFalse(self.domain_active(ip))
        self.assertEqual(self.info_file(ip)["State"], "stopped")
        e = await self.assertFailure(
            self.api.StopVm(ALICE, AccessRequest(IpAddress=ip)), errors.WrongState
        )
        self.assertIn("it is stopped", str(e))
        response = await self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        self.assertFalse(response.DhcpTimedOut)
        self.assertTrue(self.domain_active(ip))
        volume_dir = os.path.dirname(self.info_file(ip)["VolumeLocations"][0]["Filename"])
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertNotIn(ip, self.manager.vms)
        self.assertFalse(self.domain_active(ip))
        self.assertFalse(os.path.exists(volume_dir))
        self.assertFalse(os.path.exists(os.path.join(self.root, "state", "VMs", ip)))
        self.assertIn(ip, [a.IpAddress for a in self.manager.pool.free])
        await self.assertFailure(
            self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip)), errors.NotFound
        )

    async def test_guest_power_off_and_crash(self) -> None:
        """
        A guest powering itself off makes the VM stopped; a domain killed from outside
        makes it crashed; both via libvirt events.
        """
        await self.prepare()
        a = await self.create()
        b = await self.create()
        self.outside(a, "shutdown")
        await until(lambda: self.manager.vms[a].info.State == State.STOPPED, what="stopped")
        self.outside(b, "destroy")
        await until(lambda: self.manager.vms[b].info.State == State.CRASHED, what="crashed")
        self.assertEqual(self.info_file(b)["State"], "crashed")
        await self.api.StopVm(ALICE, AccessRequest(IpAddress=b))
        self.assertEqual(self.manager.vms[b].info.State, State.STOPPED)

    async def test_destroy_on_powerdown_and_protection(self) -> None:
        """
        DestroyOnPowerdown deletes a VM that powers off, unless DestroyProtection is
        set; DestroyProtection refuses DestroyVm of a running VM.
        """
        await self.prepare()
        a = await self.create(DestroyOnPowerdown=True)
        b = await self.create(DestroyOnPowerdown=True, DestroyProtection=True)
        self.outside(a, "shutdown")
        await until(lambda: a not in self.manager.vms, what="a destroyed")
        self.outside(b, "shutdown")
        await until(lambda: self.manager.vms[b].info.State == State.STOPPED, what="b stopped")
        await self.api.StartVm(ALICE, StartVmRequest(IpAddress=b))
        e = await self.assertFailure(
            self.api.DestroyVm(ALICE, AccessRequest(IpAddress=b)), errors.WrongState
        )
        self.assertIn("DestroyProtection", str(e))
        await self.manager.changes.change_vm_destroy_protection(ALICE, b, False)
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=b))

    async def test_owner_checks(self) -> None:
        """
        Owners and owner-group members may act on a VM; a stranger may not, and his
        attempt changes nothing; anyone may read.
        """
        await self.prepare()
        ip = await self.create(OwnerGroups=["team"])
        await self.assertFailure(
            self.api.StopVm(BOB, AccessRequest(IpAddress=ip)), errors.AccessDenied
        )
        self.assertEqual(self.manager.vms[ip].info.State, State.RUNNING)
        self.assertEqual(self.api.GetVmInfo(BOB, IpRequest(ip)).VmInfo.State, State.RUNNING)
        await self.manager.changes.change_vm_tags(CAROL, ip, {"by": "carol"})
        self.assertEqual(self.manager.vms[ip].info.Tags, {"by": "carol"})
        await self.raises(
            errors.AccessDenied, self.api.ChangeAddressPool, ALICE, ChangeAddressPoolRequest()
        )

    async def test_changes(self) -> None:
        """
        Tags, owners, groups, primary owner, hostname and sizes change, persist, and
        respect the reference's rules.
        """
        await self.prepare()
        ip = await self.create(MemoryInMiB=64, MilliCPUs=500)
        m = self.manager
        await m.changes.change_vm_owner_users(ALICE, ip, ["bob", "carol", "bob"])
        self.assertEqual(m.vms[ip].info.OwnerUsers, ["alice", "bob", "carol"])
        await m.changes.become_primary_vm_owner(BOB, ip)
        self.assertEqual(m.vms[ip].info.OwnerUsers, ["bob", "alice", "carol"])
        await m.changes.change_vm_owner_groups(ALICE, ip, ["g1", "g1", "g2"])
        self.assertEqual(m.vms[ip].info.OwnerGroups, ["g1", "g2"])
        await m.changes.change_vm_hostname(ALICE, ip, "web-1")
        self.assertEqual(self.info_file(ip)["Hostname"], "web-1")
        await self.raises(errors.InvalidRequest, m.changes.change_vm_hostname, ALICE, ip, "a b")
        # memory needs a stopped VM; milliCPUs within the same vCPU count do not
        await self.assertFailure(
            self.api.ChangeVmSize(ALICE, ChangeVmSizeRequest(IpAddress=ip, MemoryInMiB=128)),
            errors.WrongState,
        )
        await self.api.ChangeVmSize(ALICE, ChangeVmSizeRequest(IpAddress=ip, MilliCPUs=900))
        self.assertEqual(m.vms[ip].info.MilliCPUs, 900)
        await self.assertFailure(
            self.api.ChangeVmSize(ALICE, ChangeVmSizeRequest(IpAddress=ip, MilliCPUs=1500)),
            errors.WrongState,
        )
        await self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        await self.api.ChangeVmSize(ALICE, ChangeVmSizeRequest(IpAddress=ip, MemoryInMiB=256))
        self.assertEqual(self.info_file(ip)["MemoryInMiB"], 256)
        e = await self.assertFailure(
            self.api.ChangeVmSize(ALICE, ChangeVmSizeRequest(IpAddress=ip, MemoryInMiB=100000)),
            errors.InsufficientCapacity,
        )
        self.assertIn("MiB short", str(e))
        self.assertEqual(m.vms[ip].info.MemoryInMiB, 256)

    async def test_reboot(self) -> None:
        """
        RebootVm sends Ctrl-Alt-Del to a running VM (owners only) and is refused for a
        stopped one.
        """
        await self.prepare()
        ip = await self.create()
        response = await self.api.RebootVm(ALICE, RebootVmRequest(IpAddress=ip))
        self.assertFalse(response.DhcpTimedOut)
        self.assertEqual(self.manager.vms[ip].info.State, State.RUNNING)
        await self.assertFailure(
            self.api.RebootVm(BOB, RebootVmRequest(IpAddress=ip)), errors.AccessDenied
        )
        await self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        e = await self.assertFailure(
            self.api.RebootVm(ALICE, RebootVmRequest(IpAddress=ip)), errors.WrongState
        )
        self.assertIn("cannot reboot", str(e))

    async def test_per_vm_locking(self) -> None:
        """
        While one VM's lock is held (a long operation), changes to another VM go
        through at once and changes to the busy VM wait their turn.
        """
        await self.prepare()
        a = await self.create(DoNotStart=True)
        b = await self.create(DoNotStart=True)
        await self.manager.vms[a].lock.acquire()
        on_a = self.manager.changes.change_vm_tags(ALICE, a, {"x": "1"})
        on_b = self.manager.changes.change_vm_tags(ALICE, b, {"y": "2"})
        self.assertTrue(on_b.called)
        self.assertFalse(on_a.called)
        self.assertEqual(self.manager.vms[a].info.Tags, {})
        self.manager.vms[a].lock.release()
        await on_a
        self.assertEqual(self.manager.vms[a].info.Tags, {"x": "1"})

    async def test_list_filters(self) -> None:
        """
        ListVMs and GetVmInfos filter by state mask, owners, groups and tags; Sort
        orders IPs numerically.
        """
        await self.prepare()
        a = await self.create(Tags={"env": "prod"}, OwnerGroups=["team"])
        b = await self.create(identity=BOB, Tags={"env": "dev"}, DoNotStart=True)
        c = await self.create(identity=CAROL, Tags={"env": "prod", "x": "1"})

        def ips(**f: Any) -> list[str]:
            return self.api.ListVMs(
                ALICE, ListVMsRequest(Filter=VmFilter(**f), Sort=True)
            ).IpAddresses

        self.assertEqual(ips(), [a, b, c])
        self.assertEqual(ips(IgnoreStateMask=1 << State.STOPPED.number), [a, c])
        self.assertEqual(ips(OwnerUsers=["bob"]), [b])
        self.assertEqual(ips(OwnerGroups=["team"]), [a])
        self.assertEqual(ips(VmTagsToMatch={"env": ["prod"]}), [a, c])
        self.assertEqual(ips(VmTagsToMatch={"env": ["prod"], "x": []}), [c])
        infos = self.manager.get_vm_infos(VmFilter(VmTagsToMatch={"env": ["dev"]}))
        self.assertEqual([i.ip for i in infos], [b])


class PoolAndSubnetTests(ManagerTestCase):
    """
    Address pool and subnet rules through the service layer.
    """

    async def test_pool_rules(self) -> None:
        """
        Duplicates, unknown subnets and bad MACs are refused; addresses in use cannot
        be removed; MaximumFreeAddresses trims; everything persists.
        """
        await self.prepare()
        pool = self.manager.pool
        add = lambda *a: self.api.ChangeAddressPool(  # noqa: E731
            ROOT, ChangeAddressPoolRequest(AddressesToAdd=list(a))
        )
        await self.raises(errors.InvalidRequest, add, Address("10.5.0.2", "52:54:00:00:00:99"))
        await self.raises(errors.InvalidRequest, add, Address("10.9.0.2", "52:54:00:00:00:98"))
        await self.raises(errors.InvalidRequest, add, Address("10.5.0.20", "zz"))
        ip = await self.create()
        e = await self.raises(
            errors.InvalidRequest,
            self.api.ChangeAddressPool,
            ROOT,
            ChangeAddressPoolRequest(AddressesToRemove=[Address(ip)]),
        )
        self.assertIn("used by a VM", str(e))
        await self.api.ChangeAddressPool(
            ROOT, ChangeAddressPoolRequest(MaximumFreeAddresses={"net": 1})
        )
        self.assertEqual(len(pool.free), 1)
        with open(os.path.join(self.root, "state", "address-pool.json")) as f:
            saved = json.load(f)
        self.assertEqual(len(saved["Free"]), 1)
        self.assertEqual(len(saved["Registered"]), 2)
        self.assertEqual(self.manager.check_invariants(), [])

    async def test_subnet_rules(self) -> None:
        """
        Overlaps, the protected id, bad masks and deleting a subnet with VMs are
        refused; the only permitted subnet is chosen; several need a choice.
        """
        await self.prepare()
        update = lambda **k: self.api.UpdateSubnets(ROOT, UpdateSubnetsRequest(**k))  # noqa: E731
        await self.raises(
            errors.InvalidRequest,
            update,
            Add=[Subnet(Id="dup", IpGateway="10.5.0.100", IpMask="255.255.0.0")],
        )
        await self.raises(
            errors.InvalidRequest,
            update,
            Add=[Subnet(Id="hypervisor", IpGateway="10.6.0.1", IpMask="255.255.255.0")],
        )
        await self.raises(
            errors.InvalidRequest,
            update,
            Add=[Subnet(Id="bad", IpGateway="10.6.0.1", IpMask="255.0.255.0")],
        )
        await update(
            Add=[
                Subnet(
                    Id="other", IpGateway="10.6.0.1", IpMask="255.255.255.0", AllowedUsers=["bob"]
                )
            ]
        )
        await self.api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(AddressesToAdd=[Address("10.6.0.2", "52:54:0a:06:00:02")]),
        )
        ip = await self.create(identity=ALICE)  # only "net" is permitted to alice
        self.assertEqual(self.manager.vms[ip].info.SubnetId, "net")
        e = await self.assertFailure(self.create(identity=BOB), errors.InvalidRequest)
        self.assertIn("multiple available subnets", str(e))
        ip2 = await self.create(identity=BOB, SubnetId="other")
        self.assertEqual(ip2, "10.6.0.2")
        await self.raises(errors.InvalidRequest, update, Delete=["other"])
        with open(os.path.join(self.root, "state", "subnets.json")) as f:
            self.assertEqual([s["Id"] for s in json.load(f)], ["net", "other"])


class UpdatesTests(ManagerTestCase):
    """
    GetUpdates as an in-process stream.
    """

    async def test_full_then_incremental(self) -> None:
        """
        The first update is full; creating and destroying a VM then sends that VM
        (a zero VmInfo for a deleted one) and the pool.
        """
        await self.prepare()
        stream = self.api.GetUpdates(ALICE, None)
        first = await stream.get()
        self.assertTrue(first.HaveVMs and first.HaveSubnets and first.HaveAddressPool)
        self.assertEqual(first.NumCPUs, 4)
        self.assertEqual(first.NumFreeAddresses, {"net": 3})
        ip = await self.create()
        seen: list[Any] = []
        while len(stream):
            seen.append(await stream.get())
        vm_updates = [u.VMs[ip] for u in seen if u.HaveVMs and ip in u.VMs]
        self.assertEqual(vm_updates[-1].State, State.RUNNING)
        self.assertTrue(any(u.HaveAddressPool and u.NumFreeAddresses == {"net": 2} for u in seen))
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        after = []
        while len(stream):
            after.append(await stream.get())
        last = [u.VMs[ip] for u in after if u.HaveVMs and ip in u.VMs][-1]
        self.assertEqual(codec.to_dict(last)["MemoryInMiB"], 0)
        stream.close()


class RestartTests(ManagerTestCase):
    """
    Reconciliation when the daemon restarts (VMs keep running under libvirt).
    """

    async def test_restart_adopts_restarts_and_completes(self) -> None:
        """
        After a restart: a running VM is adopted untouched; one whose domain died
        while the daemon was down is started again; an interrupted stop and an
        interrupted destroy are completed; the pool invariants hold.
        """
        await self.prepare()
        a = await self.create()
        b = await self.create()
        c = await self.create()
        # test:///default forgets its domains when its last connection closes
        conn = libvirt.open(TEST_URI)
        self.addCleanup(conn.close)
        await self.daemon.stop()
        uuid_a = conn.lookupByName(f"vm-{a}").UUIDString()
        conn.lookupByName(f"vm-{b}").destroy()
        # c: the daemon died in the middle of destroying it
        path = os.path.join(self.root, "state", "VMs", c, "info.json")
        with open(path) as f:
            data = json.load(f)
        data["State"] = "destroying"
        with open(path, "w") as f:
            json.dump(data, f)
        daemon = Daemon(self, self.root, self.host)
        await daemon.start()
        m = daemon.manager
        self.assertEqual(m.vms[a].info.State, State.RUNNING)
        self.assertEqual(conn.lookupByName(f"vm-{a}").UUIDString(), uuid_a)
        self.assertEqual(m.vms[b].info.State, State.RUNNING)
        self.assertTrue(self.domain_active(b))
        self.assertNotIn(c, m.vms)
        self.assertFalse(self.domain_active(c))
        self.assertEqual(m.check_invariants(), [])
        self.assertIn(c, [x.IpAddress for x in m.pool.free])
