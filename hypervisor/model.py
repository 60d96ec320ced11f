# -*- test-case-name: tests.test_model -*-
"""
The hypervisor's data model with the reference's field names (proto/hypervisor).

Every class here is a dataclass encoded by L{hypervisor.codec}: the same JSON in
C{info.json}, in every transport and in the Go tools. Fields marked C{omitempty} are
those the Go structs tag so. Classes marked I{ours} carry fields the Go daemon does
not have; Go clients ignore them.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Optional

from hypervisor.codec import Duration, TextEnum, field


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

    IpAddress: str = field(omitempty=True, default="")
    MacAddress: str = ""


AddressT = Address


@dataclass
class Subnet:
    """
    A subnet VMs can be placed on.
    """

    Id: str = ""
    IpGateway: str = field(omitempty=True, default="")
    IpMask: str = field(omitempty=True, default="")
    DomainName: str = field(omitempty=True, default="")
    DomainNameServers: list[str] = field(omitempty=True, default_factory=list)
    DisableMetadata: bool = field(omitempty=True, default=False)
    Manage: bool = field(omitempty=True, default=False)
    VlanId: int = field(omitempty=True, default=0)
    AllowedGroups: list[str] = field(omitempty=True, default_factory=list)
    AllowedUsers: list[str] = field(omitempty=True, default_factory=list)
    FirstDynamicIP: str = field(omitempty=True, default="")
    LastDynamicIP: str = field(omitempty=True, default="")
    Tags: dict[str, str] = field(omitempty=True, default_factory=dict)


@dataclass
class Volume:
    """
    One VM volume (index 0 is the root volume).
    """

    Format: VolumeFormat = field(omitempty=True, default=VolumeFormat.RAW)
    Interface: VolumeInterface = field(omitempty=True, default=VolumeInterface.VIRTIO)
    Size: int = field(omitempty=True, default=0)
    Snapshots: dict[str, int] = field(omitempty=True, default_factory=dict)
    Type: VolumeType = field(omitempty=True, default=VolumeType.PERSISTENT)
    VirtualSize: int = field(omitempty=True, default=0)

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

    NumQueues: int = field(omitempty=True, default=0)


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
    CpuPriority: int = field(omitempty=True, default=0)
    DestroyOnPowerdown: bool = field(omitempty=True, default=False)
    DestroyProtection: bool = field(omitempty=True, default=False)
    DisableVirtIO: bool = field(omitempty=True, default=False)
    ExtraKernelOptions: str = field(omitempty=True, default="")
    FirmwareType: FirmwareTypeT = field(omitempty=True, default=FirmwareType.DEFAULT)
    Hostname: str = field(omitempty=True, default="")
    IdentityExpires: Optional[datetime.datetime] = field(omitempty=True, default=None)
    IdentityName: str = field(omitempty=True, default="")
    ImageName: str = field(omitempty=True, default="")
    ImageURL: str = field(omitempty=True, default="")
    MachineType: MachineTypeT = field(omitempty=True, default=MachineType.AUTO)
    MemoryInMiB: int = 0
    MilliCPUs: int = 0
    NetworkEntries: list[NetworkEntry] = field(omitempty=True, default_factory=list)
    OwnerGroups: list[str] = field(omitempty=True, default_factory=list)
    OwnerUsers: list[str] = field(omitempty=True, default_factory=list)
    RootFileSystemLabel: str = field(omitempty=True, default="")
    SpreadVolumes: bool = field(omitempty=True, default=False)
    State: StateT = State.STARTING
    SecondaryAddresses: list[AddressT] = field(omitempty=True, default_factory=list)
    SecondarySubnetIDs: list[str] = field(omitempty=True, default_factory=list)
    SubnetId: str = field(omitempty=True, default="")
    Tags: dict[str, str] = field(omitempty=True, default_factory=dict)
    Uncommitted: bool = field(omitempty=True, default=False)
    VirtualCPUs: int = field(omitempty=True, default=0)
    VirtualiserImageName: str = field(omitempty=True, default="")
    Volumes: list[Volume] = field(omitempty=True, default_factory=list)
    WatchdogAction: WatchdogActionT = field(omitempty=True, default=WatchdogAction.NONE)
    WatchdogModel: WatchdogModelT = field(omitempty=True, default=WatchdogModel.NONE)
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

    DirectoryToCleanup: str = ""
    Filename: str = ""


@dataclass
class LocalVmInfo:
    """
    C{VMs/<IP>/info.json}: VmInfo flattened, plus the volume locations.
    """

    VmInfo: VmInfoT = field(embed=True, default_factory=VmInfo)
    VolumeLocations: list[VolumeLocation] = field(default_factory=list)


# Requests and responses (reference §1.11) ---------------------------------------


@dataclass
class ErrorResponse:
    """
    A response carrying only an error (empty on success).
    """

    Error: str = ""


@dataclass
class IpRequest:
    """
    A request naming one VM by IP (AcknowledgeVm, GetVmInfo, ...).
    """

    IpAddress: str = ""


@dataclass
class AccessRequest:
    """
    A request naming one VM, optionally with an access token (StopVm, DestroyVm).
    """

    AccessToken: bytes = field(omitempty=True, default=b"")
    IpAddress: str = ""


@dataclass
class CreateVmRequest:
    """
    CreateVm: the VM's settings (embedded VmInfo) and where its volumes come from.
    C{KernelURL}, C{InitrdURL} are I{ours} (direct kernel boot from local files).
    """

    VmInfo: VmInfoT = field(embed=True, default_factory=VmInfo)
    DhcpTimeout: Duration = field(omitempty=True, default=Duration(0))
    DoNotStart: bool = field(omitempty=True, default=False)
    EnableNetboot: bool = field(omitempty=True, default=False)
    IdentityCertificate: bytes = field(omitempty=True, default=b"")
    IdentityKey: bytes = field(omitempty=True, default=b"")
    ImageDataSize: int = field(omitempty=True, default=0)
    ImageTimeout: Duration = field(omitempty=True, default=Duration(0))
    MinimumFreeBytes: int = field(omitempty=True, default=0)
    RoundupPower: int = field(omitempty=True, default=0)
    SecondaryVolumes: list[Volume] = field(omitempty=True, default_factory=list)
    SkipBootloader: bool = field(omitempty=True, default=False)
    SkipMemoryCheck: bool = field(omitempty=True, default=False)
    StorageIndices: list[int] = field(omitempty=True, default_factory=list)
    UserDataSize: int = field(omitempty=True, default=0)
    KernelURL: str = field(omitempty=True, default="")
    InitrdURL: str = field(omitempty=True, default="")


@dataclass
class CreateVmResponse:
    """
    One message of CreateVm's progress stream; the last has C{Final} or C{Error}.
    """

    DhcpTimedOut: bool = False
    Final: bool = False
    IpAddress: str = ""
    ProgressMessage: str = ""
    Error: str = ""


@dataclass
class StartVmRequest:
    """
    StartVm.
    """

    AccessToken: bytes = field(omitempty=True, default=b"")
    DhcpTimeout: Duration = field(omitempty=True, default=Duration(0))
    IpAddress: str = ""


@dataclass
class DhcpResponse:
    """
    StartVm / RebootVm response.
    """

    DhcpTimedOut: bool = False
    Error: str = ""


@dataclass
class RebootVmRequest:
    """
    RebootVm.
    """

    DhcpTimeout: Duration = field(omitempty=True, default=Duration(0))
    IpAddress: str = ""


@dataclass
class GetVmInfoResponse:
    """
    GetVmInfo.
    """

    VmInfo: VmInfoT = field(default_factory=VmInfo)
    Error: str = ""


@dataclass
class VmFilter:
    """
    Filters of ListVMs and GetVmInfos.
    """

    IgnoreStateMask: int = field(omitempty=True, default=0)
    OwnerGroups: list[str] = field(omitempty=True, default_factory=list)
    OwnerUsers: list[str] = field(omitempty=True, default_factory=list)
    VmTagsToMatch: dict[str, list[str]] = field(omitempty=True, default_factory=dict)


@dataclass
class ListVMsRequest:
    """
    ListVMs.
    """

    Filter: VmFilter = field(embed=True, default_factory=VmFilter)
    Sort: bool = field(omitempty=True, default=False)


@dataclass
class ListVMsResponse:
    """
    ListVMs.
    """

    IpAddresses: list[str] = field(default_factory=list)
    Error: str = ""


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

    Error: str = ""
    VmInfos: list[VmInfo] = field(default_factory=list)


@dataclass
class GetVmCreateRequestResponse:
    """
    GetVmCreateRequest.
    """

    CreateRequest: CreateVmRequest = field(default_factory=CreateVmRequest)
    Error: str = ""


@dataclass
class ChangeVmSizeRequest:
    """
    ChangeVmSize.
    """

    IpAddress: str = ""
    MemoryInMiB: int = field(omitempty=True, default=0)
    MilliCPUs: int = field(omitempty=True, default=0)
    VirtualCPUs: int = field(omitempty=True, default=0)


@dataclass
class ChangeVmTagsRequest:
    """
    ChangeVmTags.
    """

    IpAddress: str = ""
    Tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ChangeVmOwnerUsersRequest:
    """
    ChangeVmOwnerUsers.
    """

    IpAddress: str = ""
    OwnerUsers: list[str] = field(default_factory=list)


@dataclass
class ChangeVmOwnerGroupsRequest:
    """
    ChangeVmOwnerGroups.
    """

    IpAddress: str = ""
    OwnerGroups: list[str] = field(default_factory=list)


@dataclass
class ChangeVmDestroyProtectionRequest:
    """
    ChangeVmDestroyProtection.
    """

    DestroyProtection: bool = False
    IpAddress: str = ""


@dataclass
class ChangeVmHostnameRequest:
    """
    ChangeVmHostname.
    """

    Hostname: str = ""
    IpAddress: str = ""


@dataclass
class GetCapacityResponse:
    """
    GetCapacity.
    """

    Error: str = ""
    AvailableMemoryInMiB: int = 0
    MemoryInMiB: int = 0
    NumCPUs: int = 0
    TotalVolumeBytes: int = 0


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

    AddressesToAdd: list[Address] = field(omitempty=True, default_factory=list)
    AddressesToRemove: list[Address] = field(omitempty=True, default_factory=list)
    MaximumFreeAddresses: dict[str, int] = field(omitempty=True, default_factory=dict)


@dataclass
class UpdateSubnetsRequest:
    """
    UpdateSubnets.
    """

    Add: list[Subnet] = field(omitempty=True, default_factory=list)
    Change: list[Subnet] = field(omitempty=True, default_factory=list)
    Delete: list[str] = field(omitempty=True, default_factory=list)


@dataclass
class ChangeOwnersRequest:
    """
    ChangeOwners: the hypervisor's owners (they get every method).
    """

    OwnerGroups: list[str] = field(omitempty=True, default_factory=list)
    OwnerUsers: list[str] = field(omitempty=True, default_factory=list)


@dataclass
class ListSubnetsRequest:
    """
    ListSubnets.
    """

    Sort: bool = field(omitempty=True, default=False)


@dataclass
class ListSubnetsResponse:
    """
    ListSubnets.
    """

    Error: str = ""
    Subnets: list[Subnet] = field(default_factory=list)


@dataclass
class AddressPool:
    """
    C{address-pool.json}: free addresses and all registered ones.
    """

    Free: list[Address] = field(default_factory=list)
    Registered: list[Address] = field(default_factory=list)


@dataclass
class Update:
    """
    One message of GetUpdates: the first is full, later ones carry what changed.
    A deleted VM is sent as a zero VmInfo.
    """

    HaveAddressPool: bool = field(omitempty=True, default=False)
    AddressPool: list[Address] = field(omitempty=True, default_factory=list)
    HaveDisabled: bool = field(omitempty=True, default=False)
    Disabled: bool = field(omitempty=True, default=False)
    MemoryInMiB: Optional[int] = field(omitempty=True, default=None)
    AvailableMemoryInMiB: Optional[int] = field(omitempty=True, default=None)
    NumCPUs: Optional[int] = field(omitempty=True, default=None)
    NumFreeAddresses: dict[str, int] = field(omitempty=True, default_factory=dict)
    HealthStatus: str = field(omitempty=True, default="")
    HaveSubnets: bool = field(omitempty=True, default=False)
    Subnets: list[Subnet] = field(omitempty=True, default_factory=list)
    TotalVolumeBytes: Optional[int] = field(omitempty=True, default=None)
    HaveVMs: bool = field(omitempty=True, default=False)
    VMs: dict[str, VmInfo] = field(omitempty=True, default_factory=dict)
