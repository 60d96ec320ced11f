# -*- test-case-name: tests.test_migration_unit -*-
"""
Our volume transfer between two of our daemons: C{Hypervisor.ReadVmVolume}, a
request/reply method whose reply is followed by raw bytes (like GetVmUserData), so it
runs over every transport we serve (SRPC, HTTPS) with their access rules, deadlines
and flow control. SmallStack's own C{GetVmVolume} speaks C{lib/rsync} over GOB
only (reference §1.2) and no JSON peer can decode it, hence a protocol of our own.

- The target asks for a range (C{Offset}, C{Length} at most L{MAX_READ}) of one
  volume in chunks of C{ChunkSize} (L{CHUNK} by default); the source answers the
  volume's C{Size}, each chunk's SHA-256 and then the chunks' bytes. Nothing is ever
  whole in memory: at most one range (8 MiB) per call on either side.
- Checksummed: the target checks every chunk's SHA-256 before it writes it; a
  mismatch fails the transfer (the file keeps only verified chunks).
- Resumable and re-syncing: the request may carry the target's own checksums of the
  range's chunks; matching chunks are not sent. The final re-sync after the source
  stopped sends only what changed, and a transfer broken off (network cut, either
  daemon restarted) continues from L{VolumeProgress.offset} rather than from zero.
- Disk I/O runs on threads: the source reads through the manager's disk runner, the
  target pulls on the migration's worker thread (L{pull_volume} blocks).
- Zero chunks elided: volumes are thick (every block allocated, mostly zeros in a
  young VM), so a target that says it can (C{ZeroChunks}) is told which chunks are
  all zeros instead of getting their bytes and checksums; it allocates the whole file
  first (C{fallocate}, so an unwritten region reads as zeros and the copy stays thick
  and fails at once on a full disk) and writes zeros only where its copy is not zero
  already (a resumed or re-synced copy).
- Pipelined: the target keeps up to L{PULL_CONNECTIONS} ranges in flight, one per
  connection to the source, so that the source reading and hashing one range, the
  network carrying another and the target verifying and writing a third overlap
  instead of taking turns. Each range is written where it belongs; the verified
  offset moves over the ranges done in a row.

qcow2 overlays on a cached image (C{CreateVm} with C{ImageURL}/C{ImageName}) are
refused: their backing file lives in the source's image cache.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from hypervisor.errors import InvalidRequest
from hypervisor.migration.messages import (
    MAX_CHECKSUMS,
    ReadVmVolumeRequest,
    ReadVmVolumeResponse,
    VolumeChunk,
)

KiB = 1024
MiB = 1024 * KiB
CHUNK = 1 * MiB
MIN_CHUNK = 64 * KiB
MAX_CHUNK = 8 * MiB
MAX_READ = 8 * MiB
"""Bytes of one ReadVmVolume range (and so of one reply's raw tail)."""
PULL_CONNECTIONS = 3
"""Ranges a pull keeps in flight (one connection to the source each)."""


class TransferError(Exception):
    """
    A volume transfer failed (checksum mismatch, short reply, the source's error).
    """


def checksum(data: bytes) -> bytes:
    """
    A chunk's checksum (SHA-256).
    """
    return hashlib.sha256(data).digest()


_zeros: dict[int, bytes] = {}
_zero_sums: dict[int, bytes] = {}


def zeros(n: int) -> bytes:
    """
    C{n} zero bytes (kept: chunks come in one or two sizes).
    """
    z = _zeros.get(n)
    if z is None:
        if len(_zeros) >= 4:
            _zeros.clear()
        z = _zeros[n] = bytes(n)
    return z


def zero_checksum(n: int) -> bytes:
    """
    The checksum of C{n} zero bytes.
    """
    digest = _zero_sums.get(n)
    if digest is None:
        if len(_zero_sums) >= 4:
            _zero_sums.clear()
        digest = _zero_sums[n] = checksum(zeros(n))
    return digest


def check_range(request: ReadVmVolumeRequest, size: int) -> tuple[int, int, int]:
    """
    The request's (offset, length, chunk size), validated against a volume of C{size}.

    @raise InvalidRequest: out of range or over the limits.
    """
    chunk = request.ChunkSize or CHUNK
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise InvalidRequest(f"ChunkSize must be between {MIN_CHUNK} and {MAX_CHUNK} bytes")
    if request.Offset > size:
        raise InvalidRequest(f"Offset {request.Offset} is past the volume's {size} bytes")
    length = min(request.Length or MAX_READ, size - request.Offset)
    if length > MAX_READ:
        raise InvalidRequest(f"Length must be at most {MAX_READ} bytes")
    chunks = (length + chunk - 1) // chunk
    if request.Checksums and len(request.Checksums) != chunks:
        raise InvalidRequest(f"{len(request.Checksums)} checksums for a range of {chunks} chunks")
    if chunks > MAX_CHECKSUMS:
        raise InvalidRequest("too many chunks in one range")
    return request.Offset, length, chunk


def refuse_backed_qcow2(path: str) -> None:
    """
    Refuse a qcow2 file with a backing file (its other half is not transferred).
    """
    with open(path, "rb") as f:
        header = f.read(16)
    if header[:4] == b"QFI\xfb" and len(header) == 16:
        (backing_offset,) = struct.unpack(">Q", header[8:16])
        if backing_offset:
            raise InvalidRequest(
                f"{os.path.basename(path)} is a qcow2 overlay on a cached image: it "
                "cannot be migrated or copied (its backing file stays on this host)"
            )


def read_range(
    path: str, request: ReadVmVolumeRequest, size: int
) -> tuple[ReadVmVolumeResponse, bytes]:
    """
    The source's side (blocking: run it on a disk thread): the reply and its raw tail
    for one range of the volume file at C{path}, whose size is C{size}.
    """
    offset, length, chunk = check_range(request, size)
    if offset == 0:
        refuse_backed_qcow2(path)
    chunks = []
    out = bytearray()
    with open(path, "rb") as f:
        f.seek(offset)
        position = offset
        index = 0
        while position < offset + length:
            n = min(chunk, offset + length - position)
            data = f.read(n)
            if len(data) < n:  # a file shorter than its recorded size reads as zeros
                data += bytes(n - len(data))
            have = request.Checksums[index] if request.Checksums else b""
            if request.ZeroChunks and data == zeros(n):  # memcmp: ends at a first non-zero
                digest = zero_checksum(n)
                chunks.append(
                    VolumeChunk(Offset=position, Length=n, Checksum=digest, Zero=digest != have)
                )
            else:
                digest = checksum(data)
                sent = digest != have
                if sent:
                    out += data
                chunks.append(VolumeChunk(Offset=position, Length=n, Checksum=digest, Sent=sent))
            position += n
            index += 1
    return ReadVmVolumeResponse(Size=size, Chunks=chunks, Length=len(out)), bytes(out)


@dataclass
class VolumeProgress:
    """
    How far a pull got: every byte before C{offset} is verified on the target.
    """

    offset: int = 0
    sent: int = 0
    skipped: int = 0
    zero: int = 0


Caller = Callable[[ReadVmVolumeRequest], tuple[dict[str, Any], bytes]]


def _local_checksums(fd: int, offset: int, length: int, chunk: int) -> list[bytes]:
    sums = []
    position = offset
    while position < offset + length:
        n = min(chunk, offset + length - position)
        data = os.pread(fd, n, position)
        if len(data) < n:
            data += bytes(n - len(data))
        sums.append(checksum(data))
        position += n
    return sums


def _make_zero(fd: int, offset: int, n: int) -> None:
    """
    Make C{n} bytes at C{offset} zero, writing only if they are not already (an
    allocated, never written region reads as zeros at no disk cost).
    """
    if os.pread(fd, n, offset) != zeros(n):
        _write_at(fd, zeros(n), offset)


def _write_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pull_range(
    call: Caller,
    fd: int,
    request: ReadVmVolumeRequest,
    size: int,
    offset: int,
    chunk: int,
    resync: bool,
) -> tuple[int, int, int]:
    """
    Fetch, verify and write the range at C{offset}; (bytes sent, bytes unchanged,
    bytes of zeros made here).
    """
    length = min(MAX_READ, size - offset)
    ask = ReadVmVolumeRequest(
        AccessToken=request.AccessToken,
        IpAddress=request.IpAddress,
        VolumeIndex=request.VolumeIndex,
        Offset=offset,
        Length=length,
        ChunkSize=chunk,
        Checksums=_local_checksums(fd, offset, length, chunk) if resync else [],
        ZeroChunks=True,
    )
    reply, raw = call(ask)
    if reply.get("Error"):
        raise TransferError(str(reply["Error"]))
    if int(reply.get("Size") or 0) != size:
        raise TransferError(
            f"volume {request.VolumeIndex} is {reply.get('Size')} bytes on the "
            f"source, {size} expected"
        )
    sent = skipped = zero = 0
    position = 0
    expected = offset
    for item in reply.get("Chunks") or []:
        at, n = int(item["Offset"]), int(item["Length"])
        if at != expected or n <= 0:
            raise TransferError(f"chunk at {at} out of order")
        expected += n
        if item.get("Zero"):
            _make_zero(fd, at, n)
            zero += n
            continue
        if not item.get("Sent"):
            skipped += n
            continue
        data = raw[position : position + n]
        position += n
        want = base64.b64decode(item.get("Checksum") or "")
        if len(data) != n or checksum(data) != want:
            raise TransferError(f"volume {request.VolumeIndex}: chunk at {at} fails its checksum")
        _write_at(fd, data, at)
        sent += n
    if expected != offset + length or position != len(raw):
        raise TransferError(f"volume {request.VolumeIndex}: the source answered a different range")
    return sent, skipped, zero


def _allocate(fd: int, size: int) -> None:
    """
    Allocate every block of the copy (as the source's thick volume), keeping what it
    holds. On a file system without C{fallocate} the copy keeps holes where the
    source has zero chunks (they read as zeros all the same).

    @raise OSError: not enough space (before anything is transferred).
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def pull_volume(
    call: Caller,
    request: ReadVmVolumeRequest,
    path: str,
    size: int,
    *,
    resync: bool = False,
    progress: Optional[Callable[[VolumeProgress, int], None]] = None,
    start: int = 0,
    chunk: int = CHUNK,
    extra_calls: Sequence[Caller] = (),
) -> VolumeProgress:
    """
    The target's side (blocking: run it on a worker thread): make the file at
    C{path} a verified copy of the source's volume of C{size} bytes.

    @param call: sends one L{ReadVmVolumeRequest} and returns the reply (as a dict)
        and its raw tail.
    @param extra_calls: more such senders, each on a connection of its own, each used
        by a thread of its own: one range in flight per sender.
    @param resync: send our checksums of every range, so that only changed chunks
        come (the final pass after the source stopped).
    @param start: resume from here (bytes before it are verified already).
    @raise TransferError: the source's error, a short tail or a checksum mismatch
        (the first failure of any sender; the others stop after their range).
    """
    state = VolumeProgress(offset=start)
    offsets = iter(range(start, size, MAX_READ))
    done: set[int] = set()
    failures: list[BaseException] = []
    lock = threading.Lock()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def pull(sender: Caller) -> None:
        while True:
            with lock:
                offset = None if failures else next(offsets, None)
            if offset is None:
                return
            try:
                sent, skipped, zero = _pull_range(sender, fd, request, size, offset, chunk, resync)
            except BaseException as e:
                with lock:
                    failures.append(e)
                return
            with lock:
                state.sent += sent
                state.skipped += skipped
                state.zero += zero
                done.add(offset)
                moved = False
                while state.offset in done:  # the verified prefix grows over ranges in a row
                    done.discard(state.offset)
                    state.offset = min(size, state.offset + MAX_READ)
                    moved = True
                if moved and progress is not None:
                    progress(state, size)

    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        if size:
            _allocate(fd, size)
        ranges = -(-(size - start) // MAX_READ) if size > start else 0
        helpers = [
            threading.Thread(target=pull, args=(sender,), name="volume-pull", daemon=True)
            for sender in list(extra_calls)[: max(0, ranges - 1)]
        ]
        started = []
        for helper in helpers:
            try:
                helper.start()
            except RuntimeError:  # no thread to give: fewer ranges in flight
                break
            started.append(helper)
        pull(call)
        for helper in started:
            helper.join()
        if failures:
            raise failures[0]
        os.fsync(fd)
    finally:
        os.close(fd)
    return state
