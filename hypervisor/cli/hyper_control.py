# -*- test-case-name: tests.test_vm_control,tests.test_cli_flags -*-
"""
C{hyper-control}: administer a hypervisor (addresses, subnets, enable/disable,
capacity, updates, netboot, DHCP) with SmallStack's C{hyper-control} command line:
the same commands, flag names, types and defaults (Dominator v0.3.4).

    hyper-control [flags...] command [args...]

Admin commands need a certificate granting the method (e.g. C{Hypervisor.*}) or
hypervisor ownership. Commands whose method this hypervisor does not serve, and those
that manage machines, installers or a fleet rather than a hypervisor, are listed by
C{-h}, say so and exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from typing import Any, Optional, Sequence

from hypervisor import model
from hypervisor.cli import goflags, tool
from hypervisor.cli.client import ClientError
from hypervisor.cli.goflags import Command, Flag
from hypervisor.cli.tool import Tool, decode

NOT_SERVED = "this hypervisor does not serve its method"
MACHINES = "manages physical machines or installers, which this implementation does not do"
FLEET_ONLY = "talks to a fleet manager, which this implementation does not do for hyper-control"
UNUSED = "only used by commands this implementation does not run"
NO_MONITOR = (
    "QEMU's monitor belongs to libvirt here: the daemon refuses ConnectToVmManager as not "
    "supported (virsh qemu-monitor-command on the host reaches it)"
)


def parse_addresses(text: str) -> list[model.Address]:
    """
    Go's proto/hypervisor AddressList: C{MAC;IP,MAC;IP}.
    """
    out = []
    for item in goflags.parse_string_list(text):
        mac, sep, ip = item.partition(";")
        if not sep or not mac or ";" in ip:
            raise ValueError(f"malformed address pair: {item}")
        try:
            if not isinstance(ipaddress.ip_address(ip), ipaddress.IPv4Address):
                raise ValueError
        except ValueError:
            raise ValueError(f"address is not IPv4: {ip}") from None
        out.append(model.Address(IpAddress=ip, MacAddress=mac))
    return out


FLAGS: list[Flag] = tool.common_flags(fleet_manager=False) + [
    Flag(
        "externalLeaseAddresses",
        "value",
        "",
        "List of addresses for register-external-leases",
        parse_addresses,
    ),
    Flag(
        "externalLeaseHostnames",
        "value",
        "",
        "Optional list of hostnames for register-external-leases",
        goflags.parse_string_list,
    ),
    Flag(
        "hypervisorTags",
        "value",
        "",
        "Tags to apply to Hypervisor",
        goflags.parse_tags,
        unused=UNUSED,
    ),
    Flag(
        "ignoreMissingLocalTags",
        "bool",
        "false",
        "If true, ignore missing local tags when connecting to Fleet Manager",
        unused=UNUSED,
    ),
    Flag(
        "imageServerHostname",
        "string",
        "localhost",
        "Hostname of image server",
        unused=UNUSED,
    ),
    Flag("imageServerPortNum", "uint", "6971", "Port number of image server", unused=UNUSED),
    Flag(
        "installerImageStream",
        "string",
        "",
        "Name of default image stream for building bootable installer ISO",
        unused=UNUSED,
    ),
    Flag("installerPortNum", "uint", "6978", "Port number of installer", unused=UNUSED),
    Flag("location", "string", "", "Location to search for hypervisors", unused=UNUSED),
    Flag("lockTimeout", "duration", "15s", "Time to hold the lock", unused=UNUSED),
    Flag(
        "maxUpdates",
        "uint",
        "0",
        "Maximum number of updates to receive (default infinite)",
    ),
    Flag("memory", "value", "4GiB", "memory for VM", goflags.parse_size, unused=UNUSED),
    Flag(
        "netbootFiles",
        "value",
        "",
        "Extra files served by TFTP server",
        goflags.parse_string_list,
    ),
    Flag(
        "netbootFilesTimeout",
        "duration",
        "1m1s",
        "How long to provide files via TFTP after last DHCP ACK",
    ),
    Flag("netbootTimeout", "duration", "1m0s", "Time to wait for DHCP ACKs to be sent"),
    Flag(
        "networkInterfacesFile",
        "string",
        "",
        "File containing network interfaces for show-network-configuration",
        unused=UNUSED,
    ),
    Flag(
        "numAcknowledgementsToWaitFor",
        "uint",
        "2",
        "Number of DHCP ACKs to wait for",
    ),
    Flag(
        "offerTimeout",
        "duration",
        "1m1s",
        "How long to offer DHCP OFFERs and ACKs",
    ),
    Flag(
        "randomSeedBytes",
        "uint",
        "0",
        "Number of bytes of random seed data to inject into installing machine",
        unused=UNUSED,
    ),
    Flag(
        "storageLayoutFilename",
        "string",
        "",
        "Name of file containing storage layout for installing machine",
        unused=UNUSED,
    ),
    Flag("subnetIDs", "value", "", "Subnet IDs for VM", goflags.parse_string_list, unused=UNUSED),
    Flag(
        "targetImageName",
        "string",
        "",
        "Name of image to install for netboot-{host,vm}",
        unused=UNUSED,
    ),
    Flag(
        "topologyDir",
        "string",
        "",
        "Name of local topology directory in Git repository",
        unused=UNUSED,
    ),
    Flag(
        "useKexec",
        "bool",
        "false",
        "If true, use kexec to reboot into newly installed OS",
        unused=UNUSED,
    ),
    Flag("vncViewer", "string", "", "Path to VNC viewer for VM", unused=UNUSED),
    Flag(
        "volumeSizes",
        "value",
        '"16GiB"',
        "Sizes for volumes for VM",
        lambda text: goflags.parse_size_list(text.strip('"')),
        unused=UNUSED,
    ),
    Flag("writeLock", "bool", "false", "If true, hold a write lock", unused=UNUSED),
]

COMMANDS: list[Command] = [
    Command("add-address", "MACaddr [IPaddr]", 1, 2, action="adding address"),
    Command(
        "add-subnet",
        "ID IPgateway IPmask DNSserver...",
        3,
        3 + 16,
        action="adding subnet",
    ),
    Command("change-tags", unavailable=FLEET_ONLY),
    Command("connect-to-vm-manager", "IPaddr", 1, 1, NO_MONITOR),
    Command("disable-hypervisor", action="disabling hypervisor"),
    Command("enable-hypervisor", action="enabling hypervisor"),
    Command("get-capacity", action="getting capacity"),
    Command("get-machine-info", "hostname", 1, 1, FLEET_ONLY),
    Command("get-updates", action="getting updates"),
    Command("hold-lock", unavailable=NOT_SERVED),
    Command("hold-vm-lock", unavailable=NOT_SERVED),
    Command("installer-shell", "hostname", 1, 1, MACHINES),
    Command("list-volume-directories", action="getting volume directories"),
    Command("make-installer-iso", "hostname dirname", 2, 2, MACHINES),
    Command("move-ip-address", "IPaddr", 1, 1, FLEET_ONLY),
    Command("netboot-host", "hostname", 1, 1, MACHINES),
    Command(
        "netboot-machine",
        "MACaddr IPaddr [hostname]",
        2,
        3,
        action="netbooting machine",
    ),
    Command("netboot-vm", unavailable=MACHINES),
    Command("power-off", unavailable=NOT_SERVED),
    Command("power-on", unavailable=MACHINES),
    Command("register-external-leases", action="registering external leases"),
    Command("reinstall", unavailable=MACHINES),
    Command("remove-excess-addresses", "MaxFreeAddr", 1, 1, action="removing excess addresses"),
    Command("remove-ip-address", "IPaddr", 1, 1, action="removing IP address"),
    Command("remove-mac-address", "MACaddr", 1, 1, action="removing MAC address"),
    Command("rollout-image", "name", 1, 1, FLEET_ONLY),
    Command("show-network-configuration", unavailable=MACHINES),
    Command("update-network-configuration", unavailable=MACHINES),
    Command("watch-dhcp", "[interface]", 0, 1, action="watching DHCP"),
    Command("write-netboot-files", "hostname dirname", 2, 2, MACHINES),
    # Ours (not in any Go hyper-control):
    Command("change-owners", "[user...]", 0, 1024, go=False, action="changing owners"),
    Command("list-subnets", go=False, action="listing subnets"),
    # The runtime admin surface (-transport pb, admin certificates: hypervisor.pb.admin):
    Command("log-level", "[namespace [level]]", 0, 2, go=False, action="log levels"),
    Command("list-clients", go=False, action="listing clients"),
    Command("disconnect-client", "ID", 1, 1, go=False, action="disconnecting client"),
    Command("reload-certificates", go=False, action="reloading certificates"),
    Command("reconcile", go=False, action="reconciling"),
    Command("disabled-state", go=False, action="getting disabled state"),
]


async def _admin(t: Tool, method: str, request: Any) -> int:
    hv = await t.hypervisor()
    await t.call(hv, method, request, model.ErrorResponse)
    return 0


async def add_address(t: Tool, args: list[str]) -> int:
    """
    ChangeAddressPool with one address to add.
    """
    address = model.Address(MacAddress=args[0], IpAddress=args[1] if len(args) > 1 else "")
    return await _admin(
        t, "Hypervisor.ChangeAddressPool", model.ChangeAddressPoolRequest(AddressesToAdd=[address])
    )


async def remove_ip_address(t: Tool, args: list[str]) -> int:
    """
    ChangeAddressPool with one IP to remove.
    """
    return await _admin(
        t,
        "Hypervisor.ChangeAddressPool",
        model.ChangeAddressPoolRequest(AddressesToRemove=[model.Address(IpAddress=args[0])]),
    )


async def remove_mac_address(t: Tool, args: list[str]) -> int:
    """
    ChangeAddressPool with one MAC to remove.
    """
    return await _admin(
        t,
        "Hypervisor.ChangeAddressPool",
        model.ChangeAddressPoolRequest(AddressesToRemove=[model.Address(MacAddress=args[0])]),
    )


async def remove_excess_addresses(t: Tool, args: list[str]) -> int:
    """
    ChangeAddressPool trimming free addresses to MaxFreeAddr (every subnet).
    """
    try:
        maximum = goflags.parse_uint(args[0])
    except ValueError:
        raise ClientError(f"MaxFreeAddr {args[0]!r} is not a number") from None
    return await _admin(
        t,
        "Hypervisor.ChangeAddressPool",
        model.ChangeAddressPoolRequest(MaximumFreeAddresses={"": maximum}),
    )


async def add_subnet(t: Tool, args: list[str]) -> int:
    """
    UpdateSubnets adding one subnet.
    """
    subnet = model.Subnet(
        Id=args[0], IpGateway=args[1], IpMask=args[2], DomainNameServers=list(args[3:])
    )
    return await _admin(t, "Hypervisor.UpdateSubnets", model.UpdateSubnetsRequest(Add=[subnet]))


def _set_disabled(disable: bool) -> tool.Runner:
    async def run(t: Tool, args: list[str]) -> int:
        return await _admin(
            t, "Hypervisor.SetDisabledState", model.SetDisabledStateRequest(Disable=disable)
        )

    return run


async def change_owners(t: Tool, args: list[str]) -> int:
    """
    ChangeOwners: the hypervisor's owner users.
    """
    return await _admin(t, "Hypervisor.ChangeOwners", model.ChangeOwnersRequest(OwnerUsers=args))


async def get_capacity(t: Tool, args: list[str]) -> int:
    """
    Print the capacity, Go-indented.
    """
    hv = await t.hypervisor()
    tool.show(await t.call(hv, "Hypervisor.GetCapacity", {}, model.GetCapacityResponse))
    return 0


async def list_volume_directories(t: Tool, args: list[str]) -> int:
    """
    Print the volume directories, one per line (the daemon answers only callers on
    its own host).
    """
    hv = await t.hypervisor()
    reply = await t.call(
        hv, "Hypervisor.ListVolumeDirectories", {}, model.ListVolumeDirectoriesResponse
    )
    for directory in reply.Directories:
        print(directory)
    return 0


async def list_subnets(t: Tool, args: list[str]) -> int:
    """
    Print the subnets, Go-indented.
    """
    hv = await t.hypervisor()
    reply = await t.call(
        hv, "Hypervisor.ListSubnets", model.ListSubnetsRequest(Sort=True), model.ListSubnetsResponse
    )
    for subnet in reply.Subnets:
        tool.show(subnet)
    return 0


class _Enough(Exception):
    pass


async def get_updates(t: Tool, args: list[str]) -> int:
    """
    Print each Update (Go-indented) until -maxUpdates (0: until interrupted).
    """
    limit = t.v["maxUpdates"]
    count = [0]

    def one(raw: bytes) -> None:
        tool.show(decode(model.Update, raw))
        sys.stdout.flush()
        count[0] += 1
        if limit and count[0] >= limit:
            raise _Enough()

    hv = await t.hypervisor()
    try:
        last = await t.call(hv, "Hypervisor.GetUpdates", None, None, on_message=one, check=False)
        if last:
            one(_json(last))
    except _Enough:
        pass
    return 0


def _json(value: dict[str, Any]) -> bytes:
    import json

    return json.dumps(value).encode()


async def register_external_leases(t: Tool, args: list[str]) -> int:
    """
    RegisterExternalLeases from -externalLeaseAddresses and -externalLeaseHostnames.
    """
    return await _admin(
        t,
        "Hypervisor.RegisterExternalLeases",
        model.RegisterExternalLeasesRequest(
            Addresses=t.v["externalLeaseAddresses"], Hostnames=t.v["externalLeaseHostnames"]
        ),
    )


async def netboot_machine(t: Tool, args: list[str]) -> int:
    """
    NetbootMachine: a temporary netboot lease (subnet: the hypervisor's subnet holding
    the IP), the -netbootFiles for TFTP; returns after -numAcknowledgementsToWaitFor
    ACKs or fails after -netbootTimeout.
    """
    files: dict[str, bytes] = {}
    for path in t.v["netbootFiles"]:
        try:
            with open(path, "rb") as f:
                files[os.path.basename(path)] = f.read()
        except OSError as e:
            raise ClientError(f"cannot read -netbootFiles {path}: {e.strerror}") from None
    hv = await t.hypervisor()
    subnets = await t.call(
        hv, "Hypervisor.ListSubnets", model.ListSubnetsRequest(), model.ListSubnetsResponse
    )
    try:
        ip = ipaddress.IPv4Address(args[1])
    except ValueError:
        raise ClientError(f"{args[1]!r} is not an IPv4 address") from None
    subnet = next(
        (
            s
            for s in subnets.Subnets
            if ip in ipaddress.IPv4Network(f"{s.IpGateway}/{s.IpMask}", strict=False)
        ),
        None,
    )
    request = model.NetbootMachineRequest(
        Address=model.Address(MacAddress=args[0], IpAddress=args[1]),
        Files=files,
        FilesExpiration=model.Duration(t.v["netbootFilesTimeout"]),
        Hostname=args[2] if len(args) > 2 else "",
        NumAcknowledgementsToWaitFor=t.v["numAcknowledgementsToWaitFor"],
        OfferExpiration=model.Duration(t.v["offerTimeout"]),
        Subnet=subnet,
        WaitTimeout=model.Duration(t.v["netbootTimeout"]),
    )
    await t.call(hv, "Hypervisor.NetbootMachine", request, model.ErrorResponse)
    return 0


async def watch_dhcp(t: Tool, args: list[str]) -> int:
    """
    Print each DHCP packet the hypervisor receives (interface, packet in hex) until
    interrupted.
    """

    def one(raw: bytes) -> None:
        message = decode(model.WatchDhcpResponse, raw)
        if message.Error:
            raise ClientError(message.Error)
        print(f"{message.Interface}: {message.Packet.hex()}", flush=True)

    hv = await t.hypervisor()
    request = model.WatchDhcpRequest(Interface=args[0] if args else "")
    last = await t.call(hv, "Hypervisor.WatchDhcp", request, None, on_message=one)
    if last:
        one(_json(last))
    return 0


async def _pb_admin(t: Tool, action: str, request: Optional[dict[str, Any]] = None) -> Any:
    """
    A runtime admin action over PB (hypervisor.pb.admin).
    """
    from hypervisor.cli.pb_transport import PbTransport

    hv = await t.hypervisor()
    if not isinstance(hv, PbTransport):
        raise ClientError(
            "this command is part of the PB admin surface: use -transport pb "
            "(and -pbEndpoint if the PB service is not on port 8787 of -hypervisorHostname)"
        )
    return await hv.admin(action, request)


def _print_json(value: Any) -> None:
    import json

    print(json.dumps(value, indent=4, sort_keys=True))


async def log_level(t: Tool, args: list[str]) -> int:
    """
    No argument: the log levels per namespace; a namespace: its level in force; a
    namespace and a level (debug, info, warn, error, critical, inherit; "" is the
    default namespace): set it.
    """
    if len(args) == 2:
        reply = await _pb_admin(t, "SetLogLevel", {"Namespace": args[0], "Level": args[1]})
        _print_json(reply["Levels"])
    elif args:
        reply = await _pb_admin(t, "GetLogLevels", {"Namespace": args[0]})
        print(reply["Level"])
    else:
        _print_json((await _pb_admin(t, "GetLogLevels"))["Levels"])
    return 0


async def list_clients(t: Tool, args: list[str]) -> int:
    """
    C{{"Clients": [...], "UpdateSubscribers": [...]}}: the PB clients connected, with
    their identity, transport, address, since when, and the streams they hold open;
    and the GetUpdates subscribers of every transport.
    """
    _print_json(await _pb_admin(t, "ListClients"))
    return 0


async def disconnect_client(t: Tool, args: list[str]) -> int:
    """
    Disconnect the PB client with this Id (list-clients).
    """
    try:
        n = int(args[0])
    except ValueError:
        raise ClientError(f"client Id {args[0]!r} is not a number (see list-clients)") from None
    await _pb_admin(t, "DisconnectClient", {"Id": n})
    return 0


async def reload_certificates(t: Tool, args: list[str]) -> int:
    """
    Read the daemon's certificate, key and CA files again; print what is in force.
    """
    _print_json(await _pb_admin(t, "ReloadCertificates"))
    return 0


async def reconcile(t: Tool, args: list[str]) -> int:
    """
    Reconcile the state directory with libvirt now.
    """
    _print_json(await _pb_admin(t, "Reconcile"))
    return 0


async def disabled_state(t: Tool, args: list[str]) -> int:
    """
    Print whether the hypervisor is disabled (enable-/disable-hypervisor change it).
    """
    _print_json(await _pb_admin(t, "GetDisabledState"))
    return 0


RUNNERS: dict[str, tool.Runner] = {
    "add-address": add_address,
    "disabled-state": disabled_state,
    "disconnect-client": disconnect_client,
    "list-clients": list_clients,
    "log-level": log_level,
    "reconcile": reconcile,
    "reload-certificates": reload_certificates,
    "add-subnet": add_subnet,
    "change-owners": change_owners,
    "disable-hypervisor": _set_disabled(True),
    "enable-hypervisor": _set_disabled(False),
    "get-capacity": get_capacity,
    "get-updates": get_updates,
    "list-subnets": list_subnets,
    "list-volume-directories": list_volume_directories,
    "netboot-machine": netboot_machine,
    "register-external-leases": register_external_leases,
    "remove-excess-addresses": remove_excess_addresses,
    "remove-ip-address": remove_ip_address,
    "remove-mac-address": remove_mac_address,
    "watch-dhcp": watch_dhcp,
}

UNSERVED_METHODS: dict[str, str] = {
    "hold-lock": "HoldLock",
    "hold-vm-lock": "HoldVmLock",
    "power-off": "PowerOff",
}

# Commands of the PB admin surface, and the admin action each runs (hypervisor.pb.admin).
ADMIN_ACTIONS: dict[str, str] = {
    "disabled-state": "GetDisabledState",
    "disconnect-client": "DisconnectClient",
    "list-clients": "ListClients",
    "log-level": "SetLogLevel",
    "reconcile": "Reconcile",
    "reload-certificates": "ReloadCertificates",
}

METHODS: dict[str, str] = {
    "add-address": "ChangeAddressPool",
    "add-subnet": "UpdateSubnets",
    "change-owners": "ChangeOwners",
    "disable-hypervisor": "SetDisabledState",
    "enable-hypervisor": "SetDisabledState",
    "get-capacity": "GetCapacity",
    "get-updates": "GetUpdates",
    "list-subnets": "ListSubnets",
    "list-volume-directories": "ListVolumeDirectories",
    "netboot-machine": "NetbootMachine",
    "register-external-leases": "RegisterExternalLeases",
    "remove-excess-addresses": "ChangeAddressPool",
    "remove-ip-address": "ChangeAddressPool",
    "remove-mac-address": "ChangeAddressPool",
    "watch-dhcp": "WatchDhcp",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Entry point of the C{hyper-control} console script.
    """
    return tool.main("hyper-control", argv, FLAGS, COMMANDS, RUNNERS, fleet_manager=False)


if __name__ == "__main__":
    sys.exit(main())
