# -*- test-case-name: tests.test_auth -*-
"""
Tests for L{hypervisor.auth}: certificate parsing and chain verification (only CAs
issue; identity and methods from the leaf alone; the leaf must be a client
certificate), the authorization decision, and the certificate profile of
L{hypervisor.certs}. Certificates are built in-process with C{cryptography}; the same
attacks against a real daemon with openssl-made certificates are in
L{tests.test_auth_attacks}.
"""

from __future__ import annotations

import datetime
import time
from typing import Any, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
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
        self.assertEqual(auth.parse_string_sequence(auth.encode_string_sequence(values)), values)

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
        for bad in (
            good + b"\x00",
            b"\x31" + good[1:],
            good[:-1],
            b"\x30\x81\x03\x0c\x01a",
            b"\x30\x03\x02\x01\x05",
        ):
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
        _, cert = certs.make_certificate(
            self.ca_key, self.ca, "alice", groups=["g1", "g2"], methods=["Hypervisor.Get*"]
        )
        identity = self.identity(cert)
        self.assertEqual(identity.username, "alice")
        self.assertEqual(identity.groups, frozenset({"g1", "g2"}))
        self.assertTrue(identity.has_method_power("GetVmInfo"))
        self.assertFalse(identity.has_method_power("StopVm"))

    def test_identity_only(self) -> None:
        """
        An IdentityCA.pem certificate gives username and groups, never methods.
        """
        _, cert = certs.make_certificate(
            self.id_key, self.id_ca, "bob", groups=["g"], methods=["*.*"]
        )
        identity = self.identity(cert)
        self.assertEqual((identity.username, identity.groups), ("bob", frozenset({"g"})))
        self.assertEqual(identity.method_patterns, ())
        self.assertFalse(identity.has_method_power("SetDisabledState"))

    def test_intermediate(self) -> None:
        """
        A chain through an intermediate CA verifies (the leaf alone is refused);
        methods of the intermediate do not count, only the leaf's.
        """
        int_key, intermediate = certs.make_certificate(
            self.ca_key,
            self.ca,
            "intermediate",
            ca=True,
            methods=["Hypervisor.ListVMs"],
            groups=["intermediate-group"],
        )
        _, leaf = certs.make_certificate(int_key, intermediate, "carol")
        identity = self.identity(leaf, [intermediate])
        self.assertEqual(identity.username, "carol")
        self.assertTrue(identity.full_authority)
        self.assertEqual((identity.method_patterns, identity.groups), ((), frozenset()))
        self.assertFalse(identity.has_method_power("ListVMs"))
        self.assertRaises(auth.CertificateRefused, self.identity, leaf, [])
        _, granted = certs.make_certificate(
            int_key, intermediate, "dave", methods=["Hypervisor.Get*"]
        )
        self.assertEqual(
            self.identity(granted, [intermediate]).method_patterns, ("Hypervisor.Get*",)
        )

    def test_refusals(self) -> None:
        """
        Foreign, expired, CN-less and malformed certificates are refused with a reason.
        """
        other_key, other = certs.make_ca("other")
        _, foreign = certs.make_certificate(other_key, other, "mallory")
        e = self.assertRaises(auth.CertificateRefused, self.identity, foreign)
        self.assertIn("does not verify", str(e))
        _, expired = certs.make_certificate(
            self.ca_key,
            self.ca,
            "old",
            days=1,
            not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
        )
        self.assertRaises(auth.CertificateRefused, self.identity, expired)
        key = certs.new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        base = (
            x509.CertificateBuilder()
            .issuer_name(self.ca.subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )
        nameless = base.subject_name(x509.Name([])).sign(self.ca_key, hashes.SHA256())
        e = self.assertRaises(auth.CertificateRefused, self.identity, nameless)
        self.assertIn("no common name", str(e))
        malformed = (
            base.subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "eve")]))
            .add_extension(
                x509.UnrecognizedExtension(auth.METHODS_OID, b"\x30\x05\x0c"), critical=False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        e = self.assertRaises(auth.CertificateRefused, self.identity, malformed)
        self.assertIn("malformed permitted methods", str(e))
        _, no_dot = certs.make_certificate(self.ca_key, self.ca, "x", methods=["Everything"])
        self.assertRaises(auth.CertificateRefused, self.identity, no_dot)

    def test_no_certificate(self) -> None:
        """
        No certificate is the anonymous identity.
        """
        self.assertEqual(auth.identity_from_certificates(None, [], self.trust), auth.ANONYMOUS)


Pair = tuple[certs.Key, x509.Certificate]

NO_USAGE = dict(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def key_usage(**flags: bool) -> x509.KeyUsage:
    """
    A keyUsage extension with exactly C{flags} set.
    """
    return x509.KeyUsage(**{**NO_USAGE, **flags})


def issue(
    issuer: Optional[Pair],
    cn: str,
    *,
    constraints: Optional[x509.BasicConstraints] = None,
    usage: Optional[x509.KeyUsage] = None,
    eku: Optional[list[Any]] = None,
    methods: list[str] = [],
    groups: list[str] = [],  # noqa: B006
    extra: list[tuple[x509.ExtensionType, bool]] = [],  # noqa: B006
    not_before: Optional[datetime.datetime] = None,
    days: float = 1,
) -> Pair:
    """
    A certificate with exactly the extensions asked for — none by default, like
    C{openssl x509 -req} without an extension file — signed by C{issuer} (or
    self-signed when None).
    """
    key = certs.new_key()
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
        minutes=5
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[1].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
    )
    if constraints is not None:
        builder = builder.add_extension(constraints, critical=True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    for oid, values in ((auth.METHODS_OID, methods), (auth.GROUPS_OID, groups)):
        if values:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(oid, auth.encode_string_sequence(values)), critical=False
            )
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return key, builder.sign(issuer[0] if issuer else key, hashes.SHA256())


CA_TRUE = x509.BasicConstraints(ca=True, path_length=None)
CA_FALSE = x509.BasicConstraints(ca=False, path_length=None)
VICTIM_PROFILES: dict[str, dict[str, Any]] = {
    "without basicConstraints": {},
    "with basicConstraints CA:FALSE": {"constraints": CA_FALSE},
    "with CA:FALSE, keyUsage and clientAuth": {
        "constraints": CA_FALSE,
        "usage": key_usage(digital_signature=True),
        "eku": [ExtendedKeyUsageOID.CLIENT_AUTH],
    },
}
"""The certificates of the attacks' victims (the signers), in every common shape."""


class ChainRuleTests(SynchronousTestCase):
    """
    Only CAs issue; identity and methods come from the leaf; the leaf must be a
    client certificate (issue 9, finding 1).
    """

    def setUp(self) -> None:
        self.ca: Pair = issue(
            None, "CA", constraints=CA_TRUE, usage=key_usage(key_cert_sign=True, crl_sign=True)
        )
        self.id_ca: Pair = issue(None, "Identity CA", constraints=CA_TRUE)
        self.trust = auth.TrustStore([self.ca[1]], [self.id_ca[1]])

    def identity(
        self, leaf: x509.Certificate, chain: Sequence[x509.Certificate] = ()
    ) -> auth.Identity:
        return auth.identity_from_certificates(leaf, chain, self.trust)

    def refused(
        self, leaf: x509.Certificate, chain: Sequence[x509.Certificate] = (), *words: str
    ) -> str:
        """
        Assert the chain is refused with C{words} in the sentence; return it.
        """
        e = self.assertRaises(auth.CertificateRefused, self.identity, leaf, chain)
        for word in words:
            self.assertIn(word, str(e))
        return str(e)

    def test_pooler_cannot_grant_methods(self) -> None:
        """
        Attack (a): a CA.pem client certificate granting a few methods signs a leaf
        claiming C{*.*}; leaf + signer is refused, whatever the signer's
        basicConstraints, and the sentence names the signer and says it is no CA.
        """
        for profile, kw in VICTIM_PROFILES.items():
            pooler = issue(
                self.ca,
                "pooler",
                methods=["Hypervisor.ChangeAddressPool", "Hypervisor.List*"],
                **kw,
            )
            self.assertTrue(self.identity(pooler[1]).has_method_power("ChangeAddressPool"), profile)
            _, evil = issue(pooler, "evil", methods=["*.*"])
            message = self.refused(evil, [pooler[1]], "'pooler'", "not a CA", "does not verify")
            self.assertIn("intermediate CAs (basicConstraints CA:TRUE)", message)
            self.refused(evil, [pooler[1], self.ca[1]])

    def test_identity_user_cannot_impersonate(self) -> None:
        """
        Attack (b): an IdentityCA.pem user certificate signs a leaf with another
        user's name; it is refused, whatever the signer's basicConstraints.
        """
        for profile, kw in VICTIM_PROFILES.items():
            alice = issue(self.id_ca, "alice", **kw)
            self.assertEqual(self.identity(alice[1]).username, "alice", profile)
            _, fake_bob = issue(alice, "bob")
            self.refused(fake_bob, [alice[1]], "'alice'", "not a CA")

    def test_make_certs_users_cannot_issue(self) -> None:
        """
        Certificates made by make-certs (CA:FALSE) cannot issue either.
        """
        ca_key, ca = certs.make_ca("made CA")
        trust = auth.TrustStore([ca], [])
        user = certs.make_certificate(ca_key, ca, "pooler", methods=["Hypervisor.List*"])
        _, evil = issue(user, "evil", methods=["*.*"])
        self.assertRaises(
            auth.CertificateRefused, auth.identity_from_certificates, evil, [user[1]], trust
        )

    def test_key_cert_sign_required(self) -> None:
        """
        An intermediate with CA:TRUE whose keyUsage lacks keyCertSign cannot issue;
        with keyCertSign, or without keyUsage, it can.
        """
        bad = issue(self.ca, "signer", constraints=CA_TRUE, usage=key_usage(digital_signature=True))
        _, leaf = issue(bad, "carol")
        self.refused(leaf, [bad[1]], "'signer'", "keyCertSign")
        for usage in (key_usage(key_cert_sign=True), None):
            good = issue(self.ca, "signer", constraints=CA_TRUE, usage=usage)
            _, leaf = issue(good, "carol")
            self.assertEqual(self.identity(leaf, [good[1]]).username, "carol")

    def test_path_length(self) -> None:
        """
        An intermediate's pathLenConstraint limits the intermediates below it; a
        root's is respected too (as in Go).
        """
        top = issue(self.ca, "top", constraints=x509.BasicConstraints(True, 0))
        middle = issue(top, "middle", constraints=CA_TRUE)
        _, leaf = issue(middle, "carol")
        self.refused(leaf, [middle[1], top[1]], "'top'", "pathLenConstraint (0)")
        _, direct = issue(top, "dave")
        self.assertEqual(self.identity(direct, [top[1]]).username, "dave")
        top = issue(self.ca, "top", constraints=x509.BasicConstraints(True, 1))
        middle = issue(top, "middle", constraints=CA_TRUE)
        _, leaf = issue(middle, "carol")
        self.assertEqual(self.identity(leaf, [middle[1], top[1]]).username, "carol")
        root = issue(None, "short root", constraints=x509.BasicConstraints(True, 0))
        trust = auth.TrustStore([root[1]], [])
        inter = issue(root, "inter", constraints=CA_TRUE)
        _, leaf = issue(inter, "erin")
        e = self.assertRaises(
            auth.CertificateRefused, auth.identity_from_certificates, leaf, [inter[1]], trust
        )
        self.assertIn("root 'short root'", str(e))

    def test_roots_as_given(self) -> None:
        """
        A configured root without basicConstraints (an old-style root) still anchors
        chains: trust anchors are taken as given.
        """
        root = issue(None, "old root")
        trust = auth.TrustStore([root[1]], [])
        _, leaf = issue(root, "frank", methods=["Hypervisor.ListVMs"])
        identity = auth.identity_from_certificates(leaf, [], trust)
        self.assertEqual(identity.method_patterns, ("Hypervisor.ListVMs",))

    def test_intermediate_restrictions(self) -> None:
        """
        An intermediate that is expired, restricted to serverAuth, or carries a
        critical extension we do not process (name constraints) cannot issue.
        """
        old = issue(
            self.ca,
            "old",
            constraints=CA_TRUE,
            days=1,
            not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
        )
        server_only = issue(
            self.ca, "servers", constraints=CA_TRUE, eku=[ExtendedKeyUsageOID.SERVER_AUTH]
        )
        constrained = issue(
            self.ca,
            "constrained",
            constraints=CA_TRUE,
            extra=[
                (
                    x509.NameConstraints(
                        permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
                    ),
                    True,
                )
            ],
        )
        for signer, words in (
            (old, "expired"),
            (server_only, "client authentication"),
            (constrained, "critical extension"),
        ):
            _, leaf = issue(signer, "carol")
            self.refused(leaf, [signer[1]], words)
        client_ca = issue(
            self.ca, "clients", constraints=CA_TRUE, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]
        )
        _, leaf = issue(client_ca, "carol")
        self.assertEqual(self.identity(leaf, [client_ca[1]]).username, "carol")

    def test_search_skips_decoys(self) -> None:
        """
        A non-CA certificate with the same subject as the real intermediate, sent
        first, does not hide the real one; unrelated and duplicate certificates are
        ignored.
        """
        real = issue(self.ca, "intermediate", constraints=CA_TRUE)
        _, leaf = issue(real, "carol")
        decoy = (real[0], issue(self.ca, "intermediate")[1])  # not a CA; other key
        same_key_decoy = (
            x509.CertificateBuilder()
            .subject_name(real[1].subject)
            .issuer_name(self.ca[1].subject)
            .public_key(real[0].public_key())
            .serial_number(7)
            .not_valid_before(real[1].not_valid_before_utc)
            .not_valid_after(real[1].not_valid_after_utc)
            .sign(self.ca[0], hashes.SHA256())
        )
        chain = [decoy[1], same_key_decoy, issue(self.ca, "unrelated")[1], real[1], real[1]]
        self.assertEqual(self.identity(leaf, chain).username, "carol")

    def test_cross_signed_flood(self) -> None:
        """
        Many cross-signed CA certificates that never reach a root are refused quickly
        (the signature checks are bounded), with a sentence.
        """
        key = certs.new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loop")])
        now = datetime.datetime.now(datetime.timezone.utc)
        flood = [
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(i + 1)
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(CA_TRUE, critical=True)
            .sign(key, hashes.SHA256())
            for i in range(12)
        ]
        _, leaf = issue((key, flood[0]), "carol")
        started = time.monotonic()
        self.refused(leaf, flood, "too many candidate certificates")
        self.assertLess(time.monotonic() - started, 10)

    def test_leaf_must_be_a_client_certificate(self) -> None:
        """
        A serverAuth-only or codeSigning-only leaf, a leaf whose keyUsage lacks
        digitalSignature, a CA leaf, or one with an unknown critical extension is
        refused with a sentence; clientAuth, anyExtendedKeyUsage or no EKU is
        accepted.
        """
        cases: list[tuple[dict[str, Any], str]] = [
            ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "serverAuth"),
            ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, "codeSigning"),
            ({"usage": key_usage(key_encipherment=True)}, "digitalSignature"),
            ({"constraints": CA_TRUE}, "is a CA certificate"),
            (
                {"constraints": CA_TRUE, "usage": key_usage(key_cert_sign=True)},
                "is a CA certificate",
            ),
            (
                {
                    "extra": [
                        (
                            x509.UnrecognizedExtension(
                                x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"
                            ),
                            True,
                        )
                    ]
                },
                "critical extension",
            ),
        ]
        for kw, words in cases:
            _, leaf = issue(self.ca, "admin", methods=["*.*"], **kw)
            self.refused(leaf, [], "'admin'", words)
        for kw in (
            {},
            {"eku": [ExtendedKeyUsageOID.CLIENT_AUTH]},
            {"eku": [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]},
            {"eku": [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]},
            {
                "constraints": CA_FALSE,
                "usage": key_usage(digital_signature=True, key_encipherment=True),
            },
        ):
            _, leaf = issue(self.ca, "admin", methods=["*.*"], **kw)
            self.assertTrue(self.identity(leaf).has_method_power("SetDisabledState"), kw)

    def test_root_presented_as_leaf(self) -> None:
        """
        Presenting the CA certificate itself as a client certificate is refused (it
        is a CA).
        """
        self.refused(self.ca[1], [], "is a CA certificate")

    def test_identity_only_chain_gives_no_methods(self) -> None:
        """
        Through an IdentityCA.pem intermediate, neither the intermediate's methods nor
        the leaf's count; username and groups come from the leaf only.
        """
        inter = issue(
            self.id_ca,
            "id intermediate",
            constraints=CA_TRUE,
            methods=["*.*"],
            groups=["inter-group"],
        )
        _, leaf = issue(inter, "grace", methods=["*.*"], groups=["leaf-group"])
        identity = self.identity(leaf, [inter[1]])
        self.assertEqual(
            (identity.username, identity.groups, identity.method_patterns, identity.full_authority),
            ("grace", frozenset({"leaf-group"}), (), False),
        )

    def test_expired_leaf_sentence(self) -> None:
        """
        An expired leaf is refused with its validity period in the sentence.
        """
        _, leaf = issue(
            self.ca,
            "old",
            days=1,
            not_before=datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc),
        )
        self.refused(leaf, [], "expired or not yet valid", "2020-01-02")


