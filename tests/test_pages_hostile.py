"""
The status pages of a real daemon (C{python -m hypervisor run} against the real
libvirtd) under hostile values and requests, probed with raw sockets and curl:

 - VMs stored (before values were validated) with lone surrogates in a tag, the
   owners and the host name: every page answers within seconds (200, or a 500 that
   finishes), never holds the connection;
 - malformed queries and paths are a 400 (404 for unknown things) with a sentence, and
   the daemon logs no traceback for them;
 - TRACE, PUT, DELETE, OPTIONS are a 405 with C{Allow: GET, HEAD}; HEAD works;
 - every response, C{/metrics} included, carries the security headers;
 - a symbolic link placed in the log directory is neither listed nor followed, and a
   file name that is not UTF-8 does not break C{/logs}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from twisted.trial.unittest import SynchronousTestCase

from hypervisor import codec
from hypervisor.model import Address, LocalVmInfo, State, VmInfo, Volume
from tests import support
from tests.test_pages import raw_request
from web.status import SECURITY_HEADERS

HOSTILE_IP = "10.99.7.2"
RAW_IP = "10.99.7.3"
PAGES = (
    "/",
    "/listVMs",
    f"/showVM?{HOSTILE_IP}",
    f"/showVM?{RAW_IP}",
    "/showDhcpStatus",
    "/listVMs?output=json",
    "/listVMs?output=text",
    f"/showVM?{HOSTILE_IP}&output=json",
    f"/showVmBootLog?{HOSTILE_IP}",
    "/listSubnets",
    "/listAvailableAddresses",
    "/listRegisteredAddresses",
    "/listVolumeDirectories",
    "/showVolumeDirectories",
    "/logs",
    "/logs/dump",
    "/logs/showLast?1m",
    "/metrics",
    "/healthz",
    "/static/style.css",
)
MALFORMED = (
    f"/showVmBootLog?{HOSTILE_IP}&tail=%C2%B2",
    f"/showVmBootLog?{HOSTILE_IP}&tail=" + "9" * 5000,
    f"/showVmBootLog?{HOSTILE_IP}&tail=-1",
    "/showVmBootLog?not-an-ip",
    "/showVM?10.99.7",
    "/showVM?%ff",
    f"/showVM?{HOSTILE_IP}&output=xml",
    "/listVMs?output=csv",
    "/listVMs?state=flying",
    "/listVMs?x=%ff",
    "/logs/showLast?nan",
    "/logs/showLast?1e309",
    "/%ff",
    "/listVMs/%ff%fe",
    "/?surprise=1",
    "/metrics?x",
)


def stored_vm(ip: str, mac: str) -> dict:
    """
    The JSON of C{VMs/<ip>/info.json} for a stopped VM, as a dict to tamper with.
    """
    info = LocalVmInfo(
        VmInfo=VmInfo(
            Address=Address(ip, mac),
            MemoryInMiB=64,
            MilliCPUs=100,
            State=State.STOPPED,
            OwnerUsers=["alice"],
            Hostname="plain",
            Tags={"Name": "plain"},
            Volumes=[Volume(Size=1 << 20)],
        )
    )
    result: dict = json.loads(codec.encode(info))
    return result


def http(
    daemon: support.Daemon, path: str, method: str = "GET", extra: bytes = b"", timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    """
    One request on a raw socket that must be answered (and closed) within
    C{timeout} seconds.
    """
    data = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n".encode("latin-1")
        + extra
        + b"\r\n"
    )
    return raw_request(daemon.port, data, timeout=timeout)


class HostilePagesDaemonTests(SynchronousTestCase):
    """
    The real daemon's pages with hostile stored values and hostile requests.
    """

    def setUp(self) -> None:
        support.require_libvirtd()
        self.daemon = support.Daemon(self, "-domainType=qemu")
        vms = os.path.join(self.daemon.state_dir, "VMs")
        # A lone surrogate as JSON escapes (what an older version stored) ...
        hostile = stored_vm(HOSTILE_IP, "52:54:0a:63:07:02")
        hostile["Tags"] = {"Name": "evil\ud800tag", "\udfff": "x\udc80"}
        hostile["OwnerUsers"] = ["mallory\ud800"]
        hostile["OwnerGroups"] = ["group\udbff"]
        hostile["Hostname"] = "host\ud800"
        os.makedirs(os.path.join(vms, HOSTILE_IP))
        with open(os.path.join(vms, HOSTILE_IP, "info.json"), "w") as f:
            json.dump(hostile, f)  # ensure_ascii: "\ud800" escapes
        with open(os.path.join(vms, HOSTILE_IP, "bootlog"), "wb") as f:
            f.write(b"".join(b"boot line %d\r\n" % i for i in range(50)))
        # ... and as raw bytes ED A0 80 (a surrogate encoded as if it were UTF-8).
        raw = stored_vm(RAW_IP, "52:54:0a:63:07:03")
        raw["Tags"] = {"Name": "RAWNAME"}
        os.makedirs(os.path.join(vms, RAW_IP))
        with open(os.path.join(vms, RAW_IP, "info.json"), "wb") as f:
            f.write(json.dumps(raw).encode().replace(b"RAWNAME", b"raw\xed\xa0\x80"))
        # A volume directory whose name is not UTF-8: "\udcff" in the daemon.
        volumes = os.path.join(os.fsencode(self.daemon.dir), b"volumes-\xff")
        os.makedirs(volumes)
        self.daemon.flags.append("-volumeDirectories=" + os.fsdecode(volumes))
        # The log directory: a link to a secret outside it, a name that is not UTF-8.
        os.makedirs(self.daemon.log_dir)
        self.secret = os.path.join(self.daemon.dir, "secret")
        with open(self.secret, "w") as f:
            f.write("TOP-SECRET-COOKIE\n")
        os.symlink(self.secret, os.path.join(self.daemon.log_dir, "secret.log"))
        with open(os.path.join(os.fsencode(self.daemon.log_dir), b"old-\xff.log"), "wb") as f:
            f.write(b"an old log\n")
        self.daemon.start()
        self.log_start = len(self.daemon_log())

    def daemon_log(self) -> str:
        """
        What the daemon wrote: its stdout/stderr and its JSON log file.
        """
        text = self.daemon.output()
        path = os.path.join(self.daemon.log_dir, "hypervisor.log")
        if os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text += f.read()
        return text

    def assert_no_traceback(self) -> None:
        """
        The daemon logged no traceback since it started (given a moment to flush).
        """
        time.sleep(0.3)
        self.assertNotIn("Traceback", self.daemon_log()[self.log_start :])

    def test_hostile_values_never_hang(self) -> None:
        """
        With VMs whose stored tag, owners, groups and host name hold lone surrogates,
        and a volume directory whose name is not UTF-8 (a lone surrogate once
        decoded), every page answers within 5 s with 200 or 500 (a 500 is a finished
        page), and no connection is held. The volume directory is shown with U+FFFD;
        the hostile VMs are either shown with U+FFFD in place of each surrogate or
        refused at load with a sentence in the log (the loader's choice).
        """
        statuses = {}
        for path in PAGES:
            start = time.monotonic()
            code, headers, body = http(self.daemon, path)
            statuses[path] = code
            self.assertLess(time.monotonic() - start, 5.0, path)
            self.assertIn(code, (200, 404, 500, 503), path)
            self.assertEqual(int(headers["content-length"]), len(body), path)
            body.decode("utf-8")
        self.assertEqual([p for p, c in statuses.items() if c == 500], [])
        for path in ("/", "/listVolumeDirectories"):
            code, _, body = http(self.daemon, path)
            self.assertEqual(code, 200, path)
            self.assertIn("volumes-\ufffd", body.decode("utf-8"), path)
        _, _, listed = http(self.daemon, "/listVMs?output=text")
        if HOSTILE_IP.encode() in listed:
            _, _, body = http(self.daemon, f"/showVM?{HOSTILE_IP}")
            for words in ("evil\ufffdtag", "host\ufffd", "mallory\ufffd"):
                self.assertIn(words, body.decode("utf-8"))
            _, _, body = http(self.daemon, "/listVMs")
            self.assertIn("evil\ufffdtag", body.decode("utf-8"))
        else:
            self.assertEqual(statuses[f"/showVM?{HOSTILE_IP}"], 404)
            self.assertIn(
                f"cannot load VM from {self.daemon.state_dir}/VMs/{HOSTILE_IP}", self.daemon_log()
            )
        # The daemon still answers at once: no connection was left hanging.
        self.assertEqual(http(self.daemon, "/healthz", timeout=2)[0], 200)

    def test_malformed_input_is_400_without_traceback(self) -> None:
        """
        Malformed queries and paths of anonymous requests are a 400 with a sentence,
        an unknown VM a 404; the daemon logs no traceback for any of them.
        """
        for path in MALFORMED:
            code, headers, body = http(self.daemon, path)
            self.assertEqual(code, 400, path)
            self.assertNotIn(b"Traceback", body)
            self.assertIn(b'id="error"', body, path)
            self.assertEqual(headers["x-frame-options"], "DENY", path)
        self.assertEqual(http(self.daemon, "/showVM?10.99.7.99")[0], 404)
        self.assertEqual(http(self.daemon, "/logs/file?nothing.log")[0], 404)
        self.assertEqual(http(self.daemon, "/no/such/page")[0], 404)
        # Under /rpc the RPC transport may answer first (an unknown method: 404).
        self.assertIn(http(self.daemon, "/rpc/%ff", "POST")[0], (400, 404))
        self.assert_no_traceback()

    def test_methods_and_headers(self) -> None:
        """
        TRACE, PUT, DELETE and OPTIONS (curl -X) are a 405 with C{Allow: GET, HEAD};
        HEAD (curl -I) answers without a body; /metrics and error pages carry the
        security headers.
        """
        support.require(shutil.which("curl") is not None, "curl is not installed")

        def curl(*args: str) -> tuple[int, dict[str, str], str]:
            result = subprocess.run(
                ["curl", "-s", "-m", "5", "-D", "-", "-o", os.devnull, *args],
                capture_output=True,
                text=True,
                timeout=30,
            )
            lines = result.stdout.strip().splitlines()
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            return int(lines[0].split()[1]), headers, result.stdout

        for method in ("TRACE", "PUT", "DELETE", "OPTIONS"):
            for path in ("/", "/listVMs", "/metrics", "/static/style.css"):
                code, headers, _ = curl("-X", method, self.daemon.url + path)
                self.assertEqual(code, 405, (method, path))
                self.assertEqual(headers["allow"], "GET, HEAD")
        code, headers, _ = curl("-I", self.daemon.url + "/listVMs")
        self.assertEqual(code, 200)
        self.assertGreater(int(headers["content-length"]), 0)
        for path in ("/metrics", "/healthz", "/static/style.css", "/nope", "/%ff"):
            _, headers, _ = curl(self.daemon.url + path)
            for name, value in SECURITY_HEADERS.items():
                self.assertEqual(headers.get(name.decode().lower()), value.decode(), (path, name))
        self.assert_no_traceback()

    def test_request_bodies_refused(self) -> None:
        """
        A page takes no body: a small one is a 413 from the page, a large one is
        refused from its Content-Length before it is read.
        """
        code, _, body = raw_request(
            self.daemon.port,
            b"GET /listVMs HTTP/1.1\r\nHost: h\r\nConnection: close"
            b"\r\nContent-Length: 5\r\n\r\nhello",
        )
        self.assertEqual(code, 413)
        self.assertIn(b"takes no request body", body)
        code, _, _ = raw_request(
            self.daemon.port,
            b"GET /listVMs HTTP/1.1\r\nHost: h\r\nConnection: close"
            b"\r\nContent-Length: 1099511627776\r\n\r\nxxxx",
        )
        self.assertEqual(code, 413)

    def test_log_directory_symlink_not_followed(self) -> None:
        """
        A symbolic link in the log directory is not listed and /logs/file does not
        follow it; a file name that is not UTF-8 is listed and served.
        """
        code, _, body = http(self.daemon, "/logs")
        self.assertEqual(code, 200)
        self.assertNotIn(b"secret.log", body)
        self.assertIn(b"hypervisor.log", body)
        self.assertIn("old-\ufffd.log".encode(), body)
        for path in ("/logs/file?secret.log", "/logs/file?..%2Fsecret", "/logs/file?%2E%2E"):
            code, _, body = http(self.daemon, path)
            self.assertEqual(code, 404, path)
            self.assertNotIn(b"TOP-SECRET-COOKIE", body)
        code, _, body = http(self.daemon, "/logs/file?old-%FF.log")
        self.assertEqual((code, body), (200, b"an old log\n"))
        code, _, body = http(self.daemon, "/logs/file?hypervisor.log")
        self.assertEqual(code, 200)
        self.assert_no_traceback()
