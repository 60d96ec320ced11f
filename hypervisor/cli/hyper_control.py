# -*- test-case-name: tests.test_vm_control -*-
"""
C{hyper-control}: administer a hypervisor (subnets, addresses, enable/disable,
capacity, updates) over its RPC interface, with SmallStack's subcommand names.

    hyper-control [flags...] subcommand [args...]

Admin subcommands need a certificate granting the method (e.g. C{Hypervisor.*}) or
hypervisor ownership.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Optional, Sequence

from hypervisor.cli.client import ClientError, RpcClient, parse_flags, run_client

PARAMETERS: list[tuple[str, str, str]] = [
    ("hypervisorHostname", "localhost", "Hostname of hypervisor"),
    ("hypervisorPortNum", "6976", "Port number of hypervisor"),
    ("certDirectory", os.path.expanduser("~/.ssl"), "Directory of client certificates"),
    ("CAfile", "/etc/ssl/CA.pem", "CA to verify the hypervisor's certificate with"),
    ("maxUpdates", "1", "get-updates: how many updates to print before exiting (0: all)"),
]

SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("add-address", "MACaddr [IPaddr]", "Add an address to the pool"),
    ("add-subnet", "ID IpGateway IpMask [DomainNameServer...]", "Add a subnet"),
    ("change-owners", "[user...]", "Set the hypervisor's owner users"),
    ("disable-hypervisor", "", "Refuse VM creation and starts"),
    ("enable-hypervisor", "", "Allow VM creation and starts again"),
    ("get-capacity", "", "Show CPU, memory and storage"),
    ("get-updates", "", "Print the update stream (-maxUpdates)"),
    ("list-subnets", "", "Show the subnets"),
    ("remove-excess-addresses", "MaxFree", "Trim free addresses to MaxFree per subnet"),
    ("remove-ip-address", "IPaddr", "Remove an address from the pool"),
    ("remove-mac-address", "MACaddr", "Remove an address from the pool"),
]


def usage() -> str:
    """
    The help text.
    """
    lines = ["Usage: hyper-control [flags...] subcommand [args...]", "", "Flags:"]
    for name, default, help_ in PARAMETERS:
        lines.append(f"  -{name} value\n        {help_} (default {default!r})")
    lines += ["", "Subcommands:"]
    for name, args, help_ in SUBCOMMANDS:
        lines.append(f"  {(name + ' ' + args).strip():<46} {help_}")
    return "\n".join(lines)


def parse(argv: Sequence[str]) -> tuple[dict[str, Any], str, list[str]]:
    """
    Parse flags, subcommand and arguments; ValueError on misuse.
    """
    values, rest = parse_flags(list(argv), {n: d for n, d, _ in PARAMETERS}, [], usage)
    if rest[0] not in {s[0] for s in SUBCOMMANDS}:
        raise ValueError(f"unknown subcommand {rest[0]!r}")
    try:
        values["hypervisorPortNum"] = int(values["hypervisorPortNum"])
        values["maxUpdates"] = int(values["maxUpdates"])
    except ValueError as e:
        raise ValueError(f"bad flag value: {e}") from None
    return values, rest[0], rest[1:]


async def run_command(client: RpcClient, values: dict[str, Any], name: str, args: list[str]) -> int:
    """
    Run one subcommand; return the exit status.
    """

    def need(low: int, high: int) -> None:
        if not low <= len(args) <= high:
            spec = next(s[1] for s in SUBCOMMANDS if s[0] == name)
            raise ClientError(f"usage: {name} {spec}")

    if name == "add-address":
        need(1, 2)
        address = {"MacAddress": args[0], "IpAddress": args[1] if len(args) > 1 else ""}
        await client.call("ChangeAddressPool", {"AddressesToAdd": [address]})
    elif name in ("remove-ip-address", "remove-mac-address"):
        need(1, 1)
        key = "IpAddress" if name == "remove-ip-address" else "MacAddress"
        await client.call("ChangeAddressPool", {"AddressesToRemove": [{key: args[0]}]})
    elif name == "remove-excess-addresses":
        need(1, 1)
        await client.call("ChangeAddressPool", {"MaximumFreeAddresses": {"": int(args[0])}})
    elif name == "add-subnet":
        need(3, 64)
        await client.call(
            "UpdateSubnets",
            {
                "Add": [
                    {
                        "Id": args[0],
                        "IpGateway": args[1],
                        "IpMask": args[2],
                        "DomainNameServers": args[3:],
                    }
                ]
            },
        )
    elif name == "change-owners":
        await client.call("ChangeOwners", {"OwnerUsers": args})
    elif name in ("disable-hypervisor", "enable-hypervisor"):
        need(0, 0)
        await client.call("SetDisabledState", {"Disable": name == "disable-hypervisor"})
    elif name == "get-capacity":
        need(0, 0)
        reply = await client.call("GetCapacity", {})
        reply.pop("Error", None)
        print(json.dumps(reply, indent=4))
    elif name == "list-subnets":
        need(0, 0)
        reply = await client.call("ListSubnets", {"Sort": True})
        print(json.dumps(reply.get("Subnets") or [], indent=4))
    elif name == "get-updates":
        need(0, 0)
        limit = values["maxUpdates"]
        count = [0]

        class Enough(Exception):
            pass

        def show(message: dict[str, Any]) -> None:
            print(json.dumps(message, indent=4), flush=True)
            count[0] += 1
            if limit and count[0] >= limit:
                raise Enough()

        try:
            last = await client.call("GetUpdates", {}, on_message=show)
            show(last)
        except Enough:
            pass
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Entry point of the C{hyper-control} console script.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        values, name, rest = parse(args)
    except ValueError as e:
        print(
            f"hyper-control: {e}\nRun 'hyper-control -h' for the flags and " "subcommands.",
            file=sys.stderr,
        )
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    return run_client(
        "hyper-control", name, values, lambda client: run_command(client, values, name, rest)
    )


if __name__ == "__main__":
    sys.exit(main())
