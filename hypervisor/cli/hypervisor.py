# -*- test-case-name: tests.test_cli -*-
"""
The C{hypervisor} command: C{hypervisor [flags] [run|stop|stop-vms-on-next-stop|
check-vms|repair-vm-volume-allocations]}.

C{run} (the default) runs the same service tree as C{twistd -n hypervisor}, in the
foreground, logging to stderr. The other subcommands talk to a running daemon over
its control socket, or work on the state directory while it is stopped.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from twisted.python import usage

from tap.options import Options


class _NoFlags(usage.Options):
    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected arguments: {' '.join(args)}")


class RunOptions(_NoFlags):
    """
    C{hypervisor run}.
    """

    synopsis = "run"


class StopOptions(_NoFlags):
    """
    C{hypervisor stop}.
    """

    synopsis = "stop"


class StopVmsOptions(_NoFlags):
    """
    C{hypervisor stop-vms-on-next-stop}.
    """

    synopsis = "stop-vms-on-next-stop"


class CheckVmsOptions(_NoFlags):
    """
    C{hypervisor check-vms}.
    """

    synopsis = "check-vms"


class RepairOptions(_NoFlags):
    """
    C{hypervisor repair-vm-volume-allocations}.
    """

    synopsis = "repair-vm-volume-allocations"


class HypervisorCommand(Options):
    """
    The daemon's flags plus one subcommand.
    """

    synopsis = "[flags] [run|stop|stop-vms-on-next-stop|check-vms|repair-vm-volume-allocations]"
    subCommands = [
        ["run", None, RunOptions,
         "Run the daemon in the foreground (default when no subcommand is given)"],
        ["stop", None, StopOptions,
         "Stop the running daemon, leaving VMs running (unless stop-vms-on-next-stop)"],
        ["stop-vms-on-next-stop", None, StopVmsOptions,
         "Make the next stop shut all VMs down first (for host shutdown)"],
        ["check-vms", None, CheckVmsOptions,
         "Report VM volumes whose size or disk allocation is wrong (offline)"],
        ["repair-vm-volume-allocations", None, RepairOptions,
         "Allocate the missing blocks of under-allocated VM volumes (offline)"],
    ]
    defaultSubCommand = "run"


def _run(options: HypervisorCommand) -> int:
    from twisted.scripts import twistd

    config = twistd.ServerOptions()
    config.parseOptions(
        ["--nodaemon", "--pidfile=", "--logger=hypervisor.logs.stderr_observer",
         "hypervisor", *options.go_flags()]
    )
    try:
        twistd.runApp(config)
    except Exception as e:
        from hypervisor.store import StateDirectoryError

        if isinstance(e, StateDirectoryError):
            print(f"hypervisor: {e}", file=sys.stderr)
            return 1
        raise
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Entry point of the C{hypervisor} console script.
    """
    if argv is None:
        argv = sys.argv[1:]
    options = HypervisorCommand()
    try:
        options.parseOptions(argv)
    except usage.UsageError as e:
        print(f"hypervisor: {e}", file=sys.stderr)
        print("Run 'hypervisor -h' for the flags and subcommands.", file=sys.stderr)
        return 2
    command = options.subCommand or "run"
    if command == "run":
        return _run(options)
    from hypervisor import control
    from hypervisor.store import StateDirectory

    state = StateDirectory(options["stateDir"])
    if command in ("stop", "stop-vms-on-next-stop"):
        try:
            control.send_command(state.control_path, command)
        except control.ControlError as e:
            print(f"hypervisor {command}: {e}", file=sys.stderr)
            return 1
        if command == "stop":
            print("hypervisor stopped")
        else:
            print("VMs will be stopped on the next stop")
        return 0
    from hypervisor.manager import volumes

    return volumes.check_command(state, repair=command == "repair-vm-volume-allocations")


if __name__ == "__main__":
    sys.exit(main())
