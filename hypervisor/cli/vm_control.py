# -*- test-case-name: tests.test_vm_control -*-
"""
C{vm-control}: drive a hypervisor's VMs over its RPC interface (port 6976), with the
subcommand and flag names of SmallStack's vm-control.

    vm-control [flags...] subcommand [args...]

Flags are Go-style (C{-memory 512M}, C{-tags Name=web,env=prod}) and come before the
subcommand. Progress goes to stderr; results (an IP, JSON) to stdout; errors exit 1
with the hypervisor's message, usage errors exit 2.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Awaitable, Callable, Optional, Sequence

from hypervisor import flags
from hypervisor.cli.client import ClientError, RpcClient, fail, parse_flags, run_client

# name, default, help
PARAMETERS: list[tuple[str, str, str]] = [
    ("hypervisorHostname", "localhost", "Hostname of hypervisor"),
    ("hypervisorPortNum", "6976", "Port number of hypervisor"),
    ("certDirectory", os.path.expanduser("~/.ssl"), "Directory of client certificates"),
    (
        "CAfile",
        "/etc/ssl/CA.pem",
        "CA to verify the hypervisor's certificate with " "(not verified if the file is missing)",
    ),
    ("memory", "1G", "Memory of the VM (e.g. 512M, 2G)"),
    ("milliCPUs", "1000", "CPU allowance in thousandths of a CPU"),
    ("vcpus", "0", "Number of virtual CPUs (0: from milliCPUs)"),
    ("imageFile", "", "Raw or qcow2 image file to upload as the root volume"),
    ("imageURL", "", "Image URL (file:// under the hypervisor's -localImagesDirectory)"),
    ("kernelURL", "", "Kernel for direct boot (file:// URL on the hypervisor)"),
    ("initrdURL", "", "Initrd for direct boot (file:// URL on the hypervisor)"),
    ("extraKernelOptions", "", "Extra kernel command line options"),
    ("userDataFile", "", "File of user data for the metadata server"),
    ("subnetId", "", "Subnet of the VM"),
    ("tags", "", "Tags, as Name=value,Other=value"),
    ("ownerUsers", "", "Comma-separated extra owners / owner filter"),
    ("ownerGroups", "", "Comma-separated owner groups / group filter"),
    ("hostname", "", "Hostname of the VM"),
    ("minFreeBytes", "0", "Free space for an empty or image root volume (e.g. 2G)"),
    ("roundupPower", "28", "Round the root volume up to a multiple of 2^N bytes"),
    ("secondaryVolumeSizes", "", "Comma-separated sizes of secondary volumes"),
    ("dhcpTimeout", "0s", "Time to wait for the VM's DHCP ACK (0: do not wait)"),
    ("state", "", "list-vms/get-vm-infos: only VMs in this state"),
]
BOOLEANS: list[tuple[str, str]] = [
    ("destroyProtection", "Protect the VM from DestroyVm while it runs"),
    ("destroyOnPowerdown", "Destroy the VM when it powers itself off"),
    ("doNotStart", "Create the VM stopped"),
    ("disableVirtIO", "Use emulated devices instead of virtio"),
]

SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("become-primary-vm-owner", "IP", "Become the primary owner of a VM"),
    ("change-vm-cpus", "IP", "Change the milliCPUs of a VM (-milliCPUs)"),
    ("change-vm-destroy-protection", "IP", "Set destroy protection (-destroyProtection)"),
    ("change-vm-hostname", "IP", "Change the hostname of a VM (-hostname)"),
    ("change-vm-memory", "IP", "Change the memory of a stopped VM (-memory)"),
    ("change-vm-owner-groups", "IP", "Replace the owner groups (-ownerGroups)"),
    ("change-vm-owner-users", "IP", "Replace the extra owners (-ownerUsers)"),
    ("change-vm-tags", "IP", "Replace the tags of a VM (-tags)"),
    ("change-vm-vcpus", "IP", "Change the number of vCPUs (-vcpus)"),
    ("create-vm", "", "Create a VM; prints its IP"),
    ("destroy-vm", "IP", "Destroy a VM and its volumes"),
    ("get-vm-create-request", "IP", "Show the request a VM was created with"),
    ("get-vm-info", "IP", "Show a VM"),
    ("get-vm-infos", "", "Show all VMs (filters: -ownerUsers, -ownerGroups, -state)"),
    ("list-vms", "", "List VM IPs (filters: -ownerUsers, -ownerGroups, -state)"),
    ("reboot-vm", "IP", "Reboot a VM"),
    ("start-vm", "IP", "Start a stopped VM"),
    ("stop-vm", "IP", "Stop a VM (ACPI power-down, forced after 15 s)"),
]


def usage() -> str:
    """
    The help text: flags with defaults, then subcommands.
    """
    lines = ["Usage: vm-control [flags...] subcommand [args...]", "", "Flags:"]
    for name, default, help_ in PARAMETERS:
        lines.append(f"  -{name} value\n        {help_} (default {default!r})")
    for name, help_ in BOOLEANS:
        lines.append(f"  -{name}\n        {help_}")
    lines += ["", "Subcommands:"]
    for name, args, help_ in SUBCOMMANDS:
        lines.append(f"  {(name + ' ' + args).strip():<36} {help_}")
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> tuple[dict[str, Any], str, list[str]]:
    """
    Parse flags, subcommand and its arguments.

    @raise ValueError: a usage error, with a sentence naming the flag.
    """
    values, rest = parse_flags(
        list(argv), {n: d for n, d, _ in PARAMETERS}, [b[0] for b in BOOLEANS], usage
    )
    command, args = rest[0], rest[1:]
    known = {name: a for name, a, _ in SUBCOMMANDS}
    if command not in known:
        raise ValueError(f"unknown subcommand {command!r}")
    wanted = 1 if known[command] else 0
    if len(args) != wanted:
        raise ValueError(f"{command} takes {known[command] or 'no arguments'}")
    try:
        values["memory"] = flags.parse_size(values["memory"]) // (1024 * 1024)
        values["minFreeBytes"] = flags.parse_size(values["minFreeBytes"])
        values["milliCPUs"] = int(values["milliCPUs"])
        values["vcpus"] = int(values["vcpus"])
        values["roundupPower"] = int(values["roundupPower"])
        values["hypervisorPortNum"] = int(values["hypervisorPortNum"])
        values["dhcpTimeout"] = flags.parse_duration(values["dhcpTimeout"])
        values["secondaryVolumeSizes"] = [
            flags.parse_size(s) for s in values["secondaryVolumeSizes"].split(",") if s
        ]
    except ValueError as e:
        raise ValueError(f"bad flag value: {e}") from None
    values["tags"] = parse_tags(values["tags"])
    for name in ("ownerUsers", "ownerGroups"):
        values[name] = [v for v in values[name].split(",") if v]
    return values, command, args


def parse_tags(text: str) -> dict[str, str]:
    """
    C{Name=web,env=prod} -> dict.
    """
    tags = {}
    for item in (t for t in text.split(",") if t):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"tag {item!r} is not key=value")
        tags[key] = value
    return tags


def _filter(values: dict[str, Any]) -> dict[str, Any]:
    from hypervisor.model import State

    request: dict[str, Any] = {}
    if values["ownerUsers"]:
        request["OwnerUsers"] = values["ownerUsers"]
    if values["ownerGroups"]:
        request["OwnerGroups"] = values["ownerGroups"]
    if values["state"]:
        try:
            keep = State.from_text(values["state"])
        except ValueError as e:
            raise ClientError(str(e)) from None
        request["IgnoreStateMask"] = sum(1 << s.number for s in State if s != keep)
    return request


async def create_vm(client: RpcClient, v: dict[str, Any]) -> int:
    """
    CreateVm (uploading -imageFile and -userDataFile), then AcknowledgeVm.
    """
    request: dict[str, Any] = {
        "MemoryInMiB": v["memory"],
        "MilliCPUs": v["milliCPUs"],
        "VirtualCPUs": v["vcpus"],
        "SubnetId": v["subnetId"],
        "Tags": v["tags"],
        "OwnerUsers": v["ownerUsers"],
        "OwnerGroups": v["ownerGroups"],
        "Hostname": v["hostname"],
        "DestroyProtection": v["destroyProtection"],
        "DestroyOnPowerdown": v["destroyOnPowerdown"],
        "DoNotStart": v["doNotStart"],
        "DisableVirtIO": v["disableVirtIO"],
        "MinimumFreeBytes": v["minFreeBytes"],
        "RoundupPower": v["roundupPower"],
        "ImageURL": v["imageURL"],
        "KernelURL": v["kernelURL"],
        "InitrdURL": v["initrdURL"],
        "ExtraKernelOptions": v["extraKernelOptions"],
        "SecondaryVolumes": [{"Size": s} for s in v["secondaryVolumeSizes"]],
        "DhcpTimeout": int(v["dhcpTimeout"] * 1e9),
    }
    parts: list[Any] = []
    sizes: list[int] = []
    for flag, field in (("imageFile", "ImageDataSize"), ("userDataFile", "UserDataSize")):
        if v[flag]:
            try:
                f = open(v[flag], "rb")
            except OSError as e:
                return fail(f"vm-control: cannot read -{flag} {v[flag]}: {e.strerror}")
            size = os.fstat(f.fileno()).st_size
            request[field] = size
            parts.append(f)
            sizes.append(size)
    tail = (parts, sizes) if parts else None

    def progress(message: dict[str, Any]) -> None:
        if message.get("ProgressMessage"):
            print(message["ProgressMessage"], file=sys.stderr)

    final = await client.call("CreateVm", request, tail, on_message=progress)
    ip = final["IpAddress"]
    await client.call("AcknowledgeVm", {"IpAddress": ip})
    if final.get("DhcpTimedOut"):
        print(f"VM {ip}: no DHCP ACK within {v['dhcpTimeout']:g}s: destroying it", file=sys.stderr)
        await client.call("DestroyVm", {"IpAddress": ip})
        return 1
    print(ip)
    return 0


def _show(message: dict[str, Any], key: str) -> int:
    print(json.dumps(message[key], indent=4))
    return 0


COMMANDS: dict[str, Callable[[RpcClient, dict[str, Any], list[str]], Awaitable[int]]] = {}


def command(name: str) -> Callable[[Any], Any]:
    """
    Register a subcommand implementation.
    """

    def register(fn: Any) -> Any:
        COMMANDS[name] = fn
        return fn

    return register


def _simple(
    name: str,
    method: str,
    build: Callable[[dict[str, Any], str], dict[str, Any]],
    show: Optional[str] = None,
) -> None:
    async def run(client: RpcClient, v: dict[str, Any], args: list[str]) -> int:
        reply = await client.call(method, build(v, args[0] if args else ""))
        if show:
            return _show(reply, show)
        if reply.get("DhcpTimedOut"):
            print("DHCP ACK not seen in time", file=sys.stderr)
        return 0

    COMMANDS[name] = run


_simple(
    "start-vm",
    "StartVm",
    lambda v, ip: {"IpAddress": ip, "DhcpTimeout": int(v["dhcpTimeout"] * 1e9)},
)
_simple("stop-vm", "StopVm", lambda v, ip: {"IpAddress": ip})
_simple(
    "reboot-vm",
    "RebootVm",
    lambda v, ip: {"IpAddress": ip, "DhcpTimeout": int(v["dhcpTimeout"] * 1e9)},
)
_simple("destroy-vm", "DestroyVm", lambda v, ip: {"IpAddress": ip})
_simple("become-primary-vm-owner", "BecomePrimaryVmOwner", lambda v, ip: {"IpAddress": ip})
_simple(
    "change-vm-cpus", "ChangeVmSize", lambda v, ip: {"IpAddress": ip, "MilliCPUs": v["milliCPUs"]}
)
_simple(
    "change-vm-vcpus", "ChangeVmSize", lambda v, ip: {"IpAddress": ip, "VirtualCPUs": v["vcpus"]}
)
_simple(
    "change-vm-memory", "ChangeVmSize", lambda v, ip: {"IpAddress": ip, "MemoryInMiB": v["memory"]}
)
_simple("change-vm-tags", "ChangeVmTags", lambda v, ip: {"IpAddress": ip, "Tags": v["tags"]})
_simple(
    "change-vm-owner-users",
    "ChangeVmOwnerUsers",
    lambda v, ip: {"IpAddress": ip, "OwnerUsers": v["ownerUsers"]},
)
_simple(
    "change-vm-owner-groups",
    "ChangeVmOwnerGroups",
    lambda v, ip: {"IpAddress": ip, "OwnerGroups": v["ownerGroups"]},
)
_simple(
    "change-vm-destroy-protection",
    "ChangeVmDestroyProtection",
    lambda v, ip: {"IpAddress": ip, "DestroyProtection": v["destroyProtection"]},
)
_simple(
    "change-vm-hostname",
    "ChangeVmHostname",
    lambda v, ip: {"IpAddress": ip, "Hostname": v["hostname"]},
)
_simple("get-vm-info", "GetVmInfo", lambda v, ip: {"IpAddress": ip}, show="VmInfo")
_simple(
    "get-vm-create-request",
    "GetVmCreateRequest",
    lambda v, ip: {"IpAddress": ip},
    show="CreateRequest",
)
_simple("get-vm-infos", "GetVmInfos", lambda v, ip: _filter(v), show="VmInfos")


@command("list-vms")
async def list_vms(client: RpcClient, v: dict[str, Any], args: list[str]) -> int:
    """
    Print VM IPs, one per line, sorted.
    """
    reply = await client.call("ListVMs", dict(_filter(v), Sort=True))
    for ip in reply["IpAddresses"]:
        print(ip)
    return 0


@command("create-vm")
async def _create(client: RpcClient, v: dict[str, Any], args: list[str]) -> int:
    return await create_vm(client, v)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Entry point of the C{vm-control} console script.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        values, name, rest = parse(args)
    except ValueError as e:
        print(
            f"vm-control: {e}\nRun 'vm-control -h' for the flags and subcommands.", file=sys.stderr
        )
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    return run_client(
        "vm-control", name, values, lambda client: COMMANDS[name](client, values, rest)
    )


if __name__ == "__main__":
    sys.exit(main())
