"""
The metadata server's tree in memory: a real manager on a C{Clock} (two VMs on subnet
C{net}), the metadata site driven over a C{StringTransport} HTTP connection from each
VM's address. Every path family and listing, 404s, user data absent and present,
identity files, the IMDSv2 token flow, two VMs isolated, bounded bodies, metrics and
traces
(TraceVmMetadata through the service layer).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import codec
from hypervisor.api import HypervisorApi
from hypervisor.auth import ROOT
from hypervisor.errors import AccessDenied, NotFound, Unavailable
from hypervisor.metadata import paths
from hypervisor.metadata.backend import MetadataBackend, Trace
from hypervisor.metadata.resource import MetadataMetrics, make_site
from hypervisor.metadata.trace import (
    NOT_KEEPING_UP,
    VM_DESTROYED,
    TraceVmMetadataResponse,
    subscribe,
)
from hypervisor.model import (
    AccessRequest,
    Address,
    ChangeAddressPoolRequest,
    IpRequest,
    Subnet,
)
from tests.test_manager_clock import ALICE, BOB, ClockDaemon, fired

KEY_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa a@x"
KEY_B = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb b@x"


class Reply:
    """
    A parsed HTTP response.
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1]) if lines and lines[0] else 0
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def text(self) -> str:
        return self.body.decode()


class World:
    """
    A manager with two VMs and the metadata site.
    """

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.daemon = ClockDaemon(testcase).start().network()
        self.manager = self.daemon.manager
        self.clock = self.daemon.clock
        self.a = self.daemon.create(
            Hostname="alpha", Tags={"Name": "Alpha VM", paths.PUBLIC_KEYS_TAG: KEY_A}
        )
        self.b = self.daemon.create(Hostname="beta", Tags={paths.PUBLIC_KEYS_TAG: KEY_B})
        self.backend = MetadataBackend(
            self.manager,
            self.clock,
            self.daemon.runner,
            hypervisor_uuid=lambda: self.manager.state.uuid,
        )
        self.backend.start()
        testcase.addCleanup(self.backend.stop)
        self.metrics = MetadataMetrics()
        self.site = make_site(self.backend, None, self.metrics, self.clock)

    def request(
        self,
        source: str,
        path: str,
        method: str = "GET",
        headers: Optional[dict[str, str]] = None,
        body: bytes = b"",
    ) -> Reply:
        transport = StringTransport(peerAddress=IPv4Address("TCP", source, 40000))
        protocol = self.site.buildProtocol(IPv4Address("TCP", source, 40000))
        assert protocol is not None
        protocol.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: 169.254.169.254", "Connection: close"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body:
            lines.append(f"Content-Length: {len(body)}")
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.clock.advance(0)
        reply = Reply(transport.value())
        protocol.connectionLost(None)
        return reply

    def get(self, source: str, path: str, **kw: object) -> Reply:
        return self.request(source, path, **kw)  # type: ignore[arg-type]

    def write_file(self, ip: str, name: str, data: bytes) -> None:
        directory = os.path.dirname(self.manager.user_data_path(ip))
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)


