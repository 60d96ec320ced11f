"""
No disk I/O on the reactor thread in any request path (issue 8, "Done when").

The daemon's request paths run on the real reactor with the real disk thread pool
(L{hypervisor.diskio.ThreadPoolRunner}, the default) and
L{hypervisor.testing.FakeDomains}: every RPC through L{hypervisor.api.HypervisorApi}
and through the HTTP adapter (the site of port 6976 as C{tap/service.py} builds it:
L{web.rpc.request_factory} over a L{hypervisor.dispatch.Dispatcher}, the status
pages of L{web.status}), a guest powering itself off (a libvirt event), and every
status page.

While they run (after start-up, which loads the state directory before the reactor
runs), the file-system functions of C{os}, C{os.path}, C{shutil}, C{builtins.open} and
C{io.open} are wrapped: a call on the reactor's (main) thread whose stack passes
through C{hypervisor/} or C{web/} code is a violation. Calls made for logging (a
C{twisted.logger} or C{twisted.python.log} frame nearer to the call than our code) and
calls of the harness itself (no frame of ours) are not counted. The test fails with
each violation's stack.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import traceback
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from hypervisor import codec
from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT, TrustStore
from hypervisor.dispatch import Dispatcher
from hypervisor.logs import LogBuffer
from hypervisor.manager.manager import Manager
from hypervisor.manager.network import discover_bridges
from hypervisor.metrics import Metrics
from hypervisor.model import (
    AccessRequest,
    Address,
    ChangeAddressPoolRequest,
    ChangeVmDestroyProtectionRequest,
    ChangeVmHostnameRequest,
    ChangeVmOwnerGroupsRequest,
    ChangeVmOwnerUsersRequest,
    ChangeVmSizeRequest,
    ChangeVmTagsRequest,
    CreateVmRequest,
    GetVmInfosRequest,
    IpRequest,
    ListSubnetsRequest,
    ListVMsRequest,
    RebootVmRequest,
    SetDisabledStateRequest,
    StartVmRequest,
    Subnet,
    UpdateSubnetsRequest,
    VmInfo,
)
from hypervisor.store import StateDirectory
from hypervisor.testing import FakeDomains
from hypervisor.upload import UploadStream
from web.channel import HypervisorChannel
from web.root import make_root
from web.rpc import RpcEndpoints, request_factory
from web.status import StatusPages

MiB = 1024 * 1024
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = (os.path.join(REPO, "hypervisor") + os.sep, os.path.join(REPO, "web") + os.sep)
HARNESS = (os.path.join(REPO, "tests") + os.sep, os.path.join(REPO, "hypervisor", "testing.py"))
# Logging, and the reactor's waker (a pipe written by callFromThread): not disk I/O.
LOGGING = (
    os.sep + os.path.join("twisted", "logger") + os.sep,
    os.sep + os.path.join("twisted", "python", "log.py"),
    os.sep + os.path.join("twisted", "internet", "_signals.py"),
)

# (module, attribute) of every file-system function watched.
WATCHED = (
    [
        (os, name)
        for name in (
            "stat",
            "lstat",
            "fstat",
            "statvfs",
            "fstatvfs",
            "fsync",
            "fdatasync",
            "open",
            "read",
            "pread",
            "write",
            "pwrite",
            "listdir",
            "scandir",
            "rename",
            "replace",
            "unlink",
            "remove",
            "rmdir",
            "mkdir",
            "makedirs",
            "access",
            "readlink",
            "posix_fallocate",
            "ftruncate",
            "truncate",
            "copy_file_range",
            "fchmod",
            "chmod",
            "utime",
            "walk",
        )
    ]
    + [
        (posixpath, name)
        for name in (
            "exists",
            "lexists",
            "isfile",
            "isdir",
            "islink",
            "ismount",
            "getsize",
            "getmtime",
            "realpath",
        )
    ]
    + [(shutil, "rmtree"), (shutil, "copyfile"), (builtins, "open"), (io, "open")]
)


class Monitor:
    """
    Wraps the watched functions; records calls on the reactor thread made by our code.

    @ivar violations: (function, stack) of each counted call.
    """

    def __init__(self) -> None:
        self.violations: list[tuple[str, str]] = []
        self.main = threading.main_thread()
        self._saved: list[tuple[Any, str, Any]] = []
        self._inside = threading.local()

    def install(self) -> None:
        """
        Wrap every watched function.
        """
        for module, name in WATCHED:
            original = getattr(module, name, None)
            if original is None:
                continue
            self._saved.append((module, name, original))
            setattr(module, name, self._wrap(f"{module.__name__}.{name}", original))

    def uninstall(self) -> None:
        """
        Put the originals back.
        """
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved = []

    def _wrap(self, label: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def watched(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is self.main and not getattr(
                self._inside, "active", False
            ):
                self._inside.active = True
                try:
                    self._check(label, args)
                finally:
                    self._inside.active = False
            return original(*args, **kwargs)

        return watched

    def _check(self, label: str, args: tuple[Any, ...]) -> None:
        # The nearest frame that is logging, the harness or ours decides.
        frame = sys._getframe(2)
        while frame is not None:
            filename = frame.f_code.co_filename
            if any(part in filename for part in LOGGING) or filename.startswith(HARNESS):
                return
            if filename.startswith(OURS):
                stack = "".join(traceback.format_stack(sys._getframe(2)))
                shown = ", ".join(repr(a)[:80] for a in args[:2])
                self.violations.append((f"{label}({shown})", stack))
                return
            frame = frame.f_back  # type: ignore[assignment]


class StubLibvirt:
    """
    What the pages read of the libvirt service: a connection that is up.
    """

    uri = "test:///default"
    connected = True
    connects = 1
    disconnects = 0

    def describe(self) -> str:
        return "connected to test:///default"


class TlsTransport(StringTransport):
    """
    An in-memory connection that looks like TLS with a verified client certificate
    (the identity L{hypervisor.tls.peer_identity} caches), for RPCs over HTTP.
    """

    def __init__(self) -> None:
        super().__init__()
        self._hypervisor_identity = ROOT

    def getPeerCertificate(self) -> None:
        return None


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """
    Status and body of one HTTP/1.1 response (chunked or not).
    """
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {
        line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
        for line in lines[1:]
        if b":" in line
    }
    if headers.get(b"transfer-encoding") == b"chunked":
        out = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            body = rest[size + 2 :]
        body = out
    return status, body


class ReactorIOTests(TestCase):
    """
    The request paths of a daemon on the real reactor, watched for disk I/O.
    """

    def setUp(self) -> None:
        self.root = tempfile.mkdtemp(prefix="hv-reactor-io-")
        self.addCleanup(shutil.rmtree, self.root, True)
        sysfs = os.path.join(self.root, "sys-class-net")
        os.makedirs(os.path.join(sysfs, "br0", "bridge"))
        os.makedirs(os.path.join(sysfs, "br0", "brif"))
        self.volumes = os.path.join(self.root, "volumes")
        self.images = os.path.join(self.root, "images")
        os.makedirs(self.images)
        with open(os.path.join(self.images, "disk.raw"), "wb") as f:
            f.write(b"\0" * MiB)
        self.log_dir = os.path.join(self.root, "logs")
        os.makedirs(self.log_dir)
        with open(os.path.join(self.log_dir, "hypervisor.log"), "w") as f:
            f.write('{"log_format": "started"}\n')
        self.fake = FakeDomains(reactor)
        self.libvirt = StubLibvirt()
        self.manager = Manager(
            StateDirectory(os.path.join(self.root, "state")),
            self.libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[self.volumes],
            images_directory=self.images,
            bridges=functools.partial(
                discover_bridges, sysfs, os.path.join(self.root, "no-vlan-config")
            ),
            domains=self.fake,
            stop_timeout=5,
            acknowledge_timeout=60,
        )
        self.manager.privilegedStartService()
        self.manager.startService()
        self.addCleanup(self.manager.stopService)
        self.fake.reconnect()
        self.api = HypervisorApi(self.manager)
        metrics = Metrics()
        metrics.watch_manager(self.manager)
        pages = StatusPages(
            self.manager,
            self.libvirt,
            hostname="hv",  # type: ignore
            metrics=metrics,
            logs=LogBuffer(),
            log_dir=self.log_dir,
        )
        dispatcher = Dispatcher(self.api, metrics, reactor)
        self.site = Site(make_root(pages, RpcEndpoints()))
        self.site.requestFactory = request_factory(dispatcher, TrustStore([], []))
        self.site.protocol = HypervisorChannel  # type: ignore[method-assign,assignment]
        self.site.displayTracebacks = False
        self.monitor = Monitor()

    # HTTP, in memory ------------------------------------------------------------------

    async def http(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """
        One request over an in-memory connection to the daemon's site.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert channel is not None
        transport = TlsTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            f"{method} {path} HTTP/1.1\r\nHost: hv\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        for _ in range(1000):
            if transport.disconnecting:
                break
            await deferLater(reactor, 0.01, lambda: None)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(transport.disconnecting, f"{method} {path}: no complete answer")
        return parse_response(transport.value())

    async def rpc(self, method: str, request: Any = None, upload: bytes = b"") -> Any:
        """
        POST /rpc/Hypervisor.<method>; the last JSON line of the answer.
        """
        data = codec.encode(request) if request is not None else b"{}"
        if upload:
            data += b"\n" + upload
        status, body = await self.http("POST", f"/rpc/Hypervisor.{method}", data)
        lines = [line for line in body.splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
        self.assertEqual(status, 200, f"{method}: {body[:300]!r}")
        self.assertFalse(last.get("Error"), f"{method}: {last}")
        return last

    async def page(self, path: str) -> bytes:
        """
        GET a status page; it must answer 200.
        """
        status, body = await self.http("GET", path)
        self.assertEqual(status, 200, f"{path}: {body[:300]!r}")
        return body

    # The paths ---------------------------------------------------------------------------

    async def api_paths(self) -> None:
        """
        Every RPC through the service layer.
        """
        api = self.api
        await api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[Subnet(Id="net", IpGateway="10.7.0.1", IpMask="255.255.255.0")]
            ),
        )
        await api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(
                AddressesToAdd=[
                    Address(f"10.7.0.{i}", f"52:54:0a:07:00:{i:02x}") for i in range(2, 12)
                ]
            ),
        )

        def vm(ip: str) -> VmInfo:
            return VmInfo(
                Address=Address(IpAddress=ip), MemoryInMiB=64, MilliCPUs=100, SubnetId="net"
            )

        # An empty root volume, not started.
        await api.CreateVm(
            ROOT, CreateVmRequest(VmInfo=vm("10.7.0.2"), MinimumFreeBytes=MiB, DoNotStart=True)
        )
        await api.AcknowledgeVm(ROOT, IpRequest("10.7.0.2"))
        await api.StartVm(ROOT, StartVmRequest(IpAddress="10.7.0.2"))
        # Started, with an uploaded image and user data.
        image = b"\1" * MiB
        user_data = b"#cloud-config\n"
        stream = UploadStream(len(image) + len(user_data))
        reactor.callLater(0, stream.write, image[:4096])
        reactor.callLater(0.01, stream.write, image[4096:] + user_data)
        messages: list[Any] = []
        await api.CreateVm(
            ROOT,
            CreateVmRequest(
                VmInfo=vm("10.7.0.3"), ImageDataSize=len(image), UserDataSize=len(user_data)
            ),
            messages.append,
            upload=stream,
        )
        await api.AcknowledgeVm(ROOT, IpRequest("10.7.0.3"))
        # From a local image file.
        await api.CreateVm(
            ROOT,
            CreateVmRequest(
                VmInfo=VmInfo(
                    Address=Address(IpAddress="10.7.0.4"),
                    MemoryInMiB=64,
                    MilliCPUs=100,
                    SubnetId="net",
                    ImageURL=f"file://{self.images}/disk.raw",
                )
            ),
        )
        await api.AcknowledgeVm(ROOT, IpRequest("10.7.0.4"))
        await api.StopVm(ROOT, AccessRequest(IpAddress="10.7.0.2"))
        await api.ChangeVmTags(
            ROOT, ChangeVmTagsRequest(IpAddress="10.7.0.2", Tags={"Name": "two"})
        )
        await api.ChangeVmSize(ROOT, ChangeVmSizeRequest(IpAddress="10.7.0.2", MemoryInMiB=128))
        await api.ChangeVmHostname(
            ROOT, ChangeVmHostnameRequest(IpAddress="10.7.0.3", Hostname="three")
        )
        await api.ChangeVmOwnerUsers(
            ROOT, ChangeVmOwnerUsersRequest(IpAddress="10.7.0.3", OwnerUsers=["bob"])
        )
        await api.ChangeVmOwnerGroups(
            ROOT, ChangeVmOwnerGroupsRequest(IpAddress="10.7.0.3", OwnerGroups=["team"])
        )
        await api.BecomePrimaryVmOwner(ROOT, IpRequest("10.7.0.3"))
        await api.ChangeVmDestroyProtection(
            ROOT, ChangeVmDestroyProtectionRequest(IpAddress="10.7.0.3", DestroyProtection=False)
        )
        await api.RebootVm(ROOT, RebootVmRequest(IpAddress="10.7.0.3"))
        api.GetVmInfo(ROOT, IpRequest("10.7.0.3"))
        api.ListVMs(ROOT, ListVMsRequest())
        api.GetVmInfos(ROOT, GetVmInfosRequest())
        api.GetCapacity(ROOT, None)
        api.ListSubnets(ROOT, ListSubnetsRequest())
        updates = api.GetUpdates(ROOT, None)
        await updates.get()
        updates.close()
        await api.GetVmCreateRequest(ROOT, IpRequest("10.7.0.3"))
        await api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=True))
        await api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=False))
        await api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(AddressesToRemove=[Address("10.7.0.11", "52:54:0a:07:00:0b")]),
        )
        await api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[Subnet(Id="other", IpGateway="10.8.0.1", IpMask="255.255.255.0")]
            ),
        )
        # A guest powers itself off: a libvirt event, recorded on disk.
        self.fake.power_off("vm-10.7.0.4")
        await self.until(lambda: self.manager.vms["10.7.0.4"].info.State.value == "stopped")
        await self.until(self.manager.writer.idle)
        # libvirtd restarts and VM 10.7.0.3's domain is gone: reconciliation starts it.
        self.fake.lose_connection()
        del self.fake.domains["vm-10.7.0.3"]
        self.fake.reconnect()
        await self.until(
            lambda: "vm-10.7.0.3" in self.fake.domains and not self.manager.reconciler.reconciling
        )
        await api.DestroyVm(ROOT, AccessRequest(IpAddress="10.7.0.2"))

    async def http_paths(self) -> None:
        """
        The RPCs through the HTTP adapter, then every status page.
        """
        await self.rpc(
            "CreateVm",
            CreateVmRequest(
                VmInfo=VmInfo(
                    Address=Address(IpAddress="10.7.0.5"),
                    MemoryInMiB=64,
                    MilliCPUs=100,
                    SubnetId="net",
                ),
                MinimumFreeBytes=MiB,
                DoNotStart=True,
            ),
        )
        await self.rpc("AcknowledgeVm", IpRequest("10.7.0.5"))
        image = b"\2" * MiB
        await self.rpc(
            "CreateVm",
            CreateVmRequest(
                VmInfo=VmInfo(
                    Address=Address(IpAddress="10.7.0.6"),
                    MemoryInMiB=64,
                    MilliCPUs=100,
                    SubnetId="net",
                ),
                ImageDataSize=len(image),
            ),
            upload=image,
        )
        await self.rpc("AcknowledgeVm", IpRequest("10.7.0.6"))
        await self.rpc("StartVm", StartVmRequest(IpAddress="10.7.0.5"))
        await self.rpc("StopVm", AccessRequest(IpAddress="10.7.0.5"))
        await self.rpc(
            "ChangeVmTags", ChangeVmTagsRequest(IpAddress="10.7.0.5", Tags={"Name": "five"})
        )
        await self.rpc("ChangeVmSize", ChangeVmSizeRequest(IpAddress="10.7.0.5", MemoryInMiB=96))
        await self.rpc(
            "ChangeVmHostname", ChangeVmHostnameRequest(IpAddress="10.7.0.6", Hostname="six")
        )
        await self.rpc("GetVmInfo", IpRequest("10.7.0.6"))
        await self.rpc("ListVMs", ListVMsRequest())
        await self.rpc("GetVmInfos", GetVmInfosRequest())
        await self.rpc("GetCapacity")
        await self.rpc("ListSubnets", ListSubnetsRequest())
        await self.rpc("GetVmCreateRequest", IpRequest("10.7.0.6"))
        await self.rpc("SetDisabledState", SetDisabledStateRequest(Disable=True))
        await self.rpc("SetDisabledState", SetDisabledStateRequest(Disable=False))
        await self.rpc(
            "ChangeAddressPool",
            ChangeAddressPoolRequest(AddressesToAdd=[Address("10.7.0.12", "52:54:0a:07:00:0c")]),
        )
        await self.rpc("UpdateSubnets", UpdateSubnetsRequest(Delete=["other"]))
        await self.updates_over_http()
        with open(os.path.join(self.manager.vms["10.7.0.6"].directory, "bootlog"), "wb") as f:
            f.write(b"booting\r\n")
        for path in (
            "/",
            "/listVMs",
            "/listVMs?output=json",
            "/listVMs?output=text",
            "/showVM?10.7.0.6",
            "/showVM?10.7.0.5",
            "/showVM?10.7.0.6&output=json",
            "/showVmBootLog?10.7.0.6",
            "/showVmBootLog?10.7.0.5",
            "/listSubnets",
            "/listAvailableAddresses",
            "/listRegisteredAddresses",
            "/listVolumeDirectories",
            "/showVolumeDirectories",
            "/showDhcpStatus",
            "/metrics",
            "/healthz",
            "/logs",
            "/logs/dump",
            "/logs/showLast?1m",
            "/logs/file?hypervisor.log",
            "/rpc",
        ):
            await self.page(path)
        await self.rpc("DestroyVm", AccessRequest(IpAddress="10.7.0.5"))

    async def updates_over_http(self) -> None:
        """
        GetUpdates over HTTP: the first (full) update arrives; then the client leaves.
        """
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        assert channel is not None
        transport = TlsTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /rpc/Hypervisor.GetUpdates HTTP/1.1\r\nHost: hv\r\n"
            b"Content-Length: 2\r\n\r\n{}"
        )
        await self.until(
            lambda: b"\r\n\r\n" in transport.value() and b"HaveVMs" in transport.value()
        )
        channel.connectionLost(Failure(ConnectionDone()))

    async def until(self, predicate: Callable[[], Any], timeout: float = 10) -> None:
        """
        Wait on the reactor until C{predicate()} holds.
        """
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("timed out")

    async def test_request_paths(self) -> None:
        """
        No stat, read, write, fsync, open, listdir, rename or unlink runs on the
        reactor thread from our code while the RPCs (service layer and HTTP), a
        libvirt event and the status pages are served.
        """
        await self.until(lambda: not self.manager.reconciler.reconciling)
        self.monitor.install()
        try:
            await self.api_paths()
            await self.http_paths()
            await self.until(self.manager.writer.idle)
        finally:
            self.monitor.uninstall()
        report = "\n\n".join(f"{call}\n{stack}" for call, stack in self.monitor.violations)
        self.assertEqual(
            len(self.monitor.violations),
            0,
            f"{len(self.monitor.violations)} calls on the reactor thread:" f"\n\n{report}",
        )

    def test_monitor_sees_a_violation(self) -> None:
        """
        The monitor is not blind: a stat made by our code on this thread (the
        reactor's) is recorded, one made on another thread is not.
        """
        from hypervisor.manager import hoststats

        monitor = Monitor()
        monitor.install()
        try:
            hoststats.mount_point(self.root)
            done = threading.Event()

            def elsewhere() -> None:
                hoststats.mount_point(self.root)
                done.set()

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
        finally:
            monitor.uninstall()
        self.assertTrue(done.is_set())
        self.assertTrue(monitor.violations)
        self.assertTrue(all("hoststats.py" in stack for _, stack in monitor.violations))
        self.assertTrue(all("threading.py" not in stack for _, stack in monitor.violations))
