"""
The manager in memory: a C{Clock}, a synchronous disk runner and the fake domain layer
of L{hypervisor.testing}, so lifecycle, libvirt events, libvirt outages, failed
creations, acknowledgements and restarts are checked step by step without libvirtd
or threads.

L{ClockDaemon} is the harness; tests of the dispatcher and the HTTP adapter use it too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT, Identity
from hypervisor.errors import HypervisorError, WrongState
from hypervisor.manager.acks import DhcpAcknowledgements
from hypervisor.manager.create import Creator
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
from hypervisor.testing import FakeDomains, FakeHost, SynchronousRunner
from hypervisor.virt.connection import NotConnected

MiB = 1024 * 1024
GiB = 1024 * MiB
ALICE = Identity(username="alice", groups=frozenset({"team"}))
BOB = Identity(username="bob")
ACK_TIMEOUT = 15.0
START = 1_700_000_000.0


class Unfired:
    """
    What L{fired} returns for a Deferred that has not fired yet.
    """

    def __repr__(self) -> str:
        return "<unfired>"


UNFIRED = Unfired()


def fired(d: Any) -> Any:
    """
    The result of C{d} (a Deferred or a plain value); its exception if it failed
    (returned, not raised); L{UNFIRED} if it has not fired (then C{d} is left as
    it is). Call it once per fired Deferred: it consumes the result.
    """
    if not isinstance(d, Deferred):
        return d
    if not d.called:
        return UNFIRED
    out: list[Any] = []
    d.addCallbacks(out.append, lambda f: out.append(f.value))
    return out[0] if out else UNFIRED


def _no_fsync(fd: int) -> None:
    pass


class ClockDaemon:
    """
    A manager on a C{Clock} with a synchronous runner and L{FakeDomains}, one subnet
    "net" (10.5.0.0/24) and three addresses, in a temporary directory.

    Files are really written, but C{os.fsync} is a no-op for the test: durability is
    tested with the store, and thousands of fsyncs would make these tests slow.
    """

    def __init__(
        self,
        testcase: SynchronousTestCase,
        root: Optional[str] = None,
        domains: Optional[FakeDomains] = None,
        clock: Optional[Clock] = None,
        **kwargs: Any,
    ) -> None:
        testcase.patch(os, "fsync", _no_fsync)
        if root is None:
            root = tempfile.mkdtemp()
            testcase.addCleanup(shutil.rmtree, root, True)
        self.root = root
        if clock is None:
            clock = Clock()
            clock.advance(START)
        self.clock = clock
        self.domains = domains if domains is not None else FakeDomains(clock)
        self.runner = SynchronousRunner()
        self.volumes = os.path.join(root, "volumes")
        settings: dict[str, Any] = dict(
            domain_type="qemu",
            volume_directories=[self.volumes],
            host=FakeHost(cpus=4, memory_mib=8192, storage=(100 * GiB, 50 * GiB)),
            bridges=lambda: {"br0": 0},
            runner=self.runner,
            domains=self.domains,
            acknowledge_timeout=ACK_TIMEOUT,
            stop_timeout=2.0,
        )
        settings.update(kwargs)
        self.manager = Manager(StateDirectory(os.path.join(root, "state")), None, clock, **settings)
        self.api = HypervisorApi(self.manager)
        self.running = False
        testcase.addCleanup(self.stop)

    def start(self) -> "ClockDaemon":
        """
        Load the state directory, start, and connect to (fake) libvirt, which
        reconciles.
        """
        self.manager.privilegedStartService()
        self.manager.startService()
        self.running = True
        self.manager.libvirt_connected()
        self.settle()
        return self

    def stop(self) -> None:
        """
        Stop the manager (VMs keep running in the fake libvirt).
        """
        if not self.running:
            return
        self.running = False
        d = self.manager.stopService()
        self.settle()
        assert fired(d) is None, fired(d)

    def settle(self) -> None:
        """
        Deliver what is due now (libvirt events, chained calls).
        """
        for _ in range(5):
            self.clock.advance(0)

    def network(self) -> "ClockDaemon":
        """
        Add the subnet and its addresses.
        """
        assert (
            fired(
                self.api.UpdateSubnets(
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
            ).Error
            == ""
        )
        assert (
            fired(
                self.api.ChangeAddressPool(
                    ROOT,
                    ChangeAddressPoolRequest(
                        AddressesToAdd=[
                            Address(f"10.5.0.{i}", f"52:54:0a:05:00:{i:02x}") for i in (2, 3, 4)
                        ]
                    ),
                )
            ).Error
            == ""
        )
        return self

    def request(self, **fields: Any) -> CreateVmRequest:
        """
        A CreateVm request for a small VM with an empty 1 MiB root volume.
        """
        info = VmInfo(
            MemoryInMiB=fields.pop("MemoryInMiB", 64),
            MilliCPUs=fields.pop("MilliCPUs", 500),
            **{k: fields.pop(k) for k in list(fields) if k in VmInfo.__dataclass_fields__},
        )
        return CreateVmRequest(
            VmInfo=info, MinimumFreeBytes=fields.pop("MinimumFreeBytes", MiB), **fields
        )

    def create(self, identity: Identity = ALICE, acknowledge: bool = True, **fields: Any) -> str:
        """
        CreateVm (and AcknowledgeVm unless told not to); the VM's IP.
        """
        response = fired(self.api.CreateVm(identity, self.request(**fields)))
        if isinstance(response, BaseException):
            raise response
        assert response.Final, response
        self.settle()
        if acknowledge:
            assert (
                fired(self.api.AcknowledgeVm(identity, IpRequest(response.IpAddress))).Error == ""
            )
        return str(response.IpAddress)

    def state(self, ip: str) -> State:
        """
        The VM's state in memory.
        """
        return self.manager.vms[ip].info.State

    def vm_dir(self, ip: str) -> str:
        return os.path.join(self.root, "state", "VMs", ip)

    def info_file(self, ip: str) -> dict[str, Any]:
        """
        The VM's info.json as stored.
        """
        with open(os.path.join(self.vm_dir(ip), "info.json")) as f:
            return json.load(f)

    def stored_state(self, ip: str) -> str:
        return str(self.info_file(ip)["State"])

    def pending(self, ip: str) -> Optional[dict[str, Any]]:
        """
        The VM's pending.json, if any.
        """
        try:
            with open(os.path.join(self.vm_dir(ip), "pending.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def snapshot(self, ip: str) -> dict[str, bytes]:
        """
        Every file of the VM's state directory, by name.
        """
        out = {}
        for name in sorted(os.listdir(self.vm_dir(ip))):
            with open(os.path.join(self.vm_dir(ip), name), "rb") as f:
                out[name] = f.read()
        return out

    def free_ips(self) -> list[str]:
        return sorted(a.IpAddress for a in self.manager.pool.free)

    def running_domain(self, ip: str) -> bool:
        return f"vm-{ip}" in self.domains.domains


class ControlledDomains(FakeDomains):
    """
    L{FakeDomains} whose creates answer only when the test says (L{finish_create}),
    as a libvirt call on a thread does.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self.hold = False
        self.held: list[tuple[Deferred[Any], Any]] = []

    def create(self, xml: str) -> Any:
        d = super().create(xml)
        if not self.hold:
            return d
        later: Deferred[Any] = Deferred()
        self.held.append((later, d))
        return later

    def finish_create(self) -> None:
        later, d = self.held.pop(0)
        d.chainDeferred(later)


