"""
The console methods' requests and responses (reference §1.8, proto/hypervisor).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypervisor.codec import IPv4Text, Uint
from hypervisor.model import ConsoleType, MessageText

ConsoleTypeT = ConsoleType


@dataclass
class ConnectToVmSerialPortRequest:
    """
    ConnectToVmSerialPort: the VM and its serial port (only 0 exists).
    """

    IpAddress: IPv4Text = ""
    PortNumber: Uint = 0


@dataclass
class ConnectToVmConsoleRequest:
    """
    ConnectToVmConsole (VNC) and ConnectToVmManager.
    """

    IpAddress: IPv4Text = ""


@dataclass
class ConsoleResponse:
    """
    The first answer of a console stream: raw bytes follow when C{Error} is empty.
    """

    Error: MessageText = ""


@dataclass
class ChangeVmConsoleTypeRequest:
    """
    ChangeVmConsoleType (a stopped VM).
    """

    ConsoleType: ConsoleTypeT = ConsoleType.NONE
    IpAddress: IPv4Text = ""
