"""
vm-control and hyper-control: usage handling, and end to end against a running
daemon on the real libvirtd with the tiny guest.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.cli import hyper_control, vm_control
from tests import support


class UsageTests(SynchronousTestCase):
    """
    Flags and subcommands are checked before anything is sent.
    """

    def run_main(self, module, *argv: str) -> tuple[int, str, str]:  # type: ignore[no-untyped-def]
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = module.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_help_lists_subcommands(self) -> None:
        """
        -h lists every subcommand with a line and the flags with defaults.
        """
        code, out, _ = self.run_main(vm_control, "-h")
        self.assertEqual(code, 0)
        for command in vm_control.COMMANDS:
            self.assertIn(command.name, out)
        self.assertIn("-hypervisorPortNum", out)
        code, out, _ = self.run_main(hyper_control, "-h")
        self.assertEqual(code, 0)
        self.assertIn("add-subnet", out)

    def test_usage_errors(self) -> None:
        """
        Unknown subcommands, missing arguments and bad flag values exit 2 with a
        sentence.
        """
        for argv, words in [
            (["fly"], "unknown command: fly"),
            (["stop-vm"], "command stop-vm takes IPaddr"),
            (["stop-vm", "10.0.0.1", "10.0.0.2"], "got 2 argument(s)"),
            (["-memory", "lots", "create-vm"], 'invalid value "lots" for flag -memory'),
            (["-vmTags", "novalue", "create-vm"], "not key=value"),
            (["-nope", "1", "list-vms"], "flag provided but not defined: -nope"),
            (["-milliCPUs", "-5", "create-vm"], "flag -milliCPUs: not an unsigned number"),
            (["-dhcpTimeout", "soon", "create-vm"], "flag -dhcpTimeout: invalid duration"),
            (["-consoleType", "rdp", "create-vm"], "not one of none, dummy, vnc"),
            (["-transport", "carrier-pigeon", "list-vms"], "not one of srpc, https"),
            (["-milliCPUs"], "flag needs an argument: -milliCPUs"),
            (["patch-vm-image", "10.0.0.1"], "patch-vm-image is not available"),
            ([], "no command given"),
        ]:
            code, _, err = self.run_main(vm_control, *argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(words, err)

    def test_unreachable(self) -> None:
        """
        A hypervisor that is not there is an error naming it, exit 1. (A subprocess:
        the command runs its own reactor.)
        """
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hypervisor.cli.vm_control",
                f"-hypervisorPortNum={support.free_port()}",
                "list-vms",
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(r.returncode, 1)
        self.assertIn("error listing VMs: cannot reach", r.stderr)


class EndToEndTests(SynchronousTestCase):
    """
    The real daemon, real libvirtd, the tiny guest, driven by the CLIs.
    """

    def test_create_list_info_stop_start_destroy(self) -> None:
        """
        hyper-control sets up a subnet and addresses; vm-control creates the tiny guest
        (progress on stderr, IP on stdout), lists it, shows it, stops, starts and
        destroys it; a stranger's certificate cannot stop it.
        """
        support.require_libvirtd()
        guest = support.tiny_guest()
        support.ensure_bridge()
        d, cli = support.tls_daemon(
            self,
            {"admin": "Hypervisor.*", "bob": ""},
            "-domainType=qemu",
            f"-localImagesDirectory={guest}",
        )

        r = cli(
            "hyper_control",
            "admin",
            "add-subnet",
            "hvtest",
            "10.77.0.1",
            "255.255.255.0",
            "10.77.0.1",
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        r = cli("hyper_control", "bob", "add-address", "52:54:0a:4d:00:09", "10.77.0.9")
        self.assertEqual(r.returncode, 1)
        self.assertIn("denied", r.stderr)
        r = cli("hyper_control", "admin", "add-address", "52:54:0a:4d:00:02", "10.77.0.2")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = cli(
            "vm_control",
            "admin",
            "-memory",
            "128M",
            "-milliCPUs",
            "500",
            "-minFreeBytes",
            "1M",
            "-roundupPower",
            "0",
            "-vmTags",
            "Name=tiny",
            "-dhcpTimeout=0s",
            "-logDebugLevel=0",
            f"-kernelURL=file://{guest}/vmlinux",
            f"-initrdURL=file://{guest}/initrd.cpio",
            "-extraKernelOptions",
            "quiet hv.dhcp=no hv.mode=stay",
            "create-vm",
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "10.77.0.2")
        self.assertIn("starting VM 10.77.0.2", r.stderr)
        self.assertEqual(cli("vm_control", "bob", "list-vms").stdout.split(), ["10.77.0.2"])
        info = json.loads(cli("vm_control", "bob", "get-vm-info", "10.77.0.2").stdout)
        self.assertEqual((info["State"], info["Tags"]["Name"]), ("running", "tiny"))
        r = cli("vm_control", "bob", "stop-vm", "10.77.0.2")
        self.assertEqual(r.returncode, 1)
        self.assertIn("no access to VM 10.77.0.2", r.stderr)
        bootlog = os.path.join(d.state_dir, "VMs", "10.77.0.2", "bootlog")
        support.wait_for(
            lambda: "staying up" in open(bootlog, errors="replace").read(), 90, "the guest to boot"
        )
        r = cli("vm_control", "admin", "stop-vm", "10.77.0.2")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("power button", open(bootlog, errors="replace").read())
        info = json.loads(cli("vm_control", "admin", "get-vm-info", "10.77.0.2").stdout)
        self.assertEqual(info["State"], "stopped")
        r = cli("vm_control", "admin", "-dhcpTimeout=0s", "start-vm", "10.77.0.2")
        self.assertEqual(r.returncode, 0, r.stderr)
        r = cli("vm_control", "admin", "destroy-vm", "10.77.0.2")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(cli("vm_control", "admin", "list-vms").stdout.strip(), "")
        r = cli("vm_control", "admin", "get-vm-info", "10.77.0.2")
        self.assertEqual(r.returncode, 1)
        self.assertIn("error getting VM info: no VM with IP 10.77.0.2", r.stderr)
