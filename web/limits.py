# -*- test-case-name: tests.test_rpc -*-
"""
Request body limits, from the method table (L{hypervisor.api.METHODS}): an RPC's
JSON may be at most its method's C{max_request} bytes, the raw bytes after it at most
its C{max_upload}; the status pages take no body (L{MAX_PAGE_BODY}). Bodies are
never spooled to a temporary file (see L{web.rpc.HypervisorRequest}).
"""

from __future__ import annotations

import json

from hypervisor.api import MAX_JSON, METHODS

MAX_PAGE_BODY = 0
RPC_PREFIX = b"/rpc/"

__all__ = ["MAX_JSON", "MAX_PAGE_BODY", "limit_for", "error_body"]


def limit_for(path: bytes) -> int:
    """
    The largest body accepted for C{path} (an RPC's JSON plus its largest upload).
    """
    path = path.split(b"?", 1)[0]
    if path.startswith(RPC_PREFIX):
        name = path[len(RPC_PREFIX) :].decode("utf-8", "replace")
        spec = METHODS.get(name[len("Hypervisor.") :] if name.startswith("Hypervisor.") else "")
        if spec is not None:
            return spec.max_request + spec.max_upload
        return MAX_JSON
    return MAX_PAGE_BODY


def error_body(message: str) -> bytes:
    """
    The JSON body of an error answer.
    """
    return json.dumps({"Error": message}).encode() + b"\n"
