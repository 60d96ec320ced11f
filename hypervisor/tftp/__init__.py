"""
The TFTP server (read-only, for PXE and netbooted machines): L{codec} (pure bytes to
packets), L{session} (one read transfer's state, on an injected clock), L{backend}
(which bytes a client gets: its NetbootMachine files, then the boot directory),
L{protocol} (the Twisted sockets: port 69 and one ephemeral port per transfer) and
L{service} (the named service C{tftp}).
"""