def after_restart(
    testcase: SynchronousTestCase, old: ClockDaemon, advance: float = 0.0
) -> ClockDaemon:
    """
    Stop C{old}, then start a new manager over the same state directory, with
    libvirt's domains surviving (as they do: they belong to libvirtd).
    """
    old.stop()
    old.clock.advance(advance)
    domains = FakeDomains(old.clock)
    domains.domains = dict(old.domains.domains)
    domains.names = dict(old.domains.names)
    domains._next = old.domains._next
    return ClockDaemon(testcase, root=old.root, domains=domains, clock=old.clock).start()


class CreateTests(SynchronousTestCase):
    """
    CreateVm on the clock.
    """

    def setUp(self) -> None:
        self.d = ClockDaemon(self).start().network()

    def test_create_started(self) -> None:
        """
        A created VM runs, its info.json says running, its domain runs, and its
        address is no longer free.
        """
        ip = self.d.create()
        self.assertEqual(ip, "10.5.0.2")
        self.assertEqual(self.d.state(ip), State.RUNNING)
        self.assertEqual(self.d.stored_state(ip), "running")
        self.assertTrue(self.d.running_domain(ip))
        self.assertNotIn(ip, self.d.free_ips())
        self.assertEqual(self.d.manager.check_invariants(), [])

    def test_create_do_not_start(self) -> None:
        """
        With DoNotStart the VM is stopped and no domain was created.
        """
        ip = self.d.create(DoNotStart=True)
        self.assertEqual(self.d.state(ip), State.STOPPED)
        self.assertEqual(self.d.stored_state(ip), "stopped")
        self.assertEqual(self.d.domains.created, 0)

    def test_bridges_read_again_when_old_or_lacking(self) -> None:
        """
        The bridges read for one create serve the next ones for a second; a create
        whose subnet they lack (a bridge made meanwhile) reads them again at once.
        """
        reads: list[dict[str, int]] = []
        bridges: dict[str, int] = {}

        def read() -> dict[str, int]:
            reads.append(dict(bridges))
            return dict(bridges)

        d = ClockDaemon(self, bridges=read).start().network()
        e = self.assertRaises(HypervisorError, d.create, DoNotStart=True)
        self.assertIn("no bridge", str(e).lower())
        bridges["br0"] = 0
        d.create(DoNotStart=True)
        d.create(DoNotStart=True)  # (stopped VMs: starting one reads them too)
        self.assertEqual(reads, [{}, {"br0": 0}])  # the second create read nothing
        d.clock.advance(Creator.BRIDGES_FRESH)
        d.create(DoNotStart=True)
        self.assertEqual(len(reads), 3)

    def test_out_of_descriptors_at_the_first_file_leaves_nothing(self) -> None:
        """
        A create whose first file cannot be opened (EMFILE) leaves no VM directory
        behind, although the directory cannot be listed either then: an empty one is
        removed without listing it. The address is free again.
        """
        vms = os.path.join(self.d.root, "state", "VMs")
        free = self.d.free_ips()

        def no_descriptor(*args: Any) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        writer = self.d.manager.ctx.writer
        real_write = writer.write_file

        def write_file(path: str, data: Optional[bytes], mode: int) -> None:
            if data is not None:  # a removal opens nothing when the file is missing
                no_descriptor()
            real_write(path, data, mode)

        self.patch(writer, "write_file", write_file)
        real_listdir = os.listdir

        def listdir(path: Any = ".") -> list[str]:
            if str(path).startswith(vms + "/"):
                no_descriptor()
            return real_listdir(path)

        self.patch(os, "listdir", listdir)
        e = self.assertRaises(OSError, self.d.create)
        self.assertEqual(e.errno, errno.EMFILE)
        self.d.settle()
        self.assertEqual(real_listdir(vms), [])
        self.assertEqual(self.d.manager.vms, {})
        self.assertEqual(self.d.free_ips(), free)

    def test_progress_and_final(self) -> None:
        """
        Progress messages come before the final response, which carries the IP.
        """
        messages: list[Any] = []
        response = fired(self.d.api.CreateVm(ALICE, self.d.request(), messages.append))
        self.assertTrue(response.Final)
        self.assertEqual(response.IpAddress, "10.5.0.2")
        self.assertTrue(messages)
        self.assertTrue(all(not m.Final and m.ProgressMessage for m in messages))

    def test_start_failure_in_libvirt_leaves_nothing(self) -> None:
        """
        A creation whose domain fails to start is refused (409) and leaves no VM, no
        files, no volume directory, and its address back in the pool.
        """
        self.d.domains.fail_create = RuntimeError("qemu: cannot allocate memory")
        error = fired(self.d.api.CreateVm(ALICE, self.d.request()))
        self.assertIsInstance(error, WrongState)
        self.assertIn("cannot allocate memory", str(error))
        self.d.settle()
        self.assertEqual(self.d.manager.vms, {})
        self.assertEqual(os.listdir(os.path.join(self.d.root, "state", "VMs")), [])
        self.assertEqual(os.listdir(self.d.volumes), [])
        self.assertEqual(self.d.free_ips(), ["10.5.0.2", "10.5.0.3", "10.5.0.4"])
        self.assertEqual(self.d.domains.domains, {})
        self.assertEqual(self.d.manager.check_invariants(), [])

    def test_disconnect_during_create_start_is_cleaned_after_reconnect(self) -> None:
        """
        If libvirt goes away while the new VM's domain starts, whether it runs is
        unknown: the creation fails with 503, and once libvirt is back the VM is
        removed (still marked creating) and its address freed.
        """
        self.d.domains.fail_create = NotConnected("libvirtd went away")
        error = fired(self.d.api.CreateVm(ALICE, self.d.request()))
        self.assertIsInstance(error, NotConnected)
        self.assertEqual(error.status, 503)
        self.assertEqual(self.d.pending("10.5.0.2"), {"Phase": "creating"})
        self.d.domains.lose_connection()
        self.d.domains.reconnect()
        self.d.settle()
        self.assertEqual(self.d.manager.vms, {})
        self.assertFalse(os.path.exists(self.d.vm_dir("10.5.0.2")))
        self.assertEqual(self.d.free_ips(), ["10.5.0.2", "10.5.0.3", "10.5.0.4"])
        self.assertEqual(self.d.manager.check_invariants(), [])


