"""
The real daemon (a subprocess of C{python -m hypervisor run}) against the real
libvirtd on C{qemu:///system}: health across a libvirtd restart, and what C{stop}
does to VMs.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.virt import domains
from tests import support

# A guest with no disk: SeaBIOS finds nothing to boot and idles. It ignores ACPI
# power-down, so forcing it off is needed.
GUEST = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>32</memory>
  {metadata}
  <os><type arch='x86_64'>hvm</type></os>
  <features><acpi/></features>
  <devices><serial type='null'/></devices>
</domain>"""


def managed_count(daemon: Any) -> int:
    """
    The status page's count of domains managed by this hypervisor.
    """
    found = re.search(r"(\d+) managed by this hypervisor", support.http_get(daemon.url + "/")[1])
    return int(found.group(1)) if found else -1


class RealDaemonTests(SynchronousTestCase):
    """
    The daemon with real libvirtd.
    """

    def setUp(self) -> None:
        support.require_libvirtd()
        import libvirt

        self.libvirt = libvirt
        self.conn = libvirt.open(support.QEMU_URI)
        self.addCleanup(self._close)
        self.guests: list[str] = []

    def _close(self) -> None:
        # A fresh connection: libvirtd may have been restarted by the test.
        conn = self.libvirt.open(support.QEMU_URI)
        for name in self.guests:
            try:
                conn.lookupByName(name).destroy()
            except self.libvirt.libvirtError:
                pass  # already gone
        conn.close()

    def start_guest(self, ours: bool, ip: str = "10.99.0.2") -> Any:
        """
        Start a transient guest outside the daemon (tagged as ours with C{ip}, or not).
        """
        name = f"hv-test-{uuid.uuid4().hex[:8]}"
        metadata = (
            f"<metadata><hv:vm xmlns:hv='{domains.METADATA_NAMESPACE}'>"
            f"<hv:ipAddress>{ip}</hv:ipAddress></hv:vm></metadata>"
            if ours
            else ""
        )
        self.guests.append(name)
        return self.conn.createXML(GUEST.format(name=name, metadata=metadata), 0)

    @staticmethod
    def record_vm(daemon: Any, ip: str) -> None:
        """
        Put a stopped VM with this IP in the daemon's state directory (before it
        starts), so that a guest tagged with the IP is one of this daemon's VMs.
        """
        from hypervisor import codec
        from hypervisor.model import Address, LocalVmInfo, State, VmInfo

        directory = os.path.join(daemon.state_dir, "VMs", ip)
        os.makedirs(directory)
        info = VmInfo(
            Address=Address(ip, "52:54:00:63:00:02"),
            State=State.STOPPED,
            MemoryInMiB=32,
            MilliCPUs=100,
        )
        with open(os.path.join(directory, "info.json"), "wb") as f:
            f.write(codec.encode(LocalVmInfo(VmInfo=info), indent=4))

    def alive(self, dom: Any) -> bool:
        return domains.is_active(self.conn, dom.UUIDString())

    def test_health_follows_libvirtd(self) -> None:
        """
        /healthz is 200 with libvirtd up; 503 with the reason once libvirtd is killed;
        200 again after libvirtd restarts, without restarting the daemon. The status
        page and the JSON log file reflect it.
        """
        daemon = support.Daemon(self, "-domainType=qemu")
        daemon.start()
        support.wait_for(
            lambda: support.http_get(daemon.url + "/healthz")[0] == 200, 30, "healthz 200"
        )
        # Relative to what the page counts before: guests of other (killed) test runs on
        # this libvirtd, untagged like this one, count too.
        before = managed_count(daemon)
        guest = self.start_guest(ours=True)
        support.wait_for(
            lambda: managed_count(daemon) == before + 1, 30, "the status page to count the guest"
        )
        try:
            support.kill_libvirtd()
            status, body = support.wait_for(
                lambda: (lambda r: r if r[0] == 503 else None)(
                    support.http_get(daemon.url + "/healthz")
                ),
                30,
                "healthz 503",
            )
            self.assertIn("not connected to libvirt at qemu:///system", body)
            self.assertIn("connection lost", body)
            page = support.http_get(daemon.url + "/")[1]
            self.assertIn("not connected", page)
        finally:
            support.start_libvirtd()
        support.wait_for(
            lambda: support.http_get(daemon.url + "/healthz")[0] == 200,
            60,
            "healthz 200 after libvirtd restart",
        )
        self.assertIsNone(daemon.process.poll(), "the daemon restarted or died")
        self.conn = self.libvirt.open(support.QEMU_URI)
        self.assertTrue(self.alive(guest), "the guest did not survive libvirtd restart")
        with open(os.path.join(daemon.log_dir, "hypervisor.log")) as f:
            events = [json.loads(line) for line in f]
        texts = [e.get("log_format", "") for e in events]
        self.assertTrue(any("lost the connection to libvirt" in t for t in texts))
        self.assertTrue(any("reconnected to libvirt" in t for t in texts))

    def test_stop_leaves_vms_running(self) -> None:
        """
        C{hypervisor stop} exits 0, the daemon exits 0, and guests keep running; the
        root cookie and the control socket are gone.
        """
        daemon = support.Daemon(self, "-domainType=qemu")
        daemon.start()
        ours, theirs = self.start_guest(ours=True), self.start_guest(ours=False)
        self.assertTrue(os.path.exists(os.path.join(daemon.state_dir, "root-cookie")))
        result = daemon.command("stop")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("hypervisor stopped", result.stdout)
        self.assertEqual(daemon.wait(), 0, daemon.output())
        self.assertTrue(self.alive(ours))
        self.assertTrue(self.alive(theirs))
        self.assertFalse(os.path.exists(os.path.join(daemon.state_dir, "root-cookie")))
        self.assertFalse(os.path.exists(os.path.join(daemon.state_dir, "control")))
        self.assertIn("VMs keep running", daemon.output())
        again = daemon.command("stop")
        self.assertEqual(again.returncode, 1)
        self.assertIn("not running", again.stderr)

    def test_stop_vms_on_next_stop(self) -> None:
        """
        After C{stop-vms-on-next-stop}, C{stop} powers this daemon's guests down —
        forcing off one that ignores ACPI after -vmShutdownTimeout — and leaves other
        guests alone, also those tagged as ours whose VM this daemon does not know
        (another daemon's on the same libvirtd).
        """
        daemon = support.Daemon(self, "-domainType=qemu", "-vmShutdownTimeout=3s")
        self.record_vm(daemon, "10.99.0.2")  # the tagged guest is this daemon's VM
        daemon.start()
        support.wait_for(
            lambda: support.http_get(daemon.url + "/healthz")[0] == 200, 30, "healthz 200"
        )
        ours, theirs = self.start_guest(ours=True), self.start_guest(ours=False)
        another_daemons = self.start_guest(ours=True, ip="10.99.0.3")
        result = daemon.command("stop-vms-on-next-stop")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(self.alive(ours), "stop-vms-on-next-stop must not stop VMs yet")
        result = daemon.command("stop")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(daemon.wait(), 0, daemon.output())
        self.assertFalse(self.alive(ours), daemon.output())
        self.assertTrue(self.alive(theirs))
        self.assertTrue(self.alive(another_daemons))
        output = daemon.output()
        self.assertIn(f"VM {ours.name()} did not power down within 3s: forcing it off", output)
        self.assertNotIn(theirs.name(), output)
