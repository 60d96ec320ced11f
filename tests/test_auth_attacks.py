# -*- test-case-name: tests.test_auth_attacks -*-
"""
Issue 9, finding 1, against a real daemon: a client certificate must never act as a
CA.

Every certificate here is made by the C{openssl} command line as an operator would:
the two roots with C{openssl req -x509} (CA.pem and IdentityCA.pem), client
certificates with C{openssl x509 -req} and NO basicConstraints extension (as most real
client certificates are; a second set has C{basicConstraints=CA:FALSE}), the
permitted-methods extension through an openssl config
(C{1.3.6.1.4.1.9586.100.7.1=ASN1:SEQUENCE:methods_sect}). Clients are curl with a
C{--cert} file holding the leaf then the intermediate, and openssl s_client.

- Attack (a): C{pooler} (CA.pem, granting C{Hypervisor.ChangeAddressPool} and
  C{Hypervisor.List*}) signs a leaf claiming C{*.*}; C{SetDisabledState} with
  leaf + pooler must be 401 and the host stays enabled.
- Attack (b): C{alice} (IdentityCA.pem, identity only) signs a leaf with CN=bob;
  C{DestroyVm} of bob's VM must be 401 and the VM stays.

Controls show the clients really send the chain and that the refusals are specific:
a real intermediate CA (CA:TRUE, keyCertSign) issues a leaf whose methods work; the
real bob can destroy his VM.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from tests import support

METHODS_OID = "1.3.6.1.4.1.9586.100.7.1"
SUBNET = "hvtest"  # the test bridge is br@hvtest
PREFIX = "10.99.0"


class OpenSslPki:
    """
    Certificates made with the openssl command line in one directory.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.serial = 1
        os.makedirs(directory, exist_ok=True)

    def path(self, name: str) -> str:
        """
        A file of the PKI directory.
        """
        return os.path.join(self.dir, name)

    def openssl(self, *args: str) -> None:
        """
        Run openssl; fail with its output if it fails.
        """
        result = subprocess.run(
            ["openssl", *args], cwd=self.dir, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise AssertionError(f"openssl {' '.join(args)}:\n{result.stderr}")

    def root(self, name: str, cn: str) -> str:
        """
        A self-signed root with C{openssl req -x509} (openssl's defaults: CA:TRUE).
        """
        self.openssl(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.pem",
            "-subj",
            f"/CN={cn}",
            "-days",
            "2",
        )
        return self.path(f"{name}.pem")

    def issue(
        self,
        name: str,
        cn: str,
        issuer: str,
        *,
        methods: tuple[str, ...] = (),
        extensions: tuple[str, ...] = (),
    ) -> str:
        """
        A certificate for C{cn} signed by C{issuer} (the name of an earlier
        certificate) with C{openssl x509 -req}: only the methods extension and the
        given extension lines (none by default: no basicConstraints).

        @return: the certificate's path (C{<name>.pem}; key C{<name>.key}).
        """
        self.openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={cn}",
        )
        lines = ["[ext]", *extensions]
        if methods:
            lines.append(f"{METHODS_OID}=ASN1:SEQUENCE:methods_sect")
            lines.append("[methods_sect]")
            lines += [f'field{i}=UTF8:"{m}"' for i, m in enumerate(methods, 1)]
        with open(self.path(f"{name}.cnf"), "w") as f:
            f.write("\n".join(lines) + "\n")
        self.serial += 1
        args = [
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            f"{issuer}.pem",
            "-CAkey",
            f"{issuer}.key",
            "-set_serial",
            str(self.serial),
            "-out",
            f"{name}.pem",
            "-days",
            "2",
        ]
        if len(lines) > 1:
            args += ["-extfile", f"{name}.cnf", "-extensions", "ext"]
        self.openssl(*args)
        return self.path(f"{name}.pem")

    def chain(self, name: str, *certificates: str) -> str:
        """
        A PEM file holding the named certificates in order (leaf first).
        """
        path = self.path(f"{name}.chain.pem")
        with open(path, "w") as out:
            for cert in certificates:
                with open(self.path(f"{cert}.pem")) as f:
                    out.write(f.read())
        return path

    def text(self, name: str) -> str:
        """
        C{openssl x509 -text} of a certificate.
        """
        return subprocess.run(
            ["openssl", "x509", "-noout", "-text", "-in", self.path(f"{name}.pem")],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout


class ChainAttackTests(SynchronousTestCase):
    """
    One real daemon (real libvirtd) for the class, with openssl-made CA.pem and
    IdentityCA.pem.
    """

    daemon: Optional[support.Daemon] = None
    holder: SynchronousTestCase
    pki: OpenSslPki

    @classmethod
    def start_daemon(cls) -> None:
        """
        Make the PKI with openssl, start the daemon once, set up a subnet and
        addresses as the admin, and let bob create his VM; stopped at exit.
        """
        cls.holder = SynchronousTestCase()
        d = support.Daemon(cls.holder, "-domainType=qemu")
        os.chmod(d.dir, 0o755)
        pki = cls.pki = OpenSslPki(os.path.join(d.dir, "pki"))
        pki.root("ca", "attack test CA")
        pki.root("idca", "attack test identity CA")
        pki.issue(
            "server",
            "localhost",
            "ca",
            extensions=(
                "basicConstraints=critical,CA:FALSE",
                "keyUsage=critical,digitalSignature",
                "extendedKeyUsage=serverAuth",
                "subjectAltName=IP:127.0.0.1,DNS:localhost",
            ),
        )
        pki.issue("admin", "admin", "ca", methods=("*.*",))
        pooler_methods = ("Hypervisor.ChangeAddressPool", "Hypervisor.List*")
        ca_false = ("basicConstraints=critical,CA:FALSE",)
        # The victims: without basicConstraints, and with CA:FALSE.
        pki.issue("pooler", "pooler", "ca", methods=pooler_methods)
        pki.issue("pooler-bc", "pooler", "ca", methods=pooler_methods, extensions=ca_false)
        pki.issue("alice", "alice", "idca")
        pki.issue("alice-bc", "alice", "idca", extensions=ca_false)
        pki.issue("bob", "bob", "idca")
        # The attackers' leaves, signed by the victims.
        for suffix in ("", "-bc"):
            pki.issue(f"evil{suffix}", "evil", f"pooler{suffix}", methods=("*.*",))
            pki.chain(f"evil{suffix}", f"evil{suffix}", f"pooler{suffix}")
            pki.issue(f"fakebob{suffix}", "bob", f"alice{suffix}")
            pki.chain(f"fakebob{suffix}", f"fakebob{suffix}", f"alice{suffix}")
        # The control: a real intermediate CA and a leaf it issues.
        pki.issue(
            "opsca",
            "ops intermediate CA",
            "ca",
            extensions=(
                "basicConstraints=critical,CA:TRUE",
                "keyUsage=critical,keyCertSign,cRLSign",
            ),
        )
        pki.issue("operator", "operator", "opsca", methods=("Hypervisor.SetDisabledState",))
        pki.chain("operator", "operator", "opsca")
        d.flags += [
            f"-CAfile={pki.path('ca.pem')}",
            f"-identityCAfile={pki.path('idca.pem')}",
            f"-certFile={pki.path('server.pem')}",
            f"-keyFile={pki.path('server.key')}",
            f"-volumeDirectories={d.dir}/volumes",
        ]
        import atexit

        atexit.register(d.cleanup)
        d.start()
        cls.daemon = d
        code, body = cls.rpc(
            "UpdateSubnets",
            {"Add": [{"Id": SUBNET, "IpGateway": f"{PREFIX}.1", "IpMask": "255.255.255.0"}]},
        )
        assert code == 200, body
        code, body = cls.rpc(
            "ChangeAddressPool",
            {
                "AddressesToAdd": [
                    {"IpAddress": f"{PREFIX}.{i}", "MacAddress": f"52:54:0a:63:00:{i:02x}"}
                    for i in range(2, 6)
                ]
            },
        )
        assert code == 200, body

    @classmethod
    def rpc(
        cls, method: str, request: dict[str, object], cert: str = "admin", key: Optional[str] = None
    ) -> tuple[int, bytes]:
        """
        C{POST /rpc/Hypervisor.<method>} with curl, presenting the PEM file C{cert}
        (a name of the PKI: C{<cert>.pem}, or a path) and its key.

        @return: HTTP status and body.
        """
        assert cls.daemon is not None
        pki = cls.pki
        cert_path = cert if os.path.isabs(cert) else pki.path(f"{cert}.pem")
        key_path = pki.path(f"{key or cert}.key")
        result = subprocess.run(
            [
                "curl",
                "-s",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                "--cacert",
                pki.path("ca.pem"),
                "--cert",
                cert_path,
                "--key",
                key_path,
                "-X",
                "POST",
                "--data-binary",
                "@-",
                f"https://127.0.0.1:{cls.daemon.port}/rpc/Hypervisor.{method}",
            ],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=120,
        )
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code or 0), body

    def setUp(self) -> None:
        support.require(
            os.geteuid() == 0
            and shutil.which("curl") is not None
            and shutil.which("openssl") is not None,
            "needs root, curl and openssl",
        )
        support.require_libvirtd()
        support.ensure_bridge()
        if type(self).daemon is None:
            type(self).start_daemon()

    def disabled(self) -> bool:
        """
        Whether the host is disabled: the state file, and the status page's banner.
        """
        assert self.daemon is not None
        on_disk = os.path.exists(os.path.join(self.daemon.state_dir, "disabled"))
        page = support.http_get(self.daemon.url + "/")[1]
        self.assertEqual(on_disk, "disabled-banner" in page)
        return on_disk

    def test_certificates_as_described(self) -> None:
        """
        The victims and leaves really are the attack's shape: no basicConstraints on
        pooler, alice and the leaves (CA:FALSE on the -bc set); the methods extension
        is present; the roots are CA:TRUE.
        """
        for name in ("pooler", "alice", "bob", "evil", "fakebob"):
            self.assertNotIn("Basic Constraints", self.pki.text(name), name)
        for name in ("pooler-bc", "alice-bc"):
            self.assertIn("CA:FALSE", self.pki.text(name), name)
        self.assertIn(METHODS_OID, self.pki.text("evil"))
        self.assertIn("CA:TRUE", self.pki.text("ca"))

    def test_pooler_leaf_cannot_disable_the_host(self) -> None:
        """
        Attack (a): leaf (claiming *.*) + pooler, with and without basicConstraints on
        pooler, gets 401 with a sentence for SetDisabledState and the host stays
        enabled; pooler itself gets 403, the leaf alone 401.
        """
        self.assertFalse(self.disabled())
        for suffix in ("", "-bc"):
            chain = self.pki.chain(f"evil{suffix}", f"evil{suffix}", f"pooler{suffix}")
            code, body = self.rpc("SetDisabledState", {"Disable": True}, chain, key=f"evil{suffix}")
            self.assertEqual(code, 401, body)
            error = json.loads(body)["Error"]
            self.assertIn("'pooler'", error)
            self.assertIn("not a CA", error)
            self.assertFalse(self.disabled(), suffix)
            code, body = self.rpc("SetDisabledState", {"Disable": True}, f"evil{suffix}")
            self.assertEqual(code, 401, body)
            code, body = self.rpc("SetDisabledState", {"Disable": True}, f"pooler{suffix}")
            self.assertEqual(code, 403, body)
            self.assertFalse(self.disabled(), suffix)

    def test_pooler_leaf_with_openssl_s_client(self) -> None:
        """
        Attack (a) with openssl s_client sending the chain (-cert_chain): 401, the host
        stays enabled.
        """
        assert self.daemon is not None
        body = json.dumps({"Disable": True})
        request = (
            f"POST /rpc/Hypervisor.SetDisabledState HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            f"{body}"
        ).encode()
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-quiet",
                "-connect",
                f"127.0.0.1:{self.daemon.port}",
                "-CAfile",
                self.pki.path("ca.pem"),
                "-cert",
                self.pki.path("evil.pem"),
                "-key",
                self.pki.path("evil.key"),
                "-cert_chain",
                self.pki.path("pooler.pem"),
            ],
            input=request,
            capture_output=True,
            timeout=60,
        )
        self.assertIn(b"HTTP/1.1 401", result.stdout, result.stderr)
        self.assertFalse(self.disabled())

    def test_real_intermediate_control(self) -> None:
        """
        Control: a leaf issued by a real intermediate CA (CA:TRUE, keyCertSign), sent
        with it, uses its own granted method (200); without the intermediate it is
        401 — so curl does send the chain, and legitimate chains still work.
        """
        chain = self.pki.chain("operator", "operator", "opsca")
        code, body = self.rpc("SetDisabledState", {"Disable": False}, chain, key="operator")
        self.assertEqual(code, 200, body)
        code, body = self.rpc("SetDisabledState", {"Disable": False}, "operator")
        self.assertEqual(code, 401, body)
        self.assertFalse(self.disabled())

    def test_alice_cannot_destroy_bobs_vm(self) -> None:
        """
        Attack (b): a leaf with CN=bob signed by alice (IdentityCA, with and without
        basicConstraints) gets 401 for DestroyVm of bob's VM, which stays; the real
        bob can then destroy it.
        """
        assert self.daemon is not None
        code, body = self.rpc(
            "CreateVm",
            {
                "MinimumFreeBytes": 1048576,
                "MemoryInMiB": 64,
                "MilliCPUs": 100,
                "DoNotStart": True,
                "SubnetId": SUBNET,
                "RoundupPower": 0,
            },
            "bob",
        )
        self.assertEqual(code, 200, body)
        final = json.loads(body.splitlines()[-1])
        self.assertTrue(final.get("Final"), final)
        ip = final["IpAddress"]
        code, body = self.rpc("AcknowledgeVm", {"IpAddress": ip}, "bob")
        self.assertEqual(code, 200, body)
        vm_dir = os.path.join(self.daemon.state_dir, "VMs", ip)
        for suffix in ("", "-bc"):
            chain = self.pki.chain(f"fakebob{suffix}", f"fakebob{suffix}", f"alice{suffix}")
            code, body = self.rpc("DestroyVm", {"IpAddress": ip}, chain, key=f"fakebob{suffix}")
            self.assertEqual(code, 401, body)
            error = json.loads(body)["Error"]
            self.assertIn("'alice'", error)
            self.assertIn("not a CA", error)
            self.assertTrue(os.path.exists(os.path.join(vm_dir, "info.json")), suffix)
            code, body = self.rpc("GetVmInfo", {"IpAddress": ip}, "bob")
            self.assertEqual(code, 200, body)
            self.assertEqual(json.loads(body)["VmInfo"]["OwnerUsers"], ["bob"])
        code, body = self.rpc("DestroyVm", {"IpAddress": ip}, "alice")
        self.assertEqual(code, 403, body)
        self.assertTrue(os.path.exists(os.path.join(vm_dir, "info.json")))
        code, body = self.rpc("DestroyVm", {"IpAddress": ip}, "bob")
        self.assertEqual(code, 200, body)
        self.assertFalse(os.path.exists(vm_dir))