class LifecycleTests(SynchronousTestCase):
    """
    StartVm, StopVm, DestroyVm and libvirt's events.
    """

    def setUp(self) -> None:
        self.d = ClockDaemon(self).start().network()
        self.api = self.d.api

    def test_stop_start_destroy(self) -> None:
        """
        StopVm waits for the guest's power-off and records stopped; StartVm starts a
        new domain; DestroyVm forces it off and removes the VM, its files and volumes,
        and frees its address.
        """
        ip = self.d.create()
        d = self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        self.assertIs(fired(d), UNFIRED)  # the guest powers off on the next event
        self.assertEqual(self.d.state(ip), State.STOPPING)
        self.d.settle()
        self.assertEqual(fired(d).Error, "")
        self.assertEqual(self.d.state(ip), State.STOPPED)
        self.assertEqual(self.d.stored_state(ip), "stopped")
        self.assertFalse(self.d.running_domain(ip))

        self.assertEqual(
            fired(self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))).DhcpTimedOut, False
        )
        self.d.settle()
        self.assertEqual(self.d.state(ip), State.RUNNING)
        self.assertTrue(self.d.running_domain(ip))
        self.assertEqual(self.d.domains.created, 2)

        d = self.api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
        self.d.settle()
        self.assertEqual(fired(d).Error, "")
        self.assertNotIn(ip, self.d.manager.vms)
        self.assertFalse(self.d.running_domain(ip))
        self.assertFalse(os.path.exists(self.d.vm_dir(ip)))
        self.assertEqual(os.listdir(self.d.volumes), [])
        self.assertIn(ip, self.d.free_ips())
        self.assertEqual(self.d.manager.check_invariants(), [])

    def test_stop_forced_after_timeout(self) -> None:
        """
        A guest that ignores the ACPI power-down is forced off after the stop timeout.
        """
        ip = self.d.create()
        self.d.domains.ignore_shutdown = True
        d = self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        self.d.settle()
        self.assertIs(fired(d), UNFIRED)
        self.assertTrue(self.d.running_domain(ip))
        self.d.clock.advance(2.0)
        self.d.settle()
        self.assertEqual(fired(d).Error, "")
        self.assertEqual(self.d.state(ip), State.STOPPED)
        self.assertFalse(self.d.running_domain(ip))

    def test_guest_power_off(self) -> None:
        """
        A guest powering itself off is recorded stopped (memory and disk).
        """
        ip = self.d.create()
        self.d.domains.power_off(f"vm-{ip}")
        self.d.settle()
        self.assertEqual(self.d.state(ip), State.STOPPED)
        self.assertEqual(self.d.stored_state(ip), "stopped")

    def test_guest_crash(self) -> None:
        """
        A domain stopping for another reason (a crash) is recorded crashed; the VM
        can be started again.
        """
        ip = self.d.create()
        self.d.domains.power_off(f"vm-{ip}", crashed=True)
        self.d.settle()
        self.assertEqual(self.d.state(ip), State.CRASHED)
        self.assertEqual(self.d.stored_state(ip), "crashed")
        fired(self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip)))
        self.assertEqual(self.d.state(ip), State.RUNNING)

    def test_destroy_on_powerdown(self) -> None:
        """
        A VM with DestroyOnPowerdown that powers itself off is removed.
        """
        ip = self.d.create(DestroyOnPowerdown=True)
        self.d.domains.power_off(f"vm-{ip}")
        self.d.settle()
        self.assertNotIn(ip, self.d.manager.vms)
        self.assertFalse(os.path.exists(self.d.vm_dir(ip)))
        self.assertIn(ip, self.d.free_ips())

    def test_event_of_older_domain_ignored(self) -> None:
        """
        A stop event of an older domain of the VM (a late event after a restart of
        the VM) leaves the running VM alone.
        """
        ip = self.d.create()
        old_uuid = self.d.manager.vms[ip].domain_uuid
        d = self.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        self.d.settle()
        fired(d)
        fired(self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip)))
        self.d.settle()
        self.assertNotEqual(self.d.manager.vms[ip].domain_uuid, old_uuid)
        self.d.manager.domain_lifecycle(f"vm-{ip}", old_uuid, 5, 0)
        self.d.settle()
        self.assertEqual(self.d.state(ip), State.RUNNING)
        self.d.manager.domain_lifecycle(f"vm-{ip}", old_uuid, 5, 2)
        self.d.settle()
        self.assertEqual(self.d.state(ip), State.RUNNING)

    def test_event_during_start_of_new_vm(self) -> None:
        """
        A guest that powers off while StartVm still holds the VM's lock (libvirt's
        create has not answered yet) ends stopped, not running.
        """
        domains = ControlledDomains(self.d.clock)
        self.d = ClockDaemon(self, domains=domains, clock=self.d.clock).start().network()
        ip = self.d.create(DoNotStart=True)
        domains.hold = True
        d = self.d.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        self.assertEqual(self.d.state(ip), State.STARTING)
        domains.power_off(f"vm-{ip}")
        self.d.settle()  # the event arrives while the start holds the lock
        domains.finish_create()
        self.d.settle()
        self.assertEqual(fired(d).Error, "")
        self.assertEqual(self.d.state(ip), State.STOPPED)
        self.assertEqual(self.d.stored_state(ip), "stopped")

    def test_event_during_restart_of_vm(self) -> None:
        """
        Likewise for a VM that ran before (its previous domain's UUID is known): the
        new domain's stop event, arriving before libvirt's create answered, is not
        mistaken for an older domain's; the VM ends stopped.
        """
        domains = ControlledDomains(self.d.clock)
        self.d = ClockDaemon(self, domains=domains, clock=self.d.clock).start().network()
        ip = self.d.create()
        d = self.d.api.StopVm(ALICE, AccessRequest(IpAddress=ip))
        self.d.settle()
        self.assertEqual(fired(d).Error, "")
        domains.hold = True
        d = self.d.api.StartVm(ALICE, StartVmRequest(IpAddress=ip))
        domains.power_off(f"vm-{ip}")
        self.d.settle()
        domains.finish_create()
        self.d.settle()
        self.assertEqual(fired(d).Error, "")
        self.assertFalse(self.d.running_domain(ip))
        self.assertEqual(self.d.state(ip), State.STOPPED)
        self.assertEqual(self.d.stored_state(ip), "stopped")

    def test_libvirt_down_refuses_and_changes_nothing(self) -> None:
        """
        While libvirt is not connected, StartVm, StopVm, DestroyVm and CreateVm fail
        with NotConnected (503) and the VMs' states, files and the pool are unchanged.
        """
        running = self.d.create()
        stopped = self.d.create(DoNotStart=True)
        before = {ip: self.d.snapshot(ip) for ip in (running, stopped)}
        free = self.d.free_ips()
        self.d.domains.lose_connection()
        self.d.settle()
        calls = [
            self.api.StartVm(ALICE, StartVmRequest(IpAddress=stopped)),
            self.api.StopVm(ALICE, AccessRequest(IpAddress=running)),
            self.api.DestroyVm(ALICE, AccessRequest(IpAddress=running)),
            self.api.DestroyVm(ALICE, AccessRequest(IpAddress=stopped)),
            self.api.CreateVm(ALICE, self.d.request()),
        ]
        self.d.settle()
        for d in calls:
            error = fired(d)
            self.assertIsInstance(error, NotConnected)
            self.assertEqual(error.status, 503)
            self.assertIn("nothing was changed", str(error))
        self.assertEqual(self.d.state(running), State.RUNNING)
        self.assertEqual(self.d.state(stopped), State.STOPPED)
        self.assertEqual({ip: self.d.snapshot(ip) for ip in (running, stopped)}, before)
        self.assertEqual(self.d.free_ips(), free)
        self.assertTrue(self.d.running_domain(running))

    def test_libvirt_lost_during_start(self) -> None:
        """
        A StartVm whose libvirt call finds libvirtd gone fails with 503 and leaves the
        VM in its previous state (not "failed to start").
        """
        ip = self.d.create(DoNotStart=True)
        self.d.domains.fail_create = NotConnected("libvirtd went away")
        error = fired(self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip)))
        self.assertIsInstance(error, NotConnected)
        self.assertEqual(self.d.state(ip), State.STOPPED)
        self.assertEqual(self.d.stored_state(ip), "stopped")

    def test_start_failure_in_libvirt(self) -> None:
        """
        A StartVm that libvirt refuses records "failed to start" (409).
        """
        ip = self.d.create(DoNotStart=True)
        self.d.domains.fail_create = RuntimeError("no such bridge")
        error = fired(self.api.StartVm(ALICE, StartVmRequest(IpAddress=ip)))
        self.assertIsInstance(error, WrongState)
        self.assertEqual(self.d.state(ip), State.FAILED_TO_START)
        self.assertEqual(self.d.stored_state(ip), "failed to start")

    def test_other_users_refused(self) -> None:
        """
        Someone who does not own the VM cannot stop it (403), and nothing changes.
        """
        ip = self.d.create()
        error = fired(self.api.StopVm(BOB, AccessRequest(IpAddress=ip)))
        self.assertIsInstance(error, HypervisorError)
        self.assertEqual(error.status, 403)
        self.assertEqual(self.d.state(ip), State.RUNNING)


