# -*- test-case-name: tests.test_store -*-
"""
The state directory (C{-stateDir}, default C{/var/lib/hypervisor}) in the Go
hypervisor's layout, and the one way every state file is written: atomically.

Layout (reference §8)::

    uuid                    32 hex characters and a newline, created once
    root-cookie             32 random bytes, mode 0600, new at each start, removed on stop
    disabled                empty marker: VM creation and starts are refused
    control                 unix socket for ``hypervisor stop`` (mode 0600)
    address-pool.json, subnets.json, dynamic-leases.json
    VMs/<IP>/info.json ...

An atomic write puts the bytes in a temporary file in the same directory (named
C{.<name>.tmp-<random>}), fsyncs it, renames it over the target and fsyncs the
directory, so a crash at any moment leaves either the old or the new content. A
temporary file left by a crash is ignored by readers and removed at start.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
from typing import Callable, Optional, Sequence

TEMP_INFIX = ".tmp-"
UUID_FILE = "uuid"
ROOT_COOKIE_FILE = "root-cookie"
DISABLED_FILE = "disabled"
CONTROL_SOCKET = "control"
LOCK_FILE = ".lock"
VMS_DIRECTORY = "VMs"


class StateDirectoryError(Exception):
    """
    The state directory cannot be used (not creatable, locked by another daemon...).
    """


def _is_temp_name(name: str) -> bool:
    return name.startswith(".") and TEMP_INFIX in name


def fsync_directory(path: str) -> None:
    """
    Flush a directory's entries (a rename or unlink in it) to disk.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str,
    data: bytes,
    mode: int = 0o644,
    *,
    sync_directory: bool = True,
    _before_rename: Optional[Callable[[str], None]] = None,
) -> None:
    """
    Replace the file at C{path} with C{data} so that a crash leaves old or new content.

    @param mode: permissions of the new file (set before any byte is written, so a
        private file is never readable by others, even briefly).
    @param sync_directory: fsync the directory after the rename (the new content is
        then durable when this returns); L{atomic_write_many} passes C{False} and syncs
        each directory once for all its files.
    @param _before_rename: test hook called with the temporary file's path after it
        is written and synced, before the rename.
    @raise OSError: the write failed; the target is unchanged and no temporary file
        is left behind.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(directory, f".{name}{TEMP_INFIX}{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if _before_rename is not None:
            _before_rename(temp)
        os.rename(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    if sync_directory:
        fsync_directory(directory)


def remove_file(path: str, sync_directory: bool = True) -> bool:
    """
    Remove a file durably (unless C{sync_directory} is false: the caller syncs the
    directory); return whether it existed.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    if sync_directory:
        fsync_directory(os.path.dirname(os.path.abspath(path)))
    return True


def atomic_write_many(files: Sequence[tuple[str, Optional[bytes], int]]) -> None:
    """
    Write (or, where the data is C{None}, remove) several files, each as
    L{atomic_write} does, in order, then fsync each of their directories once:
    one directory flush for a group of files instead of one per file. Each file on
    its own still holds its old or its new content after a crash; the group as a
    whole is not atomic (a crash may keep some files new and others old), so callers
    group only files whose order does not matter.

    @raise OSError: the first failure; files written before it are new (and their
        directories synced), the failing one and those after it are unchanged.
    """
    directories: dict[str, None] = {}
    try:
        for path, data, mode in files:
            if data is None:
                remove_file(path, sync_directory=False)
            else:
                atomic_write(path, data, mode, sync_directory=False)
            directories[os.path.dirname(os.path.abspath(path))] = None
    finally:
        for directory in directories:
            fsync_directory(directory)


def clean_temp_files(root: str) -> list[str]:
    """
    Remove temporary files left by interrupted atomic writes anywhere under C{root}.

    @return: the paths removed.
    """
    removed = []
    for directory, _, files in os.walk(root):
        for name in files:
            if _is_temp_name(name):
                path = os.path.join(directory, name)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
    return removed


class StateDirectory:
    """
    The daemon's state directory: paths, the lock, and the small files of reference §8.

    @ivar path: the directory.
    @ivar uuid: this hypervisor's UUID (32 hex digits), valid after L{prepare}.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.uuid = ""
        self._lock_fd: Optional[int] = None

    def join(self, *parts: str) -> str:
        """
        Return a path inside the state directory.
        """
        return os.path.join(self.path, *parts)

    @property
    def control_path(self) -> str:
        """
        The control socket's path.
        """
        return self.join(CONTROL_SOCKET)

    @property
    def root_cookie_path(self) -> str:
        """
        The root cookie's path (returned by GetRootCookiePath).
        """
        return self.join(ROOT_COOKIE_FILE)

    @property
    def vms_path(self) -> str:
        """
        The directory holding one C{<IP>/} directory per VM.
        """
        return self.join(VMS_DIRECTORY)

    def prepare(self) -> list[str]:
        """
        Create the directory (0755), take its lock, remove leftover temporary files
        and a stale control socket, create C{uuid} once and write a new
        C{root-cookie}.

        @return: the leftover files that were removed.
        @raise StateDirectoryError: the directory cannot be used; the message says
            why and what to do.
        """
        try:
            os.makedirs(self.path, mode=0o755, exist_ok=True)
            os.makedirs(self.vms_path, mode=0o755, exist_ok=True)
        except OSError as e:
            raise StateDirectoryError(
                f"cannot create state directory {self.path}: {e.strerror}; "
                "choose another with -stateDir or fix its permissions"
            ) from e
        self.lock()
        removed = clean_temp_files(self.path)
        # We hold the lock, so a control socket here is a dead daemon's (SIGKILL).
        if os.path.exists(self.control_path) or os.path.islink(self.control_path):
            os.unlink(self.control_path)
            removed.append(self.control_path)
        self.uuid = self._ensure_uuid()
        atomic_write(self.root_cookie_path, secrets.token_bytes(32), mode=0o600)
        return removed

    def lock(self) -> None:
        """
        Take the state directory's exclusive lock, so two daemons never share it.

        @raise StateDirectoryError: another process holds it.
        """
        if self._lock_fd is not None:
            return
        path = self.join(LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise StateDirectoryError(
                    f"state directory {self.path} is in use by another hypervisor "
                    "daemon; stop it first (hypervisor stop) or use another -stateDir"
                ) from e
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        """
        Release the lock taken by L{lock}.
        """
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _ensure_uuid(self) -> str:
        path = self.join(UUID_FILE)
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except FileNotFoundError:
            text = ""
        except (OSError, UnicodeDecodeError) as e:
            raise StateDirectoryError(f"cannot read {path}: {e}") from e
        if len(text) == 32 and all(c in "0123456789abcdef" for c in text):
            return text
        if text:
            raise StateDirectoryError(
                f"{path} holds {text[:40]!r}, not a 32-hex-digit UUID; "
                "restore it from a backup or delete it to make a new one"
            )
        value = secrets.token_hex(16)
        atomic_write(path, (value + "\n").encode("ascii"))
        return value

    def remove_root_cookie(self) -> None:
        """
        Remove the root cookie (done when the daemon stops).
        """
        remove_file(self.root_cookie_path)

    @property
    def disabled(self) -> bool:
        """
        Whether the C{disabled} marker exists (VM creation and starts are refused).
        """
        return os.path.exists(self.join(DISABLED_FILE))

    def set_disabled(self, disabled: bool) -> None:
        """
        Create or remove the C{disabled} marker, durably.
        """
        path = self.join(DISABLED_FILE)
        if disabled:
            if not os.path.exists(path):
                atomic_write(path, b"")
        else:
            remove_file(path)
