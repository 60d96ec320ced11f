# -*- test-case-name: tests.test_manager_state -*-
"""
The seam between the DHCP server and the manager: the server reports each DHCP
acknowledgement it sends (L{DhcpAcknowledgements.acknowledged}); CreateVm, StartVm and
RebootVm with a C{DhcpTimeout} wait for the VM's MAC (L{DhcpAcknowledgements.wait}).

One object is made in C{makeService} and handed to both (constructor injection), so
neither needs the other.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime


class IDhcpAcknowledgements(Protocol):
    """
    What the manager needs from a DHCP server.

    @ivar serving: whether a DHCP server reports acknowledgements here at all.
    """

    serving: bool

    def wait(self, mac: str, timeout: float) -> "Deferred[bool]":
        """
        Fire with True when C{mac} is acknowledged within C{timeout} seconds, else
        False.
        """


class DhcpAcknowledgements:
    """
    Waiters for DHCP acknowledgements, by MAC.
    """

    def __init__(self, reactor: IReactorTime, serving: bool = False) -> None:
        self.reactor = reactor
        self.serving = serving
        self._waiters: dict[str, list[Deferred[bool]]] = {}

    def wait(self, mac: str, timeout: float) -> "Deferred[bool]":
        """
        Wait for C{mac}'s next acknowledgement, at most C{timeout} seconds.
        """
        mac = mac.lower()
        d: Deferred[bool] = Deferred()
        self._waiters.setdefault(mac, []).append(d)

        def expire() -> None:
            waiters = self._waiters.get(mac, [])
            if d in waiters:
                waiters.remove(d)
                if not waiters:
                    del self._waiters[mac]
                d.callback(False)

        call = self.reactor.callLater(timeout, expire)

        def cancel(result: bool) -> bool:
            if call.active():
                call.cancel()
            return result

        return d.addBoth(cancel)

    def acknowledged(self, mac: str) -> None:
        """
        The DHCP server acknowledged C{mac}: wake its waiters.
        """
        for d in self._waiters.pop(mac.lower(), []):
            d.callback(True)
