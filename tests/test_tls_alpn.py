"""
Port 6976's TLS with clients that offer ALPN (curl and browsers always do): the
handshake completes and negotiates C{http/1.1} when offered, nothing otherwise.
Twisted 26.10's own ALPN callback answered C{b""} when the wrapped factory named no
protocols, and OpenSSL then failed every such handshake with an C{internal_error}
alert (found by the DHCP real-client tests, whose curl calls failed).

Real clients: C{openssl s_client} and C{curl} against L{hypervisor.tls.SniffingFactory}
with the daemon's TLS options and certificates from C{hypervisor make-certs}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import protocol, reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from hypervisor import tls
from hypervisor.auth import TrustStore
from tests import support


class AlpnTests(TestCase):
    """
    Clients offering ALPN against the daemon's TLS.
    """

    timeout = 120

    def setUp(self) -> None:
        for tool in ("openssl", "curl"):
            support.require(shutil.which(tool) is not None, f"{tool} is not installed")
        self.dir = tempfile.mkdtemp(prefix="hv-alpn-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        d = self.dir
        result = subprocess.run(
            [sys.executable, "-m", "hypervisor", f"-stateDir={d}/state", f"-CAfile={d}/CA.pem"]
            + [f"-identityCAfile={d}/none.pem", f"-certFile={d}/server.pem"]
            + [f"-keyFile={d}/server.key", "make-certs"],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=d),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.options = tls.server_tls_options(
            f"{d}/server.pem", f"{d}/server.key", TrustStore.from_files(f"{d}/CA.pem", "")
        )

    def listen(self, factory: IProtocolFactory) -> int:
        tcp: Any = reactor
        port = tcp.listenTCP(0, tls.SniffingFactory(factory, self.options), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return int(port.getHost().port)

    def s_client(self, port: int, alpn: str) -> "Deferred[str]":
        def run() -> str:
            result = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-alpn", alpn]
                + ["-CAfile", f"{self.dir}/CA.pem"],
                input="",
                capture_output=True,
                text=True,
                timeout=30,
            )
            return result.stdout + result.stderr

        return threads.deferToThread(run)

    async def test_openssl_offering_alpn(self) -> None:
        """
        A wrapped factory that names no protocols (as the daemon's do): offering
        C{h2,http/1.1} negotiates C{http/1.1}; offering only C{h2} negotiates
        nothing; neither fails the handshake.
        """
        port = self.listen(protocol.Factory.forProtocol(protocol.Protocol))
        out = await self.s_client(port, "h2,http/1.1")
        self.assertNotIn("alert", out)
        self.assertIn("ALPN protocol: http/1.1", out)
        out = await self.s_client(port, "h2")
        self.assertNotIn("alert", out)
        self.assertIn("No ALPN negotiated", out)
        self.assertIn("Verify return code: 0 (ok)", out)

    async def test_curl(self) -> None:
        """
        curl (ALPN on by default) gets the page over HTTPS.
        """
        root = Resource()
        root.putChild(b"x", Data(b"hello", "text/plain"))
        port = self.listen(Site(root))

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "--cacert", f"{self.dir}/CA.pem"] + [f"https://127.0.0.1:{port}/x"],
                capture_output=True,
                text=True,
                timeout=30,
            )

        result = await threads.deferToThread(run)
        self.assertEqual((result.returncode, result.stdout), (0, "hello"), result.stderr)
