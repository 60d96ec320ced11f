# -*- test-case-name: tests.test_pb_admin -*-
"""
Certificate rotation without a restart: L{ReloadableTLS} stands in for the server's
TLS options on every TLS listener (port 6976's HTTPS and SRPC, the Perspective
Broker port), and L{ReloadableTLS.reload} reads C{-certFile}, C{-keyFile},
C{-CAfile} and C{-identityCAfile} again.

- It provides C{IOpenSSLServerConnectionCreator}: each new TLS connection gets an
  C{SSL.Connection} from the options in force when it is accepted, so connections
  made after a reload use the new server certificate and advertise the new client
  CAs, while connections already open keep theirs.
- The roots of trust are the daemon's one L{TrustStore}, changed in place: every
  transport verifies client certificates with it (L{hypervisor.tls.peer_identity}),
  so new connections are verified against the new CA files at once. Identities of
  connections already verified are not recomputed.
- A reload reads and checks everything on a thread (no disk I/O on the reactor
  thread), builds a context to prove that key and certificate match, and only then
  swaps; a bad file changes nothing and the error says which file and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from hypervisor.auth import TrustStore, load_pem_certificates
from hypervisor.errors import InvalidRequest
from hypervisor.tls import server_tls_options


@dataclass(frozen=True)
class TlsSummary:
    """
    What is in force after a load: for logs and the admin surface.
    """

    server_subject: str
    server_serial: str
    server_not_after: str
    full_cas: list[str]
    identity_cas: list[str]

    def as_dict(self) -> dict[str, Any]:
        """
        JSON-ready, with Go-style field names.
        """
        return {
            "ServerSubject": self.server_subject,
            "ServerSerial": self.server_serial,
            "ServerNotAfter": self.server_not_after,
            "CAs": self.full_cas,
            "IdentityCAs": self.identity_cas,
        }


def _subjects(certs: list[x509.Certificate]) -> list[str]:
    return [c.subject.rfc4514_string() for c in certs]


class CertificateLoadError(InvalidRequest):
    """
    A certificate, key or CA file could not be used; nothing was changed.
    """


def load_tls(
    cert_file: str, key_file: str, ca_file: str, identity_ca_file: str
) -> tuple[ssl.CertificateOptions, TrustStore, TlsSummary]:
    """
    Read and check the four files (blocking: call on a thread).

    @raise CertificateLoadError: a file is missing or unusable, or the key does not
        match the certificate.
    """
    try:
        trust = TrustStore(load_pem_certificates(ca_file), load_pem_certificates(identity_ca_file))
    except (OSError, ValueError) as e:
        raise CertificateLoadError(f"cannot read the CA files {ca_file}, {identity_ca_file}: {e}")
    try:
        options = server_tls_options(cert_file, key_file, trust)
        options.getContext()  # checks that the key matches the certificate
    except (OSError, ValueError, SSL.Error, crypto.Error) as e:
        raise CertificateLoadError(
            f"cannot use the server certificate {cert_file} with key {key_file}: {e}"
        )
    try:
        with open(cert_file, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as e:
        raise CertificateLoadError(f"cannot read the server certificate {cert_file}: {e}")
    summary = TlsSummary(
        leaf.subject.rfc4514_string(),
        format(leaf.serial_number, "x"),
        leaf.not_valid_after_utc.isoformat(),
        _subjects(trust.full),
        _subjects(trust.identity_only),
    )
    return options, trust, summary


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """
    The server TLS options in force, replaceable while the daemon runs.

    @ivar trust: the daemon's trust store (changed in place by L{reload}).
    @ivar options: the current C{CertificateOptions}, or None (no usable server
        certificate: TLS listeners refuse connections until a reload succeeds).
    @ivar summary: what was loaded last, or None.
    @ivar generation: how many successful loads so far (1 after start).
    """

    log = Logger()

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        ca_file: str,
        identity_ca_file: str,
        trust: TrustStore,
        options: Optional[ssl.CertificateOptions] = None,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.ca_file = ca_file
        self.identity_ca_file = identity_ca_file
        self.trust = trust
        self.options = options
        self.summary: Optional[TlsSummary] = None
        self.generation = 1 if options is not None else 0
        self.listeners: list[Callable[[], None]] = []

    @property
    def available(self) -> bool:
        """
        Whether a server certificate is in force.
        """
        return self.options is not None

    def getContext(self) -> SSL.Context:
        """
        The current context (the old-style interface, for code that asks for it).

        @raise RuntimeError: no server certificate is loaded.
        """
        if self.options is None:
            raise RuntimeError("no server certificate is loaded")
        return self.options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A server-side TLS connection with the options in force now.
        """
        return SSL.Connection(self.getContext(), None)

    def install(
        self, options: ssl.CertificateOptions, trust: TrustStore, summary: TlsSummary
    ) -> None:
        """
        Make loaded options and roots the ones in force (reactor thread).
        """
        self.options = options
        self.trust.full = trust.full
        self.trust.identity_only = trust.identity_only
        self.summary = summary
        self.generation += 1
        for listener in list(self.listeners):
            listener()

    def reload(self, runner: Any) -> "Deferred[TlsSummary]":
        """
        Read the files again on C{runner} (an L{hypervisor.diskio.IBlockingRunner})
        and put them in force; fires with the new summary.

        @raise CertificateLoadError: (in the Deferred) nothing was changed.
        """
        d: Deferred[tuple[ssl.CertificateOptions, TrustStore, TlsSummary]] = runner.run(
            load_tls, self.cert_file, self.key_file, self.ca_file, self.identity_ca_file
        )

        def loaded(result: tuple[ssl.CertificateOptions, TrustStore, TlsSummary]) -> TlsSummary:
            options, trust, summary = result
            self.install(options, trust, summary)
            self.log.info(
                "TLS reloaded: server certificate {subject} (serial {serial}, until {until}); "
                "{full} CA and {ident} identity CA certificates",
                subject=summary.server_subject,
                serial=summary.server_serial,
                until=summary.server_not_after,
                full=len(summary.full_cas),
                ident=len(summary.identity_cas),
            )
            return summary

        return d.addCallback(loaded)
