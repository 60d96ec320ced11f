# -*- test-case-name: tests.test_auth -*-
"""
Who is calling, and what they may do (reference §7).

- L{identity_from_certificates}: the identity a TLS client certificate proves. The
  username is the subject CN; groups come from extension OID 1.3.6.1.4.1.9586.100.7.2
  and permitted methods from OID 1.3.6.1.4.1.9586.100.7.1, each a DER C{SEQUENCE OF}
  strings. All three are read from the leaf alone. Permitted methods count only when
  the chain verifies against C{-CAfile} (CA.pem, full authority); a chain that
  verifies only against C{-identityCAfile} (IdentityCA.pem) gives username and groups.
  A certificate that verifies against neither, or carries a malformed extension, is
  refused (L{CertificateRefused}) with the reason, never a crash.
- Chains are verified as Go's x509 verifier and RFC 5280 do (L{chain_to}): the
  configured roots are trust anchors as given; a certificate the client sends as an
  intermediate may issue only if it is a CA (basicConstraints CA:TRUE, keyCertSign
  when keyUsage is present, within its pathLenConstraint) — so a client certificate
  without basicConstraints can never sign another identity. The leaf must be a client
  certificate (L{check_client_leaf}): not a CA, extended key usage absent or allowing
  clientAuth, keyUsage absent or allowing digitalSignature.
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
from typing import Iterable, Optional, Sequence, TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from hypervisor.errors import AccessDenied, HypervisorError, NotFound

METHODS_OID = x509.ObjectIdentifier("1.3.6.1.4.1.9586.100.7.1")
GROUPS_OID = x509.ObjectIdentifier("1.3.6.1.4.1.9586.100.7.2")

ExtensionValue = TypeVar("ExtensionValue", bound=x509.ExtensionType)


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
    @ivar loopback: the connection comes from a loopback address (set by the
        transport; the reference's C{testIfLoopback}, e.g. ListVolumeDirectories).
    @ivar token_vm: the IP of the one VM whose current access token this call
        presented (GetVmAccessToken): owner rights over that VM only, for the methods
        the reference lets a token holder call (L{hypervisor.manager.tokens}).
    """

    username: str = ""
    groups: frozenset[str] = field(default_factory=frozenset)
    method_patterns: tuple[str, ...] = ()
    hypervisor_owner: bool = False
    full_authority: bool = False
    loopback: bool = False
    token_vm: str = ""

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
    length = int.from_bytes(data[pos : pos + count], "big")
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
        out.append(data[pos : pos + length].decode(_STRING_TAGS[tag]))
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


def _extension_strings(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> list[str]:
    try:
        ext = _extensions(cert).get_extension_for_oid(oid)
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


def _cn(cert: x509.Certificate) -> str:
    """
    The subject CN, for messages (the whole subject when there is none; shortened).
    """
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        names = []
    text = str(names[0].value) if names else cert.subject.rfc4514_string() or "(no subject)"
    return text if len(text) <= 80 else text[:77] + "..."


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    """
    The certificate's extensions; a malformed or duplicated one is a refusal.
    """
    try:
        return cert.extensions
    except ValueError as e:
        raise CertificateRefused(
            f"certificate {_cn(cert)!r} has a malformed extension ({e}); issue it again "
            "with well-formed extensions"
        ) from None


def _extension(cert: x509.Certificate, kind: type[ExtensionValue]) -> Optional[ExtensionValue]:
    try:
        return _extensions(cert).get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


_UNDERSTOOD_CRITICAL = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.CERTIFICATE_POLICIES,
        METHODS_OID,
        GROUPS_OID,
    }
)
"""Critical extensions we process (or that do not restrict a client chain); any other
critical extension (name or policy constraints, ...) makes a certificate unusable, as
RFC 5280 §4.2 requires."""


def _unknown_critical(cert: x509.Certificate) -> Optional[str]:
    for ext in _extensions(cert):
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            return (
                f"it has a critical extension this daemon does not process "
                f"({ext.oid.dotted_string})"
            )
    return None


