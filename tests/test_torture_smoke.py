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
    return rows[0][len(label):].split()[0]


class TortureSmokeTests(SynchronousTestCase):
    """
    C{python -m bench.torture --iterations 5}.
    """

    def test_smoke_run_holds_every_invariant(self) -> None:
        """
        Five random operations with at least one SIGKILL and restart leave no lost VM,
        leaked domain, leaked or double-assigned address, leaked volume file or
        check-vms problem: the run exits 0 and prints its table, every must-be-zero
        row at 0, and leaves no domain of its subnet behind.
        """
        support.require_libvirtd()
        result = subprocess.run(
            [sys.executable, "-m", "bench.torture", "--iterations", "5", "--seed", "5",
             "--settle", "10"],
            cwd=support.REPO, env=dict(os.environ, PYTHONPATH=support.REPO),
            capture_output=True, text=True, timeout=600,
        )
        report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
        self.assertEqual(result.returncode, 0, report)
        table = result.stdout
        self.assertEqual(count(table, "iterations"), "5", report)
        self.assertGreaterEqual(int(count(table, "kills (SIGKILL + restart)")), 1, report)
        for label in ("lost VMs", "leaked domains", "leaked addresses",
                      "double-assigned addresses", "leaked volume files",
                      "check-vms problems"):
            self.assertEqual(count(table, label), "0", f"{label}\n{report}")
        self.assertNotIn("FAIL", table, report)
        # it cleaned up after itself: no domain of its subnet remains
        subnet = [line for line in table.splitlines() if "subnet 10.79." in line]
        self.assertEqual(len(subnet), 1, report)
        prefix = "vm-" + subnet[0].split("subnet ")[1].split("/")[0].rsplit(".", 1)[0] + "."
        listed = subprocess.run(["virsh", "-c", support.QEMU_URI, "list", "--all",
                                 "--name"], capture_output=True, text=True, timeout=60)
        self.assertNotIn(prefix, listed.stdout)
