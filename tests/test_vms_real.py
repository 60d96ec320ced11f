"""
The VM manager against the real libvirtd (C{qemu:///system}, TCG) with the tiny
guest: the lifecycle driven by real guest events, libvirtd restarting under the
manager, and the daemon killed with SIGKILL while VMs run.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT, Identity
from hypervisor.manager.manager import Manager
from hypervisor.model import (
    AccessRequest,
    Address,
    ChangeAddressPoolRequest,
    CreateVmRequest,
    IpRequest,
    StartVmRequest,
    State,
    Subnet,
    UpdateSubnetsRequest,
    VmInfo,
)
from hypervisor.store import StateDirectory
from hypervisor.virt.connection import LibvirtService, start_event_loop
from tests import support
from tests.support import until

ALICE = Identity(username="alice")
MiB = 1024 * 1024


def setup_network(api: HypervisorApi, count: int = 4) -> "Deferred[Any]":
    """
    Subnet "hvtest" (10.77.0.0/24 on br@hvtest) with C{count} addresses.
    """
    d1 = api.UpdateSubnets(
        ROOT,
        UpdateSubnetsRequest(
            Add=[Subnet(Id="hvtest", IpGateway="10.77.0.1", IpMask="255.255.255.0")]
        ),
    )
    d2 = api.ChangeAddressPool(
        ROOT,
        ChangeAddressPoolRequest(
            AddressesToAdd=[
                Address(f"10.77.0.{i}", f"52:54:0a:4d:00:{i:02x}") for i in range(2, 2 + count)
            ]
        ),
    )
    return DeferredList([d1, d2], fireOnOneErrback=True, consumeErrors=True)


def guest_request(guest: str, mode: str) -> CreateVmRequest:
    """
    A CreateVm request booting the tiny guest directly (no DHCP server yet).
    """
    return CreateVmRequest(
        VmInfo=VmInfo(
            MemoryInMiB=128,
            MilliCPUs=500,
            SubnetId="hvtest",
            ExtraKernelOptions=f"quiet hv.dhcp=no hv.mode={mode}",
        ),
        MinimumFreeBytes=MiB,
        KernelURL=f"file://{guest}/vmlinux",
        InitrdURL=f"file://{guest}/initrd.cpio",
    )


class RealVmTests(TestCase):
    """
    The manager in this process, on the real libvirtd.
    """

    timeout = 300

    def setUp(self) -> None:
        support.require_libvirtd()
        self.guest = support.tiny_guest()
        support.ensure_bridge()
        start_event_loop()
        self.root = support.public_tempdir("hv-real-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.services: list[Any] = []
        self.addCleanup(self.stop_services)

    def make(self) -> tuple[Manager, HypervisorApi]:
        libvirt = LibvirtService(support.QEMU_URI, reactor, max_backoff=1.0)
        manager = Manager(
            StateDirectory(os.path.join(self.root, "state")),
            libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[os.path.join(self.root, "volumes")],
            images_directory=self.guest,
            stop_timeout=20,
        )
        manager.privilegedStartService()
        libvirt.startService()
        manager.startService()
        self.services = [manager, libvirt]
        return manager, HypervisorApi(manager)

    async def stop_services(self) -> None:
        for service in self.services:
            if service.running:
                await service.stopService()
        self.services = []
        # leave no guest of ours behind
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        for dom in conn.listAllDomains():
            if dom.name().startswith("vm-10.77.") and dom.isActive():
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

    async def create_guest(self, manager: Manager, api: HypervisorApi, mode: str) -> str:
        """
        Connect, set up the subnet, create and acknowledge one tiny guest; its IP.
        """
        await until(lambda: manager.libvirt.connected, 30, "libvirt")
        await setup_network(api)
        response = await api.CreateVm(ALICE, guest_request(self.guest, mode))
        await api.AcknowledgeVm(ALICE, IpRequest(response.IpAddress))
        return response.IpAddress

    async def test_lifecycle_with_real_guest(self) -> None:
        """
        create -> running -> the guest powers itself off -> stopped (from libvirt's
        event) -> StartVm -> running again -> DestroyVm -> gone; the serial output is
        in VMs/<IP>/bootlog.
        """
        manager, api = self.make()
        ip = await self.create_guest(manager, api, "poweroff")
        self.assertEqual(manager.vms[ip].info.State, State.RUNNING)
        await until(
            lambda: manager.vms[ip].info.State == State.STOPPED,
            90,
            f"the guest to power off (bootlog: {self.bootlog(ip)[-500:]!r})",
        )
        log = self.bootlog(ip)
        self.assertIn("tiny-guest: booted", log)
        self.assertIn("tiny-guest: powering off", log)
        info_path = os.path.join(self.root, "state", "VMs", ip, "info.json")

        def stored_state() -> str:
            with open(info_path) as f:
                return str(json.load(f)["State"])

        # The state is recorded in memory at once and written by the state writer on
        # its disk thread just after: wait for the file rather than race it.
        await until(lambda: stored_state() == "stopped", 10, "info.json to say stopped")
        await api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        self.assertEqual(manager.vms[ip].info.State, State.RUNNING)
        await until(
            lambda: log.count("tiny-guest: booted") < self.bootlog(ip).count("tiny-guest: booted"),
            90,
            "the second boot",
        )
        await api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertNotIn(ip, manager.vms)
        self.assertEqual(manager.check_invariants(), [])

    async def test_stop_via_acpi(self) -> None:
        """
        StopVm powers a running guest down through the ACPI power button (the guest
        logs it) and the VM is stopped without being forced.
        """
        manager, api = self.make()
        ip = await self.create_guest(manager, api, "stay")
        await until(lambda: "staying up" in self.bootlog(ip), 90, "the guest to boot")
        await api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(manager.vms[ip].info.State, State.STOPPED)
        await until(lambda: "power button" in self.bootlog(ip), 10, "the ACPI log line")

    async def test_libvirtd_restart(self) -> None:
        """
        libvirtd restarted under the manager: the VM keeps running, nothing is lost,
        and events resume (a guest power-off after the restart is seen).
        """
        manager, api = self.make()
        ip = await self.create_guest(manager, api, "stay")
        await until(lambda: "staying up" in self.bootlog(ip), 90, "the guest to boot")
        try:
            await deferToThreadFn(support.kill_libvirtd)
            await until(lambda: not manager.libvirt.connected, 30, "the disconnect")
        finally:
            await deferToThreadFn(support.start_libvirtd)
        await until(lambda: manager.libvirt.connected, 60, "the reconnect")
        if manager.reconciler.reconciling is not None:
            await manager.reconciler.reconciling
        self.assertEqual(manager.vms[ip].info.State, State.RUNNING)
        await api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertEqual(manager.vms[ip].info.State, State.STOPPED)
        self.assertIn("power button", self.bootlog(ip))


def deferToThreadFn(fn: Any) -> "Deferred[Any]":
    from twisted.internet.threads import deferToThread

    return deferToThread(fn)


RUNNER = r"""
import sys
from twisted.internet import reactor, task, defer
import tap
from hypervisor.api import HypervisorApi
from hypervisor.auth import Identity
from tests.test_vms_real import setup_network, guest_request

