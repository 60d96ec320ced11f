"""
Issue 9 regressions against the real daemon (C{python -m hypervisor ... run} with
TLS and C{make-certs} certificates, on C{qemu:///system}) that other tests do not
cover, reproduced from the outside with raw and TLS sockets:

- finding 2: a CreateVm announcing a 1 TiB body is refused from its headers (401
  without a certificate, 503 while the hypervisor is disabled) and its connection
  closed, before the daemon stores a byte of it; a real upload still works after;
- finding 8 (the RPC half): with no file descriptor left for the state write, a
  state-changing RPC answers 503 saying so, and nothing changes;
- finding 6 (the RPC half): JSON nested 1,000 and 100,000 deep to every method,
  with and without a certificate (C{-allowUnauthenticatedReads}), and integers
  beyond 1e309 in a Duration field, are 400 with a sentence, never 500, and the
  daemon logs no traceback.

Subnet C{hvtest} on 10.82.<n>.0/24.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Any, Optional

from twisted.trial.unittest import SynchronousTestCase

from hypervisor.api import METHODS, RAW, UNAUTHENTICATED_READS
from tests import realrpc, support
from tests.realrpc import MiB

TEBIBYTE = 1 << 40


def whole_response(data: bytes) -> bool:
    """
    Whether C{data} holds a response head and all of its Content-Length body.
    """
    head, found, body = data.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value.strip())
    return True


def empty_vm(**extra: Any) -> dict[str, Any]:
    """
    A CreateVm request for a small stopped VM with an empty 1 MiB root volume.
    """
    request: dict[str, Any] = {
        "MemoryInMiB": 32,
        "MilliCPUs": 10,
        "SubnetId": "hvtest",
        "MinimumFreeBytes": MiB,
        "DoNotStart": True,
    }
    request.update(extra)
    return request


class SecurityTestCase(SynchronousTestCase):
    """
    Shared set-up: a TLS daemon per test and a check of its log.
    """

    def setUp(self) -> None:
        support.require_libvirtd()
        support.ensure_bridge()

    def daemon(self, *flags: str, **kwargs: Any) -> realrpc.TlsDaemon:
        """
        A started TLS daemon with users admin (every method) and alice (none).
        """
        d = realrpc.TlsDaemon(
            self, {"admin": "*.*", "alice": ""}, "-domainType=qemu", *flags, **kwargs
        )
        d.start(healthy=True)
        return d

    def assert_no_traceback(self, d: realrpc.TlsDaemon) -> None:
        """
        The daemon logged no traceback.
        """
        excerpt = realrpc.traceback_excerpt(d)
        if excerpt:
            self.fail(f"the daemon logged a traceback: {excerpt}")


class EarlyRefusalTests(SecurityTestCase):
    """
    Finding 2: access is decided from the headers; nothing of a refused body is
    stored.
    """

    def refused_before_body(self, sock: socket.socket, status: int) -> dict[str, Any]:
        """
        Announce a 1 TiB CreateVm on C{sock} and send body bytes: the reply (with
        C{status}) comes at once, and the daemon closes the connection within
        seconds, whatever the client keeps sending. Returns figures (seconds to the
        answer and to the close, bytes sent).
        """
        began = time.monotonic()
        data, how = b"", ""
        try:
            sock.sendall(realrpc.request_head("CreateVm", TEBIBYTE) + os.urandom(MiB))
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            how = "refused more bytes"  # answered and closed already
        sock.settimeout(5)
        while not whole_response(data):
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                chunk = b""
            if not chunk:
                how = how or "closed"
                break
            data += chunk
        answered = time.monotonic() - began
        self.assertEqual(realrpc.http_status(data), status, data)
        self.assertLess(answered, 3.0, "the refusal was not immediate")
        body = json.loads(realrpc.response_body(data).split(b"\n")[0])
        self.assertTrue(body["Error"].strip(), data)
        sent = MiB
        piece = b"\0" * (256 * 1024)
        deadline = time.monotonic() + 10
        while not how and time.monotonic() < deadline:
            try:
                sock.settimeout(2)
                sock.sendall(piece)
                sent += len(piece)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                how = "refused more bytes"
            except socket.timeout:
                rest, how = realrpc.read_reply(sock, deadline - time.monotonic())
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    raise
                how = "refused more bytes"
        closed = time.monotonic() - began
        self.assertTrue(how and how != "timeout", f"the connection stayed open after {sent} bytes")
        self.assertLess(closed, 10)
        return {"answered": answered, "sent": sent, "how": how, "closed": closed}

    def test_refused_before_the_body(self) -> None:
        """
        With TMPDIR a private directory: CreateVm with C{Content-Length:
        1099511627776}, then bytes, is answered at once and the connection closed —
        401 over plain HTTP and over TLS without a certificate, 503 (disabled) with
        the admin's and alice's certificates while the hypervisor is disabled with
        SetDisabledState. TMPDIR and the volume directory do not grow; after
        enabling again, a real 8 MiB upload by the admin creates the VM.
        """
        tmp = tempfile.mkdtemp(prefix="hv-tmpdir-")
        os.chmod(tmp, 0o1777)
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", tmp]))
        d = self.daemon(env={"TMPDIR": tmp})
        d.setup_network("10.82.1", 1, 0x92)
        volumes_before = realrpc.tree_bytes(d.volumes)
        with d.plain_socket() as sock:
            self.refused_before_body(sock, 401)
        with d.tls_socket(None) as tls:
            self.refused_before_body(tls, 401)
        disabled = d.call("SetDisabledState", {"Disable": True})
        self.assertEqual(disabled.status, 200, disabled)
        for user in ("admin", "alice"):
            with d.tls_socket(user) as tls:
                self.refused_before_body(tls, 503)
        self.assertEqual(realrpc.tree_bytes(tmp), 0)
        self.assertEqual(os.listdir(tmp), [])
        self.assertEqual(realrpc.tree_bytes(d.volumes), volumes_before)
        self.assertEqual(d.vm_dirs(), [])
        enabled = d.call("SetDisabledState", {"Disable": False})
        self.assertEqual(enabled.status, 200, enabled)
        image = os.urandom(8 * MiB)
        line = json.dumps(empty_vm(ImageDataSize=len(image), MinimumFreeBytes=0)).encode() + b"\n"
        created = realrpc.stream_call(d, "CreateVm", line, [image], len(line) + len(image))
        self.assertEqual(created.status, 200, created)
        ip = created.last["IpAddress"]
        self.assertEqual(d.call("AcknowledgeVm", {"IpAddress": ip}).status, 200)
        import hashlib

        self.assertEqual(
            realrpc.file_sha256(os.path.join(d.volumes, ip, "root"), len(image)),
            hashlib.sha256(image).hexdigest(),
        )
        self.assertEqual(os.listdir(tmp), [])
        self.assertEqual(d.healthz(), 200)
        self.assert_no_traceback(d)


class DescriptorTests(SecurityTestCase):
    """
    Finding 8: out of file descriptors, a state change is a 503 that says so.

    The daemon's descriptors are exhausted from outside, exactly: its soft
    C{RLIMIT_NOFILE} is lowered (C{prlimit --pid}) to one above its lowest free
    descriptor number, so that accepting the RPC's connection takes the last one
    and the state write's C{open} fails with EMFILE. (Filling the table with
    connections cannot do it: the connection guard keeps a reserve of at least 64
    descriptors for the rest of the daemon.) Something else the daemon opens at
    that moment (a timer reading /proc) can take the descriptor first, so each
    call is tried a few times.
    """

    def limits(self, pid: int) -> tuple[int, int]:
        """
        The daemon's soft and hard descriptor limits.
        """
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return int(soft), int(hard)
        raise AssertionError("no descriptor limit in /proc/PID/limits")

    def starved_call(
        self, d: realrpc.TlsDaemon, method: str, body: dict[str, Any]
    ) -> realrpc.Reply:
        """
        Call C{method} with the daemon's soft descriptor limit at its lowest free
        descriptor + 1; the limit is restored before returning.
        """
        assert d.process is not None
        pid = d.process.pid
        soft, hard = self.limits(pid)
        d.context("admin")  # load the client certificate before, not during

        def table() -> set[int]:
            return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}

        used = table()
        for _ in range(20):  # let closing connections go
            time.sleep(0.05)
            now = table()
            if now == used:
                break
            used = now
        lowest = next(n for n in range(len(used) + 1) if n not in used)
        subprocess.run(
            ["prlimit", "--pid", str(pid), f"--nofile={lowest + 1}:{hard}"],
            check=True,
            capture_output=True,
        )
        try:
            return d.call(method, body, timeout=30)
        finally:
            subprocess.run(
                ["prlimit", "--pid", str(pid), f"--nofile={soft}:{hard}"],
                check=True,
                capture_output=True,
            )

    def until_starved(
        self, d: realrpc.TlsDaemon, method: str, body: dict[str, Any]
    ) -> realrpc.Reply:
        """
        L{starved_call} until it answers 503 (at most 5 tries). Another try is a
        200 (something else took the last descriptor after the call's state write
        got one), or a connection refused at accept (something else took it
        before): the guard then refuses the connection on its reserved descriptor.
        """
        replies = []
        for _ in range(5):
            reply = self.starved_call(d, method, body)
            replies.append(reply)
            if reply.status == 503:
                return reply
            self.assertIn(reply.status, (200, None), reply)
        self.fail(f"{method} never ran out of descriptors: {replies}")

    def test_out_of_descriptors_is_503(self) -> None:
        """
        ChangeVmTags, ChangeAddressPool and CreateVm with no descriptor left for the
        state write answer 503 with a sentence about file descriptors (never 500),
        and change nothing: GetVmInfo, info.json, the address pool and the VM
        directories are as before. With the limit back, the same calls work.
        """
        d = self.daemon()
        d.setup_network("10.82.2", 2, 0x93)
        created = d.call("CreateVm", empty_vm())
        self.assertEqual(created.status, 200, created)
        ip = created.last["IpAddress"]
        self.assertEqual(d.call("AcknowledgeVm", {"IpAddress": ip}).status, 200)
        tagged = d.call("ChangeVmTags", {"IpAddress": ip, "Tags": {"k": "before"}})
        self.assertEqual(tagged.status, 200, tagged)
        info_path = os.path.join(d.state_dir, "VMs", ip, "info.json")

        def view() -> tuple[Any, ...]:
            with open(info_path, "rb") as f:
                info = f.read()
            return (
                d.call("GetVmInfo", {"IpAddress": ip}).last.get("VmInfo"),
                info,
                d.read_state("address-pool.json"),
                d.vm_dirs(),
                d.volume_entries(),
            )

        calls = [
            ("ChangeVmTags", {"IpAddress": ip, "Tags": {"k": "after"}}),
            (
                "ChangeAddressPool",
                {
                    "AddressesToAdd": [
                        {"IpAddress": "10.82.2.99", "MacAddress": "52:54:0a:93:00:99"}
                    ]
                },
            ),
            ("CreateVm", empty_vm()),
        ]
        for method, body in calls:
            before = view()
            reply = self.until_starved(d, method, body)
            self.assertIn("out of file descriptors", reply.error, reply)
            self.assertIn("did not complete", reply.error, reply)
            self.assertEqual(view(), before, method)
        for method, body in calls:
            reply = d.call(method, body)
            self.assertEqual(reply.status, 200, reply)
        self.assertEqual(d.healthz(), 200)
        self.assert_no_traceback(d)


def nested(depth: int, kind: str) -> bytes:
    """
    JSON nested C{depth} deep: arrays, objects, or arrays inside a request field.
    """
    if kind == "array":
        return b"[" * depth + b"]" * depth
    if kind == "object":
        return b'{"a":' * depth + b"1" + b"}" * depth
    return b'{"IpAddress":' + b"[" * depth + b"]" * depth + b"}"


class MalformedInputTests(SecurityTestCase):
    """
    Finding 6: malformed JSON is a 400 with a sentence, never a 500.
    """

    def post(
        self, d: realrpc.TlsDaemon, method: str, data: bytes, how: Optional[str]
    ) -> tuple[Optional[int], bytes]:
        """
        POST C{data} to C{method}: C{how} is a user (TLS with a certificate),
        C{"tls"} (TLS without one) or C{None} (plain HTTP).
        """
        head = realrpc.request_head(method, len(data), ["Connection: close"])
        if how is None:
            sock: socket.socket = d.plain_socket()
        else:
            sock = d.tls_socket(None if how == "tls" else how)
        with sock:
            try:
                sock.sendall(head + data)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass  # refused from the headers and closed: the answer is there
            return realrpc.exchange(sock, 30)[:2]

    def test_deep_json_to_every_method(self) -> None:
        """
        JSON nested 1,000 and 100,000 deep (arrays, objects, inside a field) to
        every method: 400 with a sentence about the nesting for the admin (413 for a
        body over the method's own limit: not read at all); without
        a certificate (plain HTTP and TLS, C{-allowUnauthenticatedReads}) 400 for
        the unauthenticated reads and 401 for the rest. Never 500; no traceback.
        """
        d = self.daemon("-allowUnauthenticatedReads")
        seen: dict[tuple[Optional[int], str], int] = {}
        for method in sorted(METHODS):
            for depth in (1000, 100000):
                for kind in ("array", "object", "field"):
                    data = nested(depth, kind)
                    for how in ("admin", "tls", None):
                        status, body = self.post(d, method, data, how)
                        where = (method, depth, kind, how, body[:200])
                        anonymous = how != "admin"
                        if anonymous and method not in UNAUTHENTICATED_READS:
                            self.assertEqual(status, 401, where)
                        elif METHODS[method].kind == RAW:
                            # a console: pointed at its WebSocket before the body is read
                            self.assertEqual(status, 400, where)
                            self.assertIn(b"WebSocket", body, where)
                        elif len(data) > METHODS[method].max_request:
                            # over the method's own limit: refused before it is read
                            self.assertEqual(status, 413, where)
                            self.assertIn(b"limit", body, where)
                        else:
                            self.assertEqual(status, 400, where)
                            self.assertIn(b"nested", body, where)
                        error = json.loads(body.split(b"\n")[0])["Error"]
                        self.assertGreater(len(error.split()), 3, where)
                        seen[(status, how or "plain")] = seen.get((status, how or "plain"), 0) + 1
        self.assertEqual(sum(seen.values()), len(METHODS) * 2 * 3 * 3)
        self.assertEqual(d.healthz(), 200)
        self.assert_no_traceback(d)

    def test_huge_duration(self) -> None:
        """
        DhcpTimeout (a Go Duration, int64 nanoseconds) of 10^309, -10^400, 1e309
        and -1e309 in StartVm, RebootVm and CreateVm: 400 with a sentence naming the
        field, never 500; the VM and the pool are unchanged.
        """
        d = self.daemon()
        d.setup_network("10.82.3", 2, 0x94)
        created = d.call("CreateVm", empty_vm())
        ip = created.last["IpAddress"]
        self.assertEqual(d.call("AcknowledgeVm", {"IpAddress": ip}).status, 200)
        before = d.snapshot()
        for number in (
            b"1" + b"0" * 309,
            b"-1" + b"0" * 400,
            b"1e309",
            b"-1e309",
            b"9223372036854775808",
        ):
            for method, prefix in (
                ("StartVm", b'{"IpAddress":"%s",' % ip.encode()),
                ("RebootVm", b'{"IpAddress":"%s",' % ip.encode()),
                ("CreateVm", json.dumps(empty_vm()).encode()[:-1] + b","),
            ):
                data = prefix + b'"DhcpTimeout":' + number + b"}"
                reply = d.call(method, data=data)
                self.assertEqual(reply.status, 400, (method, number[:20], reply))
                self.assertIn("DhcpTimeout", reply.error, reply)
        self.assertEqual(d.snapshot(), before)
        self.assert_no_traceback(d)


class FramingTests(SecurityTestCase):
    """
    Regressions found by C{bench/fuzz_http.py}.
    """

    def test_bad_length_over_tls_then_a_large_body(self) -> None:
        """
        A malformed C{Content-Length} (C{-0}, C{+5}, C{abc}, two different ones)
        followed by more headers and a 300 KB body, over TLS with the admin's
        certificate and over plain HTTP: 400, and no traceback. (Over TLS the
        channel used to keep parsing the records TLS had already received after it
        refused the request, and failed on the body with no transfer decoder.)
        """
        d = self.daemon()
        body = b'{"IpAddress": "' + b"a" * 300000 + b'"}'
        for length in (b"-0", b"+5", b"abc", b"2\r\nContent-Length: 3"):
            data = (
                b"POST /rpc/Hypervisor.GetVmCreateRequest HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: " + length + b"\r\nConnection: close\r\n\r\n" + body
            )
            for how in ("admin", None):
                sock = d.tls_socket(how) if how else d.plain_socket()
                with sock:
                    try:
                        sock.sendall(data)
                    except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                        pass
                    status, _, why = realrpc.exchange(sock, 10)
                self.assertEqual(status, 400, (length, how, why))
        self.assertEqual(d.healthz(), 200)
        self.assert_no_traceback(d)

    def test_rpc_listing_other_methods_405(self) -> None:
        """
        PUT, DELETE, PATCH and OPTIONS on C{/rpc} answer 405 with C{Allow: GET,
        HEAD} (they were redirected to C{/rpc/} with a 308).
        """
        d = self.daemon()
        for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
            connection = http.client.HTTPConnection("127.0.0.1", d.port, timeout=10)
            try:
                connection.request(method, "/rpc", body=b"")
                response = connection.getresponse()
                response.read()
            finally:
                connection.close()
            self.assertEqual(response.status, 405, method)
            self.assertEqual(response.getheader("Allow"), "GET, HEAD")
        self.assert_no_traceback(d)
