"""
The C{vm-control} command (Python counterpart of SmallStack's vm-control).

Its subcommands arrive with the RPC issue; until then it says so and exits 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = """Usage: vm-control [flags] subcommand [args...]

vm-control drives a hypervisor's VMs over its RPC interface (port 6976).
This version has no subcommands yet: the RPC interface is not built.
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """
    Print the usage; exit 0 for -h, else 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    print(USAGE, file=sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr)
    return 0 if args[:1] in (["-h"], ["--help"]) else 2
