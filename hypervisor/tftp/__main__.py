"""
The TFTP server alone, serving a directory (benchmarks, tests, trying it out):

    python -m hypervisor.tftp --root DIR [--port 69] [--interface ADDR]
        [--file IP=NAME=PATH ...] [--transfer-threads N] [--spin-microseconds 200]

C{--file} registers a per-client file as NetbootMachine does (C{NAME} for client
C{IP}, with the content of C{PATH}). It prints C{ready PORT} once it listens.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.logger import globalLogBeginner, textFileLogObserver

from hypervisor.tftp.service import TftpService


def main(argv: list[str]) -> int:
    """
    Serve until SIGTERM/SIGINT.
    """
    parser = argparse.ArgumentParser(prog="python -m hypervisor.tftp")
    parser.add_argument("--root", default="")
    parser.add_argument("--port", type=int, default=69)
    parser.add_argument("--interface", default="")
    parser.add_argument("--file", action="append", default=[])
    parser.add_argument("--log", action="store_true", help="log to stderr")
    parser.add_argument("--transfer-threads", type=int, default=16)
    parser.add_argument("--spin-microseconds", type=int, default=200)
    args = parser.parse_args(argv)
    files: dict[str, dict[str, bytes]] = {}
    for spec in args.file:
        ip, name, path = spec.split("=", 2)
        with open(path, "rb") as f:
            files.setdefault(ip, {})[name] = f.read()
    if args.log:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    service = TftpService(
        reactor,
        files_for=lambda ip: files.get(ip, {}),
        directory=args.root,
        port=args.port,
        interface=args.interface,
        transfer_threads=args.transfer_threads,
        spin_microseconds=args.spin_microseconds,
    )
    service.privilegedStartService()
    service.startService()
    if service.port is None:
        print(service.problem, file=sys.stderr)
        return 1
    print(f"ready {service.bound_port}", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
