# -*- test-case-name: tests.test_auth -*-
"""
Who is calling: the identity a transport derives from the caller's certificate.

The certificate parsing and the per-method access table arrive with the security
issue; the service layer already takes an L{Identity} everywhere and decides VM-level
access (owners, owner groups, method powers) with it, as the reference's manager does.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Identity:
    """
    A caller.

    @ivar username: the certificate's CN ("" = unauthenticated).
    @ivar groups: groups from the certificate (OID 1.3.6.1.4.1.9586.100.7.2).
    @ivar method_patterns: permitted-method globs (OID ...7.1), only from certificates
        verified against the full-authority CA.
    @ivar hypervisor_owner: the caller is an owner of the hypervisor (ChangeOwners).
    """

    username: str = ""
    groups: frozenset[str] = field(default_factory=frozenset)
    method_patterns: tuple[str, ...] = ()
    hypervisor_owner: bool = False

    def has_method_power(self, method: str) -> bool:
        """
        Whether the caller holds power over C{Hypervisor.<method>} (grant or ownership).
        """
        if self.hypervisor_owner:
            return True
        name = f"Hypervisor.{method}"
        return any(fnmatch.fnmatchcase(name, p) for p in self.method_patterns)


ROOT = Identity(username="root", method_patterns=("*.*",))
"""The daemon itself and local administration: every power."""
