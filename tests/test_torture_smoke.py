"""
The kill -9 torture of C{bench/torture.py} in its smoke mode (5 iterations): the real
daemon on the real libvirtd, SIGKILLed and restarted, with every invariant checked
from the outside. The long run (200 iterations) stays in C{bench/}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from tests import support


def count(table: str, label: str) -> str:
    """
    The count column of the one table row starting with C{label}.
    """
    rows = [line for line in table.splitlines() if line.startswith(label + "  ")]
    if len(rows) != 1:
        raise AssertionError(f"expected one row {label!r} in:\n{table}")
    return rows[0][len(label) :].split()[0]


class TortureSmokeTests(SynchronousTestCase):
    """
    C{python -m bench.torture --iterations 5}.
    """

    def test_smoke_run_holds_every_invariant(self) -> None:
        """
        Five random operations (seed 6, empty root volumes: several SIGKILLs, at least
        one with a request in flight, each followed by a restart) leave no lost VM,
        leaked domain, leaked or double-assigned address, leaked volume file or
        check-vms problem: the run exits 0 and prints its table with every
        must-be-zero row at 0, and leaves no domain of its subnet behind.
        """
        support.require_libvirtd()
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.torture",
                "--iterations",
                "5",
                "--seed",
                "6",
                "--settle",
                "10",
                "--guest",
                "none",
                "--kill-probability",
                "0.5",
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            capture_output=True,
            text=True,
            timeout=600,
        )
        report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
        self.assertEqual(result.returncode, 0, report)
        table = result.stdout
        self.assertEqual(count(table, "iterations"), "5", report)
        self.assertGreaterEqual(int(count(table, "kills (SIGKILL + restart)")), 1, report)
        self.assertGreaterEqual(int(count(table, "  of which with a request in flight")), 1, report)
        for label in (
            "lost VMs",
            "leaked domains",
            "leaked addresses",
            "double-assigned addresses",
            "leaked volume files",
            "check-vms problems",
        ):
            self.assertEqual(count(table, label), "0", f"{label}\n{report}")
        self.assertNotIn("FAIL", table, report)
        # it cleaned up after itself: no domain of its subnet remains
        subnet = [line for line in table.splitlines() if "subnet 10.79." in line]
        self.assertEqual(len(subnet), 1, report)
        prefix = "vm-" + subnet[0].split("subnet ")[1].split("/")[0].rsplit(".", 1)[0] + "."
        listed = subprocess.run(
            ["virsh", "-c", support.QEMU_URI, "list", "--all", "--name"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotIn(prefix, listed.stdout)


class TortureCheckerTests(SynchronousTestCase):
    """
    The torture's invariant checks on a made-up snapshot (no daemon, no libvirt).
    """

    def test_each_kind_of_violation_is_found(self) -> None:
        """
        A snapshot with one defect of each kind yields exactly those violations: a
        lost VM, a reported VM without info.json, a VM directory without a VM, a
        domain without a VM, a running VM without a domain, an address registered but
        neither free nor used, an address free and used, an address used by two VMs, a
        used address that is not registered, a volume directory without a VM and a
        VM whose root volume has the wrong size; a consistent VM yields none.
        """
        import tempfile

        from bench import torture

        root = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, root, True)
        t = torture.Torture(5, 1, 0.0, 0.0, "none", False, False)
        t.daemon = torture.Daemon(root, None)
        volumes = t.daemon.volume_dir

        def info(
            ip: str,
            mac: str,
            state: str = "stopped",
            size: int = 4096,
            secondary: tuple[str, str] = ("", ""),
        ) -> dict:
            os.makedirs(os.path.join(volumes, ip), exist_ok=True)
            with open(os.path.join(volumes, ip, "root"), "wb") as f:
                f.truncate(4096)
            return {
                "Address": {"IpAddress": ip, "MacAddress": mac},
                "State": state,
                "SecondaryAddresses": (
                    [{"IpAddress": secondary[0], "MacAddress": secondary[1]}]
                    if secondary[0]
                    else []
                ),
                "Volumes": [{"Size": size}],
                "VolumeLocations": [
                    {"DirectoryToCleanup": f"{volumes}/{ip}", "Filename": f"{volumes}/{ip}/root"}
                ],
            }

        good = info("10.0.0.1", "m1")
        running = info("10.0.0.2", "m2", state="running")
        free_and_used = info("10.0.0.3", "m3")
        twice_a = info("10.0.0.4", "m4", secondary=("10.0.0.9", "m9"))
        twice_b = info("10.0.0.5", "m5", secondary=("10.0.0.9", "m9"))
        wrong_size = info("10.0.0.6", "m6", size=8192)
        unregistered = info("10.0.0.7", "m7")
        os.makedirs(os.path.join(volumes, "10.0.0.99"))
        infos = {
            "10.0.0.1": good,
            "10.0.0.2": running,
            "10.0.0.3": free_and_used,
            "10.0.0.4": twice_a,
            "10.0.0.5": twice_b,
            "10.0.0.6": wrong_size,
            "10.0.0.7": unregistered,
            "10.0.0.8": None,
        }
        reported = {ip: i for ip, i in infos.items() if i is not None}
        reported["10.0.0.10"] = {"State": "stopped"}  # no info.json
        del reported["10.0.0.7"]  # so VMs/10.0.0.7 has no VM
        t.known = {"10.0.0.1", "10.0.0.11"}  # 10.0.0.11 is gone: lost
        registered = [
            {"IpAddress": f"10.0.0.{i}", "MacAddress": f"m{i}"} for i in (1, 2, 3, 4, 5, 6, 9, 12)
        ]
        pool = {"Free": [{"IpAddress": "10.0.0.3", "MacAddress": "m3"}], "Registered": registered}
        domains = [
            torture.DomainView("vm-10.0.0.1", "u1", False, "10.0.0.1"),
            torture.DomainView("vm-10.0.0.13", "u13", True, "10.0.0.13"),
        ]
        snap = torture.Snapshot(reported, infos, pool, domains, sorted(os.listdir(volumes)))
        found = set(t.problems(snap))
        self.assertEqual(
            found,
            {
                ("lost_vm", "10.0.0.11"),
                ("no_info", "10.0.0.10"),
                ("orphan_dir", "10.0.0.7"),
                ("orphan_dir", "10.0.0.8"),
                ("leaked_domain", "vm-10.0.0.13"),
                ("state_mismatch", "10.0.0.2"),
                ("leaked_address", "10.0.0.12"),
                ("double_address", "10.0.0.3"),
                ("double_address", "10.0.0.9"),
                ("unregistered_address", "10.0.0.7"),
                ("leaked_volume", "10.0.0.99"),
                ("bad_volume", "10.0.0.6"),
            },
        )
