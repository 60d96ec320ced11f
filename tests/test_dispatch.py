"""
Tests for L{hypervisor.dispatch.Dispatcher} on its own: admission before any body
(unknown methods, plain HTTP, admin methods, hypervisor owners, the service layer's
own refusals), decoding with limits, upload sizes, invocation of each reply kind, and
the classification of failures into statuses and metrics.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hypervisor import codec
from hypervisor.api import METHODS, Empty, MethodSpec
from hypervisor.auth import ANONYMOUS, ROOT, Identity, Unauthenticated
from hypervisor.dispatch import Call, Dispatcher, RequestTooLarge
from hypervisor.errors import (
    AccessDenied,
    HypervisorError,
    InsufficientCapacity,
    InvalidRequest,
    NotFound,
    Unavailable,
    WrongState,
)
from hypervisor.manager.updates import UpdateHub, UpdateStream
from hypervisor.metrics import Metrics
from hypervisor.model import (
    ChangeOwnersRequest,
    CreateVmRequest,
    CreateVmResponse,
    GetVmInfoResponse,
    IpRequest,
    SetDisabledStateRequest,
    Update,
    VmInfo,
)
from hypervisor.upload import UploadStream
from hypervisor.virt.connection import NotConnected
from tests.test_manager_clock import ALICE, UNFIRED, ClockDaemon, fired

ADMIN = Identity(username="admin", method_patterns=("Hypervisor.*",), full_authority=True)
SETTER = Identity(username="setter", method_patterns=("Hypervisor.SetDisabledState",))


class FakeApi:
    """
    The parts of L{hypervisor.api.HypervisorApi} the dispatcher uses, recording
    calls; C{refuse} makes L{admit} raise, C{fail} makes the methods fail.
    """

    def __init__(self) -> None:
        self.owners: tuple[frozenset[str], frozenset[str]] = (frozenset(), frozenset())
        self.refuse: Optional[BaseException] = None
        self.fail: Optional[BaseException] = None
        self.calls: list[tuple[str, Any]] = []
        self.hub = UpdateHub()

    def hypervisor_owners(self) -> tuple[frozenset[str], frozenset[str]]:
        return self.owners

    def admit(self, method: str, identity: Identity) -> None:
        self.calls.append(("admit", method))
        if self.refuse is not None:
            raise self.refuse

    def GetVmInfo(self, identity: Identity, request: IpRequest) -> Any:
        self.calls.append(("GetVmInfo", (identity, request)))
        if self.fail is not None:
            raise self.fail
        return GetVmInfoResponse(VmInfo=VmInfo(Hostname="web"))

    def StopVm(self, identity: Identity, request: Any) -> "Deferred[Any]":
        self.calls.append(("StopVm", request))
        self.stop = Deferred()
        return self.stop

    def CreateVm(
        self,
        identity: Identity,
        request: CreateVmRequest,
        send: Callable[[Any], None],
        upload: Optional[UploadStream] = None,
    ) -> "Deferred[Any]":
        self.calls.append(("CreateVm", upload))
        send(CreateVmResponse(ProgressMessage="one"))
        send(CreateVmResponse(ProgressMessage="two"))
        return succeed(CreateVmResponse(Final=True, IpAddress="10.5.0.2"))

    def GetUpdates(self, identity: Identity, request: Any) -> UpdateStream:
        return self.hub.subscribe(Update(HaveDisabled=True), identity.username)


class DispatcherTestCase(SynchronousTestCase):
    """
    A dispatcher over a L{FakeApi} on a clock, with fresh metrics.
    """

    def setUp(self) -> None:
        self.api = FakeApi()
        self.metrics = Metrics()
        self.clock = Clock()
        self.dispatcher = self.make()

    def make(self, allow_unauthenticated_reads: bool = False, api: Any = None) -> Dispatcher:
        return Dispatcher(
            api or self.api,
            self.metrics,
            self.clock,  # type: ignore[arg-type]
            allow_unauthenticated_reads=allow_unauthenticated_reads,
        )

    def calls(self, method: str, outcome: str) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "hypervisor_rpc_calls_total", {"method": method, "outcome": outcome}
            )
            or 0
        )

    def denied(self, method: str, reason: str) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "hypervisor_rpc_denied_total", {"method": method, "reason": reason}
            )
            or 0
        )

    def refused(
        self,
        name: str,
        identity: Identity,
        secure: bool = True,
        dispatcher: Optional[Dispatcher] = None,
    ) -> HypervisorError:
        return self.assertRaises(
            HypervisorError, (dispatcher or self.dispatcher).admit, name, identity, secure
        )


class AdmitTests(DispatcherTestCase):
    """
    L{Dispatcher.admit}.
    """

    def test_unknown_method(self) -> None:
        """
        An unknown method, or a name without the C{Hypervisor.} prefix, is 404 and
        counted as an "unknown" error; the service layer is not asked.
        """
        for name in (
            "Hypervisor.Nope",
            "StartVm",
            "Other.StartVm",
            "Hypervisor.",
            "Hypervisor.GetVmLastPatchLog",
        ):
            error = self.refused(name, ALICE)
            self.assertIsInstance(error, NotFound)
            self.assertEqual(error.status, 404)
            self.assertIn("GET /rpc", str(error))
        self.assertEqual(self.calls("unknown", "error"), 5)
        self.assertEqual(self.api.calls, [])

    def test_public_method(self) -> None:
        """
        An authenticated caller is admitted to a public method over TLS; the call
        carries the method, spec, identity and the clock's time.
        """
        self.clock.advance(7)
        call = self.dispatcher.admit("Hypervisor.StopVm", ALICE, True)
        self.assertEqual(
            (call.method, call.label, call.identity, call.started), ("StopVm", "StopVm", ALICE, 7)
        )
        self.assertIs(call.spec, METHODS["StopVm"])
        self.assertEqual(self.api.calls, [("admit", "StopVm")])

    def test_plain_http_refused(self) -> None:
        """
        Plain HTTP is refused (401) for everything but the unauthenticated reads,
        whatever the identity says.
        """
        for method in ("StopVm", "CreateVm", "SetDisabledState", "GetUpdates"):
            error = self.refused(f"Hypervisor.{method}", ROOT, secure=False)
            self.assertIsInstance(error, Unauthenticated)
            self.assertEqual(error.status, 401)
            self.assertIn("HTTPS", str(error))
        self.assertEqual(self.denied("StopVm", "unauthenticated"), 1)
        self.assertEqual(self.api.calls, [])

    def test_unauthenticated_reads_need_the_flag(self) -> None:
        """
        Without -allowUnauthenticatedReads, reads without a certificate are 401
        (plain HTTP or TLS without a client certificate); with it they are admitted.
        """
        for secure in (False, True):
            error = self.refused("Hypervisor.GetVmInfo", ANONYMOUS, secure=secure)
            self.assertEqual(error.status, 401)
            self.assertIn("-allowUnauthenticatedReads", str(error))
        open_reads = self.make(allow_unauthenticated_reads=True)
        for method in ("GetVmInfo", "GetVmInfos", "ListVMs", "ListSubnets", "GetCapacity"):
            for secure in (False, True):
                call = open_reads.admit(f"Hypervisor.{method}", ANONYMOUS, secure)
                self.assertEqual(call.method, method)
        error = self.refused("Hypervisor.StopVm", ANONYMOUS, True, open_reads)
        self.assertEqual(error.status, 401)

    def test_admin_methods(self) -> None:
        """
        Admin methods are refused (403) to an authenticated caller without the power,
        admitted with a matching method grant, and admitted to hypervisor owners (by
        user or group) as the service layer reports them, with the owner flag set.
        """
        error = self.refused("Hypervisor.SetDisabledState", ALICE)
        self.assertIsInstance(error, AccessDenied)
        self.assertEqual(error.status, 403)
        self.assertEqual(self.denied("SetDisabledState", "denied"), 1)
        self.assertEqual(self.calls("SetDisabledState", "error"), 1)
        self.dispatcher.admit("Hypervisor.SetDisabledState", SETTER, True)
        self.assertEqual(self.refused("Hypervisor.UpdateSubnets", SETTER).status, 403)
        self.api.owners = (frozenset({"alice"}), frozenset())
        call = self.dispatcher.admit("Hypervisor.UpdateSubnets", ALICE, True)
        self.assertTrue(call.identity.hypervisor_owner)
        self.api.owners = (frozenset(), frozenset({"team"}))
        call = self.dispatcher.admit("Hypervisor.ChangeAddressPool", ALICE, True)
        self.assertTrue(call.identity.hypervisor_owner)
        self.api.owners = (frozenset({"alice"}), frozenset())
        self.assertEqual(self.refused("Hypervisor.SetDisabledState", ANONYMOUS).status, 401)

    def test_service_layer_refusal(self) -> None:
        """
        A refusal of the service layer's own C{admit} (e.g. 503 while disabled)
        comes out of admission and is counted.
        """
        self.api.refuse = Unavailable("Hypervisor is disabled")
        error = self.refused("Hypervisor.CreateVm", ALICE)
        self.assertEqual(error.status, 503)
        self.assertEqual(self.calls("CreateVm", "error"), 1)


class RealApiAdmitTests(SynchronousTestCase):
    """
    Admission over the real service layer and manager.
    """

    def setUp(self) -> None:
        from hypervisor.api import HypervisorApi

        self.daemon = ClockDaemon(self).start()
        self.dispatcher = Dispatcher(
            HypervisorApi(self.daemon.manager), Metrics(), self.daemon.clock
        )

    def test_create_refused_while_disabled(self) -> None:
        """
        While the hypervisor is disabled CreateVm is refused with 503 at admission,
        before any request is decoded; other methods are admitted; once enabled
        CreateVm is admitted again.
        """
        fired(self.daemon.api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=True)))
        error = self.assertRaises(
            Unavailable, self.dispatcher.admit, "Hypervisor.CreateVm", ALICE, True
        )
        self.assertEqual(error.status, 503)
        self.assertIn("SetDisabledState", str(error))
        self.dispatcher.admit("Hypervisor.StopVm", ALICE, True)
        fired(self.daemon.api.SetDisabledState(ROOT, SetDisabledStateRequest(Disable=False)))
        self.dispatcher.admit("Hypervisor.CreateVm", ALICE, True)

    def test_owners_from_the_service_layer(self) -> None:
        """
        Hypervisor owners set with ChangeOwners may call admin methods.
        """
        self.assertRaises(
            AccessDenied, self.dispatcher.admit, "Hypervisor.SetDisabledState", ALICE, True
        )
        fired(self.daemon.api.ChangeOwners(ROOT, ChangeOwnersRequest(OwnerUsers=["alice"])))
        call = self.dispatcher.admit("Hypervisor.SetDisabledState", ALICE, True)
        self.assertTrue(call.identity.hypervisor_owner)
        response = fired(self.dispatcher.invoke(call, SetDisabledStateRequest(Disable=True)))
        self.assertEqual(response.Error, "")
        self.assertTrue(self.daemon.manager.disabled)


class DecodeTests(DispatcherTestCase):
    """
    L{Dispatcher.decode} and L{Dispatcher.upload_size}.
    """

    def call(self, method: str, spec: Optional[MethodSpec] = None) -> Call:
        return Call(method, spec or METHODS[method], ALICE, method, 0.0)

    def test_decode(self) -> None:
        """
        The JSON becomes the method's request type; an empty body is C{{}}.
        """
        request = self.dispatcher.decode(self.call("GetVmInfo"), b'{"IpAddress": "10.5.0.2"}')
        self.assertEqual(request, IpRequest(IpAddress="10.5.0.2"))
        self.assertEqual(self.dispatcher.decode(self.call("GetVmInfo"), b"  \n"), IpRequest())
        self.assertEqual(self.dispatcher.decode(self.call("GetCapacity"), b""), Empty())

    def test_malformed_names_the_field(self) -> None:
        """
        A misfit or malformed JSON is 400 naming the field.
        """
        for body, words in (
            (b'{"IpAddress": 5}', "IpAddress"),
            (b'{"IpAddress": "1.2.3"}', "IpAddress"),
            (b'{"IpAddress": ', "malformed request"),
            (b"[]", "malformed request"),
        ):
            error = self.assertRaises(
                InvalidRequest, self.dispatcher.decode, self.call("GetVmInfo"), body
            )
            self.assertEqual(error.status, 400)
            self.assertIn(words, str(error))

    def test_request_over_limit(self) -> None:
        """
        JSON over the method's limit is 413, before it is parsed.
        """
        spec = MethodSpec(IpRequest, "public", max_request=10)
        error = self.assertRaises(
            RequestTooLarge,
            self.dispatcher.decode,
            self.call("GetVmInfo", spec),
            b'{"IpAddress": ""}',
        )
        self.assertEqual(error.status, 413)
        self.assertIn("10-byte limit", str(error))

    def test_upload_size(self) -> None:
        """
        CreateVm is followed by ImageDataSize + UserDataSize bytes; methods without
        uploads by none; a size over the method's limit is 413.
        """
        request = CreateVmRequest(ImageDataSize=1000, UserDataSize=24)
        self.assertEqual(self.dispatcher.upload_size(self.call("CreateVm"), request), 1024)
        self.assertEqual(self.dispatcher.upload_size(self.call("GetVmInfo"), IpRequest()), 0)
        spec = MethodSpec(
            CreateVmRequest, "public", upload=METHODS["CreateVm"].upload, max_upload=1000
        )
        error = self.assertRaises(
            RequestTooLarge, self.dispatcher.upload_size, self.call("CreateVm", spec), request
        )
        self.assertEqual(error.status, 413)


class InvokeTests(DispatcherTestCase):
    """
    L{Dispatcher.invoke} for each reply kind.
    """

    def test_request_reply(self) -> None:
        """
        A request/reply method fires with its response; the handler gets the
        admitted identity and the request.
        """
        call = self.dispatcher.admit("Hypervisor.GetVmInfo", ALICE, True)
        response = fired(self.dispatcher.invoke(call, IpRequest("10.5.0.2")))
        self.assertEqual(response.VmInfo.Hostname, "web")
        self.assertEqual(self.api.calls[-1], ("GetVmInfo", (ALICE, IpRequest("10.5.0.2"))))

    def test_asynchronous_reply(self) -> None:
        """
        A method answering later fires when it does.
        """
        call = self.dispatcher.admit("Hypervisor.StopVm", ALICE, True)
        d = self.dispatcher.invoke(call, None)
        self.assertIs(fired(d), UNFIRED)
        self.api.stop.callback("done")
        self.assertEqual(fired(d), "done")

    def test_raising_handler_fails_the_deferred(self) -> None:
        """
        A handler that raises fails the Deferred instead of raising.
        """
        self.api.fail = WrongState("no")
        call = self.dispatcher.admit("Hypervisor.GetVmInfo", ALICE, True)
        self.assertIsInstance(fired(self.dispatcher.invoke(call, IpRequest())), WrongState)

    def test_progress_stream(self) -> None:
        """
        CreateVm's progress messages go to C{progress} before the final response;
        the upload reaches the method.
        """
        call = self.dispatcher.admit("Hypervisor.CreateVm", ALICE, True)
        messages: list[Any] = []
        upload = UploadStream(0)
        final = fired(
            self.dispatcher.invoke(call, CreateVmRequest(), progress=messages.append, upload=upload)
        )
        self.assertEqual([m.ProgressMessage for m in messages], ["one", "two"])
        self.assertTrue(final.Final)
        self.assertEqual(self.api.calls[-1], ("CreateVm", upload))

    def test_progress_without_listener(self) -> None:
        """
        Without a progress callback the messages are dropped and the final response
        still comes.
        """
        call = self.dispatcher.admit("Hypervisor.CreateVm", ALICE, True)
        self.assertTrue(fired(self.dispatcher.invoke(call, CreateVmRequest())).Final)

    def test_update_stream(self) -> None:
        """
        GetUpdates fires with a stream whose first update is the full one.
        """
        call = self.dispatcher.admit("Hypervisor.GetUpdates", ALICE, True)
        stream = fired(self.dispatcher.invoke(call, Empty()))
        self.assertIsInstance(stream, UpdateStream)
        self.assertTrue(fired(stream.get()).HaveDisabled)


class ClassifyTests(DispatcherTestCase):
    """
    L{Dispatcher.classify} and the metrics of finished calls.
    """

    def classify(self, error: BaseException, method: str = "StopVm") -> tuple[int, str]:
        call = Call(method, METHODS[method], ALICE, method, 0.0)
        return self.dispatcher.classify(call, Failure(error))

    def test_service_errors(self) -> None:
        """
        Service-layer errors keep their status and sentence.
        """
        for error, status in (
            (InvalidRequest("bad"), 400),
            (AccessDenied("no"), 403),
            (NotFound("none"), 404),
            (WrongState("state"), 409),
            (RequestTooLarge("big"), 413),
            (Unavailable("disabled"), 503),
            (NotConnected("libvirt down"), 503),
            (InsufficientCapacity("full"), 507),
            (Unauthenticated("who"), 401),
        ):
            self.assertEqual(self.classify(error), (status, str(error)))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_decode_error(self) -> None:
        """
        A codec error escaping a method is 400 with the field.
        """
        status, message = self.classify(codec.DecodeError("IpRequest.IpAddress: bad"))
        self.assertEqual(status, 400)
        self.assertIn("IpRequest.IpAddress", message)

    def test_descriptors_and_space(self) -> None:
        """
        Out of file descriptors is 503 and out of space 507, each with a sentence
        saying the operation did not complete; neither is an internal error.
        """
        for code, status in (
            (errno.EMFILE, 503),
            (errno.ENFILE, 503),
            (errno.ENOSPC, 507),
            (errno.EDQUOT, 507),
        ):
            got, message = self.classify(OSError(code, "x"))
            self.assertEqual(got, status)
            self.assertIn("did not complete", message)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_other_os_error(self) -> None:
        """
        Another OSError is 500 with its strerror, no traceback or path shown, and is
        logged with its traceback.
        """
        status, message = self.classify(OSError(errno.EIO, "Input/output error", "/secret/path"))
        self.assertEqual(status, 500)
        self.assertIn("Input/output error", message)
        self.assertNotIn("/secret/path", message)
        self.assertNotIn("Traceback", message)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_internal_error_hidden(self) -> None:
        """
        Any other exception is 500 with a fixed sentence (nothing of the exception
        shown) and is logged with its traceback.
        """
        status, message = self.classify(KeyError("internal detail"))
        self.assertEqual(status, 500)
        self.assertNotIn("internal detail", message)
        self.assertIn("log", message)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_counted_once(self) -> None:
        """
        A call is counted once, whether it is finished and then classified, or
        classified twice; its latency is the clock's time since admission.
        """
        call = self.dispatcher.admit("Hypervisor.StopVm", ALICE, True)
        self.clock.advance(3)
        self.dispatcher.finish(call, ok=True)
        self.dispatcher.classify(call, Failure(WrongState("late")))
        self.dispatcher.classify(call, Failure(WrongState("later")))
        self.assertEqual(self.calls("StopVm", "ok"), 1)
        self.assertEqual(self.calls("StopVm", "error"), 0)
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "hypervisor_rpc_duration_seconds_sum", {"method": "StopVm"}
            ),
            3,
        )
        self.assertEqual(
            self.metrics.registry.get_sample_value(
                "hypervisor_rpc_duration_seconds_count", {"method": "StopVm"}
            ),
            1,
        )

    def test_error_counted(self) -> None:
        """
        A failed call is counted as an error of its method; without a call it
        counts as "unknown".
        """
        call = self.dispatcher.admit("Hypervisor.StopVm", ALICE, True)
        self.dispatcher.classify(call, Failure(WrongState("no")))
        self.dispatcher.classify(None, Failure(Unauthenticated("bad certificate")))
        self.assertEqual(self.calls("StopVm", "error"), 1)
        self.assertEqual(self.calls("unknown", "error"), 1)
        self.assertEqual(self.denied("unknown", "unauthenticated"), 1)