class SmallStackTests(SynchronousTestCase):
    """
    SmallStack's own paths (reference §6).
    """

    def setUp(self) -> None:
        self.w = World(self)

    def test_fixed_paths(self) -> None:
        """
        C{/datasource/SmallStack} and C{/latest/is-externally-patchable} say true.
        """
        self.assertEqual(self.w.get(self.w.a, "/datasource/SmallStack").text, "true\n")
        self.assertEqual(self.w.get(self.w.a, "/latest/is-externally-patchable").text, "true\n")

    def test_epoch_time(self) -> None:
        """
        C{epoch-time} is the clock's time with nine digits of nanoseconds.
        """
        self.w.clock.advance(0.25)
        now = self.w.clock.seconds()
        text = self.w.get(self.w.a, "/latest/dynamic/epoch-time").text
        seconds, _, nanos = text.strip().partition(".")
        self.assertEqual(len(nanos), 9)
        self.assertAlmostEqual(int(seconds) + int(nanos) / 1e9, now, places=6)

    def test_document_is_vminfo(self) -> None:
        """
        The instance identity document is the VM's VmInfo in Go's 4-space JSON.
        """
        reply = self.w.get(self.w.a, "/latest/dynamic/instance-identity/document")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, codec.encode(self.w.manager.get_vm_info(self.w.a), indent=4))
        self.assertEqual(json.loads(reply.body)["Hostname"], "alpha")

    def test_user_data(self) -> None:
        """
        C{/latest/user-data} is 404 without user data, the raw bytes with it.
        """
        self.assertEqual(self.w.get(self.w.a, "/latest/user-data").status, 404)
        self.w.write_file(self.w.a, "user-data.raw", b"#!/bin/sh\necho \xff\n")
        reply = self.w.get(self.w.a, "/latest/user-data")
        self.assertEqual((reply.status, reply.body), (200, b"#!/bin/sh\necho \xff\n"))

    def test_identity_files(self) -> None:
        """
        The identity paths serve the VM's identity files, 404 while absent.
        """
        base = "/latest/dynamic/instance-identity/"
        self.assertEqual(self.w.get(self.w.a, base + "X.509-certificate").status, 404)
        self.w.write_file(self.w.a, "identity.cert", b"CERT")
        self.w.write_file(self.w.a, "identity.key", b"KEY")
        self.assertEqual(self.w.get(self.w.a, base + "X.509-certificate").body, b"CERT")
        self.assertEqual(self.w.get(self.w.a, base + "RSA-X.509-key").body, b"KEY")
        self.assertEqual(self.w.get(self.w.a, base + "Ed25519-SSH-key").status, 404)

    def test_listings(self) -> None:
        """
        Every prefix lists its next components (directories with a slash); C{/*} lists
        every path; unknown paths are 404.
        """
        listing = self.w.get(self.w.a, "/latest/dynamic/instance-identity/").text.split()
        self.assertEqual(listing, sorted(listing))
        self.assertIn("document", listing)
        self.assertIn("X.509-certificate", listing)
        latest = self.w.get(self.w.a, "/latest").text.split()
        self.assertEqual(
            latest,
            ["dynamic/", "is-externally-patchable", "meta-data/", "user-data"],
        )
        everything = self.w.get(self.w.a, "/*").text.split()
        self.assertIn("/datasource/SmallStack", everything)
        self.assertIn("/openstack/latest/meta_data.json", everything)
        _, tree = self.w.backend.tree(self.w.manager.get_vm_info(self.w.a))
        for path in everything:
            if not tree.leaves[path[1:]].files:  # files: absent here, so 404
                self.assertEqual(self.w.get(self.w.a, path).status, 200, path)
        self.assertEqual(self.w.get(self.w.a, "/latest/nothing").status, 404)
        self.assertEqual(self.w.get(self.w.a, "/datasource/SmallStack/").status, 404)


