"""
Tests for L{hypervisor.store}: atomic writes, crash safety, the state directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from hypervisor import store
from tests.support import REPO


class AtomicWriteTests(SynchronousTestCase):
    """
    Tests for L{store.atomic_write}.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)
        self.path = os.path.join(self.dir, "info.json")

    def test_replaces_content_and_mode(self) -> None:
        """
        The file gets the new bytes and the requested mode; no temporary file remains.
        """
        store.atomic_write(self.path, b"old")
        store.atomic_write(self.path, b"new", mode=0o600)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"new")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.dir), ["info.json"])

    def test_crash_before_rename_keeps_old_content(self) -> None:
        """
        A process killed between writing the temporary file and renaming it leaves the
        old content readable; the leftover temporary file is removed by
        L{store.clean_temp_files}.
        """
        store.atomic_write(self.path, b"old content")
        code = (
            "import os, sys; from hypervisor import store; "
            "store.atomic_write(sys.argv[1], b'new content', "
            "_before_rename=lambda tmp: os._exit(3))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code, self.path], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO)
        )
        self.assertEqual(result.returncode, 3)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old content")
        leftovers = [n for n in os.listdir(self.dir) if n != "info.json"]
        self.assertEqual(len(leftovers), 1)
        with open(os.path.join(self.dir, leftovers[0]), "rb") as f:
            self.assertEqual(f.read(), b"new content")
        removed = store.clean_temp_files(self.dir)
        self.assertEqual(removed, [os.path.join(self.dir, leftovers[0])])
        self.assertEqual(os.listdir(self.dir), ["info.json"])

    def test_failure_leaves_target_and_no_temp(self) -> None:
        """
        An exception during the write leaves the target unchanged and no temp file.
        """
        store.atomic_write(self.path, b"old")

        def fail(tmp: str) -> None:
            raise OSError("disk full")

        self.assertRaises(OSError, store.atomic_write, self.path, b"new", _before_rename=fail)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"old")
        self.assertEqual(os.listdir(self.dir), ["info.json"])

    def test_clean_ignores_ordinary_files(self) -> None:
        """
        Only our C{.<name>.tmp-*} files are removed, in subdirectories too.
        """
        os.makedirs(os.path.join(self.dir, "VMs", "10.0.0.2"))
        keep = [os.path.join(self.dir, "notes.tmp-1"), os.path.join(self.dir, ".hidden")]
        gone = os.path.join(self.dir, "VMs", "10.0.0.2", ".info.json.tmp-abcd")
        for p in keep + [gone]:
            open(p, "w").close()
        self.assertEqual(store.clean_temp_files(self.dir), [gone])
        for p in keep:
            self.assertTrue(os.path.exists(p))


class StateDirectoryTests(SynchronousTestCase):
    """
    Tests for L{store.StateDirectory}.
    """

    def setUp(self) -> None:
        self.parent = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.parent)
        self.path = os.path.join(self.parent, "state")

    def make(self) -> store.StateDirectory:
        state = store.StateDirectory(self.path)
        self.addCleanup(state.unlock)
        return state

    def test_prepare_creates_layout(self) -> None:
        """
        prepare creates the directory (0755), VMs/, uuid and a private root cookie.
        """
        state = self.make()
        state.prepare()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o755)
        self.assertTrue(os.path.isdir(os.path.join(self.path, "VMs")))
        with open(os.path.join(self.path, "uuid")) as f:
            text = f.read()
        self.assertRegex(text, r"^[0-9a-f]{32}\n$")
        self.assertEqual(state.uuid, text.strip())
        st = os.stat(state.root_cookie_path)
        self.assertEqual(st.st_size, 32)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)

    def test_uuid_once_cookie_each_start(self) -> None:
        """
        The uuid survives restarts; the root cookie is new at each start and removed on
        stop.
        """
        first = self.make()
        first.prepare()
        with open(first.root_cookie_path, "rb") as f:
            cookie1 = f.read()
        first.remove_root_cookie()
        self.assertFalse(os.path.exists(first.root_cookie_path))
        first.unlock()
        second = self.make()
        second.prepare()
        with open(second.root_cookie_path, "rb") as f:
            cookie2 = f.read()
        self.assertEqual(first.uuid, second.uuid)
        self.assertNotEqual(cookie1, cookie2)

    def test_prepare_cleans_leftovers(self) -> None:
        """
        Temporary files left by a crash are removed at start and reported.
        """
        os.makedirs(os.path.join(self.path, "VMs"))
        leftover = os.path.join(self.path, ".address-pool.json.tmp-0000")
        open(leftover, "w").close()
        self.assertEqual(self.make().prepare(), [leftover])
        self.assertFalse(os.path.exists(leftover))

    def test_stale_control_socket_removed(self) -> None:
        """
        A control socket left by a killed daemon is removed at start (the lock proves
        no daemon owns it).
        """
        import socket

        os.makedirs(self.path)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(os.path.join(self.path, "control"))
        stale.close()
        removed = self.make().prepare()
        self.assertIn(os.path.join(self.path, "control"), removed)
        self.assertFalse(os.path.exists(os.path.join(self.path, "control")))

    def test_second_daemon_refused(self) -> None:
        """
        A second user of the same state directory is refused with a clear message.
        """
        self.make().prepare()
        e = self.assertRaises(store.StateDirectoryError, self.make().prepare)
        self.assertIn("in use by another hypervisor", str(e))

    def test_corrupt_uuid_refused(self) -> None:
        """
        A uuid file with garbage is not silently replaced (the identity would change).
        """
        os.makedirs(self.path)
        with open(os.path.join(self.path, "uuid"), "w") as f:
            f.write("not-a-uuid\n")
        e = self.assertRaises(store.StateDirectoryError, self.make().prepare)
        self.assertIn("not a 32-hex-digit UUID", str(e))

    def test_uncreatable_directory(self) -> None:
        """
        A state directory that cannot be created is a clear error naming it.
        """
        blocker = os.path.join(self.parent, "file")
        open(blocker, "w").close()
        state = store.StateDirectory(os.path.join(blocker, "state"))
        e = self.assertRaises(store.StateDirectoryError, state.prepare)
        self.assertIn("cannot create state directory", str(e))

    def test_disabled_marker(self) -> None:
        """
        set_disabled creates and removes the C{disabled} marker.
        """
        state = self.make()
        state.prepare()
        self.assertFalse(state.disabled)
        state.set_disabled(True)
        self.assertTrue(os.path.exists(os.path.join(self.path, "disabled")))
        self.assertTrue(state.disabled)
        state.set_disabled(False)
        self.assertFalse(state.disabled)
