"""
Benchmark: time from CreateVm to a running domain, against bare libvirt, same run.

    .venv/bin/python -m bench.create_vm [-n 10] [--memory 128]

As root, with libvirtd running (tools/start-libvirtd.sh). For each of N rounds:

- C{CreateVm} through the service layer (allocation, volume, info.json, domain XML,
  C{createXML}) of the tiny guest, timed until the call returns with the domain running;
- C{virsh create} of the very XML the manager produced;
- C{virConnect.createXML} of that XML from Python (libvirt's own cost, no process
  start).

Each VM is destroyed before the next round. Prints a table of median, p90, min and
max (seconds) and the daemon's overhead over each bare method. Goal: the daemon adds
at most 10 % over bare libvirt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hypervisor.api import HypervisorApi  # noqa: E402
from hypervisor.auth import ROOT, Identity  # noqa: E402
from hypervisor.manager.manager import Manager  # noqa: E402
from hypervisor.model import AccessRequest, IpRequest  # noqa: E402
from hypervisor.store import StateDirectory  # noqa: E402
from hypervisor.virt.connection import LibvirtService, start_event_loop  # noqa: E402
from hypervisor.virt.domainxml import build_domain_xml, domain_name  # noqa: E402
from tests import support  # noqa: E402
from tests.test_vms_real import guest_request, setup_network  # noqa: E402

ALICE = Identity(username="bench")


def row(name: str, values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(round(0.9 * (len(values) - 1))))]
    return (
        f"{name:<34} {statistics.median(values):>8.3f} {p90:>8.3f} "
        f"{values[0]:>8.3f} {values[-1]:>8.3f}"
    )


async def run(reactor: Any, rounds: int, memory: int) -> None:
    import libvirt

    start_event_loop()
    guest = support.tiny_guest()
    support.ensure_bridge()
    root = support.public_tempdir("hv-bench-")
    lv = LibvirtService(support.QEMU_URI, reactor)
    manager = Manager(
        StateDirectory(os.path.join(root, "state")),
        lv,
        reactor,
        domain_type="qemu",
        volume_directories=[os.path.join(root, "vol")],
        images_directory=guest,
    )
    manager.privilegedStartService()
    lv.startService()
    manager.startService()
    api = HypervisorApi(manager)
    conn = libvirt.open(support.QEMU_URI)
    try:
        while not lv.connected:
            await task.deferLater(reactor, 0.05, lambda: None)
        setup_network(api, count=2)
        daemon_t: list[float] = []
        virsh_t: list[float] = []
        api_t: list[float] = []
        for i in range(rounds):
            request = guest_request(guest, "stay")
            request.VmInfo.MemoryInMiB = memory
            t0 = time.perf_counter()
            response = await api.CreateVm(ALICE, request)
            daemon_t.append(time.perf_counter() - t0)
            ip = response.IpAddress
            api.AcknowledgeVm(ALICE, IpRequest(ip))
            xml = build_domain_xml(manager.vms[ip].info, manager._domain_spec(manager.vms[ip]))
            await api.DestroyVm(ALICE, AccessRequest(IpAddress=ip))
            # the same XML, bare: needs the files the VM had, so make them again
            vm_dir = os.path.join(root, "bare")
            shutil.rmtree(vm_dir, ignore_errors=True)
            os.makedirs(vm_dir, mode=0o755)
            for name in ("vmlinux", "initrd.cpio"):
                shutil.copyfile(os.path.join(guest, name), os.path.join(vm_dir, name))
            with open(os.path.join(vm_dir, "root"), "wb") as f:
                f.truncate(1 << 20)
            bare = (
                xml.replace(
                    os.path.join(root, "vol", ip, "kernel"), os.path.join(vm_dir, "vmlinux")
                )
                .replace(
                    os.path.join(root, "vol", ip, "initrd"), os.path.join(vm_dir, "initrd.cpio")
                )
                .replace(os.path.join(root, "vol", ip, "root"), os.path.join(vm_dir, "root"))
                .replace(
                    os.path.join(root, "state", "VMs", ip, "bootlog"),
                    os.path.join(vm_dir, "bootlog"),
                )
            )
            xml_path = os.path.join(root, "bare.xml")
            with open(xml_path, "w") as f:
                f.write(bare)
            t0 = time.perf_counter()
            subprocess.run(
                ["virsh", "-q", "-c", support.QEMU_URI, "create", xml_path],
                check=True,
                capture_output=True,
            )
            virsh_t.append(time.perf_counter() - t0)
            conn.lookupByName(domain_name(ip)).destroy()
            t0 = time.perf_counter()
            dom = conn.createXML(bare, 0)
            api_t.append(time.perf_counter() - t0)
            dom.destroy()
            print(
                f"round {i + 1}/{rounds}: CreateVm {daemon_t[-1]:.3f}s, virsh "
                f"{virsh_t[-1]:.3f}s, createXML {api_t[-1]:.3f}s",
                file=sys.stderr,
            )
        print()
        print(f"CreateVm -> domain running, tiny guest, {memory} MiB, N={rounds} " f"(seconds)")
        print(f"{'method':<34} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
        print(row("hypervisor CreateVm (service)", daemon_t))
        print(row("virsh create (same XML)", virsh_t))
        print(row("libvirt createXML (same XML)", api_t))
        m = statistics.median(daemon_t)
        for name, values in (("virsh create", virsh_t), ("createXML", api_t)):
            base = statistics.median(values)
            print(
                f"daemon overhead over {name}: {m - base:+.3f}s " f"({(m / base - 1) * 100:+.0f} %)"
            )
    finally:
        conn.close()
        await manager.stopService()
        await lv.stopService()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10, help="rounds (default 10)")
    parser.add_argument("--memory", type=int, default=128, help="MiB per VM")
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args.n, args.memory)))


if __name__ == "__main__":
    main()
