"""
In-memory tests of the manager's state keeping: L{hypervisor.manager.state.VmTable}
(commit before believing, record then retry, indexes, leases, listeners, loading),
the bounded GetUpdates streams (L{hypervisor.manager.updates}), the DHCP
acknowledgement seam (L{hypervisor.manager.acks}) and the cached host figures
(L{hypervisor.manager.hoststats}).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import codec
from hypervisor.diskio import StateWriter
from hypervisor.errors import InsufficientCapacity, InvalidRequest, NotFound
from hypervisor.manager import hoststats
from hypervisor.manager.acks import DhcpAcknowledgements
from hypervisor.manager.hoststats import DirectoryStats, GiB, HostStats, Snapshot
from hypervisor.manager.network import Subnets
from hypervisor.manager.state import PENDING_FILE, RETRY_INTERVAL, VmTable
from hypervisor.manager.updates import UpdateHub, UpdateStream
from hypervisor.manager.vm import Vm
from hypervisor.model import Address, LocalVmInfo, State, Subnet, Update, VmInfo
from hypervisor.store import StateDirectory
from hypervisor.testing import FailingWrites, FakeHost, SynchronousRunner
from tests.test_manager_clock import UNFIRED, fired


class Listener:
    """
    An L{hypervisor.manager.state.IVmListener} that records its calls.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def vm_changed(self, info: VmInfo) -> None:
        self.calls.append(("changed", info.Address.IpAddress))

    def vm_removed(self, ip: str, info: VmInfo) -> None:
        self.calls.append(("removed", ip))

    def subnets_changed(self, subnets: list[Subnet]) -> None:
        self.calls.append(("subnets", [s.Id for s in subnets]))


def make_vm(
    directory: str,
    ip: str = "10.5.0.2",
    mac: str = "52:54:0a:05:00:02",
    secondary: Optional[list[Address]] = None,
    secondary_subnets: Optional[list[str]] = None,
    **fields: Any,
) -> Vm:
    info = VmInfo(
        Address=Address(ip, mac),
        SubnetId=fields.pop("SubnetId", "net"),
        SecondaryAddresses=secondary or [],
        SecondarySubnetIDs=secondary_subnets or [],
        State=State.RUNNING,
        MemoryInMiB=64,
        MilliCPUs=500,
        Hostname=fields.pop("Hostname", "web"),
        **fields,
    )
    path = os.path.join(directory, ip)
    os.makedirs(path, exist_ok=True)
    return Vm(LocalVmInfo(VmInfo=info), path)


