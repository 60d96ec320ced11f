# -*- test-case-name: tests.test_vm_control -*-
"""
What C{vm-control} and C{hyper-control} share below the transports: client
certificates from C{~/.ssl}, the TLS policy, and the upload body of the HTTPS transport.

Certificates: every C{*.cert}/C{*.key} pair (or C{cert.pem}/C{key.pem}) in
C{-certDirectory} is loaded, as SmallStack's tools do; the one with the widest
method grants (C{*.*} first) and the latest expiry is presented. The server's
certificate is verified against C{-CAfile} when that file exists; otherwise it is not
verified (as the Go tools never do).
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass
from typing import IO, Any, Callable, Optional

from cryptography import x509
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from hypervisor.auth import METHODS_OID, parse_string_sequence


class ClientError(Exception):
    """
    A call failed; the message is what the user sees.
    """


@dataclass
class CertPair:
    """
    A client certificate and its key, as PEM.
    """

    cert_path: str
    key_path: str
    methods: list[str]
    not_after: float

    def rank(self) -> tuple[int, int, float]:
        """
        Sort key: C{*.*} first, then most methods, then longest-lived.
        """
        return (int("*.*" in self.methods), len(self.methods), self.not_after)


def find_certificates(directory: str) -> list[CertPair]:
    """
    Every certificate/key pair in C{directory}, best first.
    """
    pairs: list[CertPair] = []
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return pairs
    candidates = [(n, n[:-5] + ".key") for n in names if n.endswith(".cert")]
    if "cert.pem" in names:
        candidates.append(("cert.pem", "key.pem"))
    for cert_name, key_name in candidates:
        cert_path = os.path.join(directory, cert_name)
        key_path = os.path.join(directory, key_name)
        if not os.path.exists(key_path):
            continue
        try:
            with open(cert_path, "rb") as f:
                cert = x509.load_pem_x509_certificate(f.read())
        except (OSError, ValueError):
            continue
        methods: list[str] = []
        try:
            ext = cert.extensions.get_extension_for_oid(METHODS_OID).value
            methods = parse_string_sequence(getattr(ext, "value", b""))
        except (x509.ExtensionNotFound, ValueError):
            pass
        pairs.append(CertPair(cert_path, key_path, methods, cert.not_valid_after_utc.timestamp()))
    pairs.sort(key=lambda p: p.rank(), reverse=True)
    return pairs


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedServer:
    """
    TLS without checking the server's certificate (no CA file to check it with).
    """

    def __init__(self, options: ssl.CertificateOptions) -> None:
        self.context = options.getContext()

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tls_protocol)
        return connection


@implementer(IPolicyForHTTPS)
class ClientTLSPolicy:
    """
    Present our certificate; verify the server against the CA file if there is one.
    """

    def __init__(self, pair: Optional[CertPair], ca_file: str) -> None:
        self.client: Optional[ssl.PrivateCertificate] = None
        if pair is not None:
            with open(pair.cert_path, "rb") as c, open(pair.key_path, "rb") as k:
                self.client = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
        self.trust: Optional[ssl.Certificate] = None
        if ca_file and os.path.exists(ca_file):
            with open(ca_file, "rb") as f:
                self.trust = ssl.Certificate.loadPEM(f.read())

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """
        The TLS connection creator for the hypervisor.
        """
        if self.trust is not None:
            return ssl.optionsForClientTLS(
                hostname.decode(), trustRoot=self.trust, clientCertificate=self.client
            )
        kwargs: dict[str, Any] = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
        if self.client is not None:
            kwargs.update(
                privateKey=self.client.privateKey.original, certificate=self.client.original
            )
        return _UnverifiedServer(ssl.CertificateOptions(**kwargs))


class ConcatFile(io.RawIOBase):
    """
    Several byte sources read as one file (the request line, the image, user data),
    with a known length so the upload is not chunked.
    """

    def __init__(self, parts: list[IO[bytes]], sizes: list[int]) -> None:
        self.parts = parts
        self.sizes = sizes
        self.index = 0
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        total = sum(self.sizes)
        if whence == 2:
            target = total + offset
        elif whence == 1:
            target = self.position + offset
        else:
            target = offset
        if target != 0 and target != total:
            raise OSError("only rewinding and measuring are supported")
        self.position = target
        if target == 0:
            self.index = 0
            for p in self.parts:
                p.seek(0)
        else:
            self.index = len(self.parts)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        out = b""
        while self.index < len(self.parts) and (size < 0 or len(out) < size):
            chunk = self.parts[self.index].read(-1 if size < 0 else size - len(out))
            if not chunk:
                self.index += 1
                continue
            out += chunk
        self.position += len(out)
        return out


def _describe(e: Exception) -> str:
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    return str(e) or type(e).__name__


def fail(message: str) -> int:
    """
    Print an error and return the exit status 1.
    """
    print(message, file=sys.stderr)
    return 1
