# -*- test-case-name: tests.test_rpc -*-
"""
JSON RPC on port 6976: C{POST /rpc/Hypervisor.<Method>}, the request JSON in the
body (the reference's field names), the response JSON in the reply.

- C{GET /rpc} lists the methods with their access class.
- Statuses: 200 ok; 400 malformed request (naming the field); 401 no or unverifiable
  certificate; 403 denied; 404 unknown method or VM; 409 wrong state; 413 too large;
  503 disabled or libvirt down; 507 no capacity; 500 internal (logged with a
  traceback, never shown). The body is always JSON, C{{"Error": "..."}} on errors.
- Streams (C{CreateVm} progress, C{GetUpdates}): newline-delimited JSON, one message
  per line, flushed as they happen; an error after the stream started is a last line
  C{{"Error": "..."}}.
- Uploads (C{CreateVm} with C{ImageDataSize}/C{UserDataSize}): the request JSON on
  the first line, then exactly the announced number of raw bytes.

Only translation lives here: identity from L{hypervisor.tls}, the decision from
L{hypervisor.auth.authorize}, the work in L{hypervisor.api}.
"""

from __future__ import annotations

import json
from typing import IO, Any, Optional

from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.web.server import Request as IRequest

from hypervisor import codec
from hypervisor.api import (
    METHODS,
    PROGRESS,
    UNAUTHENTICATED_READS,
    UPDATES,
    HypervisorApi,
)
from hypervisor.auth import TrustStore, Unauthenticated, authorize
from hypervisor.errors import HypervisorError, InvalidRequest, NotFound
from hypervisor.metrics import Metrics
from hypervisor.model import CreateVmResponse
from hypervisor.tls import peer_identity
from web.limits import MAX_JSON

JSON_TYPE = b"application/json"
STREAM_TYPE = b"application/x-ndjson"
PREFIX = "Hypervisor."
ACCESS_DENIED_REASONS = {401: "unauthenticated", 403: "denied"}


class RequestTooLarge(HypervisorError):
    """
    The body is over the limit (HTTP 413).
    """

    status = 413


def _line(obj: Any) -> bytes:
    return codec.encode(obj) + b"\n"


