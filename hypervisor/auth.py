# -*- test-case-name: tests.test_auth -*-
"""
Who is calling, and what they may do (reference §7).

- L{identity_from_certificates}: the identity a TLS client certificate proves. The
  username is the subject CN; groups come from extension OID 1.3.6.1.4.1.9586.100.7.2
  and permitted methods from OID 1.3.6.1.4.1.9586.100.7.1, each a DER C{SEQUENCE OF}
  strings. Permitted methods count only when the chain verifies against C{-CAfile}
  (CA.pem, full authority); a chain that verifies only against C{-identityCAfile}
  (IdentityCA.pem) gives username and groups. A certificate that verifies against
  neither, or carries a malformed extension, is refused (L{CertificateRefused}) with
  the reason, never a crash.
- L{authorize}: the one decision for every transport (§7.3): method grants (globs such
  as C{Hypervisor.*}) or hypervisor ownership give everything; public methods need a
  username; admin methods need a grant or ownership; the unauthenticated reads need
  no certificate when C{-allowUnauthenticatedReads} is set. VM-level ownership is then
  checked by the manager.
"""

from __future__ import annotations

import datetime
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from hypervisor.errors import AccessDenied, HypervisorError, NotFound

METHODS_OID = x509.ObjectIdentifier("1.3.6.1.4.1.9586.100.7.1")
GROUPS_OID = x509.ObjectIdentifier("1.3.6.1.4.1.9586.100.7.2")


class Unauthenticated(HypervisorError):
    """
    No certificate, or one that cannot be verified (HTTP 401).
    """

    status = 401


class CertificateRefused(Unauthenticated):
    """
    A certificate was presented but is not acceptable; the message says why.
    """


@dataclass(frozen=True)
class Identity:
    """
    A caller.

    @ivar username: the certificate's CN ("" = unauthenticated).
    @ivar groups: groups from the certificate.
    @ivar method_patterns: permitted-method globs, only from certificates verified
        against the full-authority CA.
    @ivar hypervisor_owner: the caller is an owner of the hypervisor (ChangeOwners).
    @ivar full_authority: the chain verified against CA.pem (not only IdentityCA.pem).
    """

    username: str = ""
    groups: frozenset[str] = field(default_factory=frozenset)
    method_patterns: tuple[str, ...] = ()
    hypervisor_owner: bool = False
    full_authority: bool = False

    def has_method_power(self, method: str) -> bool:
        """
        Whether the caller holds power over C{Hypervisor.<method>} (grant or ownership).
        """
        if self.hypervisor_owner:
            return True
        name = method if "." in method else f"Hypervisor.{method}"
        return any(fnmatch.fnmatchcase(name, p) for p in self.method_patterns)


ROOT = Identity(username="root", method_patterns=("*.*",), full_authority=True)
"""The daemon itself and local administration: every power."""

ANONYMOUS = Identity()
"""A caller without a certificate (only the unauthenticated reads, if enabled)."""


# DER: a SEQUENCE OF strings, parsed strictly ------------------------------------------

_STRING_TAGS = {0x0C: "utf-8", 0x13: "ascii", 0x16: "ascii", 0x14: "latin-1"}


