"""
A real twisted.web image server for tests: static image files (with Last-Modified
and 304 answers) and misbehaving resources (redirect loops, truncated bodies, bodies
without a length, a stalled body, HTTP errors), over HTTP or HTTPS with a real CA
and server certificate. Counts the requests it answers.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web import resource, server, static, util

from hypervisor import certs


class _Counting(resource.Resource):
    def __init__(self, counts: dict[str, int]) -> None:
        super().__init__()
        self.counts = counts

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        key = request.path.decode()
        self.counts[key] = self.counts.get(key, 0) + 1
        return super().getChildWithDefault(path, request)


class _Loop(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return util.redirectTo(b"/loop", request)


class _Chain(resource.Resource):
    """
    /chain/N redirects to /chain/N-1 ... /chain/0 redirects to /images/<file>.
    """

    isLeaf = True

    def __init__(self, target: bytes) -> None:
        super().__init__()
        self.target = target

    def render_GET(self, request: Any) -> bytes:
        n = int(request.postpath[0])
        if n == 0:
            return util.redirectTo(self.target, request)
        return util.redirectTo(b"/chain/%d" % (n - 1), request)


class _Truncated(resource.Resource):
    """
    Announces C{length} bytes, sends C{sent}, then drops the connection.
    """

    isLeaf = True

    def __init__(self, length: int, sent: bytes) -> None:
        super().__init__()
        self.length = length
        self.sent = sent

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"Content-Length", str(self.length).encode())
        request.write(self.sent)
        reactor.callLater(0.05, request.transport.abortConnection)
        return server.NOT_DONE_YET


class _Unsized(resource.Resource):
    """
    A body without Content-Length (chunked), written in parts.
    """

    isLeaf = True

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def render_GET(self, request: Any) -> Any:
        step = 256 * 1024
        for i in range(0, len(self.data), step):
            request.write(self.data[i : i + step])
        request.finish()
        return server.NOT_DONE_YET


class _Stalled(resource.Resource):
    """
    Sends headers and a few bytes, then nothing.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"Content-Length", b"10485760")
        request.write(b"\0" * 4096)
        self.requests.append(request)
        return server.NOT_DONE_YET


class _ToFile(resource.Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return util.redirectTo(b"file:///etc/passwd", request)


class _GzipBomb(resource.Resource):
    """
    16 MiB of zeros sent gzip-compressed (about 16 KiB on the wire).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        import gzip

        self.body = gzip.compress(b"\0" * (16 << 20))

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Encoding", b"gzip")
        return self.body


class _Status(resource.Resource):
    isLeaf = True

    def __init__(self, code: int, body: bytes, content_type: bytes = b"text/html") -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.content_type = content_type

    def render_GET(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", self.content_type)
        return self.body


class ImageServer:
    """
    Serves C{directory} under C{/images/} and the special resources; call
    L{stop} (or let the test's clean-up do it).
    """

    def __init__(self, testcase: Any, directory: str, tls_dir: str = "") -> None:
        self.directory = directory
        self.counts: dict[str, int] = {}
        root = _Counting(self.counts)
        root.putChild(b"images", static.File(directory))
        root.putChild(b"loop", _Loop())
        root.putChild(b"tofile", _ToFile())
        root.putChild(b"gzipbomb", _GzipBomb())
        root.putChild(b"chain", _Chain(b"/images/disk.raw"))
        root.putChild(b"truncated", _Truncated(1024 * 1024, b"\0" * 70000))
        root.putChild(b"unsized", _Unsized(b"\0" * (3 * 1024 * 1024)))
        self.stalled = _Stalled()
        root.putChild(b"stalled", self.stalled)
        root.putChild(b"missing", _Status(404, b"<html>not here</html>"))
        root.putChild(b"html", _Status(200, b"<html><body>login page</body></html>" * 20))
        site = server.Site(root)
        site.displayTracebacks = False
        self.ca_file = ""
        port: IListeningPort
        if tls_dir:
            from twisted.internet import ssl

            ca_key, ca_cert = certs.make_ca("image test CA")
            key, cert = certs.make_certificate(
                ca_key, ca_cert, "images", server_names=["127.0.0.1", "localhost"]
            )
            self.ca_file = os.path.join(tls_dir, "image-ca.pem")
            with open(self.ca_file, "wb") as f:
                f.write(certs.cert_pem(ca_cert))
            options = ssl.PrivateCertificate.loadPEM(
                certs.key_pem(key) + certs.cert_pem(cert)
            ).options()
            port = reactor.listenSSL(0, site, options, interface="127.0.0.1")  # type: ignore
            scheme = "https"
        else:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore
            scheme = "http"
        self.port = port
        self.base = f"{scheme}://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
        testcase.addCleanup(self.stop)

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self) -> Any:
        for request in self.stalled.requests:
            if request.transport is not None:
                request.transport.abortConnection()
        self.stalled.requests = []
        return self.port.stopListening()
