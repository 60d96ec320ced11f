"""
Image sources and the image cache against a real twisted.web server (HTTP, and HTTPS
with a real CA), real C{qemu-img}, and the manager on C{test:///default}; one guest
on the real libvirtd boots with a copy-on-write root on a cached image.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from hypervisor import errors
from hypervisor.auth import ROOT
from hypervisor.diskio import ThreadPoolRunner
from hypervisor.manager import images
from hypervisor.manager.fetch import (
    DownloadFailed,
    Fetcher,
    NotModified,
    split_checksum,
    tls_policy_from_ca_file,
)
from hypervisor.model import (
    AccessRequest,
    CreateVmRequest,
    IpRequest,
    ReplaceVmImageRequest,
    VmInfo,
    VolumeFormat,
)
from hypervisor.upload import UploadStream
from tests import support
from tests.imageserver import ImageServer
from tests.test_manager_vms import ALICE, Daemon, ManagerTestCase

MiB = 1024 * 1024


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def write_raw(path: str, size: int, seed: int = 1) -> bytes:
    """
    A raw image with an MBR signature and some non-zero content.
    """
    data = bytearray(size)
    data[510:512] = b"\x55\xaa"
    data[4096 : 4096 + 64] = bytes([seed]) * 64
    with open(path, "wb") as f:
        f.write(data)
    return bytes(data)


class FetcherTests(TestCase):
    """
    L{Fetcher} against a real HTTP(S) server: every failure leaves no file.
    """

    timeout = 60

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="hv-fetch-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.served = os.path.join(self.root, "served")
        os.makedirs(self.served)
        self.image = write_raw(os.path.join(self.served, "disk.raw"), 2 * MiB)
        self.server = ImageServer(self, self.served)
        self.runner = ThreadPoolRunner(reactor, "test-fetch", 2)
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        self.dest = os.path.join(self.root, "out")

    def fetcher(self, **kwargs: Any) -> Fetcher:
        return Fetcher(reactor, self.runner, **kwargs)

    async def fails(self, url: str, words: str, fetcher: Any = None, **kwargs: Any) -> None:
        d = Deferred.fromCoroutine(self._fetch(fetcher or self.fetcher(), url, **kwargs))
        e = await self.assertFailure(d, DownloadFailed)
        self.assertIn(words, str(e))
        self.assertFalse(os.path.exists(self.dest), "a failed download left its file")

    async def _fetch(self, fetcher: Fetcher, url: str, **kwargs: Any) -> Any:
        return await fetcher.fetch(url, self.dest, **kwargs)

    async def test_download(self) -> None:
        """
        The body is written to the file, hashed, and progress is reported; the
        response's Last-Modified is kept for revalidation (which answers 304).
        """
        seen: list[tuple[int, int]] = []
        done = await self.fetcher().fetch(
            self.server.url("/images/disk.raw"),
            self.dest,
            progress=lambda d, t: seen.append((d, t)),
        )
        self.assertEqual(done.size, len(self.image))
        self.assertEqual(done.sha256, hashlib.sha256(self.image).hexdigest())
        with open(self.dest, "rb") as f:
            self.assertEqual(f.read(), self.image)
        self.assertEqual(seen[-1], (len(self.image), len(self.image)))
        self.assertTrue(done.last_modified)
        os.unlink(self.dest)
        d = self.fetcher().fetch(
            self.server.url("/images/disk.raw"), self.dest, last_modified=done.last_modified
        )
        await self.assertFailure(d, NotModified)
        self.assertFalse(os.path.exists(self.dest))

    async def test_body_without_length(self) -> None:
        """
        A chunked body (no Content-Length) is taken whole, and bounded by the limit.
        """
        done = await self.fetcher().fetch(self.server.url("/unsized"), self.dest)
        self.assertEqual(done.size, 3 * MiB)
        os.unlink(self.dest)
        await self.fails(self.server.url("/unsized"), "limit", self.fetcher(max_size=MiB))

    async def test_bad_downloads(self) -> None:
        """
        Truncated, too big (by Content-Length), a wrong checksum, HTTP errors,
        redirect loops and chains longer than the limit, and bad URLs fail clearly.
        """
        url = self.server.url
        await self.fails(url("/truncated"), "ended after")
        before = self.server.counts.get("/images/disk.raw", 0)
        await self.fails(url("/images/disk.raw"), "over the", self.fetcher(max_size=MiB))
        self.assertEqual(self.server.counts["/images/disk.raw"], before + 1)
        await self.fails(url("/images/disk.raw"), "checksum mismatch", sha256="0" * 64)
        await self.fails(url("/missing"), "HTTP 404")
        await self.fails(url("/loop"), "more than 5 redirects")
        await self.fails(url("/chain/9"), "more than 5 redirects")
        done = await self.fetcher().fetch(url("/chain/3"), self.dest)
        self.assertEqual(done.size, len(self.image))
        os.unlink(self.dest)
        await self.fails(url("/tofile"), "unsupported URL")
        await self.fails(url("/gzipbomb"), "limit", self.fetcher(max_size=MiB))
        port = support.free_port()
        await self.fails(f"http://127.0.0.1:{port}/x", "refused")
        with self.assertRaises(errors.InvalidRequest):
            await self.fetcher().fetch("ftp://127.0.0.1/x", self.dest)

    async def test_stalled_download_times_out(self) -> None:
        """
        A server that stops sending is cut off at the deadline; nothing is left.
        """
        await self.fails(self.server.url("/stalled"), "longer than 1 s", timeout=1.0)

    async def test_https(self) -> None:
        """
        HTTPS with the image server's CA trusted works; with the system's CAs (which
        do not include it) it fails clearly and leaves nothing.
        """
        https = ImageServer(self, self.served, tls_dir=self.root)
        fetcher = self.fetcher(tls_policy=tls_policy_from_ca_file(https.ca_file))
        done = await fetcher.fetch(https.url("/images/disk.raw"), self.dest)
        self.assertEqual(done.sha256, hashlib.sha256(self.image).hexdigest())
        os.unlink(self.dest)
        await self.fails(https.url("/images/disk.raw"), "certificate")

    def test_checksum_fragment(self) -> None:
        """
        C{#sha256=} is split off; any other fragment is refused.
        """
        digest = "AB" * 32
        self.assertEqual(
            split_checksum(f"http://h/x#sha256={digest}"), ("http://h/x", digest.lower())
        )
        self.assertEqual(split_checksum("http://h/x"), ("http://h/x", ""))
        with self.assertRaises(errors.InvalidRequest):
            split_checksum("http://h/x#md5=00")


class ProbeTests(TestCase):
    """
    Formats come from headers (checked by qemu-img), never from names.
    """

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="hv-probe-")
        self.addCleanup(shutil.rmtree, self.root, True)

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def test_formats(self) -> None:
        qemu_img("create", "-q", "-f", "qcow2", self.path("a.raw"), "64M")
        self.assertEqual(images.probe_file(self.path("a.raw")), (VolumeFormat.QCOW2, 64 * MiB))
        write_raw(self.path("b.qcow2"), MiB)
        self.assertEqual(images.probe_file(self.path("b.qcow2")), (VolumeFormat.RAW, MiB))

    def test_refused(self) -> None:
        write_raw(self.path("base"), MiB)
        qemu_img(
            "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.path("base"), self.path("o")
        )
        with self.assertRaisesRegex(errors.InvalidRequest, "backing file"):
            images.probe_file(self.path("o"))
        subprocess.run(["gzip", "-k", self.path("base")], check=True)
        with self.assertRaisesRegex(errors.InvalidRequest, "gzip"):
            images.probe_file(self.path("base.gz"))
        with open(self.path("page"), "wb") as f:
            f.write(b"<html>")
        with self.assertRaisesRegex(errors.InvalidRequest, "HTML"):
            images.probe_file(self.path("page"))
        # A qcow2 header whose tables are garbage: qemu-img refuses it.
        with open(self.path("fake"), "wb") as f:
            f.write(
                b"QFI\xfb\0\0\0\3"
                + b"\0" * 12
                + b"\0\0\0\x10"
                + (64 * MiB).to_bytes(8, "big")
                + b"\0" * 72
                + b"\xff" * 200
            )
        with self.assertRaisesRegex(errors.InvalidRequest, "not a valid qcow2"):
            images.probe_file(self.path("fake"))


class CachedCreateTests(ManagerTestCase):
    """
    CreateVm with http(s) and file:// ImageURLs through the service layer, with the
    image cache: the second VM from an image neither downloads nor copies it.
    """

    timeout = 120
    cache_size = 64 * MiB

    def setUp(self) -> None:
        super().setUp()
        self.cache = os.path.join(self.root, "objectcache")
        self.served = os.path.join(self.root, "served")
        os.makedirs(self.served)
        self.image_data = write_raw(os.path.join(self.served, "disk.raw"), 3 * MiB)
        self.server = ImageServer(self, self.served)
        self.daemon = Daemon(self, self.root, self.host, **self.cache_args())
        self.api = self.daemon.api
        self.manager = self.daemon.manager

    def cache_args(self) -> dict[str, Any]:
        return dict(
            image_cache_directory=self.cache, image_cache_size=self.cache_size, image_timeout=5
        )

    def cache_of(self) -> Any:
        return self.manager.ctx.image_cache

    def root_file(self, ip: str) -> str:
        return str(self.info_file(ip)["VolumeLocations"][0]["Filename"])

    def snapshot(self) -> Any:
        """
        What must not change when a creation fails.
        """
        volumes = os.path.join(self.root, "volumes")
        vms = os.path.join(self.root, "state", "VMs")
        return (
            sorted(a.IpAddress for a in self.manager.pool.free),
            sorted(self.manager.vms),
            sorted(os.listdir(volumes)) if os.path.isdir(volumes) else [],
            sorted(os.listdir(vms)) if os.path.isdir(vms) else [],
            (
                sorted(os.listdir(os.path.join(self.cache, "partial")))
                if os.path.isdir(self.cache)
                else []
            ),
            (
                sorted(os.listdir(os.path.join(self.cache, "images")))
                if os.path.isdir(self.cache)
                else []
            ),
        )

    async def test_second_create_uses_the_cache(self) -> None:
        """
        The first VM downloads the image into the cache and gets a qcow2 overlay on
        it; the second revalidates (304, no body) and the third, with the image's
        checksum in the URL, makes no request at all. A standalone root is a full
        raw copy of the image, made thick.
        """
        await self.prepare()
        url = self.server.url("/images/disk.raw")
        ip = await self.create(ImageURL=url, MinimumFreeBytes=MiB, RoundupPower=20)
        cache = self.cache_of()
        self.assertEqual((cache.misses, cache.hits), (1, 0))
        digest = hashlib.sha256(self.image_data).hexdigest()
        base = os.path.join(self.cache, "images", digest)
        info = self.api.GetVmInfo(ALICE, IpRequest(ip)).VmInfo
        self.assertEqual(info.Volumes[0].Format, VolumeFormat.QCOW2)
        self.assertEqual(info.Volumes[0].VirtualSize, 4 * MiB)
        root = self.root_file(ip)
        self.assertEqual(images.qcow2_backing_file(root), base)
        self.assertLess(os.path.getsize(root), MiB)
        out = subprocess.run(
            ["qemu-img", "compare", "-f", "qcow2", "-F", "raw", root, base],
            capture_output=True,
            text=True,
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        requests = self.server.counts["/images/disk.raw"]
        ip2 = await self.create(ImageURL=url)
        self.assertEqual((cache.misses, cache.hits, cache.revalidations), (1, 1, 1))
        self.assertEqual(self.server.counts["/images/disk.raw"], requests + 1)
        self.assertEqual(images.qcow2_backing_file(self.root_file(ip2)), base)
        ip3 = await self.create(ImageURL=f"{url}#sha256={digest}", StandaloneRootVolume=True)
        self.assertEqual(self.server.counts["/images/disk.raw"], requests + 1)
        self.assertEqual(cache.hits, 2)
        info3 = self.api.GetVmInfo(ALICE, IpRequest(ip3)).VmInfo
        self.assertEqual(info3.Volumes[0].Format, VolumeFormat.RAW)
        root3 = self.root_file(ip3)
        self.assertEqual(os.path.getsize(root3), 4 * MiB)
        with open(root3, "rb") as f:
            self.assertEqual(f.read(len(self.image_data)), self.image_data)
        self.assertEqual(sorted(os.listdir(os.path.join(self.cache, "images"))), [digest])
        self.assertEqual(self.manager.check_invariants(), [])

    async def test_file_images_are_cached(self) -> None:
        """
        A file:// image is copied into the cache once; a changed file is a new
        source; a symlink out of the images directory is refused.
        """
        await self.prepare()
        path = os.path.join(self.root, "images", "local.raw")
        write_raw(path, 2 * MiB, seed=7)
        await self.create(ImageURL="file://" + path)
        await self.create(ImageURL="file://" + path)
        cache = self.cache_of()
        self.assertEqual((cache.misses, cache.hits), (1, 1))
        write_raw(path, 2 * MiB, seed=8)
        os.utime(path, ns=(1, 1))
        before = self.snapshot()
        os.symlink("/etc/passwd", os.path.join(self.root, "images", "escape"))
        e = await self.raises(
            errors.InvalidRequest,
            self.create,
            ImageURL="file://" + os.path.join(self.root, "images", "escape"),
        )
        self.assertIn("outside", str(e))
        e = await self.raises(
            errors.InvalidRequest,
            self.create,
            ImageURL="file://" + os.path.join(self.root, "images", "..", "served", "disk.raw"),
        )
        self.assertIn("outside", str(e))
        self.assertEqual(self.snapshot(), before)
        await self.create(ImageURL="file://" + path)
        self.assertEqual(cache.misses, 2)

    async def test_bad_images_change_nothing(self) -> None:
        """
        A non-image, a truncated download, a qcow2 with a backing file, a wrong
        checksum, a redirect loop, an HTTP error, a stalled server: a clear error,
        and the pool, the VMs, the volume and state directories and the cache are
        as before.
        """
        await self.prepare()
        write_raw(os.path.join(self.root, "base"), MiB)
        qemu_img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            os.path.join(self.root, "base"),
            os.path.join(self.served, "backed.qcow2"),
        )
        url = self.server.url
        cases = [
            (url("/html"), "HTML"),
            (url("/truncated"), "ended after"),
            (url("/images/backed.qcow2"), "backing file"),
            (url("/images/disk.raw") + "#sha256=" + "0" * 64, "checksum mismatch"),
            (url("/loop"), "redirects"),
            (url("/missing"), "HTTP 404"),
            (url("/stalled"), "longer than 5 s"),
        ]
        before = self.snapshot()
        for image_url, words in cases:
            e = await self.raises(errors.InvalidRequest, self.create, ImageURL=image_url)
            self.assertIn(words, str(e), image_url)
            self.assertEqual(self.snapshot(), before, image_url)

    async def test_uploaded_qcow2_with_backing_file_refused(self) -> None:
        """
        Image bytes streamed with the request are probed too.
        """
        await self.prepare()
        write_raw(os.path.join(self.root, "base"), MiB)
        backed = os.path.join(self.root, "backed.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/shadow", backed)
        with open(backed, "rb") as f:
            data = f.read()
        before = self.snapshot()
        stream = UploadStream(len(data))
        reactor.callLater(0, stream.write, data)
        d = self.api.CreateVm(
            ALICE,
            CreateVmRequest(
                VmInfo=VmInfo(MemoryInMiB=64, MilliCPUs=100, SubnetId="net"),
                ImageDataSize=len(data),
            ),
            upload=stream,
        )
        e = await self.assertFailure(d, errors.InvalidRequest)
        self.assertIn("backing file", str(e))
        self.assertEqual(self.snapshot(), before)


class EvictionTests(CachedCreateTests):
    """
    LRU eviction over -objectCacheSize never removes a base a VM uses; the cache
    survives a restart and what a crash left is cleaned up.
    """

    cache_size = 5 * MiB

    async def test_eviction_and_restart(self) -> None:
        await self.prepare()
        for name, seed in (("a.raw", 1), ("b.raw", 2), ("c.raw", 3)):
            write_raw(os.path.join(self.served, name), 3 * MiB, seed)
        a = await self.create(ImageURL=self.server.url("/images/a.raw"))
        await self.create(ImageURL=self.server.url("/images/b.raw"))
        cache = self.cache_of()
        # Over the limit, but both are in use: nothing evicted.
        self.assertEqual(len(cache.entries), 2)
        self.assertEqual(cache.evictions, 0)
        await self.api.DestroyVm(ALICE, AccessRequest(IpAddress=a))
        await self.create(ImageURL=self.server.url("/images/c.raw"))
        self.assertEqual(cache.evictions, 1)
        names = sorted(os.listdir(os.path.join(self.cache, "images")))
        self.assertEqual(len(names), 2)
        with open(os.path.join(self.served, "a.raw"), "rb") as f:
            self.assertNotIn(hashlib.sha256(f.read()).hexdigest(), names)
        # A crash left a partial download and an unindexed file: removed at start;
        # the index survives.
        await self.daemon.stop()
        with open(os.path.join(self.cache, "partial", "0123"), "wb") as f:
            f.write(b"half")
        with open(os.path.join(self.cache, "images", "f" * 64), "wb") as f:
            f.write(b"orphan")
        self.daemon = Daemon(self, self.root, self.host, **self.cache_args())
        self.api, self.manager = self.daemon.api, self.daemon.manager
        await self.daemon.start()
        await self.cache_of().open()
        self.assertEqual(os.listdir(os.path.join(self.cache, "partial")), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.cache, "images"))), names)
        with open(os.path.join(self.cache, "index.json")) as f:
            self.assertEqual(sorted(json.load(f)["Images"]), names)
        self.assertEqual(len(self.cache_of().entries), 2)


class OldRootEvictionTests(CachedCreateTests):
    """
    A base that only a VM's root.old (or a snapshot) uses is not evicted either.
    """

    cache_size = 5 * MiB

    async def test_old_root_keeps_its_base(self) -> None:
        await self.prepare()
        for name, seed in (("a.raw", 1), ("b.raw", 2), ("c.raw", 3)):
            write_raw(os.path.join(self.served, name), 3 * MiB, seed)
        ip = await self.create(ImageURL=self.server.url("/images/a.raw"), DoNotStart=True)
        await self.api.ReplaceVmImage(
            ALICE, ReplaceVmImageRequest(IpAddress=ip, ImageURL=self.server.url("/images/b.raw"))
        )
        self.assertTrue(os.path.exists(self.root_file(ip) + ".old"))
        await self.create(ImageURL=self.server.url("/images/c.raw"))
        cache = self.cache_of()
        self.assertEqual(cache.evictions, 0)
        self.assertEqual(len(cache.entries), 3)
        await self.api.DiscardVmOldImage(ALICE, IpRequest(ip))
        write_raw(os.path.join(self.served, "d.raw"), MiB, 4)
        await self.create(ImageURL=self.server.url("/images/d.raw"))
        self.assertEqual(cache.evictions, 1)
        with open(os.path.join(self.served, "a.raw"), "rb") as f:
            self.assertNotIn(hashlib.sha256(f.read()).hexdigest(), cache.entries)


class RealGuestOverlayTests(TestCase):
    """
    The tiny guest on the real libvirtd with a root that is a qcow2 overlay on an
    image downloaded over HTTP into the cache: QEMU opens the chain.
    """

    timeout = 300

    def setUp(self) -> None:
        support.require_libvirtd()
        self.guest = support.tiny_guest()
        support.ensure_bridge()
        from hypervisor.virt.connection import start_event_loop

        start_event_loop()
        self.root = support.public_tempdir("hv-overlay-")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.served = os.path.join(self.root, "served")
        os.makedirs(self.served)
        qemu_img("create", "-q", "-f", "qcow2", os.path.join(self.served, "root.qcow2"), "64M")
        self.server = ImageServer(self, self.served)
        self.services: list[Any] = []
        self.addCleanup(self.stop_services)

    async def stop_services(self) -> None:
        for service in self.services:
            if service.running:
                await service.stopService()
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        for dom in conn.listAllDomains():
            if dom.name().startswith("vm-10.77.") and dom.isActive():
                dom.destroy()
        conn.close()

    async def test_guest_runs_on_overlay(self) -> None:
        import libvirt as libvirt_module

        from hypervisor.api import HypervisorApi
        from hypervisor.manager.manager import Manager
        from hypervisor.store import StateDirectory
        from hypervisor.virt.connection import LibvirtService
        from tests.test_vms_real import guest_request, setup_network

        libvirt = LibvirtService(support.QEMU_URI, reactor, max_backoff=1.0)
        manager = Manager(
            StateDirectory(os.path.join(self.root, "state")),
            libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[os.path.join(self.root, "volumes")],
            images_directory=self.guest,
            image_cache_directory=os.path.join(self.root, "objectcache"),
            stop_timeout=20,
        )
        manager.privilegedStartService()
        libvirt.startService()
        manager.startService()
        self.services = [manager, libvirt]
        api = HypervisorApi(manager)
        await support.until(lambda: manager.libvirt.connected, 30, "libvirt")
        await setup_network(api)
        ips = []
        for _ in range(2):
            request = guest_request(self.guest, "idle")
            request.VmInfo.ImageURL = self.server.url("/images/root.qcow2")
            response = await api.CreateVm(ROOT, request)
            await api.AcknowledgeVm(ROOT, IpRequest(response.IpAddress))
            ips.append(response.IpAddress)
        self.assertEqual(cache_of(manager).misses, 1)
        conn = libvirt_module.open(support.QEMU_URI)
        try:
            for ip in ips:
                dom = conn.lookupByName(f"vm-{ip}")
                self.assertTrue(dom.isActive())
                xml = dom.XMLDesc()
                self.assertIn("<backingStore type='file'", xml)
                self.assertIn(os.path.join(self.root, "objectcache", "images"), xml)
        finally:
            conn.close()
        for ip in ips:
            await api.DestroyVm(ROOT, AccessRequest(IpAddress=ip))


def cache_of(manager: Any) -> Any:
    return manager.ctx.image_cache