def _der_length(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise ValueError("truncated length")
    first = data[pos]
    pos += 1
    if first < 0x80:
        return first, pos
    count = first & 0x7F
    if count == 0 or count > 4 or pos + count > len(data):
        raise ValueError("bad length")
    length = int.from_bytes(data[pos:pos + count], "big")
    if length < 0x80 or data[pos] == 0:
        raise ValueError("non-minimal length")
    return length, pos + count


def parse_string_sequence(data: bytes) -> list[str]:
    """
    Parse a DER C{SEQUENCE OF} UTF8String/PrintableString/IA5String.

    @raise ValueError: anything else, or trailing bytes.
    """
    if not data or data[0] != 0x30:
        raise ValueError("not a SEQUENCE")
    length, pos = _der_length(data, 1)
    if pos + length != len(data):
        raise ValueError("length does not match the data")
    out = []
    while pos < len(data):
        tag = data[pos]
        if tag not in _STRING_TAGS:
            raise ValueError(f"element with tag 0x{tag:02x} is not a string")
        length, pos = _der_length(data, pos + 1)
        if pos + length > len(data):
            raise ValueError("truncated element")
        out.append(data[pos:pos + length].decode(_STRING_TAGS[tag]))
        pos += length
    return out


def encode_string_sequence(values: Iterable[str]) -> bytes:
    """
    Encode strings as a DER C{SEQUENCE OF UTF8String} (for making certificates).
    """
    def tlv(tag: int, body: bytes) -> bytes:
        n = len(body)
        if n < 0x80:
            return bytes([tag, n]) + body
        size = (n.bit_length() + 7) // 8
        return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + body

    return tlv(0x30, b"".join(tlv(0x0C, v.encode("utf-8")) for v in values))


def _extension_strings(cert: x509.Certificate, oid: x509.ObjectIdentifier,
                       what: str) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return []
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        return parse_string_sequence(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CertificateRefused(f"malformed {what} extension ({oid.dotted_string}): {e}")


# Chain verification -------------------------------------------------------------------


def load_pem_certificates(path: str) -> list[x509.Certificate]:
    """
    Every certificate in a PEM file; a missing file is an empty list.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return list(x509.load_pem_x509_certificates(data)) if data.strip() else []


def _valid_now(cert: x509.Certificate, now: datetime.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return True  # old-style roots without the extension


def chain_to(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
             roots: Sequence[x509.Certificate], now: datetime.datetime,
             max_depth: int = 8) -> Optional[list[x509.Certificate]]:
    """
    The chain from C{leaf} up to one of C{roots} (signatures, validity, CA flags), or
    None if there is none.
    """
    chain = [leaf]
    current = leaf
    for _ in range(max_depth):
        if not _valid_now(current, now):
            return None
        for root in roots:
            if root.subject == current.issuer and _valid_now(root, now):
                try:
                    current.verify_directly_issued_by(root)
                except Exception:  # noqa: BLE001 - any failure means "not this one"
                    continue
                return chain + ([root] if root != current else [])
        for parent in intermediates:
            if parent is current or parent.subject != current.issuer or not _is_ca(parent):
                continue
            try:
                current.verify_directly_issued_by(parent)
            except Exception:  # noqa: BLE001
                continue
            chain.append(parent)
            current = parent
            break
        else:
            return None
    return None


@dataclass
class TrustStore:
    """
    The roots of trust: CA.pem (identity and methods) and IdentityCA.pem (identity only).
    """

    full: list[x509.Certificate]
    identity_only: list[x509.Certificate]

    @classmethod
    def from_files(cls, ca_file: str, identity_ca_file: str) -> "TrustStore":
        """
        Load both files (either may be missing).
        """
        return cls(load_pem_certificates(ca_file), load_pem_certificates(identity_ca_file))

    @property
    def empty(self) -> bool:
        """
        No root at all: no client certificate can be verified.
        """
        return not self.full and not self.identity_only


def identity_from_certificates(
    leaf: Optional[x509.Certificate], intermediates: Sequence[x509.Certificate],
    trust: TrustStore, now: Optional[datetime.datetime] = None,
) -> Identity:
    """
    The identity a client certificate chain proves.

    @return: L{ANONYMOUS} when no certificate was presented.
    @raise CertificateRefused: it does not verify, has no CN, or is malformed.
    """
    if leaf is None:
        return ANONYMOUS
    now = now or datetime.datetime.now(datetime.timezone.utc)
    full = chain_to(leaf, intermediates, trust.full, now)
    chain = full or chain_to(leaf, intermediates, trust.identity_only, now)
    if chain is None:
        raise CertificateRefused(
            "client certificate does not verify against CA.pem or IdentityCA.pem "
            "(unknown issuer, bad signature or expired)"
        )
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    username = str(names[0].value) if names else ""
    if not username:
        raise CertificateRefused("client certificate has no common name (username)")
    groups = _extension_strings(leaf, GROUPS_OID, "groups")
    methods: list[str] = []
    if full is not None:
        for cert in full:
            for m in _extension_strings(cert, METHODS_OID, "permitted methods"):
                if m.count(".") != 1:
                    raise CertificateRefused(
                        f"permitted method {m!r} is not Service.Method")
                methods.append(m)
    return Identity(username=username, groups=frozenset(groups),
                    method_patterns=tuple(methods), full_authority=full is not None)


# The decision ------------------------------------------------------------------------


def authorize(identity: Identity, method: str, access: dict[str, str],
              unauthenticated_reads: frozenset[str], *,
              allow_unauthenticated_reads: bool = False,
              owner_users: frozenset[str] = frozenset(),
              owner_groups: frozenset[str] = frozenset()) -> Identity:
    """
    Decide whether C{identity} may call C{Hypervisor.<method>} (reference §7.3).

    @param access: method -> "public" or "admin" (L{hypervisor.api.ACCESS}).
    @return: the identity to run the method with (with C{hypervisor_owner} set when
        the caller owns the hypervisor).
    @raise NotFound: no such method.
    @raise Unauthenticated: a certificate is needed.
    @raise AccessDenied: the caller lacks the power.
    """
    kind = access.get(method)
    if kind is None:
        raise NotFound(f"unknown method Hypervisor.{method}")
    if identity.username and (identity.username in owner_users
                              or identity.groups & owner_groups):
        identity = replace(identity, hypervisor_owner=True)
    if identity.has_method_power(method):
        return identity
    if kind == "public" and identity.username:
        return identity
    if allow_unauthenticated_reads and method in unauthenticated_reads:
        return identity
    if not identity.username:
        raise Unauthenticated(
            f"Hypervisor.{method} needs a client certificate"
            + ("" if method not in unauthenticated_reads
               else " (or a daemon started with -allowUnauthenticatedReads)"))
    raise AccessDenied(f"access to method Hypervisor.{method} denied")
