# -*- test-case-name: tests.test_image_cache -*-
"""
The local image cache (C{-objectCacheDirectory}, C{-objectCacheSize}): images
fetched for C{ImageURL} (C{http://}, C{https://}, C{file://}), kept by content digest
so that the next VM from the same image neither downloads nor copies it: its root
volume is a qcow2 overlay whose backing file is the cached image (or a reflink/full
copy for a standalone volume).

Layout of the directory::

    index.json            {"Images": {sha256: {Format, Size, VirtualSize, LastUsed,
                            Sources: {source: {ETag, LastModified}}}}}
    images/<sha256>       one image file each, read-only (0444)
    partial/              downloads and copies in progress (emptied at start)

A source is the URL without its fragment for HTTP(S) (revalidated with
C{If-None-Match}/C{If-Modified-Since}; a URL with C{#sha256=} needs no network at
all once that digest is cached), and for C{file://} the resolved path with its size,
modification time and inode (a changed file is a new source). Eviction is LRU by
bytes over C{-objectCacheSize}; an image that a VM's root volume uses as its backing
file (read from the volume's qcow2 header), or that a creation in progress holds, is
never evicted. The index is written atomically after each image is in place, so a
crash leaves either a complete entry or an unindexed file that the next start
removes. All file work runs on the manager's disk threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from twisted.internet.defer import DeferredLock, inlineCallbacks
from twisted.logger import Logger

from hypervisor.diskio import IBlockingRunner, StateWriter
from hypervisor.errors import InvalidRequest
from hypervisor.manager import images
from hypervisor.manager.fetch import Fetcher, NotModified, split_checksum
from hypervisor.model import VolumeFormat

MiB = 1024 * 1024
HASH_CHUNK = 8 * MiB
PROGRESS_INTERVAL = 0.5


@dataclass
class CachedImage:
    """
    One cached image.
    """

    digest: str
    path: str
    format: VolumeFormat
    size: int
    virtual_size: int
    last_used: float = 0.0
    sources: dict[str, dict[str, str]] = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        return {
            "Format": self.format.value,
            "Size": self.size,
            "VirtualSize": self.virtual_size,
            "LastUsed": self.last_used,
            "Sources": self.sources,
        }


def _open_directory(directory: str) -> dict[str, Any]:
    """
    Create the layout, empty C{partial/}, read the index and list the image files.
    """
    for sub in ("images", "partial"):
        os.makedirs(os.path.join(directory, sub), mode=0o755, exist_ok=True)
    os.chmod(directory, 0o755)
    partial = os.path.join(directory, "partial")
    for name in os.listdir(partial):
        full = os.path.join(partial, name)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            os.unlink(full)
    try:
        with open(os.path.join(directory, "index.json"), "rb") as f:
            index = json.load(f)
    except FileNotFoundError:
        index = {}
    except ValueError:
        index = {"_corrupt": True}
    files = {}
    for name in os.listdir(os.path.join(directory, "images")):
        files[name] = os.path.getsize(os.path.join(directory, "images", name))
    return {"index": index, "files": files}


def _copy_hashing(src: str, dst: str, report: Callable[[int, int], None]) -> tuple[int, str]:
    """
    Copy C{src} to the new file C{dst}, hashing as it goes; (size, sha256).
    """
    digest = hashlib.sha256()
    total = os.path.getsize(src)
    done = 0
    with open(src, "rb") as fin:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            while True:
                chunk = fin.read(HASH_CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                done += len(chunk)
                report(done, total)
            os.fsync(fd)
        finally:
            os.close(fd)
    return done, digest.hexdigest()


def _file_source(path: str) -> str:
    st = os.stat(path)
    return f"file:{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _place(tmp: str, final: str) -> None:
    os.chmod(tmp, 0o444)
    os.replace(tmp, final)
    from hypervisor.store import fsync_directory

    fsync_directory(os.path.dirname(final))


def backing_files(paths: Iterable[str]) -> set[str]:
    """
    The backing files named by the qcow2 images among C{paths} (resolved).
    """
    out = set()
    for path in paths:
        backing = images.qcow2_backing_file(path)
        if backing:
            out.add(os.path.realpath(os.path.join(os.path.dirname(path), backing)))
    return out


class ImageCache:
    """
    The cache; see the module docstring.

    @ivar hits, misses, revalidations, evictions: counters (status and tests).
    """

    log = Logger()

    def __init__(
        self,
        directory: str,
        max_bytes: int,
        runner: IBlockingRunner,
        writer: StateWriter,
        reactor: Any,
        fetcher: Fetcher,
        volume_files: Callable[[], list[str]],
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.runner = runner
        self.writer = writer
        self.reactor = reactor
        self.fetcher = fetcher
        self.volume_files = volume_files
        self.image_server: Optional[tuple[str, int, Fetcher]] = None
        self.entries: dict[str, CachedImage] = {}
        self.pinned: dict[str, int] = {}
        self.hits = self.misses = self.revalidations = self.evictions = 0
        self._opened = False
        self._open_lock = DeferredLock()
        self._locks: dict[str, DeferredLock] = {}

    # Paths -------------------------------------------------------------------------

    def image_path(self, digest: str) -> str:
        return os.path.join(self.directory, "images", digest)

    def _partial_path(self) -> str:
        return os.path.join(self.directory, "partial", secrets.token_hex(8))

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    # Opening -----------------------------------------------------------------------

    @inlineCallbacks
    def open(self) -> Any:
        """
        Load the index (once): entries whose file is gone are dropped, files with no
        entry (a crash between placing a file and writing the index) removed unless
        a volume uses them.
        """
        yield self._open_lock.acquire()
        try:
            if self._opened:
                return
            found = yield self.runner.run(_open_directory, self.directory)
            raw = found["index"].get("Images") if isinstance(found["index"], dict) else None
            if found["index"].get("_corrupt"):
                self.log.warn(
                    "image cache {d}: index.json unreadable; starting empty", d=self.directory
                )
            for digest, e in (raw or {}).items():
                if digest not in found["files"] or not isinstance(e, dict):
                    continue
                try:
                    self.entries[digest] = CachedImage(
                        digest=digest,
                        path=self.image_path(digest),
                        format=VolumeFormat(e["Format"]),
                        size=int(found["files"][digest]),
                        virtual_size=int(e["VirtualSize"]),
                        last_used=float(e.get("LastUsed", 0)),
                        sources={
                            str(k): {str(a): str(b) for a, b in v.items()}
                            for k, v in (e.get("Sources") or {}).items()
                        },
                    )
                except (KeyError, ValueError, TypeError, AttributeError):
                    continue
            orphans = [self.image_path(d) for d in found["files"] if d not in self.entries]
            if orphans:
                used = yield self.runner.run(backing_files, self.volume_files())
                for path in orphans:
                    if os.path.realpath(path) not in used:
                        yield self.runner.run(images.remove_file, path)
            self._opened = True
            if orphans or raw is None or len(raw or {}) != len(self.entries):
                yield self._save()
        finally:
            self._open_lock.release()

    def _save(self) -> Any:
        data = {"Images": {d: e.encode() for d, e in sorted(self.entries.items())}}
        return self.writer.write(
            os.path.join(self.directory, "index.json"), json.dumps(data, indent=1).encode()
        )

    # Getting images ----------------------------------------------------------------

    def unpin(self, image: CachedImage) -> None:
        """
        The caller no longer needs C{image} kept (its overlay exists, or it failed).
        """
        left = self.pinned.get(image.digest, 0) - 1
        if left > 0:
            self.pinned[image.digest] = left
        else:
            self.pinned.pop(image.digest, None)

    def _pin(self, image: CachedImage) -> CachedImage:
        self.pinned[image.digest] = self.pinned.get(image.digest, 0) + 1
        image.last_used = self.reactor.seconds()
        return image

    @inlineCallbacks
    def get(
        self,
        url: str,
        images_directory: str = "",
        timeout: float = 0.0,
        progress: Callable[[str], None] = lambda message: None,
        fetcher: Optional[Fetcher] = None,
    ) -> Any:
        """
        The cached image for C{url} (C{http(s)://} or C{file://}), fetching it
        first if needed (with C{fetcher}, default L{fetcher}); fires with a
        L{CachedImage} that stays pinned (never evicted) until L{unpin}.
        """
        base_url, sha256 = split_checksum(url)
        yield self.open()
        if base_url.startswith("file:"):
            path = yield self.runner.run(images.local_image_path, base_url, images_directory)
            source = yield self.runner.run(_file_source, path)
        else:
            path, source = "", base_url
        lock = self._locks.setdefault(source, DeferredLock())
        yield lock.acquire()
        try:
            result = yield self._get(
                base_url, path, source, sha256, timeout, progress, fetcher or self.fetcher
            )
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(source, None)
        return result

    def _find(self, source: str) -> Optional[CachedImage]:
        best = None
        for entry in self.entries.values():
            if source in entry.sources and (best is None or entry.last_used > best.last_used):
                best = entry
        return best

    @inlineCallbacks
    def _get(
        self,
        url: str,
        path: str,
        source: str,
        sha256: str,
        timeout: float,
        progress: Callable[[str], None],
        fetcher: Fetcher,
    ) -> Any:
        name = os.path.basename(path or url.rstrip("/")) or url
        if sha256 and sha256 in self.entries:
            entry = self.entries[sha256]
            self.hits += 1
            entry.sources.setdefault(source, {})
            progress(f"image {name} is cached")
            self._pin(entry)
            yield self._save()
            return entry
        known = self._find(source)
        if known is not None and path:
            # A file:// source is keyed by its stat: a known one is unchanged. (An
            # http source is revalidated below, or fetched again without validators.)
            self.hits += 1
            progress(f"image {name} is cached")
            self._pin(known)
            yield self._save()
            return known
        tmp = self._partial_path()
        last = [0.0]

        def report(done: int, total: int) -> None:
            now = self.reactor.seconds()
            if now - last[0] >= PROGRESS_INTERVAL or done == total:
                last[0] = now
                if total:
                    progress(f"getting image: {done // MiB} of {total // MiB} MiB")
                else:
                    progress(f"getting image: {done // MiB} MiB")

        try:
            if path:
                progress(f"getting image {name}")
                size, digest = yield self.runner.run(
                    _copy_hashing, path, tmp, lambda d, t: self.runner.from_thread(report, d, t)
                )
                validators: dict[str, str] = {}
            else:
                validators = known.sources[source] if known is not None else {}
                progress(f"getting image {url}")
                try:
                    done = yield fetcher.fetch(
                        url,
                        tmp,
                        sha256=sha256,
                        timeout=timeout,
                        etag=validators.get("ETag", ""),
                        last_modified=validators.get("LastModified", ""),
                        progress=report,
                    )
                except NotModified:
                    assert known is not None
                    self.hits += 1
                    self.revalidations += 1
                    progress(f"image {name} is cached (not modified)")
                    self._pin(known)
                    yield self._save()
                    return known
                size, digest = done.size, done.sha256
                validators = {}
                if done.etag:
                    validators["ETag"] = done.etag
                if done.last_modified:
                    validators["LastModified"] = done.last_modified
            if sha256 and digest != sha256:
                raise InvalidRequest(
                    f"ImageURL: checksum mismatch (sha256 {digest}, expected {sha256})"
                )
            self.misses += 1
            existing = self.entries.get(digest)
            if existing is None:
                progress(f"unpacking image: {name}")
            entry = yield self._adopt(tmp, digest, size, f"ImageURL {url}")
            for other in self.entries.values():
                other.sources.pop(source, None)
            entry.sources[source] = validators
            self._pin(entry)
            yield self._save()
        except BaseException:
            yield self.runner.run(images.remove_file, tmp)
            raise
        yield self.evict()
        return entry

    @inlineCallbacks
    def _adopt(self, tmp: str, digest: str, size: int, what: str) -> Any:
        """
        The entry for the bytes in C{tmp} (in C{partial/}) with this digest: the one
        cached already (C{tmp} removed), else C{tmp} probed and moved into C{images/}.
        """
        existing = self.entries.get(digest)
        if existing is not None:
            yield self.runner.run(images.remove_file, tmp)
            return existing
        fmt, virtual = yield self.runner.run(images.probe_file, tmp, what)
        yield self.runner.run(_place, tmp, self.image_path(digest))
        entry = CachedImage(
            digest=digest, path=self.image_path(digest), format=fmt, size=size, virtual_size=virtual
        )
        self.entries[digest] = entry
        return entry

    @inlineCallbacks
    def put_upload(
        self,
        upload: Any,
        size: int,
        prefix: bytes = b"",
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Any:
        """
        Stream an uploaded image (C{prefix}, already read, then C{size} more bytes of
        C{upload}) into the cache, hashed on the disk threads as it is written; bytes
        already cached under that digest are not kept twice. Fires with the pinned
        L{CachedImage} (L{unpin} when done); a refused or broken upload leaves
        nothing.
        """
        from hypervisor.upload import write_to_file

        yield self.open()
        tmp = self._partial_path()
        hasher = hashlib.sha256()
        try:
            total = yield write_to_file(
                upload, size, tmp, self.runner, progress, prefix=prefix, hasher=hasher
            )
            digest = hasher.hexdigest()
            if digest in self.entries:
                self.hits += 1
            else:
                self.misses += 1
            entry = yield self._adopt(tmp, digest, total, "the uploaded image")
            entry.sources.setdefault("upload", {})
            self._pin(entry)
            yield self._save()
        except BaseException:
            yield self.runner.run(images.remove_file, tmp)
            raise
        yield self.evict()
        return entry

    def get_named(
        self,
        name: str,
        timeout: float = 0.0,
        progress: Callable[[str], None] = lambda message: None,
    ) -> Any:
        """
        The cached image C{ImageName} from the image server (L{image_server}:
        hostname, port and the L{Fetcher} presenting our certificate); see
        L{hypervisor.imageserver}.
        """
        if self.image_server is None:
            raise InvalidRequest(
                "ImageName needs an image server: start the daemon with -certFile, "
                "-keyFile and -CAfile readable (it presents its certificate to "
                "-imageServerHostname:-imageServerPortNum)"
            )
        from hypervisor.imageserver import image_server_url

        hostname, port, fetcher = self.image_server
        try:
            url = image_server_url(hostname, port, name)
        except ValueError as e:
            raise InvalidRequest(f"ImageName: {e}") from None
        return self.get(url, "", timeout, progress, fetcher=fetcher)

    # Eviction ----------------------------------------------------------------------

    @inlineCallbacks
    def evict(self) -> Any:
        """
        Remove least recently used images until the cache fits C{-objectCacheSize},
        never one that is pinned or is the backing file of a VM's volume.
        """
        if self.total_bytes <= self.max_bytes:
            return []
        used = yield self.runner.run(backing_files, self.volume_files())
        removed = []
        for entry in sorted(self.entries.values(), key=lambda e: e.last_used):
            if self.total_bytes <= self.max_bytes:
                break
            if entry.digest in self.pinned or os.path.realpath(entry.path) in used:
                continue
            del self.entries[entry.digest]
            yield self.runner.run(images.remove_file, entry.path)
            removed.append(entry.digest)
            self.evictions += 1
            self.log.info("image cache: evicted {d} ({n} bytes)", d=entry.digest, n=entry.size)
        if removed:
            yield self._save()
        return removed
