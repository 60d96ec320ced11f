# -*- test-case-name: tests.test_manager_network -*-
"""
Subnets, the address pool and bridges (reference §10).

- L{Subnets}: the table of subnets (C{subnets.json}, the protected id C{hypervisor}
  excluded), validation, access by C{AllowedUsers}/C{AllowedGroups}, choosing the
  subnet for a new VM, and the bridge that carries a subnet.
- L{AddressPool}: registered and free addresses (C{address-pool.json}): adding,
  removing, trimming, allocating and releasing, with the invariants checked.

Both are in-memory tables persisted atomically after each change; a failure to persist
undoes the change and is reported.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
from typing import Any, Callable, Iterable, Optional

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.errors import (
    AccessDenied,
    InsufficientCapacity,
    InvalidRequest,
    NotFound,
)
from hypervisor.model import Address
from hypervisor.model import AddressPool as PoolFile
from hypervisor.model import Subnet

HYPERVISOR_SUBNET = "hypervisor"
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def normalize_mac(mac: str) -> str:
    """
    Lower-case, colon-separated MAC; L{InvalidRequest} if it is not one.
    """
    value = mac.strip().lower().replace("-", ":")
    if not MAC_RE.match(value):
        raise InvalidRequest(f"{mac!r} is not a MAC address (example: 52:54:0a:02:03:04)")
    return value


def parse_ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    """
    Parse an IPv4 address; L{InvalidRequest} naming C{what} if it is not one.
    """
    try:
        return ipaddress.IPv4Address(text.strip())
    except ValueError:
        raise InvalidRequest(f"{what} {text!r} is not an IPv4 address") from None


def subnet_network(subnet: Subnet) -> ipaddress.IPv4Network:
    """
    The subnet's network from its gateway and mask.
    """
    gateway = parse_ipv4(subnet.IpGateway, f"subnet {subnet.Id!r} IpGateway")
    mask = parse_ipv4(subnet.IpMask, f"subnet {subnet.Id!r} IpMask")
    try:
        return ipaddress.IPv4Network(f"{gateway}/{mask}", strict=False)
    except ValueError:
        raise InvalidRequest(
            f"subnet {subnet.Id!r} IpMask {subnet.IpMask!r} is not a netmask"
        ) from None


def _load_json(path: str) -> Optional[object]:
    try:
        with open(path, "rb") as f:
            return codec.loads(f.read())
    except FileNotFoundError:
        return None


class Subnets:
    """
    The subnets this hypervisor can place VMs on.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._subnets: dict[str, Subnet] = {}
        self._networks: Optional[list[tuple[ipaddress.IPv4Network, Subnet]]] = None
        self._subnet_of: dict[str, Optional[Subnet]] = {}

    @property
    def subnets(self) -> dict[str, Subnet]:
        """
        Subnets by id.
        """
        return self._subnets

    @subnets.setter
    def subnets(self, value: dict[str, Subnet]) -> None:
        self._subnets = value
        self._networks = None  # parsed again on next use
        self._subnet_of = {}

    def load(self) -> None:
        """
        Read C{subnets.json} (missing = none).

        @raise codec.DecodeError: the file is corrupt (the daemon refuses to start).
        """
        data = _load_json(self.path)
        if data is None:
            return
        if not isinstance(data, list):
            raise codec.DecodeError(f"{self.path}: expected a JSON array of subnets")
        for i, item in enumerate(data):
            subnet = codec.from_dict(Subnet, item, f"{self.path}[{i}]", trusted=True)
            self._subnets[subnet.Id] = subnet
        self._networks = None
        self._subnet_of = {}

    def encode(self) -> bytes:
        """
        What C{subnets.json} holds (every subnet but the protected one).
        """
        items = [s for s in self.list(sort=True) if s.Id != HYPERVISOR_SUBNET]
        return codec.encode(items, indent=4)

    def list(self, sort: bool = False) -> list[Subnet]:
        """
        All subnets (sorted by id if asked).
        """
        items = list(self.subnets.values())
        return sorted(items, key=lambda s: s.Id) if sort else items

    def get(self, subnet_id: str) -> Subnet:
        """
        The subnet with this id, or L{NotFound} listing the known ones.
        """
        try:
            return self.subnets[subnet_id]
        except KeyError:
            known = ", ".join(sorted(self.subnets)) or "none"
            raise NotFound(f"subnet {subnet_id!r} not found; known subnets: {known}") from None

    @staticmethod
    def validate(subnet: Subnet) -> Subnet:
        """
        Check a subnet's fields; return it with addresses normalised.
        """
        if not subnet.Id or not re.match(r"^[A-Za-z0-9_.@:-]+$", subnet.Id):
            raise InvalidRequest(
                f"subnet Id {subnet.Id!r} is empty or has characters other than "
                "letters, digits and _ . @ : -"
            )
        network = subnet_network(subnet)
        for name in ("FirstDynamicIP", "LastDynamicIP"):
            value = getattr(subnet, name)
            if value and parse_ipv4(value, f"subnet {subnet.Id!r} {name}") not in network:
                raise InvalidRequest(f"subnet {subnet.Id!r} {name} {value} is outside {network}")
        for server in subnet.DomainNameServers:
            parse_ipv4(server, f"subnet {subnet.Id!r} DomainNameServers entry")
        if not 0 <= subnet.VlanId <= 4094:
            raise InvalidRequest(f"subnet {subnet.Id!r} VlanId {subnet.VlanId} is not 0-4094")
        return subnet

    def update(
        self,
        add: Iterable[Subnet],
        change: Iterable[Subnet],
        delete: Iterable[str],
        in_use: Callable[[str], bool],
    ) -> None:
        """
        Apply UpdateSubnets in memory: all or nothing (the caller persists it with
        L{encode} and puts L{subnets} back if that fails).

        @param in_use: tells whether a subnet id still has VMs (those cannot be deleted).
        """
        new = dict(self.subnets)
        for subnet in add:
            self.validate(subnet)
            if subnet.Id == HYPERVISOR_SUBNET:
                raise InvalidRequest(f"subnet {HYPERVISOR_SUBNET!r} is protected")
            if subnet.Id in new:
                raise InvalidRequest(f"subnet {subnet.Id!r} already exists; use Change")
            new[subnet.Id] = subnet
        for subnet in change:
            self.validate(subnet)
            if subnet.Id == HYPERVISOR_SUBNET:
                raise InvalidRequest(f"subnet {HYPERVISOR_SUBNET!r} is protected")
            if subnet.Id not in new:
                raise NotFound(f"subnet {subnet.Id!r} not found; use Add")
            new[subnet.Id] = subnet
        for subnet_id in delete:
            if subnet_id == HYPERVISOR_SUBNET:
                raise InvalidRequest(f"subnet {HYPERVISOR_SUBNET!r} is protected")
            if subnet_id not in new:
                raise NotFound(f"subnet {subnet_id!r} not found")
            if in_use(subnet_id):
                raise InvalidRequest(
                    f"subnet {subnet_id!r} still has VMs; move or " "destroy them first"
                )
            del new[subnet_id]
        networks: dict[str, ipaddress.IPv4Network] = {}
        for subnet in new.values():
            network = subnet_network(subnet)
            for other_id, other in networks.items():
                if network.overlaps(other):
                    raise InvalidRequest(
                        f"subnet {subnet.Id!r} ({network}) overlaps subnet {other_id!r} "
                        f"({other})"
                    )
            networks[subnet.Id] = network
        self.subnets = new

    def subnet_of(self, ip: str) -> Optional[Subnet]:
        """
        The subnet containing C{ip}, if any.
        """
        try:
            return self._subnet_of[ip]
        except KeyError:
            pass
        if self._networks is None:
            self._networks = [(subnet_network(s), s) for s in self._subnets.values()]
        address = ipaddress.IPv4Address(ip)
        found = None
        for network, subnet in self._networks:
            if address in network:
                found = subnet
                break
        if len(self._subnet_of) < 1 << 20:  # IPs asked about, bounded
            self._subnet_of[ip] = found
        return found

    @staticmethod
    def permitted(subnet: Subnet, identity: Identity, method: str = "CreateVm") -> bool:
        """
        Whether C{identity} may place a VM on C{subnet}.
        """
        if identity.has_method_power(method):
            return True
        if not subnet.AllowedUsers and not subnet.AllowedGroups:
            return True
        return identity.username in subnet.AllowedUsers or bool(
            identity.groups & set(subnet.AllowedGroups)
        )

    def choose(self, subnet_id: str, identity: Identity) -> Subnet:
        """
        The subnet for a new VM (reference C{getSubnetAndAuth}).
        """
        if subnet_id:
            subnet = self.get(subnet_id)
            if not self.permitted(subnet, identity):
                raise AccessDenied(f"no access to subnet {subnet_id!r}")
            return subnet
        if not self.subnets:
            raise InvalidRequest("no subnets are configured; add one with UpdateSubnets")
        if list(self.subnets) == [HYPERVISOR_SUBNET]:
            return self.subnets[HYPERVISOR_SUBNET]
        allowed = [
            s
            for s in self.subnets.values()
            if s.Id != HYPERVISOR_SUBNET and self.permitted(s, identity)
        ]
        if len(allowed) == 1:
            return allowed[0]
        if not allowed:
            raise AccessDenied("no subnet is available to you")
        names = ", ".join(sorted(s.Id for s in allowed))
        raise InvalidRequest(f"multiple available subnets: pick one ({names})")


