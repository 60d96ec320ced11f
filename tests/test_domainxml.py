"""
Tests for L{hypervisor.virt.domainxml}.
"""

from __future__ import annotations

from xml.etree import ElementTree

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.errors import InvalidRequest
from hypervisor.model import (
    Address,
    CloudInitDatasource,
    ConsoleType,
    NetworkEntry,
    VmInfo,
    VolumeFormat,
    VolumeInterface,
)
from hypervisor.virt import domainxml
from hypervisor.virt.domains import METADATA_NAMESPACE


def build(info: VmInfo, **spec: object) -> ElementTree.Element:
    defaults: dict = dict(
        domain_type="qemu",
        bootlog="/s/VMs/10.0.0.2/bootlog",
        disks=[domainxml.DiskFile("/v/10.0.0.2/root")],
        bridges=["br@net"],
        host_cpus=4,
        hypervisor_uuid="abc",
    )
    defaults.update(spec)
    return ElementTree.fromstring(
        domainxml.build_domain_xml(info, domainxml.DomainSpec(**defaults))
    )


class DomainXmlTests(SynchronousTestCase):
    """
    What goes into a VM's domain.
    """

    def setUp(self) -> None:
        self.info = VmInfo(
            Address=Address("10.0.0.2", "52:54:0a:00:00:02"),
            MemoryInMiB=256,
            MilliCPUs=1500,
            Tags={"Name": "<web>"},
        )

    def test_basics(self) -> None:
        """
        Name, metadata with the IP, memory, vCPUs, NIC on the bridge with the MAC,
        serial log, type, and escaping of hostile tag values.
        """
        root = build(self.info)
        self.assertEqual(root.get("type"), "qemu")
        self.assertEqual(root.findtext("name"), "vm-10.0.0.2")
        self.assertEqual(root.findtext("title"), "<web>")
        self.assertEqual(
            root.findtext(
                f"metadata/{{{METADATA_NAMESPACE}}}vm/" f"{{{METADATA_NAMESPACE}}}ipAddress"
            ),
            "10.0.0.2",
        )
        self.assertEqual(root.findtext("memory"), "256")
        self.assertEqual(root.findtext("vcpu"), "2")
        nic = root.find("devices/interface")
        assert nic is not None
        self.assertEqual(nic.find("mac").get("address"), "52:54:0a:00:00:02")
        self.assertEqual(nic.find("source").get("bridge"), "br@net")
        self.assertEqual(nic.find("model").get("type"), "virtio")
        self.assertEqual(root.find("devices/serial/log").get("file"), "/s/VMs/10.0.0.2/bootlog")
        self.assertIsNone(root.find("cpu"))

    def test_kvm_cpu_and_vcpu_cap(self) -> None:
        """
        kvm domains pass the host CPU through; vCPUs are capped at the host's.
        """
        self.info.VirtualCPUs = 16
        root = build(self.info, domain_type="kvm")
        self.assertEqual(root.find("cpu").get("mode"), "host-passthrough")
        self.assertEqual(root.findtext("vcpu"), "4")

    def test_smbios_datasources(self) -> None:
        """
        OpenStack: chassis asset tag "OpenStack Nova"; NoCloud: system serial with the
        seed URL; product SmallStack either way.
        """
        root = build(self.info)
        self.assertEqual(root.findtext("sysinfo/chassis/entry[@name='asset']"), "OpenStack Nova")
        self.assertEqual(root.findtext("sysinfo/system/entry[@name='product']"), "SmallStack")
        self.assertEqual(root.find("os/smbios").get("mode"), "sysinfo")
        root = build(self.info, datasource=CloudInitDatasource.NOCLOUD)
        self.assertEqual(
            root.findtext("sysinfo/system/entry[@name='serial']"),
            "ds=nocloud;s=http://169.254.169.254/nocloud/",
        )
        self.assertIsNone(root.find("sysinfo/chassis"))

    def test_direct_kernel_boot(self) -> None:
        """
        Kernel, initrd and a command line with the root label and extra options.
        """
        self.info.ExtraKernelOptions = "quiet hv.mode=stay"
        root = build(self.info, kernel="/v/k", initrd="/v/i")
        self.assertEqual(root.findtext("os/kernel"), "/v/k")
        self.assertEqual(root.findtext("os/initrd"), "/v/i")
        self.assertEqual(
            root.findtext("os/cmdline"),
            "console=ttyS0 net.ifnames=0 root=LABEL=rootfs@0a000002 " "quiet hv.mode=stay",
        )

    def test_disks_nics_console(self) -> None:
        """
        Disks get their format and bus; e1000 with DisableVirtIO; queues; VNC.
        """
        self.info.DisableVirtIO = True
        self.info.SecondaryAddresses = [Address("10.1.0.2", "52:54:0a:01:00:02")]
        self.info.NetworkEntries = [NetworkEntry(NumQueues=4)]
        self.info.ConsoleType = ConsoleType.VNC
        root = build(
            self.info,
            bridges=["br@net", "br@b"],
            disks=[
                domainxml.DiskFile("/v/root", VolumeFormat.QCOW2),
                domainxml.DiskFile("/v/sec", VolumeFormat.RAW, VolumeInterface.IDE),
            ],
        )
        disks = root.findall("devices/disk")
        self.assertEqual([d.find("driver").get("type") for d in disks], ["qcow2", "raw"])
        self.assertEqual([d.find("target").get("dev") for d in disks], ["vda", "hdb"])
        nics = root.findall("devices/interface")
        self.assertEqual([n.find("model").get("type") for n in nics], ["e1000", "e1000"])
        self.assertEqual(root.find("devices/graphics/listen").get("type"), "socket")
        self.assertRaises(
            InvalidRequest,
            build,
            self.info,
            bridges=["a", "b"],
            disks=[domainxml.DiskFile("/v/x", interface=VolumeInterface.NVME)],
        )
