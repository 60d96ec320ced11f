# -*- test-case-name: tests.test_volume_ops -*-
"""
User data (reference §1.4): ReplaceVmUserData (the bytes follow the request and go
straight to C{user-data.raw.new} on a disk thread; the old copy becomes
C{user-data.raw.old}), GetVmUserData, RestoreVmUserData, DiscardVmOldUserData.
Under the VM's lock, any state (the metadata server reads the current file).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from twisted.internet.defer import inlineCallbacks

from hypervisor.auth import Identity
from hypervisor.errors import InvalidRequest, NotFound
from hypervisor.manager import images
from hypervisor.manager.context import ManagerContext
from hypervisor.manager.state import USER_DATA_FILE
from hypervisor.upload import UploadStream, write_to_file

MAX_USER_DATA = 64 * 1024 * 1024


def _install(new: str, current: str, keep_old: bool) -> None:
    """
    C{new} becomes C{current}; the previous current becomes C{.old} (if any).
    """
    from hypervisor.store import fsync_directory

    if keep_old and os.path.exists(current):
        os.replace(current, current + ".old")
    os.replace(new, current)
    fsync_directory(os.path.dirname(current))


def _restore(current: str) -> None:
    from hypervisor.store import fsync_directory

    if not os.path.exists(current + ".old"):
        raise NotFound("no old user data")
    os.replace(current + ".old", current)
    fsync_directory(os.path.dirname(current))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_USER_DATA + 1)
    except FileNotFoundError:
        return b""


class UserData:
    """
    The user data methods.
    """

    def __init__(self, ctx: ManagerContext) -> None:
        self.ctx = ctx

    def _path(self, identity: Identity, ip: str, method: str) -> Any:
        vm = self.ctx.table.get(ip)
        self.ctx.check_owner(vm, identity, method)
        return vm, os.path.join(vm.directory, USER_DATA_FILE)

    def replace(
        self, identity: Identity, ip: str, size: int, upload: Optional[UploadStream]
    ) -> Any:
        """
        ReplaceVmUserData: C{size} bytes from C{upload}.
        """
        if size > MAX_USER_DATA:
            raise InvalidRequest(f"Size {size} is over the {MAX_USER_DATA}-byte limit")
        if size and (upload is None or upload.length != size):
            raise InvalidRequest("Size announces data that did not come with the request")
        vm, path = self._path(identity, ip, "ReplaceVmUserData")
        ctx = self.ctx

        @inlineCallbacks
        def run() -> Any:
            ctx.table.get(ip)
            new = path + ".new"
            try:
                if upload is not None and size:
                    yield write_to_file(upload, size, new, ctx.runner, mode=0o600)
                else:
                    yield ctx.writer.write(new, b"", mode=0o600)
                yield ctx.runner.run(_install, new, path, True)
            except BaseException:
                if upload is not None:
                    upload.discard()
                yield ctx.runner.run(images.remove_file, new)
                raise

        return vm.lock.run(run)

    @inlineCallbacks
    def get(self, identity: Identity, ip: str) -> Any:
        """
        GetVmUserData: the bytes (empty when there are none).
        """
        _, path = self._path(identity, ip, "GetVmUserData")
        data = yield self.ctx.runner.run(_read, path)
        return data

    def restore(self, identity: Identity, ip: str) -> Any:
        """
        RestoreVmUserData: C{.old} back to current.
        """
        vm, path = self._path(identity, ip, "RestoreVmUserData")
        return vm.lock.run(self.ctx.runner.run, _restore, path)

    def discard_old(self, identity: Identity, ip: str) -> Any:
        """
        DiscardVmOldUserData: remove C{.old}.
        """
        vm, path = self._path(identity, ip, "DiscardVmOldUserData")
        return vm.lock.run(self.ctx.runner.run, images.remove_file, path + ".old")
