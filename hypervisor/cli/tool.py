# -*- test-case-name: tests.test_vm_control,tests.test_cli_flags -*-
"""
What C{vm-control} and C{hyper-control} share above the transports: the flags both Go
tools have, finding the hypervisor (directly, or through a fleet manager as Go's
C{vm-control} does), Go-style logging to stderr, and running one command under its
own reactor with Go's error texts (C{error listing VMs: ...}, exit 1).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any, Awaitable, Callable, Optional, Sequence, Type, TypeVar

from hypervisor import codec
from hypervisor.cli import goflags
from hypervisor.cli.client import ClientError
from hypervisor.cli.goflags import Flag
from hypervisor.cli.transport import (
    TRANSPORTS,
    OnMessage,
    Tail,
    Transport,
    best_certificate,
    error_of,
    make_transport,
    srpc_available,
)

T = TypeVar("T")

HOME = os.path.expanduser("~")
HYPERVISOR_PORT = 6976
FLEET_MANAGER_PORT = 6977

SRPC_UNUSED = "no SRPC proxy or Unix socket support in this client"


def default_transport() -> str:
    """
    SRPC when its client library is there, else HTTPS.
    """
    return "srpc" if srpc_available() else "https"


def common_flags(fleet_manager: bool = True) -> list[Flag]:
    """
    The flags both Go tools have (same names, types, defaults and texts), and ours.

    @param fleet_manager: whether the tool routes calls through a fleet manager
        (vm-control does; hyper-control's hypervisor commands never do).
    """
    fleet_unused = "" if fleet_manager else "this tool's commands talk to a hypervisor directly"
    return [
        Flag(
            "certDirectory",
            "string",
            os.path.join(HOME, ".ssl"),
            "Name of directory containing user SSL certificates",
        ),
        Flag(
            "fleetManagerHostname",
            "string",
            "",
            "Hostname of Fleet Manager",
            unused=fleet_unused,
        ),
        Flag(
            "fleetManagerPortNum",
            "uint",
            str(FLEET_MANAGER_PORT),
            "Port number of Fleet Resource Manager",
            unused=fleet_unused,
        ),
        Flag("hypervisorHostname", "string", "", "Hostname of hypervisor"),
        Flag("hypervisorPortNum", "uint", str(HYPERVISOR_PORT), "Port number of hypervisor"),
        Flag("logDatestamps", "bool", "false", "If true, prefix logs with datestamps"),
        Flag("logDebugLevel", "int", "-1", "Debug log level"),
        Flag(
            "logSubseconds",
            "bool",
            "false",
            "If true, datestamps will have subsecond resolution",
        ),
        Flag(
            "srpcClientDoNotUseMethodPowers",
            "bool",
            "false",
            "If true, do not use method powers when connecting to servers",
        ),
        Flag(
            "srpcProxy",
            "string",
            "",
            "Proxy to use (only works for some operations)",
            unused=SRPC_UNUSED,
        ),
        Flag(
            "srpcTrustVmOwners",
            "bool",
            "true",
            "If true, trust the SmallStack VM owners for all method access",
            unused="a server-side setting; this client serves nothing",
        ),
        Flag(
            "srpcUnixSocketPath",
            "string",
            f"@SRPC.{os.getpid()}",
            "Pathname for server Unix sockets",
            unused=SRPC_UNUSED,
        ),
        # Ours:
        Flag(
            "CAfile",
            "string",
            "/etc/ssl/CA.pem",
            "CA to verify the hypervisor's certificate with (the Go tools never verify it;"
            " not verified here either if the file does not exist)",
            go=False,
        ),
        Flag(
            "transport",
            "string",
            default_transport(),
            "How to reach the hypervisor: srpc (SmallStack's SRPC over TLS, as the Go tools;"
            " reaches Go hypervisors and fleet managers too), https (this hypervisor's"
            " HTTPS JSON API, POST /rpc/Hypervisor.<Method>) or pb (this hypervisor's"
            " Perspective Broker service, port 8787 or -pbEndpoint; the admin commands)",
            parse=goflags.one_of(*TRANSPORTS),
            go=False,
        ),
        Flag(
            "pbEndpoint",
            "string",
            "",
            "With -transport pb: a Twisted client endpoint string for the hypervisor's PB"
            " service, TLS added on top (default tcp:<hypervisorHostname>:8787; e.g."
            " tcp:hv1:8787, tor:ADDRESS.onion:8787)",
            go=False,
        ),
    ]


class Tool:
    """
    One run of a tool: the parsed flags, the reactor, the transports it opened.
    """

    def __init__(
        self, program: str, values: dict[str, Any], reactor: Any, fleet_manager: bool = True
    ) -> None:
        self.program = program
        self.fleet_manager_routing = fleet_manager
        self.v = values
        self.reactor = reactor
        self.pair = best_certificate(values["certDirectory"])
        self._open: list[Transport] = []

    # Logging, as Go's log package with the tools' flags ---------------------------

    def log(self, message: str) -> None:
        """
        A line on stderr, with Go's datestamp prefix if C{-logDatestamps}.
        """
        prefix = ""
        if self.v["logDatestamps"]:
            now = time.time()
            prefix = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now))
            if self.v.get("logSubseconds"):
                prefix += f".{int(now % 1 * 1e6):06d}"
            prefix += " "
        print(prefix + message, file=sys.stderr, flush=True)

    def debug(self, level: int, message: str) -> None:
        """
        A line logged only at C{-logDebugLevel} C{level} or above.
        """
        if self.v["logDebugLevel"] >= level:
            self.log(message)

    # Finding and calling a hypervisor ---------------------------------------------

    def transport(self, host: str, port: int) -> Transport:
        """
        A transport to C{host:port} of the kind C{-transport} names.
        """
        t = make_transport(
            self.v["transport"],
            self.reactor,
            host,
            port,
            self.pair,
            self.v["CAfile"],
            self.v.get("srpcClientDoNotUseMethodPowers", False),
            self.v.get("pbEndpoint", ""),
        )
        self._open.append(t)
        return t

    def fleet_manager(self) -> Transport:
        """
        The fleet manager of C{-fleetManagerHostname} (SRPC only: it speaks nothing else).
        """
        if self.v["transport"] != "srpc":
            raise ClientError(
                "a fleet manager is reached over SRPC only: use -transport=srpc "
                "(or -hypervisorHostname to talk to a hypervisor directly)"
            )
        return self.transport(self.v["fleetManagerHostname"], self.v["fleetManagerPortNum"])

    async def hypervisor(self, vm_ip: str = "") -> Transport:
        """
        The hypervisor to talk to, found as Go's vm-control finds it: for a VM, through
        the fleet manager when C{-fleetManagerHostname} is given
        (C{FleetManager.GetHypervisorForVM}); else C{-hypervisorHostname}, else
        localhost.

        @raise ClientError: a fleet manager is given for a command that is not about
            one VM (listing through a fleet manager is not implemented here).
        """
        if self.fleet_manager_routing and self.v.get("fleetManagerHostname"):
            if not vm_ip:
                raise ClientError(
                    "this command through a fleet manager (FleetManager.ListVMsInLocation)"
                    " is not implemented here: give -hypervisorHostname"
                )
            fm = self.fleet_manager()
            reply = await self.call(
                fm, "FleetManager.GetHypervisorForVM", {"IpAddress": vm_ip}, None
            )
            return self._at(str(reply.get("HypervisorAddress") or ""))
        host = self.v["hypervisorHostname"] or "localhost"
        return self.transport(host, self.v["hypervisorPortNum"])

    async def hypervisors_for_new_vm(self) -> list[Transport]:
        """
        Where create-vm may create the VM, in order, as Go's vm-control chooses:
        C{-hypervisorHostname} if given; else the fleet manager's hypervisors in
        C{-location} (C{FleetManager.ListHypervisorsInLocation}); else localhost.
        """
        if (
            self.fleet_manager_routing
            and self.v.get("fleetManagerHostname")
            and not self.v["hypervisorHostname"]
        ):
            fm = self.fleet_manager()
            reply = await self.call(
                fm,
                "FleetManager.ListHypervisorsInLocation",
                {
                    "HypervisorTagsToMatch": self.v.get("hypervisorTagsToMatch") or None,
                    "IncludeUnhealthy": bool(self.v.get("includeUnhealthy")),
                    "Location": self.v.get("location", ""),
                    "SubnetId": self.v.get("subnetId", ""),
                },
                None,
            )
            addresses = reply.get("HypervisorAddresses") or []
            if not addresses:
                raise ClientError("the fleet manager has no hypervisor for this VM")
            return [self._at(str(a)) for a in addresses]
        return [await self.hypervisor()]

    def _at(self, address: str) -> Transport:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ClientError(f"the fleet manager answered a bad address {address!r}")
        self.debug(0, f"hypervisor: {address}")
        return self.transport(host, int(port))

    async def call(
        self,
        transport: Transport,
        method: str,
        request: Any,
        reply_type: Optional[Type[T]],
        tail: Optional[Tail] = None,
        on_message: Optional[OnMessage] = None,
        check: bool = True,
    ) -> Any:
        """
        Call a method with a model object (or dict, or None: no request message) as
        request; decode the final reply into C{reply_type} (a dict if None).

        @raise ClientError: the call failed, or (with C{check}) the reply has an Error.
        """
        if request is None:
            data = b""  # nothing sent after the method line (GetUpdates, as Go's)
        elif isinstance(request, dict):
            data = json.dumps(request, separators=(",", ":")).encode()
        else:
            data = codec.encode(request)
        raw = await transport.call(method, data, tail, on_message)
        if check:
            error = error_of(raw)
            if error:
                raise ClientError(error)
        if reply_type is None:
            if not raw:
                return {}
            try:
                value = json.loads(raw)
            except ValueError:
                raise ClientError(f"malformed reply: {raw[:200]!r}") from None
            return value if isinstance(value, dict) else {}
        return decode(reply_type, raw)

    def close(self) -> None:
        """
        Close every transport opened.
        """
        for t in self._open:
            t.close()


def decode(reply_type: Type[T], raw: bytes) -> T:
    """
    A reply decoded into its model type; a misfit is a L{ClientError}.
    """
    try:
        return codec.decode(reply_type, raw)
    except codec.DecodeError as e:
        raise ClientError(f"malformed reply: {e}") from None


def show(obj: Any) -> None:
    """
    Print a model object as Go's tools do (json.WriteWithIndent, 4 spaces).
    """
    print(codec.encode(obj, indent=4).decode())


Runner = Callable[[Tool, list[str]], Awaitable[int]]


def main(
    program: str,
    argv: Optional[Sequence[str]],
    table: list[Flag],
    commands: list[goflags.Command],
    runners: dict[str, Runner],
    notes: str = "",
    fleet_manager: bool = True,
) -> int:
    """
    Parse, then run one command; the exit status (2: usage, 1: failed).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        parsed = goflags.parse(args, table, commands)
    except goflags.HelpRequested:
        print(goflags.usage(program, table, commands, notes))
        return 0
    except goflags.UsageError as e:
        print(f"{program}: {e}\nRun '{program} -h' for the flags and commands.", file=sys.stderr)
        return 2
    command = parsed.command
    assert command is not None
    if command.unavailable or command.name not in runners:
        print(
            f"{program}: {command.name} is not available in this implementation: "
            f"{command.unavailable or 'not implemented'}",
            file=sys.stderr,
        )
        return 2
    return run(program, parsed.values, command, runners[command.name], parsed.args, fleet_manager)


async def execute(
    program: str,
    values: dict[str, Any],
    command: goflags.Command,
    runner: Runner,
    args: list[str],
    reactor: Any,
    fleet_manager: bool = True,
) -> int:
    """
    Run a command on a running reactor; errors print as Go's (C{error <action>: ...}).
    """
    tool = Tool(program, values, reactor, fleet_manager)
    # Interrupted (^C): unblock any thread still reading a connection.
    trigger = reactor.addSystemEventTrigger("before", "shutdown", tool.close)
    if tool.pair is None:
        print(
            f"{program}: no client certificate in {values['certDirectory']} "
            "(*.cert + *.key); create one with 'hypervisor make-certs --user NAME'",
            file=sys.stderr,
        )
    try:
        return await runner(tool, args)
    except ClientError as e:
        tool.log(f"error {command.action or 'running ' + command.name}: {e}")
        return 1
    finally:
        reactor.removeSystemEventTrigger(trigger)
        tool.close()


def run(
    program: str,
    values: dict[str, Any],
    command: goflags.Command,
    runner: Runner,
    args: list[str],
    fleet_manager: bool = True,
) -> int:
    """
    Run a command under its own reactor; return the exit status.
    """
    from twisted.internet import defer, task

    status = [0]

    async def go(reactor: Any) -> None:
        # ^C ends the tool at once, as it ends the Go tools (SIGINT's default action):
        # Twisted's handler would stop the reactor and wait for the threads, and a
        # thread blocked reading a stream could keep the tool alive.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        status[0] = await execute(program, values, command, runner, args, reactor, fleet_manager)

    try:
        task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    except SystemExit as e:
        if e.code:
            return int(e.code)
    return status[0]
