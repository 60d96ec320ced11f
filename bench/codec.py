"""
Benchmark: the JSON codec (L{hypervisor.codec}) per message type, before and after.

    .venv/bin/python -m bench.codec [--before REV] [--vms 100]

"before" is the codec and model of git revision REV (default: the last one with the
reflective codec), loaded from git into modules of their own; "after" is the working
tree. Both encode the same values and decode the same bytes (the working tree's
encoding). Prints microseconds per call (best of 20 timeit rounds) and the speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import timeit
import types
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from hypervisor import codec, model  # noqa: E402

REFLECTIVE = "8d25641"
"""The last revision whose codec reflected on every call."""


def load_revision(rev: str) -> tuple[Any, Any]:
    """
    The codec and model modules of git revision C{rev}.
    """

    def source(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    old_codec = types.ModuleType("_codec_before")
    sys.modules[old_codec.__name__] = old_codec
    exec(compile(source("hypervisor/codec.py"), "codec@" + rev, "exec"), old_codec.__dict__)
    old_model = types.ModuleType("_model_before")
    sys.modules[old_model.__name__] = old_model
    text = source("hypervisor/model.py").replace(
        "from hypervisor.codec import", "from _codec_before import"
    )
    exec(compile(text, "model@" + rev, "exec"), old_model.__dict__)
    return old_codec, old_model


def values(m: Any, vms: int) -> dict[str, Any]:
    """
    The benchmark's values, built with model module C{m}: a typical VM (as in the
    SRPC transcripts), its info.json, a Go vm-control CreateVm request, a full
    Update with C{vms} VMs.
    """
    utc = datetime.timezone.utc
    when = datetime.datetime(2026, 11, 30, 7, 14, 31, 254025, tzinfo=utc)

    def info(n: int) -> Any:
        ip = f"10.77.{n // 250}.{n % 250 + 2}"
        return m.VmInfo(
            Address=m.Address(ip, "52:54:0a:4d:00:0a"),
            ChangedStateOn=when,
            CreatedOn=when,
            Hostname=f"vm-{n}",
            ImageName="ubuntu/22.04",
            MemoryInMiB=1024,
            MilliCPUs=1000,
            OwnerUsers=["testuser"],
            OwnerGroups=["team-a"],
            State=m.State.RUNNING,
            SubnetId="t",
            Tags={"Name": f"vm-{n}", "Team": "a"},
            Volumes=[m.Volume(Size=4294967296), m.Volume(Size=1 << 30)],
        )

    vm = info(0)
    local = m.LocalVmInfo(
        VmInfo=vm,
        VolumeLocations=[
            m.VolumeLocation(
                "/var/lib/hypervisor/volumes/10.77.0.2",
                "/var/lib/hypervisor/volumes/10.77.0.2/root",
            ),
            m.VolumeLocation("", "/var/lib/hypervisor/volumes/10.77.0.2/secondary-volume.0"),
        ],
    )
    infos = {i.Address.IpAddress: i for i in (info(n) for n in range(vms))}
    return {
        "VmInfo": vm,
        "GetVmInfoResponse": m.GetVmInfoResponse(VmInfo=vm),
        "LocalVmInfo": local,
        "CreateVmRequest": m.CreateVmRequest(
            VmInfo=m.VmInfo(
                Hostname="g1", MemoryInMiB=256, MilliCPUs=500, SubnetId="t", Tags={"Name": "x"}
            ),
            ImageDataSize=1048576,
            MinimumFreeBytes=268435456,
            RoundupPower=28,
            UserDataSize=66,
        ),
        "CreateVmResponse": m.CreateVmResponse(
            Final=True, IpAddress="10.77.0.11", ProgressMessage="starting VM 10.77.0.11"
        ),
        "IpRequest": m.IpRequest(IpAddress="10.77.0.10"),
        "AccessRequest": m.AccessRequest(IpAddress="10.77.0.10"),
        "ListVMsRequest": m.ListVMsRequest(Sort=True),
        "ListVMsResponse": m.ListVMsResponse(IpAddresses=sorted(infos)),
        "Update": m.Update(
            HaveAddressPool=True,
            AddressPool=[m.Address(f"10.77.9.{n}", "52:54:0a:4d:09:00") for n in range(16)],
            HaveDisabled=True,
            MemoryInMiB=65536,
            NumCPUs=16,
            NumFreeAddresses={"t": 16},
            HealthStatus="healthy",
            HaveVMs=True,
            VMs=infos,
        ),
    }


def per_call(fn: Callable[[], Any]) -> float:
    """
    Microseconds per call: the best of 20 rounds of about 50 ms (the minimum is
    what a noisy machine distorts least).
    """
    timer = timeit.Timer(fn)
    number, _ = timer.autorange()
    number = max(1, number // 4)
    return min(timer.repeat(20, number)) / number * 1e6


def main() -> None:
    """
    Print the table.
    """
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--before", default=REFLECTIVE, help="git revision to compare with")
    parser.add_argument("--vms", type=int, default=100, help="VMs in the Update")
    args = parser.parse_args()
    old_codec, old_model = load_revision(args.before)
    new = values(model, args.vms)
    old = values(old_model, args.vms)
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("VmInfo", "encode", {}),
        ("GetVmInfoResponse", "encode", {}),
        ("LocalVmInfo", "encode", {"indent": 4}),
        ("LocalVmInfo", "decode", {"trusted": True}),
        ("CreateVmRequest", "encode", {}),
        ("CreateVmRequest", "decode", {}),
        ("CreateVmResponse", "encode", {}),
        ("IpRequest", "decode", {}),
        ("AccessRequest", "decode", {}),
        ("ListVMsRequest", "decode", {}),
        ("ListVMsResponse", "encode", {}),
        ("Update", "encode", {}),
        ("Update", "decode", {}),
    ]
    print(f"codec: before = {args.before}, after = working tree; Update with {args.vms} VMs")
    print(f"{'type':<20} {'call':<22} {'before µs':>11} {'after µs':>10} {'speed-up':>9}")
    for name, op, options in cases:
        label = op + "".join(f" {k}={v}" for k, v in options.items())
        if op == "encode":
            times = [
                per_call(lambda c=c, v=v: c.encode(v, **options))
                for c, v in ((old_codec, old[name]), (codec, new[name]))
            ]
        else:
            data = codec.encode(new[name])
            times = [
                per_call(lambda c=c, t=t: c.decode(t, data, **options))
                for c, t in ((old_codec, getattr(old_model, name)), (codec, getattr(model, name)))
            ]
            assert codec.decode(getattr(model, name), data, **options) == new[name]
        print(
            f"{name:<20} {label:<22} {times[0]:>11.1f} {times[1]:>10.1f} "
            f"{times[0] / times[1]:>8.1f}x"
        )


if __name__ == "__main__":
    main()
