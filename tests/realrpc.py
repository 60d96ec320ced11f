"""
Helpers for tests (and benchmarks) that drive the real daemon's JSON RPC from the
outside with Python's own C{ssl} and C{socket} modules: a TLS daemon whose
environment can be set and that can be killed and restarted on the same state,
calls over HTTPS with a client certificate, raw requests over plain and TLS sockets,
and outside views of the state and volume directories.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from tests import support

MiB = 1024 * 1024
STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


@dataclass
class Reply:
    """
    One RPC's outcome: the status and the JSON lines (several for streams), or
    C{status=None} when the connection broke.
    """

    status: Optional[int]
    messages: list[dict[str, Any]] = field(default_factory=list)
    raw: bytes = b""
    broken: str = ""

    @property
    def last(self) -> dict[str, Any]:
        """
        The last JSON message (a stream's final one), or {}.
        """
        return self.messages[-1] if self.messages else {}

    @property
    def error(self) -> str:
        """
        The C{Error} of the last message ("" if none).
        """
        return str(self.last.get("Error", ""))


def parse_lines(data: bytes) -> list[dict[str, Any]]:
    """
    Newline-delimited JSON into a list (a line that is not JSON becomes an error).
    """
    out = []
    for line in data.splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"Error": f"not JSON: {line[:200]!r}"})
    return out


class TlsDaemon(support.Daemon):
    """
    The real daemon with TLS (a CA, the daemon's certificate and one certificate per
    user, made with C{hypervisor make-certs}), a private volume directory and extra
    environment variables (C{TMPDIR}...); it can be killed and started again on the
    same directories (its output is appended, not truncated).

    @ivar pki: the certificate directory; user C{u}'s files are C{pki/u/u.cert|key}.
    @ivar volumes: the volume directory.
    """

    def __init__(
        self,
        testcase: Any,
        users: dict[str, str],
        *flags: str,
        env: Optional[dict[str, str]] = None,
        prefix: Optional[list[str]] = None,
    ) -> None:
        super().__init__(testcase, *flags)
        os.chmod(self.dir, 0o755)
        self.pki = os.path.join(self.dir, "pki")
        self.volumes = os.path.join(self.dir, "volumes")
        self.env = dict(env or {})
        self.prefix = list(prefix or [])
        self.flags += [
            f"-CAfile={self.pki}/CA.pem",
            f"-identityCAfile={self.pki}/none.pem",
            f"-certFile={self.pki}/server.pem",
            f"-keyFile={self.pki}/server.key",
            f"-volumeDirectories={self.volumes}",
        ]
        for user, methods in users.items():
            result = self.command(
                "make-certs", "--user", user, "--methods", methods, "--out", f"{self.pki}/{user}"
            )
            assert result.returncode == 0, result.stderr
        self._contexts: dict[str, ssl.SSLContext] = {}

    def environment(self) -> dict[str, str]:
        """
        The daemon's environment.
        """
        return dict(
            os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=self.dir, **self.env
        )

    def start(self, healthy: bool = False) -> None:
        """
        Start the daemon (again) and wait until its pages answer; with C{healthy},
        until C{/healthz} is 200 (libvirt connected).
        """
        if getattr(self, "_output", None) is not None:
            self._output.close()
        self._output = open(self.output_path, "ab")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "hypervisor", *self.flags, "run"],
            cwd=support.REPO,
            env=self.environment(),
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )

        def up() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.output()}")
            status = support.http_get(self.url + "/healthz", timeout=2)[0]
            return status == 200 if healthy else status in (200, 503)

        try:
            support.wait_for(up, 60, "the daemon's pages")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- daemon output ---\n{self.output()}") from None

    def kill(self) -> None:
        """
        SIGKILL the daemon and reap it.
        """
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        """
        C{hypervisor stop}, and wait for the daemon to exit.
        """
        result = self.command("stop")
        assert result.returncode == 0, result.stdout + result.stderr
        self.wait(60)

    def healthz(self) -> int:
        """
        The status of C{/healthz} (0 when nothing answers).
        """
        try:
            return support.http_get(self.url + "/healthz", timeout=3)[0]
        except OSError:
            return 0

    def log_text(self) -> str:
        """
        Everything the daemon logged: its output and its JSON log file.
        """
        text = self.output()
        path = os.path.join(self.log_dir, "hypervisor.log")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text += f.read()
        return text

    # TLS --------------------------------------------------------------------------------

    def context(self, user: Optional[str]) -> ssl.SSLContext:
        """
        A client TLS context trusting the daemon, with C{user}'s certificate (none
        for C{None}).
        """
        key = user or ""
        if key not in self._contexts:
            context = ssl.create_default_context(cafile=f"{self.pki}/CA.pem")
            context.check_hostname = False
            if user:
                context.load_cert_chain(
                    f"{self.pki}/{user}/{user}.cert", f"{self.pki}/{user}/{user}.key"
                )
            self._contexts[key] = context
        return self._contexts[key]

    def call(
        self,
        method: str,
        body: Any = None,
        user: Optional[str] = "admin",
        data: Optional[bytes] = None,
        timeout: float = 120.0,
    ) -> Reply:
        """
        C{POST /rpc/Hypervisor.<method>} over HTTPS; never raises for network errors.
        """
        if data is None:
            data = json.dumps(body if body is not None else {}).encode()
        connection = http.client.HTTPSConnection(
            "127.0.0.1", self.port, timeout=timeout, context=self.context(user)
        )
        try:
            connection.request(
                "POST",
                f"/rpc/Hypervisor.{method}",
                body=data,
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            return Reply(None, broken=f"{type(e).__name__}: {e}")
        finally:
            connection.close()
        return Reply(response.status, parse_lines(raw), raw)

    def tls_socket(self, user: Optional[str], timeout: float = 30.0) -> ssl.SSLSocket:
        """
        A TLS connection to the port (handshake done), as C{user} or without a
        certificate.
        """
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return self.context(user).wrap_socket(raw)

    def plain_socket(self, timeout: float = 30.0) -> socket.socket:
        """
        A plain TCP connection to the port.
        """
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    # Set-up -----------------------------------------------------------------------------

    def setup_network(self, prefix: str, count: int, mac_byte: int) -> list[str]:
        """
        Subnet C{hvtest} (C{prefix}.0/24 on br@hvtest) and C{count} addresses
        C{prefix}.2, ... in the pool; returns them.
        """
        support.ensure_bridge()
        reply = self.call(
            "UpdateSubnets",
            {"Add": [{"Id": "hvtest", "IpGateway": f"{prefix}.1", "IpMask": "255.255.255.0"}]},
        )
        assert reply.status == 200 and not reply.error, reply
        ips = [f"{prefix}.{i}" for i in range(2, 2 + count)]
        reply = self.call(
            "ChangeAddressPool",
            {
                "AddressesToAdd": [
                    {"IpAddress": ip, "MacAddress": f"52:54:0a:{mac_byte:02x}:00:{i + 2:02x}"}
                    for i, ip in enumerate(ips)
                ]
            },
        )
        assert reply.status == 200 and not reply.error, reply
        return ips

    # The outside view ------------------------------------------------------------------

    def vm_dirs(self) -> list[str]:
        """
        The names under C{VMs/}.
        """
        path = os.path.join(self.state_dir, "VMs")
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def volume_entries(self) -> list[str]:
        """
        The names under the volume directory.
        """
        return sorted(os.listdir(self.volumes)) if os.path.isdir(self.volumes) else []

    def read_state(self, name: str) -> bytes:
        """
        A state file's bytes (b"" if missing).
        """
        try:
            with open(os.path.join(self.state_dir, name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return b""

    def free_addresses(self) -> list[str]:
        """
        The free addresses of C{address-pool.json}.
        """
        data = self.read_state("address-pool.json")
        if not data:
            return []
        pool = json.loads(data)
        free = pool.get("Free", []) if isinstance(pool, dict) else []
        return sorted(a["IpAddress"] for a in free or [])

    def snapshot(self) -> dict[str, Any]:
        """
        What a state change would alter: the state files, the VM directories with
        their files, the volume directory's names.
        """
        out: dict[str, Any] = {}
        for name in (
            "address-pool.json",
            "subnets.json",
            "disabled",
            "owners.json",
            "dynamic-leases.json",
        ):
            out[name] = hashlib.sha256(self.read_state(name)).hexdigest()
        for ip in self.vm_dirs():
            directory = os.path.join(self.state_dir, "VMs", ip)
            files = {}
            for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
                if name == "bootlog":
                    continue
                try:
                    with open(os.path.join(directory, name), "rb") as f:
                        files[name] = hashlib.sha256(f.read()).hexdigest()
                except OSError:
                    files[name] = "?"
            out["VMs/" + ip] = files
        out["volumes"] = self.volume_entries()
        return out


def tree_bytes(path: str) -> int:
    """
    Bytes allocated under C{path} (files' blocks), 0 if missing.
    """
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def read_reply(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """
    Read from C{sock} until it closes or C{timeout} passes; (bytes, how it ended:
    "closed", "reset" or "timeout").
    """
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, "timeout"
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return data, "timeout"
        except ssl.SSLError as e:
            return data, f"reset ({e.__class__.__name__})"
        except (ConnectionResetError, BrokenPipeError):
            return data, "reset"
        if not chunk:
            return data, "closed"
        data += chunk


def request_head(method: str, length: int, extra: Iterable[str] = ()) -> bytes:
    """
    The head of C{POST /rpc/Hypervisor.<method>} with a Content-Length.
    """
    lines = [
        f"POST /rpc/Hypervisor.{method} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Length: {length}",
        "Content-Type: application/json",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def http_status(data: bytes) -> Optional[int]:
    """
    The status of an HTTP response's first line, or None.
    """
    match = STATUS_LINE.match(data)
    return int(match.group(1)) if match else None


def response_body(data: bytes) -> bytes:
    """
    The body after the head of a raw response (chunked bodies are not decoded).
    """
    return data.partition(b"\r\n\r\n")[2]


def stream_call(
    daemon: TlsDaemon,
    method: str,
    line: bytes,
    chunks: Iterable[bytes],
    length: int,
    user: Optional[str] = "admin",
    timeout: float = 300.0,
) -> Reply:
    """
    C{POST /rpc/Hypervisor.<method>} over a TLS socket: the head (announcing
    C{length} bytes), the request line, then C{chunks} as they come from the
    iterable (which may pace them, or kill the daemon). If the daemon answers and
    closes before the body is all sent, sending stops. Reads the reply with
    C{http.client}; a broken connection is C{Reply(None)}.
    """
    sock = daemon.tls_socket(user, timeout=timeout)
    try:
        try:
            sock.sendall(request_head(method, length, ["Connection: close"]) + line)
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass  # answered and closed before the whole body was sent: read the answer
        response = http.client.HTTPResponse(sock)
        response.begin()
        raw = response.read()
    except (OSError, http.client.HTTPException) as e:
        return Reply(None, broken=f"{type(e).__name__}: {e}")
    finally:
        sock.close()
    return Reply(response.status, parse_lines(raw), raw)


def image_file(path: str) -> str:
    """
    The file holding a volume's image bytes: the cached image a qcow2 overlay root is
    on (uploads and downloads go into the image cache), else the volume itself.
    """
    from hypervisor.manager.images import qcow2_backing_file

    backing = qcow2_backing_file(path)
    return os.path.join(os.path.dirname(path), backing) if backing else path


def file_sha256(path: str, length: int) -> str:
    """
    The SHA-256 of the first C{length} bytes of a file (of the image a qcow2 overlay
    is on: L{image_file}).
    """
    digest = hashlib.sha256()
    with open(image_file(path), "rb") as f:
        left = length
        while left > 0:
            chunk = f.read(min(left, 4 * MiB))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def subnet_domains(prefix: str) -> list[tuple[str, bool]]:
    """
    (name, active) of the libvirt domains named C{vm-<prefix>.*} (a fresh
    connection; libvirtd may have been restarted).
    """
    import libvirt

    conn = libvirt.open(support.QEMU_URI)
    try:
        return [
            (d.name(), bool(d.isActive()))
            for d in conn.listAllDomains()
            if d.name().startswith(f"vm-{prefix}.")
        ]
    finally:
        conn.close()


def destroy_domains(prefix: str, within: str = "") -> None:
    """
    L{support.destroy_domains} of C{vm-<prefix>.*} (within a daemon's directory if
    given) as a test's cleanup: waits for libvirtd if it is being restarted.
    """
    import libvirt

    try:
        support.wait_for(support.libvirtd_answers, 60, "libvirtd")
    except AssertionError:
        return
    libvirt.registerErrorHandler(lambda ctx, err: None, None)  # errors are exceptions
    support.destroy_domains(prefix=prefix, within=within)


def traceback_excerpt(daemon: TlsDaemon) -> str:
    """
    The first traceback the daemon logged, with some context ("" if none).
    """
    text = daemon.log_text()
    at = text.find("Traceback")
    return "" if at < 0 else text[max(0, at - 300) : at + 1500]


def exchange(
    sock: socket.socket, timeout: float, method: str = "POST"
) -> tuple[Optional[int], bytes, str]:
    """
    Read one HTTP response from C{sock} (a request was sent): (status, body with
    any chunked coding removed, "") — or (None, b"", why) when the connection
    closed without a response, or the response is not well-formed HTTP (why
    starts with "malformed"), or nothing complete came within C{timeout}.
    """
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock, method=method)
    try:
        response.begin()
    except http.client.RemoteDisconnected:
        return None, b"", "closed"
    except (http.client.BadStatusLine, http.client.LineTooLong, http.client.HTTPException) as e:
        return None, b"", f"malformed: {type(e).__name__}: {e}"
    except socket.timeout:
        return None, b"", "timeout"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
        return None, b"", f"reset: {type(e).__name__}"
    try:
        body = response.read()
    except socket.timeout:
        return response.status, b"", "timeout reading the body"
    except http.client.IncompleteRead as e:
        return response.status, e.partial, "incomplete body"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
        return response.status, b"", f"reset reading the body: {type(e).__name__}"
    except http.client.HTTPException as e:
        return response.status, b"", f"malformed body: {type(e).__name__}: {e}"
    return response.status, body, ""
