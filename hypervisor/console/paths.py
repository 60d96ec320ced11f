"""
Where a VM's console sockets are.
"""

from __future__ import annotations

import hashlib
import os

SERIAL_SOCKET = "serial0.sock"
SHORT_DIRECTORY = "/run/smallstack-hypervisor-consoles"
MAX_SUN_PATH = 107
"""A unix socket path is at most 107 bytes (108 with its NUL)."""


def serial_socket_path(directory: str) -> str:
    """
    The serial port's socket of the VM whose directory is C{directory}:
    C{<directory>/serial0.sock}, or, when that path is too long for a unix socket (a
    deep C{-stateDir}), a name made from the directory's hash under
    L{SHORT_DIRECTORY} (the daemon creates that directory at start).
    """
    path = os.path.join(directory, SERIAL_SOCKET)
    if len(path.encode()) <= MAX_SUN_PATH:
        return path
    # Rare (a state directory over ~80 bytes deep): one mkdir of a /run directory.
    os.makedirs(SHORT_DIRECTORY, mode=0o700, exist_ok=True)
    digest = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:24]
    return os.path.join(SHORT_DIRECTORY, f"{digest}.sock")