class Ec2Tests(SynchronousTestCase):
    """
    EC2's meta-data tree and IMDSv2.
    """

    def setUp(self) -> None:
        self.w = World(self)

    def test_meta_data(self) -> None:
        """
        The keys cloud-init reads, for both versions.
        """
        info = self.w.manager.get_vm_info(self.w.a)
        mac = info.Address.MacAddress
        for version in ("latest", "2009-04-04"):
            base = f"/{version}/meta-data/"
            self.assertEqual(self.w.get(self.w.a, base + "local-ipv4").text, self.w.a)
            self.assertEqual(self.w.get(self.w.a, base + "hostname").text, "alpha")
            self.assertEqual(self.w.get(self.w.a, base + "local-hostname").text, "alpha")
            self.assertEqual(self.w.get(self.w.a, base + "mac").text, mac)
            self.assertEqual(
                self.w.get(self.w.a, base + "placement/availability-zone").text, "smallstack"
            )
            self.assertEqual(self.w.get(self.w.a, base + "instance-type").text, "1vcpu-64mib")
            macs = base + f"network/interfaces/macs/{mac}/"
            self.assertEqual(self.w.get(self.w.a, macs + "local-ipv4s").text, self.w.a)
            self.assertEqual(
                self.w.get(self.w.a, macs + "subnet-ipv4-cidr-block").text, "10.5.0.0/24"
            )
            self.assertEqual(self.w.get(self.w.a, macs + "device-number").text, "0")
        top = self.w.get(self.w.a, "/latest/meta-data/").text.split()
        self.assertIn("public-keys/", top)
        self.assertIn("placement/", top)
        self.assertIn("instance-id", top)
        root = self.w.get(self.w.a, "/").text.split()
        self.assertIn("2009-04-04", root)
        self.assertIn("latest", root)

    def test_instance_id_stable_and_distinct(self) -> None:
        """
        The instance id is the same on every request, different per VM, and equal to
        OpenStack's uuid.
        """
        a1 = self.w.get(self.w.a, "/latest/meta-data/instance-id").text
        a2 = self.w.get(self.w.a, "/2009-04-04/meta-data/instance-id").text
        b = self.w.get(self.w.b, "/latest/meta-data/instance-id").text
        self.assertEqual(a1, a2)
        self.assertNotEqual(a1, b)
        meta = json.loads(self.w.get(self.w.a, "/openstack/latest/meta_data.json").body)
        self.assertEqual(meta["uuid"], a1)

    def test_public_keys(self) -> None:
        """
        C{public-keys/} lists C{0=key-0}; C{0/} lists C{openssh-key}; that is the tag's key.
        """
        base = "/latest/meta-data/public-keys/"
        self.assertEqual(self.w.get(self.w.a, base).text, "0=key-0\n")
        self.assertEqual(self.w.get(self.w.a, base + "0/").text, "openssh-key\n")
        self.assertEqual(self.w.get(self.w.a, base + "0/openssh-key").text, KEY_A)
        self.assertEqual(self.w.get(self.w.b, base + "0/openssh-key").text, KEY_B)

    def test_user_data_404_when_none(self) -> None:
        """
        EC2's user-data is 404 without user data (cloud-init: "no user data").
        """
        self.assertEqual(self.w.get(self.w.a, "/latest/user-data").status, 404)
        self.w.write_file(self.w.a, "user-data.raw", b"#cloud-config\n")
        self.assertEqual(self.w.get(self.w.a, "/2009-04-04/user-data").body, b"#cloud-config\n")

    def test_imdsv2_token_flow(self) -> None:
        """
        PUT /latest/api/token gives a token; a GET with it is served; a wrong token,
        another VM's token or an expired token is 401; a GET without a token still
        works (IMDSv1); a bad TTL is 400; a forwarded PUT is 403.
        """
        put = self.w.request(
            self.w.a,
            "/latest/api/token",
            "PUT",
            {"X-aws-ec2-metadata-token-ttl-seconds": "60"},
        )
        self.assertEqual(put.status, 200)
        token = put.text
        self.assertGreater(len(token), 20)
        ok = self.w.get(
            self.w.a, "/latest/meta-data/hostname", headers={"X-aws-ec2-metadata-token": token}
        )
        self.assertEqual((ok.status, ok.text), (200, "alpha"))
        other = self.w.get(
            self.w.b, "/latest/meta-data/hostname", headers={"X-aws-ec2-metadata-token": token}
        )
        self.assertEqual(other.status, 401)
        wrong = self.w.get(
            self.w.a, "/latest/meta-data/hostname", headers={"X-aws-ec2-metadata-token": "x"}
        )
        self.assertEqual(wrong.status, 401)
        self.assertEqual(self.w.get(self.w.a, "/latest/meta-data/hostname").status, 200)
        self.w.clock.advance(61)
        expired = self.w.get(
            self.w.a, "/latest/meta-data/hostname", headers={"X-aws-ec2-metadata-token": token}
        )
        self.assertEqual(expired.status, 401)
        for ttl in ("0", "21601", "abc"):
            bad = self.w.request(
                self.w.a,
                "/latest/api/token",
                "PUT",
                {"X-aws-ec2-metadata-token-ttl-seconds": ttl},
            )
            self.assertEqual(bad.status, 400, ttl)
        forwarded = self.w.request(
            self.w.a,
            "/latest/api/token",
            "PUT",
            {"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "1.2.3.4"},
        )
        self.assertEqual(forwarded.status, 403)


class OpenStackTests(SynchronousTestCase):
    """
    Nova's /openstack tree.
    """

    def setUp(self) -> None:
        self.w = World(self)

    def test_versions_and_listing(self) -> None:
        """
        C{/openstack} lists the dated versions and latest, bare; a version lists its
        files.
        """
        versions = self.w.get(self.w.a, "/openstack").text.split()
        self.assertEqual(versions, sorted(paths.OPENSTACK_VERSIONS))
        files = self.w.get(self.w.a, "/openstack/2018-08-27/").text.split()
        self.assertEqual(
            files,
            [
                "meta_data.json",
                "network_data.json",
                "user_data",
                "vendor_data.json",
                "vendor_data2.json",
            ],
        )

    def test_meta_data(self) -> None:
        """
        meta_data.json has uuid, hostname, name, keys, zone and the tags as meta.
        """
        reply = self.w.get(self.w.a, "/openstack/2018-08-27/meta_data.json")
        self.assertEqual(reply.headers[b"content-type"], b"application/json")
        meta = json.loads(reply.body)
        self.assertEqual(meta["hostname"], "alpha")
        self.assertEqual(meta["name"], "Alpha VM")
        self.assertEqual(meta["availability_zone"], "smallstack")
        self.assertEqual(meta["public_keys"], {"key-0": KEY_A})
        self.assertEqual(meta["meta"]["Name"], "Alpha VM")
        self.assertTrue(meta["uuid"])

    def test_network_data(self) -> None:
        """
        network_data.json: the VM's MAC, static address, default route, DNS.
        """
        info = self.w.manager.get_vm_info(self.w.a)
        data = json.loads(self.w.get(self.w.a, "/openstack/latest/network_data.json").body)
        self.assertEqual(data["links"][0]["ethernet_mac_address"], info.Address.MacAddress)
        network = data["networks"][0]
        self.assertEqual(network["ip_address"], self.w.a)
        self.assertEqual(network["netmask"], "255.255.255.0")
        self.assertEqual(network["routes"][0]["gateway"], "10.5.0.1")
        self.assertEqual(data["services"], [{"type": "dns", "address": "10.5.0.1"}])

    def test_user_and_vendor_data(self) -> None:
        """
        user_data is 404 without user data and raw with it; vendor data is {}.
        """
        self.assertEqual(self.w.get(self.w.a, "/openstack/latest/user_data").status, 404)
        self.w.write_file(self.w.a, "user-data.raw", b"#cloud-config\nruncmd: []\n")
        self.assertEqual(
            self.w.get(self.w.a, "/openstack/latest/user_data").body,
            b"#cloud-config\nruncmd: []\n",
        )
        for name in ("vendor_data.json", "vendor_data2.json"):
            self.assertEqual(json.loads(self.w.get(self.w.a, f"/openstack/latest/{name}").body), {})


class NoCloudTests(SynchronousTestCase):
    """
    NoCloud's seed over HTTP.
    """

    def setUp(self) -> None:
        self.w = World(self)

    def test_seed(self) -> None:
        """
        meta-data has the instance id and host name; user-data is empty without user
        data; network-config is version 1 with the VM's MAC and address.
        """
        # What we serve is JSON, which is YAML (cloud-init reads it with yaml).
        meta = json.loads(self.w.get(self.w.b, "/nocloud/meta-data").body)
        self.assertEqual(meta["local-hostname"], "beta")
        self.assertEqual(
            meta["instance-id"], self.w.get(self.w.b, "/latest/meta-data/instance-id").text
        )
        self.assertEqual(self.w.get(self.w.b, "/nocloud/user-data").body, b"")
        self.w.write_file(self.w.b, "user-data.raw", b"#cloud-config\n")
        self.assertEqual(self.w.get(self.w.b, "/nocloud/user-data").body, b"#cloud-config\n")
        config = json.loads(self.w.get(self.w.b, "/nocloud/network-config").body)
        info = self.w.manager.get_vm_info(self.w.b)
        self.assertEqual(config["version"], 1)
        self.assertEqual(config["config"][0]["mac_address"], info.Address.MacAddress)
        self.assertEqual(config["config"][0]["subnets"][0]["address"], self.w.b)
        self.assertEqual(self.w.get(self.w.b, "/nocloud/vendor-data").status, 200)


class IsolationTests(SynchronousTestCase):
    """
    Identity by source address; bounded input; metrics; traces.
    """

    def setUp(self) -> None:
        self.w = World(self)

    def test_each_vm_sees_its_own(self) -> None:
        """
        The same path answers each VM's own data; user data of one is not the other's.
        """
        self.w.write_file(self.w.a, "user-data.raw", b"A's secret")
        self.assertEqual(self.w.get(self.w.a, "/latest/meta-data/hostname").text, "alpha")
        self.assertEqual(self.w.get(self.w.b, "/latest/meta-data/hostname").text, "beta")
        self.assertEqual(self.w.get(self.w.a, "/latest/user-data").body, b"A's secret")
        self.assertEqual(self.w.get(self.w.b, "/latest/user-data").status, 404)

    def test_unknown_source_404(self) -> None:
        """
        A source that is no VM's address gets 404 everywhere, listings included.
        """
        for path in ("/", "/latest/meta-data/", "/openstack", "/datasource/SmallStack"):
            self.assertEqual(self.w.get("10.5.0.99", path).status, 404, path)
        self.assertEqual(self.w.get("not-an-ip", "/").status, 404)

    def test_bridge_check(self) -> None:
        """
        With the subnet mapped to another bridge, the VM's address is unknown on this
        one; subnets with DisableMetadata are not served.
        """
        self.w.backend.bridge_of_subnet = {"net": "br0"}
        site = make_site(self.w.backend, "br0", None, self.w.clock)
        self.w.site = site
        self.assertEqual(self.w.get(self.w.a, "/latest/meta-data/hostname").status, 200)
        self.w.site = make_site(self.w.backend, "br1", None, self.w.clock)
        self.assertEqual(self.w.get(self.w.a, "/latest/meta-data/hostname").status, 404)
        self.w.site = site
        self.w.manager.subnets.subnets["net"] = Subnet(
            Id="net",
            IpGateway="10.5.0.1",
            IpMask="255.255.255.0",
            DisableMetadata=True,
        )
        self.w.backend.subnets_changed([])
        self.assertEqual(self.w.get(self.w.a, "/latest/meta-data/hostname").status, 404)

    def test_methods_and_bodies(self) -> None:
        """
        POST is 405; a body over the bound is refused with 413 before it is read.
        """
        self.assertEqual(self.w.request(self.w.a, "/", "POST", body=b"x").status, 405)
        self.assertEqual(self.w.request(self.w.a, "/latest/user-data", "PUT").status, 405)
        big = self.w.request(self.w.a, "/", "POST", body=b"x" * 5000)
        self.assertEqual(big.status, 413)

    def test_metrics_and_trace(self) -> None:
        """
        Requests are counted by family and status; a trace gets the VM's paths only.
        """
        seen: list[str] = []
        closed: list[bool] = []
        self.w.backend.trace(self.w.a, Trace(seen.append, lambda: closed.append(True)))
        self.w.get(self.w.a, "/openstack/latest/meta_data.json")
        self.w.get(self.w.a, "/nothing")
        self.w.get(self.w.b, "/latest/meta-data/")
        self.assertEqual(seen, ["/openstack/latest/meta_data.json", "/nothing"])
        registry = self.w.metrics.registry
        value = registry.get_sample_value(
            "hypervisor_metadata_requests_total", {"family": "openstack", "status": "200"}
        )
        self.assertEqual(value, 1.0)
        self.assertEqual(
            registry.get_sample_value(
                "hypervisor_metadata_requests_total", {"family": "other", "status": "404"}
            ),
            1.0,
        )
        self.w.manager.table.listeners  # the backend listens
        self.w.backend.vm_removed(self.w.a, self.w.manager.get_vm_info(self.w.a))
        self.assertEqual(closed, [True])

    def test_tree_follows_changes(self) -> None:
        """
        A changed VM (host name) is served changed: the kept tree is dropped.
        """
        self.assertEqual(self.w.get(self.w.a, "/latest/meta-data/hostname").text, "alpha")
        vm = self.w.manager.vms[self.w.a]
        vm.info.Hostname = "gamma"
        self.w.backend.vm_changed(vm.info)
        self.assertEqual(self.w.get(self.w.a, "/latest/meta-data/hostname").text, "gamma")


class TraceVmMetadataTests(SynchronousTestCase):
    """
    TraceVmMetadata through the service layer.
    """

    def setUp(self) -> None:
        self.w = World(self)
        self.api = HypervisorApi(self.w.manager, None, self.w.backend)

    def drain(self, stream: Any) -> list[Any]:
        out = []
        while len(stream):
            out.append(fired(stream.get()))
        return out

    def test_owner_sees_paths_until_destroyed(self) -> None:
        """
        The owner's stream starts with an empty message, then one message per path
        the VM requests (only that VM's), then "VM destroyed" and the end.
        """
        stream = self.api.TraceVmMetadata(ALICE, IpRequest(self.w.a))
        self.w.get(self.w.a, "/openstack")
        self.w.get(self.w.b, "/latest/meta-data/")
        self.w.get(self.w.a, "/latest/user-data")
        messages = self.drain(stream)
        self.assertEqual(
            [(m.Error, m.Path) for m in messages],
            [("", ""), ("", "/openstack"), ("", "/latest/user-data")],
        )
        waiting = stream.get()
        destroyed = self.api.DestroyVm(ALICE, AccessRequest(IpAddress=self.w.a))
        for _ in range(30):
            self.w.clock.advance(1)
        self.assertEqual(fired(destroyed).Error, "")
        self.assertEqual(fired(waiting).Error, VM_DESTROYED)
        self.assertIsNone(fired(stream.get()))
        self.assertEqual(
            codec.encode(TraceVmMetadataResponse(Path="/x")), b'{"Error":"","Path":"/x"}'
        )

    def test_access(self) -> None:
        """
        Someone who does not own the VM is refused; an unknown VM is not found; with no
        metadata server the call is unavailable.
        """
        self.assertRaises(AccessDenied, self.api.TraceVmMetadata, BOB, IpRequest(self.w.a))
        self.assertRaises(NotFound, self.api.TraceVmMetadata, ALICE, IpRequest("10.5.0.99"))
        without = HypervisorApi(self.w.manager)
        self.assertRaises(Unavailable, without.TraceVmMetadata, ALICE, IpRequest(self.w.a))

    def test_slow_reader_dropped(self) -> None:
        """
        A subscriber that falls behind gets a last message saying so; its stream ends
        and the backend forgets it.
        """
        stream = subscribe(self.w.backend, self.w.a, max_queued=3)
        for i in range(5):
            self.w.get(self.w.a, f"/p{i}")
        messages = self.drain(stream)
        self.assertEqual(messages[-1].Error, NOT_KEEPING_UP)
        self.assertTrue(stream.closed)
        self.assertEqual(self.w.backend._traces, {})

    def test_stop_ends_streams(self) -> None:
        """
        When the server stops, streams end without claiming the VM was destroyed.
        """
        stream = subscribe(self.w.backend, self.w.a)
        self.drain(stream)
        waiting = stream.get()
        self.w.backend.stop()
        self.assertIsNone(fired(waiting))


class SecondaryAddressTests(SynchronousTestCase):
    """
    A VM's secondary address identifies it too.
    """

    def test_secondary(self) -> None:
        """
        A request from the VM's secondary address gets the VM's data; the tree lists
        both interfaces by MAC.
        """
        w = World(self)
        more = [Address(f"10.5.0.{i}", f"52:54:0a:05:00:{i:02x}") for i in (5, 6)]
        response = fired(
            w.daemon.api.ChangeAddressPool(ROOT, ChangeAddressPoolRequest(AddressesToAdd=more))
        )
        self.assertEqual(response.Error, "")
        ip = w.daemon.create(Hostname="two", SecondarySubnetIDs=["net"])
        info = w.manager.get_vm_info(ip)
        self.assertEqual(len(info.SecondaryAddresses), 1)
        secondary = info.SecondaryAddresses[0]
        self.assertEqual(w.get(secondary.IpAddress, "/latest/meta-data/hostname").text, "two")
        macs = w.get(ip, "/latest/meta-data/network/interfaces/macs/").text.split()
        self.assertEqual(
            sorted(macs), sorted([info.Address.MacAddress + "/", secondary.MacAddress + "/"])
        )
        data = json.loads(w.get(ip, "/openstack/latest/network_data.json").body)
        self.assertEqual([n["ip_address"] for n in data["networks"]], [ip, secondary.IpAddress])
