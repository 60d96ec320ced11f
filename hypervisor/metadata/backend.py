# -*- test-case-name: tests.test_metadata_server -*-
"""
The metadata server's decisions: which VM a request is from, its path tree, the
files a path needs (read on the disk threads, never on the reactor thread), IMDSv2
tokens and the trace of requested paths (C{TraceVmMetadata}).

Identity is by network path only: a request belongs to the VM that holds the
request's source address (primary or secondary) I{on the bridge the request came
through} (its namespace); any other source gets 404. Nothing the guest sends (headers,
tokens, paths) can name another VM. See L{hypervisor.metadata.plumbing} for why a
spoofed source address gets nothing useful.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hypervisor.diskio import IBlockingRunner
from hypervisor.metadata.paths import Interface, Tree, VmView, build_tree
from hypervisor.model import Subnet, VmInfo

# A file a path serves is read whole; anything larger is refused (user data in
# SmallStack is bounded far below this).
MAX_FILE_BYTES = 16 * 1024 * 1024
TOKEN_TTL_MIN = 1
TOKEN_TTL_MAX = 21600
MAX_TOKENS_PER_VM = 64
MAX_TRACE_BACKLOG = 1024


def read_files(directory: str, names: tuple[str, ...]) -> dict[str, Optional[bytes]]:
    """
    The files C{names} of C{directory} (None for each one absent); blocking.

    @raise OSError: one is larger than L{MAX_FILE_BYTES} or cannot be read.
    """
    out: dict[str, Optional[bytes]] = {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            out[name] = None
            continue
        if len(data) > MAX_FILE_BYTES:
            raise OSError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
        out[name] = data
    return out


@dataclass
class Token:
    """
    An IMDSv2 session token: bound to the VM (primary IP) it was issued to.
    """

    vm_ip: str
    expires: float


class Tokens:
    """
    IMDSv2 tokens (C{PUT /latest/api/token}), bounded per VM (oldest dropped).
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._tokens: OrderedDict[str, Token] = OrderedDict()
        self._per_vm: dict[str, list[str]] = {}

    def issue(self, vm_ip: str, ttl: int) -> str:
        """
        A new token for the VM, valid for C{ttl} seconds.
        """
        token = base64.urlsafe_b64encode(secrets.token_bytes(30)).decode()
        self._tokens[token] = Token(vm_ip, self.clock.seconds() + ttl)
        mine = self._per_vm.setdefault(vm_ip, [])
        mine.append(token)
        while len(mine) > MAX_TOKENS_PER_VM:
            self._tokens.pop(mine.pop(0), None)
        return token

    def valid(self, token: str, vm_ip: str) -> bool:
        """
        Whether C{token} was issued to this VM and has not expired.
        """
        found = self._tokens.get(token)
        if found is None:
            return False
        if found.expires <= self.clock.seconds():
            self._forget(token)
            return False
        return found.vm_ip == vm_ip

    def _forget(self, token: str) -> None:
        found = self._tokens.pop(token, None)
        if found is not None:
            mine = self._per_vm.get(found.vm_ip, [])
            if token in mine:
                mine.remove(token)

    def drop_vm(self, vm_ip: str) -> None:
        """
        Forget every token of a VM (it is gone).
        """
        for token in self._per_vm.pop(vm_ip, []):
            self._tokens.pop(token, None)


class Trace:
    """
    One C{TraceVmMetadata} subscription: requested paths, pushed to C{deliver};
    C{close} when the VM is destroyed; C{end} (default C{close}) when the server stops.
    """

    def __init__(
        self,
        deliver: Callable[[str], None],
        close: Callable[[], None],
        end: Optional[Callable[[], None]] = None,
    ) -> None:
        self.deliver = deliver
        self.close = close
        self.end = end or close


