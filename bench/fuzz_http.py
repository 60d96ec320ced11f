"""
Fuzz the HTTP adapter of port 6976 (status pages, C{/rpc}, the TLS sniffer, the
request reader that admits calls from their headers) on a real daemon, far longer
than the CI test does.

    sudo .venv/bin/python -m bench.fuzz_http [--inputs 20000] [--seed 1] [--concurrency 8]

As root, with libvirtd answering on C{qemu:///system} (tools/start-libvirtd.sh).
It starts C{python -m hypervisor ... run} with TLS (users C{admin}: every method;
C{alice}: none), C{-allowUnauthenticatedReads}, subnet C{hvtest} on 10.83.0.0/24
and no addresses, then sends generated and mutated raw HTTP requests over plain
sockets and TLS sockets (with the admin's or alice's certificate or none) — see
L{Generator}: request lines, methods, paths and queries; headers (duplicate,
negative, huge or non-numeric lengths, both framings, folded, NUL, non-ASCII);
chunked and content-length bodies (right, short, long, bad sizes, extensions,
trailers); JSON bodies built from every request type of the method table with one
or more hostile values, keys dropped, added, renamed or duplicated; uploads after
CreateVm's request line; random byte edits of all of these; TLS-looking junk.

Each input is checked: the reply is a well-formed HTTP response whose status is in
L{ALLOWED}, or the connection is closed (a complete request must not be left
unanswered); never a 500. The state directory (state files, VM directories,
volume names) may change only in a batch that had an authorised 200 (a VM a fuzzed
CreateVm made is acknowledged at once so its acknowledge timer changes nothing
later). At the end the daemon must answer C{/healthz} 200 and its log must hold no
traceback. Prints the inputs run, the statuses and other outcomes seen, by
transport and strategy, and every violation; exits 1 if there is any.

C{tests/test_http_fuzz.py} runs the same with a few hundred inputs.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import random
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from hypervisor import codec  # noqa: E402
from hypervisor.api import METHODS  # noqa: E402

ALLOWED = frozenset({200, 400, 401, 403, 404, 405, 409, 413, 503, 507})
TRANSPORTS = [("plain", 25), ("admin", 35), ("alice", 15), ("anonymous", 20), ("junk", 5)]
PREFIX = "10.83.0"
VM_IP = f"{PREFIX}.2"
CREATE_METHODS = {"CreateVm"}

PATHS = [
    "/",
    "/healthz",
    "/metrics",
    "/listVMs",
    f"/showVM?{VM_IP}",
    "/showVM",
    "/showDhcpStatus",
    "/logs",
    "/logs/showLast",
    "/logs/dump",
    "/logs/file?name=hypervisor.log",
    f"/showVmBootLog?{VM_IP}&tail=5",
    "/listSubnets",
    "/listAvailableAddresses",
    "/listRegisteredAddresses",
    "/listVolumeDirectories",
    "/showVolumeDirectories",
    "/rpc",
    "/rpc/",
    "/static/style.css",
    "/nonexistent",
    "/%ff",
    "/..%2f..%2fetc%2fpasswd",
    "//",
    "/listVMs?output=json",
    "/showVmBootLog?tail=%b2",
    "/?" + "a" * 5000,
    "/rpc/Hypervisor.GetCapacity",
    "/rpc/Hypervisor.NoSuch",
    "/rpc/%ff",
    "/_SRPC_/TLS/JSON",
    "*",
    "http://127.0.0.1/healthz",
]
HTTP_METHODS = [
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "CONNECT",
    "FOO",
    "get",
    "POST ",
    "P\x00ST",
    "POSTPOSTPOST" * 20,
    "",
]
VERSIONS = [
    "HTTP/1.1",
    "HTTP/1.0",
    "HTTP/0.9",
    "HTTP/2.0",
    "HTTP/1.1 ",
    "HTTP/1.",
    "http/1.1",
    "HTTP/1.1\x00",
    "",
    "HTTP/9.9",
    "HTTP/1.1 extra",
]
HOSTILE_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**309,
    -(10**400),
    1e308,
    -0.0,
    0.5,
    "",
    "x",
    "x" * 70000,
    "\ud800",
    "\udfff\ud800",
    "é",
    "\u202e",
    "\x00",
    "10.83.0.2",
    "255.255.255.255",
    "52:54:0a:53:00:02",
    "../../etc/passwd",
    "%00",
    "a" * 300,
    [],
    {},
    [[]],
    [None],
    {"a": 1},
    [1, "x", None],
    "1e309",
    "running",
    "stopped",
    "raw",
    "virtio",
    "0001-01-01T00:00:00Z",
    "9999-12-31T23:59:59Z",
    "Hypervisor.*",
]
SEEDS: dict[str, list[dict[str, Any]]] = {
    "CreateVm": [
        {
            "MemoryInMiB": 32,
            "MilliCPUs": 10,
            "SubnetId": "hvtest",
            "DoNotStart": True,
            "MinimumFreeBytes": 1048576,
        },
        {
            "MemoryInMiB": 16,
            "MilliCPUs": 10,
            "SubnetId": "hvtest",
            "DoNotStart": True,
            "ImageDataSize": 4096,
            "UserDataSize": 5,
            "RoundupPower": 0,
        },
    ],
    "UpdateSubnets": [
        {"Add": [{"Id": "fz", "IpGateway": "10.83.1.1", "IpMask": "255.255.255.0"}]},
        {"Delete": ["fz"]},
    ],
    "ChangeAddressPool": [
        {"AddressesToAdd": [{"IpAddress": VM_IP, "MacAddress": "52:54:0a:53:00:02"}]},
        {"AddressesToRemove": [{"IpAddress": VM_IP}]},
        {"MaximumFreeAddresses": {"hvtest": 0}},
    ],
    "SetDisabledState": [{"Disable": False}, {"Disable": True}],
    "ChangeOwners": [{"OwnerUsers": ["admin"], "OwnerGroups": []}],
    "ListVMs": [{"IgnoreStateMask": 0, "OwnerUsers": ["admin"], "Sort": True}],
    "GetVmInfos": [{"IgnoreStateMask": 0, "VmTagsToMatch": {"a": ["b"]}}],
    "ChangeVmTags": [{"IpAddress": VM_IP, "Tags": {"k": "v"}}],
    "ChangeVmSize": [{"IpAddress": VM_IP, "MemoryInMiB": 64, "MilliCPUs": 100}],
    "ChangeVmHostname": [{"IpAddress": VM_IP, "Hostname": "fuzz"}],
    "StartVm": [{"IpAddress": VM_IP, "DhcpTimeout": 1000000000}],
    "RebootVm": [{"IpAddress": VM_IP, "DhcpTimeout": 0}],
}


@dataclass
class Case:
    """
    One input: what is sent, how, and whether it is a complete request.

    @ivar complete: True when the bytes are one complete request (a reply or a
        close is due), False when more bytes are awaited, None when unknown
        (after random byte edits).
    """

    index: int
    strategy: str
    transport: str
    data: bytes
    http_method: str = "POST"
    rpc: str = ""
    complete: Optional[bool] = True

    def describe(self) -> str:
        """
        A short description for reports.
        """
        return (
            f"#{self.index} {self.strategy} over {self.transport} "
            f"({len(self.data)} bytes): {self.data[:160]!r}"
        )


@dataclass
class Outcome:
    """
    What came back: a status (None if none) and how the exchange ended ("" when a
    whole response was read).
    """

    case: Case
    status: Optional[int]
    how: str = ""
    body: bytes = b""

    @property
    def kind(self) -> str:
        """
        The status as text, or how it ended without one.
        """
        if self.status is not None:
            return str(self.status)
        return self.how.split(":")[0]


def request_type_seeds() -> dict[str, list[dict[str, Any]]]:
    """
    Per method: its request type's default encoding, a fully filled one, and the
    hand-made seeds of L{SEEDS}.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for name, spec in sorted(METHODS.items()):
        seeds: list[dict[str, Any]] = []
        try:
            seeds.append(json.loads(codec.encode(spec.request())))
        except Exception:  # noqa: BLE001 - a type without defaults: no default seed
            pass
        seeds.extend(SEEDS.get(name, []))
        if not seeds:
            seeds.append({})
        out[name] = seeds
    return out


