# -*- test-case-name: tests.test_rpc -*-
"""
The web root on port 6976: C{/rpc...} goes to the RPC routes, everything else to the
status pages. Each is its own Klein app; this resource only picks one by the first
path segment and leaves the path untouched, so each app sees absolute paths.
"""

from __future__ import annotations

from typing import Any

from twisted.web.resource import IResource, Resource


class PathDispatch(Resource):
    """
    Chooses a resource by the first path segment without consuming it.
    """

    def __init__(self, routes: dict[bytes, IResource], default: IResource) -> None:
        super().__init__()
        self.routes = routes
        self.default = default

    def getChildWithDefault(self, name: bytes, request: Any) -> IResource:
        """
        Put the segment back and hand the request to the chosen (leaf) resource.
        """
        request.postpath.insert(0, request.prepath.pop())
        return self.routes.get(name, self.default)


def make_root(pages: Any, rpc: Any) -> IResource:
    """
    The root resource: RPC under C{/rpc}, pages elsewhere.
    """
    return PathDispatch({b"rpc": rpc.resource()}, pages.resource())
