# -*- test-case-name: tests.test_model -*-
"""
The hypervisor's data model with the reference's field names (proto/hypervisor).

Every class here is a dataclass encoded by L{hypervisor.codec}: the same JSON in
C{info.json}, in every transport and in the Go tools, byte for byte what the Go
daemon (v0.3.4, the SRPC transcripts) writes for the same values. Fields are in the
Go structs' order; fields marked C{omitempty} are those the Go structs tag so (the
others are always written, an empty list or map as C{null} unless C{nonnil}).
Fields marked I{ours} are not in the Go structs: they are C{omitempty}, so that a
message with them at zero is exactly Go's; Go clients ignore them otherwise.

Every field says what the codec validates when a request is decoded (see
L{hypervisor.codec}): integers carry their Go type (C{Uint64}, C{Uint}, C{Int}), so
that a value a Go client cannot hold is refused; strings are at most
L{hypervisor.codec.MAX_STRING} characters unless annotated tighter (names and ids
L{NameText}, host names L{HostnameText}, addresses L{IPv4Text} and L{MacText}); lists
and maps at most L{hypervisor.codec.MAX_ITEMS} elements unless annotated otherwise.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Annotated, ClassVar, Optional

from hypervisor.codec import (
    Duration,
    HostnameText,
    Int,
    IPv4Text,
    MacText,
    MaxLen,
    PathText,
    TextEnum,
    Uint,
    Uint16,
    Uint32,
    Uint64,
    field,
)

NameText = Annotated[str, MaxLen(256)]
"""A user, group, subnet id, tag key, snapshot name...: at most 256 characters."""

MessageText = Annotated[str, MaxLen(65536)]
"""An error or progress message in a response."""

NameList = Annotated[list[NameText], MaxLen(1024)]
"""Owner users or groups, allowed users or groups, subnet ids."""

TagsT = Annotated[dict[NameText, str], MaxLen(1024)]
"""Tags: at most 1024, keys at most 256 characters, values 4096."""

MANY = 65536
"""Elements of a list in a response or a state file (VMs, addresses, subnets)."""


class State(TextEnum):
    """
    VM state (reference §2.2); the index is the bit in C{IgnoreStateMask}.
    """

    STARTING = "starting"
    RUNNING = "running"
    FAILED_TO_START = "failed to start"
    STOPPING = "stopping"
    STOPPED = "stopped"
    DESTROYING = "destroying"
    MIGRATING = "migrating"
    EXPORTING = "exporting"
    CRASHED = "crashed"
    DEBUGGING = "debugging"


StateT = State


class VolumeFormat(TextEnum):
    """
    Volume file format.
    """

    RAW = "raw"
    QCOW2 = "qcow2"


VolumeFormatT = VolumeFormat


class VolumeInterface(TextEnum):
    """
    How a volume is attached.
    """

    VIRTIO = "virtio"
    IDE = "ide"
    NVME = "nvme"
    DFM = "dfm"


class VolumeType(TextEnum):
    """
    Where a volume lives.
    """

    PERSISTENT = "persistent"
    MEMORY = "memory"


class ConsoleType(TextEnum):
    """
    The VM's graphical console.
    """

    NONE = "none"
    DUMMY = "dummy"
    VNC = "vnc"


ConsoleTypeT = ConsoleType


class FirmwareType(TextEnum):
    """
    Firmware.
    """

    DEFAULT = "default"
    BIOS = "bios"
    UEFI = "uefi"


FirmwareTypeT = FirmwareType


class MachineType(TextEnum):
    """
    QEMU machine type.
    """

    AUTO = "auto"
    Q35 = "q35"
    PC = "pc"
    VIRT = "virt"


MachineTypeT = MachineType


class ArchitectureType(TextEnum):
    """
    Guest architecture.
    """

    AUTO = "auto"
    AMD64 = "amd64"
    ARM64 = "arm64"


ArchitectureTypeT = ArchitectureType


class WatchdogAction(TextEnum):
    """
    What the watchdog does.
    """

    NONE = "none"
    RESET = "reset"
    SHUTDOWN = "shutdown"
    POWEROFF = "poweroff"


WatchdogActionT = WatchdogAction


class WatchdogModel(TextEnum):
    """
    The watchdog device.
    """

    NONE = "none"
    IB700 = "ib700"
    I6300ESB = "i6300esb"


WatchdogModelT = WatchdogModel


class CloudInitDatasource(TextEnum):
    """
    I{Ours}: which cloud-init datasource the VM's SMBIOS data advertises
    (C{default} = the daemon's choice).
    """

    DEFAULT = "default"
    OPENSTACK = "openstack"
    NOCLOUD = "nocloud"
    NONE = "none"


CloudInitDatasourceT = CloudInitDatasource


@dataclass
class Address:
    """
    An IP (optional: externally allocated) and a MAC address.
    """

    IpAddress: IPv4Text = field(omitempty=True, default="")
    MacAddress: MacText = ""


AddressT = Address


@dataclass
class Subnet:
    """
    A subnet VMs can be placed on.
    """

    Id: NameText = ""
    IpGateway: IPv4Text = ""
    IpMask: IPv4Text = ""
    DomainName: Annotated[str, MaxLen(253)] = field(omitempty=True, default="")
    DomainNameServers: Annotated[list[IPv4Text], MaxLen(16)] = field(default_factory=list)
    DisableMetadata: bool = field(omitempty=True, default=False)
    Manage: bool = field(omitempty=True, default=False)
    VlanId: Uint = field(omitempty=True, default=0)
    AllowedGroups: NameList = field(omitempty=True, default_factory=list)
    AllowedUsers: NameList = field(omitempty=True, default_factory=list)
    FirstDynamicIP: IPv4Text = field(omitempty=True, default="")
    LastDynamicIP: IPv4Text = field(omitempty=True, default="")
    Tags: TagsT = field(omitempty=True, default_factory=dict)


@dataclass
class Volume:
    """
    One VM volume (index 0 is the root volume).
    """

    Format: VolumeFormat = VolumeFormat.RAW
    Interface: VolumeInterface = field(omitempty=True, default=VolumeInterface.VIRTIO)
    Size: Uint64 = 0
    Snapshots: Annotated[dict[NameText, Uint64], MaxLen(1024)] = field(
        omitempty=True, default_factory=dict
    )
    Type: VolumeType = VolumeType.PERSISTENT
    VirtualSize: Uint64 = field(omitempty=True, default=0)

    @property
    def effective_size(self) -> int:
        """
        max(Size, VirtualSize): what the volume may grow to.
        """
        return max(self.Size, self.VirtualSize)


@dataclass
class NetworkEntry:
    """
    Per-interface settings.
    """

    NumQueues: Uint = field(omitempty=True, default=0)


@dataclass
class VmInfo:
    """
    Everything known about a VM (reference §2.1).
    """

    Address: AddressT = field(default_factory=Address)
    ArchitectureType: ArchitectureTypeT = field(omitempty=True, default=ArchitectureType.AUTO)
    ChangedStateOn: Optional[datetime.datetime] = field(omitempty=True, default=None)
    ConsoleType: ConsoleTypeT = field(omitempty=True, default=ConsoleType.NONE)
    CreatedOn: Optional[datetime.datetime] = field(omitempty=True, default=None)
    CpuPriority: Int = field(omitempty=True, default=0)
    DestroyOnPowerdown: bool = field(omitempty=True, default=False)
    DestroyProtection: bool = field(omitempty=True, default=False)
    DisableVirtIO: bool = field(omitempty=True, default=False)
    ExtraKernelOptions: str = field(omitempty=True, default="")
    FirmwareType: FirmwareTypeT = field(omitempty=True, default=FirmwareType.DEFAULT)
    Hostname: HostnameText = field(omitempty=True, default="")
    IdentityExpires: Optional[datetime.datetime] = field(omitempty=True, default=None)
    IdentityName: NameText = field(omitempty=True, default="")
    ImageName: Annotated[str, MaxLen(1024)] = field(omitempty=True, default="")
    ImageURL: str = field(omitempty=True, default="")
    MachineType: MachineTypeT = field(omitempty=True, default=MachineType.AUTO)
    MemoryInMiB: Uint64 = 0
    MilliCPUs: Uint = 0
    NetworkEntries: Annotated[list[NetworkEntry], MaxLen(64)] = field(
        omitempty=True, default_factory=list
    )
    OwnerGroups: NameList = field(omitempty=True, default_factory=list)
    OwnerUsers: NameList = field(omitempty=True, default_factory=list)
    RootFileSystemLabel: Annotated[str, MaxLen(255)] = field(omitempty=True, default="")
    SpreadVolumes: bool = field(omitempty=True, default=False)
    State: StateT = State.STARTING
    SecondaryAddresses: Annotated[list[AddressT], MaxLen(64)] = field(
        omitempty=True, default_factory=list
    )
    SecondarySubnetIDs: Annotated[list[NameText], MaxLen(64)] = field(
        omitempty=True, default_factory=list
    )
    SubnetId: NameText = field(omitempty=True, default="")
    Tags: TagsT = field(omitempty=True, default_factory=dict)
    Uncommitted: bool = field(omitempty=True, default=False)
    VirtualCPUs: Uint = field(omitempty=True, default=0)
    VirtualiserImageName: Annotated[str, MaxLen(1024)] = field(omitempty=True, default="")
    Volumes: Annotated[list[Volume], MaxLen(128)] = field(omitempty=True, default_factory=list)
    WatchdogAction: WatchdogActionT = field(omitempty=True, default=WatchdogAction.NONE)
    WatchdogModel: WatchdogModelT = field(omitempty=True, default=WatchdogModel.NONE)
    # Ours:
    CloudInitDatasource: CloudInitDatasourceT = field(
        omitempty=True, default=CloudInitDatasource.DEFAULT
    )

    @property
    def ip(self) -> str:
        """
        The primary IP address (the VM's key).
        """
        return self.Address.IpAddress

    @property
    def primary_owner(self) -> str:
        """
        OwnerUsers[0], or "".
        """
        return self.OwnerUsers[0] if self.OwnerUsers else ""


VmInfoT = VmInfo


@dataclass
class VolumeLocation:
    """
    Where a volume's file is.
    """

    DirectoryToCleanup: PathText = ""
    Filename: PathText = ""


@dataclass
class LocalVmInfo:
    """
    C{VMs/<IP>/info.json}: VmInfo flattened, plus the volume locations.
    """

    VmInfo: VmInfoT = field(embed=True, default_factory=VmInfo)
    VolumeLocations: Annotated[list[VolumeLocation], MaxLen(128)] = field(default_factory=list)


# Requests and responses (reference §1.11) ---------------------------------------


@dataclass
class ErrorResponse:
    """
    A response carrying only an error (empty on success).
    """

    Error: MessageText = ""


@dataclass
class IpRequest:
    """
    A request naming one VM by IP (AcknowledgeVm, GetVmInfo, ...).
    """

    IpAddress: IPv4Text = ""


@dataclass
class AccessRequest:
    """
    A request naming one VM, optionally with an access token (StopVm, DestroyVm).
    """

    AccessToken: Annotated[bytes, MaxLen(4096)] = b""
    IpAddress: IPv4Text = ""


@dataclass
class VolumeInitialisationInfo:
    """
    How CreateVm makes the file system of a secondary volume.
    """

    BytesPerInode: Uint64 = 0
    Label: Annotated[str, MaxLen(255)] = ""
    ReservedBlocksPercentage: Uint16 = 0
    # Later Go versions (not v0.3.4):
    RootGroupId: Uint32 = field(omitempty=True, default=0)
    RootUserId: Uint32 = field(omitempty=True, default=0)


@dataclass
class CreateVmRequest:
    """
    CreateVm: the VM's settings (embedded VmInfo) and where its volumes come from.
    Fields as Go v0.3.4 sends them (none omitted; C{StorageIndices} is later Go's);
    C{KernelURL}, C{InitrdURL} are I{ours} (direct kernel boot from local files), and
    C{StandaloneRootVolume} (a root copied from the image cache rather than a qcow2
    overlay on it).
    The daemon does not act on C{OverlayDirectories}, C{OverlayFiles},
    C{SecondaryVolumesData} and C{SecondaryVolumesInit}; they are kept, so that the
    stored request is what the client sent.
    """

    DhcpTimeout: Duration = Duration(0)
    DoNotStart: bool = False
    EnableNetboot: bool = False
    IdentityCertificate: bytes = b""
    IdentityKey: bytes = b""
    ImageDataSize: Uint64 = 0
    ImageTimeout: Duration = Duration(0)
    MinimumFreeBytes: Uint64 = 0
    OverlayDirectories: Annotated[list[Annotated[str, MaxLen(4096)]], MaxLen(1024)] = field(
        default_factory=list
    )
    OverlayFiles: Annotated[dict[Annotated[str, MaxLen(4096)], bytes], MaxLen(1024)] = field(
        default_factory=dict
    )
    RoundupPower: Uint64 = 0
    SecondaryVolumes: Annotated[list[Volume], MaxLen(128)] = field(default_factory=list)
    SecondaryVolumesData: bool = False
    SecondaryVolumesInit: Annotated[list[VolumeInitialisationInfo], MaxLen(128)] = field(
        default_factory=list
    )
    SkipBootloader: bool = False
    SkipMemoryCheck: bool = False
    StorageIndices: Annotated[list[Uint], MaxLen(128)] = field(omitempty=True, default_factory=list)
    UserDataSize: Uint64 = 0
    VmInfo: VmInfoT = field(embed=True, default_factory=VmInfo)
    # Ours:
    KernelURL: str = field(omitempty=True, default="")
    InitrdURL: str = field(omitempty=True, default="")
    StandaloneRootVolume: bool = field(omitempty=True, default=False)


@dataclass
class CreateVmResponse:
    """
    One message of CreateVm's progress stream; the last has C{Final} or C{Error}.
    """

    DhcpTimedOut: bool = False
    Final: bool = False
    IpAddress: IPv4Text = ""
    ProgressMessage: MessageText = ""
    Error: MessageText = ""


@dataclass
class StartVmRequest:
    """
    StartVm.
    """

    AccessToken: Annotated[bytes, MaxLen(4096)] = b""
    DhcpTimeout: Duration = Duration(0)
    IpAddress: IPv4Text = ""


@dataclass
class DhcpResponse:
    """
    StartVm / RebootVm response.
    """

    DhcpTimedOut: bool = False
    Error: MessageText = ""


@dataclass
class RebootVmRequest:
    """
    RebootVm.
    """

    DhcpTimeout: Duration = Duration(0)
    IpAddress: IPv4Text = ""


@dataclass
class GetVmInfoResponse:
    """
    GetVmInfo.
    """

    VmInfo: VmInfoT = field(default_factory=VmInfo)
    Error: MessageText = ""


@dataclass
class VmFilter:
    """
    Filters of ListVMs and GetVmInfos.
    """

    IgnoreStateMask: Uint64 = 0
    OwnerGroups: NameList = field(default_factory=list)
    OwnerUsers: NameList = field(default_factory=list)
    VmTagsToMatch: Annotated[dict[NameText, Annotated[list[str], MaxLen(1024)]], MaxLen(1024)] = (
        field(default_factory=dict)
    )


@dataclass
class ListVMsRequest:
    """
    ListVMs.
    """

    __go_order__: ClassVar[tuple[str, ...]] = (
        "IgnoreStateMask",
        "OwnerGroups",
        "OwnerUsers",
        "Sort",
        "VmTagsToMatch",
    )

    Filter: VmFilter = field(embed=True, default_factory=VmFilter)
    Sort: bool = False


@dataclass
class ListVMsResponse:
    """
    ListVMs. C{Error} is I{ours} (Go answers errors on the SRPC status line).
    """

    IpAddresses: Annotated[list[IPv4Text], MaxLen(MANY)] = field(nonnil=True, default_factory=list)
    Error: MessageText = field(omitempty=True, default="")


@dataclass
class GetVmInfosRequest:
    """
    GetVmInfos.
    """

    Filter: VmFilter = field(embed=True, default_factory=VmFilter)


@dataclass
class GetVmInfosResponse:
    """
    GetVmInfos.
    """

    Error: MessageText = ""
    VmInfos: Annotated[list[VmInfo], MaxLen(MANY)] = field(nonnil=True, default_factory=list)


@dataclass
class GetVmCreateRequestResponse:
    """
    GetVmCreateRequest.
    """

    CreateRequest: CreateVmRequest = field(default_factory=CreateVmRequest)
    Error: MessageText = ""


@dataclass
class ChangeVmSizeRequest:
    """
    ChangeVmSize.
    """

    IpAddress: IPv4Text = ""
    MemoryInMiB: Uint64 = 0
    MilliCPUs: Uint = 0
    VirtualCPUs: Uint = 0


@dataclass
class ChangeVmTagsRequest:
    """
    ChangeVmTags.
    """

    IpAddress: IPv4Text = ""
    Tags: TagsT = field(default_factory=dict)


@dataclass
class ChangeVmOwnerUsersRequest:
    """
    ChangeVmOwnerUsers.
    """

    IpAddress: IPv4Text = ""
    OwnerUsers: NameList = field(default_factory=list)


@dataclass
class ChangeVmOwnerGroupsRequest:
    """
    ChangeVmOwnerGroups.
    """

    IpAddress: IPv4Text = ""
    OwnerGroups: NameList = field(default_factory=list)


@dataclass
class ChangeVmDestroyProtectionRequest:
    """
    ChangeVmDestroyProtection.
    """

    DestroyProtection: bool = False
    IpAddress: IPv4Text = ""


@dataclass
class ChangeVmHostnameRequest:
    """
    ChangeVmHostname.
    """

    Hostname: HostnameText = ""
    IpAddress: IPv4Text = ""


@dataclass
class GetCapacityResponse:
    """
    GetCapacity.
    """

    Error: MessageText = field(omitempty=True, default="")
    AvailableMemoryInMiB: Uint64 = field(omitempty=True, default=0)
    MemoryInMiB: Uint64 = field(omitempty=True, default=0)
    NumCPUs: Uint = field(omitempty=True, default=0)
    TotalVolumeBytes: Uint64 = field(omitempty=True, default=0)


@dataclass
class SetDisabledStateRequest:
    """
    SetDisabledState.
    """

    Disable: bool = False


@dataclass
class ChangeAddressPoolRequest:
    """
    ChangeAddressPool.
    """

    AddressesToAdd: Annotated[list[Address], MaxLen(4096)] = field(default_factory=list)
    AddressesToRemove: Annotated[list[Address], MaxLen(4096)] = field(default_factory=list)
    MaximumFreeAddresses: dict[NameText, Uint] = field(default_factory=dict)


@dataclass
class UpdateSubnetsRequest:
    """
    UpdateSubnets.
    """

    Add: list[Subnet] = field(default_factory=list)
    Change: list[Subnet] = field(default_factory=list)
    Delete: NameList = field(default_factory=list)


@dataclass
class ChangeOwnersRequest:
    """
    ChangeOwners: the hypervisor's owners (they get every method).
    """

    OwnerGroups: NameList = field(omitempty=True, default_factory=list)
    OwnerUsers: NameList = field(omitempty=True, default_factory=list)


@dataclass
class ListSubnetsRequest:
    """
    ListSubnets.
    """

    Sort: bool = False


@dataclass
class ListSubnetsResponse:
    """
    ListSubnets.
    """

    Error: MessageText = ""
    Subnets: Annotated[list[Subnet], MaxLen(MANY)] = field(omitempty=True, default_factory=list)


@dataclass
class AddressPool:
    """
    C{address-pool.json}: free addresses and all registered ones.
    """

    Free: Annotated[list[Address], MaxLen(MANY)] = field(default_factory=list)
    Registered: Annotated[list[Address], MaxLen(MANY)] = field(default_factory=list)


@dataclass
class Update:
    """
    One message of GetUpdates: the first is full, later ones carry what changed.
    A deleted VM is sent as a zero VmInfo.
    """

    HaveAddressPool: bool = field(omitempty=True, default=False)
    AddressPool: Annotated[list[Address], MaxLen(MANY)] = field(
        omitempty=True, default_factory=list
    )
    AvailableMemoryInMiB: Optional[Uint64] = field(omitempty=True, default=None)
    HaveDisabled: bool = field(omitempty=True, default=False)
    Disabled: bool = field(omitempty=True, default=False)
    MemoryInMiB: Optional[Uint64] = field(omitempty=True, default=None)
    NumCPUs: Optional[Uint] = field(omitempty=True, default=None)
    NumFreeAddresses: dict[NameText, Uint] = field(omitempty=True, default_factory=dict)
    HealthStatus: NameText = field(omitempty=True, default="")
    HaveSerialNumber: bool = field(omitempty=True, default=False)
    SerialNumber: NameText = field(omitempty=True, default="")
    HaveSubnets: bool = field(omitempty=True, default=False)
    Subnets: Annotated[list[Subnet], MaxLen(MANY)] = field(omitempty=True, default_factory=list)
    TotalVolumeBytes: Optional[Uint64] = field(omitempty=True, default=None)
    HaveVMs: bool = field(omitempty=True, default=False)
    VMs: Annotated[dict[IPv4Text, VmInfo], MaxLen(MANY)] = field(
        omitempty=True, default_factory=dict
    )


# DHCP (reference §1.5) -------------------------------------------------------------

InterfaceText = Annotated[str, MaxLen(15)]
"""A network interface name (at most 15 characters, as Linux allows)."""

FileNameText = Annotated[str, MaxLen(255)]
"""A file name served by TFTP (NetbootMachine)."""

SubnetT = Subnet


@dataclass
class RegisterExternalLeasesRequest:
    """
    RegisterExternalLeases: the DHCP leases of machines that are not VMs, replacing
    the previous set; C{Hostnames[i]} goes with C{Addresses[i]} (default: the IP).
    """

    Addresses: Annotated[list[Address], MaxLen(4096)] = field(default_factory=list)
    Hostnames: Annotated[list[HostnameText], MaxLen(4096)] = field(
        omitempty=True, default_factory=list
    )


@dataclass
class NetbootMachineRequest:
    """
    NetbootMachine: a temporary DHCP lease with a boot file for a machine, and files
    for TFTP; the call returns after C{NumAcknowledgementsToWaitFor} ACKs (or fails
    after C{WaitTimeout}, default 1 min).
    """

    Address: AddressT = field(default_factory=Address)
    Files: Annotated[dict[FileNameText, Annotated[bytes, MaxLen(1 << 20)]], MaxLen(64)] = field(
        default_factory=dict
    )
    FilesExpiration: Duration = Duration(0)
    Hostname: HostnameText = ""
    NumAcknowledgementsToWaitFor: Uint = 0
    OfferExpiration: Duration = Duration(0)
    Subnet: Optional[SubnetT] = None
    WaitTimeout: Duration = Duration(0)


@dataclass
class WatchDhcpRequest:
    """
    WatchDhcp: the interface to watch ("" = all) and how many packets (0 = no limit).
    """

    Interface: InterfaceText = ""
    MaxPackets: Uint64 = 0


@dataclass
class WatchDhcpResponse:
    """
    One message of WatchDhcp: a received DHCP packet and its interface; the last one
    may carry only C{Error}.
    """

    Error: MessageText = ""
    Interface: InterfaceText = ""
    Packet: Annotated[bytes, MaxLen(65536)] = b""


# Volumes, snapshots and root images (reference §1.2, §1.3) ---------------------------


@dataclass
class AddVmVolumesRequest:
    """
    AddVmVolumes: new raw secondary volumes of these sizes (the VM stopped).
    """

    IpAddress: IPv4Text = ""
    VolumeSizes: Annotated[list[Uint64], MaxLen(128)] = field(default_factory=list)


@dataclass
class DeleteVmVolumeRequest:
    """
    DeleteVmVolume: a secondary volume (index >= 1) of a stopped VM.
    """

    AccessToken: Annotated[bytes, MaxLen(4096)] = b""
    IpAddress: IPv4Text = ""
    VolumeIndex: Uint = 0


@dataclass
class ChangeVmVolumeSizeRequest:
    """
    ChangeVmVolumeSize: a raw volume's new size (the VM stopped).
    """

    IpAddress: IPv4Text = ""
    VolumeIndex: Uint = 0
    VolumeSize: Uint64 = 0


@dataclass
class SnapshotVmRequest:
    """
    SnapshotVm: copy the volumes (or the root only) to C{.snapshot[:Name]}.
    """

    IpAddress: IPv4Text = ""
    ForceIfNotStopped: bool = False
    Name: NameText = ""
    RootOnly: bool = False


@dataclass
class RestoreVmFromSnapshotRequest:
    """
    RestoreVmFromSnapshot: the named snapshot back over the volumes.
    """

    IpAddress: IPv4Text = ""
    ForceIfNotStopped: bool = False
    Name: NameText = ""
    Retain: bool = False


@dataclass
class DiscardVmSnapshotRequest:
    """
    DiscardVmSnapshot: remove the named snapshot.
    """

    IpAddress: IPv4Text = ""
    Name: NameText = ""


@dataclass
class ReplaceVmImageRequest:
    """
    ReplaceVmImage: a new root from C{ImageName}, C{ImageURL} or C{ImageDataSize} bytes
    that follow the request. C{SkipBootloader}, C{PreDelete} and C{OverlayFiles} (which
    the reference applies to its file-system images) are refused when set.
    """

    DhcpTimeout: Duration = Duration(0)
    ImageDataSize: Uint64 = 0
    ImageName: Annotated[str, MaxLen(1024)] = field(omitempty=True, default="")
    ImageTimeout: Duration = Duration(0)
    ImageURL: Annotated[str, MaxLen(4096)] = field(omitempty=True, default="")
    IpAddress: IPv4Text = ""
    MinimumFreeBytes: Uint64 = 0
    OverlayFiles: Annotated[dict[Annotated[str, MaxLen(4096)], bytes], MaxLen(1024)] = field(
        default_factory=dict
    )
    PreDelete: bool = False
    RoundupPower: Uint64 = 0
    SkipBackup: bool = False
    SkipBootloader: bool = False
    VolumeFormat: VolumeFormatT = VolumeFormat.RAW


@dataclass
class ReplaceVmImageResponse:
    """
    One message of ReplaceVmImage's progress stream; the last has C{Final} or C{Error}
    (Go's field order, as CreateVmResponse's).
    """

    DhcpTimedOut: bool = False
    Final: bool = False
    ProgressMessage: MessageText = ""
    Error: MessageText = ""


# User data (reference §1.4) -------------------------------------------------------------


@dataclass
class ReplaceVmUserDataRequest:
    """
    ReplaceVmUserData: C{Size} bytes of user data follow the request.
    """

    IpAddress: IPv4Text = ""
    Size: Uint64 = 0


@dataclass
class GetVmUserDataResponse:
    """
    GetVmUserData: C{{Error, Length}}, then C{Length} raw bytes on the connection
    (L{hypervisor.api.with_raw}; after the JSON line over HTTPS too).
    """

    Error: MessageText = ""
    Length: Uint64 = 0


@dataclass
class ReorderVmVolumesRequest:
    """
    ReorderVmVolumes: the new order as a permutation of the volume indices (the root
    stays first when 0 is not listed).
    """

    AccessToken: Annotated[bytes, MaxLen(4096)] = b""
    IpAddress: IPv4Text = ""
    VolumeIndices: Annotated[list[Uint], MaxLen(128)] = field(default_factory=list)


VolumeInterfaceT = VolumeInterface


@dataclass
class ChangeVmVolumeInterfacesRequest:
    """
    ChangeVmVolumeInterfaces: one interface per volume, in volume order (the VM
    stopped).
    """

    Interfaces: Annotated[list[VolumeInterfaceT], MaxLen(128)] = field(default_factory=list)
    IpAddress: IPv4Text = ""


@dataclass
class StorageInfo:
    """
    One volume directory's file system in GetVmVolumeStorageConfiguration (bytes):
    available to users, free (to root), its size, and what a new volume may take
    there (size less the VM volumes already there, and available less 1 GiB on the
    root file system, whichever is smaller).
    """

    AvailableBytes: Uint64 = 0
    FreeBytes: Uint64 = 0
    SizeBytes: Uint64 = 0
    UsableBytes: Uint64 = 0


@dataclass
class GetVmVolumeStorageConfigurationResponse:
    """
    GetVmVolumeStorageConfiguration: every volume directory's figures (by storage
    index) and the storage index of each of the VM's volumes.
    """

    Error: MessageText = ""
    StorageInfos: Annotated[list[StorageInfo], MaxLen(1024)] = field(default_factory=list)
    VolumeStorageIndices: Annotated[list[Uint], MaxLen(128)] = field(default_factory=list)


@dataclass
class ChangeVmVolumeStorageIndexRequest:
    """
    ChangeVmVolumeStorageIndex: move a volume of a stopped VM to the volume directory
    with that storage index.
    """

    IpAddress: IPv4Text = ""
    StorageIndex: Uint = 0
    VolumeIndex: Uint = 0


@dataclass
class ListVolumeDirectoriesResponse:
    """
    ListVolumeDirectories (loopback callers only): the volume directories, by storage
    index.
    """

    Directories: Annotated[list[PathText], MaxLen(1024)] = field(default_factory=list)
    Error: MessageText = ""
