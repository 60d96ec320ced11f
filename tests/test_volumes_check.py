"""
Tests for C{hypervisor check-vms} and C{repair-vm-volume-allocations}
(L{hypervisor.manager.volumes}).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.manager import volumes
from hypervisor.store import StateDirectory

MiB = 1024 * 1024


class CheckVmsTests(SynchronousTestCase):
    """
    Volume size and allocation checks on a state directory.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.state = StateDirectory(os.path.join(self.dir, "state"))
        os.makedirs(self.state.vms_path)
        self.volumes = os.path.join(self.dir, "volumes")
        os.makedirs(self.volumes)

    def add_vm(self, ip: str, files: list[tuple[str, int, int]]) -> list[str]:
        """
        Add a VM whose volumes are (name, recorded size, actual allocated bytes) files.
        """
        paths = []
        for name, size, allocated in files:
            path = os.path.join(self.volumes, f"{ip}-{name}")
            with open(path, "wb") as f:
                f.truncate(size)
                if allocated:
                    os.posix_fallocate(f.fileno(), 0, allocated)
            paths.append(path)
        os.makedirs(os.path.join(self.state.vms_path, ip))
        info = {
            "Address": {"IpAddress": ip, "MacAddress": "52:54:00:00:00:01"},
            "Volumes": [{"Size": size} for _, size, _ in files],
            "VolumeLocations": [{"Filename": p, "DirectoryToCleanup": self.volumes} for p in paths],
        }
        with open(os.path.join(self.state.vms_path, ip, "info.json"), "w") as f:
            json.dump(info, f)
        return paths

    def run_command(self, repair: bool) -> tuple[int, str]:
        out = io.StringIO()
        code = volumes.check_command(self.state, repair=repair, out=out)
        return code, out.getvalue()

    def test_all_good(self) -> None:
        """
        Fully allocated volumes of the recorded size pass (exit 0).
        """
        self.add_vm("10.0.0.2", [("root", 4 * MiB, 4 * MiB)])
        code, out = self.run_command(repair=False)
        self.assertEqual(code, 0, out)
        self.assertIn("Total allocation increase required: 0 bytes", out)
        self.assertIn("1 volumes checked", out)

    def test_sparse_reported_then_repaired(self) -> None:
        """
        A sparse volume is reported with the missing bytes; repair allocates them
        without changing size or content; a second check passes.
        """
        root, data = self.add_vm("10.0.0.3", [("root", 4 * MiB, 0), ("data", 2 * MiB, MiB)])
        with open(root, "r+b") as f:
            f.write(b"boot sector")
        code, out = self.run_command(repair=False)
        self.assertEqual(code, 1)
        self.assertIn("volume 0", out)
        self.assertIn("volume 1", out)
        self.assertRegex(out, r"Total allocation increase required: \d+ bytes")
        required = int(out.split("required: ")[1].split()[0])
        self.assertGreaterEqual(required, 5 * MiB - 8192)
        code, out = self.run_command(repair=True)
        self.assertEqual(code, 0, out)
        self.assertIn("Total allocation increase:", out)
        self.assertEqual(os.path.getsize(root), 4 * MiB)
        with open(root, "rb") as f:
            self.assertEqual(f.read(11), b"boot sector")
        self.assertEqual(self.run_command(repair=False)[0], 0)

    def test_size_mismatch_and_missing_file(self) -> None:
        """
        A size different from info.json and a missing file are reported, not repaired.
        """
        (root,) = self.add_vm("10.0.0.4", [("root", 4 * MiB, 4 * MiB)])
        with open(root, "r+b") as f:
            f.truncate(3 * MiB)
        (gone,) = self.add_vm("10.0.0.5", [("root", MiB, MiB)])
        os.unlink(gone)
        code, out = self.run_command(repair=True)
        self.assertEqual(code, 1)
        self.assertIn(f"size {3 * MiB} bytes, expected {4 * MiB}", out)
        self.assertIn("No such file", out)
        self.assertEqual(os.path.getsize(root), 3 * MiB)

    def test_overlays(self) -> None:
        """
        A qcow2 overlay (made by qemu-img on a base) is neither sized nor allocated
        by repair; a missing base is reported.
        """
        base = os.path.join(self.volumes, "base.raw")
        with open(base, "wb") as f:
            f.truncate(4 * MiB)
        (root,) = self.add_vm("10.0.0.6", [("root", 4 * MiB, 0)])
        os.unlink(root)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", base, root],
            check=True,
        )
        size = os.path.getsize(root)
        code, out = self.run_command(repair=True)
        self.assertEqual(code, 0, out)
        self.assertIn(f"qcow2 overlay on {base}", out)
        self.assertIn("Total allocation increase: 0 bytes", out)
        self.assertEqual(os.path.getsize(root), size)
        os.unlink(base)
        code, out = self.run_command(repair=False)
        self.assertEqual(code, 1)
        self.assertIn(f"backing file {base} is missing", out)

    def test_unreadable_info(self) -> None:
        """
        A corrupt info.json is reported and the others are still checked.
        """
        self.add_vm("10.0.0.6", [("root", MiB, MiB)])
        os.makedirs(os.path.join(self.state.vms_path, "10.0.0.7"))
        with open(os.path.join(self.state.vms_path, "10.0.0.7", "info.json"), "w") as f:
            f.write("{not json")
        code, out = self.run_command(repair=False)
        self.assertEqual(code, 1)
        self.assertIn("10.0.0.7/info.json: unreadable", out)
        self.assertIn("1 volumes checked", out)

    def test_refused_while_daemon_runs(self) -> None:
        """
        With the state directory locked by a running daemon, both commands refuse.
        """
        holder = StateDirectory(self.state.path)
        holder.lock()
        self.addCleanup(holder.unlock)
        code, _ = self.run_command(repair=True)
        self.assertEqual(code, 1)
