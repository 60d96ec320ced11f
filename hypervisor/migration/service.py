# -*- test-case-name: tests.test_migration_real -*-
"""
Access tokens, MigrateVm, CopyVm, PrepareVmForMigration and ReadVmVolume: the
service-layer side of L{hypervisor.migration} (its docstring states the fault
invariant and how each step keeps it).

The target runs the migration: its calls to the source go over SRPC with the
target's own certificate (C{-certFile}/C{-keyFile}), as the reference's target
dials the source with its own; they are blocking socket calls, so the whole pull
(network and disk) runs on the migration worker threads, never on the reactor.
"""

from __future__ import annotations

import copy
import json
import os
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from hypervisor import codec
from hypervisor.auth import Identity
from hypervisor.diskio import ThreadPoolRunner
from hypervisor.errors import AccessDenied, HypervisorError, InvalidRequest, NotFound, WrongState
from hypervisor.manager import capacity, images
from hypervisor.manager.state import INFO_FILE, PENDING_FILE, USER_DATA_FILE
from hypervisor.manager.tokens import AccessTokens
from hypervisor.manager.vm import Vm
from hypervisor.migration.messages import (
    CopyVmRequest,
    CopyVmResponse,
    MigrateVmRequest,
    MigrateVmResponse,
    PrepareVmForMigrationRequest,
    ReadVmVolumeRequest,
    ReadVmVolumeResponse,
)
from hypervisor.migration.transfer import (
    MAX_READ,
    PULL_CONNECTIONS,
    MiB,
    TransferError,
    VolumeProgress,
    pull_volume,
    read_range,
)
from hypervisor.model import Address, LocalVmInfo, State, VmInfo, VolumeLocation
from hypervisor.virt.domainxml import root_label

EXTRA_FILES = ("kernel", "initrd")
RECORD_FILE = "migration.json"
"""The source's record of an outgoing migration, beside the VM's C{info.json}."""
TOKEN_LIFETIME = 24 * 3600.0
PROGRESS_INTERVAL = 2.0


class MigrationFailed(HypervisorError):
    """
    The migration or copy failed (the source keeps the VM).
    """

    status = 502


def host_port(address: str, default_port: int = 6976) -> tuple[str, int]:
    """
    C{"host:port"} (or C{"host"}) -> (host, port).
    """
    host, _, port = address.rpartition(":")
    if not host:
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise InvalidRequest(f"SourceHypervisor {address!r} is not host:port") from None


class SourceClient:
    """
    Blocking SRPC calls to the other hypervisor with this daemon's certificate (used
    on the migration worker threads only).
    """

    def __init__(self, address: str, cert: str, key: str, timeout: float = 60.0) -> None:
        from hypervisor.srpc import client as srpc

        self.address, self.cert, self.key, self.timeout = address, cert, key, timeout
        host, port = host_port(address)
        self.connection = srpc.connect_tls_json(host, port, cert, key, timeout=timeout)

    def sibling(self) -> "SourceClient":
        """
        Another connection to the same hypervisor, with the same certificate.
        """
        return SourceClient(self.address, self.cert, self.key, self.timeout)

    def call(self, method: str, request: Any) -> dict[str, Any]:
        """
        A request/reply call; the reply as a dict.
        """
        return self.connection.call(method, request)

    def download(self, method: str, request: Any) -> tuple[dict[str, Any], bytes]:
        """
        A call whose reply is followed by C{Length} raw bytes.
        """
        return self.connection.call_download(method, request)

    def close(self) -> None:
        """
        Close the connection.
        """
        self.connection.close()


@contextmanager
def more_connections(
    client: SourceClient, count: int, source_ip: str
) -> Iterator[list[SourceClient]]:
    """
    Up to C{count} more connections to C{client}'s hypervisor (blocking: on a worker
    thread), closed at the end. One that cannot be opened leaves fewer ranges in
    flight, with a log line, not a failed migration.
    """
    more: list[SourceClient] = []
    try:
        for _ in range(count):
            more.append(client.sibling())
    except Exception as e:
        Migrations.log.warn(
            "VM {ip}: another connection to the source failed ({e}): pulling with {n}",
            ip=source_ip,
            e=e,
            n=len(more) + 1,
        )
    try:
        yield more
    finally:
        for sibling in more:
            sibling.close()


