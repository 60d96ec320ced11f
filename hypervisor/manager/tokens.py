# -*- test-case-name: tests.test_migration_unit -*-
"""
VM access tokens (reference §1.6, Go C{getVmAccessToken}): an owner asks for a token
for one VM; whoever presents it (the target hypervisor of a migration or a copy)
acts as an owner of that VM, for the methods the reference honours a token in
(StartVm, StopVm, DestroyVm, DeleteVmVolume, ReorderVmVolumes, GetVmUserData,
PrepareVmForMigration, DiscardVmAccessToken and our ReadVmVolume).

- 32 random bytes from the OS (C{secrets}); one outstanding token per VM ("someone
  else has the access token" while one is); lifetime 1 minute to 1 day: an expired
  token matches nothing and is scrubbed when next looked at (no timer per token).
- A token is bound to the VM object it was made for: a VM destroyed and another
  created at the same IP does not inherit it.
- Comparison is constant-time (C{hmac.compare_digest}); tokens shorter than 32
  bytes never match (as Go's C{len(accessToken) >= 32} check).
- Tokens live in memory only: a restart of the daemon drops them (the caller asks
  again), as in the reference.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import replace
from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime

from hypervisor.auth import Identity
from hypervisor.errors import InvalidRequest, WrongState

TOKEN_BYTES = 32
MIN_LIFETIME = 60.0
MAX_LIFETIME = 24 * 3600.0


class _Token:
    def __init__(self, vm: Any, value: bytearray, expires: float) -> None:
        self.vm = vm
        self.value = value
        self.expires = expires


class AccessTokens:
    """
    The outstanding tokens, by VM IP.

    @param vms: returns the current VM object for an IP, or None.
    """

    def __init__(self, reactor: IReactorTime, vms: Any) -> None:
        self.reactor = reactor
        self.vms = vms
        self._tokens: dict[str, _Token] = {}

    def issue(self, vm: Any, lifetime: float) -> bytes:
        """
        A new token for C{vm} (the caller checked ownership).

        @raise InvalidRequest: the lifetime is out of range.
        @raise WrongState: a token for this VM is outstanding.
        """
        if lifetime < MIN_LIFETIME:
            raise InvalidRequest("lifetime is less than 1 minute")
        if lifetime > MAX_LIFETIME:
            raise InvalidRequest("lifetime is greater than 1 day")
        current = self._current(vm.ip)
        if current is not None and current.vm is vm:
            raise WrongState("someone else has the access token")
        if current is not None:
            self.discard(vm.ip)
        value = bytearray(secrets.token_bytes(TOKEN_BYTES))
        self._tokens[vm.ip] = _Token(vm, value, self.reactor.seconds() + lifetime)
        return bytes(value)

    def _current(self, ip: str) -> Optional[_Token]:
        current = self._tokens.get(ip)
        if current is not None and self.reactor.seconds() >= current.expires:
            self.discard(ip)
            return None
        return current

    def valid(self, ip: str, token: bytes) -> bool:
        """
        Whether C{token} is the current token of the VM at C{ip} (constant time).
        """
        current = self._current(ip)
        if current is None or len(token) < TOKEN_BYTES:
            return False
        if self.vms(ip) is not current.vm:
            self.discard(ip)  # the VM it was made for is gone
            return False
        return hmac.compare_digest(bytes(current.value), token)

    def identity(self, identity: Identity, ip: str, token: bytes) -> Identity:
        """
        C{identity} with owner rights over the VM at C{ip} when C{token} is its token;
        otherwise C{identity} unchanged (the ordinary checks then decide).
        """
        if token and self.valid(ip, token):
            return replace(identity, token_vm=ip)
        return identity

    def discard(self, ip: str) -> None:
        """
        Scrub and forget the VM's token (if any).
        """
        current = self._tokens.pop(ip, None)
        if current is None:
            return
        for i in range(len(current.value)):
            current.value[i] = 0

    def outstanding(self, ip: str) -> bool:
        """
        Whether a token for C{ip} is outstanding (for tests and pages).
        """
        return self._current(ip) is not None

    def clear(self) -> None:
        """
        Scrub every token (at stop).
        """
        for ip in list(self._tokens):
            self.discard(ip)