options = tap.Options(flags_directory="/nonexistent")
options.parseOptions(sys.argv[1:-1])
service = tap.makeService(options, reactor)
service.privilegedStartService()
service.startService()
manager = service.getServiceNamed("manager")
api = HypervisorApi(manager)
alice = Identity(username="alice")

async def main():
    while not manager.libvirt.connected:
        await task.deferLater(reactor, 0.1, lambda: None)
    await setup_network(api)
    for _ in range(int(sys.argv[-1])):
        r = await api.CreateVm(alice, guest_request(options["localImagesDirectory"], "stay"))
        await api.AcknowledgeVm(alice, __import__("hypervisor.model").model.IpRequest(r.IpAddress))
        print(r.IpAddress, flush=True)
    print("ready", flush=True)

def failed(f):
    # Exit at once: stopping the reactor can wait forever on libvirt's threads, and
    # the test would wait for a "ready" that never comes.
    f.printTraceback(file=sys.stdout)
    sys.stdout.flush()
    __import__("os")._exit(1)

defer.Deferred.fromCoroutine(main()).addErrback(failed)
reactor.run()
"""


class KillTests(TestCase):
    """
    The daemon killed with SIGKILL while VMs run.
    """

    timeout = 300

    def test_sigkill_loses_nothing(self) -> None:
        """
        A daemon that created two VMs is killed with SIGKILL; the real daemon started
        again on the same state directory finds both still running (same domains),
        reports them running, and the address pool invariants hold.
        """
        support.require_libvirtd()
        guest = support.tiny_guest()
        support.ensure_bridge()
        daemon = support.Daemon(self, "-domainType=qemu", f"-localImagesDirectory={guest}")
        os.chmod(daemon.dir, 0o755)
        flags = daemon.flags + [f"-volumeDirectories={daemon.dir}/volumes"]
        env = dict(os.environ, PYTHONPATH=support.REPO)
        runner = subprocess.Popen(
            [sys.executable, "-c", RUNNER, *flags, "2"],
            cwd=support.REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: runner.poll() is None and runner.kill())
        assert runner.stdout is not None
        fd = runner.stdout.fileno()
        output = b""
        lines: list[str] = []
        deadline = time.monotonic() + 240
        while "ready" not in lines:
            # Read with a deadline: a runner that hangs must fail the test, not hang it.
            left = deadline - time.monotonic()
            readable, _, _ = select.select([fd], [], [], max(0.0, left))
            if not readable:
                runner.kill()
                self.fail(f"the runner gave no 'ready' within 240 s:\n{output[-4000:]!r}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.fail(f"the runner exited before 'ready':\n{output[-4000:]!r}")
            output += chunk
            lines = [line.strip() for line in output.decode(errors="replace").splitlines()]
        ips = [line for line in lines if line.startswith("10.77.")]
        self.assertEqual(len(ips), 2, "the runner did not create two VMs")
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        self.addCleanup(conn.close)

        def cleanup_domains() -> None:
            for ip in ips:
                try:
                    conn.lookupByName(f"vm-{ip}").destroy()
                except libvirt.libvirtError:
                    pass

        self.addCleanup(cleanup_domains)
        uuids = {ip: conn.lookupByName(f"vm-{ip}").UUIDString() for ip in ips}
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(30)
        daemon.flags = flags
        daemon.start()
        support.wait_for(lambda: support.http_get(daemon.url + "/healthz")[0] == 200, 60, "healthz")
        support.wait_for(
            lambda: "2 managed by this hypervisor" in support.http_get(daemon.url + "/")[1],
            30,
            "both VMs on the status page",
        )
        result = daemon.command("stop")
        self.assertEqual(result.returncode, 0, result.stderr)
        daemon.wait(60)
        for ip in ips:
            dom = conn.lookupByName(f"vm-{ip}")
            self.assertTrue(dom.isActive())
            self.assertEqual(dom.UUIDString(), uuids[ip], "the VM was restarted")
            with open(os.path.join(daemon.state_dir, "VMs", ip, "info.json")) as f:
                self.assertEqual(json.load(f)["State"], "running")
        self.assertNotIn("should be running but its domain is not running", daemon.output())
        # the pool, as the next daemon would load it
        state = StateDirectory(daemon.state_dir)
        manager = Manager(
            state, LibvirtService(support.QEMU_URI, reactor), reactor, domain_type="qemu"
        )
        manager.privilegedStartService()
        self.addCleanup(state.unlock)
        self.assertEqual(sorted(manager.vms), sorted(ips))
        self.assertEqual(manager.check_invariants(), [])
        self.assertEqual(len(manager.pool.free), 2)