class Generator:
    """
    Deterministic inputs from a seed; L{case}(i) is input number i.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.seeds = request_type_seeds()
        self.methods = sorted(self.seeds)
        self.strategies: list[tuple[str, Callable[[random.Random], tuple[Any, ...]], int]] = [
            ("rpc", self.rpc, 35),
            ("rpc-mutated-json", self.rpc_mutated, 20),
            ("upload", self.upload, 6),
            ("framing", self.framing, 10),
            ("headers", self.headers, 8),
            ("request-line", self.request_line, 6),
            ("pages", self.pages, 8),
            ("chunked", self.chunked, 7),
        ]

    # Pieces -----------------------------------------------------------------------------

    def transport(self, r: random.Random) -> str:
        """
        How to connect.
        """
        return r.choices([t for t, _ in TRANSPORTS], [w for _, w in TRANSPORTS])[0]

    def hostile(self, r: random.Random, depth: int = 0) -> Any:
        """
        A hostile JSON value.
        """
        value = r.choice(HOSTILE_VALUES)
        roll = r.random()
        if roll < 0.05:
            return [value] * r.randint(1, 2000)
        if roll < 0.08:
            nest: Any = value
            for _ in range(r.choice([10, 31, 32, 33, 64, 500])):
                nest = [nest]
            return nest
        if roll < 0.1 and depth < 2:
            return {r.choice(["IpAddress", "Tags", "a", ""]): self.hostile(r, depth + 1)}
        return value

    def mutate_value(self, r: random.Random, obj: Any, depth: int = 0) -> Any:
        """
        C{obj} with one random change somewhere inside (a value made hostile, a
        key dropped, added, renamed; the shape changed).
        """
        if isinstance(obj, dict) and obj and depth < 4 and r.random() < 0.8:
            key = r.choice(sorted(obj))
            copy = dict(obj)
            op = r.random()
            if op < 0.45:
                copy[key] = self.hostile(r)
            elif op < 0.6:
                del copy[key]
            elif op < 0.7:
                copy[r.choice(["Unknown", key.lower(), key.upper(), key + " ", ""])] = copy.pop(key)
            elif op < 0.8:
                copy[r.choice(["Extra", "Error", "__proto__", "x" * 200])] = self.hostile(r)
            else:
                copy[key] = self.mutate_value(r, copy[key], depth + 1)
            return copy
        if isinstance(obj, list) and obj and depth < 4:
            copy_list = list(obj)
            i = r.randrange(len(copy_list))
            copy_list[i] = self.mutate_value(r, copy_list[i], depth + 1)
            return copy_list
        return self.hostile(r)

    def encode_json(self, r: random.Random, obj: Any) -> bytes:
        """
        JSON text of C{obj}, sometimes with odd but legal spacing or escapes.
        """
        text = json.dumps(
            obj,
            ensure_ascii=r.random() < 0.5,
            indent=r.choice([None, None, 0, 4]),
            separators=r.choice([None, (",", ":"), (" ,", " : ")]),
        )
        data = text.encode("utf-8", "surrogatepass")
        if r.random() < 0.05 and data.startswith(b"{") and len(data) > 2:
            # a duplicated key: the first field again
            inner = data[1:-1]
            first = inner.split(b",")[0]
            data = b"{" + first + b"," + inner + b"}"
        return data

    def byte_edit(self, r: random.Random, data: bytes) -> bytes:
        """
        One random byte-level edit.
        """
        if not data:
            return bytes([r.randrange(256)])
        i = r.randrange(len(data))
        op = r.randrange(7)
        if op == 0:
            return data[:i] + bytes([r.randrange(256)]) + data[i + 1 :]
        if op == 1:
            return data[:i] + r.randbytes(r.randint(1, 16)) + data[i:]
        if op == 2:
            return data[:i] + data[i + r.randint(1, 32) :]
        if op == 3:
            j = min(len(data), i + r.randint(1, 64))
            return data[:j] + data[i:j] * r.randint(1, 4) + data[j:]
        if op == 4:
            return data[:i]
        if op == 5:
            return (
                data[:i]
                + r.choice([b"\r\n", b"\n", b"\r", b"\x00", b"\xff", b"\r\n\r\n", b" ", b":"])
                + data[i:]
            )
        return data[:i] + bytes([data[i] ^ (1 << r.randrange(8))]) + data[i + 1 :]

    def head(self, method: str, path: str, headers: list[str], version: str = "HTTP/1.1") -> bytes:
        """
        A request head.
        """
        lines = [
            f"{method} {path} {version}".rstrip(" ") if version else f"{method} {path}",
            "Host: 127.0.0.1",
            *headers,
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")

    def post(self, rpc: str, body: bytes, extra: Optional[list[str]] = None) -> bytes:
        """
        An RPC POST with a right Content-Length and C{Connection: close}.
        """
        return (
            self.head(
                "POST",
                f"/rpc/Hypervisor.{rpc}",
                [
                    f"Content-Length: {len(body)}",
                    "Content-Type: application/json",
                    "Connection: close",
                    *(extra or []),
                ],
            )
            + body
        )

    def body_for(self, r: random.Random, rpc: str, mutations: int) -> bytes:
        """
        A request body for C{rpc}: a seed, mutated C{mutations} times.
        """
        obj = r.choice(self.seeds[rpc])
        for _ in range(mutations):
            obj = self.mutate_value(r, obj)
        return self.encode_json(r, obj)

    # Strategies -----------------------------------------------------------------------

    def rpc(self, r: random.Random) -> tuple[Any, ...]:
        """
        A well-framed RPC with a seed body (mutated once half the time).
        """
        rpc = r.choice(self.methods)
        body = self.body_for(r, rpc, r.choice([0, 1]))
        return self.post(rpc, body), "POST", rpc, True

    def rpc_mutated(self, r: random.Random) -> tuple[Any, ...]:
        """
        A well-framed RPC whose body had several mutations and maybe a byte edit.
        """
        rpc = r.choice(self.methods)
        body = self.body_for(r, rpc, r.randint(1, 4))
        if r.random() < 0.4:
            body = self.byte_edit(r, body)
        if r.random() < 0.1:
            body = r.choice(
                [
                    b"",
                    b"null",
                    b"[]",
                    b"1",
                    b'"x"',
                    b"{",
                    b"\xff\xfe",
                    b"{}" * 1000,
                    b" " * 1024 * 1100,
                ]
            )
        return self.post(rpc, body), "POST", rpc, True

    def upload(self, r: random.Random) -> tuple[Any, ...]:
        """
        CreateVm with a JSON line and uploaded bytes (sizes right or wrong).
        """
        size = r.choice([0, 1, 31, 32, 4096, 65536])
        user = r.choice([0, 0, 5])
        request = {
            "MemoryInMiB": 16,
            "MilliCPUs": 10,
            "SubnetId": "hvtest",
            "DoNotStart": True,
            "ImageDataSize": size,
            "UserDataSize": user,
        }
        if r.random() < 0.5:
            request = self.mutate_value(r, request)
        line = self.encode_json(r, request).replace(b"\n", b" ") + r.choice(
            [b"\n", b"\n", b"\r\n", b""]
        )
        sent = size + user + r.choice([0, 0, 0, -1, 1, -size])
        payload = (b"QFI\xfb" if r.random() < 0.2 else b"") + r.randbytes(max(sent, 0))
        body = line + payload[: max(sent, 0)]
        announced = len(body) + r.choice([0, 0, 0, 10])
        data = (
            self.head(
                "POST",
                "/rpc/Hypervisor.CreateVm",
                [f"Content-Length: {announced}", "Connection: close"],
            )
            + body
        )
        return data, "POST", "CreateVm", announced == len(body)

    def framing(self, r: random.Random) -> tuple[Any, ...]:
        """
        An RPC with broken framing: Content-Length short, long, huge, negative,
        doubled or not a number; both framings; none with a body.
        """
        rpc = r.choice(self.methods)
        body = self.body_for(r, rpc, r.choice([0, 1]))
        n = len(body)
        choice = r.randrange(9)
        complete: Optional[bool] = True
        if choice == 0:
            headers = [f"Content-Length: {max(n - r.randint(1, 5), 0)}"]
        elif choice == 1:
            headers = [f"Content-Length: {n + r.randint(1, 100)}"]
            complete = False
        elif choice == 2:
            headers = [f"Content-Length: {r.choice([1 << 40, (1 << 40) + 1, 10 ** 30])}"]
            complete = None
        elif choice == 3:
            headers = [f"Content-Length: {r.choice(['-1', '-0', '+5', '0x10', 'abc', ''])}"]
        elif choice == 4:
            headers = [f"Content-Length: {n}", f"Content-Length: {n + 1}"]
            complete = None
        elif choice == 5:
            headers = [f"Content-Length: {n}", "Transfer-Encoding: chunked"]
            complete = None
        elif choice == 6:
            headers = []
        elif choice == 7:
            headers = [f"Content-Length: {n}", "Expect: 100-continue"]
        else:
            headers = [f"Content-Length: {n}", f"Content-Length: {n}"]
        data = self.head("POST", f"/rpc/Hypervisor.{rpc}", headers + ["Connection: close"])
        return data + body, "POST", rpc, complete

    def headers(self, r: random.Random) -> tuple[Any, ...]:
        """
        A valid-looking RPC or page request with odd headers.
        """
        rpc = r.choice(self.methods)
        body = self.body_for(r, rpc, 0)
        odd = r.choice(
            [
                ["X-Long: " + "a" * r.choice([100, 16000, 70000])],
                ["NoColon"],
                [": empty name"],
                ["X-Nul: a\x00b"],
                ["X-Utf8: é\u202e"],
                [" folded: continuation"],
                ["X-A: 1", "\tcontinued"],
                [f"X-{i}: {i}" for i in range(r.choice([50, 200, 600]))],
                ["Transfer-Encoding: gzip"],
                ["Transfer-Encoding: chunked, identity"],
                ["Connection: keep-alive, Upgrade", "Upgrade: h2c"],
                ["Content-Type: text/plain; charset=utf-7"],
                ["Host: "],
                ["Host: a", "Host: b"],
                ["Content-Length : 2"],
                ["Cookie: " + "c=1; " * 1000],
            ]
        )
        data = (
            self.head(
                "POST",
                f"/rpc/Hypervisor.{rpc}",
                [f"Content-Length: {len(body)}", "Connection: close", *odd],
            )
            + body
        )
        return data, "POST", rpc, None if any(":" not in h for h in odd) else True

    def request_line(self, r: random.Random) -> tuple[Any, ...]:
        """
        A request line with an odd method, target or version.
        """
        method = r.choice(HTTP_METHODS)
        path = r.choice(
            PATHS
            + [
                f"/rpc/Hypervisor.{r.choice(self.methods)}",
                "/rpc/Hypervisor." + "A" * 5000,
                "",
                " ",
                "/a b",
            ]
        )
        version = r.choice(VERSIONS)
        if r.random() < 0.3:
            line = f"{method} {path} {version}"
            line = r.choice(
                [line + "  ", "  " + line, line.replace(" ", "\t"), line + " extra", line.upper()]
            )
            data = (line + "\r\nHost: x\r\nConnection: close\r\n\r\n").encode(
                "utf-8", "surrogateescape"
            )
        else:
            data = self.head(method, path, ["Connection: close", "Content-Length: 0"], version)
        if r.random() < 0.3:
            data = self.byte_edit(r, data)
        return data, method.strip() or "GET", "", None

    def pages(self, r: random.Random) -> tuple[Any, ...]:
        """
        A page request (any method) with an odd query, sometimes with a body.
        """
        method = r.choice(["GET", "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE"])
        path = r.choice(PATHS)
        if r.random() < 0.4:
            path += r.choice(["?", "&"]) + r.choice(
                [
                    "tail=" + "9" * 5000,
                    "tail=-1",
                    "tail=%b2",
                    "ip=%ff",
                    "a=%",
                    "x" * 9000,
                    "output=text",
                    f"IP={VM_IP}&tail=1",
                    "%00=%00",
                ]
            )
        body = b"" if r.random() < 0.7 else r.randbytes(r.choice([1, 1000, 200000]))
        headers = ["Connection: close"]
        if body or method in ("POST", "PUT"):
            headers.append(f"Content-Length: {len(body)}")
        data = self.head(method, path, headers) + body
        if r.random() < 0.15:
            data = self.byte_edit(r, data)
            return data, method, "", None
        return data, method, "", True

    def chunked(self, r: random.Random) -> tuple[Any, ...]:
        """
        An RPC with a chunked body: right, with extensions and trailers, bad sizes,
        no last chunk.
        """
        rpc = r.choice(self.methods)
        body = self.body_for(r, rpc, r.choice([0, 0, 1]))
        parts = []
        i = 0
        while i < len(body):
            n = r.randint(1, max(1, len(body)))
            parts.append(body[i : i + n])
            i += n
        out = b""
        complete: Optional[bool] = True
        for part in parts:
            size = b"%x" % len(part)
            if r.random() < 0.1:
                size += b";ext=1"
            out += size + b"\r\n" + part + b"\r\n"
        last = r.randrange(6)
        if last == 0:
            complete = False  # no last chunk
        elif last == 1:
            out += b"0\r\nX-Trailer: 1\r\n\r\n"
        elif last == 2:
            out = b"zz\r\n" + out + b"0\r\n\r\n"
        elif last == 3:
            out = b"%x\r\n" % (1 << 40) + out
            complete = None
        else:
            out += b"0\r\n\r\n"
        data = (
            self.head(
                "POST",
                f"/rpc/Hypervisor.{rpc}",
                ["Transfer-Encoding: chunked", "Connection: close"],
            )
            + out
        )
        if r.random() < 0.1:
            data = self.byte_edit(r, data)
            complete = None
        return data, "POST", rpc, complete

    # Inputs ------------------------------------------------------------------------------

    def case(self, index: int) -> Case:
        """
        Input number C{index}.
        """
        r = random.Random(self.seed * 1_000_003 + index)
        transport = self.transport(r)
        if transport == "junk":
            junk = (
                b"\x16"
                + r.choice([b"\x03\x01", b"\x03\x03", b"\xff\xff", b""])
                + r.randbytes(r.choice([0, 3, 100, 5000]))
            )
            return Case(index, "tls-junk", transport, junk, "GET", "", None)
        names = [s for s, _, _ in self.strategies]
        weights = [w for _, _, w in self.strategies]
        strategy = r.choices(names, weights)[0]
        make = {s: f for s, f, _ in self.strategies}[strategy]
        data, method, rpc, complete = make(r)
        return Case(index, strategy, transport, data, method, rpc, complete)


# Running ---------------------------------------------------------------------------------


def connect(daemon: Any, transport: str, timeout: float) -> socket.socket:
    """
    A connection of the kind C{transport} names.
    """
    if transport in ("plain", "junk"):
        return daemon.plain_socket(timeout=timeout)
    return daemon.tls_socket(None if transport == "anonymous" else transport, timeout=timeout)


def send(daemon: Any, case: Case) -> Outcome:
    """
    Send one input and read what comes back.
    """
    wait = {True: 30.0, None: 1.5, False: 0.3}[case.complete]
    try:
        sock = connect(daemon, case.transport, 10.0)
    except (OSError, ssl.SSLError) as e:
        return Outcome(case, None, f"connect failed: {type(e).__name__}: {e}")
    with sock:
        try:
            sock.sendall(case.data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, socket.timeout):
            pass  # refused before the whole request was sent: read the answer
        except OSError:
            pass
        sock.settimeout(wait)
        if case.transport == "junk":
            return tls_junk_outcome(case, sock)
        response = http.client.HTTPResponse(
            sock, method="HEAD" if case.http_method == "HEAD" else "GET"
        )
        try:
            response.begin()
        except http.client.RemoteDisconnected:
            return Outcome(case, None, "closed")
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
            return Outcome(case, None, f"reset: {type(e).__name__}")
        except socket.timeout:
            return Outcome(case, None, "timeout")
        except (http.client.HTTPException, ValueError) as e:
            return Outcome(case, None, f"malformed: {type(e).__name__}: {e}")
        status = response.status
        if case.rpc in ("GetUpdates", "WatchDhcp") and status == 200:
            return Outcome(case, status, "", b"")  # a stream: never ends
        try:
            body = response.read()
        except socket.timeout:
            return Outcome(case, status, "body timeout")
        except http.client.IncompleteRead as e:
            return Outcome(case, status, "incomplete body", e.partial)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
            return Outcome(case, status, f"body reset: {type(e).__name__}")
        except (http.client.HTTPException, ValueError) as e:
            return Outcome(case, status, f"malformed body: {type(e).__name__}: {e}")
        return Outcome(case, status, "", body)


def tls_junk_outcome(case: Case, sock: socket.socket) -> Outcome:
    """
    After bytes that start like TLS on a plain socket the daemon's TLS layer
    answers, if at all, with TLS records (an alert, 0x15), then closes; or it waits
    for the rest of a record.
    """
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        return Outcome(case, None, "timeout" if not data else "tls alert, then timeout")
    except (ConnectionResetError, BrokenPipeError):
        return Outcome(case, None, "reset")
    if not data:
        return Outcome(case, None, "closed")
    if data[:1] in (b"\x15", b"\x16"):
        return Outcome(case, None, "tls alert")
    return Outcome(case, None, f"malformed: not a TLS record: {data[:40]!r}")


def violation(outcome: Outcome) -> str:
    """
    What is wrong with an outcome ("" if nothing).
    """
    case = outcome.case
    if outcome.how.startswith("malformed"):
        return f"not a well-formed HTTP response ({outcome.how})"
    if outcome.how.startswith("connect failed"):
        return f"could not connect ({outcome.how})"
    if outcome.status is not None and outcome.status not in ALLOWED:
        return f"status {outcome.status}: {outcome.body[:300]!r}"
    if outcome.how == "timeout" and case.complete:
        return "no answer to a complete request within 30 s"
    if outcome.status is not None and outcome.how == "body timeout" and case.complete:
        return f"status {outcome.status} but the body never ended"
    return ""


@dataclass
class Report:
    """
    Counts and violations of a run.
    """

    inputs: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    by_transport: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    by_strategy: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )
    violations: list[str] = field(default_factory=list)
    authorised_changes: int = 0
    late_changes: int = 0
    created: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, outcome: Outcome) -> None:
        """
        Count an outcome and keep its violation.
        """
        self.inputs += 1
        kind = outcome.kind
        self.outcomes[kind] += 1
        self.by_transport[outcome.case.transport][kind] += 1
        self.by_strategy[outcome.case.strategy][kind] += 1
        problem = violation(outcome)
        if problem:
            self.violations.append(f"{problem} — {outcome.case.describe()}")

    def table(self) -> str:
        """
        The report as text.
        """
        kinds = sorted(self.outcomes, key=lambda k: (not k.isdigit(), k))
        width = max([len(k) for k in kinds] + [6])
        lines = [
            f"HTTP adapter fuzz: {self.inputs} inputs in {self.seconds:.1f}s "
            f"({self.inputs / max(self.seconds, 1e-9):.0f}/s)",
            "",
        ]
        header = f"{'':18}" + "".join(f"{k:>{width + 1}}" for k in kinds)
        lines.append(header)
        for title, rows in (("transport", self.by_transport), ("strategy", self.by_strategy)):
            for name in sorted(rows):
                lines.append(f"{name:18}" + "".join(f"{rows[name][k]:>{width + 1}}" for k in kinds))
            lines.append("")
        lines.append(f"{'all':18}" + "".join(f"{self.outcomes[k]:>{width + 1}}" for k in kinds))
        lines.append("")
        lines.append(f"500 answers: {self.outcomes.get('500', 0)}")
        lines.append(
            f"batches with state changes: {self.authorised_changes} with an "
            f"authorised 200, {self.late_changes} after an authorised request "
            f"left unanswered; VMs created (and acknowledged): "
            f"{len(self.created)}"
        )
        lines.append(f"violations: {len(self.violations)}")
        lines.extend("  " + v for v in self.violations[:50])
        return "\n".join(lines)


def acknowledge_created(daemon: Any, outcome: Outcome, report: Report) -> None:
    """
    A fuzzed CreateVm made a VM: acknowledge it now, as its creator, so that its
    acknowledge timer does not change the state later.
    """
    for line in outcome.body.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        ip = message.get("IpAddress") if isinstance(message, dict) else None
        if ip and message.get("Final"):
            daemon.call("AcknowledgeVm", {"IpAddress": ip}, user=outcome.case.transport)
            report.created.append(ip)


class LogWatch:
    """
    New tracebacks in the daemon's output since the last look.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0

    def new_tracebacks(self) -> list[str]:
        """
        The tracebacks written since the last call (with a little context).
        """
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        self.offset += len(text.encode("utf-8", "replace"))
        out = []
        at = text.find("Traceback")
        while at >= 0:
            out.append(text[max(0, at - 200) : at + 3000])
            at = text.find("Traceback", at + 1)
        return out


