# -*- test-case-name: tests.test_auth -*-
"""
Making certificates: a CA, the daemon's server certificate, and user certificates with
a username (CN), groups and permitted methods — the equivalent of SmallStack's
C{scripts/make-cert}. Used by C{hypervisor make-certs} and by the tests.

Keys are ECDSA P-256. Key files are written with mode 0600, atomically.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import Iterable, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hypervisor.auth import GROUPS_OID, METHODS_OID, encode_string_sequence
from hypervisor.store import atomic_write

Key = ec.EllipticCurvePrivateKey


def new_key() -> Key:
    """
    A new ECDSA P-256 private key.
    """
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(
    subject: str,
    issuer: x509.Name,
    key: Key,
    days: float,
    not_before: Optional[datetime.datetime] = None,
) -> x509.CertificateBuilder:
    now = not_before or datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(
    *,
    digital_signature: bool = False,
    key_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    cn: str = "SmallStack hypervisor CA", days: float = 3650
) -> tuple[Key, x509.Certificate]:
    """
    A self-signed root CA: basicConstraints CA:TRUE (critical, at most one
    intermediate CA below it) and keyUsage keyCertSign + cRLSign (critical).
    """
    key = new_key()
    cert = (
        _builder(cn, _name(cn), key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_certificate(
    ca_key: Key,
    ca_cert: x509.Certificate,
    cn: str,
    *,
    groups: Iterable[str] = (),
    methods: Iterable[str] = (),
    server_names: Iterable[str] = (),
    days: float = 365,
    ca: bool = False,
    not_before: Optional[datetime.datetime] = None,
    path_length: Optional[int] = None,
) -> tuple[Key, x509.Certificate]:
    """
    A certificate signed by the CA, in the profile L{hypervisor.auth} checks:

    - a user's (CN = username, groups and permitted methods as DER SEQUENCE OF
      UTF8String extensions): basicConstraints CA:FALSE, keyUsage digitalSignature,
      extended key usage clientAuth;
    - a server's (C{server_names} as DNS/IP subject alternative names): the same, with
      extended key usage serverAuth and clientAuth (the daemon may call other
      daemons with it);
    - an intermediate CA's (C{ca=True}, optionally with C{path_length}):
      basicConstraints CA:TRUE, keyUsage keyCertSign + cRLSign, no extended key usage.

    Keys are ECDSA, so keyUsage has no keyEncipherment (RFC 5480 §3 allows only
    digitalSignature, nonRepudiation and keyAgreement for EC keys).
    """
    key = new_key()
    builder = _builder(cn, ca_cert.subject, key, days, not_before)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
    )
    if ca:
        builder = builder.add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True), critical=True
        )
    else:
        builder = builder.add_extension(_key_usage(digital_signature=True), critical=True)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
    )
    try:
        issuer_key_id = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        pass
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_key_id),
            critical=False,
        )
    groups, methods, server_names = list(groups), list(methods), list(server_names)
    if groups:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(GROUPS_OID, encode_string_sequence(groups)), critical=False
        )
    if methods:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(METHODS_OID, encode_string_sequence(methods)), critical=False
        )
    if server_names:
        alt: list[x509.GeneralName] = []
        for name in server_names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def key_pem(key: Key) -> bytes:
    """
    A private key as unencrypted PKCS#8 PEM.
    """
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """
    A certificate as PEM.
    """
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pair(cert_path: str, key_path: str, key: Key, cert: x509.Certificate) -> None:
    """
    Write a certificate (0644) and its key (0600), creating directories.
    """
    for path in (cert_path, key_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o755, exist_ok=True)
    atomic_write(key_path, key_pem(key), mode=0o600)
    atomic_write(cert_path, cert_pem(cert), mode=0o644)


def ca_key_path(ca_file: str) -> str:
    """
    Where the CA's key lives beside C{CAfile} (C{CA.pem} -> C{CA.key}).
    """
    base, _ = os.path.splitext(ca_file)
    return base + ".key"


def load_key(path: str) -> Key:
    """
    Load a PEM private key.
    """
    with open(path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an ECDSA key made by make-certs")
    return key


def ensure_ca(ca_file: str) -> tuple[Key, x509.Certificate, bool]:
    """
    Load the CA (CAfile and its key beside it), or create it if neither exists.

    @return: key, certificate, and whether it was created now.
    @raise ValueError: the CA file exists without its key (cannot sign).
    """
    key_path = ca_key_path(ca_file)
    if os.path.exists(ca_file):
        if not os.path.exists(key_path):
            raise ValueError(
                f"{ca_file} exists but its key {key_path} does not: cannot "
                "sign certificates with it"
            )
        with open(ca_file, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        return load_key(key_path), cert, False
    key, cert = make_ca()
    write_pair(ca_file, key_path, key, cert)
    return key, cert, True


def default_server_names() -> list[str]:
    """
    Names for the daemon's certificate: host name, FQDN, localhost, loopback.
    """
    names = [socket.gethostname(), socket.getfqdn(), "localhost", "127.0.0.1", "::1"]
    return list(dict.fromkeys(n for n in names if n))
