"""
The status pages in a real browser: headless Chromium loads /, /listVMs and
/showVM?<IP> from a real daemon with real VMs (the tiny guest under the real
libvirtd), the test checks the DOM, and screenshots are saved in
C{_trial_temp/screenshots/} for people to look at.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from tests import support

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
]


def chromium() -> str:
    """
    The Chromium binary (skip or fail if missing).
    """
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    support.require(path is not None, "chromium is not installed (apt-get install chromium)")
    assert path is not None
    return path


class BrowserTests(SynchronousTestCase):
    """
    Chromium against the real daemon.
    """

    def browser(self, *args: str) -> subprocess.CompletedProcess[str]:
        profile = tempfile.mkdtemp(prefix="chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        return subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    def dom(self, url: str) -> str:
        result = self.browser("--dump-dom", url)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        return result.stdout

    def screenshot(self, url: str, name: str, height: int = 900) -> str:
        directory = os.path.abspath("screenshots")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        result = self.browser(f"--window-size=1280,{height}", f"--screenshot={path}", url)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertGreater(os.path.getsize(path), 10000, "an empty screenshot")
        return path

    def test_pages_with_real_vms(self) -> None:
        """
        /, /listVMs and /showVM show the host and its VMs (one running, one stopped)
        with working links; screenshots are saved.
        """
        chromium()
        support.require_libvirtd()
        guest = support.tiny_guest()
        support.ensure_bridge()
        d, run = support.tls_daemon(
            self, {"admin": "*.*"}, "-domainType=qemu", f"-localImagesDirectory={guest}"
        )

        def cli(module: str, *args: str) -> str:
            r = run(module, "admin", *args)
            self.assertEqual(r.returncode, 0, r.stderr)
            return r.stdout.strip()

        cli("hyper_control", "add-subnet", "hvtest", "10.77.0.1", "255.255.255.0")
        for i in (2, 3):
            cli("hyper_control", "add-address", f"52:54:0a:4d:00:{i:02x}", f"10.77.0.{i}")
        boot = [
            f"-kernelURL=file://{guest}/vmlinux",
            f"-initrdURL=file://{guest}/initrd.cpio",
            "-extraKernelOptions",
            "quiet hv.dhcp=no hv.mode=stay",
            "-memory",
            "128M",
            "-milliCPUs",
            "500",
            "-minFreeBytes",
            "16M",
            "-roundupPower",
            "0",
            "-dhcpTimeout=0s",
        ]
        web = cli("vm_control", *boot, "-vmTags", "Name=web-frontend", create_ip := "create-vm")
        db = cli("vm_control", *boot, "-vmTags", "Name=<b>database</b>", "-doNotStart", create_ip)
        self.addCleanup(lambda: cli("vm_control", "destroy-vm", web))
        self.addCleanup(lambda: cli("vm_control", "destroy-vm", db))

        index = self.dom(d.url + "/")
        self.assertIn("hypervisor status page", index)
        self.assertIn(">1 running</a>", index)
        self.assertIn(">1 stopped</a>", index)
        self.assertIn('id="libvirt-state" class="ok">connected', index)
        self.assertIn("10.77.0.0/24", index)
        vms = self.dom(d.url + "/listVMs")
        self.assertEqual(vms.count('<tr class="vm">'), 2)
        self.assertIn(f'<a href="/showVM?{web}">{web}</a>', vms)
        self.assertIn("web-frontend", vms)
        self.assertIn("&lt;b&gt;database&lt;/b&gt;", vms)
        self.assertNotIn("<b>database</b>", vms)
        self.assertIn("TOTAL (2 VMs)", vms)
        show = self.dom(f"{d.url}/showVM?{web}")
        self.assertIn('id="vm-state">running<', show)
        self.assertIn("52:54:0a:4d:00:02", show)
        self.assertIn(f"/showVmBootLog?{web}", show)
        missing = self.dom(d.url + "/showVM?10.77.0.99")
        self.assertIn("no VM with IP 10.77.0.99", missing)
        for url, name, height in (
            (d.url + "/", "index.png", 1300),
            (d.url + "/listVMs", "listVMs.png", 700),
            (f"{d.url}/showVM?{web}", "showVM.png", 1100),
        ):
            self.screenshot(url, name, height)
