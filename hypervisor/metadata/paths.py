# -*- test-case-name: tests.test_metadata_paths -*-
"""
The metadata server's path tree, as pure functions of one VM: which paths exist, what
each serves, and the directory listing of every prefix. No I/O: leaves that serve a
file (user data, identity material) name the file and get its bytes from the caller
(L{hypervisor.metadata.backend}), which reads them off the reactor thread.

Four families share one tree:

- SmallStack (reference §6): C{/datasource/SmallStack}, C{/latest/user-data},
  C{/latest/is-externally-patchable}, C{/latest/dynamic/epoch-time},
  C{/latest/dynamic/instance-identity/document} (VmInfo, Go's 4-space JSON) and the
  identity certificate and key paths; C{/*} lists every path.
- EC2 (versions C{2009-04-04} and C{latest}): C{meta-data/} with C{instance-id},
  C{hostname}, C{local-hostname}, C{local-ipv4}, C{mac}, C{instance-type},
  C{placement/availability-zone}, C{network/interfaces/macs/<mac>/...},
  C{public-keys/N/openssh-key} (from the VM's L{PUBLIC_KEYS_TAG} tag) and C{user-data}
  (absent, so 404, when the VM has none). IMDSv2 tokens are the backend's business.
- OpenStack (C{/openstack}, dated versions and C{latest}): C{meta_data.json},
  C{user_data}, C{vendor_data.json}, C{vendor_data2.json}, C{network_data.json}.
- NoCloud over HTTP (C{/nocloud/}): C{meta-data}, C{user-data}, C{vendor-data},
  C{network-config}, for guests whose SMBIOS serial says C{ds=nocloud;s=...}.

Listings: a directory answers with its entries, sorted, one per line; entries that are
directories end in C{/} (EC2's convention, which cloud-init's crawler relies on),
except the version lists of C{/} and C{/openstack}, which name versions bare (as EC2
and Nova do). C{public-keys/} lists C{N=name} as EC2 does.
"""

from __future__ import annotations

import ipaddress
import json
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from hypervisor import codec
from hypervisor.model import Subnet, VmInfo

# The VM tag whose value (one OpenSSH public key per line) EC2's public-keys/ and
# OpenStack's public_keys serve.
PUBLIC_KEYS_TAG = "SshAuthorizedKeys"

EC2_VERSIONS = ("2009-04-04", "latest")
OPENSTACK_VERSIONS = (
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
    "latest",
)
# Version directories are listed without a trailing slash (EC2 and Nova do so).
VERSION_LISTS = ("", "openstack")

# SmallStack's identity files (reference §6): path name -> file in the VM directory.
IDENTITY_FILES = {
    "X.509-certificate": "identity.cert",
    "X.509-key": "identity.key",
    "RSA-X.509-certificate": "identity.cert",
    "RSA-X.509-key": "identity.key",
    "RSA-SSH-certificate": "identity-RSA.SSH-cert",
    "RSA-SSH-key": "identity.key",
    "Ed25519-SSH-certificate": "identity-Ed25519.SSH-cert",
    "Ed25519-SSH-key": "identity-Ed25519.SSH-key",
    "Ed25519-X.509-certificate": "identity-Ed25519.X509-cert",
    "Ed25519-X.509-key": "identity-Ed25519.X509-key",
}
USER_DATA = "user-data.raw"

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
OCTETS = b"application/octet-stream"

INSTANCE_NAMESPACE = uuid.UUID("8c0bcb5e-4e2c-4d8a-9a59-0c6a8d7f6a12")


@dataclass(frozen=True)
class Interface:
    """
    One network interface of a VM as the metadata describes it.
    """

    index: int
    mac: str
    ip: str
    subnet: Optional[Subnet]


