"""
Tests for L{hypervisor.auth}: certificate parsing and chain verification, and the
authorization decision.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import auth, certs
from hypervisor.api import ACCESS, UNAUTHENTICATED_READS
from hypervisor.errors import AccessDenied, NotFound


class DerTests(SynchronousTestCase):
    """
    The SEQUENCE OF strings in the groups and methods extensions.
    """

    @given(st.lists(st.text(max_size=300), max_size=20))
    def test_round_trip(self, values: list[str]) -> None:
        """
        parse(encode(x)) == x, long lengths included.
        """
        self.assertEqual(auth.parse_string_sequence(auth.encode_string_sequence(values)),
                         values)

    @given(st.binary(max_size=64))
    def test_garbage(self, data: bytes) -> None:
        """
        Random bytes raise only ValueError or UnicodeDecodeError (a refusal).
        """
        try:
            auth.parse_string_sequence(data)
        except (ValueError, UnicodeDecodeError):
            pass

    def test_malformed(self) -> None:
        """
        Trailing bytes, wrong tags, truncation and non-minimal lengths are refused.
        """
        good = auth.encode_string_sequence(["Hypervisor.*"])
        for bad in (good + b"\x00", b"\x31" + good[1:], good[:-1],
                    b"\x30\x81\x03\x0c\x01a", b"\x30\x03\x02\x01\x05"):
            self.assertRaises(ValueError, auth.parse_string_sequence, bad)


class IdentityTests(SynchronousTestCase):
    """
    Identities from certificate chains.
    """

    def setUp(self) -> None:
        self.ca_key, self.ca = certs.make_ca("CA")
        self.id_key, self.id_ca = certs.make_ca("Identity CA")
        self.trust = auth.TrustStore([self.ca], [self.id_ca])

    def identity(self, cert: x509.Certificate, chain: list = []) -> auth.Identity:  # noqa: B006
        return auth.identity_from_certificates(cert, chain, self.trust)

    def test_full_authority(self) -> None:
        """
        A CA.pem certificate gives username, groups and methods.
        """
        _, cert = certs.make_certificate(self.ca_key, self.ca, "alice",
                                         groups=["g1", "g2"], methods=["Hypervisor.Get*"])
        identity = self.identity(cert)
        self.assertEqual(identity.username, "alice")
        self.assertEqual(identity.groups, frozenset({"g1", "g2"}))
        self.assertTrue(identity.has_method_power("GetVmInfo"))
        self.assertFalse(identity.has_method_power("StopVm"))

    def test_identity_only(self) -> None:
        """
        An IdentityCA.pem certificate gives username and groups, never methods.
        """
        _, cert = certs.make_certificate(self.id_key, self.id_ca, "bob", groups=["g"],
                                         methods=["*.*"])
        identity = self.identity(cert)
        self.assertEqual((identity.username, identity.groups), ("bob", frozenset({"g"})))
        self.assertEqual(identity.method_patterns, ())
        self.assertFalse(identity.has_method_power("SetDisabledState"))

    def test_intermediate(self) -> None:
        """
        A chain through an intermediate CA verifies; methods of the intermediate count.
        """
        int_key, intermediate = certs.make_certificate(
            self.ca_key, self.ca, "intermediate", ca=True, methods=["Hypervisor.ListVMs"])
        _, leaf = certs.make_certificate(int_key, intermediate, "carol")
        identity = self.identity(leaf, [intermediate])
        self.assertTrue(identity.has_method_power("ListVMs"))
        self.assertRaises(auth.CertificateRefused, self.identity, leaf, [])

    def test_refusals(self) -> None:
        """
        Foreign, expired, CN-less and malformed certificates are refused with a reason.
        """
        other_key, other = certs.make_ca("other")
        _, foreign = certs.make_certificate(other_key, other, "mallory")
        e = self.assertRaises(auth.CertificateRefused, self.identity, foreign)
        self.assertIn("does not verify", str(e))
        _, expired = certs.make_certificate(
            self.ca_key, self.ca, "old", days=1,
            not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc))
        self.assertRaises(auth.CertificateRefused, self.identity, expired)
        key = certs.new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        base = (x509.CertificateBuilder().issuer_name(self.ca.subject)
                .public_key(key.public_key()).serial_number(1)
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(hours=1)))
        nameless = base.subject_name(x509.Name([])).sign(self.ca_key, hashes.SHA256())
        e = self.assertRaises(auth.CertificateRefused, self.identity, nameless)
        self.assertIn("no common name", str(e))
        malformed = (base.subject_name(x509.Name([x509.NameAttribute(
            x509.oid.NameOID.COMMON_NAME, "eve")]))
            .add_extension(x509.UnrecognizedExtension(auth.METHODS_OID, b"\x30\x05\x0c"),
                           critical=False)
            .sign(self.ca_key, hashes.SHA256()))
        e = self.assertRaises(auth.CertificateRefused, self.identity, malformed)
        self.assertIn("malformed permitted methods", str(e))
        _, no_dot = certs.make_certificate(self.ca_key, self.ca, "x", methods=["Everything"])
        self.assertRaises(auth.CertificateRefused, self.identity, no_dot)

    def test_no_certificate(self) -> None:
        """
        No certificate is the anonymous identity.
        """
        self.assertEqual(auth.identity_from_certificates(None, [], self.trust),
                         auth.ANONYMOUS)


class AuthorizeTests(SynchronousTestCase):
    """
    The decision, in memory (the TLS matrix is in test_rpc_access).
    """

    def decide(self, identity: auth.Identity, method: str, **kw: object) -> auth.Identity:
        return auth.authorize(identity, method, ACCESS, UNAUTHENTICATED_READS, **kw)  # type: ignore[arg-type]

    def test_rules(self) -> None:
        """
        Grants and ownership open admin methods; users get public ones; anonymous
        callers get reads only with the flag; unknown methods are 404.
        """
        user = auth.Identity(username="u", groups=frozenset({"ops"}))
        self.assertEqual(self.decide(user, "ListVMs"), user)
        self.assertRaises(AccessDenied, self.decide, user, "SetDisabledState")
        owner = self.decide(user, "SetDisabledState", owner_groups=frozenset({"ops"}))
        self.assertTrue(owner.hypervisor_owner)
        granted = auth.Identity(username="f", method_patterns=("Hypervisor.Set*",))
        self.decide(granted, "SetDisabledState")
        self.assertRaises(auth.Unauthenticated, self.decide, auth.ANONYMOUS, "ListVMs")
        self.decide(auth.ANONYMOUS, "ListVMs", allow_unauthenticated_reads=True)
        self.assertRaises(auth.Unauthenticated, self.decide, auth.ANONYMOUS, "StopVm",
                          allow_unauthenticated_reads=True)
        self.assertRaises(NotFound, self.decide, user, "NoSuchMethod")
