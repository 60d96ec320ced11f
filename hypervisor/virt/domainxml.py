# -*- test-case-name: tests.test_domainxml -*-
"""
The libvirt domain XML of a VM: a pure function of the VM and where its files are.

Domains are I{transient} (C{createXML}): libvirt holds a VM's definition only while
it runs, and the state directory (C{VMs/<IP>/info.json}) is the only definition there
is. Starting a VM always builds its XML afresh from our state, so libvirt and our
state cannot drift apart; running domains survive daemon and libvirtd restarts (QEMU
belongs to libvirtd); after a host reboot the manager starts again the VMs that should
run.

What a domain gets:

- name C{vm-<IP>} (what an operator sees in C{virsh list}), our C{<metadata>} element
  with the IP;
- C{domainType} C{kvm} (host CPU passed through, as the Go hypervisor's C{-cpu host})
  or C{qemu} (TCG);
- serial port 0 on a unix socket libvirt makes and listens on (C{VMs/<IP>/serial0.sock},
  L{hypervisor.console.paths.serial_socket_path}; C{ConnectToVmSerialPort} connects
  to it: QEMU's socket chardev takes one client at a time), with everything the guest
  writes also logged to C{VMs/<IP>/bootlog} by QEMU's chardev log (whether a console
  is connected or not); without a socket path, a pty as before;
- for C{ConsoleType} C{vnc}, VNC on a unix socket libvirt picks in its own per-domain
  directory (QEMU must be able to create it there; C{ConnectToVmConsole} reads its path
  from the live domain XML);
- NICs on the subnets' bridges with the pool's MACs, virtio unless C{DisableVirtIO};
- SMBIOS data so stock cloud-init finds our metadata server: product C{SmallStack}
  (as the Go hypervisor) and, for the OpenStack datasource, chassis asset tag
  C{OpenStack Nova}; for NoCloud, system serial C{ds=nocloud;s=<url>}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional
from xml.sax.saxutils import escape, quoteattr

from hypervisor.errors import InvalidRequest
from hypervisor.model import (
    CloudInitDatasource,
    ConsoleType,
    FirmwareType,
    MachineType,
    VmInfo,
    VolumeFormat,
    VolumeInterface,
    WatchdogAction,
    WatchdogModel,
)
from hypervisor.virt.domains import METADATA_NAMESPACE, METADATA_PREFIX

METADATA_URL = "http://169.254.169.254"
NOCLOUD_URL = METADATA_URL + "/nocloud/"


def domain_name(ip: str) -> str:
    """
    The libvirt domain name of the VM with this IP.
    """
    return f"vm-{ip}"


def ip_from_domain_name(name: str) -> Optional[str]:
    """
    The VM IP encoded in a domain name of ours, or None.
    """
    return name[3:] if name.startswith("vm-") else None


def root_label(ip: str) -> str:
    """
    The root file system label of reference §2.3: C{rootfs@<IPv4 in hex>}.
    """
    return "rootfs@" + "".join(f"{int(p):02x}" for p in ip.split("."))


def num_vcpus(info: VmInfo, host_cpus: int) -> int:
    """
    max(ceil(MilliCPUs/1000), VirtualCPUs), capped at the host's CPUs, at least 1.
    """
    wanted = max(math.ceil(info.MilliCPUs / 1000), info.VirtualCPUs, 1)
    return max(1, min(wanted, host_cpus))


@dataclass
class DiskFile:
    """
    One volume's file.
    """

    path: str
    format: VolumeFormat = VolumeFormat.RAW
    interface: VolumeInterface = VolumeInterface.VIRTIO


@dataclass
class DomainSpec:
    """
    Everything that goes into a VM's domain XML besides its VmInfo.
    """

    domain_type: str
    bootlog: str
    disks: list[DiskFile]
    bridges: list[str]
    host_cpus: int
    hypervisor_uuid: str = ""
    kernel: str = ""
    initrd: str = ""
    datasource: CloudInitDatasource = CloudInitDatasource.OPENSTACK
    serial_socket: str = ""
    extra_cmdline: list[str] = field(default_factory=list)


def _disk_target(interface: VolumeInterface, index: int) -> tuple[str, str]:
    letter = chr(ord("a") + index)
    if interface == VolumeInterface.VIRTIO:
        return f"vd{letter}", "virtio"
    if interface == VolumeInterface.IDE:
        return f"hd{letter}", "ide"
    raise InvalidRequest(f"volume interface {interface.value!r} is not supported here")


def build_domain_xml(info: VmInfo, spec: DomainSpec) -> str:
    """
    The domain XML for C{info}.
    """
    ip = info.ip
    if spec.domain_type not in ("kvm", "qemu"):
        raise ValueError(f"domain type {spec.domain_type!r}")
    if len(spec.disks) > 26:
        raise InvalidRequest("at most 26 volumes per VM")
    addresses = [info.Address] + list(info.SecondaryAddresses)
    if len(spec.bridges) != len(addresses):
        raise ValueError("one bridge per network interface")
    lines = [
        f"<domain type='{spec.domain_type}'>",
        f"  <name>{escape(domain_name(ip))}</name>",
        f"  <title>{escape(info.Tags.get('Name', '') or info.Hostname or ip)}</title>",
        "  <metadata>",
        f"    <{METADATA_PREFIX}:vm xmlns:{METADATA_PREFIX}={quoteattr(METADATA_NAMESPACE)}>",
        f"      <{METADATA_PREFIX}:ipAddress>{escape(ip)}</{METADATA_PREFIX}:ipAddress>",
        *(
            [
                f"      <{METADATA_PREFIX}:hypervisor>{escape(spec.hypervisor_uuid)}"
                f"</{METADATA_PREFIX}:hypervisor>"
            ]
            if spec.hypervisor_uuid
            else []
        ),
        f"    </{METADATA_PREFIX}:vm>",
        "  </metadata>",
        f"  <memory unit='MiB'>{int(info.MemoryInMiB)}</memory>",
        f"  <vcpu>{num_vcpus(info, spec.host_cpus)}</vcpu>",
    ]
    # SMBIOS: what cloud-init's ds-identify looks at.
    system = [
        "<entry name='manufacturer'>SmallStack</entry>",
        "<entry name='product'>SmallStack</entry>",
    ]
    chassis = []
    if spec.hypervisor_uuid:
        system.append(f"<entry name='family'>{escape(spec.hypervisor_uuid)}</entry>")
    if spec.datasource == CloudInitDatasource.OPENSTACK:
        chassis.append("<entry name='asset'>OpenStack Nova</entry>")
    elif spec.datasource == CloudInitDatasource.NOCLOUD:
        system.append(f"<entry name='serial'>ds=nocloud;s={escape(NOCLOUD_URL)}</entry>")
    lines.append("  <sysinfo type='smbios'>")
    lines.append("    <system>" + "".join(system) + "</system>")
    if chassis:
        lines.append("    <chassis>" + "".join(chassis) + "</chassis>")
    lines.append("  </sysinfo>")
    machine = ""
    if info.MachineType in (MachineType.Q35, MachineType.PC):
        machine = f" machine='{info.MachineType.value}'"
    firmware = " firmware='efi'" if info.FirmwareType == FirmwareType.UEFI else ""
    lines.append(f"  <os{firmware}>")
    lines.append(f"    <type arch='x86_64'{machine}>hvm</type>")
    if spec.kernel:
        lines.append(f"    <kernel>{escape(spec.kernel)}</kernel>")
        if spec.initrd:
            lines.append(f"    <initrd>{escape(spec.initrd)}</initrd>")
        cmdline = [
            "console=ttyS0",
            "net.ifnames=0",
            f"root=LABEL={info.RootFileSystemLabel or root_label(ip)}",
            *spec.extra_cmdline,
        ]
        if info.ExtraKernelOptions:
            cmdline.append(info.ExtraKernelOptions)
        lines.append(f"    <cmdline>{escape(' '.join(cmdline))}</cmdline>")
    else:
        lines.append("    <boot dev='hd'/>")
    lines.append("    <smbios mode='sysinfo'/>")
    lines.append("  </os>")
    lines.append("  <features><acpi/><apic/></features>")
    if spec.domain_type == "kvm":
        lines.append("  <cpu mode='host-passthrough'/>")
    lines.append("  <clock offset='utc'/>")
    lines.append("  <on_poweroff>destroy</on_poweroff>")
    lines.append("  <on_reboot>restart</on_reboot>")
    lines.append("  <on_crash>destroy</on_crash>")
    lines.append("  <devices>")
    for index, disk in enumerate(spec.disks):
        dev, bus = _disk_target(disk.interface, index)
        lines.append("    <disk type='file' device='disk'>")
        lines.append(f"      <driver name='qemu' type='{disk.format.value}' discard='unmap'/>")
        lines.append(f"      <source file={quoteattr(disk.path)}/>")
        lines.append(f"      <target dev='{dev}' bus='{bus}'/>")
        lines.append("    </disk>")
    model = "e1000" if info.DisableVirtIO else "virtio"
    for index, (address, bridge) in enumerate(zip(addresses, spec.bridges)):
        lines.append("    <interface type='bridge'>")
        lines.append(f"      <mac address={quoteattr(address.MacAddress)}/>")
        lines.append(f"      <source bridge={quoteattr(bridge)}/>")
        lines.append(f"      <model type='{model}'/>")
        queues = info.NetworkEntries[index].NumQueues if index < len(info.NetworkEntries) else 0
        if queues > 1 and not info.DisableVirtIO:
            lines.append(f"      <driver name='vhost' queues='{queues}'/>")
        lines.append("    </interface>")
    if spec.serial_socket:
        source = f"<source mode='bind' path={quoteattr(spec.serial_socket)}/>"
        lines.append("    <serial type='unix'>")
        lines.append(f"      {source}")
    else:
        source = ""
        lines.append("    <serial type='pty'>")
    lines.append(f"      <log file={quoteattr(spec.bootlog)} append='on'/>")
    lines.append("      <target port='0'/>")
    lines.append("    </serial>")
    kind = "unix" if spec.serial_socket else "pty"
    lines.append(f"    <console type='{kind}'>{source}<target type='serial' port='0'/></console>")
    if info.ConsoleType == ConsoleType.VNC:
        lines.append("    <graphics type='vnc'><listen type='socket'/></graphics>")
        lines.append("    <input type='tablet' bus='usb'/>")
        lines.append("    <video><model type='vga'/></video>")
    elif info.ConsoleType == ConsoleType.DUMMY:
        lines.append("    <video><model type='vga'/></video>")
    else:
        lines.append("    <video><model type='none'/></video>")
    if info.WatchdogModel != WatchdogModel.NONE:
        action = {
            WatchdogAction.RESET: "reset",
            WatchdogAction.SHUTDOWN: "shutdown",
            WatchdogAction.POWEROFF: "poweroff",
        }.get(info.WatchdogAction, "none")
        lines.append(f"    <watchdog model='{info.WatchdogModel.value}' action='{action}'/>")
    lines.append("    <memballoon model='none'/>")
    lines.append("  </devices>")
    lines.append("</domain>")
    return "\n".join(lines) + "\n"
