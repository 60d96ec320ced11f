# -*- test-case-name: tests.test_manager_images -*-
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
from typing import IO, Callable, Optional

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


def copy_file(src: str, dst: str,
              progress: Optional[Callable[[int, int], None]] = None) -> int:
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
                n = os.copy_file_range(fin.fileno(), fout.fileno(),
                                       min(COPY_CHUNK, total - done))
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


def copy_stream(source: "IO[bytes]", offset: int, size: int, dst: str,
                progress: Optional[Callable[[int, int], None]] = None) -> int:
    """
    Copy C{size} bytes of C{source} from C{offset} to a new file C{dst}.

    @raise ValueError: the source has fewer bytes.
    """
    source.seek(offset)
    done = 0
    with open(dst, "wb") as fout:
        os.fchmod(fout.fileno(), 0o640)
        while done < size:
            chunk = source.read(min(COPY_CHUNK, size - done))
            if not chunk:
                raise ValueError(f"image data ended after {done} of {size} bytes")
            fout.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, size)
        fout.flush()
        os.fsync(fout.fileno())
    return size


def header_format(header: bytes, size: int) -> tuple[VolumeFormat, int]:
    """
    The format of an image from its first 32 bytes, and its virtual size.
    """
    if header[:4] == QCOW2_MAGIC and len(header) >= 32:
        (virtual_size,) = struct.unpack(">Q", header[24:32])
        return VolumeFormat.QCOW2, virtual_size
    return VolumeFormat.RAW, size
