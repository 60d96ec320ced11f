"""
The twistd plugin for the hypervisor daemon: ``twistd hypervisor``.

Only names the module that holds the options and the service factory; ServiceMaker
imports it lazily, so ``twistd --help`` never imports libvirt or Klein.
"""

from twisted.application.service import ServiceMaker

hypervisor = ServiceMaker(
    "SmallStack hypervisor",
    "tap",
    "Run VMs through libvirt and serve status pages, RPC, DHCP, TFTP and metadata.",
    "hypervisor",
)
