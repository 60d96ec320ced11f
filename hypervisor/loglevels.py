# -*- test-case-name: tests.test_pb_admin -*-
"""
Log levels per namespace, changeable while the daemon runs (the PB admin surface's
C{log-level}).

L{LEVELS} is the daemon's one L{LogLevels}; the observers of L{hypervisor.logs}
(the JSON log file, the in-memory buffer of the C{/logs} pages, the foreground
stderr observer) are wrapped with L{filtered}, so an event below its namespace's
level reaches none of them. Namespaces are dotted (C{hypervisor.dhcp} covers
C{hypervisor.dhcp.protocol.DhcpServer}); C{""} is the default, C{debug} at start
(nothing is filtered until an operator asks).
"""

from __future__ import annotations

from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
)
from zope.interface import implementer

LEVEL_NAMES = tuple(level.name for level in LogLevel.iterconstants())


@implementer(ILogFilterPredicate)
class LogLevels:
    """
    The minimum level per namespace; a filter predicate for observers.
    """

    def __init__(self, default: LogLevel = LogLevel.debug) -> None:
        self._predicate = LogLevelFilterPredicate(default)

    def get(self) -> dict[str, str]:
        """
        Every namespace with a level of its own, and C{""} (the default).
        """
        levels = self._predicate._logLevelsByNamespace
        return {namespace: level.name for namespace, level in sorted(levels.items())}

    def level_for(self, namespace: str) -> str:
        """
        The level in force for C{namespace} (inherited from its parents).
        """
        return str(self._predicate.logLevelForNamespace(namespace).name)

    def set(self, namespace: str, level: str) -> None:
        """
        Set C{namespace}'s minimum level (C{""}: the default); C{level} C{"inherit"}
        removes the namespace's own level.

        @raise ValueError: an unknown level, or a malformed namespace.
        """
        if len(namespace) > 200 or any(c.isspace() for c in namespace):
            raise ValueError(f"malformed namespace {namespace[:60]!r}")
        if level == "inherit":
            if namespace:
                self._predicate._logLevelsByNamespace.pop(namespace, None)
            return
        try:
            value = LogLevel.levelWithName(level)
        except Exception:  # InvalidLogLevelError
            raise ValueError(
                f"unknown log level {level[:40]!r}; use one of {', '.join(LEVEL_NAMES)} "
                "or inherit"
            ) from None
        self._predicate.setLogLevelForNamespace(namespace, value)

    def reset(self) -> None:
        """
        Every namespace back to the default (debug).
        """
        self._predicate.clearLogLevels()

    def __call__(self, event: dict[str, Any]) -> Any:
        """
        The filter: events without a level or namespace (legacy ones) always pass.
        """
        if event.get("log_level") is None or not event.get("log_namespace"):
            return PredicateResult.maybe
        return self._predicate(event)


LEVELS = LogLevels()
"""The daemon's log levels."""


def filtered(observer: ILogObserver) -> ILogObserver:
    """
    C{observer} behind the daemon's log levels.
    """
    return FilteringLogObserver(observer, [LEVELS])
