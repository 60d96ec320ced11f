"""
Kept encodings and indexes never go stale: after every change made through the service
layer (and by libvirt events), GetVmInfo's kept reply, ListVMs (sorted and filtered),
GetVmInfos, the kept CPU and memory totals, the bytes VM volumes take per volume
directory, and the /listVMs page's kept rows and JSON
equal what a fresh encoding of
the VMs' current state gives.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import codec
from hypervisor.api import encode_reply
from hypervisor.auth import ROOT, Identity
from hypervisor.manager import capacity, placement, report
from hypervisor.manager.vm import ip_sort_key, matches
from hypervisor.model import (
    AccessRequest,
    ChangeVmDestroyProtectionRequest,
    ChangeVmHostnameRequest,
    ChangeVmOwnerUsersRequest,
    ChangeVmSizeRequest,
    ChangeVmTagsRequest,
    GetVmInfoResponse,
    GetVmInfosRequest,
    IpRequest,
    ListVMsRequest,
    StartVmRequest,
    State,
    VmFilter,
)
from tests.test_manager_clock import ClockDaemon, fired
from web.status import StatusPages

ALICE = Identity(username="alice")
OPERATIONS = [
    "create",
    "create_stopped",
    "start",
    "stop",
    "destroy",
    "tags",
    "size",
    "hostname",
    "owners",
    "protect",
    "power_off",
    "crash",
]


class CoherenceTests(SynchronousTestCase):
    """
    Random sequences of changes; the kept encodings checked after each one.
    """

    def check(self, daemon: ClockDaemon) -> None:
        """
        Every VM's GetVmInfo reply equals a fresh encoding of its info; ListVMs and
        GetVmInfos agree with a fresh filter and sort of the VMs.
        """
        manager = daemon.manager
        api = daemon.api
        self.assertEqual(manager.table.usage(), capacity.usage(manager.table.infos()))
        stats = manager.ctx.stats
        self.assertTrue(stats.track)
        self.assertEqual(
            {k: v for k, v in stats.allocations().items() if v},
            placement.allocations(stats.directories, manager._volume_allocations()),
        )
        for ip, vm in manager.vms.items():
            reply = api.GetVmInfo(ALICE, IpRequest(ip))
            fresh = codec.encode(GetVmInfoResponse(VmInfo=vm.info))
            self.assertEqual(encode_reply(reply), fresh, ip)
            self.assertEqual(reply.VmInfo, vm.info)
        filters = [VmFilter(IgnoreStateMask=mask) for mask in (0, 1 << 1, 1 << 4)] + [
            VmFilter(OwnerUsers=["bob"]),
            VmFilter(OwnerUsers=["alice"], IgnoreStateMask=1 << 4),
            VmFilter(VmTagsToMatch={"Name": []}),
        ]
        for f in filters:
            expected = sorted(
                (ip for ip, vm in manager.vms.items() if matches(vm.info, f)), key=ip_sort_key
            )
            listed = api.ListVMs(ALICE, ListVMsRequest(Filter=f, Sort=True)).IpAddresses
            self.assertEqual(listed, expected)
            infos = api.GetVmInfos(ALICE, GetVmInfosRequest(Filter=f)).VmInfos
            self.assertEqual(
                [codec.encode(i) for i in infos],
                [codec.encode(manager.vms[ip].info) for ip in expected],
            )

    def check_pages(self, daemon: ClockDaemon, pages: StatusPages) -> None:
        """
        Every VM's kept /listVMs row and JSON equal fresh ones.
        """
        cpus = daemon.manager.host.num_cpus()
        for vm in daemon.manager.vms.values():
            row, html = pages._page_row(vm, cpus)
            fresh = report.vm_row(vm.info, cpus)
            self.assertEqual(row, fresh)
            self.assertEqual(html, pages.templates.get_template("vm_row.html").render(r=fresh))
            self.assertEqual(vm.encoded_info(), codec.encode(vm.info))

    def apply(self, daemon: ClockDaemon, operation: str, rng: random.Random) -> None:
        """
        One change; failures (wrong state, no address left) are part of the game.
        """
        api = daemon.api
        ips = sorted(daemon.manager.vms)
        ip = rng.choice(ips) if ips else "10.5.0.2"
        calls: dict[str, Any] = {
            "create": lambda: api.CreateVm(ALICE, daemon.request()),
            "create_stopped": lambda: api.CreateVm(ALICE, daemon.request(DoNotStart=True)),
            "start": lambda: api.StartVm(ALICE, StartVmRequest(IpAddress=ip)),
            "stop": lambda: api.StopVm(ALICE, AccessRequest(IpAddress=ip)),
            "destroy": lambda: api.DestroyVm(ALICE, AccessRequest(IpAddress=ip)),
            "tags": lambda: api.ChangeVmTags(
                ALICE, ChangeVmTagsRequest(IpAddress=ip, Tags={"Name": f"n{rng.random()}"})
            ),
            "size": lambda: api.ChangeVmSize(
                ALICE, ChangeVmSizeRequest(IpAddress=ip, MilliCPUs=rng.choice([100, 200]))
            ),
            "hostname": lambda: api.ChangeVmHostname(
                ALICE, ChangeVmHostnameRequest(IpAddress=ip, Hostname=f"h{rng.randrange(9)}")
            ),
            "owners": lambda: api.ChangeVmOwnerUsers(
                ALICE, ChangeVmOwnerUsersRequest(IpAddress=ip, OwnerUsers=["bob"])
            ),
            "protect": lambda: api.ChangeVmDestroyProtection(
                ROOT,
                ChangeVmDestroyProtectionRequest(IpAddress=ip, DestroyProtection=False),
            ),
        }
        if operation in ("power_off", "crash"):
            vm = daemon.manager.vms.get(ip)
            if vm is not None and vm.info.State == State.RUNNING:
                daemon.domains.power_off(f"vm-{ip}", crashed=operation == "crash")
        else:
            try:
                d = calls[operation]()
            except Exception:
                return
            d.addErrback(lambda failure: None)
        daemon.settle()
        daemon.clock.advance(3)  # stop timeouts
        daemon.settle()
        fired(api.AcknowledgeVm(ROOT, IpRequest(ip)).addErrback(lambda failure: None))

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.sampled_from(OPERATIONS), min_size=1, max_size=25), st.integers())
    def test_kept_encodings_follow_every_change(self, operations: list[str], seed: int) -> None:
        """
        After each random change, every kept encoding and page row equals a fresh one.
        """
        daemon = ClockDaemon(self).start().network()
        pages = StatusPages(daemon.manager, None, hostname="hv")
        rng = random.Random(seed)
        for operation in operations:
            self.apply(daemon, operation, rng)
            self.check(daemon)
            self.check_pages(daemon, pages)
        daemon.stop()
