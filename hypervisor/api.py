# -*- test-case-name: tests.test_manager_vms -*-
"""
The service layer: one method per C{Hypervisor.<Method>} of the reference, each
taking the caller's L{Identity} and a request object and returning a response object
(L{hypervisor.model}). Every transport (JSON over HTTPS, SRPC, Perspective Broker)
calls these and only translates.

Errors are raised as L{hypervisor.errors.HypervisorError}s; a transport puts the
message in the response's C{Error} field and picks its status from the class.

L{ACCESS} gives each method its access class (reference §1): C{public} (any
authenticated caller; VM methods then check ownership), C{admin} (method power or
hypervisor ownership) and, among public ones, the reads allowed without a certificate
when C{-allowUnauthenticatedReads} is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.console.model import (
    ChangeVmConsoleTypeRequest,
    ConnectToVmConsoleRequest,
    ConnectToVmSerialPortRequest,
)
from hypervisor.errors import AccessDenied, InvalidRequest, Unavailable
from hypervisor.manager.create import upload_size
from hypervisor.manager.manager import Manager
from hypervisor.manager.updates import UpdateStream
from hypervisor.manager.userdata import MAX_USER_DATA
from hypervisor.migration.local import (
    LOOPBACK_ONLY,
    CommitImportedVmRequest,
    ExportLocalVmRequest,
    ExportLocalVmResponse,
    ImportLocalVmRequest,
    LocalMoves,
)
from hypervisor.migration.messages import (
    CopyVmRequest,
    CopyVmResponse,
    DiscardVmAccessTokenRequest,
    GetRootCookiePathResponse,
    GetVmAccessTokenRequest,
    GetVmAccessTokenResponse,
    MigrateVmRequest,
    MigrateVmResponse,
    MigrateVmResponseResponse,
    PrepareVmForMigrationRequest,
    ReadVmVolumeRequest,
)
from hypervisor.migration.service import Migrations
from hypervisor.model import (
    AccessRequest,
    AddVmVolumesRequest,
    ChangeAddressPoolRequest,
    ChangeOwnersRequest,
    ChangeVmDestroyProtectionRequest,
    ChangeVmHostnameRequest,
    ChangeVmOwnerGroupsRequest,
    ChangeVmOwnerUsersRequest,
    ChangeVmSizeRequest,
    ChangeVmTagsRequest,
    ChangeVmVolumeInterfacesRequest,
    ChangeVmVolumeSizeRequest,
    ChangeVmVolumeStorageIndexRequest,
    CreateVmRequest,
    CreateVmResponse,
    DeleteVmVolumeRequest,
    DhcpResponse,
    DiscardVmSnapshotRequest,
    ErrorResponse,
    GetCapacityResponse,
    GetVmCreateRequestResponse,
    GetVmInfoResponse,
    GetVmInfosRequest,
    GetVmInfosResponse,
    GetVmUserDataResponse,
    IpRequest,
    ListSubnetsRequest,
    ListSubnetsResponse,
    ListVMsRequest,
    ListVMsResponse,
    ListVolumeDirectoriesResponse,
    NetbootMachineRequest,
    RebootVmRequest,
    RegisterExternalLeasesRequest,
    ReorderVmVolumesRequest,
    ReplaceVmImageRequest,
    ReplaceVmImageResponse,
    ReplaceVmUserDataRequest,
    RestoreVmFromSnapshotRequest,
    SetDisabledStateRequest,
    SnapshotVmRequest,
    StartVmRequest,
    UpdateSubnetsRequest,
    WatchDhcpRequest,
)
from hypervisor.upload import UploadStream

WIRE = "_wire"


def with_encoding(response: T, data: bytes) -> T:
    """
    Attach C{response}'s encoding (already made, e.g. kept with a VM): transports send
    it instead of encoding the response again.
    """
    object.__setattr__(response, WIRE, data)
    return response


RAW_BYTES = "_raw"
"""The attribute L{with_raw} sets (not to be confused with L{RAW}, a method kind)."""


def with_raw(response: T, data: bytes) -> T:
    """
    Attach raw bytes that follow C{response}'s JSON on the wire (the reference's
    GetVmUserData, GetVmLastPatchLog: a C{Length} field, then that many bytes). SRPC
    sends the JSON as a bare message in its own TLS record and the bytes in later
    ones (Go's client reads ahead up to 512 bytes past the JSON and loses them
    otherwise: srpc-transcripts README, quirk 1).
    """
    object.__setattr__(response, RAW_BYTES, data)
    return response


def raw_of(response: Any) -> Optional[bytes]:
    """
    The raw bytes attached by L{with_raw}, or None.
    """
    return getattr(response, RAW_BYTES, None)


def encode_reply(response: Any) -> bytes:
    """
    A response's JSON: the encoding attached by L{with_encoding}, else the codec's.
    """
    data = getattr(response, WIRE, None)
    return data if data is not None else codec.encode(response)


PUBLIC = "public"
ADMIN = "admin"

RR = "request-reply"
PROGRESS = "progress-stream"
UPDATES = "update-stream"
RAW = "raw-stream"
"""A response, then raw bytes both ways (the consoles): the handler returns a
L{hypervisor.console.pipe.VmPipe} the transport joins to its client."""


T = TypeVar("T")
MiB = 1024 * 1024
MAX_JSON = 1 << 20
MAX_UPLOAD = 1 << 40


@dataclass(frozen=True)
class MethodSpec:
    """
    How a method is called: its request type, access class, reply kind and, for
    methods whose request is followed by raw bytes, how many (C{upload(request)})
    and at most how many.
    """

    request: type
    access: str
    kind: str = RR
    upload: Optional[Callable[[Any], int]] = None
    max_request: int = MAX_JSON
    max_upload: int = 0
    answer: Optional[type] = None  # a message the client sends mid-stream (MigrateVm)


@dataclass
class Empty:
    """
    A request with no fields (GetCapacity, GetUpdates).
    """


METHODS: dict[str, MethodSpec] = {
    "AcknowledgeVm": MethodSpec(IpRequest, PUBLIC),
    "BecomePrimaryVmOwner": MethodSpec(IpRequest, PUBLIC),
    "ChangeAddressPool": MethodSpec(ChangeAddressPoolRequest, ADMIN),
    "ChangeOwners": MethodSpec(ChangeOwnersRequest, ADMIN),
    "ChangeVmDestroyProtection": MethodSpec(ChangeVmDestroyProtectionRequest, PUBLIC),
    "ChangeVmHostname": MethodSpec(ChangeVmHostnameRequest, PUBLIC),
    "ChangeVmOwnerGroups": MethodSpec(ChangeVmOwnerGroupsRequest, PUBLIC),
    "ChangeVmOwnerUsers": MethodSpec(ChangeVmOwnerUsersRequest, PUBLIC),
    "ChangeVmSize": MethodSpec(ChangeVmSizeRequest, PUBLIC),
    "ChangeVmTags": MethodSpec(ChangeVmTagsRequest, PUBLIC),
    "CreateVm": MethodSpec(
        CreateVmRequest, PUBLIC, PROGRESS, upload=upload_size, max_upload=MAX_UPLOAD
    ),
    "DestroyVm": MethodSpec(AccessRequest, PUBLIC),
    "GetCapacity": MethodSpec(Empty, PUBLIC),
    "GetUpdates": MethodSpec(Empty, PUBLIC, UPDATES),
    "GetVmCreateRequest": MethodSpec(IpRequest, PUBLIC),
    "GetVmInfo": MethodSpec(IpRequest, PUBLIC),
    "GetVmInfos": MethodSpec(GetVmInfosRequest, PUBLIC),
    "ListSubnets": MethodSpec(ListSubnetsRequest, PUBLIC),
    "ListVMs": MethodSpec(ListVMsRequest, PUBLIC),
    "NetbootMachine": MethodSpec(NetbootMachineRequest, ADMIN, max_request=4 * MiB),
    "RebootVm": MethodSpec(RebootVmRequest, PUBLIC),
    "RegisterExternalLeases": MethodSpec(RegisterExternalLeasesRequest, ADMIN),
    "SetDisabledState": MethodSpec(SetDisabledStateRequest, ADMIN),
    "StartVm": MethodSpec(StartVmRequest, PUBLIC),
    "StopVm": MethodSpec(AccessRequest, PUBLIC),
    "UpdateSubnets": MethodSpec(UpdateSubnetsRequest, ADMIN),
    "WatchDhcp": MethodSpec(WatchDhcpRequest, ADMIN, UPDATES),
    "TraceVmMetadata": MethodSpec(IpRequest, PUBLIC, UPDATES),
    # Volumes, snapshots and root images (hypervisor.manager.volumeops):
    "AddVmVolumes": MethodSpec(AddVmVolumesRequest, PUBLIC),
    "ChangeVmVolumeSize": MethodSpec(ChangeVmVolumeSizeRequest, PUBLIC),
    "DeleteVmVolume": MethodSpec(DeleteVmVolumeRequest, PUBLIC),
    "DiscardVmOldImage": MethodSpec(IpRequest, PUBLIC),
    "DiscardVmSnapshot": MethodSpec(DiscardVmSnapshotRequest, PUBLIC),
    "ReplaceVmImage": MethodSpec(
        ReplaceVmImageRequest,
        PUBLIC,
        PROGRESS,
        upload=lambda r: max(r.ImageDataSize, 0),
        max_upload=MAX_UPLOAD,
    ),
    "RestoreVmFromSnapshot": MethodSpec(RestoreVmFromSnapshotRequest, PUBLIC),
    "RestoreVmImage": MethodSpec(IpRequest, PUBLIC),
    "ReorderVmVolumes": MethodSpec(ReorderVmVolumesRequest, PUBLIC),
    "ChangeVmVolumeInterfaces": MethodSpec(ChangeVmVolumeInterfacesRequest, PUBLIC),
    "SnapshotVm": MethodSpec(SnapshotVmRequest, PUBLIC),
    # Volume directories (hypervisor.manager.storage):
    "ChangeVmVolumeStorageIndex": MethodSpec(ChangeVmVolumeStorageIndexRequest, PUBLIC),
    "GetVmVolumeStorageConfiguration": MethodSpec(IpRequest, PUBLIC),
    "ListVolumeDirectories": MethodSpec(Empty, PUBLIC),
    # User data (hypervisor.manager.userdata):
    "DiscardVmOldUserData": MethodSpec(IpRequest, PUBLIC),
    "GetVmUserData": MethodSpec(AccessRequest, PUBLIC),
    "ReplaceVmUserData": MethodSpec(
        ReplaceVmUserDataRequest,
        PUBLIC,
        upload=lambda r: max(r.Size, 0),
        max_upload=MAX_USER_DATA,
    ),
    "RestoreVmUserData": MethodSpec(IpRequest, PUBLIC),
    # Access tokens, migration and copies (hypervisor.migration):
    "GetVmAccessToken": MethodSpec(GetVmAccessTokenRequest, PUBLIC),
    "DiscardVmAccessToken": MethodSpec(DiscardVmAccessTokenRequest, PUBLIC),
    "PrepareVmForMigration": MethodSpec(PrepareVmForMigrationRequest, ADMIN),
    "ReadVmVolume": MethodSpec(ReadVmVolumeRequest, PUBLIC),
    "MigrateVm": MethodSpec(MigrateVmRequest, PUBLIC, PROGRESS, answer=MigrateVmResponseResponse),
    "CopyVm": MethodSpec(CopyVmRequest, PUBLIC, PROGRESS),
    "GetRootCookiePath": MethodSpec(Empty, PUBLIC),
    # Local export and import (hypervisor.migration.local): loopback + root cookie.
    "ExportLocalVm": MethodSpec(ExportLocalVmRequest, PUBLIC),
    "ImportLocalVm": MethodSpec(ImportLocalVmRequest, PUBLIC),
    "CommitImportedVm": MethodSpec(CommitImportedVmRequest, PUBLIC),
    # Consoles (hypervisor.console):
    "ChangeVmConsoleType": MethodSpec(ChangeVmConsoleTypeRequest, PUBLIC),
    "ConnectToVmConsole": MethodSpec(ConnectToVmConsoleRequest, PUBLIC, RAW, max_request=4096),
    "ConnectToVmManager": MethodSpec(ConnectToVmConsoleRequest, ADMIN, RAW, max_request=4096),
    "ConnectToVmSerialPort": MethodSpec(
        ConnectToVmSerialPortRequest, PUBLIC, RAW, max_request=4096
    ),
}

ACCESS: dict[str, str] = {name: spec.access for name, spec in METHODS.items()}

UNAUTHENTICATED_READS = frozenset(
    {"GetCapacity", "GetVmInfo", "GetVmInfos", "GetVmLastPatchLog", "ListSubnets", "ListVMs"}
)


class HypervisorApi:
    """
    The RPC methods, over one L{Manager} (and the DHCP service, when one runs).
    """

    def __init__(
        self, manager: Manager, dhcp: Optional[Any] = None, metadata: Optional[Any] = None
    ) -> None:
        self.manager = manager
        self.dhcp = dhcp
        self.metadata = metadata
        self.migrations = Migrations(manager, manager.reactor)
        self.local_moves = LocalMoves(manager)

    # What the dispatcher asks before a request is read ----------------------------------

    def hypervisor_owners(self) -> tuple[frozenset[str], frozenset[str]]:
        """
        The hypervisor's owner users and groups (ChangeOwners): they hold every power.
        """
        return self.manager.owner_users, self.manager.owner_groups

    def admit(self, method: str, identity: Identity) -> None:
        """
        Method-specific refusals that need no request: checked before the request
        (and any upload) is read, so nothing is received for a call that cannot run.
        """
        if method == "CreateVm":
            if not identity.username:
                raise AccessDenied("no authentication data")
            self.manager.ctx.require_enabled()
        if method in LOOPBACK_ONLY and not identity.loopback:
            raise AccessDenied(f"{method}: local connection required")

    @staticmethod
    def _require_admin(identity: Identity, method: str) -> None:
        if not identity.has_method_power(method):
            raise AccessDenied(f"access to method Hypervisor.{method} denied")

    # VM lifecycle ----------------------------------------------------------------

    @inlineCallbacks
    def CreateVm(
        self,
        identity: Identity,
        request: CreateVmRequest,
        send: Callable[[CreateVmResponse], None] = lambda r: None,
        upload: Optional[UploadStream] = None,
    ) -> Any:
        """
        Create a VM; progress messages go to C{send}; return the final response.

        @param upload: the raw image and user data sent after the request
            (ImageDataSize + UserDataSize bytes), as a stream.
        """

        def progress(message: str) -> None:
            send(CreateVmResponse(ProgressMessage=message))

        response = yield self.manager.creator.create_vm(identity, request, progress, upload)
        return response

    @inlineCallbacks
    def AcknowledgeVm(self, identity: Identity, request: IpRequest) -> Any:
        """
        Keep a newly created VM.
        """
        yield self.manager.lifecycle.acknowledge_vm(identity, request.IpAddress)
        return ErrorResponse()

    @inlineCallbacks
    def StartVm(self, identity: Identity, request: StartVmRequest) -> Any:
        """
        Start a stopped VM.
        """
        identity = self.migrations.with_token(identity, request.IpAddress, request.AccessToken)
        timed_out = yield self.manager.lifecycle.start_vm(
            identity, request.IpAddress, float(request.DhcpTimeout)
        )
        return DhcpResponse(DhcpTimedOut=timed_out)

    @inlineCallbacks
    def StopVm(self, identity: Identity, request: AccessRequest) -> Any:
        """
        Stop a running VM (ACPI, forced after a timeout).
        """
        identity = self.migrations.with_token(identity, request.IpAddress, request.AccessToken)
        yield self.manager.lifecycle.stop_vm(identity, request.IpAddress)
        return ErrorResponse()

    @inlineCallbacks
    def RebootVm(self, identity: Identity, request: RebootVmRequest) -> Any:
        """
        Reboot a running VM.
        """
        timed_out = yield self.manager.lifecycle.reboot_vm(
            identity, request.IpAddress, float(request.DhcpTimeout)
        )
        return DhcpResponse(DhcpTimedOut=timed_out)

    @inlineCallbacks
    def DestroyVm(self, identity: Identity, request: AccessRequest) -> Any:
        """
        Destroy a VM and its volumes.
        """
        identity = self.migrations.with_token(identity, request.IpAddress, request.AccessToken)
        yield self.manager.lifecycle.destroy_vm(identity, request.IpAddress)
        return ErrorResponse()

    # Reads ------------------------------------------------------------------------

    def GetVmInfo(self, identity: Identity, request: IpRequest) -> GetVmInfoResponse:
        """
        One VM's info (its encoding is kept with the VM until it changes, and
        transports send that: L{encode_reply}).
        """
        vm = self.manager.get_vm(request.IpAddress)
        response = GetVmInfoResponse(VmInfo=vm.info)
        if vm.wire is None:
            vm.wire = codec.encode(response)
        return with_encoding(response, vm.wire)

    def GetVmInfos(self, identity: Identity, request: GetVmInfosRequest) -> GetVmInfosResponse:
        """
        Infos of the VMs matching the filters.
        """
        return GetVmInfosResponse(VmInfos=self.manager.get_vm_infos(request.Filter))

    def ListVMs(self, identity: Identity, request: ListVMsRequest) -> ListVMsResponse:
        """
        IPs of the VMs matching the filters.
        """
        return ListVMsResponse(IpAddresses=self.manager.list_vms(request.Filter, sort=request.Sort))

    @inlineCallbacks
    def GetVmCreateRequest(self, identity: Identity, request: IpRequest) -> Any:
        """
        The request a VM was created with.
        """
        stored = yield self.manager.changes.get_vm_create_request(identity, request.IpAddress)
        return GetVmCreateRequestResponse(CreateRequest=stored)

    def GetCapacity(self, identity: Identity, request: object) -> GetCapacityResponse:
        """
        Host capacity.
        """
        return self.manager.admin.get_capacity()

    def ListSubnets(self, identity: Identity, request: ListSubnetsRequest) -> ListSubnetsResponse:
        """
        The subnets.
        """
        return ListSubnetsResponse(Subnets=self.manager.subnets.list(sort=request.Sort))

    def GetUpdates(self, identity: Identity, request: object) -> UpdateStream:
        """
        A stream of updates: the first full, then what changes.
        """
        return self.manager.admin.subscribe_updates(identity.username or "anonymous")

    # Changes ----------------------------------------------------------------------

    def _done(self, d: "Deferred[None]") -> "Deferred[ErrorResponse]":
        return d.addCallback(lambda _: ErrorResponse())

    # Volumes, snapshots and root images --------------------------------------------

    def AddVmVolumes(
        self, identity: Identity, request: AddVmVolumesRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Add raw secondary volumes to a stopped VM.
        """
        return self._done(
            self.manager.volumes.add_vm_volumes(
                identity, request.IpAddress, list(request.VolumeSizes)
            )
        )

    def DeleteVmVolume(
        self, identity: Identity, request: DeleteVmVolumeRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Delete a secondary volume of a stopped VM.
        """
        identity = self.migrations.with_token(identity, request.IpAddress, request.AccessToken)
        return self._done(
            self.manager.volumes.delete_vm_volume(identity, request.IpAddress, request.VolumeIndex)
        )

    def ChangeVmVolumeSize(
        self, identity: Identity, request: ChangeVmVolumeSizeRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Grow (or, with nothing beyond the new size, shrink) a raw volume.
        """
        return self._done(
            self.manager.volumes.change_vm_volume_size(
                identity, request.IpAddress, request.VolumeIndex, request.VolumeSize
            )
        )

    def SnapshotVm(
        self, identity: Identity, request: SnapshotVmRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Snapshot a VM's volumes.
        """
        return self._done(
            self.manager.volumes.snapshot_vm(
                identity,
                request.IpAddress,
                request.Name,
                request.ForceIfNotStopped,
                request.RootOnly,
            )
        )

    def RestoreVmFromSnapshot(
        self, identity: Identity, request: RestoreVmFromSnapshotRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Restore a VM's volumes from a snapshot.
        """
        return self._done(
            self.manager.volumes.restore_vm_from_snapshot(
                identity,
                request.IpAddress,
                request.Name,
                request.ForceIfNotStopped,
                request.Retain,
            )
        )

    def DiscardVmSnapshot(
        self, identity: Identity, request: DiscardVmSnapshotRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Remove a snapshot.
        """
        return self._done(
            self.manager.volumes.discard_vm_snapshot(identity, request.IpAddress, request.Name)
        )

    @inlineCallbacks
    def ReplaceVmImage(
        self,
        identity: Identity,
        request: ReplaceVmImageRequest,
        send: Callable[[ReplaceVmImageResponse], None] = lambda r: None,
        upload: Optional[UploadStream] = None,
    ) -> Any:
        """
        Replace a VM's root image; progress messages go to C{send}.
        """

        def progress(message: str) -> None:
            send(ReplaceVmImageResponse(ProgressMessage=message))

        try:
            timed_out = yield self.manager.volumes.replace_vm_image(
                identity, request, progress, upload
            )
        except BaseException:
            if upload is not None:
                upload.discard()
            raise
        return ReplaceVmImageResponse(DhcpTimedOut=timed_out, Final=True)

    def ChangeVmVolumeInterfaces(
        self, identity: Identity, request: ChangeVmVolumeInterfacesRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Change how a stopped VM's volumes are attached.
        """
        return self._done(
            self.manager.volumes.change_vm_volume_interfaces(
                identity, request.IpAddress, list(request.Interfaces)
            )
        )

    def ChangeVmVolumeStorageIndex(
        self, identity: Identity, request: ChangeVmVolumeStorageIndexRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Move a volume of a stopped VM to another volume directory (crash-safe copy).
        """
        return self._done(
            self.manager.storage.change_storage_index(
                identity, request.IpAddress, request.StorageIndex, request.VolumeIndex
            )
        )

    def GetVmVolumeStorageConfiguration(self, identity: Identity, request: IpRequest) -> Any:
        """
        The volume directories' figures and the storage index of each of a VM's
        volumes (any authenticated caller, as in the reference).
        """
        return self.manager.storage.get_configuration(request.IpAddress)

    def ListVolumeDirectories(
        self, identity: Identity, request: Empty
    ) -> ListVolumeDirectoriesResponse:
        """
        The volume directories (callers on a loopback address only).
        """
        return ListVolumeDirectoriesResponse(
            Directories=self.manager.storage.list_directories(identity)
        )

    def ReorderVmVolumes(
        self, identity: Identity, request: ReorderVmVolumesRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Put a stopped VM's volumes in a new order.
        """
        identity = self.migrations.with_token(identity, request.IpAddress, request.AccessToken)
        return self._done(
            self.manager.volumes.reorder_vm_volumes(
                identity, request.IpAddress, list(request.VolumeIndices)
            )
        )

    def ReplaceVmUserData(
        self,
        identity: Identity,
        request: ReplaceVmUserDataRequest,
        upload: Optional[UploadStream] = None,
    ) -> "Deferred[ErrorResponse]":
        """
        Replace a VM's user data with the C{Size} bytes that follow the request.
        """
        return self._done(
            self.manager.user_data.replace(identity, request.IpAddress, request.Size, upload)
        )

    @inlineCallbacks
    def GetVmUserData(self, identity: Identity, request: AccessRequest) -> Any:
        """
        A VM's user data.
        """
        identity = self.migrations.with_token(identity, request.IpAddress, request.AccessToken)
        data = yield self.manager.user_data.get(identity, request.IpAddress)
        return with_raw(GetVmUserDataResponse(Length=len(data)), data)

    def RestoreVmUserData(
        self, identity: Identity, request: IpRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Put C{user-data.raw.old} back.
        """
        return self._done(self.manager.user_data.restore(identity, request.IpAddress))

    def DiscardVmOldUserData(
        self, identity: Identity, request: IpRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Remove C{user-data.raw.old}.
        """
        return self._done(self.manager.user_data.discard_old(identity, request.IpAddress))

    def RestoreVmImage(self, identity: Identity, request: IpRequest) -> "Deferred[ErrorResponse]":
        """
        Put C{root.old} back.
        """
        return self._done(self.manager.volumes.restore_vm_image(identity, request.IpAddress))

    def DiscardVmOldImage(
        self, identity: Identity, request: IpRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Remove C{root.old}.
        """
        return self._done(self.manager.volumes.discard_vm_old_image(identity, request.IpAddress))

    def ChangeVmSize(
        self, identity: Identity, request: ChangeVmSizeRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Change memory, milliCPUs or vCPUs.
        """
        return self._done(
            self.manager.changes.change_vm_size(
                identity,
                request.IpAddress,
                request.MemoryInMiB,
                request.MilliCPUs,
                request.VirtualCPUs,
            )
        )

    def ChangeVmTags(
        self, identity: Identity, request: ChangeVmTagsRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Replace a VM's tags.
        """
        return self._done(
            self.manager.changes.change_vm_tags(identity, request.IpAddress, request.Tags)
        )

    def ChangeVmOwnerUsers(
        self, identity: Identity, request: ChangeVmOwnerUsersRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Replace a VM's extra owners.
        """
        return self._done(
            self.manager.changes.change_vm_owner_users(
                identity, request.IpAddress, request.OwnerUsers
            )
        )

    def ChangeVmOwnerGroups(
        self, identity: Identity, request: ChangeVmOwnerGroupsRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Replace a VM's owner groups.
        """
        return self._done(
            self.manager.changes.change_vm_owner_groups(
                identity, request.IpAddress, request.OwnerGroups
            )
        )

    def BecomePrimaryVmOwner(
        self, identity: Identity, request: IpRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Become a VM's primary owner.
        """
        return self._done(self.manager.changes.become_primary_vm_owner(identity, request.IpAddress))

    def ChangeVmDestroyProtection(
        self, identity: Identity, request: ChangeVmDestroyProtectionRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Set or clear destroy protection.
        """
        return self._done(
            self.manager.changes.change_vm_destroy_protection(
                identity, request.IpAddress, request.DestroyProtection
            )
        )

    def ChangeVmHostname(
        self, identity: Identity, request: ChangeVmHostnameRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Change a VM's hostname.
        """
        return self._done(
            self.manager.changes.change_vm_hostname(identity, request.IpAddress, request.Hostname)
        )

    # Host administration ------------------------------------------------------------

    def SetDisabledState(
        self, identity: Identity, request: SetDisabledStateRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Disable or enable the hypervisor (admin).
        """
        self._require_admin(identity, "SetDisabledState")
        return self._done(self.manager.admin.set_disabled_state(request.Disable))

    def ChangeAddressPool(
        self, identity: Identity, request: ChangeAddressPoolRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Add, remove or trim addresses (admin).
        """
        self._require_admin(identity, "ChangeAddressPool")
        return self._done(
            self.manager.admin.change_address_pool(
                request.AddressesToAdd, request.AddressesToRemove, request.MaximumFreeAddresses
            )
        )

    def ChangeOwners(self, identity: Identity, request: ChangeOwnersRequest) -> ErrorResponse:
        """
        Set the hypervisor's owners (admin; in memory, as the Go hypervisor).
        """
        self._require_admin(identity, "ChangeOwners")
        self.manager.admin.change_owners(request.OwnerUsers, request.OwnerGroups)
        return ErrorResponse()

    def UpdateSubnets(
        self, identity: Identity, request: UpdateSubnetsRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Add, change or delete subnets (admin).
        """
        self._require_admin(identity, "UpdateSubnets")
        return self._done(
            self.manager.admin.update_subnets(request.Add, request.Change, request.Delete)
        )

    # DHCP (admin) -------------------------------------------------------------------

    def _dhcp(self) -> Any:
        if self.dhcp is None:
            raise Unavailable("this hypervisor runs no DHCP server")
        return self.dhcp

    def RegisterExternalLeases(
        self, identity: Identity, request: RegisterExternalLeasesRequest
    ) -> ErrorResponse:
        """
        Replace the DHCP leases of machines that are not VMs (admin; in memory).
        """
        self._require_admin(identity, "RegisterExternalLeases")
        self._dhcp().register_external_leases(request.Addresses, request.Hostnames)
        return ErrorResponse()

    def NetbootMachine(
        self, identity: Identity, request: NetbootMachineRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Serve a temporary netboot lease until the machine took it (admin).
        """
        self._require_admin(identity, "NetbootMachine")
        return self._done(self._dhcp().netboot_machine(request))

    def WatchDhcp(self, identity: Identity, request: WatchDhcpRequest) -> Any:
        """
        A stream of the DHCP packets received (admin).
        """
        self._require_admin(identity, "WatchDhcp")
        return self._dhcp().watch(request.Interface, request.MaxPackets)

    def TraceVmMetadata(self, identity: Identity, request: IpRequest) -> Any:
        """
        A stream of the metadata paths the VM requests (its owners; see
        L{hypervisor.metadata.trace}).
        """
        vm = self.manager.table.get(request.IpAddress)
        self.manager.ctx.check_owner(vm, identity, "TraceVmMetadata")
        if self.metadata is None:
            raise Unavailable("this hypervisor runs no metadata server (-metadataServer)")
        from hypervisor.metadata.trace import subscribe

        return subscribe(self.metadata, vm.ip)

    # Consoles (hypervisor.console.service) -------------------------------------------

    @property
    def consoles(self) -> Any:
        """
        The console methods (made on first use).
        """
        consoles = self.__dict__.get("_consoles")
        if consoles is None:
            from hypervisor.console.service import Consoles

            consoles = self.__dict__["_consoles"] = Consoles(self.manager)
        return consoles

    def ConnectToVmSerialPort(
        self, identity: Identity, request: ConnectToVmSerialPortRequest
    ) -> Any:
        """
        A pipe to the VM's serial port (owners; one connection at a time).
        """
        return self.consoles.connect_serial(identity, request.IpAddress, request.PortNumber)

    def ConnectToVmConsole(self, identity: Identity, request: ConnectToVmConsoleRequest) -> Any:
        """
        A pipe to the VM's VNC server (owners; ConsoleType vnc).
        """
        return self.consoles.connect_vnc(identity, request.IpAddress)

    def ConnectToVmManager(self, identity: Identity, request: ConnectToVmConsoleRequest) -> Any:
        """
        Not supported (admin): see L{hypervisor.console.service}.
        """
        self._require_admin(identity, "ConnectToVmManager")
        return self.consoles.connect_manager(identity, request.IpAddress)

    def ChangeVmConsoleType(
        self, identity: Identity, request: ChangeVmConsoleTypeRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Change a stopped VM's console type.
        """
        return self._done(
            self.consoles.change_console_type(identity, request.IpAddress, request.ConsoleType)
        )

    # Access tokens, migration and copies (hypervisor.migration) ---------------------------

    def GetVmAccessToken(
        self, identity: Identity, request: GetVmAccessTokenRequest
    ) -> GetVmAccessTokenResponse:
        """
        A short-lived token that lets its holder act as an owner of one VM.
        """
        token = self.migrations.get_token(identity, request.IpAddress, float(request.Lifetime))
        return GetVmAccessTokenResponse(Token=token)

    def GetRootCookiePath(self, identity: Identity, request: object) -> GetRootCookiePathResponse:
        """
        The root cookie's path (reading it proves root on this host).
        """
        return GetRootCookiePathResponse(Path=self.manager.state.root_cookie_path)

    def ExportLocalVm(
        self, identity: Identity, request: ExportLocalVmRequest
    ) -> "Deferred[ExportLocalVmResponse]":
        """
        A stopped VM -> exporting; its LocalVmInfo and bridges (loopback, root cookie).
        """
        return self.local_moves.export(identity, request)

    def ImportLocalVm(
        self, identity: Identity, request: ImportLocalVmRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Link local volume files in as a new uncommitted VM and start it (loopback, root
        cookie).
        """
        return self._done(self.local_moves.import_vm(identity, request))

    def CommitImportedVm(
        self, identity: Identity, request: CommitImportedVmRequest
    ) -> "Deferred[ErrorResponse]":
        """
        Commit an imported VM: its addresses are registered here.
        """
        return self._done(self.local_moves.commit(identity, request))

    def DiscardVmAccessToken(
        self, identity: Identity, request: DiscardVmAccessTokenRequest
    ) -> ErrorResponse:
        """
        Scrub the VM's access token.
        """
        self.migrations.discard_token(identity, request.IpAddress, request.AccessToken)
        return ErrorResponse()

    def PrepareVmForMigration(
        self, identity: Identity, request: PrepareVmForMigrationRequest
    ) -> "Deferred[ErrorResponse]":
        """
        stopped -> migrating (Enable) or back, on the source.
        """
        return self._done(self.migrations.prepare(identity, request))

    @inlineCallbacks
    def ReadVmVolume(self, identity: Identity, request: ReadVmVolumeRequest) -> Any:
        """
        Ours: one range of a volume with its chunks' checksums, then the bytes.
        """
        response, data = yield self.migrations.read_volume(identity, request)
        return with_raw(response, data)

    def MigrateVm(
        self,
        identity: Identity,
        request: MigrateVmRequest,
        send: Callable[[MigrateVmResponse], None] = lambda r: None,
        upload: Optional[UploadStream] = None,
        receive: Optional[Callable[[], Any]] = None,
    ) -> Any:
        """
        Pull a VM from C{SourceHypervisor} here, keeping its address; C{receive}
        fires with the client's L{MigrateVmResponseResponse}.
        """
        if receive is None:
            raise InvalidRequest(
                "MigrateVm asks the client to commit mid-stream: call it over SRPC "
                "(vm-control -transport=srpc, the default)"
            )
        return self.migrations.migrate(identity, request, send, receive)

    def CopyVm(
        self,
        identity: Identity,
        request: CopyVmRequest,
        send: Callable[[CopyVmResponse], None] = lambda r: None,
        upload: Optional[UploadStream] = None,
    ) -> Any:
        """
        Copy a VM from C{SourceHypervisor} here as a new VM with a new address.
        """
        return self.migrations.copy(identity, request, send)
