"""
Fault injection at every state write (issue 8): a create/start/stop/destroy/change
sequence is run through L{hypervisor.api.HypervisorApi} on a C{Clock} with a
synchronous disk runner and L{hypervisor.testing.FakeDomains}, with the Nth write of a
state file failing (EIO or ENOSPC; once, or for several writes in a row), for every N
up to the number of writes the sequence makes. After each run the daemon is
"restarted" (a new manager over the same state directory and the same domains, which
survive a daemon restart) and reconciled, and the invariants of DESIGN.md's "What must
never happen" are checked: no running domain without a VM that should run, no address
both free and held or held twice, nothing left on disk without a VM, C{check-vms}
clean, no acknowledged VM lost, no acknowledged change lost.

The subnet and the address pool are set up through the API inside the sequence, so
their writes are counted (and failed) too.

Set C{HYPERVISOR_FAULT_TABLE=1} to print the table of runs (N, the file whose write
failed, the step and what it answered, invariants).
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT
from hypervisor.errors import HypervisorError
from hypervisor.manager import volumes
from hypervisor.manager.manager import Manager
from hypervisor.manager.vm import SHOULD_RUN
from hypervisor.model import (
    AccessRequest,
    Address,
    ChangeAddressPoolRequest,
    ChangeVmHostnameRequest,
    ChangeVmSizeRequest,
    ChangeVmTagsRequest,
    CreateVmRequest,
    IpRequest,
    SetDisabledStateRequest,
    StartVmRequest,
    Subnet,
    UpdateSubnetsRequest,
    VmInfo,
)
from hypervisor.store import StateDirectory
from hypervisor.testing import FailingWrites, FakeDomains, FakeHost, SynchronousRunner
from hypervisor.virt.domainxml import ip_from_domain_name

MiB = 1024 * 1024
A, B, C = "10.9.0.2", "10.9.0.3", "10.9.0.4"
ADDRESSES = [Address(f"10.9.0.{i}", f"52:54:0a:09:00:{i:02x}") for i in range(2, 6)]
SETTLE_SECONDS = 60


class FailingRun(FailingWrites):
    """
    L{FailingWrites} whose fault lasts: writes C{fail_at} .. C{fail_at + length - 1}
    fail (a disk that is full for a while).
    """

    def __init__(self, fail_at: int, length: int, error: int) -> None:
        super().__init__(fail_at=fail_at, error=error)
        self.length = length

    def __call__(self, path: str, data: Optional[bytes], mode: int) -> None:
        assert self.fail_at is not None
        self.failing = self.fail_at <= self.count + 1 < self.fail_at + self.length
        try:
            super().__call__(path, data, mode)
        finally:
            self.failing = False


def create_request(ip: str, start: bool) -> CreateVmRequest:
    """
    A small VM with an empty root volume at C{ip}.
    """
    return CreateVmRequest(
        VmInfo=VmInfo(Address=Address(IpAddress=ip), MemoryInMiB=64, MilliCPUs=100, SubnetId="net"),
        MinimumFreeBytes=MiB,
        DoNotStart=not start,
    )


def sequence(api: HypervisorApi, fake: FakeDomains) -> list[tuple[str, Callable[[], Any]]]:
    """
    The steps: (label, call). A call may return a Deferred.
    """

    def power_off(ip: str) -> Callable[[], None]:
        return lambda: fake.power_off(f"vm-{ip}")

    return [
        (
            "UpdateSubnets",
            lambda: api.UpdateSubnets(
                ROOT,
                UpdateSubnetsRequest(
                    Add=[Subnet(Id="net", IpGateway="10.9.0.1", IpMask="255.255.255.0")]
                ),
            ),
        ),
        (
            "ChangeAddressPool",
            lambda: api.ChangeAddressPool(
                ROOT, ChangeAddressPoolRequest(AddressesToAdd=list(ADDRESSES))
            ),
        ),
        ("CreateVm A", lambda: api.CreateVm(ROOT, create_request(A, start=True))),
        ("AcknowledgeVm A", lambda: api.AcknowledgeVm(ROOT, IpRequest(A))),
        ("CreateVm B DoNotStart", lambda: api.CreateVm(ROOT, create_request(B, start=False))),
        ("AcknowledgeVm B", lambda: api.AcknowledgeVm(ROOT, IpRequest(B))),
        ("StartVm B", lambda: api.StartVm(ROOT, StartVmRequest(IpAddress=B))),
        (
            "ChangeVmTags A",
            lambda: api.ChangeVmTags(ROOT, ChangeVmTagsRequest(IpAddress=A, Tags={"Name": "a"})),
        ),
        ("StopVm A", lambda: api.StopVm(ROOT, AccessRequest(IpAddress=A))),
        (
            "ChangeVmSize A",
            lambda: api.ChangeVmSize(ROOT, ChangeVmSizeRequest(IpAddress=A, MemoryInMiB=96)),
        ),
        (
            "ChangeVmHostname B",
            lambda: api.ChangeVmHostname(
                ROOT, ChangeVmHostnameRequest(IpAddress=B, Hostname="bee")
            ),
        ),
        ("guest B powers off", power_off(B)),
        ("StartVm B again", lambda: api.StartVm(ROOT, StartVmRequest(IpAddress=B))),
        (
            "SetDisabledState on",
            lambda: api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=True)),
        ),
        (
            "SetDisabledState off",
            lambda: api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=False)),
        ),
        ("DestroyVm A", lambda: api.DestroyVm(ROOT, AccessRequest(IpAddress=A))),
        (
            "CreateVm C (never acknowledged)",
            lambda: api.CreateVm(ROOT, create_request(C, start=True)),
        ),
        ("guest B crashes", lambda: fake.power_off(f"vm-{B}", crashed=True)),
        ("StartVm B after crash", lambda: api.StartVm(ROOT, StartVmRequest(IpAddress=B))),
    ]


def answer_of(failure: Optional[Failure]) -> str:
    """
    What the RPC answered, as a transport would (status: sentence).
    """
    if failure is None:
        return "200"
    e = failure.value
    if isinstance(e, HypervisorError):
        status = e.status
    elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        status = 507
    else:
        status = 500
    message = str(e).split(":")[0][:48]
    return f"{status} {type(e).__name__} ({message})"


@dataclass
class Row:
    """
    One run: the fault, where it hit, what the step answered, broken invariants.
    """

    mode: str
    n: int
    failed: list[str] = field(default_factory=list)
    step: str = ""
    answer: str = ""
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        files = ", ".join(sorted({os.path.basename(p) for p in self.failed})) or "-"
        ok = "OK" if not self.problems else "BROKEN: " + "; ".join(self.problems)
        return (
            f"{self.mode:<10} {self.n:>3}  {files:<32} {self.step:<32} " f"{self.answer:<52} {ok}"
        )


class Fixture:
    """
    One state directory, volume directory and fake libvirt; managers built over them.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.state_path = os.path.join(root, "state")
        self.volumes = os.path.join(root, "volumes")
        os.makedirs(self.volumes)
        self.clock = Clock()
        self.fake = FakeDomains(self.clock)

    def manager(self, write_file: Optional[Callable[..., None]] = None) -> Manager:
        """
        A started manager (not yet reconciled).
        """
        manager = Manager(
            StateDirectory(self.state_path),
            None,
            self.clock,
            domain_type="qemu",
            volume_directories=[self.volumes],
            host=FakeHost(storage=(64 << 30, 32 << 30)),
            bridges=lambda: {"br0": 0},
            runner=SynchronousRunner(),
            domains=self.fake,
            write_file=write_file,
        )
        manager.privilegedStartService()
        manager.startService()
        return manager

    def settle(self, d: "Deferred[Any]", limit: float = SETTLE_SECONDS) -> None:
        """
        Advance the clock (events, timers, retries) until C{d} fired.
        """
        self.clock.advance(0)
        waited = 0.0
        while not d.called and waited < limit:
            self.clock.advance(0.5)
            waited += 0.5

    def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass in small steps.
        """
        for _ in range(int(seconds * 2)):
            self.clock.advance(0.5)

    def stop(self, manager: Manager) -> None:
        """
        Stop a manager as the daemon stops (VMs keep running) and detach it from the
        domains (its process is gone).
        """
        d = manager.stopService()
        self.settle(d)
        if manager in self.fake.listeners:
            self.fake.listeners.remove(manager)

    def crash(self, manager: Manager) -> None:
        """
        The daemon dies at once (kill -9): nothing more of it runs (its timers and
        retries were on a clock that is dropped), its lock is gone; libvirt keeps the
        domains.
        """
        manager.state.unlock()
        if manager in self.fake.listeners:
            self.fake.listeners.remove(manager)
        self.clock = Clock()
        self.fake.reactor = self.clock


def run(
    root: str, writer: Optional[FailingWrites], mode: str, n: int, crash: bool = False
) -> tuple[Row, int]:
    """
    Run the sequence with C{writer}'s faults, restart, reconcile and check.

    @param crash: the daemon dies right after the last step (no retries, timers or
        clean stop) instead of stopping after everything settled.

    @return: the row and the number of writes the sequence made.
    """
    fx = Fixture(root)
    row = Row(mode, n)
    manager = fx.manager(writer)
    api = HypervisorApi(manager)
    fx.fake.reconnect()
    fx.clock.advance(0)
    must_exist: set[str] = set()
    must_not_exist: set[str] = set()
    created: dict[str, bool] = {}
    promised: dict[str, dict[str, Any]] = {}
    steps: list[tuple[str, int, int, str]] = []
    for label, call in sequence(api, fx.fake):
        before = writer.count if writer is not None else 0
        outcome: list[Optional[Failure]] = []
        d = maybeDeferred(call)
        d.addCallbacks(lambda _: outcome.append(None), outcome.append)
        fx.settle(d)
        failure = outcome[0] if outcome else Failure(AssertionError("never answered"))
        steps.append((label, before, writer.count if writer is not None else 0, answer_of(failure)))
        ok = failure is None
        ip = {"A": A, "B": B, "C": C}.get((label.split() + [""])[1], "")
        if label.startswith("CreateVm"):
            created[ip] = ok
        elif label.startswith("AcknowledgeVm") and ok and created.get(ip):
            must_exist.add(ip)
        elif label.startswith("DestroyVm"):
            must_exist.discard(ip)
            if ok:
                must_not_exist.add(ip)
        elif ok and label.startswith("ChangeVmTags"):
            promised.setdefault(ip, {})["Tags"] = {"Name": "a"}
        elif ok and label.startswith("ChangeVmSize"):
            promised.setdefault(ip, {})["MemoryInMiB"] = 96
        elif ok and label.startswith("ChangeVmHostname"):
            promised.setdefault(ip, {})["Hostname"] = "bee"
        if failure is not None and not failure.check(HypervisorError, OSError):
            row.problems.append(f"{label} failed unexpectedly: {failure.value!r}")
    if writer is not None and writer.fail_at is not None:
        row.step, row.answer = "(timers, retries)", "-"
        for label, before, after, answer in steps:
            if before < writer.fail_at <= after:
                row.step, row.answer = label, answer
    if not crash:
        fx.advance(SETTLE_SECONDS)
    writes = writer.count if writer is not None else manager.writer.writes
    if writer is not None:
        row.failed = list(writer.failed)
    if crash:
        fx.crash(manager)
    else:
        fx.stop(manager)
    # Restart: a new daemon over the same state directory; libvirt kept its domains.
    manager = fx.manager()
    fx.fake.reconnect()
    fx.advance(SETTLE_SECONDS)
    row.problems += check(fx, manager, must_exist, must_not_exist, promised)
    fx.stop(manager)
    out = io.StringIO()
    if volumes.check_command(StateDirectory(fx.state_path), out=out) != 0:
        row.problems.append("check-vms: " + " | ".join(out.getvalue().splitlines()))
    return row, writes


def check(
    fx: Fixture,
    manager: Manager,
    must_exist: set[str],
    must_not_exist: set[str],
    promised: dict[str, dict[str, Any]],
) -> list[str]:
    """
    The invariants after a restart and reconciliation, as sentences (empty = all hold).
    """
    problems = []
    vms = manager.vms
    for name in sorted(fx.fake.domains):
        ip = ip_from_domain_name(name) or ""
        vm = vms.get(ip)
        if vm is None:
            problems.append(f"domain {name} runs but its VM is unknown")
        elif vm.info.State not in SHOULD_RUN:
            problems.append(f"domain {name} runs but its VM is {vm.info.State.value}")
    for ip, vm in vms.items():
        if vm.info.State in SHOULD_RUN and f"vm-{ip}" not in fx.fake.domains:
            problems.append(f"VM {ip} is {vm.info.State.value} but no domain runs")
    held: dict[str, str] = {}
    for ip, vm in vms.items():
        for address in [vm.info.Address] + list(vm.info.SecondaryAddresses):
            for key in (address.IpAddress, address.MacAddress):
                if key and key in held:
                    problems.append(f"{key} is held by VMs {held[key]} and {ip}")
                held[key] = ip
    for address in manager.pool.free:
        if address.IpAddress in held or address.MacAddress in held:
            problems.append(
                f"{address.IpAddress} is free but VM "
                f"{held.get(address.IpAddress) or held.get(address.MacAddress)}"
                " holds it"
            )
    free_macs = {a.MacAddress for a in manager.pool.free}
    for address in manager.pool.registered:
        if address.MacAddress not in free_macs and address.MacAddress not in held:
            problems.append(f"registered {address.IpAddress} is neither free nor held")
    problems += [f"pool: {p}" for p in manager.check_invariants()]
    vms_path = manager.state.vms_path
    for name in sorted(os.listdir(vms_path)) if os.path.isdir(vms_path) else []:
        if name not in vms:
            problems.append(
                f"VMs/{name} is left without a VM "
                f"({', '.join(sorted(os.listdir(os.path.join(vms_path, name))))})"
            )
    for name in sorted(os.listdir(fx.volumes)):
        if name not in vms:
            problems.append(f"volume directory {name} is left without a VM")
    for ip in sorted(must_exist):
        if ip not in vms:
            problems.append(f"VM {ip} was acknowledged but is lost")
    for ip in sorted(must_not_exist):
        if ip in vms:
            problems.append(f"VM {ip} was destroyed (answered OK) but exists")
    for ip, fields in sorted(promised.items()):
        vm = vms.get(ip)
        if vm is None:
            continue
        for name, value in fields.items():
            if getattr(vm.info, name) != value:
                problems.append(
                    f"VM {ip}: {name} was changed to {value!r} (answered OK) "
                    f"but is {getattr(vm.info, name)!r} after the restart"
                )
    return problems


class FaultInjectionTests(SynchronousTestCase):
    """
    The sequence under every injected write failure.
    """

    def setUp(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.base = tempfile.mkdtemp(prefix="hv-faults-", dir=base)
        self.addCleanup(shutil.rmtree, self.base, True)
        self.runs = 0

    def root(self) -> str:
        self.runs += 1
        return os.path.join(self.base, str(self.runs))

    def count_writes(self, crash: bool = False) -> int:
        writer = FailingWrites(fail_at=None)
        row, writes = run(self.root(), writer, "none", 0, crash)
        self.assertEqual(row.problems, [])
        return writes

    def sweep(self, mode: str, make: Callable[[int], FailingWrites], crash: bool = False) -> None:
        writes = self.count_writes(crash)
        self.assertGreater(writes, 20)
        rows = []
        for n in range(1, writes + 1):
            row, _ = run(self.root(), make(n), mode, n, crash)
            rows.append(row)
        # Failures the manager logs (the injected OSErrors, with their tracebacks)
        # are expected; anything else logged is a bug.
        unexpected = [f for f in self.flushLoggedErrors() if not f.check(OSError)]
        table = "\n".join(row.line() for row in rows)
        if os.environ.get("HYPERVISOR_FAULT_TABLE"):
            print(f"\n{mode}: {writes} writes in the sequence\n{table}")
        broken = [row for row in rows if row.problems]
        self.assertEqual(
            broken, [], "invariants broken:\n" + "\n".join(row.line() for row in broken)
        )
        self.assertEqual(unexpected, [])
        self.assertTrue(all(row.failed for row in rows), "some runs injected no fault:\n" + table)

    def test_no_fault(self) -> None:
        """
        Without faults every step answers OK, the invariants hold after a restart,
        and the acknowledged VM B survives while A (destroyed) and C (never
        acknowledged) are gone.
        """
        fx_root = self.root()
        writer = FailingWrites(fail_at=None)
        row, writes = run(fx_root, writer, "none", 0)
        self.assertEqual(row.problems, [])
        self.assertEqual(writer.failed, [])
        self.assertEqual(sorted(os.listdir(os.path.join(fx_root, "state", "VMs"))), [B])

    def test_checks_find_violations(self) -> None:
        """
        The invariant checks are not vacuous: a domain without a VM, a held address
        in the free list, a VM directory and a volume directory without a VM, and a
        lost acknowledged VM are each reported.
        """
        fx = Fixture(self.root())
        manager = fx.manager()
        api = HypervisorApi(manager)
        fx.fake.reconnect()
        for label, call in sequence(api, fx.fake)[:4]:
            d = maybeDeferred(call)
            fx.settle(d)
            self.successResultOf(d)
        fx.fake.domains["vm-10.9.0.9"] = "uuid-9"
        manager.pool.free.append(manager.vms[A].info.Address)
        os.makedirs(os.path.join(manager.state.vms_path, "10.9.0.8"))
        os.makedirs(os.path.join(fx.volumes, "10.9.0.7"))
        problems = check(fx, manager, {A, "10.9.0.6"}, set(), {A: {"Hostname": "x"}})
        fx.stop(manager)
        text = "\n".join(problems)
        for expected in (
            "domain vm-10.9.0.9 runs but its VM is unknown",
            f"{A} is free but VM {A} holds it",
            "VMs/10.9.0.8 is left",
            "volume directory 10.9.0.7 is left",
            "VM 10.9.0.6 was acknowledged but is lost",
            "Hostname was changed to 'x'",
        ):
            self.assertIn(expected, text)

    def test_eio_at_each_write(self) -> None:
        """
        EIO on the Nth write, for every N: the invariants hold after the restart.
        """
        self.sweep("EIO", lambda n: FailingWrites(fail_at=n, error=errno.EIO))

    def test_enospc_at_each_write(self) -> None:
        """
        ENOSPC on the Nth write, for every N: the invariants hold after the restart.
        """
        self.sweep("ENOSPC", lambda n: FailingWrites(fail_at=n, error=errno.ENOSPC))

    def test_eio_then_crash(self) -> None:
        """
        EIO on the Nth write, for every N, and the daemon killed right after the
        sequence (the failed write never retried): the invariants hold after the
        restart.
        """
        self.sweep("EIO+kill", lambda n: FailingWrites(fail_at=n, error=errno.EIO), crash=True)

    def test_fault_lasting_three_writes(self) -> None:
        """
        EIO on writes N, N+1 and N+2 (retries and undo writes fail too), for every N.
        """
        self.sweep("EIOx3", lambda n: FailingRun(n, 3, errno.EIO))

    def test_fault_lasting_eight_writes(self) -> None:
        """
        ENOSPC on eight writes in a row from N, for every N.
        """
        self.sweep("ENOSPCx8", lambda n: FailingRun(n, 8, errno.ENOSPC))