class AcknowledgementTests(SynchronousTestCase):
    """
    pending.json, AcknowledgeVm and the acknowledgement deadline, across restarts.
    """

    def setUp(self) -> None:
        self.d = ClockDaemon(self).start().network()

    def test_pending_until_acknowledged(self) -> None:
        """
        After CreateVm, pending.json says "acknowledge" with the deadline;
        AcknowledgeVm removes it and the VM outlives the timeout.
        """
        ip = self.d.create(acknowledge=False)
        self.assertEqual(
            self.d.pending(ip), {"Phase": "acknowledge", "Deadline": START + ACK_TIMEOUT}
        )
        self.d.clock.advance(ACK_TIMEOUT - 1)
        self.assertEqual(fired(self.d.api.AcknowledgeVm(ALICE, IpRequest(ip))).Error, "")
        self.assertIsNone(self.d.pending(ip))
        self.d.clock.advance(ACK_TIMEOUT * 2)
        self.d.settle()
        self.assertEqual(self.d.state(ip), State.RUNNING)

    def test_unacknowledged_destroyed(self) -> None:
        """
        A VM not acknowledged within the timeout is destroyed: domain off, files
        gone, address free.
        """
        ip = self.d.create(acknowledge=False)
        self.d.clock.advance(ACK_TIMEOUT - 0.5)
        self.d.settle()
        self.assertIn(ip, self.d.manager.vms)
        self.d.clock.advance(0.5)
        self.d.settle()
        self.assertNotIn(ip, self.d.manager.vms)
        self.assertFalse(self.d.running_domain(ip))
        self.assertFalse(os.path.exists(self.d.vm_dir(ip)))
        self.assertIn(ip, self.d.free_ips())

    def test_restart_rearms_the_timer(self) -> None:
        """
        A VM still awaiting its acknowledgement when the daemon stops gets the whole
        timeout again after the restart, then is destroyed unless acknowledged.
        """
        ip = self.d.create(acknowledge=False)
        d2 = after_restart(self, self.d, advance=ACK_TIMEOUT * 3)
        self.assertEqual(d2.state(ip), State.RUNNING)
        d2.clock.advance(ACK_TIMEOUT - 1)
        d2.settle()
        self.assertIn(ip, d2.manager.vms)
        d2.clock.advance(1)
        d2.settle()
        self.assertNotIn(ip, d2.manager.vms)
        self.assertFalse(d2.running_domain(ip))
        self.assertIn(ip, d2.free_ips())

    def test_restart_then_acknowledge(self) -> None:
        """
        After a restart the VM can still be acknowledged, which keeps it.
        """
        ip = self.d.create(acknowledge=False)
        d2 = after_restart(self, self.d)
        self.assertEqual(fired(d2.api.AcknowledgeVm(ALICE, IpRequest(ip))).Error, "")
        d2.clock.advance(ACK_TIMEOUT * 2)
        d2.settle()
        self.assertEqual(d2.state(ip), State.RUNNING)
        self.assertIsNone(d2.pending(ip))

    def test_reconciliation_during_a_creation_leaves_it_alone(self) -> None:
        """
        A reconciliation (libvirt reconnected, or the first one at start on a busy
        host) that runs while a CreateVm waits for its DHCP acknowledgement neither
        removes the VM (its pending.json still says "creating") nor starts its
        domain a second time: the creation finishes, with one domain.
        """
        self.d.manager.ctx.acks = DhcpAcknowledgements(self.d.clock, serving=True)
        d = self.d.api.CreateVm(ALICE, self.d.request(DhcpTimeout=5.0))
        self.d.settle()
        self.assertIs(fired(d), UNFIRED)
        ip = "10.5.0.2"
        self.assertTrue(self.d.running_domain(ip))
        self.assertEqual(self.d.pending(ip), {"Phase": "creating"})
        started = self.d.domains.created
        self.d.manager.libvirt_connected()  # reconciles
        self.d.settle()
        self.assertIn(ip, self.d.manager.vms)
        self.assertEqual(self.d.domains.created, started)
        self.d.clock.advance(5.0)
        self.d.settle()
        response = fired(d)
        self.assertFalse(isinstance(response, BaseException), response)
        self.assertTrue(response.DhcpTimedOut)
        self.assertEqual(response.IpAddress, ip)
        self.assertEqual(self.d.state(ip), State.RUNNING)
        self.assertTrue(self.d.running_domain(ip))
        self.assertEqual(self.d.manager.check_invariants(), [])

    def test_restart_removes_unfinished_creation(self) -> None:
        """
        A VM whose pending.json says "creating" at start (the daemon died before the
        client got its address) is removed: its domain forced off first, its files,
        and its address back to the pool.
        """
        ip = self.d.create(acknowledge=False)
        keep = self.d.create()
        with open(os.path.join(self.d.vm_dir(ip), "pending.json"), "w") as f:
            json.dump({"Phase": "creating"}, f)
        d2 = after_restart(self, self.d)
        self.assertNotIn(ip, d2.manager.vms)
        self.assertFalse(d2.running_domain(ip))
        self.assertFalse(os.path.exists(d2.vm_dir(ip)))
        self.assertFalse(os.path.exists(os.path.join(d2.volumes, ip)))
        self.assertIn(ip, d2.free_ips())
        self.assertEqual(d2.state(keep), State.RUNNING)
        self.assertTrue(d2.running_domain(keep))
        self.assertEqual(d2.manager.check_invariants(), [])

    def test_restart_adopts_running_domains(self) -> None:
        """
        A restart leaves running VMs running (their domains are adopted, not
        started again).
        """
        ip = self.d.create()
        d2 = after_restart(self, self.d)
        self.assertEqual(d2.state(ip), State.RUNNING)
        self.assertEqual(d2.domains.created, 0)
        self.assertTrue(d2.running_domain(ip))


