# -*- test-case-name: tests.test_metadata_server -*-
"""
HTTP for the metadata server: one C{twisted.web} resource serving the whole path
tree (L{hypervisor.metadata.paths}) for the VM the backend identifies, and the site
factory the service listens with inside each bridge's namespace.

A plain C{twisted.web} leaf resource rather than Klein: every request is one dict
lookup in the VM's kept tree, so the server runs near the C{static.Data} ceiling
(C{bench/metadata.py}).

Hostile input: access (which VM) is decided when the headers are in, before any body
is read; a request with a body larger than L{MAX_BODY} is refused with 413 and the
connection closed; only GET, HEAD and the IMDSv2 token PUT are served; header sizes
are bounded by C{HTTPChannel}; idle connections close after L{IDLE_TIMEOUT} seconds;
at most L{MAX_CONNECTIONS} connections per listening socket.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import Resource

from hypervisor.metadata.backend import TOKEN_TTL_MAX, TOKEN_TTL_MIN, MetadataBackend
from hypervisor.metadata.paths import TEXT, Context

MAX_BODY = 1024
IDLE_TIMEOUT = 5.0
MAX_CONNECTIONS = 512
TOKEN_PATH = b"/latest/api/token"
TOKEN_HEADER = b"x-aws-ec2-metadata-token"
TOKEN_TTL_HEADER = b"x-aws-ec2-metadata-token-ttl-seconds"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)


class MetadataMetrics:
    """
    Requests by path family and status, and latency.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "hypervisor_metadata_requests",
            "Metadata requests by path family and HTTP status",
            ["family", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "hypervisor_metadata_request_duration_seconds",
            "Metadata request latency (headers in to response written)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


def family(path: bytes) -> str:
    """
    The path family a request is counted under.
    """
    if path == TOKEN_PATH:
        return "imdsv2-token"
    first = path.lstrip(b"/").split(b"/", 1)[0]
    if first == b"openstack":
        return "openstack"
    if first == b"nocloud":
        return "nocloud"
    if first == b"datasource" or path.startswith(b"/latest/dynamic/"):
        return "smallstack"
    if path.startswith(b"/latest/is-externally-patchable"):
        return "smallstack"
    if first in (b"latest", b"2009-04-04") or path in (b"/", b""):
        return "ec2"
    return "other"


class MetadataRequest(server.Request):
    """
    A request whose access is decided when its headers are in, and whose body is
    bounded by L{MAX_BODY}.
    """

    _refused = False
    _body = 0

    def gotLength(self, length: Optional[int]) -> None:
        """
        Refuse a body larger than L{MAX_BODY} before reading it.
        """
        if length is not None and length > MAX_BODY:
            self._refuse(413, b"request body too large\n")
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """
        Count a chunked body too.
        """
        if self._refused:
            return
        self._body += len(data)
        if self._body > MAX_BODY:
            self._refuse(413, b"request body too large\n")
            return
        super().handleContentChunk(data)

    def _refuse(self, code: int, body: bytes) -> None:
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (code, http.RESPONSES.get(code, b"Error"), len(body), body)
            )
            transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Nothing more for a refused request.
        """
        if self._refused:
            return
        super().requestReceived(command, path, version)


class MetadataResource(Resource):
    """
    The whole tree, for the VMs behind one bridge (C{bridge}; None: no bridge check).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        backend: MetadataBackend,
        bridge: Optional[str] = None,
        metrics: Optional[MetadataMetrics] = None,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.bridge = bridge
        self.metrics = metrics

    def _finish(
        self, request: server.Request, code: int, body: bytes, content_type: bytes = TEXT
    ) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", content_type)
        request.setHeader(b"cache-control", b"no-store")
        if self.metrics is not None:
            self.metrics.requests.labels(family(request.path), str(code)).inc()
            started = getattr(request, "started", None)
            if started is not None:
                self.metrics.latency.observe(time.monotonic() - started)
        return body

    def render(self, request: server.Request) -> Any:
        """
        Identify the VM, then answer the path.
        """
        request.started = time.monotonic()  # type: ignore[attr-defined]
        client = request.getClientAddress()
        source = getattr(client, "host", "")
        info = self.backend.identify(source, self.bridge)
        if info is None:
            return self._finish(request, 404, b"not found\n")
        method = request.method
        path = request.path
        ip = info.Address.IpAddress
        self.backend.requested(ip, path.decode("latin-1"))
        if method == b"PUT":
            if path != TOKEN_PATH:
                request.setHeader(b"allow", b"GET, HEAD")
                return self._finish(request, 405, b"method not allowed\n")
            return self._token(request, ip)
        if method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return self._finish(request, 405, b"method not allowed\n")
        token = request.getHeader(TOKEN_HEADER)
        if token is not None and not self.backend.tokens.valid(token.decode("latin-1"), ip):
            return self._finish(request, 401, b"invalid or expired token\n")
        try:
            text = path.decode("ascii")
        except UnicodeDecodeError:
            return self._finish(request, 404, b"not found\n")
        view, tree = self.backend.tree(info)
        leaf, listing = tree.find(text)
        if listing is not None:
            return self._finish(request, 200, listing)
        if leaf is None:
            return self._finish(request, 404, b"not found\n")
        if not leaf.files:
            body = leaf.render(Context(view, {}, self.backend.clock.seconds()))
            if body is None:
                return self._finish(request, 404, b"not found\n")
            return self._finish(request, 200, body, leaf.content_type)
        d = self.backend.read(info, leaf.files)
        gone = []
        request.notifyFinish().addErrback(lambda f: gone.append(True))

        def answer(files: dict[str, Optional[bytes]]) -> None:
            if gone:
                return
            body = leaf.render(Context(view, files, self.backend.clock.seconds()))
            if body is None:
                body = self._finish(request, 404, b"not found\n")
            else:
                body = self._finish(request, 200, body, leaf.content_type)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            self.log.warn(
                "metadata: cannot read {files} of VM {ip}: {why}",
                files=", ".join(leaf.files),
                ip=ip,
                why=failure.getErrorMessage(),
            )
            if not gone:
                body = self._finish(request, 500, b"cannot read the file\n")
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        d.addCallbacks(answer, failed)
        return server.NOT_DONE_YET

    def _token(self, request: server.Request, ip: str) -> bytes:
        if request.getHeader(b"x-forwarded-for") is not None:
            # As AWS: a token request relayed by a proxy in the guest is refused.
            return self._finish(request, 403, b"forwarded token requests are refused\n")
        ttl_text = request.getHeader(TOKEN_TTL_HEADER)
        try:
            ttl = int(ttl_text or "")
        except ValueError:
            ttl = -1
        if not TOKEN_TTL_MIN <= ttl <= TOKEN_TTL_MAX:
            return self._finish(
                request,
                400,
                b"X-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600\n",
            )
        token = self.backend.tokens.issue(ip, ttl)
        request.setHeader(TOKEN_TTL_HEADER, str(ttl).encode())
        return self._finish(request, 200, token.encode())


