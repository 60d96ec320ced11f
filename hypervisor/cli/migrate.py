# -*- test-case-name: tests.test_migration_real -*-
"""
C{vm-control migrate-vm} and C{copy-vm}, as Go's (cmd/vm-control/migrateVm.go,
copyVm.go): find the source (through the fleet manager with C{-fleetManagerHostname},
else our C{-sourceHypervisor}), get an access token for the VM there, call
MigrateVm / CopyVm on the target (C{-hypervisorHostname}) with it, and discard the
token afterwards. MigrateVm's C{RequestCommit} is answered from standard input
("commit" or "abandon", Go's prompt) or by our C{-commit}; it needs SRPC (the
HTTPS API has no way for the client to answer mid-stream).
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

from hypervisor import codec, model
from hypervisor.cli.client import ClientError
from hypervisor.cli.tool import Tool, decode
from hypervisor.migration.messages import CopyVmRequest, CopyVmResponse, MigrateVmResponse

DAY_NS = 24 * 3600 * 10**9


async def _source(t: Tool, ip: str) -> tuple[Any, str]:
    """
    The source hypervisor's transport and its address.
    """
    if t.v.get("fleetManagerHostname"):
        transport = await t.hypervisor(ip)
        return transport, transport.address
    address = t.v.get("sourceHypervisor") or ""
    if not address:
        raise ClientError("no fleet manager specified (or -sourceHypervisor host:port)")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClientError(f"-sourceHypervisor {address!r} is not host:port")
    return t.transport(host, int(port)), address


def _target(t: Tool) -> Any:
    host = t.v["hypervisorHostname"] or "localhost"
    return t.transport(host, t.v["hypervisorPortNum"])


async def _token(t: Tool, source: Any, ip: str) -> bytes:
    reply = await t.call(
        source,
        "Hypervisor.GetVmAccessToken",
        {"IpAddress": ip, "Lifetime": DAY_NS},
        None,
    )
    try:
        return base64.b64decode(str(reply.get("Token") or ""), validate=True)
    except ValueError:
        raise ClientError("the source answered a malformed token") from None


async def _discard(t: Tool, source: Any, ip: str) -> None:
    try:
        await t.call(
            source, "Hypervisor.DiscardVmAccessToken", {"IpAddress": ip}, None, check=False
        )
    except ClientError:
        pass


def ask_commit(t: Tool) -> dict[str, bool]:
    """
    The answer to C{RequestCommit}: C{-commit} if given, else Go's prompt on stdin.
    """
    if t.v.get("commit"):
        return {"Commit": True}
    while True:
        print("Commit VM (commit/abandon): ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            raise ClientError("invalid response: end of input")
        answer = line.strip()
        if answer in ("commit", "abandon"):
            return {"Commit": answer == "commit"}
        raise ClientError(f"invalid response: {answer}")


async def migrate_vm(t: Tool, args: list[str]) -> int:
    """
    migrate-vm IPaddr: move the VM to -hypervisorHostname, keeping its address.
    """
    ip = args[0]
    source, address = await _source(t, ip)
    info = await t.call(source, "Hypervisor.GetVmInfo", {"IpAddress": ip}, None)
    if (info.get("VmInfo") or {}).get("State") == "migrating":
        raise ClientError("VM is migrating")
    token = await _token(t, source, ip)
    try:
        target = _target(t)
        target.on_commit = lambda message: ask_commit(t)

        def progress(raw: bytes) -> None:
            message = decode(MigrateVmResponse, raw)
            if message.ProgressMessage:
                t.debug(0, message.ProgressMessage)

        t.debug(0, f"migrating VM to {target.address}")
        request = {
            "AccessToken": base64.b64encode(token).decode("ascii"),
            "IpAddress": ip,
            "SourceHypervisor": address,
        }
        await t.call(target, "Hypervisor.MigrateVm", request, MigrateVmResponse, None, progress)
    finally:
        await _discard(t, source, ip)
    return 0


async def copy_vm(t: Tool, args: list[str]) -> int:
    """
    copy-vm IPaddr: a new VM on -hypervisorHostname with copies of the VM's volumes
    and user data; prints the new VM's address.
    """
    from hypervisor.cli.vm_control import create_request

    ip = args[0]
    source, address = await _source(t, ip)
    reply = await t.call(source, "Hypervisor.GetVmInfo", {"IpAddress": ip}, None)
    src = codec.decode(model.VmInfo, json.dumps(reply.get("VmInfo") or {}).encode())
    info = create_request(t.v).VmInfo
    # What Go's copyVmFromHypervisor takes from the source.
    info.ConsoleType = src.ConsoleType
    info.DestroyProtection = info.DestroyProtection or src.DestroyProtection
    info.Hostname = info.Hostname or src.Hostname
    info.MemoryInMiB = info.MemoryInMiB if info.MemoryInMiB >= 1 else src.MemoryInMiB
    info.MilliCPUs = info.MilliCPUs if info.MilliCPUs >= 1 else src.MilliCPUs
    info.OwnerGroups = info.OwnerGroups or src.OwnerGroups
    info.OwnerUsers = info.OwnerUsers or src.OwnerUsers
    info.Tags = info.Tags or src.Tags
    info.SecondarySubnetIDs = info.SecondarySubnetIDs or src.SecondarySubnetIDs
    info.SubnetId = info.SubnetId or src.SubnetId
    token = await _token(t, source, ip)
    try:
        target = _target(t)

        def progress(raw: bytes) -> None:
            message = decode(CopyVmResponse, raw)
            if message.ProgressMessage:
                t.debug(0, message.ProgressMessage)

        request = CopyVmRequest(
            AccessToken=token,
            IpAddress=ip,
            SkipMemoryCheck=bool(t.v.get("skipMemoryCheck")),
            SourceHypervisor=address,
            VmInfo=info,
        )
        t.debug(0, f"copying VM to {target.address}")
        final = await t.call(target, "Hypervisor.CopyVm", request, CopyVmResponse, None, progress)
        await t.call(target, "Hypervisor.AcknowledgeVm", {"IpAddress": final.IpAddress}, None)
    finally:
        await _discard(t, source, ip)
    print(final.IpAddress)
    return 0