class AddressPool:
    """
    Registered and free addresses (C{address-pool.json}).

    @ivar in_use: returns the addresses VMs hold right now (for the invariants).
    """

    def __init__(self, path: str, subnets: Subnets, in_use: Callable[[], list[Address]]) -> None:
        self.path = path
        self.subnets = subnets
        self.in_use = in_use
        self.free: list[Address] = []
        self.registered: list[Address] = []
        # Encodings of addresses seen (entries for removed addresses are dropped when
        # the table grows past twice the registered count).
        self._encodings: dict[tuple[str, str], bytes] = {}
        self._num_free: Optional[tuple[list[Address], dict[str, Any], dict[str, int]]] = None
        # The registered list's part of the file, kept while that list is the same
        # object (it is replaced, never changed in place; creates leave it alone).
        self._registered_json: Optional[tuple[list[Address], bytes]] = None

    def load(self) -> None:
        """
        Read C{address-pool.json} (missing = empty).
        """
        data = _load_json(self.path)
        if data is None:
            return
        pool = codec.from_dict(PoolFile, data, self.path, trusted=True)  # type: ignore[arg-type]
        self.free = pool.Free
        self.registered = pool.Registered

    def encode(self) -> bytes:
        """
        What C{address-pool.json} holds (C{{"Free": [...], "Registered": [...]}}),
        from each address's encoding kept since it was first written: writing the
        pool after each allocation costs a join, not an encoding of every address.
        """
        registered = self.registered
        kept = self._registered_json
        if kept is None or kept[0] is not registered:
            kept = self._registered_json = (
                registered,
                b",".join([self._encoded(a) for a in registered]),
            )
        return b'{"Free":[%s],"Registered":[%s]}' % (
            b",".join([self._encoded(a) for a in self.free]),
            kept[1],
        )

    def _encoded(self, address: Address) -> bytes:
        key = (address.IpAddress, address.MacAddress)
        data = self._encodings.get(key)
        if data is None:
            if len(self._encodings) > 2 * len(self.registered) + 64:
                self._encodings.clear()
            data = self._encodings[key] = codec.encode(address)
        return data

    def _commit(self, free: list[Address], registered: list[Address]) -> None:
        self.free, self.registered = free, registered

    def repair(self, vm_addresses: list[Address]) -> list[str]:
        """
        Make the pool agree with the VMs after a crash: an address a VM holds is not
        free (and is registered); a registered address that is neither free nor held
        by a VM (its creation or destruction was interrupted) is free again.

        @return: what was repaired, as sentences (empty when nothing was wrong).
        """
        repaired = []
        used_macs = {a.MacAddress for a in vm_addresses}
        used_ips = {a.IpAddress for a in vm_addresses if a.IpAddress}
        free = []
        for a in self.free:
            if a.MacAddress in used_macs or (a.IpAddress and a.IpAddress in used_ips):
                repaired.append(
                    f"address {a.IpAddress or a.MacAddress} was free but a VM "
                    "holds it: no longer free"
                )
            else:
                free.append(a)
        registered = list(self.registered)
        registered_macs = {a.MacAddress for a in registered}
        for a in vm_addresses:
            if a.MacAddress not in registered_macs:
                registered.append(Address(a.IpAddress, a.MacAddress))
                registered_macs.add(a.MacAddress)
                repaired.append(
                    f"address {a.IpAddress or a.MacAddress} held by a VM was "
                    "not registered: registered"
                )
        free_macs = {a.MacAddress for a in free}
        for a in registered:
            if a.MacAddress not in free_macs and a.MacAddress not in used_macs:
                free.append(Address(a.IpAddress, a.MacAddress))
                free_macs.add(a.MacAddress)
                repaired.append(
                    f"address {a.IpAddress or a.MacAddress} was neither free "
                    "nor held by a VM (an interrupted creation or destruction):"
                    " free again"
                )
        if repaired:
            self._commit(free, registered)
        return repaired

    def take(self, address: Address) -> None:
        """
        Mark an address taken (undo of L{release} when persisting that failed).
        """
        self.free = [a for a in self.free if a.MacAddress != address.MacAddress]

    def num_free(self) -> dict[str, int]:
        """
        Free addresses per subnet id (addresses outside any subnet under "").
        """
        # Kept until the free list or the subnets change (both are replaced, never
        # changed in place): every update and status page asks for it.
        kept = self._num_free
        if kept is not None and kept[0] is self.free and kept[1] is self.subnets._subnet_of:
            return dict(kept[2])
        counts: dict[str, int] = {}
        for a in self.free:
            subnet = self.subnets.subnet_of(a.IpAddress) if a.IpAddress else None
            key = subnet.Id if subnet else ""
            counts[key] = counts.get(key, 0) + 1
        self._num_free = (self.free, self.subnets._subnet_of, counts)
        return dict(counts)

    def change(
        self, to_add: list[Address], to_remove: list[Address], maximum_free: dict[str, int]
    ) -> None:
        """
        Apply ChangeAddressPool: all or nothing.
        """
        used = self.in_use()
        used_macs = {a.MacAddress for a in used}
        used_ips = {a.IpAddress for a in used if a.IpAddress}
        free = list(self.free)
        registered = list(self.registered)
        reg_macs = {a.MacAddress for a in registered}
        reg_ips = {a.IpAddress for a in registered if a.IpAddress}
        for raw in to_add:
            mac = normalize_mac(raw.MacAddress)
            ip = str(parse_ipv4(raw.IpAddress, "IpAddress")) if raw.IpAddress else ""
            if ip and self.subnets.subnet_of(ip) is None:
                raise InvalidRequest(f"address {ip} is in no known subnet; add the subnet first")
            if mac in reg_macs:
                raise InvalidRequest(f"MAC {mac} is already registered")
            if ip and ip in reg_ips:
                raise InvalidRequest(f"IP {ip} is already registered")
            address = Address(IpAddress=ip, MacAddress=mac)
            registered.append(address)
            reg_macs.add(mac)
            if ip:
                reg_ips.add(ip)
            if mac not in used_macs and ip not in used_ips:
                free.append(address)
        for raw in to_remove:
            mac = normalize_mac(raw.MacAddress) if raw.MacAddress else ""
            ip = str(parse_ipv4(raw.IpAddress, "IpAddress")) if raw.IpAddress else ""
            if not mac and not ip:
                raise InvalidRequest("an address to remove needs an IP or a MAC")
            match = [
                a
                for a in registered
                if (not mac or a.MacAddress == mac) and (not ip or a.IpAddress == ip)
            ]
            if not match:
                raise NotFound(f"address {ip or mac} is not registered")
            for a in match:
                if a.MacAddress in used_macs or (a.IpAddress and a.IpAddress in used_ips):
                    raise InvalidRequest(
                        f"address {a.IpAddress or a.MacAddress} is used by a VM; destroy "
                        "the VM first"
                    )
                registered.remove(a)
                if a in free:
                    free.remove(a)
        for subnet_id, maximum in maximum_free.items():
            if subnet_id and subnet_id not in self.subnets.subnets:
                raise NotFound(f"subnet {subnet_id!r} not found")
            if maximum < 0:
                raise InvalidRequest(f"MaximumFreeAddresses[{subnet_id!r}] is negative")
            kept = 0
            trimmed: list[Address] = []
            for a in free:
                subnet = self.subnets.subnet_of(a.IpAddress) if a.IpAddress else None
                if subnet_id and (subnet is None or subnet.Id != subnet_id):
                    trimmed.append(a)
                    continue
                if kept < maximum:
                    trimmed.append(a)
                    kept += 1
                else:
                    registered.remove(a)
            free = trimmed
        self._commit(free, registered)

    def allocate(self, subnet: Subnet, requested_ip: str = "") -> Address:
        """
        Take a free address in C{subnet} (the requested IP, if given).
        """
        network = subnet_network(subnet)
        if requested_ip:
            ip = str(parse_ipv4(requested_ip, "IpAddress"))
            for a in self.free:
                if a.IpAddress == ip:
                    break
            else:
                raise InsufficientCapacity(f"{ip} not found in free pool")
            if ipaddress.IPv4Address(ip) not in network:
                raise InvalidRequest(f"{ip} is not in subnet {subnet.Id!r} ({network})")
        else:
            for a in self.free:
                if a.IpAddress and ipaddress.IPv4Address(a.IpAddress) in network:
                    break
            else:
                raise InsufficientCapacity(
                    f"no free address in subnet {subnet.Id!r}; add some with " "ChangeAddressPool"
                )
        free = [x for x in self.free if x is not a]
        self._commit(free, self.registered)  # unchanged (lists are replaced, not changed)
        return Address(IpAddress=a.IpAddress, MacAddress=a.MacAddress)

    def release(self, address: Address) -> None:
        """
        Return an address to the free list (if it is still registered).
        """
        if any(a.MacAddress == address.MacAddress for a in self.free):
            return
        if not any(a.MacAddress == address.MacAddress for a in self.registered):
            return
        self._commit(self.free + [Address(address.IpAddress, address.MacAddress)], self.registered)

    def register_in_use(self, address: Address) -> None:
        """
        Make sure an address held by a VM is registered (and not free).
        """
        free = [
            a
            for a in self.free
            if a.MacAddress != address.MacAddress
            and (not address.IpAddress or a.IpAddress != address.IpAddress)
        ]
        registered = list(self.registered)
        if not any(a.MacAddress == address.MacAddress for a in registered):
            registered.append(Address(address.IpAddress, address.MacAddress))
        if free != self.free or registered != self.registered:
            self._commit(free, registered)

    def check_invariants(self, vm_addresses: list[Address]) -> list[str]:
        """
        Problems with the pool: free-and-used addresses, duplicates.

        @return: sentences, empty when all is well.
        """
        problems = []
        used_macs: dict[str, int] = {}
        used_ips: dict[str, int] = {}
        for a in vm_addresses:
            used_macs[a.MacAddress] = used_macs.get(a.MacAddress, 0) + 1
            if a.IpAddress:
                used_ips[a.IpAddress] = used_ips.get(a.IpAddress, 0) + 1
        problems += [f"MAC {m} is used by {n} VMs" for m, n in used_macs.items() if n > 1]
        problems += [f"IP {i} is used by {n} VMs" for i, n in used_ips.items() if n > 1]
        for a in self.free:
            if a.MacAddress in used_macs or (a.IpAddress and a.IpAddress in used_ips):
                problems.append(f"address {a.IpAddress or a.MacAddress} is free and in use")
        seen_macs: set[str] = set()
        for a in self.registered:
            if a.MacAddress in seen_macs:
                problems.append(f"MAC {a.MacAddress} is registered twice")
            seen_macs.add(a.MacAddress)
        for a in self.free:
            if a.MacAddress not in seen_macs:
                problems.append(f"free address {a.IpAddress or a.MacAddress} is not registered")
        return problems


