# -*- test-case-name: tests.test_vm_control,tests.test_cli_flags -*-
"""
C{vm-control}: drive a hypervisor's VMs, with SmallStack's C{vm-control} command line:
the same commands, flag names, types and defaults (Dominator v0.3.4), and the same
requests on the wire.

    vm-control [flags...] command [args...]

Every command of the Go tool is listed by C{-h}; those whose method this hypervisor
does not serve say so and exit 2. Results go to stdout (an IP, Go-indented JSON);
errors to stderr as Go prints them (C{error getting VM info: ...}), exit 1; usage
errors exit 2. Progress messages are logged at C{-logDebugLevel 0}, as Go's.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Optional, Sequence

from hypervisor import codec, model
from hypervisor.cli import goflags, local, migrate, tool
from hypervisor.cli.client import ClientError
from hypervisor.cli.goflags import Command, Flag
from hypervisor.cli.tool import Tool, decode, show
from hypervisor.cli.transport import error_of
from hypervisor.console.model import ChangeVmConsoleTypeRequest
from hypervisor.migration.messages import PrepareVmForMigrationRequest

NOT_SERVED = "this hypervisor does not serve its method"
GOB_ONLY = (
    "needs GetVmVolume, whose lib/rsync protocol SmallStack speaks over GOB only; "
    "our daemons move volumes with ReadVmVolume (migrate-vm, copy-vm)"
)
FLEET_ONLY = "talks to a fleet manager's inventory, which this implementation does not query"
LOCAL = "works on local libvirt/Dominator storage, which this implementation does not support"

_size = goflags.parse_size
_sizes = goflags.parse_size_list
_strings = goflags.parse_string_list


def _unused(reason: str = "") -> str:
    return reason or "only used by commands this implementation does not run"


FLAGS: list[Flag] = tool.common_flags() + [
    Flag(
        "adjacentVM",
        "string",
        "",
        "IP address of VM adjacent (same Hypervisor) to VM being created",
        unused=_unused("placement through a fleet manager is not implemented"),
    ),
    Flag(
        "consoleType",
        "value",
        "none",
        "type of graphical console",
        goflags.one_of(*(c.value for c in model.ConsoleType)),
    ),
    Flag("destroyOnPowerdown", "bool", "false", "If true, destroy VM if it powers down internally"),
    Flag("destroyProtection", "bool", "false", "If true, do not destroy running VM"),
    Flag(
        "dhcpTimeout",
        "duration",
        "1m0s",
        "Time to wait before timing out on DHCP request from VM",
    ),
    Flag(
        "disableVirtIO",
        "bool",
        "false",
        "If true, disable virtio drivers, reducing I/O performance",
    ),
    Flag("doNotStart", "bool", "false", "If true, do not start VM when creating"),
    Flag(
        "enableNetboot",
        "bool",
        "false",
        "If true, enable boot from network for first boot",
    ),
    Flag("extraKernelOptions", "string", "", "Extra options to pass to kernel"),
    Flag(
        "forceIfNotStopped",
        "bool",
        "false",
        "If true, snapshot or restore VM even if not stopped",
    ),
    Flag(
        "hypervisorTagsToMatch",
        "value",
        "",
        "Tags to match when getting/listing or creating/copying/moving VMs",
        goflags.parse_match_tags,
    ),
    Flag(
        "identityCertFile",
        "string",
        "",
        "Filename of PEM-encoded cetificate availabe from metadata service ",
    ),
    Flag(
        "identityKeyFile",
        "string",
        "",
        "Filename of PEM-encoded key available from metadata service ",
    ),
    Flag("imageFile", "string", "", "Name of RAW image file to boot with"),
    Flag("imageName", "string", "", "Name of image to boot with"),
    Flag(
        "imageTimeout",
        "duration",
        "1m0s",
        "Time to wait before timing out on image fetch",
    ),
    Flag("imageURL", "string", "", "Name of URL of image to boot with"),
    Flag(
        "includeUnhealthy",
        "bool",
        "false",
        "If true, list connected but unhealthy hypervisors",
    ),
    Flag(
        "initialiseSecondaryVolumes",
        "bool",
        "false",
        "If true, initialise secondary volumes",
        unused=_unused("the daemon does not initialise secondary volumes"),
    ),
    Flag(
        "localVmCreate",
        "string",
        "",
        "Command to make local VM when exporting. The VM name is given as the argument."
        " The VM JSON is available on stdin",
    ),
    Flag(
        "localVmDestroy",
        "string",
        "",
        "Command to destroy local VM when exporting. The VM name is given as the argument",
    ),
    Flag("location", "string", "", "Location to search for hypervisors"),
    Flag("memory", "value", "1GiB", "memory", _size),
    Flag("milliCPUs", "uint", "250", "milli CPUs"),
    Flag(
        "minFreeBytes",
        "value",
        "256MiB",
        "minimum number of free bytes in root volume",
        _size,
    ),
    Flag(
        "overlayDirectory",
        "string",
        "",
        "Directory tree of files to overlay on top of the image",
        unused=_unused("the daemon does not apply overlays"),
    ),
    Flag(
        "overlayPrefix",
        "string",
        "/",
        "Prefix to add to overlay filenames",
        unused=_unused("the daemon does not apply overlays"),
    ),
    Flag("ownerGroups", "value", "", "Groups who own the VM", _strings),
    Flag("ownerUsers", "value", "", "Extra users who own the VM", _strings),
    Flag(
        "patchLogFilename",
        "string",
        "",
        "Name file to write VM patch log to",
        unused=_unused(),
    ),
    Flag(
        "placement",
        "value",
        "",
        "Placement choice when selecting Hypervisor to create/copy/move VM",
        goflags.one_of("", "any", "emptiest", "fullest", "none", "random"),
        unused=_unused("placement through a fleet manager is not implemented"),
    ),
    Flag(
        "placementCommand",
        "string",
        "",
        "Command to make placement decisions when creating/copying/moving VM",
        unused=_unused("placement through a fleet manager is not implemented"),
    ),
    Flag("probePortNum", "uint", "0", "Port number on VM to probe", unused=_unused()),
    Flag(
        "probeTimeout",
        "duration",
        "5m0s",
        "Time to wait before timing out on probing VM port",
        unused=_unused(),
    ),
    Flag("requestIPs", "value", "", "Request specific IPs, if available", _strings),
    Flag(
        "roundupPower",
        "uint",
        "28",
        "power of 2 to round up root volume size",
    ),
    Flag(
        "scanFilename",
        "string",
        "",
        "Name of file to write scanned VM root to",
        unused=_unused(),
    ),
    Flag("secondarySubnetIDs", "value", "", "Secondary Subnet IDs", _strings),
    Flag("secondaryVolumeSizes", "value", "", "Sizes for secondary volumes", _sizes),
    Flag(
        "secondaryVolumesInitParams",
        "string",
        "",
        "File containing initialisation parameters for secondary volumes",
        unused=_unused("the daemon does not initialise secondary volumes"),
    ),
    Flag("serialPort", "uint", "0", "Serial port number on VM"),
    Flag(
        "skipBackup",
        "bool",
        "false",
        "If true, do not make a backup when patching/replacing the VM image",
    ),
    Flag("skipBootloader", "bool", "false", "If true, directly boot into the kernel"),
    Flag(
        "skipMemoryCheck",
        "bool",
        "false",
        "If true, skip memory availability check before creating VM",
    ),
    Flag(
        "snapshotRootOnly",
        "bool",
        "false",
        "If true, snapshot only the root volume",
    ),
    Flag("subnetId", "string", "", "Subnet ID to launch VM in"),
    Flag(
        "traceMetadata",
        "bool",
        "false",
        "If true, trace metadata calls until interrupted",
        unused=_unused("create-vm does not trace; use trace-vm-metadata"),
    ),
    Flag(
        "userDataFile",
        "string",
        "",
        "Name file containing user-data accessible from the metadata server",
    ),
    Flag("vCPUs", "uint", "0", "virtual CPUs (default rounds up milliCPUs)"),
    Flag("vmHostname", "string", "", "Hostname for VM"),
    Flag("vmTags", "value", "", "Tags to apply to VM", goflags.parse_tags),
    Flag(
        "sourceHypervisor",
        "string",
        "",
        "migrate-vm, copy-vm: the hypervisor (host:port) the VM is on, when no "
        "-fleetManagerHostname finds it; the VM moves to -hypervisorHostname",
        go=False,
    ),
    Flag(
        "commit",
        "bool",
        "false",
        "migrate-vm: commit the migrated VM without asking (else 'commit' or 'abandon' "
        "is read from standard input, as Go's prompt); MigrateVm needs -transport=srpc",
        go=False,
    ),
    Flag("vmTagsToMatch", "value", "", "Tags to match when listing", goflags.parse_match_tags),
    Flag("vncViewer", "string", "vncviewer", "Path to VNC viewer"),
    Flag(
        "volumeFilename",
        "string",
        "",
        "Name of file to write volume data to",
        unused=_unused(),
    ),
    Flag("volumeIndex", "uint", "0", "Index of volume to get or delete"),
    Flag(
        "volumeIndices",
        "value",
        "",
        "Index of volumes",
        goflags.parse_uint_list,
    ),
    Flag("volumeSize", "value", "0", "New size of specified volume", _size),
    Flag(
        "volumeTypes",
        "value",
        "persistent",
        "Types for volumes",
        goflags.list_of(*(t.value for t in model.VolumeType)),
    ),
    # Ours:
    Flag(
        "storageIndex",
        "uint",
        "0",
        "change-vm-volume-storage-index: storage index (volume directory) to move"
        " -volumeIndex to",
        go=False,
    ),
    Flag(
        "kernelURL",
        "string",
        "",
        "create-vm: kernel to boot directly (file:// URL under the hypervisor's"
        " -localImagesDirectory)",
        go=False,
    ),
    Flag(
        "initrdURL",
        "string",
        "",
        "create-vm: initrd for -kernelURL (file:// URL under -localImagesDirectory)",
        go=False,
    ),
    Flag(
        "state",
        "string",
        "",
        "list-vms, get-vm-infos: only VMs in this state",
        goflags.one_of("", *(s.value for s in model.State)),
        go=False,
    ),
]


def _ip(name: str, action: str, unavailable: str = "", go: bool = True) -> Command:
    return Command(name, "IPaddr", 1, 1, unavailable, go, action)


COMMANDS: list[Command] = [
    _ip("add-vm-volumes", "adding VM volumes"),
    _ip("become-primary-vm-owner", "becoming primary VM owner"),
    _ip("change-vm-console-type", "changing VM console type"),
    _ip("change-vm-cpus", "changing VM CPUs"),
    _ip("change-vm-destroy-protection", "changing VM destroy protection"),
    _ip("change-vm-memory", "changing VM memory"),
    _ip("change-vm-owner-users", "changing VM owner users"),
    _ip("change-vm-tags", "changing VM tags"),
    _ip("change-vm-vcpus", "changing VM vCPUs"),
    _ip("change-vm-volume-size", "changing VM volume size"),
    _ip("connect-to-vm-console", "connecting to VM console"),
    _ip("connect-to-vm-serial-port", "connecting to VM serial port"),
    _ip("copy-vm", "copying VM"),
    Command("create-vm", action="creating VM"),
    _ip("debug-vm-image", "debugging VM image", NOT_SERVED),
    _ip("delete-vm-volume", "deleting VM volume"),
    _ip("destroy-vm", "destroying VM"),
    _ip("discard-vm-old-image", "discarding VM old image"),
    _ip("discard-vm-old-user-data", "discarding VM old user data"),
    _ip("discard-vm-snapshot", "discarding VM snapshot"),
    _ip("export-local-vm", "exporting VM"),
    _ip("export-virsh-vm", "exporting VM to virsh", LOCAL),
    Command("get-hypervisors", unavailable=FLEET_ONLY, action="getting hypervisors"),
    _ip("get-vm-info", "getting VM info"),
    _ip("get-vm-user-data", "getting VM user data"),
    _ip("get-vm-volume", "getting VM volume", GOB_ONLY),
    Command("import-local-vm", "info-file root-volume", 2, 2, action="importing VM"),
    Command("import-virsh-vm", "MACaddr domain [[MAC IP]...]", 2, 1024, LOCAL),
    Command("list-hypervisors", unavailable=FLEET_ONLY, action="listing hypervisors"),
    Command("list-locations", "[TopLocation]", 0, 1, FLEET_ONLY, action="listing locations"),
    Command("list-vms", action="listing VMs"),
    _ip("migrate-vm", "migrating VM"),
    _ip("patch-vm-image", "patching VM image", NOT_SERVED),
    _ip("probe-vm-port", "probing VM port", NOT_SERVED),
    _ip("reboot-vm", "rebooting VM"),
    _ip("replace-vm-credentials", "replacing VM credentials", NOT_SERVED),
    _ip("replace-vm-image", "replacing VM image"),
    _ip("replace-vm-user-data", "replacing VM user data"),
    Command("restore-vm", "source", 1, 1, GOB_ONLY),
    _ip("restore-vm-from-snapshot", "restoring VM from snapshot"),
    _ip("restore-vm-image", "restoring VM image"),
    _ip("restore-vm-user-data", "restoring VM user data"),
    _ip("reorder-vm-volumes", "reordering VM volumes"),
    _ip("set-vm-migrating", "setting VM migrating"),
    _ip("snapshot-vm", "snapshotting VM"),
    Command("save-vm", "IPaddr destination", 2, 2, GOB_ONLY),
    _ip("scan-vm-root", "scanning VM root", NOT_SERVED),
    _ip("start-vm", "starting VM"),
    _ip("stop-vm", "stopping VM"),
    _ip("trace-vm-metadata", "tracing VM metadata"),
    _ip("unset-vm-migrating", "unsetting VM migrating"),
    # Later Go vm-control versions have these; v0.3.4 does not:
    _ip("change-vm-hostname", "changing VM hostname", go=False),
    _ip("change-vm-owner-groups", "changing VM owner groups", go=False),
    _ip("get-vm-create-request", "getting VM create request", go=False),
    Command("get-vm-infos", go=False, action="getting VM infos"),
    _ip("change-vm-volume-storage-index", "changing VM volume storage index", go=False),
    _ip("get-vm-volume-storage-configuration", "getting VM volume storage configuration", go=False),
]


def _mib(size: int) -> int:
    return size >> 20


def _filter(v: dict[str, Any]) -> model.VmFilter:
    mask = 0
    if v["state"]:
        keep = model.State.from_text(v["state"])
        mask = sum(1 << s.number for s in model.State if s != keep)
    return model.VmFilter(
        IgnoreStateMask=mask,
        OwnerGroups=v["ownerGroups"],
        OwnerUsers=v["ownerUsers"],
        VmTagsToMatch=v["vmTagsToMatch"],
    )


def _read_pem(path: str, flag: str) -> bytes:
    if not path:
        return b""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ClientError(f"cannot read -{flag} {path}: {e.strerror}") from None


def create_request(v: dict[str, Any]) -> model.CreateVmRequest:
    """
    The CreateVmRequest Go's vm-control sends for these flags (sizes of uploads not set).
    """
    addresses = [model.Address(IpAddress=ip) for ip in v["requestIPs"]]
    types = v["volumeTypes"] or ["persistent"]
    secondary = [
        model.Volume(
            Size=size,
            Type=model.VolumeType(types[i + 1] if i + 1 < len(types) else types[-1]),
        )
        for i, size in enumerate(v["secondaryVolumeSizes"])
    ]
    info = model.VmInfo(
        Address=addresses[0] if addresses else model.Address(),
        ConsoleType=model.ConsoleType(v["consoleType"]),
        DestroyOnPowerdown=v["destroyOnPowerdown"],
        DestroyProtection=v["destroyProtection"],
        DisableVirtIO=v["disableVirtIO"],
        ExtraKernelOptions=v["extraKernelOptions"],
        Hostname=v["vmHostname"],
        ImageName=v["imageName"],
        ImageURL=v["imageURL"],
        MemoryInMiB=_mib(v["memory"]),
        MilliCPUs=v["milliCPUs"],
        OwnerGroups=v["ownerGroups"],
        OwnerUsers=v["ownerUsers"],
        SecondaryAddresses=addresses[1:],
        SecondarySubnetIDs=v["secondarySubnetIDs"],
        SubnetId=v["subnetId"],
        Tags=v["vmTags"],
        VirtualCPUs=v["vCPUs"],
    )
    return model.CreateVmRequest(
        DhcpTimeout=model.Duration(v["dhcpTimeout"]),
        DoNotStart=v["doNotStart"],
        EnableNetboot=v["enableNetboot"],
        IdentityCertificate=_read_pem(v["identityCertFile"], "identityCertFile"),
        IdentityKey=_read_pem(v["identityKeyFile"], "identityKeyFile"),
        # As Go's: the image timeout is sent for -imageName (image server) only.
        ImageTimeout=model.Duration(v["imageTimeout"] if v["imageName"] else 0),
        MinimumFreeBytes=v["minFreeBytes"],
        RoundupPower=v["roundupPower"],
        SecondaryVolumes=secondary,
        SkipBootloader=v["skipBootloader"],
        SkipMemoryCheck=v["skipMemoryCheck"],
        VmInfo=info,
        KernelURL=v["kernelURL"],
        InitrdURL=v["initrdURL"],
    )


async def create_vm(t: Tool, args: list[str]) -> int:
    """
    CreateVm (uploading -imageFile and -userDataFile), then AcknowledgeVm; on a DHCP
    timeout the VM is destroyed, as Go's vm-control does.
    """
    v = t.v
    request = create_request(v)
    parts: list[IO[bytes]] = []
    sizes: list[int] = []
    for path, flag, attr in (
        (v["imageFile"], "imageFile", "ImageDataSize"),
        (v["userDataFile"], "userDataFile", "UserDataSize"),
    ):
        if path:
            try:
                f = open(path, "rb")
            except OSError as e:
                raise ClientError(f"cannot read -{flag} {path}: {e.strerror}") from None
            size = os.fstat(f.fileno()).st_size
            setattr(request, attr, size)
            parts.append(f)
            sizes.append(size)

    def progress(raw: bytes) -> None:
        message = decode(model.CreateVmResponse, raw)
        if message.ProgressMessage:
            t.debug(0, message.ProgressMessage)

    final: Optional[model.CreateVmResponse] = None
    candidates = await t.hypervisors_for_new_vm()
    for index, hv in enumerate(candidates):
        for part in parts:
            part.seek(0)
        t.debug(0, f"creating VM on {hv.address}")
        if v["imageFile"]:
            t.debug(0, "uploading image")
        if v["userDataFile"]:
            t.debug(0, "uploading user data")
        try:
            final = await t.call(
                hv,
                "Hypervisor.CreateVm",
                request,
                model.CreateVmResponse,
                (parts, sizes) if parts else None,
                progress,
            )
            break
        except ClientError as e:
            if index + 1 == len(candidates):
                raise
            t.log(f"error creating VM on {hv.address}: {e}: trying the next hypervisor")
    for part in parts:
        part.close()
    assert final is not None
    ip = final.IpAddress
    # Go's vm-control ignores AcknowledgeVm's Error (transcript 07, step 9).
    await t.call(hv, "Hypervisor.AcknowledgeVm", model.IpRequest(IpAddress=ip), None, check=False)
    if final.DhcpTimedOut:
        t.log(f"DHCP timed out for VM {ip}: destroying it")
        await t.call(hv, "Hypervisor.DestroyVm", model.AccessRequest(IpAddress=ip), None)
        return 1
    print(ip)
    return 0


async def _vm_info(t: Tool, hv: Any, ip: str) -> model.VmInfo:
    reply = await t.call(
        hv, "Hypervisor.GetVmInfo", model.IpRequest(IpAddress=ip), model.GetVmInfoResponse
    )
    return reply.VmInfo


async def get_vm_info(t: Tool, args: list[str]) -> int:
    """
    Print the VmInfo, Go-indented.
    """
    show(await _vm_info(t, await t.hypervisor(args[0]), args[0]))
    return 0


async def get_vm_volume_storage_configuration(t: Tool, args: list[str]) -> int:
    """
    Print the volume directories' figures and the storage index of each of the VM's
    volumes, Go-indented.
    """
    hv = await t.hypervisor(args[0])
    show(
        await t.call(
            hv,
            "Hypervisor.GetVmVolumeStorageConfiguration",
            model.IpRequest(IpAddress=args[0]),
            model.GetVmVolumeStorageConfigurationResponse,
        )
    )
    return 0


async def list_vms(t: Tool, args: list[str]) -> int:
    """
    Print VM IPs, one per line, sorted.
    """
    hv = await t.hypervisor()
    reply = await t.call(
        hv,
        "Hypervisor.ListVMs",
        model.ListVMsRequest(Filter=_filter(t.v), Sort=True),
        model.ListVMsResponse,
    )
    for ip in reply.IpAddresses:
        print(ip)
    return 0


async def get_vm_infos(t: Tool, args: list[str]) -> int:
    """
    Print every VmInfo (filters as list-vms), Go-indented.
    """
    hv = await t.hypervisor()
    reply = await t.call(
        hv,
        "Hypervisor.GetVmInfos",
        model.GetVmInfosRequest(Filter=_filter(t.v)),
        model.GetVmInfosResponse,
    )
    for info in reply.VmInfos:
        show(info)
    return 0


async def get_vm_create_request(t: Tool, args: list[str]) -> int:
    """
    Print the request the VM was created with.
    """
    hv = await t.hypervisor(args[0])
    reply = await t.call(
        hv,
        "Hypervisor.GetVmCreateRequest",
        model.IpRequest(IpAddress=args[0]),
        model.GetVmCreateRequestResponse,
    )
    show(reply.CreateRequest)
    return 0


async def _dhcp_call(t: Tool, method: str, request: Any) -> int:
    hv = await t.hypervisor(request.IpAddress)
    reply = await t.call(hv, method, request, model.DhcpResponse)
    if reply.DhcpTimedOut:
        t.log(f"DHCP ACK timed out for VM {request.IpAddress}")
        return 1
    return 0


async def start_vm(t: Tool, args: list[str]) -> int:
    """
    StartVm, waiting -dhcpTimeout for the VM's DHCP request.
    """
    return await _dhcp_call(
        t,
        "Hypervisor.StartVm",
        model.StartVmRequest(IpAddress=args[0], DhcpTimeout=model.Duration(t.v["dhcpTimeout"])),
    )


async def reboot_vm(t: Tool, args: list[str]) -> int:
    """
    RebootVm, waiting -dhcpTimeout for the VM's DHCP request.
    """
    return await _dhcp_call(
        t,
        "Hypervisor.RebootVm",
        model.RebootVmRequest(IpAddress=args[0], DhcpTimeout=model.Duration(t.v["dhcpTimeout"])),
    )


def _after_info(method: str) -> Any:
    """
    Go's stop-vm and destroy-vm: GetVmInfo first (a clear error for an unknown VM),
    then the call, on the same connection.
    """

    async def run(t: Tool, args: list[str]) -> int:
        hv = await t.hypervisor(args[0])
        await _vm_info(t, hv, args[0])
        await t.call(hv, method, model.AccessRequest(IpAddress=args[0]), model.ErrorResponse)
        return 0

    return run


async def change_vm_tags(t: Tool, args: list[str]) -> int:
    """
    Go's change-vm-tags: the VM's tags with -vmTags merged in.
    """
    hv = await t.hypervisor(args[0])
    info = await _vm_info(t, hv, args[0])
    tags = dict(info.Tags)
    tags.update(t.v["vmTags"])
    await t.call(
        hv,
        "Hypervisor.ChangeVmTags",
        model.ChangeVmTagsRequest(IpAddress=args[0], Tags=tags),
        model.ErrorResponse,
    )
    return 0


def _simple(method: str, build: Any) -> Any:
    async def run(t: Tool, args: list[str]) -> int:
        hv = await t.hypervisor(args[0])
        await t.call(hv, method, build(t.v, args[0]), model.ErrorResponse)
        return 0

    return run


def _open_upload(path: str, flag: str) -> tuple[IO[bytes], int]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ClientError(f"cannot read -{flag} {path}: {e.strerror}") from None
    return f, os.fstat(f.fileno()).st_size


async def replace_vm_user_data(t: Tool, args: list[str]) -> int:
    """
    ReplaceVmUserData with the bytes of -userDataFile (the old copy is kept).
    """
    if not t.v["userDataFile"]:
        raise ClientError("no -userDataFile given")
    f, size = _open_upload(t.v["userDataFile"], "userDataFile")
    with f:
        hv = await t.hypervisor(args[0])
        await t.call(
            hv,
            "Hypervisor.ReplaceVmUserData",
            model.ReplaceVmUserDataRequest(IpAddress=args[0], Size=size),
            model.ErrorResponse,
            ([f], [size]),
        )
    return 0


async def replace_vm_image(t: Tool, args: list[str]) -> int:
    """
    ReplaceVmImage from -imageName, -imageURL or -imageFile (uploaded), progress at
    -logDebugLevel 0; the old root is kept unless -skipBackup.
    """
    v = t.v
    request = model.ReplaceVmImageRequest(
        DhcpTimeout=model.Duration(v["dhcpTimeout"]),
        ImageName=v["imageName"],
        ImageTimeout=model.Duration(v["imageTimeout"] if v["imageName"] else 0),
        ImageURL=v["imageURL"],
        IpAddress=args[0],
        MinimumFreeBytes=v["minFreeBytes"],
        RoundupPower=v["roundupPower"],
        SkipBackup=v["skipBackup"],
        SkipBootloader=v["skipBootloader"],
    )
    if not (v["imageName"] or v["imageURL"] or v["imageFile"]):
        raise ClientError("no -imageName, -imageURL or -imageFile given")
    tail = None
    f: Optional[IO[bytes]] = None
    if v["imageFile"] and not (v["imageName"] or v["imageURL"]):
        f, size = _open_upload(v["imageFile"], "imageFile")
        request.ImageDataSize = size
        tail = ([f], [size])

    def progress(raw: bytes) -> None:
        message = decode(model.ReplaceVmImageResponse, raw)
        if message.ProgressMessage:
            t.debug(0, message.ProgressMessage)

    try:
        hv = await t.hypervisor(args[0])
        final = await t.call(
            hv, "Hypervisor.ReplaceVmImage", request, model.ReplaceVmImageResponse, tail, progress
        )
    finally:
        if f is not None:
            f.close()
    if final.DhcpTimedOut:
        t.log(f"DHCP ACK timed out for VM {args[0]}")
        return 1
    return 0


async def get_vm_user_data(t: Tool, args: list[str]) -> int:
    """
    GetVmUserData into -userDataFile, as Go's.
    """
    path = t.v["userDataFile"]
    if not path:
        raise ClientError("no -userDataFile given")
    hv = await t.hypervisor(args[0])
    reply, data = await hv.call_download(
        "Hypervisor.GetVmUserData", codec.encode(model.AccessRequest(IpAddress=args[0]))
    )
    error = error_of(reply)
    if error:
        raise ClientError(error)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise ClientError(f"cannot write -userDataFile {path}: {e.strerror}") from None
    return 0


class _StreamEnded(Exception):
    pass


async def trace_vm_metadata(t: Tool, args: list[str]) -> int:
    """
    Print each metadata path the VM requests, until the VM is destroyed (or ^C).
    """
    ended: list[str] = []

    def one(raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            raise ClientError(f"malformed message: {raw[:200]!r}") from None
        if not isinstance(message, dict):
            raise ClientError(f"malformed message: {raw[:200]!r}")
        if message.get("Error"):
            ended.append(str(message["Error"]))
            raise _StreamEnded()
        if message.get("Path"):
            print(message["Path"], flush=True)

    hv = await t.hypervisor(args[0])
    request = model.IpRequest(IpAddress=args[0])
    try:
        last = await t.call(
            hv, "Hypervisor.TraceVmMetadata", request, None, on_message=one, check=False
        )
        if last:
            one(json.dumps(last).encode())
    except _StreamEnded:
        pass
    if ended and ended[0] != "VM destroyed":
        raise ClientError(ended[0])
    if ended:
        t.log(ended[0])
    return 0


async def _open_console(t: Tool, method: str, request: bytes, ip: str) -> Any:
    """
    A console call over -transport, answered (hypervisor.cli.console), in a thread.
    """
    from twisted.internet.threads import deferToThread

    from hypervisor.cli import console

    hv = await t.hypervisor(ip)
    host, _, port = hv.address.rpartition(":")
    if t.v["transport"] == "pb":
        from hypervisor.cli.pb_console import open_pb

        return await open_pb(t.reactor, hv, method, request)
    if t.v["transport"] == "srpc":
        channel = await deferToThread(
            console.open_srpc,
            host.strip("[]"),
            int(port),
            t.pair,
            t.v["CAfile"],
            method,
            request,
            t.v.get("srpcClientDoNotUseMethodPowers", False),
        )
    else:
        channel = await deferToThread(
            console.open_websocket,
            host.strip("[]"),
            int(port),
            t.pair,
            t.v["CAfile"],
            method,
            request,
        )
    return channel


async def connect_to_vm_serial_port(t: Tool, args: list[str]) -> int:
    """
    The VM's serial port on this terminal (hypervisor.cli.console), until Control-\\.
    """
    from twisted.internet.threads import deferToThread

    from hypervisor.cli import console
    from hypervisor.console.model import ConnectToVmSerialPortRequest

    request = codec.encode(
        ConnectToVmSerialPortRequest(IpAddress=args[0], PortNumber=t.v["serialPort"])
    )
    channel = await _open_console(t, "Hypervisor.ConnectToVmSerialPort", request, args[0])
    result: int = await deferToThread(
        console.run_terminal, channel, sys.stdin.buffer, sys.stderr.buffer
    )
    return result


async def connect_to_vm_console(t: Tool, args: list[str]) -> int:
    """
    Go's: the VM's VNC console on a localhost port, for -vncViewer (or any viewer).
    """
    from twisted.internet.threads import deferToThread

    from hypervisor.cli import console
    from hypervisor.console.model import ConnectToVmConsoleRequest

    request = codec.encode(ConnectToVmConsoleRequest(IpAddress=args[0]))
    channel = await _open_console(t, "Hypervisor.ConnectToVmConsole", request, args[0])
    result: int = await deferToThread(console.serve_vnc_once, channel, t.v["vncViewer"], t.log)
    return result


RUNNERS: dict[str, tool.Runner] = {
    "connect-to-vm-serial-port": connect_to_vm_serial_port,
    "connect-to-vm-console": connect_to_vm_console,
    "change-vm-console-type": _simple(
        "Hypervisor.ChangeVmConsoleType",
        lambda v, ip: ChangeVmConsoleTypeRequest(
            IpAddress=ip, ConsoleType=model.ConsoleType(v["consoleType"])
        ),
    ),
    "trace-vm-metadata": trace_vm_metadata,
    "get-vm-user-data": get_vm_user_data,
    "replace-vm-user-data": replace_vm_user_data,
    "replace-vm-image": replace_vm_image,
    "add-vm-volumes": _simple(
        "Hypervisor.AddVmVolumes",
        lambda v, ip: model.AddVmVolumesRequest(
            IpAddress=ip, VolumeSizes=v["secondaryVolumeSizes"]
        ),
    ),
    "change-vm-volume-size": _simple(
        "Hypervisor.ChangeVmVolumeSize",
        lambda v, ip: model.ChangeVmVolumeSizeRequest(
            IpAddress=ip, VolumeIndex=v["volumeIndex"], VolumeSize=v["volumeSize"]
        ),
    ),
    "change-vm-volume-storage-index": _simple(
        "Hypervisor.ChangeVmVolumeStorageIndex",
        lambda v, ip: model.ChangeVmVolumeStorageIndexRequest(
            IpAddress=ip, StorageIndex=v["storageIndex"], VolumeIndex=v["volumeIndex"]
        ),
    ),
    "get-vm-volume-storage-configuration": get_vm_volume_storage_configuration,
    "delete-vm-volume": _simple(
        "Hypervisor.DeleteVmVolume",
        lambda v, ip: model.DeleteVmVolumeRequest(IpAddress=ip, VolumeIndex=v["volumeIndex"]),
    ),
    "discard-vm-old-image": _simple(
        "Hypervisor.DiscardVmOldImage", lambda v, ip: model.IpRequest(IpAddress=ip)
    ),
    "discard-vm-old-user-data": _simple(
        "Hypervisor.DiscardVmOldUserData", lambda v, ip: model.IpRequest(IpAddress=ip)
    ),
    "discard-vm-snapshot": _simple(
        "Hypervisor.DiscardVmSnapshot",
        lambda v, ip: model.DiscardVmSnapshotRequest(IpAddress=ip),
    ),
    "reorder-vm-volumes": _simple(
        "Hypervisor.ReorderVmVolumes",
        lambda v, ip: model.ReorderVmVolumesRequest(IpAddress=ip, VolumeIndices=v["volumeIndices"]),
    ),
    "restore-vm-from-snapshot": _simple(
        "Hypervisor.RestoreVmFromSnapshot",
        lambda v, ip: model.RestoreVmFromSnapshotRequest(
            IpAddress=ip, ForceIfNotStopped=v["forceIfNotStopped"]
        ),
    ),
    "restore-vm-image": _simple(
        "Hypervisor.RestoreVmImage", lambda v, ip: model.IpRequest(IpAddress=ip)
    ),
    "restore-vm-user-data": _simple(
        "Hypervisor.RestoreVmUserData", lambda v, ip: model.IpRequest(IpAddress=ip)
    ),
    "snapshot-vm": _simple(
        "Hypervisor.SnapshotVm",
        lambda v, ip: model.SnapshotVmRequest(
            IpAddress=ip,
            ForceIfNotStopped=v["forceIfNotStopped"],
            RootOnly=v["snapshotRootOnly"],
        ),
    ),
    "create-vm": create_vm,
    "migrate-vm": migrate.migrate_vm,
    "copy-vm": migrate.copy_vm,
    "export-local-vm": local.export_local_vm,
    "import-local-vm": local.import_local_vm,
    # Debugging, as Go's changeVmMigrating.go (an admin's own VM, or with its token).
    "set-vm-migrating": _simple(
        "Hypervisor.PrepareVmForMigration",
        lambda v, ip: PrepareVmForMigrationRequest(IpAddress=ip, Enable=True),
    ),
    "unset-vm-migrating": _simple(
        "Hypervisor.PrepareVmForMigration",
        lambda v, ip: PrepareVmForMigrationRequest(IpAddress=ip, Enable=False),
    ),
    "get-vm-info": get_vm_info,
    "get-vm-infos": get_vm_infos,
    "get-vm-create-request": get_vm_create_request,
    "list-vms": list_vms,
    "start-vm": start_vm,
    "reboot-vm": reboot_vm,
    "stop-vm": _after_info("Hypervisor.StopVm"),
    "destroy-vm": _after_info("Hypervisor.DestroyVm"),
    "change-vm-tags": change_vm_tags,
    "become-primary-vm-owner": _simple(
        "Hypervisor.BecomePrimaryVmOwner", lambda v, ip: model.IpRequest(IpAddress=ip)
    ),
    "change-vm-cpus": _simple(
        "Hypervisor.ChangeVmSize",
        lambda v, ip: model.ChangeVmSizeRequest(IpAddress=ip, MilliCPUs=v["milliCPUs"]),
    ),
    "change-vm-vcpus": _simple(
        "Hypervisor.ChangeVmSize",
        lambda v, ip: model.ChangeVmSizeRequest(IpAddress=ip, VirtualCPUs=v["vCPUs"]),
    ),
    "change-vm-memory": _simple(
        "Hypervisor.ChangeVmSize",
        lambda v, ip: model.ChangeVmSizeRequest(IpAddress=ip, MemoryInMiB=_mib(v["memory"])),
    ),
    "change-vm-destroy-protection": _simple(
        "Hypervisor.ChangeVmDestroyProtection",
        lambda v, ip: model.ChangeVmDestroyProtectionRequest(
            IpAddress=ip, DestroyProtection=v["destroyProtection"]
        ),
    ),
    "change-vm-owner-users": _simple(
        "Hypervisor.ChangeVmOwnerUsers",
        lambda v, ip: model.ChangeVmOwnerUsersRequest(IpAddress=ip, OwnerUsers=v["ownerUsers"]),
    ),
    "change-vm-owner-groups": _simple(
        "Hypervisor.ChangeVmOwnerGroups",
        lambda v, ip: model.ChangeVmOwnerGroupsRequest(IpAddress=ip, OwnerGroups=v["ownerGroups"]),
    ),
    "change-vm-hostname": _simple(
        "Hypervisor.ChangeVmHostname",
        lambda v, ip: model.ChangeVmHostnameRequest(IpAddress=ip, Hostname=v["vmHostname"]),
    ),
}

# The Go commands not run because their method is not served: that method (a test
# fails when the daemon starts serving one, so that its command gets a runner).
UNSERVED_METHODS: dict[str, str] = {
    "debug-vm-image": "DebugVmImage",
    "patch-vm-image": "PatchVmImage",
    "probe-vm-port": "ProbeVmPort",
    "replace-vm-credentials": "ReplaceVmCredentials",
    "scan-vm-root": "ScanVmRoot",
}

# Each runnable command's hypervisor method (checked against the daemon's table).
METHODS: dict[str, str] = {
    "change-vm-console-type": "ChangeVmConsoleType",
    "connect-to-vm-serial-port": "ConnectToVmSerialPort",
    "connect-to-vm-console": "ConnectToVmConsole",
    "get-vm-user-data": "GetVmUserData",
    "trace-vm-metadata": "TraceVmMetadata",
    "replace-vm-user-data": "ReplaceVmUserData",
    "replace-vm-image": "ReplaceVmImage",
    "add-vm-volumes": "AddVmVolumes",
    "change-vm-volume-size": "ChangeVmVolumeSize",
    "delete-vm-volume": "DeleteVmVolume",
    "discard-vm-old-image": "DiscardVmOldImage",
    "discard-vm-old-user-data": "DiscardVmOldUserData",
    "discard-vm-snapshot": "DiscardVmSnapshot",
    "reorder-vm-volumes": "ReorderVmVolumes",
    "change-vm-volume-storage-index": "ChangeVmVolumeStorageIndex",
    "get-vm-volume-storage-configuration": "GetVmVolumeStorageConfiguration",
    "restore-vm-from-snapshot": "RestoreVmFromSnapshot",
    "restore-vm-image": "RestoreVmImage",
    "restore-vm-user-data": "RestoreVmUserData",
    "snapshot-vm": "SnapshotVm",
    "create-vm": "CreateVm",
    "migrate-vm": "MigrateVm",
    "export-local-vm": "ExportLocalVm",
    "import-local-vm": "ImportLocalVm",
    "copy-vm": "CopyVm",
    "set-vm-migrating": "PrepareVmForMigration",
    "unset-vm-migrating": "PrepareVmForMigration",
    "get-vm-info": "GetVmInfo",
    "get-vm-infos": "GetVmInfos",
    "get-vm-create-request": "GetVmCreateRequest",
    "list-vms": "ListVMs",
    "start-vm": "StartVm",
    "reboot-vm": "RebootVm",
    "stop-vm": "StopVm",
    "destroy-vm": "DestroyVm",
    "change-vm-tags": "ChangeVmTags",
    "become-primary-vm-owner": "BecomePrimaryVmOwner",
    "change-vm-cpus": "ChangeVmSize",
    "change-vm-vcpus": "ChangeVmSize",
    "change-vm-memory": "ChangeVmSize",
    "change-vm-destroy-protection": "ChangeVmDestroyProtection",
    "change-vm-owner-users": "ChangeVmOwnerUsers",
    "change-vm-owner-groups": "ChangeVmOwnerGroups",
    "change-vm-hostname": "ChangeVmHostname",
}

NOTES = (
    "Progress messages are logged at -logDebugLevel 0 or above. Not available commands"
    " exit 2 without contacting anything."
)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Entry point of the C{vm-control} console script.
    """
    return tool.main("vm-control", argv, FLAGS, COMMANDS, RUNNERS, NOTES)


if __name__ == "__main__":
    sys.exit(main())
