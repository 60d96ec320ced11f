# -*- test-case-name: tests.test_cli -*-
"""
The C{hypervisor} command: C{hypervisor [flags] [run|stop|stop-vms-on-next-stop|
check-vms|repair-vm-volume-allocations]}.

C{run} (the default) runs the same service tree as C{twistd -n hypervisor}, in the
foreground, logging to stderr. The other subcommands talk to a running daemon over
its control socket, or work on the state directory while it is stopped.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

from twisted.python import usage

from hypervisor.options import Options


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


class OnionAddressOptions(_NoFlags):
    """
    C{hypervisor onion-address}.
    """

    synopsis = "onion-address"


class MakeCertsOptions(usage.Options):
    """
    C{hypervisor make-certs}: the CA, the daemon's certificate, user certificates.
    """

    synopsis = "make-certs [--user NAME [--groups G1,G2] [--methods 'Hypervisor.*']]"
    longdesc = (
        "Creates what is missing: the CA (-CAfile, its key beside it as .key), the "
        "daemon's certificate and key (-certFile, -keyFile) for this host's names, "
        "and, with --user, a user certificate NAME.cert/NAME.key in --out (default "
        "~/.ssl, where vm-control looks). Existing files are never overwritten."
    )
    optParameters = [
        ["user", "u", "", "Username (certificate CN) of a user certificate to make"],
        ["groups", "g", "", "Comma-separated groups for the user certificate"],
        [
            "methods",
            "m",
            "",
            "Comma-separated permitted methods, e.g. 'Hypervisor.*' "
            "or '*.*' (grants count only with certificates signed by -CAfile)",
        ],
        ["out", "o", os.path.expanduser("~/.ssl"), "Directory for the user certificate"],
        ["hostnames", None, "", "Extra comma-separated names/IPs for the daemon's " "certificate"],
        ["days", None, 3650, "Validity of new certificates, in days", int],
    ]

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected arguments: {' '.join(args)}")


class ServeImagesOptions(usage.Options):
    """
    C{hypervisor serve-images DIR}: the image server for ImageName.
    """

    synopsis = "serve-images [--port N] DIR"
    longdesc = (
        "Serves the raw and qcow2 images in DIR over HTTPS for ImageName: "
        "GET /images/<name> answers DIR/<name> (names may contain '/'). Uses "
        "-certFile/-keyFile and requires client certificates signed by -CAfile, as "
        "the daemon presents its own. Daemons fetch from "
        "-imageServerHostname:-imageServerPortNum (SmallStack's image server speaks "
        "its own protocol; this plain HTTPS layout is ours)."
    )
    optParameters = [
        ["port", "p", None, "Port to listen on (default: -imageServerPortNum)", int],
    ]

    def parseArgs(self, *args: str) -> None:
        if len(args) != 1:
            raise usage.UsageError("serve-images takes one directory")
        self["directory"] = args[0]


class HypervisorCommand(Options):
    """
    The daemon's flags plus one subcommand.
    """

    synopsis = "[flags] [run|stop|stop-vms-on-next-stop|check-vms|repair-vm-volume-allocations]"
    subCommands = [
        [
            "run",
            None,
            RunOptions,
            "Run the daemon in the foreground (default when no subcommand is given)",
        ],
        [
            "stop",
            None,
            StopOptions,
            "Stop the running daemon, leaving VMs running (unless stop-vms-on-next-stop)",
        ],
        [
            "stop-vms-on-next-stop",
            None,
            StopVmsOptions,
            "Make the next stop shut all VMs down first (for host shutdown)",
        ],
        [
            "check-vms",
            None,
            CheckVmsOptions,
            "Report VM volumes whose size or disk allocation is wrong (offline)",
        ],
        [
            "repair-vm-volume-allocations",
            None,
            RepairOptions,
            "Allocate the missing blocks of under-allocated VM volumes (offline)",
        ],
        [
            "make-certs",
            None,
            MakeCertsOptions,
            "Create the CA, the daemon's TLS certificate and user certificates",
        ],
        [
            "serve-images",
            None,
            ServeImagesOptions,
            "Serve DIR's images over HTTPS by name (GET /images/<name>) for ImageName",
        ],
        [
            "onion-address",
            None,
            OnionAddressOptions,
            "Print the onion address of -pbOnion (its key in <stateDir>/onion, made if missing)",
        ],
    ]
    defaultSubCommand = "run"


def _run(options: HypervisorCommand) -> int:
    from twisted.application.service import ServiceMaker
    from twisted.scripts import twistd

    config = twistd.ServerOptions()
    # twistd's own options only: naming the "hypervisor" subcommand would make twistd
    # import every installed twistd plugin to list them (~0.3 s of every start).
    config.parseOptions(
        ["--nodaemon", "--no_save", "--pidfile=", "--logger=hypervisor.logs.stderr_observer"]
    )
    daemon_options = Options()
    daemon_options.parseOptions(options.go_flags())
    config.subCommand = "hypervisor"
    config.subOptions = daemon_options
    config.loadedPlugins = {"hypervisor": ServiceMaker("hypervisor", "tap", "", "hypervisor")}
    try:
        twistd.runApp(config)
    except Exception as e:
        from hypervisor.store import StateDirectoryError

        if isinstance(e, StateDirectoryError):
            print(f"hypervisor: {e}", file=sys.stderr)
            return 1
        raise
    return 0


def make_certs(options: Options, sub: usage.Options) -> int:
    """
    Create missing certificates; print what was made.
    """
    from hypervisor import certs

    try:
        ca_key, ca_cert, created = certs.ensure_ca(options["CAfile"])
    except (ValueError, OSError) as e:
        print(f"hypervisor make-certs: {e}", file=sys.stderr)
        return 1
    print(f"{'created' if created else 'using'} CA {options['CAfile']}")
    days = sub["days"]
    if not os.path.exists(options["certFile"]) or not os.path.exists(options["keyFile"]):
        names = certs.default_server_names() + [
            n.strip() for n in sub["hostnames"].split(",") if n.strip()
        ]
        if options["pbOnion"]:
            # Clients reaching PB over Tor verify the certificate for the onion address.
            from hypervisor.onion import state_key

            names.append(state_key(options["stateDir"]).address)
        key, cert = certs.make_certificate(ca_key, ca_cert, names[0], server_names=names, days=days)
        certs.write_pair(options["certFile"], options["keyFile"], key, cert)
        print(f"created the daemon's certificate {options['certFile']} for " f"{', '.join(names)}")
    else:
        print(f"using the daemon's certificate {options['certFile']}")
        if options["pbOnion"]:
            from hypervisor.onion import certificate_lacks_onion

            lacking = certificate_lacks_onion(options["certFile"], options["stateDir"])
            if lacking:
                print(f"hypervisor make-certs: {lacking}", file=sys.stderr)
    if sub["user"]:
        out = sub["out"]
        cert_path = os.path.join(out, f"{sub['user']}.cert")
        key_path = os.path.join(out, f"{sub['user']}.key")
        if os.path.exists(cert_path):
            print(f"{cert_path} exists: not overwritten", file=sys.stderr)
            return 1
        groups = [g.strip() for g in sub["groups"].split(",") if g.strip()]
        methods = [m.strip() for m in sub["methods"].split(",") if m.strip()]
        bad = [m for m in methods if m.count(".") != 1]
        if bad:
            print(f"hypervisor make-certs: methods must be Service.Method: {bad}", file=sys.stderr)
            return 2
        key, cert = certs.make_certificate(
            ca_key, ca_cert, sub["user"], groups=groups, methods=methods, days=days
        )
        os.makedirs(out, mode=0o700, exist_ok=True)
        certs.write_pair(cert_path, key_path, key, cert)
        print(
            f"created user certificate {cert_path} (user {sub['user']}, groups "
            f"{groups or 'none'}, methods {methods or 'none'})"
        )
    return 0


def test_memory_available(mebibytes: int) -> int:
    """
    Go's C{-testMemoryAvailable N}: allocate N MiB, touch every page, exit 0 if that
    worked (1 with a message if not).
    """
    import mmap

    size = mebibytes << 20
    try:
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, size, mmap.PAGESIZE):
            memory[offset] = 1
        memory.close()
    except (OSError, MemoryError, OverflowError) as e:
        print(f"hypervisor: cannot allocate {mebibytes} MiB: {e}", file=sys.stderr)
        return 1
    print(f"allocated {mebibytes} MiB")
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
    if options["testMemoryAvailable"]:
        return test_memory_available(options["testMemoryAvailable"])
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
    if command == "make-certs":
        return make_certs(options, options.subOptions)
    if command == "onion-address":
        from hypervisor.onion import OnionKeyError, state_key

        try:
            print(state_key(options["stateDir"]).address)
        except (OSError, OnionKeyError) as e:
            print(f"hypervisor onion-address: {e}", file=sys.stderr)
            return 1
        return 0
    if command == "serve-images":
        from hypervisor.imageserver import serve

        sub = options.subOptions
        port = sub["port"] if sub["port"] is not None else options["imageServerPortNum"]
        return serve(
            sub["directory"], port, options["certFile"], options["keyFile"], options["CAfile"]
        )
    from hypervisor.manager import volumes

    return volumes.check_command(state, repair=command == "repair-vm-volume-allocations")


if __name__ == "__main__":
    sys.exit(main())