UNANSWERED_WINDOW = 25.0
"""Seconds during which a state change may still follow an authorised request whose
answer the fuzzer did not wait for (a CreateVm finishes, then its unacknowledged VM
is destroyed 15 s later)."""


def run(
    daemon: Any,
    generator: Generator,
    inputs: int,
    concurrency: int = 4,
    start: int = 0,
    progress: Optional[Callable[[Report], None]] = None,
) -> Report:
    """
    Send inputs C{start} .. C{start + inputs - 1} in batches of C{concurrency}
    parallel connections; check each outcome, the state after each batch and the
    daemon's output for tracebacks (attributed to the batch that caused them).

    A state change is allowed in a batch with an authorised 200, or within
    L{UNANSWERED_WINDOW} seconds of an authorised request (admin or alice) whose
    answer the fuzzer gave up waiting for (it may have run all the same); any
    other change is a violation.
    """
    report = Report()
    began = time.monotonic()
    before = daemon.snapshot()
    watch = LogWatch(daemon.output_path)
    unanswered = float("-inf")
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        for first in range(start, start + inputs, concurrency):
            cases = [
                generator.case(i) for i in range(first, min(first + concurrency, start + inputs))
            ]
            outcomes = list(pool.map(lambda c: send(daemon, c), cases))
            authorised = False
            for outcome in outcomes:
                report.add(outcome)
                if outcome.case.transport not in ("admin", "alice"):
                    continue
                if outcome.status == 200:
                    authorised = True
                    if outcome.case.rpc in CREATE_METHODS:
                        acknowledge_created(daemon, outcome, report)
                if outcome.status is None or outcome.how:
                    unanswered = time.monotonic()
            for traceback in watch.new_tracebacks():
                report.violations.append(
                    f"traceback logged during inputs {cases[0].index}-{cases[-1].index}: "
                    f"{traceback}"
                )
            after = daemon.snapshot()
            if after != before:
                if authorised:
                    report.authorised_changes += 1
                elif time.monotonic() - unanswered < UNANSWERED_WINDOW:
                    report.late_changes += 1
                else:
                    changed = sorted(
                        k for k in set(before) | set(after) if before.get(k) != after.get(k)
                    )
                    report.violations.append(
                        f"state changed ({', '.join(changed)}) in a batch without an "
                        "authorised 200 — "
                        + "; ".join(f"{o.kind} {o.case.describe()}" for o in outcomes)
                    )
            before = after
            if progress is not None:
                progress(report)
    report.seconds = time.monotonic() - began
    return report


