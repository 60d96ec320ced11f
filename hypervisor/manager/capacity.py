# -*- test-case-name: tests.test_manager_vms -*-
"""
Host capacity and admission (reference §11): no milliCPU or memory overcommit, thick
volumes that must fit in their volume directory.

Every refusal says what is short and by how much.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Protocol, Union

from hypervisor.errors import InsufficientCapacity
from hypervisor.model import VmInfo

MiB = 1024 * 1024
GiB = 1024 * MiB


class IHost(Protocol):
    """
    What admission needs to know about the host (a fake in tests).
    """

    def num_cpus(self) -> int:
        """
        Online CPUs.
        """

    def memory(self) -> tuple[int, int]:
        """
        (MemTotal, MemAvailable) in MiB.
        """

    def storage(self, directory: str) -> tuple[int, int]:
        """
        (size, available) in bytes of the file system holding C{directory}.
        """


class Host:
    """
    The real host: C{os.cpu_count}, C{/proc/meminfo}, C{statvfs}.
    """

    def __init__(self, meminfo: str = "/proc/meminfo") -> None:
        self.meminfo = meminfo

    def num_cpus(self) -> int:
        """
        Online CPUs.
        """
        return os.cpu_count() or 1

    def memory(self) -> tuple[int, int]:
        """
        (MemTotal, MemAvailable) in MiB from /proc/meminfo.
        """
        values: dict[str, int] = {}
        with open(self.meminfo) as f:
            for line in f:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    values[name] = int(parts[0])
        return values.get("MemTotal", 0) // 1024, values.get("MemAvailable", 0) // 1024

    def storage(self, directory: str) -> tuple[int, int]:
        """
        (size, available) of the file system holding C{directory}.
        """
        st = os.statvfs(directory)
        return st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize

    def storage_free(self, directory: str) -> int:
        """
        Free bytes (to root) of the file system holding C{directory}.
        """
        st = os.statvfs(directory)
        return st.f_bfree * st.f_frsize


@dataclass
class Usage:
    """
    What the VMs hold (all VMs, in any state: the reference reserves for all).
    """

    milli_cpus: int
    memory_mib: int


def usage(vms: Iterable[VmInfo]) -> Usage:
    """
    Sum milliCPUs and memory over VMs.
    """
    cpu = mem = 0
    for vm in vms:
        cpu += vm.MilliCPUs
        mem += vm.MemoryInMiB
    return Usage(cpu, mem)


def check_cpu_and_memory(
    host: IHost,
    vms: Union[Iterable[VmInfo], Usage],
    milli_cpus: int,
    memory_mib: int,
    check_available: bool = True,
) -> None:
    """
    Refuse an allocation of C{milli_cpus} and C{memory_mib} that does not fit.

    @param vms: the VMs already placed, or what they hold (kept by the VM table).
    """
    used = vms if isinstance(vms, Usage) else usage(vms)
    available_cpu = host.num_cpus() * 1000 - used.milli_cpus
    if milli_cpus > available_cpu:
        raise InsufficientCapacity(
            f"not enough CPU: {milli_cpus} milliCPUs requested, {max(available_cpu, 0)} "
            f"available ({milli_cpus - max(available_cpu, 0)} short)"
        )
    total, available = host.memory()
    unallocated = total - used.memory_mib
    if memory_mib > unallocated:
        raise InsufficientCapacity(
            f"not enough memory: {memory_mib} MiB requested, {max(unallocated, 0)} MiB "
            f"unallocated ({memory_mib - max(unallocated, 0)} MiB short)"
        )
    if check_available and memory_mib >= available:
        raise InsufficientCapacity(
            f"not enough free memory: {memory_mib} MiB requested, {available} MiB "
            f"available on the host ({memory_mib - available + 1} MiB short)"
        )


def check_storage(host: IHost, directory: str, needed: int, reserved: int = 0) -> None:
    """
    Refuse C{needed} new bytes in C{directory} when they do not fit (1 GiB is kept
    free on the root file system).

    @param reserved: bytes already promised to volumes there but not yet allocated.
    """
    size, available = host.storage(directory)
    keep = GiB if os.stat(directory).st_dev == os.stat("/").st_dev else 0
    usable = available - reserved - keep
    if needed > usable:
        raise InsufficientCapacity(
            f"not enough storage in {directory}: {needed // MiB} MiB needed, "
            f"{max(usable, 0) // MiB} MiB usable ({(needed - max(usable, 0)) // MiB + 1} "
            "MiB short)"
        )