@dataclass(frozen=True)
class VmView:
    """
    What the tree needs to know about one VM (built by the backend from the manager's
    read API; no file contents).
    """

    info: VmInfo
    interfaces: tuple[Interface, ...]
    hypervisor_uuid: str = ""
    availability_zone: str = "smallstack"

    @property
    def ip(self) -> str:
        """
        The primary IP.
        """
        return self.info.Address.IpAddress

    @property
    def instance_id(self) -> str:
        """
        A UUID stable for the VM's life (hypervisor, primary IP and creation time):
        OpenStack's C{uuid}, EC2's and NoCloud's C{instance-id}.
        """
        created = self.info.CreatedOn.isoformat() if self.info.CreatedOn is not None else ""
        return str(uuid.uuid5(INSTANCE_NAMESPACE, f"{self.hypervisor_uuid}/{self.ip}/{created}"))

    @property
    def hostname(self) -> str:
        """
        The VM's Hostname, else one made of its IP (C{ip-10-0-0-2}).
        """
        return self.info.Hostname or "ip-" + self.ip.replace(".", "-")

    @property
    def name(self) -> str:
        """
        The VM's C{Name} tag, else its host name.
        """
        return self.info.Tags.get("Name", "") or self.hostname

    @property
    def public_keys(self) -> list[str]:
        """
        The OpenSSH public keys of the L{PUBLIC_KEYS_TAG} tag, one per line.
        """
        text = self.info.Tags.get(PUBLIC_KEYS_TAG, "")
        return [line.strip() for line in text.splitlines() if line.strip()]

    @property
    def instance_type(self) -> str:
        """
        The VM's size as a name: C{<vCPUs>vcpu-<MiB>mib} (ours; SmallStack sizes VMs
        freely).
        """
        vcpus = self.info.VirtualCPUs or max(1, -(-self.info.MilliCPUs // 1000))
        return f"{vcpus}vcpu-{self.info.MemoryInMiB}mib"


@dataclass(frozen=True)
class Context:
    """
    What a leaf renders from: the VM, the files it asked for (None: absent), the time.
    """

    vm: VmView
    files: dict[str, Optional[bytes]] = field(default_factory=dict)
    now: float = 0.0


@dataclass(frozen=True)
class Leaf:
    """
    One served path: a renderer (None from it means 404) and the files it needs.
    """

    render: Callable[[Context], Optional[bytes]]
    content_type: bytes = TEXT
    files: tuple[str, ...] = ()


class Tree:
    """
    One VM's paths: leaves by path (no leading slash) and listings by directory.
    """

    def __init__(self, leaves: dict[str, Leaf]) -> None:
        self.leaves = leaves
        children: dict[str, set[str]] = {}
        for path in leaves:
            parts = path.split("/")
            for depth in range(len(parts)):
                parent = "/".join(parts[:depth])
                name = parts[depth]
                is_dir = depth < len(parts) - 1
                if is_dir and parent not in VERSION_LISTS:
                    name += "/"
                children.setdefault(parent, set()).add(name)
        self.listings = {
            directory: ("\n".join(sorted(names)) + "\n").encode()
            for directory, names in children.items()
        }
        self.everything = ("\n".join("/" + p for p in sorted(leaves)) + "\n").encode()

    def find(self, path: str) -> tuple[Optional[Leaf], Optional[bytes]]:
        """
        The leaf at C{path}, or the listing of the directory at C{path}, or neither.
        """
        if path == "/*":
            return None, self.everything
        stripped = path.strip("/")
        if not path.endswith("/"):
            leaf = self.leaves.get(stripped)
            if leaf is not None:
                return leaf, None
        listing = self.listings.get(stripped)
        if listing is not None:
            return None, listing
        return None, None


def _text(value: str) -> Callable[[Context], Optional[bytes]]:
    data = value.encode()
    return lambda ctx: data


def _line(value: str) -> Callable[[Context], Optional[bytes]]:
    return _text(value + "\n")


def _file(name: str, empty_if_absent: bool = False) -> Leaf:
    def render(ctx: Context) -> Optional[bytes]:
        data = ctx.files.get(name)
        if data is None and empty_if_absent:
            return b""
        return data

    return Leaf(render, OCTETS, (name,))


def _json(value: object) -> Callable[[Context], Optional[bytes]]:
    data = json.dumps(value, sort_keys=True, indent=2).encode()
    return lambda ctx: data


def epoch_time(ctx: Context) -> bytes:
    """
    SmallStack's C{epoch-time}: seconds, a dot, nine digits of nanoseconds.
    """
    ns = int(round(ctx.now * 1e9))
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}\n".encode()


def _netmask(subnet: Optional[Subnet]) -> str:
    return subnet.IpMask if subnet is not None and subnet.IpMask else "255.255.255.0"


def _cidr(ip: str, subnet: Optional[Subnet]) -> str:
    try:
        return str(ipaddress.IPv4Network(f"{ip}/{_netmask(subnet)}", strict=False))
    except ValueError:
        return ""


def smallstack_leaves(vm: VmView) -> dict[str, Leaf]:
    """
    SmallStack's own paths (reference §6).
    """
    document = codec.encode(vm.info, indent=4)
    leaves = {
        "datasource/SmallStack": Leaf(_line("true")),
        "latest/is-externally-patchable": Leaf(_line("true")),
        "latest/dynamic/epoch-time": Leaf(epoch_time),
        "latest/dynamic/instance-identity/document": Leaf(lambda ctx: document, JSON),
        "latest/user-data": _file(USER_DATA),
    }
    for name, filename in IDENTITY_FILES.items():
        leaves[f"latest/dynamic/instance-identity/{name}"] = _file(filename)
    return leaves


def ec2_leaves(vm: VmView, version: str) -> dict[str, Leaf]:
    """
    EC2's C{meta-data/} and C{user-data} for one version.
    """
    base = f"{version}/meta-data/"
    primary = vm.interfaces[0] if vm.interfaces else None
    leaves = {
        base + "instance-id": Leaf(_text(vm.instance_id)),
        base + "ami-launch-index": Leaf(_text("0")),
        base + "hostname": Leaf(_text(vm.hostname)),
        base + "local-hostname": Leaf(_text(vm.hostname)),
        base + "local-ipv4": Leaf(_text(vm.ip)),
        base + "instance-type": Leaf(_text(vm.instance_type)),
        base + "placement/availability-zone": Leaf(_text(vm.availability_zone)),
        f"{version}/user-data": _file(USER_DATA),
    }
    if primary is not None:
        leaves[base + "mac"] = Leaf(_text(primary.mac))
    for interface in vm.interfaces:
        mac = f"{base}network/interfaces/macs/{interface.mac}/"
        leaves[mac + "device-number"] = Leaf(_text(str(interface.index)))
        leaves[mac + "interface-id"] = Leaf(_text(f"eth{interface.index}"))
        leaves[mac + "local-ipv4s"] = Leaf(_text(interface.ip))
        leaves[mac + "mac"] = Leaf(_text(interface.mac))
        cidr = _cidr(interface.ip, interface.subnet)
        if cidr:
            leaves[mac + "subnet-ipv4-cidr-block"] = Leaf(_text(cidr))
    for index, key in enumerate(vm.public_keys):
        leaves[f"{base}public-keys/{index}/openssh-key"] = Leaf(_text(key))
    return leaves


def _public_keys_listing(vm: VmView, version: str) -> dict[str, bytes]:
    if not vm.public_keys:
        return {}
    text = "\n".join(f"{i}=key-{i}" for i in range(len(vm.public_keys))) + "\n"
    return {f"{version}/meta-data/public-keys": text.encode()}


def openstack_meta_data(vm: VmView) -> dict[str, object]:
    """
    Nova's C{meta_data.json} for the VM.
    """
    keys = {f"key-{i}": key for i, key in enumerate(vm.public_keys)}
    return {
        "uuid": vm.instance_id,
        "name": vm.name,
        "hostname": vm.hostname,
        "launch_index": 0,
        "availability_zone": vm.availability_zone,
        "meta": dict(vm.info.Tags),
        "public_keys": keys,
        "keys": [{"name": name, "type": "ssh", "data": key} for name, key in keys.items()],
        "project_id": "",
        "devices": [],
    }


def openstack_network_data(vm: VmView) -> dict[str, object]:
    """
    Nova's C{network_data.json}: one link per interface, static IPv4 networks with the
    subnet's gateway as the default route (primary interface only), the subnets' DNS
    servers as services.
    """
    links = []
    networks = []
    dns: list[str] = []
    for interface in vm.interfaces:
        link_id = f"tap{interface.index}"
        links.append(
            {
                "id": link_id,
                "type": "phy",
                "ethernet_mac_address": interface.mac,
                "mtu": None,
                "vif_id": f"{vm.instance_id}-{interface.index}",
            }
        )
        subnet = interface.subnet
        network: dict[str, object] = {
            "id": f"network{interface.index}",
            "link": link_id,
            "type": "ipv4",
            "ip_address": interface.ip,
            "netmask": _netmask(subnet),
            "network_id": subnet.Id if subnet is not None else "",
            "routes": [],
        }
        if subnet is not None:
            if subnet.IpGateway and interface.index == 0:
                network["routes"] = [
                    {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": subnet.IpGateway}
                ]
            services = [{"type": "dns", "address": a} for a in subnet.DomainNameServers]
            if services:
                network["services"] = services
            for address in subnet.DomainNameServers:
                if address not in dns:
                    dns.append(address)
        networks.append(network)
    return {
        "links": links,
        "networks": networks,
        "services": [{"type": "dns", "address": a} for a in dns],
    }


def openstack_leaves(vm: VmView) -> dict[str, Leaf]:
    """
    Nova's C{/openstack/<version>/} files, the same for every version.
    """
    meta = _json(openstack_meta_data(vm))
    network = _json(openstack_network_data(vm))
    empty = _json({})
    leaves = {}
    for version in OPENSTACK_VERSIONS:
        base = f"openstack/{version}/"
        leaves[base + "meta_data.json"] = Leaf(meta, JSON)
        leaves[base + "user_data"] = _file(USER_DATA)
        leaves[base + "vendor_data.json"] = Leaf(empty, JSON)
        leaves[base + "vendor_data2.json"] = Leaf(empty, JSON)
        leaves[base + "network_data.json"] = Leaf(network, JSON)
    return leaves


def nocloud_network_config(vm: VmView) -> dict[str, object]:
    """
    cloud-init's network config version 1: static addresses by MAC.
    """
    config = []
    for interface in vm.interfaces:
        subnet = interface.subnet
        entry: dict[str, object] = {
            "type": "static",
            "address": interface.ip,
            "netmask": _netmask(subnet),
        }
        if subnet is not None:
            if subnet.IpGateway and interface.index == 0:
                entry["gateway"] = subnet.IpGateway
            if subnet.DomainNameServers:
                entry["dns_nameservers"] = list(subnet.DomainNameServers)
        config.append(
            {
                "type": "physical",
                "name": f"eth{interface.index}",
                "mac_address": interface.mac,
                "subnets": [entry],
            }
        )
    return {"version": 1, "config": config}


def nocloud_leaves(vm: VmView) -> dict[str, Leaf]:
    """
    NoCloud's seed files (YAML; JSON is YAML).
    """
    meta = {"instance-id": vm.instance_id, "local-hostname": vm.hostname}
    if vm.public_keys:
        meta["public-keys"] = vm.public_keys  # type: ignore[assignment]
    return {
        "nocloud/meta-data": Leaf(_json(meta)),
        "nocloud/user-data": _file(USER_DATA, empty_if_absent=True),
        "nocloud/vendor-data": Leaf(_text("")),
        "nocloud/network-config": Leaf(_json(nocloud_network_config(vm))),
    }


def build_tree(vm: VmView) -> Tree:
    """
    Every path of one VM.
    """
    leaves: dict[str, Leaf] = {}
    for version in EC2_VERSIONS:
        leaves.update(ec2_leaves(vm, version))
    leaves.update(smallstack_leaves(vm))
    leaves.update(openstack_leaves(vm))
    leaves.update(nocloud_leaves(vm))
    tree = Tree(leaves)
    for version in EC2_VERSIONS:
        tree.listings.update(_public_keys_listing(vm, version))
    return tree
