"""
The access matrix: every RPC method of the service layer called over real TLS on
loopback by every kind of caller, asserting exactly the reference's allow/deny
(§1, §7), and that a denied call changes nothing.

Callers: no certificate; a certificate from a foreign CA; an IdentityCA certificate
(claiming every method, which must not count); CA certificates granting
C{Hypervisor.*}, one admin method, and the glob C{Hypervisor.Change*}; the VM's owner;
a member of its owner group; a stranger.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import libvirt
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.server import Site
from zope.interface import implementer

from hypervisor import certs, codec
from hypervisor.api import ACCESS, ADMIN, METHODS, UNAUTHENTICATED_READS, HypervisorApi
from hypervisor.auth import ROOT, TrustStore
from hypervisor.dhcp.interfaces import Discovery
from hypervisor.dhcp.policy import DhcpPolicy, HostView
from hypervisor.dhcp.protocol import DhcpServer
from hypervisor.dhcp.service import DhcpService
from hypervisor.dispatch import Dispatcher
from hypervisor.manager.manager import Manager
from hypervisor.metrics import Metrics
from hypervisor.model import (
    Address,
    ChangeAddressPoolRequest,
    CreateVmRequest,
    IpRequest,
    Subnet,
    UpdateSubnetsRequest,
    VmInfo,
)
from hypervisor.store import StateDirectory
from hypervisor.testing import FakeHost, SynchronousRunner
from hypervisor.tls import SniffingFactory, server_tls_options
from hypervisor.virt.connection import LibvirtService, start_event_loop
from web.console import routes as console_routes
from web.root import make_root
from web.rpc import RpcEndpoints, request_factory
from web.status import StatusPages

VM_IP = "10.8.0.2"
VM_OWNER_METHODS = {
    "AcknowledgeVm",
    "AddVmVolumes",
    "ChangeVmVolumeSize",
    "DeleteVmVolume",
    "DiscardVmOldImage",
    "DiscardVmSnapshot",
    "ReplaceVmImage",
    "RestoreVmFromSnapshot",
    "RestoreVmImage",
    "SnapshotVm",
    "ReorderVmVolumes",
    "ChangeVmVolumeInterfaces",
    "ChangeVmVolumeStorageIndex",
    "DiscardVmOldUserData",
    "GetVmUserData",
    "ReplaceVmUserData",
    "RestoreVmUserData",
    "BecomePrimaryVmOwner",
    "ChangeVmDestroyProtection",
    "ChangeVmHostname",
    "ChangeVmOwnerGroups",
    "ChangeVmOwnerUsers",
    "ChangeVmSize",
    "ChangeVmTags",
    "DestroyVm",
    "GetVmCreateRequest",
    "RebootVm",
    "StartVm",
    "StopVm",
    "TraceVmMetadata",
    "ChangeVmConsoleType",
    "ConnectToVmConsole",
    "ConnectToVmSerialPort",
    "GetVmAccessToken",
    "DiscardVmAccessToken",
    "ReadVmVolume",
    "ExportLocalVm",
    "CommitImportedVm",
}
# Method power does not count, the caller must own the VM (or hold its token) and
# also hold the power (the reference's PrepareVmForMigration).
POWER_AND_OWNER_METHODS = {"PrepareVmForMigration"}

# A request body for each method: valid, aimed at the fixture VM where it has one.
REQUESTS: dict[str, dict[str, Any]] = {
    "AcknowledgeVm": {"IpAddress": VM_IP},
    "BecomePrimaryVmOwner": {"IpAddress": VM_IP},
    "ChangeAddressPool": {
        "AddressesToAdd": [{"IpAddress": "10.8.0.200", "MacAddress": "52:54:0a:08:00:c8"}]
    },
    "ChangeOwners": {"OwnerUsers": ["someone"]},
    "ChangeVmDestroyProtection": {"IpAddress": VM_IP, "DestroyProtection": False},
    "ChangeVmHostname": {"IpAddress": VM_IP, "Hostname": "renamed"},
    "ChangeVmOwnerGroups": {"IpAddress": VM_IP, "OwnerGroups": ["team", "extra"]},
    "ChangeVmOwnerUsers": {"IpAddress": VM_IP, "OwnerUsers": ["zed"]},
    "ChangeVmSize": {"IpAddress": VM_IP, "MilliCPUs": 20},
    "ChangeVmTags": {"IpAddress": VM_IP, "Tags": {"changed": "yes"}},
    "CreateVm": {"MemoryInMiB": 16, "MilliCPUs": 10, "MinimumFreeBytes": 65536, "SubnetId": "net"},
    "DestroyVm": {"IpAddress": VM_IP},
    "GetCapacity": {},
    "GetUpdates": {},
    "GetVmCreateRequest": {"IpAddress": VM_IP},
    "GetVmInfo": {"IpAddress": VM_IP},
    "GetVmInfos": {},
    "ListSubnets": {},
    "ListVMs": {},
    "NetbootMachine": {
        "Address": {"IpAddress": "10.8.0.240", "MacAddress": "52:54:0a:08:00:f0"},
        "Hostname": "installer",
        "NumAcknowledgementsToWaitFor": 0,
    },
    "RebootVm": {"IpAddress": VM_IP},
    "RegisterExternalLeases": {
        "Addresses": [{"IpAddress": "10.8.0.230", "MacAddress": "52:54:0a:08:00:e6"}],
        "Hostnames": ["printer"],
    },
    "SetDisabledState": {"Disable": False},
    "StartVm": {"IpAddress": VM_IP},
    "StopVm": {"IpAddress": VM_IP},
    "UpdateSubnets": {"Add": [{"Id": "extra", "IpGateway": "10.9.0.1", "IpMask": "255.255.255.0"}]},
    "WatchDhcp": {"MaxPackets": 1},
    "TraceVmMetadata": {"IpAddress": VM_IP},
    "AddVmVolumes": {"IpAddress": VM_IP, "VolumeSizes": [65536]},
    "ChangeVmVolumeSize": {"IpAddress": VM_IP, "VolumeIndex": 0, "VolumeSize": 131072},
    "DeleteVmVolume": {"IpAddress": VM_IP, "VolumeIndex": 1},
    "DiscardVmOldImage": {"IpAddress": VM_IP},
    "DiscardVmSnapshot": {"IpAddress": VM_IP, "Name": "none"},
    "ReplaceVmImage": {"IpAddress": VM_IP, "ImageURL": "file:///nonexistent", "SkipBackup": True},
    "RestoreVmFromSnapshot": {"IpAddress": VM_IP, "Name": "none"},
    "RestoreVmImage": {"IpAddress": VM_IP},
    "SnapshotVm": {"IpAddress": VM_IP, "Name": "m", "ForceIfNotStopped": True},
    "DiscardVmOldUserData": {"IpAddress": VM_IP},
    "GetVmUserData": {"IpAddress": VM_IP},
    "ReplaceVmUserData": {"IpAddress": VM_IP, "Size": 0},
    "RestoreVmUserData": {"IpAddress": VM_IP},
    "ReorderVmVolumes": {"IpAddress": VM_IP, "VolumeIndices": [0]},
    "ChangeVmVolumeInterfaces": {"IpAddress": VM_IP, "Interfaces": ["ide"]},
    "ChangeVmVolumeStorageIndex": {"IpAddress": VM_IP, "StorageIndex": 0, "VolumeIndex": 0},
    "GetVmVolumeStorageConfiguration": {"IpAddress": VM_IP},
    "ListVolumeDirectories": {},
    "ChangeVmConsoleType": {"IpAddress": VM_IP, "ConsoleType": "vnc"},
    "ConnectToVmConsole": {"IpAddress": VM_IP},
    "ConnectToVmManager": {"IpAddress": VM_IP},
    "ConnectToVmSerialPort": {"IpAddress": VM_IP, "PortNumber": 0},
    # Access tokens and migration (hypervisor.migration): MigrateVm of a VM this
    # hypervisor holds is refused (409) before any call; CopyVm's source is malformed
    # (400) so that nothing is dialled.
    "GetVmAccessToken": {"IpAddress": VM_IP, "Lifetime": 60 * 10**9},
    "DiscardVmAccessToken": {"IpAddress": VM_IP},
    "PrepareVmForMigration": {"IpAddress": VM_IP, "Enable": False},
    "ReadVmVolume": {"IpAddress": VM_IP, "Length": 65536, "ChunkSize": 65536},
    "MigrateVm": {"IpAddress": VM_IP, "SourceHypervisor": "127.0.0.1:1"},
    "CopyVm": {"IpAddress": VM_IP, "SourceHypervisor": "nowhere:port"},
    "GetRootCookiePath": {},
    # Local export and import (hypervisor.migration.local): every caller here is on
    # loopback and presents the root cookie (filled in by start()); the fixture VM
    # runs (export: 409) and exists (import: 409); it is committed (commit: 409).
    "ExportLocalVm": {"IpAddress": VM_IP, "VerificationCookie": ""},
    "ImportLocalVm": {
        "VerificationCookie": "",
        "Address": {"IpAddress": VM_IP, "MacAddress": "52:54:0a:08:00:02"},
        "VolumeFilenames": ["/nonexistent/import/1/root"],
    },
    "CommitImportedVm": {"IpAddress": VM_IP},
}


@dataclass
class Caller:
    """
    One kind of caller and what the reference allows it.
    """

    name: str
    cert: Optional[tuple[str, str]]  # (cert path, key path)
    refused: bool = False  # no usable certificate: every method is 401
    presented: bool = True  # a (bad) certificate was presented: never anonymous
    patterns: tuple[str, ...] = ()  # granted methods (only from CA.pem)
    owner: bool = False  # owner user or owner-group member of the fixture VM

    def power(self, method: str) -> bool:
        import fnmatch

        return any(fnmatch.fnmatchcase(f"Hypervisor.{method}", p) for p in self.patterns)

    def expected(self, method: str, unauthenticated_reads: bool = False) -> str:
        if self.refused:
            # Only callers without any certificate get the unauthenticated reads; a
            # certificate that does not verify is refused (Go fails its handshake).
            anonymous_read = (
                unauthenticated_reads and not self.presented and method in UNAUTHENTICATED_READS
            )
            return "allow" if anonymous_read else "401"
        if method in POWER_AND_OWNER_METHODS:
            return "allow" if self.power(method) and self.owner else "403"
        if self.power(method):
            return "allow"
        if ACCESS[method] == ADMIN:
            return "403"
        if method in VM_OWNER_METHODS and not self.owner:
            return "403"
        return "allow"


@implementer(IPolicyForHTTPS)
class ClientPolicy:
    """
    TLS for the test client: trust the test CA, present a certificate (or none).
    """

    def __init__(self, ca_pem: bytes, cert: Optional[tuple[str, str]]) -> None:
        self.trust = ssl.Certificate.loadPEM(ca_pem)
        self.client = None
        if cert is not None:
            with open(cert[0], "rb") as c, open(cert[1], "rb") as k:
                self.client = ssl.PrivateCertificate.loadPEM(c.read() + k.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode(), trustRoot=self.trust, clientCertificate=self.client
        )


class _FirstLine(Protocol):
    """
    Reads until the first newline of a stream, then hangs up.
    """

    def __init__(self, done: "Deferred[bytes]") -> None:
        self.done = done
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\n" in self.data and not self.done.called:
            self.done.callback(self.data.split(b"\n", 1)[0])
            assert self.transport is not None
            self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class AccessMatrixTests(TestCase):
    """
    Every method x every caller, over TLS.
    """

    timeout = 300

    def setUp(self) -> None:
        start_event_loop()
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root)
        self.make_pki()
        self.conn = libvirt.open("test:///default")  # keeps test driver state alive
        self.addCleanup(self.conn.close)

    def make_pki(self) -> None:
        d = self.root
        ca_key, ca = certs.make_ca("test CA")
        id_key, id_ca = certs.make_ca("test identity CA")
        foreign_key, foreign = certs.make_ca("foreign CA")
        for path, cert in (("CA.pem", ca), ("IdentityCA.pem", id_ca)):
            with open(os.path.join(d, path), "wb") as f:
                f.write(certs.cert_pem(cert))
        self.ca_pem = certs.cert_pem(ca)
        key, server = certs.make_certificate(
            ca_key, ca, "localhost", server_names=["localhost", "127.0.0.1"]
        )
        certs.write_pair(os.path.join(d, "server.pem"), os.path.join(d, "server.key"), key, server)

        def user(name: str, issuer: tuple[Any, Any], **kw: Any) -> tuple[str, str]:
            k, c = certs.make_certificate(issuer[0], issuer[1], name, **kw)
            paths = (os.path.join(d, f"{name}.cert"), os.path.join(d, f"{name}.key"))
            certs.write_pair(paths[0], paths[1], k, c)
            return paths

        full, ident = (ca_key, ca), (id_key, id_ca)
        self.callers = [
            Caller("no certificate", None, refused=True, presented=False),
            Caller(
                "foreign CA", user("mallory", (foreign_key, foreign), methods=["*.*"]), refused=True
            ),
            Caller(
                "IdentityCA claiming *.*", user("idonly", ident, methods=["*.*"], groups=["other"])
            ),
            Caller(
                "CA Hypervisor.*",
                user("fleet", full, methods=["Hypervisor.*"]),
                patterns=("Hypervisor.*",),
            ),
            Caller(
                "CA one admin method",
                user("disabler", full, methods=["Hypervisor.SetDisabledState"]),
                patterns=("Hypervisor.SetDisabledState",),
            ),
            Caller(
                "CA glob Hypervisor.Change*",
                user("changer", full, methods=["Hypervisor.Change*"]),
                patterns=("Hypervisor.Change*",),
            ),
            Caller("VM owner", user("alice", full), owner=True),
            Caller("owner group member", user("carol", full, groups=["team"]), owner=True),
            Caller("stranger", user("bob", full, groups=["other"])),
        ]

    async def start(self, unauthenticated_reads: bool = False) -> None:
        d = self.root
        self.libvirt = LibvirtService("test:///default", reactor)
        state = os.path.join(d, f"state-{unauthenticated_reads}")
        self.manager = Manager(
            StateDirectory(state),
            self.libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[os.path.join(d, "volumes")],
            host=FakeHost(cpus=64, memory_mib=1 << 20),
            bridges=lambda: {"br@net": 0},
            stop_timeout=1,
            # VMs that CreateVm makes in the matrix are never acknowledged: their
            # auto-destroy must not change the state in the middle of a later call.
            acknowledge_timeout=3600,
        )
        self.manager.privilegedStartService()
        self.libvirt.startService()
        self.manager.startService()
        self.addCleanup(self.libvirt.stopService)
        self.addCleanup(self.manager.stopService)
        with open(self.manager.state.root_cookie_path, "rb") as f:
            cookie = base64.b64encode(f.read()).decode()
        for method in ("ExportLocalVm", "ImportLocalVm"):
            REQUESTS[method]["VerificationCookie"] = cookie
        # A DHCP server without sockets: its leases and watchers are what the DHCP
        # methods change and read.
        policy = DhcpPolicy(self.manager, reactor)
        self.dhcp = DhcpService(
            DhcpServer(policy),
            reactor,
            runner=SynchronousRunner(),
            discover=lambda bridges_only: Discovery(HostView()),
        )
        self.dhcp.privilegedStartService()
        self.addCleanup(self.dhcp.stopService)
        from hypervisor.metadata.backend import MetadataBackend

        metadata = MetadataBackend(self.manager, reactor, SynchronousRunner())
        api = HypervisorApi(self.manager, self.dhcp, metadata)
        self.api = api
        await api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[Subnet(Id="net", IpGateway="10.8.0.1", IpMask="255.255.255.0")]
            ),
        )
        await api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(
                AddressesToAdd=[
                    Address(f"10.8.0.{i}", f"52:54:0a:08:00:{i:02x}") for i in range(2, 60)
                ]
            ),
        )
        trust = TrustStore.from_files(os.path.join(d, "CA.pem"), os.path.join(d, "IdentityCA.pem"))
        metrics = Metrics()
        dispatcher = Dispatcher(
            api, metrics, reactor, allow_unauthenticated_reads=unauthenticated_reads
        )
        site = Site(
            make_root(
                StatusPages(self.manager, self.libvirt, metrics=metrics),
                RpcEndpoints(),
                console_routes(self.manager, dispatcher, trust),
            )
        )
        site.requestFactory = request_factory(dispatcher, trust)
        tls_options = server_tls_options(
            os.path.join(d, "server.pem"), os.path.join(d, "server.key"), trust
        )
        # Kept for the same matrix over SRPC (tests.test_srpc_access).
        self.dispatcher, self.trust, self.site = dispatcher, trust, site
        self.tls_options = tls_options
        factory = SniffingFactory(site, tls_options, connect=self.connect_hook())
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        while not self.libvirt.connected:
            await deferLater(0.02)

    def connect_hook(self) -> Any:
        """
        The SniffingFactory's first-line hook (None: HTTP and HTTPS only).
        """
        return None

    async def ensure_vm(self) -> None:
        """
        The fixture VM: running, owned by alice, owner group "team".
        """
        vm = self.manager.vms.get(VM_IP)
        if (
            vm is not None
            and vm.info.OwnerUsers[:1] == ["alice"]
            and vm.info.OwnerGroups == ["team"]
        ):
            return
        if vm is not None:
            await self.manager.lifecycle.destroy_vm(ROOT, VM_IP)
        response = await self.api.CreateVm(
            ROOT,
            CreateVmRequest(
                VmInfo=VmInfo(
                    Address=Address(VM_IP),
                    MemoryInMiB=16,
                    MilliCPUs=10,
                    OwnerUsers=["alice"],
                    OwnerGroups=["team"],
                    SubnetId="net",
                ),
                MinimumFreeBytes=65536,
            ),
        )
        await self.api.AcknowledgeVm(ROOT, IpRequest(response.IpAddress))
        vm = self.manager.vms[VM_IP]
        new = self.manager.table.copy(vm)
        new.VmInfo.OwnerUsers = ["alice"]
        await self.manager.table.commit(vm, new)

    def snapshot(self) -> str:
        m = self.manager
        return json.dumps(
            {
                "vms": {ip: codec.to_dict(vm.local) for ip, vm in m.vms.items()},
                "free": [codec.to_dict(a) for a in m.pool.free],
                "registered": [codec.to_dict(a) for a in m.pool.registered],
                "subnets": [codec.to_dict(s) for s in m.subnets.list(sort=True)],
                "disabled": m.disabled,
                "owners": sorted(m.owner_users),
                "external": sorted(self.dhcp.policy.external),
                "netboot": sorted(self.dhcp.policy.netboot),
                "watchers": len(self.dhcp.watchers.streams),
            },
            sort_keys=True,
            default=str,
        )

    def denials(self) -> float:
        """
        The access refusals the dispatcher counted so far (any transport, any layer).
        """
        return sum(
            sample.value
            for family in self.dispatcher.metrics.rpc_denied.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    def _websocket(self, caller: Caller, method: str) -> tuple[int, bytes]:
        """
        A console method over its WebSocket (web.console), in a thread: the HTTP status
        of a refused opening handshake, else 200 and the first answer.
        """
        from hypervisor.cli.client import CertPair, ClientError
        from hypervisor.cli.console import open_websocket

        pair = CertPair(caller.cert[0], caller.cert[1], [], 0.0) if caller.cert else None
        try:
            channel = open_websocket(
                "localhost",
                self.port.getHost().port,
                pair,
                os.path.join(self.root, "CA.pem"),
                f"Hypervisor.{method}",
                json.dumps(REQUESTS[method]).encode(),
            )
        except ClientError as e:
            text = str(e)
            prefix = "the console WebSocket was refused: "
            if text.startswith(prefix):
                return int(text[len(prefix) :].split()[0]), json.dumps({"Error": text}).encode()
            return 200, json.dumps({"Error": text}).encode()
        channel.close()
        return 200, b'{"Error":""}'

    async def call(self, caller: Caller, method: str) -> tuple[int, bytes]:
        if METHODS[method].kind == "raw-stream":
            before = self.denials()
            code, body = await deferToThread(self._websocket, caller, method)
            if code == 200 and self.denials() > before:
                code = 403  # refused by the service layer (not an owner)
            if code == 200 and b"internal error" in body:
                code = 500
            return code, body
        agent = Agent(
            reactor, contextFactory=ClientPolicy(self.ca_pem, caller.cert), pool=self.pool
        )
        url = f"https://localhost:{self.port.getHost().port}/rpc/Hypervisor.{method}"
        import io

        from twisted.web.client import FileBodyProducer

        body = FileBodyProducer(io.BytesIO(json.dumps(REQUESTS[method]).encode()))
        packets = None
        if method == "WatchDhcp":
            # The stream's first line is the first packet received: keep some coming.
            packets = LoopingCall(self.dhcp.watchers.publish, "br0", b"\x01" * 240)
            packets.start(0.02)
        try:
            response = await agent.request(b"POST", url.encode(), Headers(), body)
            if METHODS[method].kind == "update-stream" and response.code == 200:
                done: Deferred[bytes] = Deferred()
                response.deliverBody(_FirstLine(done))
                return response.code, await done
            return response.code, await readBody(response)
        finally:
            if packets is not None:
                packets.stop()

    def verdict(self, outcome: str) -> str:
        """
        What this transport can tell apart: "allow", "401", "403".
        """
        return outcome

    async def run_matrix(self, unauthenticated_reads: bool) -> None:
        await self.start(unauthenticated_reads)
        self.assertEqual(
            sorted(REQUESTS), sorted(METHODS), "every method of the service layer is in the matrix"
        )
        failures = []
        for caller in self.callers:
            for method in sorted(METHODS):
                await self.ensure_vm()
                before = self.snapshot()
                code, body = await self.call(caller, method)
                want = self.verdict(caller.expected(method, unauthenticated_reads))
                got = self.verdict(str(code) if code in (401, 403) else "allow")
                if got != want:
                    failures.append(
                        f"{caller.name} {method}: expected {want}, got " f"{code} {body[:200]!r}"
                    )
                if got != "allow":
                    self.assertIn(b'"Error"', body)
                    if self.snapshot() != before:
                        failures.append(f"{caller.name} {method}: denied but changed " "state")
                elif code >= 500:
                    failures.append(f"{caller.name} {method}: {code} {body[:200]!r}")
        self.assertEqual(failures, [], "\n" + "\n".join(failures))

    async def test_matrix(self) -> None:
        """
        The reference's allow/deny for every method and caller, over TLS.
        """
        await self.run_matrix(unauthenticated_reads=False)

    async def test_matrix_with_unauthenticated_reads(self) -> None:
        """
        With -allowUnauthenticatedReads, callers without a certificate may call exactly
        the six reads; a foreign certificate is still refused.
        """
        await self.run_matrix(unauthenticated_reads=True)


def deferLater(seconds: float) -> "Deferred[None]":
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)