class RpcEndpoints:
    """
    The RPC routes of one daemon.
    """

    app = Klein()
    log = Logger()

    def __init__(self, api: HypervisorApi, trust: TrustStore, metrics: Metrics,
                 reactor: Any, allow_unauthenticated_reads: bool = False) -> None:
        self.api = api
        self.trust = trust
        self.metrics = metrics
        self.reactor = reactor
        self.allow_unauthenticated_reads = allow_unauthenticated_reads

    def resource(self) -> Any:
        """
        The Twisted resource serving these routes.
        """
        return self.app.resource()

    @app.route("/rpc", methods=["GET"], branch=False)
    def list_methods(self, request: IRequest) -> bytes:
        """
        The methods and their access classes.
        """
        request.setHeader(b"Content-Type", JSON_TYPE)
        return json.dumps([
            {"Method": PREFIX + name, "Access": spec.access,
             "UnauthenticatedRead": name in UNAUTHENTICATED_READS,
             "Reply": spec.kind, "Upload": spec.upload}
            for name, spec in sorted(METHODS.items())
        ], indent=2).encode() + b"\n"

    @app.route("/rpc/<string:name>", methods=["POST"], branch=False)
    async def call(self, request: IRequest, name: str) -> bytes:
        """
        Run one method.
        """
        start = self.reactor.seconds()
        method = name[len(PREFIX):] if name.startswith(PREFIX) else ""
        label = method if method in METHODS else "unknown"
        request.setHeader(b"Content-Type", JSON_TYPE)
        streaming = [False]
        try:
            spec = METHODS.get(method)
            if spec is None:
                raise NotFound(f"unknown method {name!r}; GET /rpc lists them")
            is_tls, identity = peer_identity(request.transport, self.trust)
            if not is_tls and method not in UNAUTHENTICATED_READS:
                raise Unauthenticated(
                    f"{name} needs HTTPS with a client certificate")
            manager = self.api.manager
            identity = authorize(
                identity, method, {m: s.access for m, s in METHODS.items()},
                UNAUTHENTICATED_READS,
                allow_unauthenticated_reads=self.allow_unauthenticated_reads,
                owner_users=manager.owner_users, owner_groups=manager.owner_groups)
            body = request.content
            assert body is not None
            parsed, tail = self._parse(body, spec.request, spec.upload)
            if spec.kind == PROGRESS:
                result = await self._progress(request, method, identity, parsed, tail,
                                              streaming)
            elif spec.kind == UPDATES:
                await self._updates(request, identity, parsed, streaming)
                result = b""
            else:
                response = await maybeDeferred(getattr(self.api, method), identity, parsed)
                result = _line(response)
            self.metrics.rpc_calls.labels(label, "ok").inc()
            return result
        except BaseException as e:  # noqa: BLE001 - every failure gets an answer
            return self._error(request, name, label, e, streaming[0])
        finally:
            self.metrics.rpc_duration.labels(label).observe(self.reactor.seconds() - start)

    def _error(self, request: IRequest, name: str, label: str, e: BaseException,
               streaming: bool) -> bytes:
        if isinstance(e, codec.DecodeError):
            e = InvalidRequest(f"malformed request: {e}")
        if isinstance(e, HypervisorError):
            status, message = e.status, str(e)
            if status in (401, 403):
                self.metrics.rpc_denied.labels(
                    label, ACCESS_DENIED_REASONS.get(status, "denied")).inc()
                self.log.info("{name} refused: {message}", name=name, message=message)
        else:
            status, message = 500, "internal error; the hypervisor's log has the details"
            self.log.failure("{name} failed", failure=None, name=name)
        self.metrics.rpc_calls.labels(label, "error").inc()
        if streaming:
            return _line({"Error": message})
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", JSON_TYPE)
        return _line({"Error": message})

    def _parse(self, body: IO[bytes], request_type: type,
               upload: bool) -> tuple[Any, Optional[tuple[IO[bytes], int, int]]]:
        """
        Decode the request; for uploads, check the raw tail's length.

        @return: the request and, for uploads, (file, offset, length) of the tail.
        """
        body.seek(0, 2)
        total = body.tell()
        body.seek(0)
        if not upload:
            if total > MAX_JSON:
                raise RequestTooLarge(f"request body of {total} bytes is over the "
                                      f"{MAX_JSON}-byte limit")
            data = body.read()
            return codec.decode(request_type, data or b"{}"), None
        first = body.readline(MAX_JSON + 1)
        if len(first) > MAX_JSON:
            raise RequestTooLarge(f"request JSON is over the {MAX_JSON}-byte limit "
                                  "(the JSON must be on the first line)")
        parsed: Any = codec.decode(request_type, first.strip() or b"{}")
        expected = getattr(parsed, "ImageDataSize", 0) + getattr(parsed, "UserDataSize", 0)
        tail = total - len(first)
        if tail != expected:
            raise InvalidRequest(
                f"the body has {tail} bytes after the request line, but ImageDataSize + "
                f"UserDataSize announce {expected}")
        return parsed, (body, len(first), tail)

    async def _progress(self, request: IRequest, method: str, identity: Any,
                        parsed: Any, tail: Optional[tuple[IO[bytes], int, int]],
                        streaming: list[bool]) -> bytes:
        finished = [False]
        request.notifyFinish().addBoth(lambda _: finished.__setitem__(0, True))

        def send(message: CreateVmResponse) -> None:
            if finished[0]:
                return
            if not streaming[0]:
                streaming[0] = True
                request.setHeader(b"Content-Type", STREAM_TYPE)
            request.write(_line(message))

        response = await self.api.CreateVm(identity, parsed, send, upload=tail)
        if not streaming[0]:
            request.setHeader(b"Content-Type", STREAM_TYPE)
        return _line(response)

    async def _updates(self, request: IRequest, identity: Any, parsed: Any,
                       streaming: list[bool]) -> None:
        stream = self.api.GetUpdates(identity, parsed)
        done: Deferred[None] = request.notifyFinish()
        done.addBoth(lambda _: stream.close())
        request.setHeader(b"Content-Type", STREAM_TYPE)
        streaming[0] = True
        while True:
            update = await stream.get()
            if update is None or stream.closed:
                break
            request.write(_line(update))