def _reraise_exhaustion(error: OSError) -> None:
    """
    Raise C{error} again if it means the process is out of file descriptors.
    """
    if error.errno in (errno.EMFILE, errno.ENFILE):
        raise error


def discover_bridges(
    sys_class_net: str = "/sys/class/net", vlan_config: str = "/proc/net/vlan/config"
) -> dict[str, int]:
    """
    Bridges on this host and the VLAN id of each one's uplink (0 = untagged).

    @raise OSError: out of file descriptors (EMFILE, ENFILE): not "no bridges",
        which would refuse a create with a wrong reason (the caller answers 503).
    """
    vlans: dict[str, int] = {}
    try:
        with open(vlan_config) as f:
            for line in f:
                parts = [p.strip() for p in line.split("|")]
                if len(parts) == 3 and parts[1].isdigit():
                    vlans[parts[0]] = int(parts[1])
    except OSError as e:
        _reraise_exhaustion(e)
    bridges: dict[str, int] = {}
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError as e:
        _reraise_exhaustion(e)
        return bridges
    for name in names:
        if not os.path.isdir(os.path.join(sys_class_net, name, "bridge")):
            continue
        vlan = 0
        try:
            ports = os.listdir(os.path.join(sys_class_net, name, "brif"))
        except OSError as e:
            _reraise_exhaustion(e)
            ports = []
        for port in ports:
            if port in vlans:
                vlan = vlans[port]
        bridges[name] = vlan
    return bridges


def bridge_for_subnet(subnet: Subnet, bridges: dict[str, int]) -> str:
    """
    The bridge that carries C{subnet}: C{br@<Id>}, else the bridge whose uplink is on
    the subnet's VLAN, else the only (untagged) bridge.

    @raise InvalidRequest: none fits; the message lists the bridges.
    """
    named = f"br@{subnet.Id}"
    if named in bridges:
        return named
    candidates = [b for b, vlan in bridges.items() if not b.startswith("br@")]
    by_vlan = [b for b in candidates if bridges[b] == subnet.VlanId]
    if len(by_vlan) == 1:
        return by_vlan[0]
    if len(by_vlan) > 1:
        raise InvalidRequest(
            f"subnet {subnet.Id!r}: several bridges on VLAN {subnet.VlanId} "
            f"({', '.join(by_vlan)}); name one br@{subnet.Id}"
        )
    known = ", ".join(sorted(bridges)) or "none"
    raise InvalidRequest(
        f"no bridge for subnet {subnet.Id!r} (VLAN {subnet.VlanId}); create bridge "
        f"br@{subnet.Id} or one whose uplink is on that VLAN (bridges: {known})"
    )
