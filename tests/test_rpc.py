"""
The RPC interface of a real daemon (subprocess), with curl and openssl s_client as
real clients: plain HTTP and HTTPS on one port, bad requests, uploads, streams,
metrics. The daemon uses libvirt's test driver here; real VMs are in
test_vm_control.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from tests import support


class RpcDaemonTests(SynchronousTestCase):
    """
    One daemon with TLS for the whole class.
    """

    daemon = None

    @classmethod
    def start_daemon(cls) -> None:
        """
        Start the shared daemon once (trial has no setUpClass); stop it at exit.
        """
        support.ensure_bridge()
        cls.holder = SynchronousTestCase()
        d = cls.daemon = support.Daemon(
            cls.holder, "-libvirtUri=test:///default", "-domainType=qemu"
        )
        cls.pki = os.path.join(d.dir, "pki")
        cls.tls = [
            f"-CAfile={cls.pki}/CA.pem",
            f"-identityCAfile={cls.pki}/none.pem",
            f"-certFile={cls.pki}/server.pem",
            f"-keyFile={cls.pki}/server.key",
            f"-volumeDirectories={d.dir}/volumes",
        ]
        d.flags += cls.tls
        for user, methods in (("admin", "*.*"), ("alice", "")):
            result = d.command(
                "make-certs", "--user", user, "--methods", methods, "--out", f"{cls.pki}/users"
            )
            assert result.returncode == 0, result.stderr
        import atexit

        atexit.register(d.cleanup)
        d.start()

    def setUp(self) -> None:
        support.require(
            os.geteuid() == 0
            and shutil.which("curl") is not None
            and shutil.which("openssl") is not None,
            "needs root, curl and openssl",
        )
        if type(self).daemon is None:
            type(self).start_daemon()

    def curl(
        self, method: str, *args: str, user: str = "admin", https: bool = True, data: bytes = b"{}"
    ) -> tuple[int, bytes]:
        d = self.daemon
        scheme = "https" if https else "http"
        command = [
            "curl",
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
            f"{self.pki}/CA.pem",
            "-X",
            "POST",
            "--data-binary",
            "@-",
            f"{scheme}://127.0.0.1:{d.port}/rpc/Hypervisor.{method}",
            *args,
        ]
        if user and https:
            command[1:1] = [
                "--cert",
                f"{self.pki}/users/{user}.cert",
                "--key",
                f"{self.pki}/users/{user}.key",
            ]
        result = subprocess.run(command, input=data, capture_output=True, timeout=60)
        body, _, code = result.stdout.rpartition(b"\n")
        return int(code or 0), body

    def setup_network(self) -> None:
        self.curl(
            "UpdateSubnets",
            data=json.dumps(
                {"Add": [{"Id": "hvtest", "IpGateway": "10.66.0.1", "IpMask": "255.255.255.0"}]}
            ).encode(),
        )
        self.curl(
            "ChangeAddressPool",
            data=json.dumps(
                {
                    "AddressesToAdd": [
                        {"IpAddress": f"10.66.0.{i}", "MacAddress": f"52:54:0a:42:00:{i:02x}"}
                        for i in range(2, 6)
                    ]
                }
            ).encode(),
        )

    def test_plain_and_https_on_one_port(self) -> None:
        """
        The same port serves the status page over plain HTTP and over HTTPS; RPC needs
        HTTPS with a certificate.
        """
        d = self.daemon
        plain = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{d.port}/"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        secure = subprocess.run(
            ["curl", "-s", "--cacert", f"{self.pki}/CA.pem", f"https://127.0.0.1:{d.port}/"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        self.assertIn("hypervisor status page", plain)
        self.assertIn("hypervisor status page", secure)
        self.assertEqual(self.curl("ListVMs")[0], 200)
        code, body = self.curl("ListVMs", user="")
        self.assertEqual(code, 401)
        self.assertIn(b"needs a client certificate", body)
        code, body = self.curl("ListVMs", https=False)
        self.assertEqual(code, 401)

    def test_openssl_s_client(self) -> None:
        """
        openssl s_client (TLS 1.2 and 1.3) with the admin certificate gets 200; TLS
        1.1 is refused.
        """
        d = self.daemon
        request = (
            f"POST /rpc/Hypervisor.GetCapacity HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 2\r\nConnection: close\r\n\r\n{}"
        ).encode()
        for version in ("-tls1_2", "-tls1_3"):
            result = subprocess.run(
                [
                    "openssl",
                    "s_client",
                    "-quiet",
                    version,
                    "-connect",
                    f"127.0.0.1:{d.port}",
                    "-CAfile",
                    f"{self.pki}/CA.pem",
                    "-cert",
                    f"{self.pki}/users/admin.cert",
                    "-key",
                    f"{self.pki}/users/admin.key",
                ],
                input=request,
                capture_output=True,
                timeout=30,
            )
            self.assertIn(b"HTTP/1.1 200", result.stdout, result.stderr)
            self.assertIn(b'"NumCPUs"', result.stdout)
        old = subprocess.run(
            ["openssl", "s_client", "-tls1_1", "-connect", f"127.0.0.1:{d.port}"],
            input=b"",
            capture_output=True,
            timeout=30,
        )
        self.assertNotEqual(old.returncode, 0)

    def test_bad_requests(self) -> None:
        """
        Malformed JSON, wrong types, unknown methods and huge bodies get the
        documented status and a JSON error.
        """
        cases = [
            ("GetVmInfo", b"{not json", 400, b"malformed request"),
            ("GetVmInfo", b'{"IpAddress": ["x"]}', 400, b"IpRequest.IpAddress"),
            (
                "ChangeVmSize",
                b'{"IpAddress": "10.1.1.1", "MemoryInMiB": -5}',
                400,
                b"out of range for uint64",
            ),
            ("ChangeVmSize", b'{"IpAddress": "10.1.1.1", "MemoryInMiB": 5}', 404, b"no VM"),
            ("NoSuchMethod", b"{}", 404, b"unknown method"),
            ("ListVMs", b'{"IgnoreStateMask": "all"}', 400, b"expected an integer"),
            ("ListVMs", b" " * (2 << 20), 413, b"limit"),
            ("SetDisabledState", b'{"Disable": false}', 403, b"denied"),
        ]
        for method, data, status, words in cases:
            user = "alice" if method == "SetDisabledState" else "admin"
            code, body = self.curl(method, data=data, user=user)
            self.assertEqual(code, status, (method, body))
            self.assertIn(words, body, method)
            self.assertIn("Error", json.loads(body))

    def test_oversized_body_refused_before_reading(self) -> None:
        """
        Access is decided from the headers, before the body: without a certificate
        a huge body is answered 401 at once and the connection closed; with one, a
        Content-Length over the method's limit is answered 413 from the headers
        alone. Neither reads (or stores) the body.
        """
        import socket

        s = socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10)
        s.sendall(
            b"POST /rpc/Hypervisor.ListVMs HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 10000000000\r\n\r\n"
        )
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        s.close()
        self.assertTrue(reply.startswith(b"HTTP/1.1 401"), reply)
        result = subprocess.run(
            [
                "openssl",
                "s_client",
                "-quiet",
                "-connect",
                f"127.0.0.1:{self.daemon.port}",
                "-CAfile",
                f"{self.pki}/CA.pem",
                "-cert",
                f"{self.pki}/users/admin.cert",
                "-key",
                f"{self.pki}/users/admin.key",
            ],
            input=(
                b"POST /rpc/Hypervisor.ListVMs HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 10000000000\r\n\r\n"
            ),
            capture_output=True,
            timeout=30,
        )
        self.assertIn(b"HTTP/1.1 413", result.stdout, result.stderr)
        self.assertIn(b"1048576-byte limit", result.stdout)

    def test_get_rpc_lists_methods(self) -> None:
        """
        GET /rpc lists every method with its access class.
        """
        result = subprocess.run(
            ["curl", "-s", f"http://127.0.0.1:{self.daemon.port}/rpc"],
            capture_output=True,
            timeout=30,
        )
        methods = {m["Method"]: m["Access"] for m in json.loads(result.stdout)}
        self.assertEqual(methods["Hypervisor.CreateVm"], "public")
        self.assertEqual(methods["Hypervisor.UpdateSubnets"], "admin")

    def test_upload_stream_and_truncation(self) -> None:
        """
        CreateVm with an uploaded image and user data answers a newline-delimited JSON
        stream of progress then the final message; a truncated upload is a 400 and
        leaves no VM and no address taken.
        """
        self.setup_network()
        image = b"\xeb\x63" + os.urandom(65534)
        request = {
            "MemoryInMiB": 16,
            "MilliCPUs": 10,
            "SubnetId": "hvtest",
            "ImageDataSize": len(image),
            "UserDataSize": 9,
            "DoNotStart": True,
            "RoundupPower": 0,
        }
        body = json.dumps(request).encode() + b"\n" + image + b"user-data"
        code, out = self.curl("CreateVm", data=body)
        self.assertEqual(code, 200, out)
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertTrue(any("uploaded image" in m.get("ProgressMessage", "") for m in lines[:-1]))
        final = lines[-1]
        self.assertTrue(final["Final"])
        ip = final["IpAddress"]
        self.curl("AcknowledgeVm", data=json.dumps({"IpAddress": ip}).encode())
        vm_dir = os.path.join(self.daemon.state_dir, "VMs", ip)
        with open(os.path.join(vm_dir, "user-data.raw"), "rb") as f:
            self.assertEqual(f.read(), b"user-data")
        with open(os.path.join(vm_dir, "info.json")) as f:
            root = json.load(f)["VolumeLocations"][0]["Filename"]
        from tests.realrpc import image_file

        with open(image_file(root), "rb") as f:
            self.assertEqual(f.read(len(image)), image)
        vms_before = sorted(os.listdir(os.path.join(self.daemon.state_dir, "VMs")))
        pool_before = open(os.path.join(self.daemon.state_dir, "address-pool.json")).read()
        code, out = self.curl("CreateVm", data=body[:-100])
        self.assertEqual(code, 400)
        self.assertIn(b"announce", out)
        self.assertEqual(sorted(os.listdir(os.path.join(self.daemon.state_dir, "VMs"))), vms_before)
        self.assertEqual(
            open(os.path.join(self.daemon.state_dir, "address-pool.json")).read(), pool_before
        )

    def test_metrics(self) -> None:
        """
        /metrics parses as Prometheus text and counts calls and denials per method.
        """

        def samples() -> dict[tuple[str, tuple], float]:
            text = support.http_get(self.daemon.url + "/metrics")[1]
            out = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    out[(s.name, tuple(sorted(s.labels.items())))] = s.value
            return out

        before = samples()
        self.curl("GetCapacity")
        self.curl("GetCapacity", user="")
        after = samples()
        ok = ("hypervisor_rpc_calls_total", (("method", "GetCapacity"), ("outcome", "ok")))
        denied = (
            "hypervisor_rpc_denied_total",
            (("method", "GetCapacity"), ("reason", "unauthenticated")),
        )
        self.assertEqual(after[ok] - before.get(ok, 0), 1)
        self.assertEqual(after[denied] - before.get(denied, 0), 1)
        self.assertIn(
            ("hypervisor_rpc_duration_seconds_count", (("method", "GetCapacity"),)), after
        )
