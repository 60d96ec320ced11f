"""
The command table of L{tests.test_tools_e2e} (every vm-control and hyper-control
command it runs, the same assertions) over the Perspective Broker transport:
C{-transport=pb -pbEndpoint=tcp:127.0.0.1:PORT} against a real daemon listening for PB
on a port of its own.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests import support
from tests import test_tools_e2e as e2e


class PbToolsEndToEndTests(SynchronousTestCase):
    """
    The table over PB.
    """

    ok = e2e.ToolsEndToEndTests.ok
    fails = e2e.ToolsEndToEndTests.fails
    every_command = e2e.ToolsEndToEndTests.every_command
    volume_image_and_user_data_commands = e2e.ToolsEndToEndTests.volume_image_and_user_data_commands

    def daemon(self) -> tuple[Any, Any]:
        """
        A TLS daemon with PB on a free port; the tools reach it through -pbEndpoint.
        """
        support.require_libvirtd()
        support.ensure_bridge()
        port = support.free_port()
        d, run = support.tls_daemon(
            self, {"admin": "Hypervisor.*", "bob": ""}, "-domainType=qemu", f"-pbPortNum={port}"
        )

        def run_pb(module: str, user: str, *args: str) -> Any:
            return run(module, user, f"-pbEndpoint=tcp:127.0.0.1:{port}", *args)

        return d, run_pb

    def test_every_command_over_pb(self) -> None:
        """
        Every command of the table over PB.
        """
        self.every_command("pb")
