"""
Helpers for the SRPC tests: the capture transcripts (C{tests/data/srpc-transcripts},
a copy of the shared reference's C{srpc-transcripts}; C{$SRPC_TRANSCRIPTS} overrides)
parsed into connections and calls, and an
in-memory SRPC server over the real service layer (a L{Manager} on libvirt's
C{test:///default} driver) with the transcripts' network: subnet C{t}
(10.77.0.0/24), addresses 10.77.0.10-20, VM 10.77.0.10 owned by C{testuser}.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport

from hypervisor import certs
from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT, Identity, TrustStore
from hypervisor.dispatch import Dispatcher
from hypervisor.manager.manager import Manager
from hypervisor.metrics import Metrics
from hypervisor.model import (
    Address,
    ChangeAddressPoolRequest,
    CreateVmRequest,
    IpRequest,
    ReplaceVmUserDataRequest,
    Subnet,
    UpdateSubnetsRequest,
    VmInfo,
)
from hypervisor.srpc.protocol import SrpcFactory, SrpcServer
from hypervisor.store import StateDirectory
from hypervisor.testing import FakeHost
from hypervisor.tls import server_tls_options
from hypervisor.upload import UploadStream
from hypervisor.virt.connection import LibvirtService, start_event_loop

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = "/work/shared/reference/srpc-transcripts"
LOCAL = os.path.join(HERE, "data", "srpc-transcripts")
VM_IP = "10.77.0.10"
USER_DATA = b"#cloud-config\nhostname: demo-vm\n" + bytes(range(256)) * 20
"""The fixture VM's user data (over 512 bytes: past Go's JSON read-ahead)."""
RAW = re.compile(r"^<(\d+) raw bytes, sha256 ([0-9a-f]+)>")
HANDSHAKE = re.compile(
    r"client cert CN=([^,]*), groups\(OID [0-9.]+\)=(\[[^\]]*\]), "
    r"permitted methods\(OID [0-9.]+\)=(\[[^\]]*\])"
)


def transcripts_dir() -> str:
    """
    Where the transcripts are: C{$SRPC_TRANSCRIPTS}, the copy in the tests, or the
    shared reference.
    """
    for candidate in (os.environ.get("SRPC_TRANSCRIPTS", ""), LOCAL, SHARED):
        if candidate and os.path.isdir(candidate):
            return candidate
    return LOCAL


@dataclass
class Unit:
    """
    One C: or S: line: who, the bytes (raw bodies as zero bytes of their length),
    and the annotation after C{#}.
    """

    side: str
    data: bytes
    note: str
    raw: bool = False


@dataclass
class Connection:
    """
    One TCP connection of a step.
    """

    name: str
    units: list[Unit] = field(default_factory=list)
    identity: Optional[Identity] = None


@dataclass
class Step:
    """
    One step of a transcript: its title, the fake's configuration, its connections.
    """

    file: str
    title: str
    configured: str = ""
    connections: dict[str, Connection] = field(default_factory=dict)

    @property
    def faulty(self) -> bool:
        """
        Whether the fake was configured to answer wrongly (its answers are then not
        normative).
        """
        return "default" not in self.configured and "separate write" not in self.configured


def _split_note(text: str) -> tuple[str, str]:
    # The bytes literal ends where "  # c<N> +" starts (literals may contain '#').
    m = re.search(r"  # (c\d+) \+[0-9.]+s ?(.*)$", text)
    if m is None:
        raise ValueError(f"no connection note in {text[:80]!r}")
    return text[: m.start()], m.group(1) + " " + m.group(2)


def parse(path: str) -> list[Step]:
    """
    The steps of one transcript file.
    """
    steps: list[Step] = []
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("## Step"):
                steps.append(Step(name, line[3:]))
                continue
            if not steps:
                continue
            step = steps[-1]
            if line.startswith("-- fake hypervisor configured:"):
                step.configured = line.split(":", 1)[1].strip()
            elif line.startswith("-- TLS handshake done"):
                m = HANDSHAKE.search(line)
                which = re.search(r"# (c\d+) \+", line)
                if m and which and which.group(1) in step.connections:
                    step.connections[which.group(1)].identity = Identity(
                        username=m.group(1),
                        groups=frozenset(ast.literal_eval(m.group(2))),
                        method_patterns=tuple(ast.literal_eval(m.group(3))),
                        full_authority=True,
                    )
            elif line.startswith(("C: ", "S: ")):
                literal, note = _split_note(line[3:])
                conn_name = note.split(" ", 1)[0]
                conn = step.connections.setdefault(conn_name, Connection(conn_name))
                m = RAW.match(literal)
                joined = re.match(r"^(b'.*'|b\".*\") \+ <(\d+) raw bytes", literal)
                if m:
                    unit = Unit(line[0], b"\0" * int(m.group(1)), note, raw=True)
                elif joined:  # JSON and a raw body in one write (03 step 10)
                    data = ast.literal_eval(joined.group(1)) + b"\0" * int(joined.group(2))
                    unit = Unit(line[0], data, note, raw=True)
                else:
                    unit = Unit(line[0], ast.literal_eval(literal), note)
                conn.units.append(unit)
    return steps


def all_steps() -> list[Step]:
    """
    Every step of every transcript, in file order.
    """
    directory = transcripts_dir()
    steps = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".txt"):
            steps.extend(parse(os.path.join(directory, name)))
    return steps


class Backend:
    """
    The service layer on libvirt's test driver, a dispatcher and an SRPC factory
    (with a real server certificate, so that the TLS endpoint starts TLS).
    """

    def __init__(self, testcase: Any, unauthenticated_reads: bool = False) -> None:
        start_event_loop()
        self.testcase = testcase
        self.root = tempfile.mkdtemp(prefix="srpc13-")
        testcase.addCleanup(shutil.rmtree, self.root, True)
        ca_key, ca = certs.make_ca("srpc test CA")
        with open(os.path.join(self.root, "CA.pem"), "wb") as f:
            f.write(certs.cert_pem(ca))
        key, server = certs.make_certificate(ca_key, ca, "localhost", server_names=["localhost"])
        self.server_pem = os.path.join(self.root, "server.pem")
        self.server_key = os.path.join(self.root, "server.key")
        certs.write_pair(self.server_pem, self.server_key, key, server)
        self.ca = (ca_key, ca)
        self.unauthenticated_reads = unauthenticated_reads

    async def start(self, dhcp: bool = False) -> None:
        """
        Start the manager and set up the transcripts' network and VM; with C{dhcp},
        a DHCP service without sockets too (its leases are what the DHCP methods
        change).
        """
        import libvirt

        self.conn = libvirt.open("test:///default")
        self.testcase.addCleanup(self.conn.close)
        self.libvirt = LibvirtService("test:///default", reactor)
        self.manager = Manager(
            StateDirectory(os.path.join(self.root, "state")),
            self.libvirt,
            reactor,
            domain_type="qemu",
            volume_directories=[os.path.join(self.root, "volumes")],
            host=FakeHost(cpus=64, memory_mib=1 << 20),
            bridges=lambda: {"br@t": 0, "br@test-net": 0},
            stop_timeout=1,
        )
        self.manager.privilegedStartService()
        self.libvirt.startService()
        self.manager.startService()
        self.testcase.addCleanup(self.libvirt.stopService)
        self.testcase.addCleanup(self.manager.stopService)
        self.dhcp = None
        if dhcp:
            from hypervisor.dhcp.interfaces import Discovery
            from hypervisor.dhcp.policy import DhcpPolicy, HostView
            from hypervisor.dhcp.protocol import DhcpServer
            from hypervisor.dhcp.service import DhcpService
            from hypervisor.testing import SynchronousRunner

            self.dhcp = DhcpService(
                DhcpServer(DhcpPolicy(self.manager, reactor)),
                reactor,
                runner=SynchronousRunner(),
                discover=lambda bridges_only: Discovery(HostView()),
            )
            self.dhcp.privilegedStartService()
            self.testcase.addCleanup(self.dhcp.stopService)
        self.api = HypervisorApi(self.manager, self.dhcp)
        await self.api.UpdateSubnets(
            ROOT,
            UpdateSubnetsRequest(
                Add=[Subnet(Id="t", IpGateway="10.77.0.1", IpMask="255.255.255.0")]
            ),
        )
        await self.api.ChangeAddressPool(
            ROOT,
            ChangeAddressPoolRequest(
                AddressesToAdd=[
                    Address(f"10.77.0.{i}", f"52:54:0a:4d:00:{i:02x}") for i in range(10, 21)
                ]
            ),
        )
        self.metrics = Metrics()
        self.dispatcher = Dispatcher(
            self.api,
            self.metrics,
            reactor,
            allow_unauthenticated_reads=self.unauthenticated_reads,
        )
        self.trust = TrustStore.from_files(os.path.join(self.root, "CA.pem"), "")
        self.tls_options = server_tls_options(self.server_pem, self.server_key, self.trust)
        self.factory = SrpcFactory(self.dispatcher, self.trust, self.tls_options, reactor)
        while not self.libvirt.connected:
            await sleep(0.02)

    async def ensure_vm(self) -> None:
        """
        VM 10.77.0.10, stopped, owned by testuser (made again if a step destroyed it).
        """
        vm = self.manager.vms.get(VM_IP)
        if vm is not None:
            return
        response = await self.api.CreateVm(
            ROOT,
            CreateVmRequest(
                VmInfo=VmInfo(
                    Address=Address(VM_IP),
                    MemoryInMiB=16,
                    MilliCPUs=10,
                    OwnerUsers=["testuser"],
                    SubnetId="t",
                    Hostname="demo-vm",
                    Tags={"Name": "demo-vm"},
                ),
                MinimumFreeBytes=65536,
                DoNotStart=True,
            ),
        )
        await self.api.AcknowledgeVm(ROOT, IpRequest(response.IpAddress))
        upload = UploadStream(len(USER_DATA))
        upload.write(USER_DATA)
        reply = await self.api.ReplaceVmUserData(
            ROOT, ReplaceVmUserDataRequest(IpAddress=VM_IP, Size=len(USER_DATA)), upload=upload
        )
        assert not reply.Error, reply
        # The creator (root) became the primary owner: make testuser the only one.
        vm = self.manager.vms[VM_IP]
        new = self.manager.table.copy(vm)
        new.VmInfo.OwnerUsers = ["testuser"]
        await self.manager.table.commit(vm, new)

    def server(
        self, identity: Optional[Identity] = None, connect: bool = False
    ) -> tuple[SrpcServer, StringTransport]:
        """
        An SRPC server on a string transport: reading a CONNECT head, or (inside TLS)
        taking calls as C{identity}.
        """
        if connect:
            proto = self.factory.buildProtocol(None)
        else:
            proto = SrpcServer(self.factory, None, stage="calls", in_tls=True)
            proto.identity = identity
            proto.secure = True
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport


def sleep(seconds: float) -> "Deferred[None]":
    """
    Let the reactor run for C{seconds}.
    """
    return deferLater(reactor, seconds, lambda: None)


async def output_until(transport: StringTransport, done: Any, timeout: float = 20.0) -> bytes:
    """
    The transport's output once C{done(output)} holds (the reactor runs meanwhile);
    whatever there is after C{timeout} seconds.
    """
    waited = 0.0
    while not done(transport.value()) and waited < timeout:
        await sleep(0.01)
        waited += 0.01
    return transport.value()
