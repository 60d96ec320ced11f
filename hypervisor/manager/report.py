# -*- test-case-name: tests.test_pages -*-
"""
Summaries of the manager's in-memory state for pages and metrics: totals, usage per
owner, VMs per state, addresses per subnet, volume directories. Pure functions over
the model: rendering a page never calls libvirt.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Iterable, Optional

from hypervisor.manager.capacity import IHost
from hypervisor.manager.hoststats import mount_point
from hypervisor.manager.network import Subnets, subnet_network
from hypervisor.model import Address, State, VmInfo
from hypervisor.virt.domainxml import num_vcpus


@dataclass
class VmRow:
    """
    One line of /listVMs.
    """

    ip: str
    mac: str
    name: str
    state: str
    memory_mib: int
    milli_cpus: int
    vcpus: int
    volumes: int
    storage: int
    primary_owner: str


@dataclass
class Totals:
    """
    Sums over VMs (the TOTAL row), and per owner.
    """

    vms: int = 0
    memory_mib: int = 0
    milli_cpus: int = 0
    vcpus: int = 0
    volumes: int = 0
    storage: int = 0

    def add(self, row: VmRow) -> None:
        """
        Count one VM.
        """
        self.vms += 1
        self.memory_mib += row.memory_mib
        self.milli_cpus += row.milli_cpus
        self.vcpus += row.vcpus
        self.volumes += row.volumes
        self.storage += row.storage


def vm_row(info: VmInfo, host_cpus: int) -> VmRow:
    """
    The /listVMs row of a VM.
    """
    return VmRow(
        ip=info.ip,
        mac=info.Address.MacAddress,
        name=info.Tags.get("Name", ""),
        state=info.State.value,
        memory_mib=info.MemoryInMiB,
        milli_cpus=info.MilliCPUs,
        vcpus=num_vcpus(info, host_cpus),
        volumes=len(info.Volumes),
        storage=sum(v.effective_size for v in info.Volumes),
        primary_owner=info.primary_owner,
    )


def select(infos: Iterable[VmInfo], state: str = "", primary_owner: str = "") -> list[VmInfo]:
    """
    The /listVMs filters (C{state=}, C{primaryOwner=}), sorted by IP.
    """
    out = [
        i
        for i in infos
        if (not state or i.State.value == state)
        and (not primary_owner or i.primary_owner == primary_owner)
    ]
    return sorted(out, key=lambda i: _ip_key(i.ip))


def _ip_key(ip: str) -> int:
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return 0


def totals(rows: Iterable[VmRow]) -> tuple[Totals, dict[str, Totals]]:
    """
    The TOTAL row and one per primary owner (sorted by owner).
    """
    total = Totals()
    owners: dict[str, Totals] = {}
    for row in rows:
        total.add(row)
        owners.setdefault(row.primary_owner or "(none)", Totals()).add(row)
    return total, dict(sorted(owners.items()))


def states(infos: Iterable[VmInfo]) -> dict[str, int]:
    """
    Number of VMs in each state (every state listed, in the reference's order).
    """
    counts = {s.value: 0 for s in State}
    for info in infos:
        counts[info.State.value] += 1
    return counts


@dataclass
class PoolRow:
    """
    Addresses of one subnet.
    """

    subnet: str
    network: str
    free: int = 0
    registered: int = 0
    used: int = 0


def pool_by_subnet(
    free: list[Address], registered: list[Address], used: list[Address], subnets: Subnets
) -> list[PoolRow]:
    """
    Free, registered and used addresses per subnet (and one row for addresses in no
    known subnet, if any).
    """
    rows: dict[str, PoolRow] = {}
    for subnet in subnets.list(sort=True):
        rows[subnet.Id] = PoolRow(subnet.Id, str(subnet_network(subnet)))

    def row_for(address: Address) -> PoolRow:
        subnet = subnets.subnet_of(address.IpAddress) if address.IpAddress else None
        key = subnet.Id if subnet else ""
        if key not in rows:
            rows[key] = PoolRow("(none)", "")
        return rows[key]

    for a in free:
        row_for(a).free += 1
    for a in registered:
        row_for(a).registered += 1
    for a in used:
        row_for(a).used += 1
    return list(rows.values())


@dataclass
class VolumeDirectory:
    """
    A volume directory and its file system.
    """

    Directory: str
    MountPoint: str
    Size: int = 0
    Available: int = 0
    Error: str = ""
    CanTrim: bool = field(default=True)


def volume_directories(directories: list[str], host: IHost) -> list[VolumeDirectory]:
    """
    Each volume directory with its file system's size and free space: from the
    cached figures when C{host} keeps them (the daemon's
    L{hypervisor.manager.hoststats.HostStats}: no disk access), else read now.
    """
    snapshot = getattr(host, "snapshot", None)
    if snapshot is not None:
        return [
            VolumeDirectory(
                Directory=e.Directory,
                MountPoint=e.MountPoint,
                Size=e.Size,
                Available=e.Available,
                Error=e.Error,
            )
            for e in snapshot.directories
            if e.Directory in directories
        ]
    out = []
    for directory in directories:
        mp = mount_point(directory)
        entry = VolumeDirectory(Directory=directory, MountPoint=mp)
        try:
            entry.Size, entry.Available = host.storage(
                directory if os.path.exists(directory) else mp
            )
        except OSError as e:
            entry.Error = e.strerror or str(e)
        out.append(entry)
    return out


def human_bytes(n: Optional[int]) -> str:
    """
    C{1.5 GiB}-style sizes.
    """
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"