class MetadataBackend:
    """
    Decisions for the metadata resource, over the manager's read/observer API
    (C{vm_by_address}, C{user_data_path}, C{identity_paths}, C{add_listener}).

    @ivar bridges_of_subnet: subnet id -> bridge, set by the service as it maps
        subnets to bridges (None: no bridge check, for in-memory tests).
    """

    log = Logger()

    def __init__(
        self,
        manager: Any,
        clock: IReactorTime,
        runner: IBlockingRunner,
        *,
        hypervisor_uuid: Callable[[], str] = lambda: "",
        availability_zone: str = "smallstack",
    ) -> None:
        self.manager = manager
        self.clock = clock
        self.runner = runner
        self.hypervisor_uuid = hypervisor_uuid
        self.availability_zone = availability_zone
        self.tokens = Tokens(clock)
        self.bridge_of_subnet: Optional[dict[str, str]] = None
        self._trees: dict[str, tuple[VmView, Tree]] = {}
        self._traces: dict[str, list[Trace]] = {}
        self._listening = False

    # Manager listener --------------------------------------------------------------

    def start(self) -> None:
        """
        Follow the manager's changes.
        """
        if not self._listening:
            self.manager.add_listener(self)
            self._listening = True

    def stop(self) -> None:
        """
        Stop following; close traces.
        """
        if self._listening:
            self.manager.remove_listener(self)
            self._listening = False
        for traces in list(self._traces.values()):
            for trace in list(traces):
                trace.end()
        self._traces.clear()
        self._trees.clear()

    def vm_changed(self, info: VmInfo) -> None:
        """
        Drop the VM's kept tree.
        """
        self._trees.pop(info.Address.IpAddress, None)

    def vm_removed(self, ip: str, info: VmInfo) -> None:
        """
        Drop the VM's tree and tokens; end its traces.
        """
        self._trees.pop(ip, None)
        self.tokens.drop_vm(ip)
        for trace in list(self._traces.pop(ip, [])):
            trace.close()

    def subnets_changed(self, subnets: list[Subnet]) -> None:
        """
        Drop every kept tree (they show subnets).
        """
        self._trees.clear()

    # Identity ------------------------------------------------------------------------

    def _subnet(self, subnet_id: str, ip: str) -> Optional[Subnet]:
        table = self.manager.subnets
        subnet: Optional[Subnet] = table.subnets.get(subnet_id) if subnet_id else None
        if subnet is None:
            subnet = table.subnet_of(ip)
        return subnet

    def identify(self, source: str, bridge: Optional[str] = None) -> Optional[VmInfo]:
        """
        The VM that owns C{source} on C{bridge} (primary or secondary address on a
        subnet carried by that bridge with metadata enabled), or None.
        """
        try:
            info: Optional[VmInfo] = self.manager.vm_by_address(source)
        except ValueError:
            return None
        if info is None:
            return None
        if bridge is None or self.bridge_of_subnet is None:
            return info
        for interface in self.view(info).interfaces:
            if interface.ip == source:
                subnet = interface.subnet
                if subnet is None or subnet.DisableMetadata:
                    return None
                if self.bridge_of_subnet.get(subnet.Id) == bridge:
                    return info
        return None

    def view(self, info: VmInfo) -> VmView:
        """
        The VM as the path tree sees it.
        """
        return self.tree(info)[0]

    def tree(self, info: VmInfo) -> tuple[VmView, Tree]:
        """
        The VM's path tree, kept until the VM or the subnets change.
        """
        ip = info.Address.IpAddress
        kept = self._trees.get(ip)
        if kept is not None and kept[0].info is info:
            return kept
        interfaces = [Interface(0, info.Address.MacAddress, ip, self._subnet(info.SubnetId, ip))]
        for index, address in enumerate(info.SecondaryAddresses):
            subnet_id = (
                info.SecondarySubnetIDs[index] if index < len(info.SecondarySubnetIDs) else ""
            )
            interfaces.append(
                Interface(
                    index + 1,
                    address.MacAddress,
                    address.IpAddress,
                    self._subnet(subnet_id, address.IpAddress) if address.IpAddress else None,
                )
            )
        view = VmView(
            info,
            tuple(interfaces),
            hypervisor_uuid=self.hypervisor_uuid(),
            availability_zone=self.availability_zone,
        )
        kept = (view, build_tree(view))
        self._trees[ip] = kept
        return kept

    def read(self, info: VmInfo, names: tuple[str, ...]) -> "Deferred[dict[str, Optional[bytes]]]":
        """
        Read the VM's files C{names} on the disk threads.
        """
        directory = os.path.dirname(self.manager.user_data_path(info.Address.IpAddress))
        return self.runner.run(read_files, directory, names)

    # Tracing ---------------------------------------------------------------------------

    def trace(self, vm_ip: str, trace: Trace) -> Callable[[], None]:
        """
        Subscribe C{trace} to the VM's requested paths; returns the unsubscriber.
        """
        self._traces.setdefault(vm_ip, []).append(trace)

        def cancel() -> None:
            traces = self._traces.get(vm_ip, [])
            if trace in traces:
                traces.remove(trace)
            if not traces:
                self._traces.pop(vm_ip, None)

        return cancel

    def requested(self, vm_ip: str, path: str) -> None:
        """
        Tell the VM's traces about a requested path.
        """
        for trace in list(self._traces.get(vm_ip, ())):
            trace.deliver(path)
