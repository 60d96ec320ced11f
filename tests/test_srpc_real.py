"""
SRPC against the real daemon (C{python -m hypervisor ... run}: TLS with
C{make-certs} certificates, the real libvirtd), driven from the outside by the
Go-faithful client L{hypervisor.srpc.client} (new TCP connection per endpoint try,
the gob endpoint's 404 advancing, TLS after CONNECT, a JSON decoder per call reading
ahead as Go's does), by raw sockets and by C{openssl s_client}:

- CreateVm with the tiny guest: a raw root image and user data streamed after the
  request line, progress messages, C{Final} with the IP, AcknowledgeVm on the same
  connection (as vm-control does), the guest boots; the volume holds exactly the
  uploaded bytes and the state directory the user data; the user data read back with
  GetVmUserData (raw bytes after the JSON, through Go's read-ahead), replaced with
  ReplaceVmUserData's upload and read again;
- GetUpdates for 30 s with a keepalive every 5 s: the first Update full, one
  C{HealthStatus} Update per keepalive, and the changes made meanwhile over other
  connections (SetDisabledState, ChangeAddressPool) arrive on the stream;
- malformed input: wrong CONNECT heads, an unknown endpoint, oversized heads and
  method lines, bad JSON, an oversized request, garbage, a client that disconnects
  in the middle of a CreateVm upload (no VM is left and the partial volume is
  removed) — each answered as the reference says (status, error line) or closed,
  with no traceback in the daemon's log;
- C{openssl s_client} after a raw CONNECT is not possible (it speaks TLS first), so
  Go's fallback is checked with it: TLS first, then CONNECT inside TLS;
- per-transport metrics on C{/metrics}.

Subnet C{hvtest} on 10.83.0.0/24.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import subprocess
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.srpc import client as srpc
from hypervisor.srpc.codec import CONNECTED, NOT_FOUND
from tests import realrpc, support
from tests.realrpc import MiB

PREFIX = "10.83.0"


class SrpcRealTests(SynchronousTestCase):
    """
    One real daemon per test.
    """

    def setUp(self) -> None:
        support.require_libvirtd()
        support.ensure_bridge()

    def daemon(self, *flags: str) -> realrpc.TlsDaemon:
        d = realrpc.TlsDaemon(
            self, {"admin": "Hypervisor.*", "alice": ""}, "-domainType=qemu", *flags
        )
        d.start(healthy=True)
        self.addCleanup(realrpc.destroy_domains, PREFIX, d.dir)
        return d

    def connect(self, d: realrpc.TlsDaemon, user: str = "admin", **kw: Any) -> srpc.Connection:
        c = srpc.connect(
            "127.0.0.1",
            d.port,
            f"{d.pki}/{user}/{user}.cert",
            f"{d.pki}/{user}/{user}.key",
            go_readahead=True,
            timeout=120,
            **kw,
        )
        self.addCleanup(c.close)
        return c

    def assert_no_traceback(self, d: realrpc.TlsDaemon) -> None:
        excerpt = realrpc.traceback_excerpt(d)
        if excerpt:
            self.fail(f"the daemon logged a traceback: {excerpt}")

    def volume_files(self, d: realrpc.TlsDaemon) -> list[str]:
        found = []
        for top, _, files in os.walk(d.volumes):
            found.extend(os.path.join(top, f) for f in files)
        return found

    # CreateVm ---------------------------------------------------------------------------

    def test_create_vm_streamed_upload(self) -> None:
        """
        The tiny guest created with a streamed raw root image and user data; Ack on
        the same connection; it boots; the bytes arrived intact.
        """
        guest = support.tiny_guest()
        d = self.daemon(f"-localImagesDirectory={guest}")
        d.setup_network(PREFIX, 2, 0x53)
        image = bytes(range(256)) * (12 * MiB // 256)  # 12 MiB, a recognisable pattern
        user_data = b"#cloud-config\nhostname: srpc-guest\n" + os.urandom(3000)
        request = {
            "MemoryInMiB": 128,
            "MilliCPUs": 500,
            "SubnetId": "hvtest",
            "ExtraKernelOptions": "quiet hv.dhcp=no hv.mode=stay",
            "KernelURL": f"file://{guest}/vmlinux",
            "InitrdURL": f"file://{guest}/initrd.cpio",
            "ImageDataSize": len(image),
            "UserDataSize": len(user_data),
            "OwnerUsers": ["alice"],
            "Hostname": "srpc-guest",
        }
        c = self.connect(d, "alice")
        self.assertEqual(
            c.attempts,
            [
                ("/_go_TLS_SRPC_/", "404 Not Found"),
                ("/_SRPC_/TLS/JSON", "200 Connected to Go SRPC"),
            ],
        )
        messages = list(
            c.call_stream(
                "CreateVm", request, uploads=[(image, len(image)), (user_data, len(user_data))]
            )
        )
        final = messages[-1]
        self.assertTrue(final.get("Final"), messages)
        self.assertFalse(final.get("Error"), messages)
        ip = final["IpAddress"]
        self.assertTrue(ip.startswith(PREFIX + "."), final)
        self.assertTrue(any(m.get("ProgressMessage") for m in messages[:-1]), messages)
        self.assertEqual(c.call("AcknowledgeVm", {"IpAddress": ip}), {"Error": ""} | {})
        info = c.call("GetVmInfo", {"IpAddress": ip})
        self.assertEqual(info["VmInfo"]["State"], "running")
        self.assertEqual(info["VmInfo"]["OwnerUsers"][:1], ["alice"])
        self.assertIsInstance(info["VmInfo"]["Volumes"][0]["Size"], int)
        # The uploaded bytes are the root volume's start, and the user data is kept.
        digest = hashlib.sha256(image).hexdigest()
        held = [realrpc.image_file(p) for p in self.volume_files(d)]
        roots = [p for p in held if os.path.getsize(p) >= len(image)]
        self.assertTrue(
            any(realrpc.file_sha256(p, len(image)) == digest for p in roots),
            f"no volume holds the uploaded image: {roots}",
        )
        with open(os.path.join(d.state_dir, "VMs", ip, "user-data.raw"), "rb") as f:
            self.assertEqual(f.read(), user_data)
        # User data round trip over SRPC: read back (past Go's read-ahead), replaced
        # with an upload, read again.
        message, data = c.call_download("GetVmUserData", {"IpAddress": ip})
        self.assertEqual((message.get("Error", ""), data), ("", user_data))
        new_data = b"#cloud-config\nfinal_message: replaced\n" * 40
        reply = c.call_upload(
            "ReplaceVmUserData",
            {"IpAddress": ip, "Size": len(new_data)},
            [(new_data, len(new_data))],
        )
        self.assertEqual(reply.get("Error", ""), "")
        self.assertEqual(c.call_download("GetVmUserData", {"IpAddress": ip})[1], new_data)
        # The guest boots from it.
        support.wait_booted(os.path.join(d.state_dir, "VMs", ip, "bootlog"))
        reply = c.call("DestroyVm", {"IpAddress": ip})
        self.assertEqual(reply.get("Error", ""), "")
        self.assertEqual(c.call("ListVMs", {})["IpAddresses"], [])
        self.assert_no_traceback(d)

    def test_disconnect_mid_upload(self) -> None:
        """
        A client that goes away in the middle of a CreateVm upload leaves no VM, no
        volume file and its address free; the daemon keeps serving.
        """
        d = self.daemon()
        d.setup_network(PREFIX, 2, 0x53)
        before = d.free_addresses()
        c = self.connect(d)
        call = c.open("CreateVm")
        call.send(
            {
                "MemoryInMiB": 32,
                "MilliCPUs": 10,
                "SubnetId": "hvtest",
                "DoNotStart": True,
                "ImageDataSize": 64 * MiB,
            }
        )
        call.send_raw(b"\x55" * (20 * MiB), 20 * MiB)
        time.sleep(1.0)
        c.sock.shutdown(socket.SHUT_RDWR)
        c.close()

        def clean() -> bool:
            return not d.vm_dirs() and not self.volume_files(d) and d.free_addresses() == before

        support.wait_for(clean, 30, "the half-created VM to be removed")
        c2 = self.connect(d)
        self.assertEqual(c2.call("ListVMs", {})["IpAddresses"], [])
        self.assert_no_traceback(d)

    # GetUpdates ---------------------------------------------------------------------------

    def test_get_updates_with_pings(self) -> None:
        """
        30 s of GetUpdates with a keepalive every 5 s (as fleet-manager sends them):
        the first Update is full, each keepalive gets one Update with HealthStatus,
        and changes made meanwhile arrive on the stream.
        """
        d = self.daemon()
        d.setup_network(PREFIX, 3, 0x53)
        c = self.connect(d)
        updates = c.get_updates()
        first = updates.receive(timeout=10)
        for key in (
            "HaveAddressPool",
            "AddressPool",
            "HaveDisabled",
            "MemoryInMiB",
            "NumCPUs",
            "NumFreeAddresses",
            "HealthStatus",
            "HaveSubnets",
            "Subnets",
            "TotalVolumeBytes",
            "HaveVMs",
        ):
            self.assertIn(key, first)
        self.assertEqual(first["HealthStatus"], "healthy")
        self.assertEqual(first["NumFreeAddresses"], {"hvtest": 3})
        seen: list[dict[str, Any]] = []
        errors: list[BaseException] = []

        def changes() -> None:
            try:
                time.sleep(7)
                other = srpc.connect(
                    "127.0.0.1", d.port, f"{d.pki}/admin/admin.cert", f"{d.pki}/admin/admin.key"
                )
                with other:
                    other.call("SetDisabledState", {"Disable": True})
                    time.sleep(6)
                    other.call("SetDisabledState", {"Disable": False})
                    other.call(
                        "ChangeAddressPool",
                        {
                            "AddressesToAdd": [
                                {"IpAddress": f"{PREFIX}.99", "MacAddress": "52:54:0a:53:00:63"}
                            ]
                        },
                    )
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        thread = threading.Thread(target=changes)
        thread.start()
        start = time.monotonic()
        pings = 0
        answers = 0
        while time.monotonic() - start < 30:
            updates.ping()
            pings += 1
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    update = updates.receive(timeout=max(0.1, deadline - time.monotonic()))
                except (socket.timeout, TimeoutError):
                    break
                seen.append(update)
                self.assertEqual(update.get("HealthStatus"), "healthy", update)
                if set(update) == {"HealthStatus"}:
                    answers += 1
        thread.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(answers, pings, seen)
        self.assertGreaterEqual(pings, 6)
        disabled = [
            u["Disabled"] if "Disabled" in u else False for u in seen if u.get("HaveDisabled")
        ]
        self.assertEqual(disabled, [True, False], seen)
        pools = [u for u in seen if u.get("HaveAddressPool")]
        self.assertTrue(pools, seen)
        self.assertEqual(pools[-1]["NumFreeAddresses"], {"hvtest": 4})
        self.assert_no_traceback(d)

    # Malformed input --------------------------------------------------------------------

    def raw(self, d: realrpc.TlsDaemon, data: bytes, timeout: float = 15) -> bytes:
        """
        Send C{data} on a plain connection; everything the daemon answers until it
        closes (or C{timeout}).
        """
        s = d.plain_socket(timeout)
        try:
            s.sendall(data)
            out = b""
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                try:
                    chunk = s.recv(65536)
                except (socket.timeout, ConnectionResetError):
                    break
                if not chunk:
                    break
                out += chunk
            return out
        finally:
            s.close()

    def tls_session(self, d: realrpc.TlsDaemon, user: str = "admin") -> Any:
        """
        A TLS socket after C{CONNECT /_SRPC_/TLS/JSON} (no gob try).
        """
        c = srpc.connect_tls_json(
            "127.0.0.1", d.port, f"{d.pki}/{user}/{user}.cert", f"{d.pki}/{user}/{user}.key"
        )
        self.addCleanup(c.close)
        return c

    def read_until_closed(self, c: srpc.Connection, timeout: float = 15) -> bytes:
        c.sock.settimeout(timeout)
        out = b""
        try:
            while True:
                chunk = c.sock.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (socket.timeout, OSError):
            pass
        return out

    def test_malformed_connects(self) -> None:
        """
        Wrong CONNECT heads get 400, unknown and gob endpoints 404, the unsecured
        endpoint 405 (no -allowUnauthenticatedReads); each connection is closed;
        HTTP still works on the port.
        """
        d = self.daemon()
        cases = {
            b"CONNECT /_go_TLS_SRPC_/ HTTP/1.0\n\n": NOT_FOUND,
            b"CONNECT /_goSRPC_/ HTTP/1.0\n\n": NOT_FOUND,
            b"CONNECT /nothing/here HTTP/1.0\n\n": NOT_FOUND,
            b"CONNECT /_SRPC_/unsecured/JSON HTTP/1.0\n\n": b"HTTP/1.0 405 Method Not Allowed\n\n",
            b"CONNECT /_SRPC_/TLS/JSON HTTP/2.0\n\n": b"HTTP/1.0 400 Bad Request\n\n",
            b"CONNECT  /_SRPC_/TLS/JSON HTTP/1.0\n\n": b"HTTP/1.0 400 Bad Request\n\n",
            b"CONNECT _SRPC_/TLS/JSON HTTP/1.0\n\n": b"HTTP/1.0 400 Bad Request\n\n",
            b"CONNECT /\xff\xfe HTTP/1.0\n\n": b"HTTP/1.0 400 Bad Request\n\n",
            b"CONNECT /" + b"a" * 5000 + b" HTTP/1.0\n\n": b"HTTP/1.0 400 Bad Request\n\n",
            b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\r\n\r\n": CONNECTED,
        }
        for data, want in cases.items():
            got = self.raw(d, data, timeout=3 if want is CONNECTED else 15)
            self.assertEqual(got[: len(want)], want, data[:60])
            if want is not CONNECTED:
                self.assertEqual(got, want, data[:60])
        # A head that never ends is cut at the headers deadline, not kept.
        self.assertEqual(self.raw(d, b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\n", timeout=20), b"")
        self.assertEqual(support.http_get(d.url + "/healthz")[0], 200)
        self.assert_no_traceback(d)

    def test_malformed_calls(self) -> None:
        """
        Inside TLS: an unknown service or method is refused and the connection goes
        on; bad JSON, an oversized request and an oversized method line get an error
        line and the connection is closed; nothing is created.
        """
        d = self.daemon()
        d.setup_network(PREFIX, 2, 0x53)
        c = self.tls_session(d)
        c.write(b"Nope.Method\n")
        self.assertEqual(c.read_line(), b"unknown service: Nope")
        c.write(b"Hypervisor.ScanVmRoot\n")
        self.assertEqual(c.read_line(), b"Hypervisor: unknown method: ScanVmRoot")
        c.write(b".LocalUpgradeToUnix\n")
        self.assertEqual(c.read_line(), b"unknown service: ")
        c.ping()
        self.assertEqual(c.call("ListVMs", {}), {"IpAddresses": []})
        # Bad JSON after an accepted method: an error line, then the server closes.
        c.write(b"Hypervisor.CreateVm\n")
        self.assertEqual(c.read_line(), b"")
        c.write(b'{"MemoryInMiB": 32, "SubnetId": \n')
        line = self.read_until_closed(c)
        self.assertIn(b"malformed request", line)
        self.assertTrue(line.endswith(b"\n") and line.count(b"\n") == 1, line)
        # A JSON request over the method's limit (1 MiB).
        c = self.tls_session(d)
        c.write(b"Hypervisor.ListVMs\n")
        self.assertEqual(c.read_line(), b"")
        c.write(b'{"OwnerUsers":["' + b"a" * (2 * MiB) + b'"]}\n')
        line = self.read_until_closed(c)
        self.assertIn(b"line too long", line)
        # A method line without an end.
        c = self.tls_session(d)
        c.write(b"Hypervisor." + b"x" * 5000)
        self.assertIn(b"line too long", self.read_until_closed(c))
        # A request for the wrong type.
        c = self.tls_session(d)
        c.write(b"Hypervisor.CreateVm\n")
        self.assertEqual(c.read_line(), b"")
        c.write(b'{"MemoryInMiB":"lots","SubnetId":"hvtest"}\n')
        self.assertIn(b"MemoryInMiB", self.read_until_closed(c))
        self.assertEqual(d.vm_dirs(), [])
        # Silence after an accepted method line, or after the CONNECT reply (no TLS
        # handshake): cut at the guard's deadlines (10 s), not kept.
        c = self.tls_session(d)
        c.write(b"Hypervisor.ListVMs\n")
        self.assertEqual(c.read_line(), b"")
        started = time.monotonic()
        self.assertEqual(self.read_until_closed(c, timeout=30), b"")
        self.assertLess(time.monotonic() - started, 25)
        started = time.monotonic()
        self.assertEqual(
            self.raw(d, b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\n\n", timeout=30), CONNECTED
        )
        self.assertLess(time.monotonic() - started, 25)
        self.assert_no_traceback(d)

    def test_openssl_connect_inside_tls(self) -> None:
        """
        Go's fallback with a real OpenSSL client: TLS first, then CONNECT inside it,
        then a call.
        """
        d = self.daemon()
        script = b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\n\n" b"Hypervisor.GetCapacity\n" b"{}\n"
        process = subprocess.Popen(
            [
                "openssl",
                "s_client",
                "-quiet",
                "-connect",
                f"127.0.0.1:{d.port}",
                "-cert",
                f"{d.pki}/admin/admin.cert",
                "-key",
                f"{d.pki}/admin/admin.key",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(process.wait)
        self.addCleanup(process.kill)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(script)
        process.stdin.flush()
        out = b""
        end = time.monotonic() + 30
        while out.count(b"\n") < 4 and time.monotonic() < end:
            ready = select.select([process.stdout], [], [], 0.5)[0]
            if ready:
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        self.assertTrue(out.startswith(CONNECTED + b"\n\n{"), out[:200])
        reply = json.loads(out[len(CONNECTED) + 2 :].split(b"\n")[0])
        self.assertGreater(reply["NumCPUs"], 0)

    def test_metrics_per_transport(self) -> None:
        """
        /metrics counts calls per method and transport, and CONNECTs per endpoint.
        """
        d = self.daemon()
        c = self.connect(d)
        c.call("ListVMs", {})
        c.call("GetCapacity", {})
        d.call("ListVMs", {})
        status, listing = support.http_get(d.url + "/_goSRPC_/listMethods")
        self.assertEqual(status, 200)
        self.assertIn("Hypervisor.CreateVm\n", listing)
        text = support.http_get(d.url + "/metrics")[1]
        self.assertIn(
            'hypervisor_rpc_transport_calls_total{method="ListVMs",outcome="ok",transport="srpc"} 1.0',
            text,
        )
        self.assertIn(
            'hypervisor_rpc_transport_calls_total{method="ListVMs",outcome="ok",transport="https"} 1.0',
            text,
        )
        self.assertIn(
            'hypervisor_srpc_connections_total{answer="not-found",endpoint="/_go_TLS_SRPC_/"} 1.0',
            text,
        )
        self.assertIn(
            'hypervisor_srpc_connections_total{answer="connected",endpoint="/_SRPC_/TLS/JSON"} 1.0',
            text,
        )
