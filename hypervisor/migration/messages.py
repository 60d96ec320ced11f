# -*- test-case-name: tests.test_migration_unit -*-
"""
The wire structs of access tokens, migration and copying (reference §1.6, §1.7 and
C{proto/hypervisor/messages.go}: Go field names and order), and those of our own
volume transfer (L{hypervisor.migration.transfer}), which SmallStack does not have:
its C{GetVmVolume} speaks C{lib/rsync} in GOB only, which no JSON peer can decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from hypervisor.codec import Duration, IPv4Text, MaxLen, Uint, Uint64, field
from hypervisor.model import MessageText, VmInfo, VmInfoT

TokenBytes = Annotated[bytes, MaxLen(4096)]
HostPort = Annotated[str, MaxLen(1024)]
MAX_CHECKSUMS = 16384
"""Checksums a ReadVmVolume request may carry (one per chunk of its range)."""


@dataclass
class GetVmAccessTokenRequest:
    """
    GetVmAccessToken: a token for one VM, valid for C{Lifetime} (1 minute to 1 day).
    """

    IpAddress: IPv4Text = ""
    Lifetime: Duration = Duration(0)


@dataclass
class GetVmAccessTokenResponse:
    """
    The token (32 random bytes, base64 in JSON).
    """

    Token: bytes = b""
    Error: MessageText = ""


@dataclass
class DiscardVmAccessTokenRequest:
    """
    DiscardVmAccessToken: scrub the VM's token.
    """

    AccessToken: TokenBytes = b""
    IpAddress: IPv4Text = ""


@dataclass
class PrepareVmForMigrationRequest:
    """
    PrepareVmForMigration: C{Enable} moves a stopped VM to migrating (uncommitted, its
    addresses unregistered); without it, a migrating VM back to stopped.
    C{TargetHypervisor} is I{ours} (omitted when empty; Go ignores it): where the
    migration goes, so that the source can ask the target, after a failure, whether
    it committed (L{hypervisor.migration} docstring), and C{WasRunning} (ours too):
    whether to start the VM again if the migration is undone.
    """

    AccessToken: TokenBytes = b""
    Enable: bool = False
    IpAddress: IPv4Text = ""
    TargetHypervisor: HostPort = field(omitempty=True, default="")
    WasRunning: bool = field(omitempty=True, default=False)


@dataclass
class MigrateVmRequest:
    """
    MigrateVm, sent to the target.
    """

    AccessToken: TokenBytes = b""
    DhcpTimeout: Duration = Duration(0)
    IpAddress: IPv4Text = ""
    SkipMemoryCheck: bool = False
    SourceHypervisor: HostPort = ""


@dataclass
class MigrateVmResponse:
    """
    One message of MigrateVm's stream; C{RequestCommit} asks the client for a
    L{MigrateVmResponseResponse}.
    """

    Error: MessageText = ""
    Final: bool = False
    ProgressMessage: MessageText = ""
    RequestCommit: bool = False


@dataclass
class MigrateVmResponseResponse:
    """
    The client's answer to C{RequestCommit}.
    """

    Commit: bool = False


@dataclass
class CopyVmRequest:
    """
    CopyVm, sent to the target: the settings of the new VM (embedded VmInfo).
    """

    AccessToken: TokenBytes = b""
    IpAddress: IPv4Text = ""
    SkipMemoryCheck: bool = False
    SourceHypervisor: HostPort = ""
    VmInfo: VmInfoT = field(embed=True, default_factory=VmInfo)


@dataclass
class CopyVmResponse:
    """
    One message of CopyVm's stream; the last has C{Final} (and the new C{IpAddress})
    or C{Error}.
    """

    Error: MessageText = ""
    Final: bool = False
    IpAddress: IPv4Text = ""
    ProgressMessage: MessageText = ""


@dataclass
class GetRootCookiePathResponse:
    """
    GetRootCookiePath: where the root cookie is (C{<stateDir>/root-cookie}, 32 random
    bytes readable by root only, new at each start): a local root proves itself by
    reading it (the reference's ExportLocalVm/ImportLocalVm rule).
    """

    Error: MessageText = ""
    Path: Annotated[str, MaxLen(4096)] = ""


@dataclass
class ReadVmVolumeRequest:
    """
    I{Ours}: read C{Length} bytes of volume C{VolumeIndex} from C{Offset}, in chunks
    of C{ChunkSize}. C{Checksums}, when given, are the caller's SHA-256 of each chunk
    of the range as it has it: chunks that match are not sent again (the re-sync
    after the source stopped, and resuming after a broken transfer). C{ExtraFile}
    (C{kernel} or C{initrd}) reads that file of the root volume's directory instead
    (Go's C{GetVmVolume} C{ExtraFiles}): a VM booted from its own kernel.
    C{ZeroChunks}: the caller makes a chunk zero itself when told it is all zeros
    (L{VolumeChunk.Zero}), so such chunks are neither hashed nor sent; a caller that
    does not say so gets every chunk's bytes.
    """

    AccessToken: TokenBytes = b""
    IpAddress: IPv4Text = ""
    VolumeIndex: Uint = 0
    Offset: Uint64 = 0
    Length: Uint64 = 0
    ChunkSize: Uint64 = 0
    Checksums: Annotated[list[Annotated[bytes, MaxLen(32)]], MaxLen(MAX_CHECKSUMS)] = field(
        default_factory=list
    )
    ExtraFile: Annotated[str, MaxLen(16)] = field(omitempty=True, default="")
    ZeroChunks: bool = field(omitempty=True, default=False)


@dataclass
class VolumeChunk:
    """
    One chunk of a L{ReadVmVolumeResponse}: where, how long, its SHA-256, and whether
    its bytes follow (C{Sent}), or it is all zeros (C{Zero}, only to a caller that
    asked with C{ZeroChunks}: nothing follows, the caller zeroes its copy), or the
    caller's copy already matches (neither).
    """

    Offset: Uint64 = 0
    Length: Uint64 = 0
    Checksum: bytes = b""
    Sent: bool = False
    Zero: bool = field(omitempty=True, default=False)


@dataclass
class ReadVmVolumeResponse:
    """
    The volume's C{Size}, the chunks of the range, and C{Length}: how many raw bytes
    follow the JSON (the sent chunks' bytes, in order).
    """

    Error: MessageText = ""
    Size: Uint64 = 0
    Chunks: Annotated[list[VolumeChunk], MaxLen(MAX_CHECKSUMS)] = field(default_factory=list)
    Length: Uint64 = 0
