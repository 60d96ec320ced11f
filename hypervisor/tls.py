# -*- test-case-name: tests.test_netguard,tests.test_rpc -*-
"""
Port 6976 speaks plain HTTP and HTTPS at once, and TLS asks for client certificates.

- L{SniffingFactory}: the first byte of a connection decides: C{0x16} (a TLS
  handshake record) goes to the TLS factory, anything else to the plain one. With
  its C{connect} hook, a first line C{CONNECT ...} (plain or inside TLS) goes to
  SRPC (L{hypervisor.srpc.protocol}), which starts TLS itself after its reply
  (L{tls_server_factory}). Under
  a connection guard (L{hypervisor.netguard}) the sniffer reports the TLS handshake
  (its deadline), and TLS connections close promptly: after sending its
  C{close_notify} the server closes TCP without waiting for the client's (which a
  hostile client never sends).
- L{server_tls_options}: the server's certificate and key, TLS 1.2 at least, and a
  request (not a demand) for a client certificate, advertising the subjects of
  CA.pem and IdentityCA.pem so clients pick the right one. Any certificate is accepted
  by the handshake; L{peer_identity} then verifies it with L{hypervisor.auth}, so that
  a missing or foreign certificate gets an HTTP 401 with a sentence instead of a TLS
  alert.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import protocol, ssl
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

from hypervisor.auth import (
    ANONYMOUS,
    CertificateRefused,
    Identity,
    TrustStore,
    identity_from_certificates,
)
from hypervisor.netguard import Phase, find_guard

TLS_HANDSHAKE = 0x16


class _ClientCertOptions(ssl.CertificateOptions):
    """
    CertificateOptions that request an optional client certificate and accept any in
    the handshake (it is verified per request, with a clear error).
    """

    def __init__(self, client_cas: list[x509.Certificate], **kwargs: Any) -> None:
        self._client_cas = client_cas
        super().__init__(**kwargs)

    def _makeContext(self) -> SSL.Context:  # type: ignore[override]
        ctx = super()._makeContext()
        ctx.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: True)
        if self._client_cas:
            ctx.set_client_ca_list(
                [crypto.X509.from_cryptography(c).get_subject() for c in self._client_cas]
            )
        ctx.set_session_id(b"smallstack-hypervisor")
        ctx.set_alpn_select_callback(_alpn_select)
        return ctx


def _alpn_select(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """
    The ALPN answer: HTTP/1.1 if the client offers it, else no protocol (the handshake
    goes on without ALPN).

    Replaces Twisted's own callback (Twisted 26.10 installs one on every context):
    when the wrapped factory names no protocols, as ours do not, it answers C{b""},
    which pyOpenSSL passes to OpenSSL as a chosen protocol of length 0, and OpenSSL
    fails the handshake with an C{internal_error} alert: every client offering ALPN
    (curl, browsers) was refused.
    """
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


def server_tls_options(cert_file: str, key_file: str, trust: TrustStore) -> ssl.CertificateOptions:
    """
    The server's TLS options.

    @raise OSError: a file is missing.
    @raise ValueError: a file is not PEM of the right kind.
    """
    with open(cert_file, "rb") as f:
        certificate = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())
    with open(key_file, "rb") as f:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, f.read())
    return _ClientCertOptions(
        trust.full + trust.identity_only,
        privateKey=key,
        certificate=certificate,
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )


class _PromptCloseTLS(BufferingTLSTransport):
    """
    Server-side TLS that closes the TCP connection right after sending its
    C{close_notify}, as RFC 8446 section 6.1 allows, instead of waiting (as
    L{TLSMemoryBIOProtocol} does) for the client's C{close_notify}, which a client
    that stopped reading or answering never sends: the connection would linger.
    """

    def send_now(self) -> None:
        """
        Encrypt what was written so far now, as its own TLS record(s), instead of
        joining it with the next writes of this reactor turn.
        """
        self._aggregator.flush()

    def _shutdownTLS(self) -> None:
        super()._shutdownTLS()
        if self.transport is not None and not self._aborted:
            self.transport.loseConnection()


def tls_server_factory(
    options: ssl.CertificateOptions, wrapped: IProtocolFactory, clock: Optional[IReactorTime] = None
) -> TLSMemoryBIOFactory:
    """
    Server-side TLS over C{wrapped}, closing promptly (as port 6976's TLS does): for
    protocols that start TLS themselves after a plaintext exchange (SRPC's CONNECT).
    """
    tls = TLSMemoryBIOFactory(options, False, wrapped, clock)
    tls.protocol = _PromptCloseTLS
    return tls


class _Sniffer(protocol.Protocol):
    """
    Waits for the first bytes, then hands the connection to the right protocol.
    """

    def __init__(self, factory: "SniffingFactory", addr: Any) -> None:
        self.factory = factory
        self.addr = addr
        self.inner: Optional[protocol.Protocol] = None

    def dataReceived(self, data: bytes) -> None:
        """
        Choose plain or TLS on the first byte, then pass everything through.
        """
        if self.inner is None:
            assert self.transport is not None
            tls = data[0] == TLS_HANDSHAKE
            chosen = self.factory.tls if tls else self.factory.plain
            if chosen is None:
                self.transport.loseConnection()
                return
            inner = chosen.buildProtocol(self.addr)
            if inner is None:
                self.transport.loseConnection()
                return
            self.inner = inner
            if tls:
                guard = find_guard(self.transport)
                if guard is not None:
                    guard.enter(Phase.HANDSHAKE)
            inner.makeConnection(self.transport)
            # From now on the transport talks to the chosen protocol directly.
            if isinstance(self.transport, ProtocolWrapper):
                self.transport.wrappedProtocol = inner
            else:
                self.transport.protocol = inner  # type: ignore[attr-defined]
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Any = protocol.connectionDone) -> None:
        """
        Pass the loss on (only reached if no data ever arrived).
        """
        if self.inner is not None:
            self.inner.connectionLost(reason)


class SniffingFactory(protocol.Factory):
    """
    One port, two protocols: TLS (first byte 0x16) and plain.

    @ivar tls: the TLS-wrapped factory, or None when TLS is not configured.
    """

    def __init__(
        self,
        plain: IProtocolFactory,
        tls_options: Optional[ssl.CertificateOptions],
        tls_site: Optional[IProtocolFactory] = None,
        clock: Optional[IReactorTime] = None,
        connect: Optional[Callable[..., IProtocolFactory]] = None,
    ) -> None:
        """
        @param clock: what TLS schedules its buffered writes on (the global reactor
            when None).
        @param connect: the first-line hook: C{connect(http_factory, in_tls=...)} makes
            the factory that routes C{CONNECT} lines to SRPC and the rest to
            C{http_factory} (L{hypervisor.srpc.protocol.ConnectRouterFactory}).
        """
        self.tls: Optional[IProtocolFactory] = None
        if connect is not None:
            # The first line decides between HTTP and SRPC, in plain and inside TLS.
            plain, tls_site = connect(plain, in_tls=False), connect(tls_site or plain, in_tls=True)
        self.plain = plain
        if tls_options is not None:
            self.tls = tls_server_factory(tls_options, tls_site or plain, clock)

    def doStart(self) -> None:
        """
        Start the wrapped factories too.
        """
        super().doStart()
        self.plain.doStart()
        if self.tls is not None:
            self.tls.doStart()

    def doStop(self) -> None:
        """
        Stop the wrapped factories too.
        """
        if self.tls is not None:
            self.tls.doStop()
        self.plain.doStop()
        super().doStop()

    def buildProtocol(self, addr: Any) -> _Sniffer:
        """
        A sniffer for the new connection.
        """
        return _Sniffer(self, addr)


def peer_identity(transport: Any, trust: TrustStore) -> tuple[bool, Identity]:
    """
    Whether the connection is TLS, and who the client certificate says the caller is.

    @raise CertificateRefused: a certificate was presented but does not verify.
    """
    get_peer = getattr(transport, "getPeerCertificate", None)
    if get_peer is None:
        return False, ANONYMOUS
    cached = getattr(transport, "_hypervisor_identity", None)
    if cached is not None:
        if isinstance(cached, CertificateRefused):
            raise cached
        return True, cached
    peer = get_peer()
    leaf = peer.to_cryptography() if peer is not None else None
    chain: list[x509.Certificate] = []
    connection = getattr(transport, "_tlsConnection", None)
    if connection is not None and leaf is not None:
        for c in connection.get_peer_cert_chain() or []:
            cert = c.to_cryptography()
            if cert != leaf:
                chain.append(cert)
    try:
        identity = identity_from_certificates(leaf, chain, trust)
    except CertificateRefused as e:
        transport._hypervisor_identity = e
        raise
    if _from_loopback(transport):
        identity = replace(identity, loopback=True)
    transport._hypervisor_identity = identity
    return True, identity


def _from_loopback(transport: Any) -> bool:
    """
    Whether the peer's address is a loopback address (127.0.0.0/8, ::1).
    """
    import ipaddress

    try:
        host = transport.getPeer().host
        address = ipaddress.ip_address(host)
    except (AttributeError, ValueError):
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)
