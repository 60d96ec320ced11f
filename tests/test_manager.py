"""
Tests for L{hypervisor.manager.manager.Manager} against libvirt's test driver.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid as uuidlib
from typing import Any

import libvirt
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from hypervisor.manager.manager import Manager
from hypervisor.store import StateDirectory
from hypervisor.virt import domains
from hypervisor.virt.connection import LibvirtService, start_event_loop
from tests.support import until

OURS = (
    f"<metadata><hv:vm xmlns:hv='{domains.METADATA_NAMESPACE}'>"
    "<hv:ipAddress>{ip}</hv:ipAddress></hv:vm></metadata>"
)


def domain_xml(name: str, ip: str = "") -> str:
    metadata = OURS.format(ip=ip) if ip else ""
    return (
        f"<domain type='test'><name>{name}</name><memory>8192</memory>"
        f"{metadata}<os><type>hvm</type></os></domain>"
    )


class ManagerTests(TestCase):
    """
    The manager's domain list, stop behaviour and state directory handling.
    """

    def setUp(self) -> None:
        start_event_loop()
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.libvirt = LibvirtService("test:///default", reactor)
        self.manager = Manager(
            StateDirectory(os.path.join(self.dir, "state")),
            self.libvirt,
            reactor,
            domain_type="qemu",
            vm_shutdown_timeout=5,
        )
        self.conn = libvirt.open("test:///default")
        self.addCleanup(self.conn.close)
        self.created: list[Any] = []
        self.addCleanup(self._destroy_created)

    def _destroy_created(self) -> None:
        for dom in self.created:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError:
                pass  # a transient domain vanishes once off

    def start(self) -> None:
        self.manager.privilegedStartService()
        self.libvirt.startService()
        self.manager.startService()

    async def stop(self) -> None:
        d1 = self.manager.stopService()
        d2 = self.libvirt.stopService()
        await d1
        await d2

    def create(self, ip: str = "") -> Any:
        name = f"hv-mgr-{uuidlib.uuid4().hex[:8]}"
        dom = self.conn.createXML(domain_xml(name, ip), 0)
        self.created.append(dom)
        return dom

    async def test_domain_list_follows_events(self) -> None:
        """
        The in-memory domain list is read at connect and refreshed by lifecycle
        events; our metadata marks our domains and carries the IP.
        """
        self.start()
        await until(lambda: self.manager.domains_current)
        dom = self.create(ip="10.9.8.7")
        await until(lambda: dom.UUIDString() in self.manager.domains)
        summary = self.manager.domains[dom.UUIDString()]
        self.assertTrue(summary.ours)
        self.assertTrue(summary.active)
        self.assertEqual(summary.ip_address, "10.9.8.7")
        self.assertEqual(summary.state, "running")
        dom.destroy()
        await until(lambda: dom.UUIDString() not in self.manager.domains)
        await self.stop()

    async def test_stop_leaves_vms_running(self) -> None:
        """
        A plain stop leaves every domain running and removes the root cookie.
        """
        self.start()
        await until(lambda: self.manager.domains_current)
        dom = self.create(ip="10.9.8.6")
        await self.stop()
        self.assertTrue(dom.isActive())
        self.assertFalse(os.path.exists(self.manager.state.root_cookie_path))

    async def test_stop_after_stop_vms_on_next_stop(self) -> None:
        """
        After stop-vms-on-next-stop, a stop powers this daemon's VMs down and leaves
        running the domains that are not ours and those tagged as ours whose VM this
        daemon does not know (another daemon's, on a shared libvirtd).
        """
        from hypervisor.manager.vm import Vm
        from hypervisor.model import Address, LocalVmInfo, VmInfo

        self.start()
        await until(lambda: self.manager.domains_current)
        ours = self.create(ip="10.9.8.5")
        self.manager.table.add(
            Vm(
                LocalVmInfo(VmInfo=VmInfo(Address=Address("10.9.8.5", "52:54:00:09:08:05"))),
                "/nonexistent",
            )
        )
        theirs = self.create()
        other_daemons = self.create(ip="10.9.8.7")
        self.manager.stop_vms_on_next_stop = True
        await self.stop()
        self.assertFalse(domains.is_active(self.conn, ours.UUIDString()))
        self.assertTrue(theirs.isActive())
        self.assertTrue(other_daemons.isActive())

    async def test_shutdown_without_libvirt(self) -> None:
        """
        With libvirt down, shutting VMs down logs why and does not hang the stop.
        """
        self.manager.privilegedStartService()
        self.manager.startService()
        self.manager.stop_vms_on_next_stop = True
        await self.manager.stopService()
        self.assertFalse(os.path.exists(self.manager.state.root_cookie_path))
