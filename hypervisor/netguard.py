# -*- test-case-name: tests.test_netguard -*-
"""
Connection limits for port 6976: deadlines and caps that keep unauthenticated
clients from holding the daemon's descriptors (placeholder: filled in by the
security-hardening work).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocolFactory


def raise_nofile_limit() -> None:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit.
    """


def guard_factory(factory: IProtocolFactory, reactor: Any) -> IProtocolFactory:
    """
    Wrap the port's factory with connection limits.
    """
    return factory
