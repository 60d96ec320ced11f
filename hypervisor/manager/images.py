# -*- test-case-name: tests.test_manager_vms -*-
"""
Volume files: local images (C{file://} URLs under C{-localImagesDirectory}), thick
empty volumes, qcow2 headers. Every function here blocks on disk I/O: the manager
runs them on a thread, never on the reactor.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
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
    return probe_file(path)


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


def remove_file(path: str) -> None:
    """
    Remove a file (missing is fine). Blocking: call it on a disk thread.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


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

    An empty directory (a creation that failed at its first file, e.g. with no
    file descriptor left) is removed at once, which needs no descriptor (listing
    it would); a crash before that reaches the disk leaves an empty directory,
    which start-up removes.
    """
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass  # not empty
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


def is_tmpfs(path: str, mounts: str = "/proc/mounts") -> bool:
    """
    Whether C{path} is itself a tmpfs mount point.
    """
    real = os.path.realpath(path)
    with open(mounts) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == real and fields[2] == "tmpfs":
                return True
    return False


def ensure_tmpfs(path: str) -> None:
    """
    Make C{path} a tmpfs mount (the reference mounts one for memory volumes if
    needed); nothing if it is one already.

    @raise OSError: it cannot be mounted.
    """
    os.makedirs(path, mode=0o755, exist_ok=True)
    if is_tmpfs(path):
        return
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", path],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if result.returncode != 0:
        raise OSError(f"cannot mount tmpfs on {path} for memory volumes: {result.stderr.strip()}")


def make_directories(*paths: str) -> None:
    """
    Create new directories (0755); an existing one is an error (a VM's directories
    are always new).
    """
    for path in paths:
        os.makedirs(path, mode=0o755, exist_ok=False)


# Leading bytes of files that are not disk images (or are images in formats we do
# not take): refused rather than booted as a raw disk.
NOT_IMAGES: list[tuple[int, bytes, str]] = [
    (0, b"\x1f\x8b", "gzip-compressed data"),
    (0, b"\xfd7zXZ\x00", "xz-compressed data"),
    (0, b"BZh", "bzip2-compressed data"),
    (0, b"\x28\xb5\x2f\xfd", "zstd-compressed data"),
    (0, b"PK\x03\x04", "a zip archive"),
    (257, b"ustar", "a tar archive"),
    (0, b"<!DOCTYPE", "HTML text"),
    (0, b"<!doctype", "HTML text"),
    (0, b"<html", "HTML text"),
    (0, b"<HTML", "HTML text"),
    (0, b"<?xml", "XML text"),
    (0, b"#!", "a script"),
    (0, b"KDMV", "a VMDK image (convert it to raw or qcow2)"),
    (0, b"vhdxfile", "a VHDX image (convert it to raw or qcow2)"),
    (0, b"conectix", "a VHD image (convert it to raw or qcow2)"),
    (0, b"QED\x00", "a QED image (convert it to raw or qcow2)"),
    (64, b"\x7f\x10\xda\xbe", "a VDI image (convert it to raw or qcow2)"),
]
PROBE_BYTES = 512
QCOW2_EXTERNAL_DATA = 1 << 2


def header_format(header: bytes, size: int, what: str = "image") -> tuple[VolumeFormat, int]:
    """
    The format of an image from its first bytes (up to L{PROBE_BYTES}; never from
    its name), and its virtual size (qcow2) or size (raw).

    @raise InvalidRequest: a qcow2 image with a backing file or an external data
        file (it would make the VM read a file the caller names), a qcow2 header
        of an unknown version, or bytes that are known not to be a disk image.
    """
    if header[:4] == QCOW2_MAGIC:
        if len(header) < 32:
            raise InvalidRequest(f"{what}: truncated qcow2 header")
        version, backing_offset, backing_size = struct.unpack(">IQI", header[4:20])
        if version not in (2, 3):
            raise InvalidRequest(f"{what}: qcow2 version {version} is not supported")
        if backing_offset or backing_size:
            raise InvalidRequest(f"{what}: a qcow2 image with a backing file is refused")
        if version == 3 and len(header) >= 80:
            (incompatible,) = struct.unpack(">Q", header[72:80])
            if incompatible & QCOW2_EXTERNAL_DATA:
                raise InvalidRequest(f"{what}: a qcow2 image with an external data file is refused")
        (virtual_size,) = struct.unpack(">Q", header[24:32])
        return VolumeFormat.QCOW2, virtual_size
    for offset, magic, name in NOT_IMAGES:
        if header[offset : offset + len(magic)] == magic:
            raise InvalidRequest(f"{what} is not a raw or qcow2 disk image: it is {name}")
    if size == 0:
        raise InvalidRequest(f"{what} is empty")
    return VolumeFormat.RAW, size


def qemu_img_info(path: str, fmt: VolumeFormat) -> dict:
    """
    C{qemu-img info} of an image in a format we name (never probed by qemu-img).

    @raise InvalidRequest: qemu-img cannot read it as that format, or it names a
        backing or data file.
    """
    result = subprocess.run(
        ["qemu-img", "info", "-f", fmt.value, "--output=json", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        message = result.stderr.strip().splitlines()[-1:] or ["unreadable"]
        raise InvalidRequest(f"not a valid {fmt.value} image: {message[0]}")
    info = json.loads(result.stdout)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise InvalidRequest("a qcow2 image with a backing file is refused")
    data = (info.get("format-specific") or {}).get("data") or {}
    if data.get("data-file"):
        raise InvalidRequest("a qcow2 image with an external data file is refused")
    return info


def probe_file(path: str, what: str = "image") -> tuple[VolumeFormat, int]:
    """
    Probe an image file: its format from its header, and its virtual size (qcow2,
    checked by C{qemu-img info}) or size (raw).
    """
    with open(path, "rb") as f:
        header = f.read(PROBE_BYTES)
        size = os.fstat(f.fileno()).st_size
    fmt, virtual = header_format(header, size, what)
    if fmt == VolumeFormat.QCOW2:
        try:
            info = qemu_img_info(path, fmt)
        except InvalidRequest as e:
            raise InvalidRequest(f"{what}: {e}") from None
        virtual = int(info["virtual-size"])
    return fmt, virtual


def make_overlay(base: str, base_format: VolumeFormat, path: str, size: int) -> int:
    """
    Create C{path}, a new qcow2 image of virtual size C{size} whose backing file is
    C{base} (copy-on-write: only what the VM writes is stored in C{path}); return
    the new file's size.
    """
    result = subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            base_format.value,
            "-b",
            base,
            path,
            str(size),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise OSError(f"qemu-img create {path}: {result.stderr.strip()}")
    os.chmod(path, 0o640)
    return os.path.getsize(path)


def qcow2_backing_file(path: str) -> str:
    """
    The backing file named in a qcow2 image's header ("" for none or not qcow2).
    """
    try:
        with open(path, "rb") as f:
            header = f.read(32)
            if header[:4] != QCOW2_MAGIC or len(header) < 32:
                return ""
            offset, size = struct.unpack(">QI", header[8:20])
            if not offset or not 0 < size <= 4096:
                return ""
            f.seek(offset)
            return f.read(size).decode("utf-8", "replace")
    except OSError:
        return ""


FICLONE = 0x40049409


def clone_or_copy(src: str, dst: str, progress: Optional[Callable[[int, int], None]] = None) -> str:
    """
    Copy C{src} to the new file C{dst}: a reflink (shared blocks, copy-on-write)
    where the file system has it, else a full copy. Returns C{"reflink"} or
    C{"copy"}.
    """
    import fcntl

    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            fcntl.ioctl(fd, FICLONE, fin.fileno())
        except OSError:
            os.close(fd)
            os.unlink(dst)
        else:
            os.fsync(fd)
            os.close(fd)
            return "reflink"
    copy_file(src, dst, progress)
    return "copy"
