# -*- test-case-name: tests.test_pages -*-
"""
The web root on port 6976: C{/rpc...} goes to the RPC routes, everything else to the
status pages. Each is its own Klein app; this resource only picks one by the first
path segment and leaves the path untouched, so each app sees absolute paths.

A path that is not UTF-8 once percent-decoded names nothing: under C{/rpc} it is
answered here (400, a JSON error, nothing logged), elsewhere the pages answer it
(a 400 page). Klein would log a traceback for each such request.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from web.headers import SECURITY_HEADERS


def is_utf8_path(request: Any) -> bool:
    """
    Whether the request's (percent-decoded) path segments are all UTF-8.
    """
    try:
        b"/".join((request.prepath or []) + (request.postpath or [])).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class NonUtf8Path(Resource):
    """
    The answer to a path that is not UTF-8 under C{/rpc}: 400 with a JSON error.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        """
        400, C{{"Error": "..."}}.
        """
        request.setResponseCode(400)
        request.setHeader(b"Content-Type", b"application/json")
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return (
            json.dumps(
                {
                    "Error": "the path is not UTF-8; percent-encode UTF-8 "
                    "text (POST /rpc/Hypervisor.<Method>)"
                }
            ).encode()
            + b"\n"
        )


class PathDispatch(Resource):
    """
    Chooses a resource by the first path segment without consuming it.
    """

    def __init__(self, routes: dict[bytes, IResource], default: IResource) -> None:
        super().__init__()
        self.routes = routes
        self.default = default
        self.non_utf8 = NonUtf8Path()

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        """
        Put the segment back and hand the request to the chosen (leaf) resource.
        """
        request.postpath.insert(0, request.prepath.pop())
        route = self.routes.get(name)
        if route is None:
            return self.default
        if not is_utf8_path(request):
            return self.non_utf8
        return route


class LazyPages(Resource):
    """
    The status pages, built on the first page request: their imports (Klein, Jinja2,
    the templates) cost about 0.15 s that the daemon's start need not wait for — RPC
    is served without them.

    @ivar build: makes the pages object (with a C{resource()} method).
    """

    def __init__(self, build: Callable[[], Any]) -> None:
        super().__init__()
        self.build = build
        self._resource: Optional[IResource] = None

    def target(self) -> IResource:
        """
        The pages' resource, built now if not yet.
        """
        if self._resource is None:
            self._resource = self.build().resource()
        return self._resource

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        """
        Hand the request to the pages (the path segment put back, as PathDispatch does).
        """
        request.postpath.insert(0, request.prepath.pop())
        return self.target()

    def render(self, request: Any) -> bytes:
        """
        A request for C{/} itself.
        """
        return self.target().render(request)


def make_root(pages: Any, rpc: Any, extra: Optional[dict[bytes, IResource]] = None) -> IResource:
    """
    The root resource: RPC under C{/rpc}, pages elsewhere. C{pages} is the pages
    object, or a function making it on the first page request (L{LazyPages}).
    C{extra} adds leaf routes by first path segment (SRPC's C{_goSRPC_}).
    """
    default = LazyPages(pages) if callable(pages) else pages.resource()
    return PathDispatch({b"rpc": rpc.resource(), **(extra or {})}, default)


class HypervisorSite(Site):
    """
    The site of port 6976. It writes no access-log line per request: at scale each one
    is a structured log event through every observer (the JSON log file included) on
    the reactor thread; C{/metrics} counts requests by method and outcome instead, and
    refusals and failures are logged where they are decided.
    """

    def log(self, request: Any) -> None:
        """
        No access log.
        """
