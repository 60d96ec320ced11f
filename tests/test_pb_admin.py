"""
The pieces of the runtime admin surface on their own: log levels per namespace
(L{hypervisor.loglevels}) filter what the daemon's observers get; a TLS reload
(L{hypervisor.tlsreload}) with a bad file changes nothing and a good one changes the
trust store in place and the context of new connections; the admin surface
(L{hypervisor.pb.admin}) admits only admin certificates and hypervisor owners.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.logger import Logger, LogLevel, LogPublisher
from twisted.trial.unittest import TestCase

from hypervisor import certs
from hypervisor.auth import Identity
from hypervisor.errors import AccessDenied, InvalidRequest, NotFound
from hypervisor.loglevels import LogLevels
from hypervisor.pb.admin import AdminSurface
from hypervisor.testing import SynchronousRunner
from hypervisor.tlsreload import CertificateLoadError, ReloadableTLS, load_tls


class LogLevelTests(TestCase):
    """
    Levels per dotted namespace, the default, and legacy events.
    """

    def test_filtering(self) -> None:
        """
        A namespace's level applies to it and its children; others keep the default
        (debug); "inherit" removes a namespace's own level; bad input is refused.
        """
        from twisted.logger import FilteringLogObserver

        levels = LogLevels()
        seen: list[dict[str, Any]] = []
        publisher = LogPublisher(FilteringLogObserver(seen.append, [levels]))
        dhcp = Logger(namespace="hypervisor.dhcp.protocol.DhcpServer", observer=publisher)
        web = Logger(namespace="web.rpc", observer=publisher)
        levels.set("hypervisor.dhcp", "warn")
        dhcp.info("hidden")
        dhcp.warn("shown")
        web.debug("shown too")
        publisher({"message": ("legacy",), "log_level": LogLevel.info})
        self.assertEqual(
            [e.get("log_format") or e["message"][0] for e in seen],
            ["shown", "shown too", "legacy"],
        )
        self.assertEqual(levels.level_for("hypervisor.dhcp.policy"), "warn")
        self.assertEqual(levels.get(), {"": "debug", "hypervisor.dhcp": "warn"})
        levels.set("hypervisor.dhcp", "inherit")
        self.assertEqual(levels.level_for("hypervisor.dhcp.policy"), "debug")
        with self.assertRaises(ValueError):
            levels.set("x", "loud")
        with self.assertRaises(ValueError):
            levels.set("a b", "info")
        levels.set("", "error")
        self.assertEqual(levels.level_for("anything"), "error")


class ReloadTests(TestCase):
    """
    ReloadableTLS with real files.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.paths = [os.path.join(self.dir, n) for n in ("s.pem", "s.key", "CA.pem", "I.pem")]
        self.write_pki("first")

    def write_pki(self, name: str) -> Any:
        ca_key, ca = certs.make_ca(f"{name} CA")
        key, server = certs.make_certificate(ca_key, ca, "localhost", server_names=["localhost"])
        certs.write_pair(self.paths[0], self.paths[1], key, server)
        with open(self.paths[2], "wb") as f:
            f.write(certs.cert_pem(ca))
        return server

    def test_reload(self) -> None:
        """
        A bad key changes nothing; a new CA and certificate are put in force: the
        trust store object is the same, its roots are new, new connections get a
        context with the new certificate.
        """
        options, trust, _ = load_tls(*self.paths)
        tls = ReloadableTLS(*self.paths, trust=trust, options=options)
        store = tls.trust
        first_ctx = tls.getContext()
        with open(self.paths[1], "wb") as f:
            f.write(b"garbage")
        failure = self.failureResultOf(tls.reload(SynchronousRunner()), CertificateLoadError)
        self.assertIn("cannot use the server certificate", str(failure.value))
        self.assertIs(tls.getContext(), first_ctx)
        self.assertEqual(tls.generation, 1)
        server = self.write_pki("second")
        summary = self.successResultOf(tls.reload(SynchronousRunner()))
        self.assertEqual(summary.full_cas, ["CN=second CA"])
        self.assertEqual(summary.server_serial, format(server.serial_number, "x"))
        self.assertIs(tls.trust, store)
        self.assertEqual([c.subject.rfc4514_string() for c in store.full], ["CN=second CA"])
        connection = tls.serverConnectionForTLS(None)
        self.assertIsNot(connection.get_context(), first_ctx)
        self.assertEqual(tls.generation, 2)


class _Manager:
    owner_users = frozenset({"owner"})
    owner_groups = frozenset({"owners"})
    disabled = False


class AdminAccessTests(TestCase):
    """
    Who may use the admin surface.
    """

    def test_access(self) -> None:
        """
        HypervisorAdmin.* or *.* grants and hypervisor owners (user or group) are
        admins; Hypervisor.* and plain users are not; unknown actions are 404 and
        malformed requests 400.
        """
        admin = AdminSurface(_Manager(), None, LogLevels())
        allowed = [
            Identity("a", method_patterns=("*.*",)),
            Identity("b", method_patterns=("HypervisorAdmin.*",)),
            Identity("owner"),
            Identity("c", groups=frozenset({"owners"})),
        ]
        refused = [
            Identity("fleet", method_patterns=("Hypervisor.*",)),
            Identity("alice"),
            Identity(""),
        ]
        for who in allowed:
            self.assertTrue(admin.allowed(who, "SetLogLevel"), who)
        for who in refused:
            self.assertFalse(admin.allowed(who, "SetLogLevel"), who)
            d = admin.run("GetLogLevels", {}, who)
            self.failureResultOf(_deferred(d), AccessDenied)
        root = allowed[0]
        self.failureResultOf(_deferred(admin.run("Explode", {}, root)), NotFound)
        self.failureResultOf(
            _deferred(admin.run("SetLogLevel", {"Level": 3}, root)), InvalidRequest
        )
        reply = self.successResultOf(
            _deferred(admin.run("SetLogLevel", {"Namespace": "web", "Level": "error"}, root))
        )
        self.assertEqual(reply["Levels"]["web"], "error")
        self.assertEqual(
            self.successResultOf(_deferred(admin.run("GetDisabledState", {}, root))),
            {"Disabled": False},
        )


def _deferred(coroutine: Any) -> Any:
    from twisted.internet.defer import ensureDeferred

    return ensureDeferred(coroutine)
