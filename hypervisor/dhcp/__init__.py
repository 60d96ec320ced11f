"""
The DHCP server of the hypervisor (the named service C{dhcp}): a pure codec
(L{hypervisor.dhcp.codec}), the decisions (L{hypervisor.dhcp.policy}), a Twisted
protocol that only dispatches (L{hypervisor.dhcp.protocol}) and the service that binds
one socket per serving interface (L{hypervisor.dhcp.service}).
"""
