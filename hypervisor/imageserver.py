# -*- test-case-name: tests.test_image_server -*-
"""
C{hypervisor serve-images DIR}: a small image server for C{ImageName}.

SmallStack's image server speaks its own GOB protocol over SRPC; this hypervisor
fetches images by name over plain HTTPS instead, with this layout:

    GET https://<-imageServerHostname>:<-imageServerPortNum>/images/<name>

answers the image file C{DIR/<name>} (raw or qcow2; C{<name>} may contain C{/},
e.g. C{debian/bookworm/2024-06-01}), with C{Last-Modified} and C{304} for
C{If-Modified-Since}, so the daemon's image cache revalidates cheaply. Only C{GET}
and C{HEAD}; names with C{..}, empty or hidden components, and anything that
resolves outside C{DIR} (symlinks included) are 404. TLS with the server's
certificate (C{-certFile}/C{-keyFile}); a client certificate signed by C{-CAfile}
is required (the daemon presents its own). Files are served by twisted.web's
C{static.File} (read by the reactor in chunks as the client takes them).
"""

from __future__ import annotations

import os
import urllib.parse
from typing import Any, Optional

from twisted.internet import ssl
from twisted.web import resource, server, static
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

PREFIX = b"images"


def image_server_url(hostname: str, port: int, name: str) -> str:
    """
    The URL of image C{name} on the image server.

    @raise ValueError: a name that the server would refuse.
    """
    check_name(name)
    host = f"[{hostname}]" if ":" in hostname else hostname
    return f"https://{host}:{port}/images/{urllib.parse.quote(name, safe='/')}"


def check_name(name: str) -> None:
    """
    Refuse image names that are empty, too long, absolute, with C{.}/C{..} or hidden
    components, or with control characters.
    """
    if not name or len(name) > 1024:
        raise ValueError("an image name has 1 to 1024 characters")
    if any(ord(c) < 32 or c == "\x7f" or c == "\\" for c in name):
        raise ValueError(f"image name {name!r} has control characters or backslashes")
    parts = name.split("/")
    if any(not part or part.startswith(".") for part in parts):
        raise ValueError(f"image name {name!r}: empty, '.' or hidden path components")


class ImagesResource(resource.Resource):
    """
    C{/images/<name>} from C{directory}.
    """

    isLeaf = True

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = os.path.realpath(directory)

    def _path(self, request: Any) -> Optional[str]:
        try:
            name = "/".join(p.decode("utf-8") for p in request.postpath)
            check_name(name)
        except (UnicodeDecodeError, ValueError):
            return None
        path = os.path.realpath(os.path.join(self.directory, name))
        if os.path.commonpath([path, self.directory]) != self.directory:
            return None
        if not os.path.isfile(path):
            return None
        return path

    def render(self, request: Any) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, HEAD")
            return b""
        path = self._path(request)
        if path is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"no such image\n"
        leaf = static.File(path, defaultType="application/octet-stream")
        return leaf.render(request)


class _Root(resource.Resource):
    def __init__(self, directory: str) -> None:
        super().__init__()
        self.putChild(PREFIX, ImagesResource(directory))

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        return b"images are under /images/\n"


def make_site(directory: str) -> server.Site:
    """
    The image server's site.
    """
    site = server.Site(_Root(directory))
    site.displayTracebacks = False
    return site


def server_tls_options(cert_file: str, key_file: str, ca_file: str) -> ssl.CertificateOptions:
    """
    TLS with our certificate, requiring a client certificate signed by C{ca_file}.
    """
    from hypervisor.manager.fetch import read_pem_certificates

    with open(cert_file, "rb") as c, open(key_file, "rb") as k:
        mine = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
    cas = [ssl.Certificate.loadPEM(pem).original for pem in read_pem_certificates(ca_file)]
    return ssl.CertificateOptions(
        privateKey=mine.privateKey.original,
        certificate=mine.original,
        verify=True,
        caCerts=cas,
        requireCertificate=True,
    )


@implementer(IPolicyForHTTPS)
class ImageServerClientPolicy:
    """
    How the daemon connects to the image server: trusting C{-CAfile}, presenting
    its own certificate.
    """

    def __init__(self, cert_file: str, key_file: str, ca_file: str) -> None:
        from hypervisor.manager.fetch import read_pem_certificates

        with open(cert_file, "rb") as c, open(key_file, "rb") as k:
            self.client = ssl.PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
        self.trust = ssl.trustRootFromCertificates(
            [ssl.Certificate.loadPEM(pem) for pem in read_pem_certificates(ca_file)]
        )

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self.trust, clientCertificate=self.client
        )


def serve(directory: str, port: int, cert_file: str, key_file: str, ca_file: str) -> int:
    """
    Run the image server until interrupted (the C{serve-images} subcommand).
    """
    import sys

    from twisted.internet import reactor
    from twisted.python import log

    if not os.path.isdir(directory):
        print(f"hypervisor serve-images: {directory}: not a directory", file=sys.stderr)
        return 1
    try:
        options = server_tls_options(cert_file, key_file, ca_file)
    except (OSError, ValueError) as e:
        print(f"hypervisor serve-images: TLS: {e}", file=sys.stderr)
        return 1
    log.startLogging(sys.stderr, setStdout=False)
    listening = reactor.listenSSL(port, make_site(directory), options)  # type: ignore
    print(
        f"serving images from {directory} on https port {listening.getHost().port}",
        file=sys.stderr,
        flush=True,
    )
    reactor.run()
    return 0
