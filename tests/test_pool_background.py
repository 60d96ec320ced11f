"""
The address pool is written in the background during CreateVm
(L{hypervisor.manager.context.ManagerContext.allocate_addresses}): a failing pool
write does not fail the creation, the answer still comes after the pool write was
tried, and a restart repairs the pool from the VMs, so no address is ever free and
held at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Optional

from twisted.internet.defer import maybeDeferred
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT
from hypervisor.model import (
    ChangeAddressPoolRequest,
    IpRequest,
    Subnet,
    UpdateSubnetsRequest,
)
from hypervisor.testing import FailingWrites
from tests.test_manager_faults import ADDRESSES, Fixture, create_request

POOL = "address-pool.json"


class PoolFailsOnCreate(FailingWrites):
    """
    Every write of the address pool fails while C{failing_pool} is set.
    """

    def __init__(self) -> None:
        super().__init__()
        self.failing_pool = False

    def __call__(self, path: str, data: Optional[bytes], mode: int) -> None:
        if self.failing_pool and os.path.basename(path) == POOL:
            self.failed.append(path)
            raise OSError(5, "Input/output error", path)
        super().__call__(path, data, mode)


class BackgroundPoolWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.fx = Fixture(self.root)
        self.writes = PoolFailsOnCreate()
        self.manager = self.fx.manager(self.writes)
        self.api = HypervisorApi(self.manager)
        self.fx.fake.reconnect()
        self.fx.clock.advance(0)
        self.call(
            self.api.UpdateSubnets(
                ROOT,
                UpdateSubnetsRequest(
                    Add=[Subnet(Id="net", IpGateway="10.9.0.1", IpMask="255.255.255.0")]
                ),
            )
        )
        self.call(
            self.api.ChangeAddressPool(
                ROOT, ChangeAddressPoolRequest(AddressesToAdd=list(ADDRESSES))
            )
        )

    def call(self, d: Any) -> Any:
        results: list[Any] = []
        deferred = maybeDeferred(lambda: d)
        deferred.addBoth(results.append)
        self.fx.settle(deferred)
        self.assertTrue(results, "the call never answered")
        if isinstance(results[0], Failure):
            results[0].raiseException()
        return results[0]

    def free_on_disk(self) -> list[str]:
        with open(os.path.join(self.root, "state", POOL)) as f:
            return sorted(a["IpAddress"] for a in json.load(f)["Free"])

    def test_answered_vm_is_taken_on_disk(self) -> None:
        """
        When CreateVm answers, the pool on disk already has the VM's address taken.
        """
        answer = self.call(self.api.CreateVm(ROOT, create_request("10.9.0.2", start=False)))
        self.assertNotIn(answer.IpAddress, self.free_on_disk())
        self.assertEqual(len(self.free_on_disk()), len(ADDRESSES) - 1)

    def test_failed_pool_write_does_not_fail_the_create(self) -> None:
        """
        With every pool write failing, CreateVm still creates the VM (its info.json
        is what holds the address), the failure is logged with what to expect, the
        pool on disk is stale, and a restart repairs it: the address is held by the
        VM and not free.
        """
        logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if "cannot write the address pool" in event.get("log_format", ""):
                logged.append(event["log_format"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        self.writes.failing_pool = True
        answer = self.call(self.api.CreateVm(ROOT, create_request("10.9.0.3", start=False)))
        ip = answer.IpAddress
        self.call(self.api.AcknowledgeVm(ROOT, IpRequest(ip)))
        self.assertTrue(self.writes.failed)
        self.assertTrue(logged)
        self.assertIn(ip, self.free_on_disk())  # stale: the write failed
        self.assertEqual(self.manager.check_invariants(), [])
        self.writes.failing_pool = False
        self.fx.crash(self.manager)
        restarted = self.fx.manager(FailingWrites())
        self.fx.fake.reconnect()
        self.fx.clock.advance(0)
        self.assertIn(ip, restarted.ctx.table.vms)
        self.assertNotIn(ip, self.free_on_disk())
        self.assertEqual(restarted.check_invariants(), [])
