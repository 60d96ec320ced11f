"""
Benchmark: MigrateVm of a VM with a 1 GiB root volume between two of our daemons on
this host (two state directories, two ports, one libvirtd; SRPC with TLS on
loopback), beside C{rsync} of the same volume file in the same run.

    .venv/bin/python -m bench.migrate [-n 3] [--size-mib 1024]

As root, with libvirtd running (tools/start-libvirtd.sh). Each round migrates the
tiny guest A -> B, then B -> A, timed from the MigrateVm call until its C{Final}
(the client commits at once): I{stopped} VMs (PrepareVmForMigration, one pass of
ReadVmVolume, start on the target, commit, source destroyed) and I{running} ones
(one pass while the source runs, ACPI stop, then the re-sync pass that hashes the
volume on both sides and sends only changed chunks, start, commit). The peers:
C{rsync -a} of the source's root file to a fresh file (local, whole-file, as rsync
does between local paths) and C{rsync -I --inplace --no-whole-file} onto an existing
identical copy (its delta algorithm: what our re-sync is to a first pass).

Prints a table: median, min, max seconds and MiB/s. The volume is first the guest's
thick root as CreateVm makes it (allocated, all zeros: what most of a young VM's
volume is), whose zero chunks travel as a flag (C{ZeroChunks}); then the stopped VM's
root is filled with random bytes and migrated again, and rsync copies that file: every
byte read, hashed, encrypted and written.
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
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import support  # noqa: E402
from tests.test_migration_real import Pair  # noqa: E402

MiB = 1024 * 1024
BRIDGE = "br@hvbench93"
SUBNET = "hvbench93"


class Cleanups:
    """
    What L{Pair} and L{support.Daemon} expect of a test case: C{addCleanup}.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def addCleanup(self, f: Callable[..., Any], *args: Any) -> None:  # noqa: N802 - trial's name
        self.calls.append((f, args))

    def run(self) -> None:
        for f, args in reversed(self.calls):
            try:
                f(*args)
            except Exception as e:  # noqa: BLE001 - clean up the rest anyway
                print(f"cleanup: {e}", file=sys.stderr)


def create(pair: Pair, d: support.Daemon, guest: str, size: int, running: bool) -> str:
    request = {
        "MemoryInMiB": 128,
        "MilliCPUs": 500,
        "SubnetId": SUBNET,
        "ExtraKernelOptions": "quiet hv.mode=stay hv.dhcp=no",
        "DoNotStart": not running,
        "MinimumFreeBytes": size,
        "KernelURL": f"file://{guest}/vmlinux",
        "InitrdURL": f"file://{guest}/initrd.cpio",
    }
    with pair.connect(d) as c:
        final = list(c.call_stream("CreateVm", request))[-1]
        if final.get("Error"):
            raise SystemExit(f"CreateVm: {final['Error']}")
        ip = str(final["IpAddress"])
        c.call("AcknowledgeVm", {"IpAddress": ip})
    return ip


def migrate(pair: Pair, source: support.Daemon, target: support.Daemon, ip: str) -> float:
    start = time.monotonic()
    messages = pair.migrate(source, target, ip)
    if messages[-1].get("Error"):
        raise SystemExit(f"MigrateVm: {messages[-1]['Error']}")
    return time.monotonic() - start


def wait_booted(d: support.Daemon, ip: str) -> None:
    """
    Wait until the guest at C{ip} on C{d} has booted (it then obeys ACPI's power
    button).
    """
    support.wait_booted(os.path.join(d.state_dir, "VMs", ip, "bootlog"), 180)


def fill_random(path: str, size: int) -> None:
    """
    Overwrite the file at C{path} with C{size} random bytes, to disk.
    """
    with open(path, "r+b") as f:
        for _ in range(0, size, 8 * MiB):
            f.write(os.urandom(min(8 * MiB, size - f.tell())))
        f.flush()
        os.fsync(f.fileno())


