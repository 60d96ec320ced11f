# -*- test-case-name: tests.test_local_export_real -*-
"""
C{vm-control export-local-vm} and C{import-local-vm}, as Go's
(cmd/vm-control/exportLocalVm.go, importLocalVm.go): both talk to the hypervisor on
this host (C{localhost:-hypervisorPortNum}) and prove root by reading the root cookie
(the file GetRootCookiePath names; Go re-runs itself under sudo when it cannot read
it, we say so instead).

- export-local-vm IPaddr: StopVm, ExportLocalVm, then C{-localVmCreate <IP>} with
  the export's JSON on its standard input (without it: the JSON on standard output
  and "no command specified: debug mode"); then "Commit VM <IP> (commit/defer/
  abandon)?" on standard input: commit destroys the VM here (its addresses are
  unregistered, not freed), abandon runs C{-localVmDestroy <IP>} and starts the VM
  again, defer leaves it exporting. Any failure before the answer starts it again.
- import-local-vm info-file root-volume: the VmInfo JSON (an export's JSON will do)
  and the root volume, hard-linked (else copied) into
  C{<first volume directory>/import/<pid>/root} (ours: a C{kernel} and C{initrd}
  beside the root volume go with it), ImportLocalVm, then the same question:
  commit calls CommitImportedVm, abandon destroys the imported VM.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from typing import Any

from hypervisor import codec, model
from hypervisor.cli.client import ClientError
from hypervisor.cli.tool import Tool
from hypervisor.migration.local import EXTRA_FILES, ExportLocalVmResponse
from hypervisor.migration.messages import GetRootCookiePathResponse

CHOICES = ("commit", "defer", "abandon")


class Undecided(ClientError):
    """
    The user deferred (or abandoned): the command ends with this error, as Go's.
    """


def ask_choice(prompt: str) -> str:
    """
    Go's askForInputChoice: ask until one of L{CHOICES} is given.
    """
    while True:
        print(f"{prompt} ({'/'.join(CHOICES)})? ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            raise ClientError("deferring, error reading input: EOF")
        answer = line.rstrip("\n")
        if answer in CHOICES:
            return answer


def _local(t: Tool) -> Any:
    return t.transport("localhost", t.v["hypervisorPortNum"])


async def read_root_cookie(t: Tool, hv: Any) -> str:
    """
    The root cookie's bytes, base64 (as JSON carries []byte).
    """
    reply = await t.call(hv, "Hypervisor.GetRootCookiePath", {}, GetRootCookiePathResponse)
    try:
        with open(reply.Path, "rb") as f:
            cookie = f.read(4096)
    except PermissionError:
        raise ClientError(
            f"cannot read the root cookie {reply.Path}: permission denied (run as root)"
        ) from None
    except OSError as e:
        raise ClientError(f"cannot read the root cookie {reply.Path}: {e.strerror}") from None
    t.debug(0, "have cookie")
    return base64.b64encode(cookie).decode("ascii")


def _run(command: str, argument: str, stdin: bytes = b"") -> None:
    done = subprocess.run([command, argument], input=stdin, check=False)
    if done.returncode != 0:
        raise ClientError(f"{command}: exit status {done.returncode}")


async def export_local_vm(t: Tool, args: list[str]) -> int:
    """
    export-local-vm IPaddr.
    """
    ip = args[0]
    hv = _local(t)
    cookie = await read_root_cookie(t, hv)
    await t.call(hv, "Hypervisor.StopVm", {"IpAddress": ip}, model.ErrorResponse)
    start_again = True
    try:
        reply = await t.call(
            hv,
            "Hypervisor.ExportLocalVm",
            {"IpAddress": ip, "VerificationCookie": cookie},
            ExportLocalVmResponse,
        )
        text = codec.encode(reply.VmInfo, indent=4) + b"\n"
        if not t.v["localVmCreate"]:
            sys.stdout.write(text.decode())
            sys.stdout.flush()
            raise ClientError("no command specified: debug mode")
        _run(t.v["localVmCreate"], ip, text)
        answer = ask_choice(f"Commit VM {ip}")
        if answer == "abandon":
            if t.v["localVmDestroy"]:
                _run(t.v["localVmDestroy"], ip)
            raise Undecided("you abandoned your VM")
        start_again = False
        if answer == "defer":
            raise Undecided("you deferred committing your VM")
        await t.call(hv, "Hypervisor.DestroyVm", {"IpAddress": ip}, model.ErrorResponse)
        return 0
    finally:
        if start_again:
            try:
                await t.call(hv, "Hypervisor.StartVm", {"IpAddress": ip}, model.ErrorResponse)
            except ClientError as e:
                t.log(str(e))


def _stage(root_volume: str, directory: str) -> str:
    """
    Link (else copy) the root volume, and a kernel/initrd beside it, into
    C{directory}/import/<pid>/; return the root's new path.
    """
    staging = os.path.join(directory, "import")
    os.makedirs(staging, mode=0o755, exist_ok=True)
    staging = os.path.join(staging, str(os.getpid()))
    os.mkdir(staging, 0o755)
    sources = [(root_volume, "root")] + [
        (os.path.join(os.path.dirname(root_volume), name), name)
        for name in EXTRA_FILES
        if os.path.isfile(os.path.join(os.path.dirname(root_volume), name))
    ]
    for source, name in sources:
        destination = os.path.join(staging, name)
        try:
            os.link(source, destination)
        except OSError:
            shutil.copyfile(source, destination)
            os.chmod(destination, 0o600)
    return os.path.join(staging, "root")


async def import_local_vm(t: Tool, args: list[str]) -> int:
    """
    import-local-vm info-file root-volume.
    """
    info_file, root_volume = args
    try:
        with open(info_file, "rb") as f:
            info = codec.decode(model.VmInfo, f.read())
    except OSError as e:
        raise ClientError(f"{info_file}: {e.strerror}") from None
    if not os.path.isfile(root_volume):
        raise ClientError(f"{root_volume}: not a regular file")
    hv = _local(t)
    cookie = await read_root_cookie(t, hv)
    reply = await t.call(hv, "Hypervisor.ListVolumeDirectories", {}, None)
    directories = reply.get("Directories") or []
    if not directories:
        raise ClientError("the hypervisor has no volume directories")
    try:
        root = _stage(root_volume, directories[0])
    except OSError as e:
        raise ClientError(f"cannot stage the root volume: {e}") from None
    staging = os.path.dirname(root)
    t.debug(0, f"created: {staging}")
    ip = info.Address.IpAddress
    try:
        request = json.loads(codec.encode(info))
        request.update(VerificationCookie=cookie, VolumeFilenames=[root])
        await t.call(hv, "Hypervisor.ImportLocalVm", request, model.ErrorResponse)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    t.debug(0, "imported VM")
    answer = ask_choice(f"Commit VM {ip}")
    if answer == "abandon":
        await t.call(hv, "Hypervisor.DestroyVm", {"IpAddress": ip}, model.ErrorResponse)
        raise Undecided("you abandoned your VM")
    if answer == "defer":
        raise Undecided("you deferred committing your VM")
    await t.call(hv, "Hypervisor.CommitImportedVm", {"IpAddress": ip}, model.ErrorResponse)
    return 0
