# -*- test-case-name: tests.test_volumes_check -*-
"""
Offline checks of VM volume files: C{hypervisor check-vms} and
C{hypervisor repair-vm-volume-allocations} (reference §9).

Volumes are thick: each file should have the size recorded in C{info.json}
(C{Volumes[i].Size}) and every one of its blocks allocated. A sparse or truncated
volume can fail at run time when the disk fills up. C{check-vms} reports both
problems; C{repair-vm-volume-allocations} allocates missing blocks with
C{fallocate} over the file's current size (never changing a file's size or content;
a size mismatch is reported for an operator to decide). A qcow2 volume (e.g. a root
that is an overlay on an image in the image cache) grows as it is written: it is not
checked for size or allocation, but a missing backing file is reported.

Both take the state directory's lock: they refuse to run while the daemon runs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import IO, Optional

from hypervisor.store import StateDirectory, StateDirectoryError

BLOCK = 512


@dataclass
class VolumeReport:
    """
    What was found for one volume file.
    """

    vm: str
    index: int
    path: str
    expected_size: int
    size: Optional[int]
    allocated: int
    error: str = ""
    qcow2: bool = False
    backing: str = ""

    @property
    def missing_allocation(self) -> int:
        """
        Bytes of the file that have no disk blocks behind them.
        """
        if self.size is None or self.qcow2:
            return 0
        needed = -(-self.size // BLOCK) * BLOCK
        return max(0, needed - self.allocated)


def _volume_paths(info: dict) -> list[tuple[int, str, int]]:
    volumes = info.get("Volumes") or []
    locations = info.get("VolumeLocations") or []
    out = []
    for index, location in enumerate(locations):
        filename = location.get("Filename") if isinstance(location, dict) else None
        if not filename:
            continue
        size = 0
        if index < len(volumes) and isinstance(volumes[index], dict):
            size = int(volumes[index].get("Size") or 0)
        out.append((index, filename, size))
    return out


def scan(state: StateDirectory) -> tuple[list[VolumeReport], list[str]]:
    """
    Examine every volume of every VM in the state directory.

    @return: the reports and the problems that prevented reading a VM at all.
    """
    reports: list[VolumeReport] = []
    problems: list[str] = []
    try:
        names = sorted(os.listdir(state.vms_path))
    except FileNotFoundError:
        return reports, problems
    for vm in names:
        path = os.path.join(state.vms_path, vm, "info.json")
        try:
            with open(path, encoding="utf-8") as f:
                info = json.load(f)
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            problems.append(f"{path}: unreadable: {e}")
            continue
        for index, filename, expected in _volume_paths(info):
            try:
                st = os.stat(filename)
            except OSError as e:
                reports.append(
                    VolumeReport(vm, index, filename, expected, None, 0, error=e.strerror or str(e))
                )
                continue
            report = VolumeReport(vm, index, filename, expected, st.st_size, st.st_blocks * 512)
            try:
                with open(filename, "rb") as f:
                    report.qcow2 = f.read(4) == b"QFI\xfb"
            except OSError:
                pass
            if report.qcow2:
                from hypervisor.manager.images import qcow2_backing_file

                backing = qcow2_backing_file(filename)
                if backing:
                    report.backing = os.path.join(os.path.dirname(filename), backing)
            reports.append(report)
    return reports, problems


def repair(report: VolumeReport) -> int:
    """
    Allocate every block of the volume file without changing its size or content.

    @return: bytes of allocation added.
    """
    if report.size is None or report.missing_allocation == 0:
        return 0
    fd = os.open(report.path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, report.size)
        after = os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)
    return max(0, after - report.allocated)


def check_command(state: StateDirectory, repair: bool = False, out: IO[str] = sys.stdout) -> int:
    """
    Run C{check-vms} (or C{repair-vm-volume-allocations}); return the exit status.
    """
    fix = globals()["repair"]
    try:
        state.lock()
    except StateDirectoryError as e:
        print(f"hypervisor: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError:
        print(f"hypervisor: no state directory at {state.path}", file=sys.stderr)
        return 1
    try:
        reports, problems = scan(state)
        for problem in problems:
            print(problem, file=out)
        total = 0
        bad = bool(problems)
        for r in reports:
            where = f"VM {r.vm} volume {r.index} ({r.path})"
            if r.error:
                print(f"{where}: {r.error}", file=out)
                bad = True
                continue
            if r.qcow2:
                # A qcow2 volume grows as the VM writes (an overlay on a cached image
                # when it has a backing file): no fixed size, not thick by design.
                if r.backing and not os.path.exists(r.backing):
                    print(f"{where}: backing file {r.backing} is missing", file=out)
                    bad = True
                elif r.backing:
                    print(f"{where}: qcow2 overlay on {r.backing}", file=out)
                continue
            if r.size != r.expected_size:
                print(f"{where}: size {r.size} bytes, expected {r.expected_size}", file=out)
                bad = True
            missing = r.missing_allocation
            if missing:
                if repair:
                    added = fix(r)
                    total += added
                    print(f"{where}: allocated {added} bytes", file=out)
                else:
                    total += missing
                    print(f"{where}: {missing} bytes not allocated", file=out)
                    bad = True
        if repair:
            print(f"Total allocation increase: {total} bytes", file=out)
        else:
            print(f"Total allocation increase required: {total} bytes", file=out)
        print(f"{len(reports)} volumes checked", file=out)
        return 1 if bad else 0
    finally:
        state.unlock()
