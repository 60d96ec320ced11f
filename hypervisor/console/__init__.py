"""
Consoles (reference §1.8): the serial port and VNC of a VM joined to a client
connection of any transport. L{hypervisor.console.service} decides (owners, one serial
connection per VM, states), L{hypervisor.console.pipe} relays bytes with flow control,
L{hypervisor.console.paths} says where the sockets are; the transports are
L{hypervisor.srpc.protocol} (SRPC) and L{web.console} (the HTTPS WebSocket and page).
"""
