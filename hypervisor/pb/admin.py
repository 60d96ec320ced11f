# -*- test-case-name: tests.test_pb_admin -*-
"""
The runtime admin surface, beyond the Go daemon's methods, reached over PB
(C{root.callRemote("admin", action, request_json)}; C{hyper-control} subcommands
C{log-level}, C{list-clients}, C{disconnect-client}, C{reload-certificates},
C{reconcile}, C{disabled-state}; C{enable-hypervisor} and C{disable-hypervisor}
use C{Hypervisor.SetDisabledState} on every transport).

Admin certificates only: a certificate from CA.pem granting C{HypervisorAdmin.<Action>}
(C{HypervisorAdmin.*}, or C{*.*}), or an owner of the hypervisor (ChangeOwners).
A C{Hypervisor.*} grant, which fleet managers hold, is not enough: these actions
change the daemon itself. Every action, allowed or refused, is logged with the
caller's identity.

Actions (request and reply are JSON objects):

- C{GetLogLevels} C{{"Namespace": ...}} (optional) -> C{{"Levels": {namespace:
  level}, "Level": the level in force for Namespace}} (C{""}: the default)
- C{SetLogLevel} C{{"Namespace": ..., "Level": "debug"|"info"|"warn"|"error"|
  "critical"|"inherit"}} -> the levels
- C{ListClients} -> C{{"Clients": [{"Id", "Identity", "Groups", "Transport",
  "Address", "Since", "Calls", "Streams": [{"Id", "Method", "Since"}]}]}}: the PB
  sessions of every PB listener, with the streams and uploads they hold open; and
  C{"UpdateSubscribers": [{"Identity", "Queued"}]}: every GetUpdates stream of any
  transport (HTTPS, SRPC, PB), with the updates waiting for it
- C{DisconnectClient} C{{"Id": n}} -> C{{"Disconnected": n}}
- C{ReloadCertificates} -> what is now in force (L{hypervisor.tlsreload}): new
  connections on every TLS listener use the new server certificate and CA files
- C{Reconcile} -> C{{"VMs": n}} once a reconciliation with libvirt has run
- C{GetDisabledState} -> C{{"Disabled": bool}}; C{SetDisabledState}
  C{{"Disable": bool}} -> the same (as C{Hypervisor.SetDisabledState})
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger

from hypervisor.auth import Identity
from hypervisor.errors import AccessDenied, InvalidRequest, NotFound, Unavailable
from hypervisor.loglevels import LEVELS, LogLevels
from hypervisor.tlsreload import ReloadableTLS

SERVICE = "HypervisorAdmin"

ACTIONS = (
    "GetLogLevels",
    "SetLogLevel",
    "ListClients",
    "DisconnectClient",
    "ReloadCertificates",
    "Reconcile",
    "GetDisabledState",
    "SetDisabledState",
)


def _field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"field {name!r} must be a {kind.__name__}")
    return value


class AdminSurface:
    """
    The actions, over the manager, the TLS in force, the log levels and the PB
    sessions (set by L{hypervisor.pb.server.PbService}).
    """

    log = Logger()

    def __init__(
        self,
        manager: Any,
        tls: Optional[ReloadableTLS],
        levels: LogLevels = LEVELS,
        sessions: Optional[Any] = None,
    ) -> None:
        self.manager = manager
        self.tls = tls
        self.levels = levels
        self.sessions = sessions

    def allowed(self, identity: Identity, action: str) -> bool:
        """
        Whether C{identity} may run C{action}.
        """
        if identity.has_method_power(f"{SERVICE}.{action}"):
            return True
        if not identity.username:
            return False
        users, groups = self.manager.owner_users, self.manager.owner_groups
        return identity.username in users or bool(identity.groups & groups)

    async def run(
        self, action: str, body: dict[str, Any], identity: Identity, session: Any = None
    ) -> dict[str, Any]:
        """
        Run one action for C{identity}.

        @raise HypervisorError: refused (403), unknown (404), malformed (400).
        """
        who = identity.username or "?"
        if not isinstance(action, str) or action not in ACTIONS:
            raise NotFound(
                f"unknown admin action {str(action)[:60]!r}; known: {', '.join(ACTIONS)}"
            )
        if not self.allowed(identity, action):
            self.log.warn(
                "admin {action} refused for {who}: needs {service}.{action} in a CA.pem "
                "certificate, or hypervisor ownership",
                action=action,
                who=who,
                service=SERVICE,
            )
            raise AccessDenied(
                f"{SERVICE}.{action} needs an admin certificate (granting {SERVICE}.* or "
                "*.*) or hypervisor ownership"
            )
        reply: dict[str, Any] = await getattr(self, "_" + action)(body)
        self.log.info("admin {action} by {who}: {body}", action=action, who=who, body=_short(body))
        return reply

    async def _GetLogLevels(self, body: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = {"Levels": self.levels.get()}
        if "Namespace" in body:
            reply["Level"] = self.levels.level_for(_field(body, "Namespace", str))
        return reply

    async def _SetLogLevel(self, body: dict[str, Any]) -> dict[str, Any]:
        namespace = _field(body, "Namespace", str, "")
        level = _field(body, "Level", str)
        try:
            self.levels.set(namespace, level)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        return {"Levels": self.levels.get()}

    def _sessions(self) -> Any:
        if self.sessions is None:
            raise Unavailable("no PB sessions are tracked here")
        return self.sessions

    async def _ListClients(self, body: dict[str, Any]) -> dict[str, Any]:
        open_ = self._sessions().open
        hub = getattr(getattr(self.manager, "ctx", None), "hub", None)
        subscribers = [
            {"Identity": stream.name, "Queued": len(stream)}
            for stream in (hub.streams if hub is not None else [])
        ]
        return {
            "Clients": [open_[k].describe() for k in sorted(open_)],
            "UpdateSubscribers": subscribers,
        }

    async def _DisconnectClient(self, body: dict[str, Any]) -> dict[str, Any]:
        n = _field(body, "Id", int)
        session = self._sessions().open.get(n)
        if session is None or not session.disconnect():
            known = ", ".join(str(k) for k in sorted(self._sessions().open)) or "none"
            raise NotFound(f"no connected client {n}; connected: {known} (see list-clients)")
        return {"Disconnected": n}

    async def _ReloadCertificates(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.tls is None:
            raise Unavailable("this daemon's TLS cannot be reloaded")
        summary = await self.tls.reload(self.manager.runner)
        return dict(summary.as_dict(), Generation=self.tls.generation)

    async def _Reconcile(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.manager.reconciler.reconcile()
        return {"VMs": len(self.manager.vms)}

    async def _GetDisabledState(self, body: dict[str, Any]) -> dict[str, Any]:
        return {"Disabled": bool(self.manager.disabled)}

    async def _SetDisabledState(self, body: dict[str, Any]) -> dict[str, Any]:
        disable = _field(body, "Disable", bool)
        await self.manager.admin.set_disabled_state(disable)
        return {"Disabled": bool(self.manager.disabled)}


def _short(body: dict[str, Any]) -> str:
    import json

    text = json.dumps(body, sort_keys=True)
    return text if len(text) <= 200 else text[:197] + "..."