class HoldingRunner(SynchronousRunner):
    """
    A synchronous runner that holds the state write it is told to (a path's
    removal) until the test releases it, as a busy disk thread would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hold_removal_of = ""
        self.held: list[tuple[Deferred[Any], Any]] = []

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if (
            self.hold_removal_of
            and len(args) == 3
            and args[1] is None
            and str(args[0]).endswith(self.hold_removal_of)
        ):
            self.hold_removal_of = ""
            later: Deferred[Any] = Deferred()
            self.held.append((later, lambda: super(HoldingRunner, self).run(fn, *args, **kwargs)))
            return later
        return super().run(fn, *args, **kwargs)

    def release(self) -> None:
        later, run = self.held.pop(0)
        run().chainDeferred(later)


class AcknowledgementRaceTests(SynchronousTestCase):
    """
    AcknowledgeVm and the deadline meeting.
    """

    def test_acknowledge_at_the_deadline(self) -> None:
        """
        An AcknowledgeVm whose removal of pending.json is still on the disk thread
        when the deadline passes either keeps the VM or fails: it never answers
        success for a VM that is then destroyed.
        """
        runner = HoldingRunner()
        d = ClockDaemon(self, runner=runner).start().network()
        ip = d.create(acknowledge=False)
        runner.hold_removal_of = "pending.json"
        acknowledged = d.api.AcknowledgeVm(ALICE, IpRequest(ip))
        self.assertIs(fired(acknowledged), UNFIRED)
        d.clock.advance(ACK_TIMEOUT)
        d.settle()
        runner.release()
        d.settle()
        result = fired(acknowledged)
        if isinstance(result, BaseException):
            self.assertNotIn(ip, d.manager.vms)
        else:
            self.assertEqual(result.Error, "")
            self.assertIn(ip, d.manager.vms)
            self.assertEqual(d.state(ip), State.RUNNING)
            self.assertTrue(d.running_domain(ip))