_CLIENT_USAGES = frozenset(
    {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
)


def _usage_names(eku: x509.ExtendedKeyUsage) -> str:
    return ", ".join(getattr(u, "_name", None) or u.dotted_string for u in eku) or "none"


def cannot_issue(
    cert: x509.Certificate, intermediates_below: int, now: datetime.datetime
) -> Optional[str]:
    """
    Why a certificate the client sent cannot act as an intermediate CA in its chain,
    or None if it can (RFC 5280 §6.1.4, as Go's verifier): basicConstraints CA:TRUE,
    keyCertSign in keyUsage when keyUsage is present, a pathLenConstraint (if any) not
    smaller than the number of intermediates below it, an extended key usage (if any)
    that allows client authentication, no unprocessed critical extension, and valid now.

    @param intermediates_below: intermediate CAs between it and the leaf.
    """
    if not _valid_now(cert, now):
        return "it is expired or not yet valid"
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None:
        return "it is not a CA (it has no basicConstraints extension with CA:TRUE)"
    if not constraints.ca:
        return "it is not a CA (its basicConstraints say CA:FALSE)"
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return "its keyUsage does not include keyCertSign"
    limit = constraints.path_length
    if limit is not None and intermediates_below > limit:
        return (
            f"its pathLenConstraint ({constraints.path_length}) allows fewer "
            f"intermediate CAs below it than the chain has ({intermediates_below})"
        )
    eku = _extension(cert, x509.ExtendedKeyUsage)
    if eku is not None and not _CLIENT_USAGES & set(eku):
        return (
            f"its extended key usage ({_usage_names(eku)}) does not allow client " "authentication"
        )
    return _unknown_critical(cert)


def _root_refuses(
    root: x509.Certificate, intermediates_below: int, now: datetime.datetime
) -> Optional[str]:
    """
    Why a configured root cannot end this chain: roots are trust anchors as given
    (no CA flag or key usage is demanded of them), but, as in Go, one that is expired or
    whose pathLenConstraint is exceeded does not anchor the chain.
    """
    if not _valid_now(root, now):
        return "it is expired or not yet valid"
    constraints = _extension(root, x509.BasicConstraints)
    if (
        constraints is not None
        and constraints.path_length is not None
        and intermediates_below > constraints.path_length
    ):
        return (
            f"its pathLenConstraint ({constraints.path_length}) allows fewer "
            f"intermediate CAs below it than the chain has ({intermediates_below})"
        )
    return None


MAX_SIGNATURE_CHECKS = 100
"""Signature checks one chain search may make (as Go's C{maxChainSignatureChecks}), so a
client sending many cross-signed certificates cannot make the search explode."""


class _Budget:
    """
    Counts the signature checks of one chain search.
    """

    def __init__(self, checks: int) -> None:
        self.left = checks

    def signed_by(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        """
        Whether C{issuer} signed C{cert} (names match and the signature verifies).
        """
        if cert.issuer != issuer.subject or self.left <= 0:
            return False
        self.left -= 1
        try:
            cert.verify_directly_issued_by(issuer)
        except Exception:  # noqa: BLE001 - any failure means "not issued by this one"
            return False
        return True


def chain_to(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime.datetime,
    max_depth: int = 8,
    problems: Optional[list[str]] = None,
) -> Optional[list[x509.Certificate]]:
    """
    A verified chain from C{leaf} up to one of C{roots}, or None if there is none.

    Every link is checked by signature and validity. Each certificate of
    C{intermediates} (sent by the client, so untrusted) may appear only if it may
    issue (L{cannot_issue}); the C{roots} are trust anchors as given. Every path is
    tried (a client may send unrelated or duplicate certificates), at most
    C{max_depth} intermediates long and within L{MAX_SIGNATURE_CHECKS}. The leaf's own
    profile is not checked here (see L{check_client_leaf}).

    @param problems: if given, a sentence is appended for every certificate that
        signed a link but was refused, to explain a failure.
    @return: C{[leaf, intermediate..., root]} (just C{[leaf]} if the leaf is a root).
    """
    notes = problems if problems is not None else []
    if not _valid_now(leaf, now):
        notes.append(
            f"certificate {_cn(leaf)!r} is expired or not yet valid "
            f"(valid {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)"
        )
        return None
    if any(leaf == root for root in roots):
        return [leaf]
    candidates = list(dict.fromkeys(c for c in intermediates if c != leaf))
    budget = _Budget(MAX_SIGNATURE_CHECKS)

    def extend(chain: list[x509.Certificate]) -> Optional[list[x509.Certificate]]:
        current = chain[-1]
        below = len(chain) - 1  # intermediates already between the leaf and the next
        for root in roots:
            if not budget.signed_by(current, root):
                continue
            problem = _root_refuses(root, below, now)
            if problem is None:
                return chain + [root]
            notes.append(f"root {_cn(root)!r} cannot anchor the chain: {problem}")
        if below >= max_depth:
            return None
        for parent in candidates:
            if any(parent == c for c in chain) or not budget.signed_by(current, parent):
                continue
            problem = cannot_issue(parent, below, now)
            if problem is not None:
                notes.append(
                    f"certificate {_cn(parent)!r}, which signed "
                    f"{_cn(current)!r}, cannot issue certificates: {problem}"
                )
                continue
            found = extend(chain + [parent])
            if found is not None:
                return found
        return None

    found = extend([leaf])
    if found is None and budget.left <= 0:
        notes.append(
            f"the client sent too many candidate certificates (more than "
            f"{MAX_SIGNATURE_CHECKS} signature checks)"
        )
    return found


def check_client_leaf(leaf: x509.Certificate) -> None:
    """
    Refuse a leaf certificate that is not meant for TLS client authentication: a CA
    certificate (basicConstraints CA:TRUE), an extended key usage without clientAuth
    (or anyExtendedKeyUsage), a keyUsage without digitalSignature, or a critical
    extension this daemon does not process.

    @raise CertificateRefused: with what is wrong and what to do.
    """
    name = _cn(leaf)
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise CertificateRefused(
            f"client certificate {name!r} is a CA certificate (basicConstraints CA:TRUE) "
            "and cannot be a client identity; present a client certificate that CA "
            "issued (hypervisor make-certs --user makes one)"
        )
    eku = _extension(leaf, x509.ExtendedKeyUsage)
    if eku is not None and not _CLIENT_USAGES & set(eku):
        raise CertificateRefused(
            f"client certificate {name!r} is not for client authentication (its "
            f"extended key usage is {_usage_names(eku)}); present a certificate whose "
            "extended key usage includes clientAuth, or has none"
        )
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise CertificateRefused(
            f"client certificate {name!r} may not sign (its keyUsage lacks "
            "digitalSignature), so it cannot authenticate a TLS client; present a "
            "certificate whose keyUsage includes digitalSignature, or has none"
        )
    problem = _unknown_critical(leaf)
    if problem is not None:
        raise CertificateRefused(
            f"client certificate {name!r} cannot be used: {problem}; issue it again "
            "without that extension"
        )


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
    leaf: Optional[x509.Certificate],
    intermediates: Sequence[x509.Certificate],
    trust: TrustStore,
    now: Optional[datetime.datetime] = None,
) -> Identity:
    """
    The identity a client certificate chain proves.

    The chain must reach CA.pem or IdentityCA.pem through intermediates that may
    issue (L{chain_to}), and the leaf must be a client certificate
    (L{check_client_leaf}). Username, groups and permitted methods come from the leaf
    alone — never from an intermediate — and methods only when the chain ends at a
    CA.pem root.

    @return: L{ANONYMOUS} when no certificate was presented.
    @raise CertificateRefused: it does not verify, is not a client certificate, has
        no CN, or is malformed; the message says what is wrong and what to do.
    """
    if leaf is None:
        return ANONYMOUS
    now = now or datetime.datetime.now(datetime.timezone.utc)
    problems: list[str] = []
    full = chain_to(leaf, intermediates, trust.full, now, problems=problems)
    chain = full or chain_to(leaf, intermediates, trust.identity_only, now, problems=problems)
    if chain is None:
        reasons = "; ".join(dict.fromkeys(problems)) or "unknown issuer or bad signature"
        raise CertificateRefused(
            f"client certificate {_cn(leaf)!r} does not verify against CA.pem or "
            f"IdentityCA.pem ({reasons}); present a certificate issued by one of them, "
            "followed by any intermediate CAs (basicConstraints CA:TRUE) between them"
        )
    check_client_leaf(leaf)
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    username = str(names[0].value) if names else ""
    if not username:
        raise CertificateRefused(
            "client certificate has no common name (username); "
            "issue it again with the username as subject CN"
        )
    groups = _extension_strings(leaf, GROUPS_OID, "groups")
    methods: list[str] = []
    if full is not None:
        for m in _extension_strings(leaf, METHODS_OID, "permitted methods"):
            if m.count(".") != 1:
                raise CertificateRefused(
                    f"permitted method {m!r} is not Service.Method; issue the "
                    "certificate again with entries such as Hypervisor.ListVMs"
                )
            methods.append(m)
    return Identity(
        username=username,
        groups=frozenset(groups),
        method_patterns=tuple(methods),
        full_authority=full is not None,
    )


# The decision ------------------------------------------------------------------------


def authorize(
    identity: Identity,
    method: str,
    access: dict[str, str],
    unauthenticated_reads: frozenset[str],
    *,
    allow_unauthenticated_reads: bool = False,
    owner_users: frozenset[str] = frozenset(),
    owner_groups: frozenset[str] = frozenset(),
) -> Identity:
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
    if identity.username and (identity.username in owner_users or identity.groups & owner_groups):
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
            + (
                ""
                if method not in unauthenticated_reads
                else " (or a daemon started with -allowUnauthenticatedReads)"
            )
        )
    raise AccessDenied(f"access to method Hypervisor.{method} denied")
