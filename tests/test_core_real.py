"""
The core's failure paths (issue 8; issue 9 finding 5) against the real daemon
(C{python -m hypervisor ... run}, a subprocess with TLS) and the real libvirtd
(C{qemu:///system}, C{-domainType=qemu}), driven from the outside over HTTPS with
client certificates:

- libvirtd killed: StartVm and CreateVm answer 503 with a sentence and change
  nothing; once libvirtd is back and the daemon reconnected, they work;
- C{TMPDIR} on a 4 MiB tmpfs: a 64 MiB and a 1 GiB image upload each create a VM
  whose root volume holds exactly the uploaded bytes, and nothing is spooled to
  C{TMPDIR};
- the daemon SIGKILLed in the middle of an upload: after the restart the
  half-created VM is gone, its address free, C{check-vms} clean;
- the daemon SIGKILLed before a new VM was acknowledged: after the restart the VM
  is destroyed about the acknowledge timeout later, unless acknowledged then.

Subnet C{hvtest} (bridge C{br@hvtest}) on 10.81.<n>.0/24, one /24 per test.
Slow ones, within the CI budget: the acknowledge test (about 25 s: it waits out
the 15 s acknowledge timeout after a restart), the SIGKILL-mid-upload test (about
8 s) and the 1 GiB upload (about 10 s).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any, Iterator

from twisted.trial.unittest import SynchronousTestCase

from tests import realrpc, support
from tests.realrpc import MiB

ACKNOWLEDGE_TIMEOUT = 15.0


def empty_vm(start: bool = False, **extra: Any) -> dict[str, Any]:
    """
    A CreateVm request for a small VM with an empty 1 MiB root volume.
    """
    request: dict[str, Any] = {
        "MemoryInMiB": 32,
        "MilliCPUs": 10,
        "SubnetId": "hvtest",
        "MinimumFreeBytes": MiB,
        "DoNotStart": not start,
    }
    request.update(extra)
    return request


def mount_tmpfs(testcase: SynchronousTestCase, size: str) -> str:
    """
    A fresh tmpfs of C{size} on a temporary directory, unmounted in cleanup.
    """
    path = tempfile.mkdtemp(prefix="hv-tmpfs-")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    support.require(result.returncode == 0, f"cannot mount a tmpfs: {result.stderr}")

    def unmount() -> None:
        subprocess.run(["umount", "-l", path], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)

    testcase.addCleanup(unmount)
    return path


def used_bytes(path: str) -> int:
    """
    Bytes in use on the file system of C{path}.
    """
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


class CoreRealTests(SynchronousTestCase):
    """
    The real daemon on the real libvirtd, seen from the outside.
    """

    def setUp(self) -> None:
        support.require_libvirtd()
        support.ensure_bridge()

    def daemon(self, prefix: str, **kwargs: Any) -> realrpc.TlsDaemon:
        """
        A TLS daemon (users admin and alice) on TCG whose domains on C{prefix}.0/24
        are destroyed in cleanup.
        """
        d = realrpc.TlsDaemon(self, {"admin": "*.*", "alice": ""}, "-domainType=qemu", **kwargs)
        self.addCleanup(realrpc.destroy_domains, prefix, d.dir)
        return d

    def assert_no_traceback(self, d: realrpc.TlsDaemon) -> None:
        """
        The daemon logged no traceback.
        """
        excerpt = realrpc.traceback_excerpt(d)
        if excerpt:
            self.fail(f"the daemon logged a traceback: {excerpt}")

    def test_libvirtd_down_answers_503_and_changes_nothing(self) -> None:
        """
        With libvirtd killed, StartVm of a stopped VM and CreateVm (empty root, and
        with an uploaded image) answer 503 with a sentence saying libvirt is not
        connected and nothing was changed; GetVmInfo, info.json, the address pool,
        the VM and volume directories are byte for byte as before. Once libvirtd is
        back and C{/healthz} says the daemon reconnected, both work.
        """
        d = self.daemon("10.81.1")
        d.start(healthy=True)
        d.setup_network("10.81.1", 2, 0x81)
        created = d.call("CreateVm", empty_vm())
        self.assertEqual(created.status, 200, created)
        ip = created.last["IpAddress"]
        self.assertEqual(d.call("AcknowledgeVm", {"IpAddress": ip}).status, 200)
        info_path = os.path.join(d.state_dir, "VMs", ip, "info.json")

        def view() -> tuple[Any, ...]:
            with open(info_path, "rb") as f:
                info = f.read()
            vm = d.call("GetVmInfo", {"IpAddress": ip})
            return (
                vm.status,
                vm.last.get("VmInfo"),
                info,
                d.read_state("address-pool.json"),
                d.vm_dirs(),
                d.volume_entries(),
                sorted(os.listdir(os.path.join(d.volumes, ip))),
            )

        before = view()
        self.assertEqual(before[1]["State"], "stopped")
        self.addCleanup(support.start_libvirtd)
        support.kill_libvirtd()
        support.wait_for(lambda: d.healthz() == 503, 30, "/healthz 503")
        started = d.call("StartVm", {"IpAddress": ip})
        self.assertEqual(started.status, 503, started)
        self.assertIn("not connected to libvirt", started.error)
        self.assertIn("nothing was changed", started.error)
        refused = d.call("CreateVm", empty_vm(start=True))
        self.assertEqual(refused.status, 503, refused)
        self.assertIn("not connected to libvirt", refused.error)
        image = os.urandom(2 * MiB)
        line = json.dumps(empty_vm(start=True, ImageDataSize=len(image))).encode() + b"\n"
        uploaded = realrpc.stream_call(d, "CreateVm", line, [image], len(line) + len(image))
        self.assertEqual(uploaded.status, 503, uploaded)
        self.assertIn("not connected to libvirt", uploaded.error)
        self.assertEqual(view(), before)
        support.start_libvirtd()
        support.wait_for(lambda: d.healthz() == 200, 60, "/healthz 200 after libvirtd")
        started = d.call("StartVm", {"IpAddress": ip})
        self.assertEqual(started.status, 200, started)
        self.assertEqual(d.call("GetVmInfo", {"IpAddress": ip}).last["VmInfo"]["State"], "running")
        created = d.call("CreateVm", empty_vm(start=True))
        self.assertEqual(created.status, 200, created)
        other = created.last["IpAddress"]
        self.assertEqual(d.call("AcknowledgeVm", {"IpAddress": other}).status, 200)
        self.assertEqual(
            sorted(name for name, active in realrpc.subnet_domains("10.81.1") if active),
            [f"vm-{ip}", f"vm-{other}"],
        )
        for address in (ip, other):
            self.assertEqual(d.call("DestroyVm", {"IpAddress": address}).status, 200)
        self.assertEqual(realrpc.subnet_domains("10.81.1"), [])
        self.assert_no_traceback(d)

    def upload_with_small_tmpdir(self, prefix: str, size: int, piece: int) -> float:
        """
        A daemon whose TMPDIR is a 4 MiB tmpfs gets a CreateVm with C{size} bytes
        of image streamed over TLS in pieces of C{piece} bytes (random, hashed as
        sent); the image cache holds exactly those bytes (SHA-256 of its file, which
        the VM's root is an overlay on) and nothing was written to TMPDIR (sampled
        after every piece). Returns the upload's seconds.
        """
        import hashlib

        tmp = mount_tmpfs(self, "4m")
        d = self.daemon(prefix, env={"TMPDIR": tmp})
        d.start(healthy=True)
        d.setup_network(prefix, 1, 0x82)
        line = json.dumps(empty_vm(ImageDataSize=size, MinimumFreeBytes=0)).encode() + b"\n"
        baseline = used_bytes(tmp)
        peak = [0]
        digest = hashlib.sha256()
        block = os.urandom(piece)

        def pieces() -> Iterator[bytes]:
            for i in range(size // piece):
                data = block[i % piece :] + block[: i % piece]  # no two pieces alike
                digest.update(data)
                yield data
                peak[0] = max(peak[0], used_bytes(tmp) - baseline)

        began = time.monotonic()
        reply = realrpc.stream_call(d, "CreateVm", line, pieces(), len(line) + size)
        elapsed = time.monotonic() - began
        self.assertEqual(reply.status, 200, reply)
        self.assertTrue(reply.last.get("Final"), reply)
        ip = reply.last["IpAddress"]
        self.assertEqual(d.call("AcknowledgeVm", {"IpAddress": ip}).status, 200)
        with open(os.path.join(d.state_dir, "VMs", ip, "info.json")) as f:
            root = json.load(f)["VolumeLocations"][0]["Filename"]
        self.assertTrue(root.startswith(d.volumes), root)
        # The bytes are in the image cache (by default beside the volume directory),
        # named by their SHA-256, and the root is a qcow2 overlay on them.
        from hypervisor.manager.images import qcow2_backing_file

        held = qcow2_backing_file(root)
        self.assertEqual(
            held,
            os.path.join(os.path.dirname(d.volumes), "objectcache", "images", digest.hexdigest()),
        )
        self.assertGreaterEqual(os.path.getsize(held), size)
        self.assertEqual(realrpc.file_sha256(held, size), digest.hexdigest())
        self.assertEqual(peak[0], 0, f"{peak[0]} bytes appeared in TMPDIR")
        self.assertEqual(os.listdir(tmp), [])
        self.assert_no_traceback(d)
        return elapsed

    def test_upload_with_tmpdir_of_4_mib(self) -> None:
        """
        A daemon whose TMPDIR is a 4 MiB tmpfs accepts a 64 MiB image upload with
        CreateVm (streamed in 1 MiB pieces); the image cache holds exactly those
        bytes (the VM's root an overlay on them), and nothing was written to TMPDIR
        meanwhile.
        """
        self.upload_with_small_tmpdir("10.81.2", 64 * MiB, MiB)

    def test_upload_of_1_gib_with_tmpdir_of_4_mib(self) -> None:
        """
        Issue 8's figure: a daemon whose TMPDIR holds 4 MiB accepts a 1 GiB image
        upload (4 MiB pieces; about 6 s here, 10 s with the hashing), bytes intact,
        nothing in TMPDIR. (Slow-ish: 1 GiB written to the image cache.)
        """
        self.upload_with_small_tmpdir("10.81.5", 1024 * MiB, 4 * MiB)

    def test_sigkill_during_upload_removes_the_creation(self) -> None:
        """
        Issue 9 finding 5: the daemon is SIGKILLed while CreateVm copies a 512 MiB
        upload into the root volume (once the file exists and grows). The VM is then
        marked as being created (C{pending.json}); after the restart it is gone:
        GetVmInfo 404, no C{VMs/<IP>} and no volume directory, its address free (and
        given to the next VM), and after a clean stop C{hypervisor check-vms} finds
        nothing wrong.
        """
        d = self.daemon("10.81.3")
        d.start(healthy=True)
        [ip] = d.setup_network("10.81.3", 1, 0x83)
        size = 512 * MiB
        line = (
            json.dumps(empty_vm(start=True, ImageDataSize=size, MinimumFreeBytes=0)).encode()
            + b"\n"
        )
        root = os.path.join(d.volumes, ip, "root")
        # With the image cache (by default beside the volume directory) the upload is
        # written into its partial/ (the root is then an overlay on it); without, into
        # the root: the kill comes once whichever it is grows.
        partial = os.path.join(os.path.dirname(d.volumes), "objectcache", "partial")
        piece = os.urandom(4 * MiB)
        seen: dict[str, Any] = {"killed": False, "sizes": []}

        def written() -> int:
            paths = [root] + [os.path.join(partial, n) for n in _listdir(partial)]
            sizes = [os.path.getsize(p) for p in paths if os.path.isfile(p)]
            return max(sizes, default=-1)

        def pieces() -> Iterator[bytes]:
            for _ in range(size // len(piece)):
                yield piece
                time.sleep(0.01)
                current = written()
                sizes = seen["sizes"]
                sizes.append(current)
                if len(sizes) >= 2 and 16 * MiB <= sizes[-2] < current:
                    with open(os.path.join(d.state_dir, "VMs", ip, "pending.json")) as f:
                        seen["pending"] = json.load(f)
                    d.kill()
                    seen["killed"] = True
                    seen["at"] = current
                    return

        reply = realrpc.stream_call(d, "CreateVm", line, pieces(), len(line) + size, timeout=60)
        self.assertTrue(seen["killed"], f"never killed: sizes {seen['sizes']}, {reply}")
        self.assertIsNone(reply.status, reply)
        self.assertLess(seen["at"], size)
        self.assertEqual(seen["pending"].get("Phase"), "creating")
        d.start(healthy=True)
        support.wait_for(lambda: ip not in d.vm_dirs(), 30, "the creation to be removed")
        missing = d.call("GetVmInfo", {"IpAddress": ip})
        self.assertEqual(missing.status, 404, missing)
        self.assertFalse(os.path.exists(os.path.join(d.volumes, ip)))
        self.assertEqual(d.volume_entries(), [])
        support.wait_for(lambda: _listdir(partial) == [], 30, "the cache's partial/ emptied")
        self.assertEqual(d.free_addresses(), [ip])
        self.assertEqual(realrpc.subnet_domains("10.81.3"), [])
        again = d.call("CreateVm", empty_vm())
        self.assertEqual(again.status, 200, again)
        self.assertEqual(again.last["IpAddress"], ip)
        self.assertEqual(d.call("DestroyVm", {"IpAddress": ip}).status, 200)
        d.stop()
        check = d.command("check-vms")
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertIn("interrupted", d.log_text())
        self.assert_no_traceback(d)

    def test_unacknowledged_vm_destroyed_after_restart(self) -> None:
        """
        Two VMs are created and not acknowledged (A started, B not); the daemon is
        SIGKILLed within the acknowledge timeout and restarted. B, acknowledged right
        after the restart, stays; A is destroyed (domain, files, address) about the
        acknowledge timeout (15 s) after the restart — not at once, not never.
        """
        d = self.daemon("10.81.4")
        d.start(healthy=True)
        d.setup_network("10.81.4", 2, 0x84)
        first = time.monotonic()
        a = d.call("CreateVm", empty_vm(start=True))
        b = d.call("CreateVm", empty_vm())
        self.assertEqual((a.status, b.status), (200, 200), (a, b))
        ip_a, ip_b = a.last["IpAddress"], b.last["IpAddress"]
        for ip in (ip_a, ip_b):
            with open(os.path.join(d.state_dir, "VMs", ip, "pending.json")) as f:
                self.assertEqual(json.load(f)["Phase"], "acknowledge")
        d.kill()
        self.assertLess(time.monotonic() - first, ACKNOWLEDGE_TIMEOUT - 3)
        self.assertEqual(realrpc.subnet_domains("10.81.4"), [(f"vm-{ip_a}", True)])
        before_start = time.monotonic()
        d.start(healthy=True)
        after_start = time.monotonic()
        acked = d.call("AcknowledgeVm", {"IpAddress": ip_b})
        self.assertEqual(acked.status, 200, acked)
        self.assertEqual(d.call("GetVmInfo", {"IpAddress": ip_a}).status, 200)
        support.wait_for(
            lambda: d.call("GetVmInfo", {"IpAddress": ip_a}).status == 404,
            ACKNOWLEDGE_TIMEOUT + 20,
            "the unacknowledged VM to go",
            interval=0.25,
        )
        gone = time.monotonic()
        self.assertGreaterEqual(gone - before_start, ACKNOWLEDGE_TIMEOUT - 1)
        self.assertLessEqual(gone - after_start, ACKNOWLEDGE_TIMEOUT + 10)
        support.wait_for(lambda: ip_a not in d.vm_dirs(), 10, "A's directory to go")
        self.assertEqual(realrpc.subnet_domains("10.81.4"), [])
        self.assertEqual(d.free_addresses(), [ip_a])
        self.assertEqual(d.vm_dirs(), [ip_b])
        time.sleep(2)
        kept = d.call("GetVmInfo", {"IpAddress": ip_b})
        self.assertEqual(kept.status, 200, kept)
        self.assertFalse(os.path.exists(os.path.join(d.state_dir, "VMs", ip_b, "pending.json")))
        d.stop()
        check = d.command("check-vms")
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assert_no_traceback(d)


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