class TableTestCase(SynchronousTestCase):
    """
    A L{VmTable} over a temporary state directory with a synchronous writer whose
    writes a test can make fail, on a clock.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.state = StateDirectory(self.dir)
        os.makedirs(self.state.vms_path)
        self.faults = FailingWrites()
        self.writer = StateWriter(SynchronousRunner(), self.faults)
        self.subnets = Subnets(self.state.join("subnets.json"))
        self.subnets.subnets = {
            "net": Subnet(Id="net", IpGateway="10.5.0.1", IpMask="255.255.255.0"),
            "back": Subnet(Id="back", IpGateway="10.6.0.1", IpMask="255.255.255.0"),
        }
        self.hub = UpdateHub()
        self.updates = self.hub.subscribe(Update(), "test")
        fired(self.updates.get())  # the first (full) update
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.table = VmTable(self.state, self.writer, self.subnets, self.hub, self.clock)
        self.listener = Listener()
        self.table.listeners.append(self.listener)

    def add(self, **kwargs: Any) -> Vm:
        vm = make_vm(self.state.vms_path, **kwargs)
        self.table.add(vm)
        return vm

    def stored(self, vm: Vm) -> Optional[LocalVmInfo]:
        try:
            with open(self.table.info_path(vm), "rb") as f:
                return codec.decode(LocalVmInfo, f.read(), trusted=True)
        except FileNotFoundError:
            return None

    def published(self) -> list[Update]:
        out = []
        while len(self.updates):
            out.append(fired(self.updates.get()))
        return out


class CommitTests(TableTestCase):
    """
    L{VmTable.commit}: written first, then believed; nothing changes on failure.
    """

    def test_commit_writes_then_believes(self) -> None:
        """
        A committed change is on disk and in memory, and subscribers and listeners
        are told.
        """
        vm = self.add()
        new = self.table.copy(vm)
        new.VmInfo.Tags = {"role": "db"}
        self.assertIsNone(fired(self.table.commit(vm, new)))
        self.assertEqual(vm.info.Tags, {"role": "db"})
        stored = self.stored(vm)
        assert stored is not None
        self.assertEqual(stored.VmInfo.Tags, {"role": "db"})
        self.assertEqual(self.listener.calls, [("changed", "10.5.0.2")])
        [update] = self.published()
        self.assertEqual(update.VMs["10.5.0.2"].Tags, {"role": "db"})

    def test_commit_failure_changes_nothing(self) -> None:
        """
        If info.json cannot be written the commit fails with the OSError and memory,
        the file, listeners and subscribers see no change.
        """
        vm = self.add()
        fired(self.table.commit(vm, self.table.copy(vm)))
        self.listener.calls.clear()
        self.published()
        self.faults.failing = True
        new = self.table.copy(vm)
        new.VmInfo.Tags = {"role": "db"}
        error = fired(self.table.commit(vm, new))
        self.assertIsInstance(error, OSError)
        self.assertEqual(vm.info.Tags, {})
        stored = self.stored(vm)
        assert stored is not None
        self.assertEqual(stored.VmInfo.Tags, {})
        self.assertEqual(self.listener.calls, [])
        self.assertEqual(self.published(), [])
        self.assertEqual(self.table.unsaved, [])

    def test_commit_state_stamps_time(self) -> None:
        """
        A state change records the clock's time as ChangedStateOn.
        """
        vm = self.add()
        self.clock.advance(10)
        fired(self.table.commit_state(vm, State.STOPPED))
        self.assertEqual(vm.info.State, State.STOPPED)
        self.assertEqual(vm.info.ChangedStateOn.timestamp(), 1_700_000_010)

    def test_copy_is_independent(self) -> None:
        """
        Changing the copy does not change the VM.
        """
        vm = self.add()
        new = self.table.copy(vm)
        new.VmInfo.OwnerUsers.append("mallory")
        self.assertEqual(vm.info.OwnerUsers, [])


class RecordTests(TableTestCase):
    """
    L{VmTable.record}: believed at once, written with retries.
    """

    def test_record_believes_and_writes(self) -> None:
        """
        A recorded fact is in memory and on disk, and listeners are told.
        """
        vm = self.add()
        self.assertIsNone(fired(self.table.record_state(vm, State.STOPPED)))
        self.assertEqual(vm.info.State, State.STOPPED)
        stored = self.stored(vm)
        assert stored is not None
        self.assertEqual(stored.VmInfo.State, State.STOPPED)
        self.assertEqual(self.listener.calls, [("changed", "10.5.0.2")])

    def test_record_retries_until_written(self) -> None:
        """
        A failed write of a recorded fact leaves memory changed, is retried every
        RETRY_INTERVAL seconds on the clock while it fails, and stops once it is
        written; the Deferred fires (never fails) after the first attempt.
        """
        vm = self.add()
        self.faults.failing = True
        self.assertIsNone(fired(self.table.record_state(vm, State.CRASHED)))
        self.assertEqual(vm.info.State, State.CRASHED)
        self.assertIsNone(self.stored(vm))
        self.assertEqual(self.table.unsaved, ["10.5.0.2"])
        attempts = self.faults.count
        self.clock.advance(RETRY_INTERVAL - 0.1)
        self.assertEqual(self.faults.count, attempts)
        self.clock.advance(0.1)
        self.assertEqual(self.faults.count, attempts + 1)
        self.clock.advance(RETRY_INTERVAL)
        self.assertEqual(self.faults.count, attempts + 2)
        self.faults.failing = False
        self.clock.advance(RETRY_INTERVAL)
        stored = self.stored(vm)
        assert stored is not None
        self.assertEqual(stored.VmInfo.State, State.CRASHED)
        self.assertEqual(self.table.unsaved, [])
        count = self.faults.count
        self.clock.advance(RETRY_INTERVAL * 5)
        self.assertEqual(self.faults.count, count)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_retry_writes_the_newest(self) -> None:
        """
        Facts recorded while an earlier write is being retried are all in the file
        once the disk works again.
        """
        vm = self.add()
        self.faults.failing = True
        fired(self.table.record_state(vm, State.STOPPED))
        new = self.table.copy(vm)
        new.VmInfo.Hostname = "renamed"
        fired(self.table.record(vm, new))
        self.faults.failing = False
        self.clock.advance(RETRY_INTERVAL)
        stored = self.stored(vm)
        assert stored is not None
        self.assertEqual((stored.VmInfo.State, stored.VmInfo.Hostname), (State.STOPPED, "renamed"))

    def test_commit_clears_unsaved(self) -> None:
        """
        A successful commit writes everything recorded before it.
        """
        vm = self.add()
        self.faults.failing = True
        fired(self.table.record_state(vm, State.STOPPED))
        self.faults.failing = False
        new = self.table.copy(vm)
        new.VmInfo.Tags = {"a": "b"}
        fired(self.table.commit(vm, new))
        self.assertEqual(self.table.unsaved, [])
        stored = self.stored(vm)
        assert stored is not None
        self.assertEqual((stored.VmInfo.State, stored.VmInfo.Tags), (State.STOPPED, {"a": "b"}))

    def test_no_retry_for_removed_vm(self) -> None:
        """
        A VM forgotten while its write is retried is not written again.
        """
        vm = self.add()
        self.faults.failing = True
        fired(self.table.record_state(vm, State.DESTROYING))
        self.table.forget(vm)
        count = self.faults.count
        self.faults.failing = False
        self.clock.advance(RETRY_INTERVAL * 3)
        self.assertEqual(self.faults.count, count)
        self.assertEqual(self.table.unsaved, [])

    def test_stop_cancels_retries(self) -> None:
        """
        Stopping the table cancels the retry timer.
        """
        vm = self.add()
        self.faults.failing = True
        fired(self.table.record_state(vm, State.STOPPED))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.table.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_record_without_persist(self) -> None:
        """
        C{persist=False} changes memory only.
        """
        vm = self.add()
        fired(self.table.record_state(vm, State.DESTROYING, persist=False))
        self.assertEqual(vm.info.State, State.DESTROYING)
        self.assertIsNone(self.stored(vm))
        self.assertEqual(self.faults.count, 0)


class IndexTests(TableTestCase):
    """
    Lookups by any address, leases by MAC, listeners.
    """

    def test_lookup_by_primary_and_secondary_address(self) -> None:
        """
        A VM is found by its primary and its secondary addresses; unknown
        addresses find nothing; L{VmTable.get} wants the primary.
        """
        vm = self.add(
            secondary=[Address("10.6.0.7", "52:54:0a:06:00:07")], secondary_subnets=["back"]
        )
        self.assertIs(self.table.by_address("10.5.0.2"), vm)
        self.assertIs(self.table.by_address("10.6.0.7"), vm)
        self.assertIsNone(self.table.by_address("10.5.0.9"))
        self.assertIs(self.table.get("10.5.0.2"), vm)
        self.assertRaises(NotFound, self.table.get, "10.6.0.7")
        self.assertRaises(InvalidRequest, self.table.get, "")

    def test_leases(self) -> None:
        """
        Leases by MAC (any case) for the primary and secondary interfaces, with the
        hostname and the subnet (named, or found by address).
        """
        self.add(
            secondary=[
                Address("10.6.0.7", "52:54:0a:06:00:07"),
                Address("10.6.0.8", "52:54:0a:06:00:08"),
            ],
            secondary_subnets=["back"],
        )
        primary = self.table.lease("52:54:0A:05:00:02")
        assert primary is not None
        self.assertEqual(
            (primary.IpAddress, primary.Hostname, primary.primary, primary.vm_ip),
            ("10.5.0.2", "web", True, "10.5.0.2"),
        )
        assert primary.Subnet is not None
        self.assertEqual(primary.Subnet.Id, "net")
        second = self.table.lease("52:54:0a:06:00:07")
        assert second is not None and second.Subnet is not None
        self.assertEqual(
            (second.IpAddress, second.primary, second.Subnet.Id), ("10.6.0.7", False, "back")
        )
        third = self.table.lease("52:54:0a:06:00:08")  # no subnet id: by address
        assert third is not None and third.Subnet is not None
        self.assertEqual(third.Subnet.Id, "back")
        self.assertIsNone(self.table.lease("52:54:00:00:00:01"))
        self.assertEqual(
            [lease.IpAddress for lease in self.table.leases()], ["10.5.0.2", "10.6.0.7", "10.6.0.8"]
        )

    def test_readdressing_reindexes(self) -> None:
        """
        A committed change of addresses moves the indexes: the old address and MAC
        find nothing, the new ones find the VM.
        """
        vm = self.add(
            secondary=[Address("10.6.0.7", "52:54:0a:06:00:07")], secondary_subnets=["back"]
        )
        new = self.table.copy(vm)
        new.VmInfo.SecondaryAddresses = [Address("10.6.0.9", "52:54:0a:06:00:09")]
        fired(self.table.commit(vm, new))
        self.assertIsNone(self.table.by_address("10.6.0.7"))
        self.assertIsNone(self.table.lease("52:54:0a:06:00:07"))
        self.assertIs(self.table.by_address("10.6.0.9"), vm)
        lease = self.table.lease("52:54:0a:06:00:09")
        assert lease is not None
        self.assertEqual(lease.IpAddress, "10.6.0.9")

    def test_forget(self) -> None:
        """
        A forgotten VM is found by nothing; listeners and subscribers are told (a
        zero VmInfo for its IP).
        """
        vm = self.add(secondary=[Address("10.6.0.7", "52:54:0a:06:00:07")])
        self.table.forget(vm)
        self.assertTrue(vm.deleted)
        self.assertEqual(self.table.vms, {})
        self.assertIsNone(self.table.by_address("10.6.0.7"))
        self.assertIsNone(self.table.lease("52:54:0a:05:00:02"))
        self.assertEqual(self.table.leases(), [])
        self.assertRaises(NotFound, self.table.get, "10.5.0.2")
        self.assertEqual(self.listener.calls, [("removed", "10.5.0.2")])
        [update] = self.published()
        self.assertEqual(update.VMs, {"10.5.0.2": VmInfo()})

    def test_subnets_and_failing_listener(self) -> None:
        """
        Listeners hear about subnet changes; one that raises is logged and does not
        keep the others from being told.
        """

        class Broken(Listener):
            def subnets_changed(self, subnets: list[Subnet]) -> None:
                raise ZeroDivisionError()

        self.table.listeners.insert(0, Broken())
        self.table.notify_subnets([Subnet(Id="net")])
        self.assertEqual(self.listener.calls, [("subnets", ["net"])])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_paths(self) -> None:
        """
        User data and identity files are in the VM's directory.
        """
        vm = self.add()
        self.assertEqual(
            self.table.user_data_path("10.5.0.2"), os.path.join(vm.directory, "user-data.raw")
        )
        self.assertEqual(
            self.table.identity_paths("10.5.0.2"),
            (
                os.path.join(vm.directory, "identity.cert"),
                os.path.join(vm.directory, "identity.key"),
            ),
        )


class LoadTests(TableTestCase):
    """
    L{VmTable.load}.
    """

    def write(self, name: str, filename: str, data: bytes) -> None:
        directory = os.path.join(self.state.vms_path, name)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, filename), "wb") as f:
            f.write(data)

    def test_load(self) -> None:
        """
        Good VMs load with their pending.json; a corrupt info.json, one for another
        IP and a stray file are skipped and left on disk; a directory holding only
        pending.json (an interrupted creation or removal) is removed; a directory
        with other files but no info.json is left alone.
        """
        good = make_vm(
            self.state.vms_path, "10.5.0.2", secondary=[Address("10.6.0.7", "52:54:0a:06:00:07")]
        )
        self.write("10.5.0.2", "info.json", codec.encode(good.local))
        self.write("10.5.0.2", PENDING_FILE, b'{"Phase": "acknowledge", "Deadline": 5}')
        other = make_vm(self.state.vms_path, "10.5.0.3", mac="52:54:0a:05:00:03")
        self.write("10.5.0.3", "info.json", codec.encode(other.local))
        self.write("10.5.0.4", "info.json", b"{not json")
        self.write("10.5.0.5", "info.json", codec.encode(other.local))  # IP .3
        self.write("10.5.0.6", PENDING_FILE, b'{"Phase": "creating"}')
        self.write("10.5.0.7", "bootlog", b"...")
        os.makedirs(os.path.join(self.state.vms_path, "10.5.0.8"))
        with open(os.path.join(self.state.vms_path, "stray"), "w") as f:
            f.write("x")
        self.table.load()
        self.assertEqual(sorted(self.table.vms), ["10.5.0.2", "10.5.0.3"])
        self.assertEqual(
            self.table.vms["10.5.0.2"].pending, {"Phase": "acknowledge", "Deadline": 5}
        )
        self.assertIsNone(self.table.vms["10.5.0.3"].pending)
        self.assertIsNotNone(self.table.by_address("10.6.0.7"))
        self.assertIsNotNone(self.table.lease("52:54:0a:05:00:03"))
        left = sorted(os.listdir(self.state.vms_path))
        self.assertEqual(
            left, ["10.5.0.2", "10.5.0.3", "10.5.0.4", "10.5.0.5", "10.5.0.7", "stray"]
        )

    def test_unreadable_pending_is_creating(self) -> None:
        """
        A pending.json that is not a JSON object counts as an unfinished creation.
        """
        vm = make_vm(self.state.vms_path)
        self.write("10.5.0.2", "info.json", codec.encode(vm.local))
        self.write("10.5.0.2", PENDING_FILE, b"[1, 2")
        self.table.load()
        self.assertEqual(self.table.vms["10.5.0.2"].pending, {"Phase": "creating"})

    def test_no_vms_directory(self) -> None:
        """
        A state directory without VMs/ loads no VMs.
        """
        os.rmdir(self.state.vms_path)
        self.table.load()
        self.assertEqual(self.table.vms, {})


class UpdateStreamTests(SynchronousTestCase):
    """
    GetUpdates streams: bounded, and a subscriber that falls behind is dropped.
    """

    def test_first_update_then_changes(self) -> None:
        """
        A subscriber gets the full update first, then each published one in order;
        a reader waiting gets the next update as it is published.
        """
        hub = UpdateHub()
        stream = hub.subscribe(Update(HaveDisabled=True), "alice")
        self.assertTrue(fired(stream.get()).HaveDisabled)
        d = stream.get()
        self.assertIs(fired(d), UNFIRED)
        hub.publish(Update(NumCPUs=4))
        self.assertEqual(fired(d).NumCPUs, 4)
        hub.publish(Update(NumCPUs=5))
        hub.publish(Update(NumCPUs=6))
        self.assertEqual([fired(stream.get()).NumCPUs for _ in range(2)], [5, 6])

    def test_slow_subscriber_dropped(self) -> None:
        """
        A subscriber that does not read falls MAX_QUEUED updates behind and is
        dropped: its queue is emptied, its stream ends (reads give None), the hub no
        longer feeds it, and a warning is logged; other subscribers go on.
        """
        hub = UpdateHub(max_queued=5)
        slow = hub.subscribe(Update(), "slow")
        fast = hub.subscribe(Update(), "fast")
        got = []

        def read(_: object = None) -> None:
            fast.get().addCallback(lambda u: (got.append(u), read()))

        read()
        for i in range(4):
            hub.publish(Update(NumCPUs=i))
        self.assertEqual(len(slow), 5)
        self.assertFalse(slow.closed)
        hub.publish(Update(NumCPUs=99))
        self.assertTrue(slow.dropped)
        self.assertTrue(slow.closed)
        self.assertEqual(len(slow), 0)
        self.assertIsNone(fired(slow.get()))
        self.assertEqual(hub.streams, [fast])
        for i in range(100):
            hub.publish(Update(NumCPUs=i))
        self.assertEqual(len(slow), 0)
        self.assertEqual(len(got), 1 + 5 + 100)
        self.assertFalse(fast.dropped)

    def test_close(self) -> None:
        """
        A subscriber closing its stream leaves the hub; a waiting read gets None;
        closing twice is harmless; close_all ends every stream.
        """
        hub = UpdateHub()
        a = hub.subscribe(Update(), "a")
        b = hub.subscribe(Update(), "b")
        fired(a.get())
        waiting = a.get()
        a.close()
        a.close()
        self.assertIsNone(fired(waiting))
        self.assertEqual(hub.streams, [b])
        hub.close_all()
        self.assertEqual(hub.streams, [])
        self.assertTrue(b.closed)

    def test_stream_alone(self) -> None:
        """
        An L{UpdateStream} calls its close function once.
        """
        closed: list[UpdateStream] = []
        stream = UpdateStream(closed.append, max_queued=2)
        stream.put(Update())
        stream.put(Update())
        stream.put(Update())
        self.assertEqual(closed, [stream])
        stream.close()
        self.assertEqual(closed, [stream])


class AcknowledgementTests(SynchronousTestCase):
    """
    L{DhcpAcknowledgements} on a clock.
    """

    def test_acknowledged(self) -> None:
        """
        Waiters for a MAC fire with True when it is acknowledged (any case), and
        their timers are cancelled.
        """
        clock = Clock()
        acks = DhcpAcknowledgements(clock, serving=True)
        d1 = acks.wait("52:54:0A:05:00:02", 10)
        d2 = acks.wait("52:54:0a:05:00:02", 20)
        other = acks.wait("52:54:0a:05:00:03", 10)
        acks.acknowledged("52:54:0a:05:00:02")
        self.assertIs(fired(d1), True)
        self.assertIs(fired(d2), True)
        self.assertIs(fired(other), UNFIRED)
        self.assertEqual(len(clock.getDelayedCalls()), 1)

    def test_timeout(self) -> None:
        """
        A waiter fires with False after its timeout; a later acknowledgement does not
        touch it.
        """
        clock = Clock()
        acks = DhcpAcknowledgements(clock)
        d = acks.wait("52:54:0a:05:00:02", 10)
        clock.advance(9.9)
        self.assertIs(fired(d), UNFIRED)
        clock.advance(0.1)
        self.assertIs(fired(d), False)
        acks.acknowledged("52:54:0a:05:00:02")
        self.assertEqual(acks._waiters, {})

    def test_acknowledged_without_waiters(self) -> None:
        """
        An acknowledgement nobody waits for is ignored; a wait after it waits for the
        next one.
        """
        clock = Clock()
        acks = DhcpAcknowledgements(clock)
        acks.acknowledged("52:54:0a:05:00:02")
        d = acks.wait("52:54:0a:05:00:02", 5)
        self.assertIs(fired(d), UNFIRED)
        clock.advance(5)
        self.assertIs(fired(d), False)


class DelayedRunner:
    """
    Runs each function at once (as a thread would, reading the disk now) but
    delivers its result only when the test calls L{deliver}.
    """

    def __init__(self) -> None:
        self.results: list[tuple[Deferred[Any], Callable[[], None]]] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            error = e
            self.results.append((d, lambda: d.errback(error)))
        else:
            self.results.append((d, lambda: d.callback(result)))
        return d

    def deliver(self) -> None:
        _, fire = self.results.pop(0)
        fire()


class HostStatsTests(SynchronousTestCase):
    """
    L{HostStats}: cached figures, reservations, refreshes.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.a = os.path.join(self.dir, "a")
        self.b = os.path.join(self.dir, "b")
        os.makedirs(self.a)
        os.makedirs(self.b)
        self.host = FakeHost(
            cpus=8, memory_mib=4096, available_mib=1000, storage=(100 * GiB, 10 * GiB)
        )
        self.clock = Clock()

    def stats(self, directories: Optional[list[str]] = None, runner: Any = None) -> HostStats:
        stats = HostStats(
            self.host, directories or [self.a, self.b], runner or SynchronousRunner(), self.clock
        )
        stats.load()
        return stats

    def test_cached_figures(self) -> None:
        """
        CPUs, memory and storage come from the last read; the host is not asked
        again until a refresh.
        """
        stats = self.stats()
        self.host.available_mib = 10
        self.host.storage_override = (100 * GiB, 1 * GiB)
        self.assertEqual(stats.num_cpus(), 8)
        self.assertEqual(stats.memory(), (4096, 1000))
        self.assertEqual(stats.storage(self.a), (100 * GiB, 10 * GiB))
        self.assertEqual(stats.storage("/elsewhere"), (0, 0))
        fired(stats.refresh())
        self.assertEqual(stats.memory(), (4096, 10))
        self.assertEqual(stats.storage(self.a), (100 * GiB, 1 * GiB))

    def test_total_counts_each_file_system_once(self) -> None:
        """
        Two volume directories on one file system count its size once.
        """
        stats = self.stats()
        self.assertEqual(stats.total_volume_bytes(), 100 * GiB)

    def test_refresh_on_the_clock(self) -> None:
        """
        After C{start} the figures are read again every REFRESH_INTERVAL seconds;
        C{stop} ends that.
        """
        stats = self.stats()
        stats.start()
        self.host.available_mib = 7
        self.clock.advance(hoststats.REFRESH_INTERVAL)
        self.assertEqual(stats.memory(), (4096, 7))
        stats.stop()
        self.host.available_mib = 8
        self.clock.advance(hoststats.REFRESH_INTERVAL * 3)
        self.assertEqual(stats.memory(), (4096, 7))

    def test_reserve_first_fit_and_release(self) -> None:
        """
        Reservations take the first directory with room (the reference's placement
        starts from the first directory for every request) and count against its free
        space until released; a release of used space takes it off the cached figure.
        """
        stats = self.stats()
        for entry in stats.snapshot.directories:
            entry.on_root = False
        first = stats.reserve(4 * GiB)
        self.assertEqual(first, self.a)
        self.assertEqual(stats.reserve(4 * GiB), self.a)
        third = stats.reserve(6 * GiB)
        self.assertEqual(third, self.b)  # a has 2 GiB left
        error = self.assertRaises(InsufficientCapacity, stats.reserve, 7 * GiB)
        self.assertIn("not enough free space", str(error))
        self.assertIn(f"[0] {self.a}: 2 GiB usable", str(error))
        runner = DelayedRunner()
        stats.runner = runner
        stats.release(third, 6 * GiB, used=False)
        stats.release(first, 4 * GiB, used=True)
        self.assertEqual(stats.storage(first), (100 * GiB, 6 * GiB))
        # a: 6 GiB available, 4 GiB of it still reserved.
        self.assertEqual(stats.reserve(6 * GiB), self.b)

    def test_root_keeps_one_gib(self) -> None:
        """
        On the root file system 1 GiB stays free.
        """
        stats = self.stats([self.a])
        [entry] = stats.snapshot.directories
        entry.on_root = True
        error = self.assertRaises(InsufficientCapacity, stats.reserve, 9 * GiB + 1)
        self.assertIn(self.a, str(error))
        self.assertEqual(stats.reserve(9 * GiB), self.a)
        entry.on_root = False
        stats.release(self.a, 9 * GiB, used=False)
        stats.snapshot.directories[0].on_root = False
        self.assertEqual(stats.reserve(10 * GiB), self.a)

    def test_on_root_detected(self) -> None:
        """
        A directory on the root file system is recognised as such.
        """
        stats = self.stats(["/"])
        self.assertTrue(stats.snapshot.directories[0].on_root)

    def test_no_directories_and_errors(self) -> None:
        """
        Without volume directories reserving says so; a directory whose file system
        cannot be read is skipped with its error in the message.
        """
        stats = self.stats([])
        stats.directories = []
        stats.snapshot = Snapshot()
        error = self.assertRaises(InsufficientCapacity, stats.reserve, 1)
        self.assertIn("no volume directories", str(error))
        stats.directories = ["/x"]
        stats.snapshot = Snapshot(directories=[DirectoryStats("/x", Error="gone")])
        error = self.assertRaises(InsufficientCapacity, stats.reserve, 1)
        self.assertIn("/x: gone", str(error))

    def test_refresh_coalesced(self) -> None:
        """
        Refreshes asked for while one is in flight share it (one read at a time) and
        make one more read after it, however many were asked for.
        """
        runner = DelayedRunner()
        stats = self.stats(runner=runner)
        d1 = stats.refresh()
        d2 = stats.refresh()
        d3 = stats.refresh()
        self.assertIs(d1, d2)
        self.assertIs(d1, d3)
        self.assertEqual(len(runner.results), 1)
        runner.deliver()
        self.assertTrue(d1.called)
        self.assertEqual(len(runner.results), 1)
        runner.deliver()
        self.assertEqual(runner.results, [])

    def test_release_during_refresh_not_lost(self) -> None:
        """
        Space taken by new volumes while a refresh is in flight (read before the
        volumes existed) is not given back by that refresh's stale figures: the
        cache ends with what the disk says after the volumes exist.
        """
        runner = DelayedRunner()
        stats = self.stats(runner=runner)
        directory = stats.reserve(4 * GiB)
        stats.refresh()  # reads 10 GiB free: the volumes do not exist yet
        self.host.storage_override = (100 * GiB, 6 * GiB)  # now they do
        stats.release(directory, 4 * GiB, used=True)
        self.assertEqual(stats.storage(directory), (100 * GiB, 6 * GiB))
        while runner.results:
            runner.deliver()
        self.assertEqual(stats.storage(directory), (100 * GiB, 6 * GiB))

    def test_refresh_failure_keeps_figures(self) -> None:
        """
        A refresh that fails keeps the last figures and is logged.
        """
        stats = self.stats()

        def broken() -> tuple[int, int]:
            raise OSError(5, "Input/output error")

        self.host.memory = broken  # type: ignore[method-assign]
        fired(stats.refresh())
        self.assertEqual(stats.memory(), (4096, 1000))