def _checked(reply: dict[str, Any], what: str) -> dict[str, Any]:
    if reply.get("Error"):
        raise MigrationFailed(f"{what} on the source: {reply['Error']}")
    return reply


class Migrations:
    """
    The methods (called by L{hypervisor.api.HypervisorApi}) and the source's check of
    migrations whose target went quiet.

    @ivar credentials: (certificate, key) files for calls to other hypervisors.
    @ivar check_interval: seconds between the source's checks of its migrating VMs.
    """

    log = Logger()

    def __init__(self, manager: Any, reactor: Any) -> None:
        self.manager = manager
        self.ctx = manager.ctx
        self.reactor = reactor
        self.tokens = AccessTokens(reactor, lambda ip: self.ctx.table.vms.get(ip))
        self.credentials: Optional[tuple[str, str]] = None
        self.port = 6976
        self.check_interval = float(os.environ.get("HYPERVISOR_MIGRATION_CHECK_INTERVAL", "30"))
        self._runner: Optional[ThreadPoolRunner] = None
        self._checker: Optional[LoopingCall] = None
        self._checking: set[str] = set()

    # Plumbing -----------------------------------------------------------------------------

    @property
    def runner(self) -> ThreadPoolRunner:
        """
        The worker threads of migrations and copies (started on first use).
        """
        if self._runner is None:
            self._runner = ThreadPoolRunner(self.reactor, "migration", 4)
            self._runner.startService()
            self.reactor.addSystemEventTrigger("before", "shutdown", self._runner.stopService)
        return self._runner

    def start(self) -> None:
        """
        Begin checking outgoing migrations (at start and every C{check_interval}).
        """
        if self._checker is None and self.check_interval > 0:
            self._checker = LoopingCall(self.check_outgoing)
            self._checker.clock = self.reactor
            self._checker.start(self.check_interval, now=True).addErrback(
                lambda f: self.log.failure("migration checks", f)
            )

    def stop(self) -> None:
        """
        Stop the checks; scrub the tokens.
        """
        if self._checker is not None and self._checker.running:
            self._checker.stop()
        self._checker = None
        self.tokens.clear()

    def _client(self, address: str) -> SourceClient:
        host_port(address)  # a malformed address is the caller's error (400)
        if self.credentials is None:
            raise MigrationFailed(
                "this hypervisor has no certificate of its own for calls to other "
                "hypervisors (-certFile and -keyFile)"
            )
        cert, key = self.credentials
        return SourceClient(address, cert, key)

    # Access tokens -----------------------------------------------------------------------

    def with_token(self, identity: Identity, ip: str, token: bytes) -> Identity:
        """
        The identity a call runs with, given the access token it carries.
        """
        return self.tokens.identity(identity, ip, token)

    def get_token(self, identity: Identity, ip: str, lifetime: float) -> bytes:
        """
        GetVmAccessToken (owners only: a token does not make another token).
        """
        vm = self.ctx.table.get(ip)
        self.ctx.check_owner(vm, replace(identity, token_vm=""), "GetVmAccessToken")
        return self.tokens.issue(vm, lifetime)

    def discard_token(self, identity: Identity, ip: str, token: bytes) -> None:
        """
        DiscardVmAccessToken (owners or the token's holder).
        """
        vm = self.ctx.table.get(ip)
        self.ctx.check_owner(vm, self.with_token(identity, ip, token), "DiscardVmAccessToken")
        self.tokens.discard(ip)

    # The source's side -------------------------------------------------------------------

    @inlineCallbacks
    def prepare(self, identity: Identity, request: PrepareVmForMigrationRequest) -> Any:
        """
        PrepareVmForMigration: owners or the token's holder, method power not counted
        (as Go drops it): stopped -> migrating (uncommitted, addresses unregistered,
        the record written first) or back.
        """
        ctx = self.ctx
        ip = request.IpAddress
        vm = ctx.table.get(ip)
        caller = replace(identity, method_patterns=(), hypervisor_owner=False)
        ctx.check_owner(
            vm, self.with_token(caller, ip, request.AccessToken), "PrepareVmForMigration"
        )
        yield vm.lock.acquire()
        try:
            ctx.table.get(ip)
            if request.Enable:
                if vm.info.Uncommitted:
                    raise WrongState("VM is uncommitted")
                if vm.info.State != State.STOPPED:
                    raise WrongState("VM is not stopped")
                record = {
                    "Role": "source",
                    "Target": request.TargetHypervisor,
                    "WasRunning": bool(request.WasRunning),
                }
                yield ctx.writer.write(
                    os.path.join(vm.directory, RECORD_FILE), json.dumps(record).encode()
                )
                new = ctx.table.copy(vm)
                new.VmInfo.Uncommitted = True
                new.VmInfo.State = State.MIGRATING
                new.VmInfo.ChangedStateOn = ctx.now()
                yield ctx.table.commit(vm, new)
                yield self._unregister(self._addresses(vm.info))
                self.log.info(
                    "VM {ip} migrating to {t}: its addresses are unregistered here",
                    ip=ip,
                    t=request.TargetHypervisor or "(a target that did not say)",
                )
            else:
                if vm.info.State != State.MIGRATING:
                    raise WrongState("VM is not migrating")
                yield self._roll_back(vm, restart=False)
        finally:
            vm.lock.release()

    @staticmethod
    def _addresses(info: VmInfo) -> list[Address]:
        return [info.Address] + list(info.SecondaryAddresses)

    def _unregister(self, addresses: list[Address]) -> Any:
        return self.ctx.unregister_addresses(addresses)

    def _register(self, addresses: list[Address]) -> Any:
        return self.ctx.register_addresses(addresses)

    @inlineCallbacks
    def _roll_back(self, vm: Vm, restart: bool) -> Any:
        """
        migrating -> stopped here (addresses registered again, the record removed);
        started again if C{restart}. Called with the VM's lock held.
        """
        ctx = self.ctx
        yield self._register(self._addresses(vm.info))
        new = ctx.table.copy(vm)
        new.VmInfo.Uncommitted = False
        new.VmInfo.State = State.STOPPED
        new.VmInfo.ChangedStateOn = ctx.now()
        yield ctx.table.commit(vm, new)
        yield ctx.runner.run(images.remove_file, os.path.join(vm.directory, RECORD_FILE))
        self.log.info("VM {ip}: migration undone; the VM stays here", ip=vm.ip)
        if restart:
            yield self.manager.lifecycle.start_domain(vm)

    def read_volume(
        self, identity: Identity, request: ReadVmVolumeRequest
    ) -> "Deferred[tuple[ReadVmVolumeResponse, bytes]]":
        """
        ReadVmVolume (owners or the token's holder): one range, read on a disk thread.
        """
        ctx = self.ctx
        ip = request.IpAddress
        vm = ctx.table.get(ip)
        ctx.check_owner(vm, self.with_token(identity, ip, request.AccessToken), "ReadVmVolume")
        if request.VolumeIndex >= len(vm.local.VolumeLocations):
            raise InvalidRequest(f"VM {ip} has no volume {request.VolumeIndex}")
        if vm.info.State not in (State.STOPPED, State.MIGRATING, State.RUNNING):
            raise WrongState(f"VM {ip} is {vm.info.State.value}")
        path = vm.local.VolumeLocations[request.VolumeIndex].Filename
        if request.ExtraFile:
            if request.ExtraFile not in EXTRA_FILES:
                raise InvalidRequest(f"ExtraFile must be one of {', '.join(EXTRA_FILES)}")
            if not (vm.kernel if request.ExtraFile == "kernel" else vm.initrd):
                raise NotFound(f"VM {ip} has no {request.ExtraFile}")
            path = os.path.join(os.path.dirname(path), request.ExtraFile)
            return ctx.runner.run(_read_file_range, path, request)
        volume = vm.info.Volumes[request.VolumeIndex]
        size = volume.Size
        return ctx.runner.run(read_range, path, request, size)

    # Checks of outgoing migrations (the source's rule) ------------------------------------

    @inlineCallbacks
    def check_outgoing(self) -> Any:
        """
        For every VM migrating away from here with a known target: ask the target
        whether it committed the VM; if it did, remove our copy; if the target has no
        such VM, undo the migration (restarting the VM if it ran); if the target's copy
        is uncommitted or the target does not answer, wait for the next check.
        """
        for vm in list(self.ctx.table.vms.values()):
            if vm.deleted or vm.info.State != State.MIGRATING or vm.ip in self._checking:
                continue
            self._checking.add(vm.ip)
            try:
                yield self._check(vm)
            except Exception as e:
                self.log.warn("VM {ip}: migration check failed: {e}", ip=vm.ip, e=e)
            finally:
                self._checking.discard(vm.ip)

    @inlineCallbacks
    def _check(self, vm: Vm) -> Any:
        record = yield self.ctx.runner.run(_read_record, os.path.join(vm.directory, RECORD_FILE))
        target = (record or {}).get("Target")
        if not target:
            return  # prepared by a target that did not say where: an operator decides
        try:
            verdict = yield self.runner.run(self._ask_target, target, vm.ip)
        except Exception as e:
            self.log.info(
                "VM {ip}: migration target {t} does not answer ({e}); asking again later",
                ip=vm.ip,
                t=target,
                e=e,
            )
            return
        if verdict == "uncommitted":
            return
        yield vm.lock.acquire()
        try:
            if vm.deleted or vm.info.State != State.MIGRATING:
                return
            if verdict == "committed":
                self.log.warn(
                    "VM {ip} was committed by {t}: removing the copy left here", ip=vm.ip, t=target
                )
                yield self.ctx.table.commit_state(vm, State.DESTROYING)
                yield self.manager.lifecycle.remove_vm(vm)
            else:
                self.log.warn(
                    "VM {ip}: migration target {t} has no copy of it: the VM stays here",
                    ip=vm.ip,
                    t=target,
                )
                yield self._roll_back(vm, restart=bool(record.get("WasRunning")))
        finally:
            vm.lock.release()

    def _ask_target(self, target: str, ip: str) -> str:
        client = self._client(target)
        try:
            reply = client.call("GetVmInfo", {"IpAddress": ip})
        finally:
            client.close()
        if reply.get("Error"):
            if "no VM" in str(reply["Error"]):
                return "absent"
            raise MigrationFailed(str(reply["Error"]))
        info = reply.get("VmInfo") or {}
        return "uncommitted" if info.get("Uncommitted") else "committed"

    # The target's side ----------------------------------------------------------------------

    def _volume_dir(self, needed: int) -> str:
        return str(self.ctx.stats.reserve(needed))

    @inlineCallbacks
    def _make_vm(
        self, info: VmInfo, identity: Identity, pending: dict[str, Any], needed: int
    ) -> Any:
        """
        The target's new VM: uncommitted, state migrating, in the table, with its
        C{pending.json} and C{info.json} on disk and empty volume files.
        """
        ctx = self.ctx
        ip = info.Address.IpAddress
        if ip in ctx.table.vms:
            raise WrongState("cannot migrate to the same hypervisor")
        volume_directory = self._volume_dir(needed)
        vm_volume_dir = os.path.join(volume_directory, ip)
        locations = [
            VolumeLocation(
                DirectoryToCleanup=vm_volume_dir,
                Filename=os.path.join(
                    vm_volume_dir, "root" if i == 0 else f"secondary-volume.{i - 1}"
                ),
            )
            for i in range(len(info.Volumes))
        ]
        info.State = State.MIGRATING
        info.Uncommitted = True
        info.ChangedStateOn = ctx.now()
        vm = Vm(
            LocalVmInfo(VmInfo=info, VolumeLocations=locations),
            os.path.join(ctx.state.vms_path, ip),
        )
        vm.pending = pending
        ctx.table.add(vm)
        vm.creating = True
        try:
            yield ctx.runner.run(images.make_directories, vm.directory)
            yield ctx.writer.write(
                os.path.join(vm.directory, PENDING_FILE), json.dumps(pending).encode()
            )
            yield ctx.writer.write(
                os.path.join(vm.directory, INFO_FILE), codec.encode(vm.local, indent=4)
            )
            yield ctx.runner.run(images.make_directories, vm_volume_dir)
        except BaseException:
            ctx.stats.release(volume_directory, needed, used=False)
            vm.creating = False
            yield self._remove_target(vm)
            raise
        ctx.stats.release(volume_directory, needed, used=True)
        return vm

    @inlineCallbacks
    def _remove_target(self, vm: Vm) -> Any:
        """
        Remove the target's uncommitted copy (its addresses were never registered).
        """
        vm.creating = False
        if vm.deleted:
            return
        yield vm.lock.acquire()
        try:
            if vm.deleted:
                return
            self.ctx.table.record_state(vm, State.DESTROYING, persist=False)
            yield self.manager.lifecycle.remove_vm(vm, domain=bool(vm.domain_uuid) or True)
        except Exception as e:
            self.log.error("VM {ip}: removing the uncommitted copy failed: {e}", ip=vm.ip, e=e)
        finally:
            vm.lock.release()

    def _pull_all(
        self,
        client: SourceClient,
        source_ip: str,
        token: bytes,
        vm: Vm,
        resync: bool,
        report: Callable[[str], None],
    ) -> list[VolumeProgress]:
        """
        Pull every volume (blocking, on a worker thread), with up to
        L{PULL_CONNECTIONS} ranges in flight (L{more_connections}).
        """
        with more_connections(client, PULL_CONNECTIONS - 1, source_ip) as more:
            return self._pull_volumes(client, more, source_ip, token, vm, resync, report)

    def _pull_volumes(
        self,
        client: SourceClient,
        siblings: list[SourceClient],
        source_ip: str,
        token: bytes,
        vm: Vm,
        resync: bool,
        report: Callable[[str], None],
    ) -> list[VolumeProgress]:
        out = []
        for index, (volume, location) in enumerate(zip(vm.info.Volumes, vm.local.VolumeLocations)):
            last = [0.0]

            def progress(state: VolumeProgress, size: int, index: int = index) -> None:
                now = time.monotonic()
                if now - last[0] >= PROGRESS_INTERVAL or state.offset == size:
                    last[0] = now
                    report(
                        f"volume {index}: {state.offset // MiB} of {size // MiB} MiB "
                        f"({state.sent // MiB} MiB sent, {state.zero // MiB} MiB of zeros, "
                        f"{state.skipped // MiB} MiB unchanged)"
                    )

            out.append(
                pull_volume(
                    lambda req: client.download("ReadVmVolume", req),
                    ReadVmVolumeRequest(AccessToken=token, IpAddress=source_ip, VolumeIndex=index),
                    location.Filename,
                    volume.Size,
                    resync=resync,
                    progress=progress,
                    extra_calls=[
                        lambda req, c=c: c.download("ReadVmVolume", req)  # type: ignore[misc]
                        for c in siblings
                    ],
                )
            )
        if not resync:  # the kernel and initrd of a direct kernel boot, once
            root_dir = os.path.dirname(vm.local.VolumeLocations[0].Filename)
            for name in EXTRA_FILES:
                ask = ReadVmVolumeRequest(
                    AccessToken=token, IpAddress=source_ip, ExtraFile=name, Length=MAX_READ
                )
                reply, _ = client.download("ReadVmVolume", ask)
                if reply.get("Error"):
                    if "has no" in str(reply["Error"]):
                        continue
                    raise MigrationFailed(f"{name} on the source: {reply['Error']}")
                size = int(reply.get("Size") or 0)

                def extra(
                    req: ReadVmVolumeRequest, name: str = name
                ) -> tuple[dict[str, Any], bytes]:
                    return client.download("ReadVmVolume", replace(req, ExtraFile=name))

                pull_volume(
                    extra,
                    ReadVmVolumeRequest(AccessToken=token, IpAddress=source_ip),
                    os.path.join(root_dir, name),
                    size,
                )
                setattr(vm, name, True)
        return out

    def _user_data(self, client: SourceClient, source_ip: str, token: bytes, path: str) -> None:
        reply, data = client.download(
            "GetVmUserData", {"AccessToken": codec_b64(token), "IpAddress": source_ip}
        )
        _checked(reply, "GetVmUserData")
        if data:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    @inlineCallbacks
    def migrate(
        self,
        identity: Identity,
        request: MigrateVmRequest,
        send: Callable[[Any], None],
        receive: Callable[[], "Deferred[Any]"],
    ) -> Any:
        """
        MigrateVm on the target (reference §1.7 and the module docstring); C{send}
        sends progress messages, C{receive} fires with the client's answer to
        C{RequestCommit}.
        """
        ctx = self.ctx
        ip = request.IpAddress
        if not ip:
            raise InvalidRequest("IpAddress is required")
        if ip in ctx.table.vms:
            raise WrongState("cannot migrate to the same hypervisor")
        subnet = ctx.subnets.subnet_of(ip)
        if subnet is None:
            raise InvalidRequest(f"no matching subnet for: {ip}")
        token = request.AccessToken
        source = request.SourceHypervisor
        if not source:
            raise InvalidRequest("SourceHypervisor is required")
        host_port(source)

        def progress(message: str) -> None:
            send(MigrateVmResponse(ProgressMessage=message))

        def report(message: str) -> None:
            self.runner.from_thread(progress, message)

        client = yield self.runner.run(self._client, source)
        try:
            reply = yield self.runner.run(client.call, "GetVmInfo", {"IpAddress": ip})
            _checked(reply, "GetVmInfo")
            info = codec.decode(VmInfo, json.dumps(reply.get("VmInfo") or {}).encode())
            if info.SubnetId != subnet.Id:
                raise InvalidRequest(f"subnet ID changing from: {info.SubnetId} to: {subnet.Id}")
            if info.Address.IpAddress != ip:
                raise InvalidRequest(f"inconsistent IP address: {info.Address.IpAddress}")
            if info.State not in (State.STOPPED, State.RUNNING):
                raise WrongState(f"VM state: {info.State.value} is not stopped/running")
            for volume in info.Volumes:
                if volume.Type.value == "memory":
                    raise InvalidRequest("VMs with memory volumes cannot be migrated")
            capacity.check_cpu_and_memory(
                ctx.stats, ctx.table.usage(), info.MilliCPUs, info.MemoryInMiB
            )
            was_running = info.State == State.RUNNING
            needed = sum(v.Size for v in info.Volumes)
            vm = yield self._make_vm(
                copy.deepcopy(info),
                identity,
                {"Phase": "creating", "Migration": "in", "Source": source},
                needed,
            )
        except BaseException:
            yield self.runner.run(client.close)
            raise
        me = self._my_address(client)
        committed = False
        source_prepared = False
        source_stopped = False
        try:
            prepare = {
                "AccessToken": codec_b64(token),
                "Enable": True,
                "IpAddress": ip,
                "TargetHypervisor": me,
                "WasRunning": was_running,
            }
            if not was_running:
                reply = yield self.runner.run(client.call, "PrepareVmForMigration", prepare)
                _checked(reply, "PrepareVmForMigration")
                source_prepared = True
            progress("initial volume(s) copy")
            yield self.runner.run(self._pull_all, client, ip, token, vm, False, report)
            if was_running:
                progress("stopping VM")
                reply = yield self.runner.run(
                    client.call, "StopVm", {"AccessToken": codec_b64(token), "IpAddress": ip}
                )
                _checked(reply, "StopVm")
                source_stopped = True
                reply = yield self.runner.run(client.call, "PrepareVmForMigration", prepare)
                _checked(reply, "PrepareVmForMigration")
                source_prepared = True
                progress("update volume(s)")
                yield self.runner.run(self._pull_all, client, ip, token, vm, True, report)
            yield self.runner.run(
                self._user_data, client, ip, token, os.path.join(vm.directory, USER_DATA_FILE)
            )
            progress("starting VM")
            vm.creating = False
            yield vm.lock.acquire()
            try:
                yield self.manager.lifecycle.start_domain(vm)
            finally:
                vm.lock.release()
            if request.DhcpTimeout > 0:
                timed_out = yield self.manager.lifecycle.wait_for_dhcp(
                    vm, float(request.DhcpTimeout)
                )
                if timed_out:
                    tail = yield ctx.runner.run(_tail, os.path.join(vm.directory, "bootlog"))
                    raise MigrationFailed(f"DHCP timed out; the VM's serial log ends:\n{tail}")
            send(MigrateVmResponse(RequestCommit=True))
            answer = yield receive()
            if not answer.Commit:
                raise MigrationFailed("VM migration abandoned")
            # The commit point: info.json says committed (then the addresses are
            # registered here and the pending mark goes).
            yield vm.lock.acquire()
            try:
                new = ctx.table.copy(vm)
                new.VmInfo.Uncommitted = False
                yield ctx.table.commit(vm, new)
                committed = True
                yield self._register(self._addresses(vm.info))
                yield ctx.writer.remove(os.path.join(vm.directory, PENDING_FILE))
                vm.pending = None
            finally:
                vm.lock.release()
            try:
                reply = yield self.runner.run(
                    client.call, "DestroyVm", {"AccessToken": codec_b64(token), "IpAddress": ip}
                )
                if reply.get("Error"):
                    self.log.warn(
                        "error cleaning up old migrated VM {ip}: {e}", ip=ip, e=reply["Error"]
                    )
            except Exception as e:
                self.log.warn(
                    "error cleaning up old migrated VM {ip}: {e}; the source removes it "
                    "when it checks with us",
                    ip=ip,
                    e=e,
                )
            self.log.info("VM {ip} migrated here from {s}", ip=ip, s=source)
            return MigrateVmResponse(Final=True)
        except BaseException as e:
            if not committed:
                self.log.warn("migration of {ip} from {s} failed: {e}", ip=ip, s=source, e=e)
                yield self._remove_target(vm)
                yield self.runner.run(
                    self._undo_source,
                    client,
                    prepare,
                    source_prepared,
                    source_stopped or was_running,
                )
            if isinstance(e, TransferError):
                raise MigrationFailed(str(e)) from None
            raise
        finally:
            yield self.runner.run(client.close)

    def _undo_source(
        self, client: SourceClient, prepare: dict[str, Any], prepared: bool, restart: bool
    ) -> None:
        """
        After a failure: the source's VM back to stopped and (if it ran) started, as
        the reference's target does; errors are logged (the source's own check undoes
        the migration later if these calls cannot reach it).
        """
        try:
            if prepared:
                reply = client.call("PrepareVmForMigration", dict(prepare, Enable=False))
                if reply.get("Error"):
                    self.log.warn("source: {e}", e=reply["Error"])
            if restart:
                reply = client.call(
                    "StartVm",
                    {"AccessToken": prepare["AccessToken"], "IpAddress": prepare["IpAddress"]},
                )
                if reply.get("Error"):
                    self.log.warn("source: {e}", e=reply["Error"])
        except Exception as e:
            self.log.warn("cannot undo the migration on the source: {e}", e=e)

    def _my_address(self, client: SourceClient) -> str:
        """
        How the source reaches us: our end of the connection to it, and our port.
        """
        host = client.connection.sock.getsockname()[0]
        return f"{host}:{self.port}"

    @inlineCallbacks
    def copy(self, identity: Identity, request: CopyVmRequest, send: Callable[[Any], None]) -> Any:
        """
        CopyVm on the target: a new VM (new address) with copies of the source's
        volumes and user data; a running source is stopped for the final pass and
        started again. The new VM is stopped and must be acknowledged.
        """
        ctx = self.ctx
        if not identity.username:
            raise AccessDenied("no authentication data")
        ip = request.IpAddress
        token = request.AccessToken
        source = request.SourceHypervisor
        if not ip or not source:
            raise InvalidRequest("IpAddress and SourceHypervisor are required")
        host_port(source)

        def progress(message: str) -> None:
            send(CopyVmResponse(ProgressMessage=message))

        def report(message: str) -> None:
            self.runner.from_thread(progress, message)

        client = yield self.runner.run(self._client, source)
        restart = False
        vm: Optional[Vm] = None
        try:
            reply = yield self.runner.run(client.call, "GetVmInfo", {"IpAddress": ip})
            _checked(reply, "GetVmInfo")
            source_info = codec.decode(VmInfo, json.dumps(reply.get("VmInfo") or {}).encode())
            if source_info.State not in (State.STOPPED, State.RUNNING):
                raise WrongState("VM is not stopped or running")
            info = copy.deepcopy(request.VmInfo)
            info.Volumes = source_info.Volumes
            info.MemoryInMiB = info.MemoryInMiB or source_info.MemoryInMiB
            info.MilliCPUs = info.MilliCPUs or source_info.MilliCPUs
            info.SubnetId = info.SubnetId or source_info.SubnetId
            info.Hostname = info.Hostname or source_info.Hostname
            # What the copied kernel boots with (not among Go's flags copied by vm-control).
            info.ExtraKernelOptions = info.ExtraKernelOptions or source_info.ExtraKernelOptions
            # The copied file system keeps the source's label.
            info.RootFileSystemLabel = (
                info.RootFileSystemLabel
                or source_info.RootFileSystemLabel
                or root_label(source_info.Address.IpAddress)
            )
            subnet = ctx.subnets.choose(info.SubnetId, identity)
            capacity.check_cpu_and_memory(
                ctx.stats, ctx.table.usage(), info.MilliCPUs, info.MemoryInMiB
            )
            (address,) = yield ctx.allocate_addresses([subnet])
            info.Address = address
            info.SecondaryAddresses = []
            info.SecondarySubnetIDs = []
            info.SubnetId = subnet.Id
            owners = [identity.username] + [u for u in info.OwnerUsers if u != identity.username]
            info.OwnerUsers = list(dict.fromkeys(owners))
            info.CreatedOn = ctx.now()
            needed = sum(v.Size for v in info.Volumes)
            try:
                vm = yield self._make_vm(info, identity, {"Phase": "creating"}, needed)
            except BaseException:
                yield ctx.release_addresses([address])
                raise
            new = ctx.table.copy(vm)
            new.VmInfo.Uncommitted = False  # a new address of our own
            yield ctx.table.commit(vm, new)
            progress("initial volume(s) copy")
            yield self.runner.run(self._pull_all, client, ip, token, vm, False, report)
            if source_info.State == State.RUNNING:
                progress("stopping VM")
                reply = yield self.runner.run(
                    client.call, "StopVm", {"AccessToken": codec_b64(token), "IpAddress": ip}
                )
                _checked(reply, "StopVm")
                restart = True
                progress("update volume(s)")
                yield self.runner.run(self._pull_all, client, ip, token, vm, True, report)
            yield self.runner.run(
                self._user_data, client, ip, token, os.path.join(vm.directory, USER_DATA_FILE)
            )
            vm.creating = False
            yield vm.lock.acquire()
            try:
                yield ctx.table.commit_state(vm, State.STOPPED)
                yield self.manager.lifecycle.await_acknowledgement(vm)
            finally:
                vm.lock.release()
            return CopyVmResponse(Final=True, IpAddress=vm.ip)
        except BaseException:
            if vm is not None:
                yield self._remove_target(vm)
            raise
        finally:
            if restart:
                try:
                    yield self.runner.run(
                        client.call,
                        "StartVm",
                        {"AccessToken": codec_b64(token), "IpAddress": ip},
                    )
                except Exception as e:
                    self.log.warn("cannot restart {ip} on the source: {e}", ip=ip, e=e)
            yield self.runner.run(client.close)


def codec_b64(data: bytes) -> str:
    """
    Bytes as Go's JSON encodes C{[]byte}.
    """
    import base64

    return base64.b64encode(data).decode("ascii")


def _read_file_range(path: str, request: ReadVmVolumeRequest) -> Any:
    return read_range(path, request, os.path.getsize(path))


def _tail(path: str, n: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"({e.strerror})"


def _read_record(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(65536))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