def timed(argv: list[str]) -> float:
    start = time.monotonic()
    subprocess.run(argv, check=True)
    os.sync()
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=3, help="rounds (each: A->B and B->A)")
    parser.add_argument("--size-mib", type=int, default=1024, help="root volume size")
    args = parser.parse_args()
    support.require_libvirtd()
    guest = support.tiny_guest()
    size = args.size_mib * MiB
    cleanups = Cleanups()
    if not os.path.exists(f"/sys/class/net/{BRIDGE}"):
        subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
        cleanups.addCleanup(subprocess.run, ["ip", "link", "del", BRIDGE])
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True)
    results: dict[str, list[float]] = {}
    try:
        pair = Pair(cleanups)  # type: ignore[arg-type]
        a, b = pair.daemons
        for d in (a, b):
            d.start()
            for subnet in (SUBNET,):
                reply = pair.call(
                    d,
                    "UpdateSubnets",
                    {"Add": [{"Id": subnet, "IpGateway": "10.94.0.1", "IpMask": "255.255.255.0"}]},
                    pair.admin,
                )
                assert not reply.get("Error"), reply
        reply = pair.call(
            a,
            "ChangeAddressPool",
            {
                "AddressesToAdd": [
                    {"IpAddress": "10.94.0.2", "MacAddress": "52:54:0a:5e:00:02"},
                    {"IpAddress": "10.94.0.3", "MacAddress": "52:54:0a:5e:00:03"},
                ]
            },
            pair.admin,
        )
        assert not reply.get("Error"), reply
        stopped_ip = create(pair, a, guest, size, running=False)
        running_ip = create(pair, a, guest, size, running=True)
        root = os.path.join(a.dir, "volumes", stopped_ip, "root")
        for label, ip in (
            ("MigrateVm, stopped VM (root of zeros)", stopped_ip),
            ("MigrateVm, running VM (root of zeros)", running_ip),
            ("MigrateVm, stopped VM (root of random bytes)", stopped_ip),
        ):
            if "random" in label:  # the stopped VM is back on A after an even count
                fill_random(root, size)
            times = results.setdefault(label, [])
            where = a
            for _ in range(args.n * 2):
                other = b if where is a else a
                if ip == running_ip:
                    # A guest still booting ignores the ACPI stop, and StopVm waits for
                    # it: time the migration, not the boot.
                    wait_booted(where, ip)
                times.append(migrate(pair, where, other, ip))
                where = other
                if ip == stopped_ip:  # the target starts it, as the reference's does
                    reply = pair.call(where, "StopVm", {"IpAddress": ip})
                    if reply.get("Error"):
                        raise SystemExit(f"StopVm: {reply['Error']}")
        # The peers, on the same file (the stopped VM's root of random bytes, on A).
        scratch = tempfile.mkdtemp(prefix="hv-bench-migrate-", dir=a.dir)
        full = results.setdefault("rsync -a (new file, random bytes)", [])
        delta = results.setdefault("rsync -I --inplace --no-whole-file (same file)", [])
        for _ in range(args.n * 2):
            dest = os.path.join(scratch, "root")
            if os.path.exists(dest):
                os.unlink(dest)
            os.sync()
            full.append(timed(["rsync", "-a", root, dest]))
            # -I: compare every block (rsync's quick check would skip the same-size,
            # same-mtime file without reading it).
            delta.append(timed(["rsync", "-a", "-I", "--inplace", "--no-whole-file", root, dest]))
        shutil.rmtree(scratch, ignore_errors=True)
        for ip in (stopped_ip, running_ip):
            for d in (a, b):
                pair.call(d, "DestroyVm", {"IpAddress": ip})
    finally:
        cleanups.run()
    print(
        f"\n{args.size_mib} MiB root volume, {args.n * 2} runs each (host: {os.cpu_count()} CPUs)\n"
    )
    print(f"{'what':52} {'median s':>9} {'min s':>7} {'max s':>7} {'MiB/s':>7}")
    for label, times in results.items():
        median = statistics.median(times)
        print(
            f"{label:52} {median:9.2f} {min(times):7.2f} {max(times):7.2f} "
            f"{args.size_mib / median:7.0f}"
        )


if __name__ == "__main__":
    main()