class CertsProfileTests(SynchronousTestCase):
    """
    What C{hypervisor make-certs} (L{hypervisor.certs}) makes fits the rules.
    """

    def test_ca(self) -> None:
        """
        A CA is basicConstraints CA:TRUE (critical) with keyUsage keyCertSign and
        cRLSign (critical).
        """
        _, ca = certs.make_ca("CA")
        bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(bc.critical and bc.value.ca)
        ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(ku.critical and ku.value.key_cert_sign and ku.value.crl_sign)
        self.assertFalse(ku.value.digital_signature)

    def test_client_and_server(self) -> None:
        """
        A user certificate is CA:FALSE, keyUsage digitalSignature, EKU clientAuth; the
        server's has EKU serverAuth and clientAuth; both are accepted as clients, and
        an intermediate made with ca=True can issue.
        """
        ca_key, ca = certs.make_ca("CA")
        _, user = certs.make_certificate(ca_key, ca, "alice", methods=["Hypervisor.*"])
        _, server = certs.make_certificate(ca_key, ca, "host", server_names=["127.0.0.1"])
        for cert, usages in (
            (user, [ExtendedKeyUsageOID.CLIENT_AUTH]),
            (server, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        ):
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
            self.assertTrue(bc.critical)
            self.assertFalse(bc.value.ca)
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            self.assertTrue(ku.digital_signature)
            self.assertFalse(ku.key_cert_sign)
            self.assertEqual(
                list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value), usages
            )
            auth.check_client_leaf(cert)
        trust = auth.TrustStore([ca], [])
        self.assertTrue(auth.identity_from_certificates(user, [], trust).has_method_power("StopVm"))
        int_key, inter = certs.make_certificate(ca_key, ca, "inter", ca=True, path_length=0)
        ku = inter.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(ku.key_cert_sign)
        _, leaf = certs.make_certificate(int_key, inter, "bob")
        self.assertEqual(auth.identity_from_certificates(leaf, [inter], trust).username, "bob")


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
        self.assertRaises(
            auth.Unauthenticated,
            self.decide,
            auth.ANONYMOUS,
            "StopVm",
            allow_unauthenticated_reads=True,
        )
        self.assertRaises(NotFound, self.decide, user, "NoSuchMethod")
