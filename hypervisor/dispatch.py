# -*- test-case-name: tests.test_dispatch -*-
"""
What every transport shares, so that a transport is only an adapter (HTTPS JSON in
L{web.rpc}; SRPC and Perspective Broker later):

1. L{Dispatcher.admit}: the access decision for C{Hypervisor.<method>}, from the
   method name, the caller's identity and whether the connection is secure — before
   any request body is read (SRPC answers the method line before the body arrives;
   HTTP refuses before it stores a byte of the body).
2. L{Dispatcher.decode}: the request JSON into the method's request type, with limits.
3. L{Dispatcher.upload_size}: for methods followed by raw bytes, how many, checked
   against the method's limit.
4. L{Dispatcher.invoke}: run it — a reply, a progress stream with a final reply, an
   update stream, or an upload — through L{hypervisor.api.HypervisorApi}.
5. L{Dispatcher.classify}: any failure to a status (HTTP's numbers; other transports
   map them) and a sentence for the caller; internal errors are logged with their
   traceback and never shown.

Metrics (calls by outcome, denials, latency) are counted here, once for all
transports.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hypervisor import codec
from hypervisor.api import (
    METHODS,
    PROGRESS,
    UNAUTHENTICATED_READS,
    UPDATES,
    HypervisorApi,
    MethodSpec,
)
from hypervisor.auth import Identity, Unauthenticated, authorize
from hypervisor.errors import HypervisorError, InvalidRequest, NotFound
from hypervisor.metrics import Metrics
from hypervisor.upload import UploadStream

PREFIX = "Hypervisor."
DENIED_REASONS = {401: "unauthenticated", 403: "denied"}
ACCESS = {name: spec.access for name, spec in METHODS.items()}


class RequestTooLarge(HypervisorError):
    """
    A request or upload is over its method's limit (HTTP 413).
    """

    status = 413


@dataclass
class Call:
    """
    An admitted call: the method, its spec and the identity it runs with.

    @ivar label: the method name for metrics ("unknown" if there is none).
    @ivar started: reactor time when it was admitted.
    """

    method: str
    spec: MethodSpec
    identity: Identity
    label: str
    started: float
    finished: bool = False
    transport: str = "https"


def method_name(name: str) -> str:
    """
    C{Hypervisor.StartVm} -> C{StartVm}; anything else -> "".
    """
    return name[len(PREFIX) :] if name.startswith(PREFIX) else ""


class Dispatcher:
    """
    The transport-neutral steps around every call; built once in C{makeService}.
    """

    log = Logger()

    def __init__(
        self,
        api: HypervisorApi,
        metrics: Metrics,
        reactor: Any,
        *,
        allow_unauthenticated_reads: bool = False,
    ) -> None:
        self.api = api
        self.metrics = metrics
        # The metric children of each (method, transport, outcome): prometheus_client's
        # labels() takes a lock and builds a key per call.
        self._counted: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self.reactor = reactor
        self.allow_unauthenticated_reads = allow_unauthenticated_reads

    # 1. admit -----------------------------------------------------------------------------

    def spec(self, name: str) -> tuple[str, MethodSpec]:
        """
        The method and its spec for a wire name (C{Hypervisor.X}).

        @raise NotFound: no such method.
        """
        method = method_name(name)
        spec = METHODS.get(method)
        if spec is None:
            raise NotFound(f"unknown method {name!r}; GET /rpc lists them")
        return method, spec

    def admit(
        self,
        name: str,
        identity: Identity,
        secure: bool,
        *,
        transport: str = "https",
        use_method_powers: bool = True,
    ) -> Call:
        """
        Decide whether C{identity} may call C{name} (nothing has been read yet).

        @param secure: the connection is TLS (the identity comes from its client
            certificate); plain connections may only make the unauthenticated reads,
            and only with C{-allowUnauthenticatedReads}.
        @param transport: the transport's name for metrics (C{https}, C{srpc}).
        @param use_method_powers: False when the caller asked not to use its method
            grants and hypervisor ownership (SRPC's C{doNotUseMethodPowers}).
        @raise HypervisorError: refused (401, 403, 404, 503...), counted in metrics.
        """
        start = self.reactor.seconds()
        label = "unknown"
        try:
            method, spec = self.spec(name)
            label = method
            if not secure and method not in UNAUTHENTICATED_READS:
                raise Unauthenticated(f"{name} needs HTTPS with a client certificate")
            users, groups = self.api.hypervisor_owners()
            if not use_method_powers:
                identity = replace(identity, method_patterns=(), hypervisor_owner=False)
                users, groups = frozenset(), frozenset()
            identity = authorize(
                identity,
                method,
                ACCESS,
                UNAUTHENTICATED_READS,
                allow_unauthenticated_reads=self.allow_unauthenticated_reads,
                owner_users=users,
                owner_groups=groups,
            )
            self.api.admit(method, identity)
        except BaseException as e:
            call = Call(
                method_name(name),
                METHODS.get(method_name(name), _NO_SPEC),
                identity,
                label,
                start,
                transport=transport,
            )
            self.classify(call, Failure(e))
            raise
        return Call(method, spec, identity, label, start, transport=transport)

    # 2. decode, 3. upload size -----------------------------------------------------------------

    def decode(self, call: Call, data: bytes) -> Any:
        """
        The request object from its JSON (empty = C{{}}).

        @raise RequestTooLarge: over the method's limit.
        @raise InvalidRequest: malformed, naming the field.
        """
        if len(data) > call.spec.max_request:
            raise RequestTooLarge(
                f"request JSON of {len(data)} bytes is over the "
                f"{call.spec.max_request}-byte limit"
            )
        try:
            return codec.decode(call.spec.request, data.strip() or b"{}")
        except codec.DecodeError as e:
            raise InvalidRequest(f"malformed request: {e}") from None

    def upload_size(self, call: Call, request: Any) -> int:
        """
        How many raw bytes follow this request (0 for methods without uploads).

        @raise RequestTooLarge: over the method's limit.
        """
        if call.spec.upload is None:
            return 0
        size = call.spec.upload(request)
        if size > call.spec.max_upload:
            raise RequestTooLarge(
                f"an upload of {size} bytes is over the " f"{call.spec.max_upload}-byte limit"
            )
        return size

    # 4. invoke -----------------------------------------------------------------------------------

    def invoke(
        self,
        call: Call,
        request: Any,
        *,
        progress: Optional[Callable[[Any], None]] = None,
        upload: Optional[UploadStream] = None,
        receive: Optional[Callable[[], "Deferred[Any]"]] = None,
    ) -> "Deferred[Any]":
        """
        Run the call. Fires with the response object; for progress streams
        (CreateVm) each progress message goes to C{progress} first; for update
        streams (GetUpdates) it fires with an
        L{hypervisor.manager.updates.UpdateStream} the transport drains. For methods
        whose client answers mid-stream (C{spec.answer}: MigrateVm's commit) the
        transport passes C{receive}, which fires with that answer.
        """
        kind = call.spec.kind
        handler = getattr(self.api, call.method)
        if kind == PROGRESS:
            send = progress or (lambda message: None)
            if call.spec.answer is not None:
                d = maybeDeferred(
                    handler, call.identity, request, send, upload=upload, receive=receive
                )
            else:
                d = maybeDeferred(handler, call.identity, request, send, upload=upload)
        elif kind == UPDATES:
            d = maybeDeferred(handler, call.identity, request)
        elif call.spec.upload is not None:  # a reply after raw bytes (ReplaceVmUserData)
            d = maybeDeferred(handler, call.identity, request, upload=upload)
        else:
            d = maybeDeferred(handler, call.identity, request)
        return d

    # 5. classify ----------------------------------------------------------------------------------

    def classify(self, call: Optional[Call], failure: Failure) -> tuple[int, str]:
        """
        The status and the sentence for a failure; counts it (once per call) and logs
        internal errors with their traceback.
        """
        e = failure.value
        label = call.label if call is not None else "unknown"
        if isinstance(e, codec.DecodeError):
            e = InvalidRequest(f"malformed request: {e}")
        if isinstance(e, HypervisorError):
            status, message = e.status, str(e)
            if status in (401, 403):
                self.metrics.rpc_denied.labels(label, DENIED_REASONS[status]).inc()
                self.log.info(
                    "Hypervisor.{method} refused: {message}", method=label, message=message
                )
        elif isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
            status, message = 503, (
                "the hypervisor is out of file descriptors right "
                "now: the operation did not complete; try again "
                "shortly"
            )
            self.log.error("Hypervisor.{method}: {e}", method=label, e=e)
        elif isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            status, message = 507, (
                f"no space left on the hypervisor's disk "
                f"({e.strerror}): the operation did not complete; free "
                "space on the state or volume file system and try "
                "again (a VM left destroying is removed by DestroyVm or "
                "at the next start)"
            )
            self.log.error("Hypervisor.{method}: {e}", method=label, e=e)
        elif isinstance(e, OSError):
            status, message = 500, (
                f"the hypervisor could not write its state "
                f"({e.strerror}): the operation did not complete (a "
                "half-done one is completed at the next start or by "
                "repeating it); its log has the details"
            )
            self.log.failure("Hypervisor.{method} failed", failure, method=label)
        else:
            status, message = 500, "internal error; the hypervisor's log has the details"
            self.log.failure("Hypervisor.{method} failed", failure, method=label)
        self.finish(call, ok=False)
        return status, message

    def finish(self, call: Optional[Call], ok: bool) -> None:
        """
        Count a finished call (once) and its latency.
        """
        if call is None:
            self.metrics.rpc_calls.labels("unknown", "error").inc()
            return
        if call.finished:
            return
        call.finished = True
        key = (call.label, call.transport, "ok" if ok else "error")
        children = self._counted.get(key)
        if children is None:
            m = self.metrics
            children = self._counted[key] = (
                m.rpc_calls.labels(key[0], key[2]),
                m.rpc_transport_calls.labels(*key),
                m.rpc_duration.labels(key[0]),
            )
        calls, transport_calls, duration = children
        calls.inc()
        transport_calls.inc()
        duration.observe(self.reactor.seconds() - call.started)


_NO_SPEC = MethodSpec(request=dict, access="admin")
