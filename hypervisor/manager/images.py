# -*- test-case-name: tests.test_manager_vms -*-
"""
Volume files: local images (C{file://} URLs under C{-localImagesDirectory}), thick
empty volumes, qcow2 headers. Every function here blocks on disk I/O: the manager
runs them on a thread, never on the reactor.
"""

from __future__ import annotations

import os
import shutil
import struct
import urllib.parse
from typing import Callable, Optional

from hypervisor.errors import InvalidRequest, NotFound
from hypervisor.model import VolumeFormat

QCOW2_MAGIC = b"QFI\xfb"
COPY_CHUNK = 8 * 1024 * 1024


def local_image_path(url: str, images_directory: str, what: str = "ImageURL") -> str:
    """
    Resolve a C{file://} URL to a path inside C{images_directory}.

    @raise InvalidRequest: not a file URL, or outside the directory (symlinks
        resolved), or local images are not enabled.
    @raise NotFound: no such file.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "file":
        raise InvalidRequest(f"{what} {url!r}: only file:// URLs are supported so far")
    if not images_directory:
        raise InvalidRequest(
            f"{what} {url!r}: file:// images are disabled; start the daemon with "
            "-localImagesDirectory"
        )
    path = os.path.realpath(urllib.parse.unquote(parsed.path))
    root = os.path.realpath(images_directory)
    if os.path.commonpath([path, root]) != root:
        raise InvalidRequest(f"{what} {url!r} is outside {images_directory}")
    if not os.path.isfile(path):
        raise NotFound(f"{what} {url!r}: no such file in {images_directory}")
    return path


def image_format(path: str) -> tuple[VolumeFormat, int]:
    """
    The format of an image file and its virtual size (qcow2) or size (raw).
    """
    with open(path, "rb") as f:
        header = f.read(32)
        size = os.fstat(f.fileno()).st_size
    return header_format(header, size)


def round_up(size: int, power: int) -> int:
    """
    Round C{size} up to a multiple of 2**C{power} (power 0 = no rounding).
    """
    if power <= 0:
        return size
    unit = 1 << power
    return -(-size // unit) * unit


def make_thick(path: str, size: int) -> None:
    """
    Create (or extend) a file of C{size} bytes with every block allocated.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        if size:
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: str, dst: str, progress: Optional[Callable[[int, int], None]] = None) -> int:
    """
    Copy C{src} to C{dst} (kernel copy offload where the file system has it),
    reporting (done, total) after each chunk; return the size.
    """
    total = os.path.getsize(src)
    done = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        os.fchmod(fout.fileno(), 0o640)
        while done < total:
            try:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), min(COPY_CHUNK, total - done))
            except OSError:
                n = 0
            if n <= 0:
                chunk = fin.read(min(COPY_CHUNK, total - done))
                if not chunk:
                    break
                fout.write(chunk)
                n = len(chunk)
            done += n
            if progress is not None:
                progress(done, total)
        fout.flush()
        os.fsync(fout.fileno())
    return total


def remove_tree(path: str) -> None:
    """
    Remove a VM's directory and everything in it (missing is fine).
    """
    shutil.rmtree(path, ignore_errors=True)


def remove_all_but(path: str, *keep: str) -> None:
    """
    Remove everything in directory C{path} except the files named in C{keep}
    (missing is fine): a VM's directory is emptied before its C{info.json} goes, so
    that a crash in between leaves a VM that is still known (and its removal
    completed at start).
    """
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return
    for name in names:
        if name in keep:
            continue
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.unlink(full)
            except FileNotFoundError:
                pass


def remove_directory(path: str) -> None:
    """
    Remove an empty directory (missing is fine), durably.
    """
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError:
        shutil.rmtree(path, ignore_errors=True)
    from hypervisor.store import fsync_directory

    fsync_directory(os.path.dirname(os.path.abspath(path)))


def inspect_local_image(
    url: str, images_directory: str, minimum_free: int, roundup_power: int
) -> tuple[str, VolumeFormat, int, int]:
    """
    Resolve a C{file://} image and size its root volume.

    @return: (path, format, root volume size, virtual size for qcow2 else 0).
    """
    path = local_image_path(url, images_directory)
    fmt, size = image_format(path)
    if fmt == VolumeFormat.RAW:
        return path, fmt, round_up(size + minimum_free, roundup_power), 0
    return path, fmt, os.path.getsize(path), size


def make_directories(*paths: str) -> None:
    """
    Create new directories (0755); an existing one is an error (a VM's directories
    are always new).
    """
    for path in paths:
        os.makedirs(path, mode=0o755, exist_ok=False)


def header_format(header: bytes, size: int) -> tuple[VolumeFormat, int]:
    """
    The format of an image from its first 32 bytes, and its virtual size.
    """
    if header[:4] == QCOW2_MAGIC and len(header) >= 32:
        (virtual_size,) = struct.unpack(">Q", header[24:32])
        return VolumeFormat.QCOW2, virtual_size
    return VolumeFormat.RAW, size