class MetadataSite(server.Site):
    """
    The metadata site: no access log line per request (metrics count them), no
    tracebacks, a short idle timeout.
    """

    requestFactory = MetadataRequest
    displayTracebacks = False
    noisy = False

    def log(self, request: Any) -> None:
        """
        No access log.
        """


class ConnectionCap(WrappingFactory):
    """
    At most C{limit} open connections; more are refused (closed at once).
    """

    noisy = False

    def __init__(self, wrapped: Any, limit: int = MAX_CONNECTIONS) -> None:
        super().__init__(wrapped)
        self.limit = limit

    def buildProtocol(self, addr: Optional[IAddress]) -> Optional[ProtocolWrapper]:  # type: ignore[override]
        """
        A protocol, unless at the limit.
        """
        if len(self.protocols) >= self.limit:
            return None
        return super().buildProtocol(addr)


def make_site(
    backend: MetadataBackend,
    bridge: Optional[str] = None,
    metrics: Optional[MetadataMetrics] = None,
    reactor: Any = None,
) -> ConnectionCap:
    """
    The factory a namespace's metadata socket serves with.
    """
    site = MetadataSite(
        MetadataResource(backend, bridge, metrics), timeout=IDLE_TIMEOUT, reactor=reactor
    )
    return ConnectionCap(site)
