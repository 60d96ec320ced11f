# -*- test-case-name: tests.test_image_fetch -*-
"""
Image downloads: C{http://} and C{https://} C{ImageURL}s fetched with treq and
streamed to a file on the manager's disk threads, never whole in memory.

The response body goes through an L{hypervisor.upload.UploadStream} (the same path as
an image uploaded with the request): the connection is paused while more than the
stream's high-water mark waits for the disk, and each chunk is written and hashed
(SHA-256) on a disk thread. Bounds: a size limit (checked against C{Content-Length}
before any byte is read, and against the bytes as they arrive), a number of
redirects, and one deadline for the whole download. An optional checksum is given as
the URL's fragment, C{#sha256=<64 hex digits>} (a fragment is never sent to the
server). A download that fails for any reason removes its file.
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Optional

import treq
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    BrowserLikeRedirectAgent,
    HTTPConnectionPool,
    PartialDownloadError,
    ResponseDone,
)
from twisted.web.error import InfiniteRedirection, RedirectWithNoLocation, SchemeNotSupported
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from hypervisor.diskio import IBlockingRunner
from hypervisor.errors import InvalidRequest
from hypervisor.manager import images
from hypervisor.upload import READ_CHUNK, UploadAborted, UploadStream

GiB = 1024 * 1024 * 1024
MAX_REDIRECTS = 5
DEFAULT_TIMEOUT = 600.0
DEFAULT_MAX_SIZE = 64 * GiB
_CHECKSUM = re.compile(r"sha256=([0-9a-fA-F]{64})")


class DownloadFailed(InvalidRequest):
    """
    An image could not be downloaded (HTTP error, network error, limit, checksum).
    """


class NotModified(Exception):
    """
    The server answered 304: the copy we have is current.
    """


@dataclass
class Downloaded:
    """
    A finished download.

    @ivar size: bytes written.
    @ivar sha256: hex digest of the bytes.
    @ivar etag, last_modified: the response's validators (may be empty).
    """

    size: int
    sha256: str
    etag: str = ""
    last_modified: str = ""


def split_checksum(url: str, what: str = "ImageURL") -> tuple[str, str]:
    """
    Split C{#sha256=<hex>} off a URL.

    @return: (the URL without fragment, the lower-case hex digest or "").
    @raise InvalidRequest: a fragment that is not a checksum.
    """
    base, _, fragment = url.partition("#")
    if not fragment:
        return base, ""
    match = _CHECKSUM.fullmatch(fragment)
    if match is None:
        raise InvalidRequest(
            f"{what} {url!r}: the only fragment understood is #sha256=<64 hex digits>"
        )
    return base, match.group(1).lower()


def check_http_url(url: str, what: str = "ImageURL") -> None:
    """
    Refuse a URL that is not an absolute http(s) URL with a host.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InvalidRequest(f"{what} {url!r}: not an http:// or https:// URL with a host")
    if any(c in url for c in "\r\n\t ") or len(url) > 4096:
        raise InvalidRequest(f"{what}: malformed URL")


class _Body(Protocol):
    """
    Feeds a response body into an L{UploadStream}; the stream pauses the
    connection (through the response's transport) when the disk falls behind.
    """

    def __init__(self, stream: UploadStream, length_known: bool, limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.length_known = length_known
        self.error: Optional[BaseException] = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.stream.register_producer(self.transport)  # type: ignore[arg-type]

    def dataReceived(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except UploadAborted:
            self.error = DownloadFailed(f"more than the {self.limit}-byte limit")
            self.stream.fail(self.error)
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        if self.error is not None:
            return
        if reason.check(ResponseDone) and self.length_known:
            self.stream.finish()
        elif reason.check(ResponseDone, PotentialDataLoss) and not self.length_known:
            self.stream.end()
        else:
            self.stream.fail(
                DownloadFailed(
                    f"the download ended after {self.stream.received} bytes: "
                    f"{reason.getErrorMessage() or reason.type}"
                )
            )


def _open_new(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)


def _write_hash(fd: int, data: bytes, digest: Any) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    digest.update(data)


class Fetcher:
    """
    Downloads over HTTP(S) with treq.

    @ivar max_size: the most bytes one download may have.
    @ivar timeout: seconds one download may take, from the request to the fsync.
    """

    def __init__(
        self,
        reactor: Any,
        runner: IBlockingRunner,
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        max_redirects: int = MAX_REDIRECTS,
        tls_policy: Optional[Any] = None,
    ) -> None:
        self.reactor = reactor
        self.runner = runner
        self.max_size = max_size
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()

    def _client(self) -> treq.client.HTTPClient:
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        agent = Agent(self.reactor, contextFactory=self.tls_policy, pool=pool, connectTimeout=30)
        return treq.client.HTTPClient(
            BrowserLikeRedirectAgent(agent, redirectLimit=self.max_redirects)
        )

    @inlineCallbacks
    def fetch(
        self,
        url: str,
        path: str,
        *,
        sha256: str = "",
        timeout: float = 0.0,
        etag: str = "",
        last_modified: str = "",
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> Any:
        """
        Download C{url} into the new file C{path} (fsynced); fires with
        L{Downloaded}. Sends C{If-None-Match}/C{If-Modified-Since} when C{etag}/
        C{last_modified} are given and fails with L{NotModified} on 304 (no file is
        made). On any failure C{path} does not exist afterwards.

        @param timeout: seconds for this download (at most L{timeout}; 0: that).
        @param progress: called with (bytes so far, total or 0 if unknown).
        """
        check_http_url(url)
        limit = min(timeout, self.timeout) if timeout > 0 else self.timeout
        headers = Headers({b"User-Agent": [b"smallstack-hypervisor"]})
        if etag:
            headers.setRawHeaders(b"If-None-Match", [etag.encode("latin-1")])
        if last_modified:
            headers.setRawHeaders(b"If-Modified-Since", [last_modified.encode("latin-1")])
        state: dict[str, Any] = {"timed_out": False, "stream": None, "request": None}

        def expire() -> None:
            state["timed_out"] = True
            if state["stream"] is not None:
                state["stream"].fail(DownloadFailed(f"the download took longer than {limit:g} s"))
                if state.get("transport") is not None:
                    state["transport"].stopProducing()
            elif state["request"] is not None:
                state["request"].cancel()

        timer = self.reactor.callLater(limit, expire)
        created = False
        try:
            request = self._client().get(
                url, headers=headers, allow_redirects=False, unbuffered=True
            )
            state["request"] = request
            try:
                response = yield request
            except CancelledError:
                raise DownloadFailed(f"ImageURL {url}: no answer within {limit:g} s") from None
            except SchemeNotSupported as e:
                raise DownloadFailed(f"ImageURL {url}: redirected to an unsupported URL: {e}")
            except Exception as e:  # connection refused, DNS, TLS: reported, not raised as 500
                reasons = getattr(e, "reasons", None) or []
                if any(r.check(InfiniteRedirection, RedirectWithNoLocation) for r in reasons):
                    raise DownloadFailed(
                        f"ImageURL {url}: more than {self.max_redirects} redirects, or a "
                        "redirect without a Location"
                    ) from None
                raise DownloadFailed(f"ImageURL {url}: {_describe(e)}") from None
            if response.code == 304 and (etag or last_modified):
                response.original.deliverBody(Protocol())
                raise NotModified()
            if response.code != 200:
                response.original.deliverBody(Protocol())
                phrase = response.phrase.decode("latin-1", "replace")
                raise DownloadFailed(f"ImageURL {url}: HTTP {response.code} {phrase}")
            length = response.length if isinstance(response.length, int) else None
            if length is not None and length > self.max_size:
                response.original.deliverBody(Protocol())
                raise DownloadFailed(
                    f"ImageURL {url}: {length} bytes is over the {self.max_size}-byte limit"
                )
            stream = UploadStream(length if length is not None else self.max_size + 1)
            state["stream"] = stream
            body = _Body(stream, length is not None, self.max_size)
            response.original.deliverBody(body)
            state["transport"] = body.transport
            fd = yield self.runner.run(_open_new, path)
            created = True
            digest = hashlib.sha256()
            done = 0
            try:
                while True:
                    chunk = yield stream.read(READ_CHUNK)
                    if not chunk:
                        break
                    done += len(chunk)
                    if done > self.max_size:
                        raise DownloadFailed(f"more than the {self.max_size}-byte limit")
                    yield self.runner.run(_write_hash, fd, chunk, digest)
                    if progress is not None:
                        progress(done, length or 0)
                yield self.runner.run(os.fsync, fd)
            except (UploadAborted, DownloadFailed) as e:
                raise DownloadFailed(f"ImageURL {url}: {e}") from None
            finally:
                if done < (length or 0) or stream.consumed < stream.received:
                    stream.discard()
                    if body.transport is not None:
                        body.transport.stopProducing()  # type: ignore[attr-defined]
                yield self.runner.run(os.close, fd)
            if state["timed_out"]:
                raise DownloadFailed(f"the download took longer than {limit:g} s")
            hexdigest = yield self.runner.run(digest.hexdigest)
            if sha256 and hexdigest != sha256:
                raise DownloadFailed(
                    f"ImageURL {url}: checksum mismatch (sha256 {hexdigest}, expected {sha256})"
                )
            return Downloaded(
                size=done,
                sha256=hexdigest,
                etag=_header(response, b"ETag"),
                last_modified=_header(response, b"Last-Modified"),
            )
        except BaseException:
            if created:
                yield self.runner.run(images.remove_file, path)
            raise
        finally:
            if timer.active():
                timer.cancel()


def tls_policy_from_ca_file(path: str) -> BrowserLikePolicyForHTTPS:
    """
    An HTTPS policy trusting only the CA certificates in the PEM file C{path}
    (read at start, before the reactor runs).

    @raise ValueError: the file holds no certificate.
    """
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    return BrowserLikePolicyForHTTPS(
        trustRootFromCertificates([Certificate.loadPEM(b) for b in read_pem_certificates(path)])
    )


def read_pem_certificates(path: str) -> list[bytes]:
    """
    The PEM certificate blocks in file C{path}.

    @raise ValueError: there are none.
    """
    with open(path, "rb") as f:
        text = f.read()
    end = b"-----END CERTIFICATE-----"
    begin = b"-----BEGIN CERTIFICATE-----"
    blocks = [begin + block.split(begin, 1)[1] + end for block in text.split(end) if begin in block]
    if not blocks:
        raise ValueError(f"{path}: no PEM certificate")
    return blocks


def _header(response: Any, name: bytes) -> str:
    values = response.headers.getRawHeaders(name) or []
    value = values[0].decode("latin-1", "replace") if values else ""
    return value if len(value) <= 256 and "\n" not in value and "\r" not in value else ""


def _describe(e: BaseException) -> str:
    # ResponseNeverReceived and friends wrap the real reasons in a list of failures.
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(f.getErrorMessage() or f.type.__name__ for f in reasons)
    if isinstance(e, PartialDownloadError):
        return "the download ended early"
    return str(e) or type(e).__name__