def start_daemon(holder: Any) -> Any:
    """
    The daemon under test: TLS, users admin and alice, unauthenticated reads
    allowed, subnet C{hvtest} on 10.83.0.0/24 without addresses.
    """
    from tests import realrpc, support

    support.ensure_bridge()
    holder.addCleanup(realrpc.destroy_domains, PREFIX)
    daemon = realrpc.TlsDaemon(
        holder, {"admin": "*.*", "alice": ""}, "-domainType=qemu", "-allowUnauthenticatedReads"
    )
    daemon.start(healthy=True)
    reply = daemon.call(
        "UpdateSubnets",
        {"Add": [{"Id": "hvtest", "IpGateway": f"{PREFIX}.1", "IpMask": "255.255.255.0"}]},
    )
    assert reply.status == 200, reply
    return daemon


def main(argv: Optional[list[str]] = None) -> int:
    """
    Run the fuzz against a fresh daemon and print the report.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--start", type=int, default=0, help="first input number (to replay a stretch of a run)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--keep", action="store_true", help="keep the daemon's directory")
    args = parser.parse_args(argv)
    from twisted.trial.unittest import SynchronousTestCase

    from tests import realrpc, support

    if os.geteuid() != 0 or not support.libvirtd_answers():
        print("fuzz_http: needs root and libvirtd on qemu:///system", file=sys.stderr)
        return 2
    daemon = start_daemon(SynchronousTestCase())
    try:
        last = [time.monotonic()]

        def progress(report: Report) -> None:
            if time.monotonic() - last[0] > 10:
                last[0] = time.monotonic()
                print(
                    f"... {report.inputs} inputs, {len(report.violations)} violations", flush=True
                )

        report = run(
            daemon,
            Generator(args.seed),
            args.inputs,
            args.concurrency,
            start=args.start,
            progress=progress,
        )
        healthy = daemon.healthz()
        traceback = realrpc.traceback_excerpt(daemon)
        alive = daemon.process is not None and daemon.process.poll() is None
        print(report.table())
        print(f"/healthz after the run: {healthy}; daemon alive: {alive}")
        print(f"tracebacks in the daemon's log: {'yes' if traceback else 'none'}")
        if traceback:
            print(traceback)
        bad = bool(report.violations) or healthy != 200 or bool(traceback) or not alive
        if args.keep:
            print(f"daemon directory: {daemon.dir}")
        return 1 if bad else 0
    finally:
        try:
            daemon.stop()
        except AssertionError as e:
            print(f"hypervisor stop failed: {e}", file=sys.stderr)
        realrpc.destroy_domains(PREFIX)
        if not args.keep:
            daemon.cleanup()


if __name__ == "__main__":
    sys.exit(main())
