"""
C{bench/scale.py} keeps working as the daemon changes: its smoke mode (5 VMs, a few
calls) on the real daemon and libvirtd, and its table and profile report on made-up
figures. The real measurement (1000 VMs and more) stays in C{bench/}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from bench import scale
from tests import support


def cells(table: str, label: str) -> list[str]:
    """
    The cells after C{label} of the one table row starting with it.
    """
    rows = [line for line in table.splitlines() if line.startswith(label + "  ")]
    if len(rows) != 1:
        raise AssertionError(f"expected one row {label!r} in:\n{table}")
    return rows[0][len(label) :].split()


class ScaleSmokeTests(SynchronousTestCase):
    """
    C{python -m bench.scale --vms 5}.
    """

    def test_smoke_run_measures_everything_and_cleans_up(self) -> None:
        """
        With 5 VMs (3 created by one client, 2 by two clients) and a few calls of
        each kind, the bench exits 0, prints a number for every measure in the N=5
        column, reports no reconnect of a keep-alive connection, and leaves neither
        files in its directory nor a libvirt domain of its network behind.
        """
        support.require_libvirtd()
        parent = tempfile.mkdtemp(prefix="hv-scale-smoke-")
        self.addCleanup(shutil.rmtree, parent, True)
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.scale",
                "--vms",
                "5",
                "--clients",
                "2",
                "--getvminfo-calls",
                "20",
                "--listvms-calls",
                "10",
                "--page-loads",
                "5",
                "--dir",
                parent,
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            capture_output=True,
            text=True,
            timeout=300,
        )
        report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
        self.assertEqual(result.returncode, 0, report)
        for row in scale.ROWS:
            label = row.label.replace("C clients", "2 clients")
            value = cells(result.stdout, label)[0]
            self.assertNotEqual(value, "-", f"{label}\n{report}")
            float(value)
        self.assertNotIn("reconnects", result.stdout, report)
        self.assertNotIn("FAILED", result.stdout, report)
        self.assertEqual(os.listdir(parent), [], report)
        network = [line for line in result.stderr.splitlines() if "subnet 10." in line]
        self.assertTrue(network, report)
        prefix = "vm-" + network[0].split("subnet ")[1].split(".0.0/")[0] + "."
        listed = subprocess.run(
            ["virsh", "-c", support.QEMU_URI, "list", "--all", "--name"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotIn(prefix, listed.stdout)


class ScaleReportTests(SynchronousTestCase):
    """
    The table and the profile report, on made-up figures (no daemon, no libvirt).
    """

    def test_table_has_reference_ratio_and_goal(self) -> None:
        """
        The table has a column per N, the Go figure, ours at 1000 over Go (Go over
        ours for rates, so that above 1.0 is worse either way) and the goal; a
        measure not taken shows '-'.
        """
        runs = {
            100: {"getvminfo_p99": 0.5, "create_rate_1": 200.0},
            1000: {"getvminfo_p99": 1.34, "create_rate_1": 46.5},
        }
        text = scale.table(runs, clients=8)
        self.assertIn("N=100", text.splitlines()[0])
        self.assertIn("N=1000", text.splitlines()[0])
        self.assertEqual(
            cells(text, "GetVmInfo p99 (ms)"), ["0.50", "1.34", "0.67", "2.00x", "<=", "1.0x"]
        )
        self.assertEqual(
            cells(text, "CreateVm+Ack rate, 1 client (/s)"),
            ["200.0", "46.5", "93.0", "2.00x", ">=", "1.0x"],
        )
        self.assertEqual(cells(text, "ListVMs p50 (ms)")[:4], ["-", "-", "2.60", "-"])
        self.assertIn("CreateVm+Ack rate, 8 clients (/s)", text)

    def test_percentile_is_nearest_rank(self) -> None:
        """
        p50 and p99 of 1..100 are 50 and 99; of one value, that value.
        """
        values = [float(v) for v in range(100, 0, -1)]
        self.assertEqual(scale.percentile(values, 50), 50.0)
        self.assertEqual(scale.percentile(values, 99), 99.0)
        self.assertEqual(scale.percentile([3.0], 99), 3.0)

    def test_profile_report_counts_busy_samples_only(self) -> None:
        """
        Samples waiting in epoll or on a pool's queue are idle: busy shares, self
        and cumulative percentages count the rest, per thread kind, the main thread
        known by its ID even before it has a name.
        """
        main = "thread (42): MainThread"
        base = [main, "_run_module_as_main (<frozen runpy>)", "ReactorBase.mainLoop (b.py)"]
        pool = ["thread (43): PoolThread-disk-0", "Thread._bootstrap (threading.py)"]
        phase = scale.PhaseProfile("GetVmInfo", pid=42, seconds=1.0, rate=100)
        phase.stacks = [
            (base + ["EPollReactor.doPoll (twisted/internet/epollreactor.py)"], 50),
            (base + ["RpcCall._invoke (web/rpc.py)", "encode (hypervisor/codec.py)"], 30),
            (["thread (42)", "_find_and_load (<frozen importlib._bootstrap>)"], 10),
            (base + ["RpcCall._invoke (web/rpc.py)"], 10),
            (pool + ["Condition.wait (threading.py)"], 60),
            (pool + ["atomic_write (hypervisor/store.py)"], 40),
        ]
        profiler = scale.Profiler.__new__(scale.Profiler)
        profiler.phases = [phase]
        text = profiler.report(top=5)
        self.assertIn("MainThread x1 50%", text)
        self.assertIn("PoolThread-disk x1 40%", text)
        self.assertIn("30.0%   60.0%  encode (hypervisor/codec.py)", text)
        self.assertIn("40.0%   80.0%  RpcCall._invoke (web/rpc.py)", text)
        self.assertIn("40.0%  100.0%  atomic_write (hypervisor/store.py)", text)
        self.assertNotIn("doPoll", text)
        self.assertNotIn("Condition.wait", text)
