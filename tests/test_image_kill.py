"""
The real daemon killed (SIGKILL) while it downloads an image, copies one into the
cache, and snapshots a volume; started again on the same directories: no half
volume adopted, nothing left in the cache's partial/, no VM or address leaked, the
cache index consistent, the interrupted snapshot gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests import support
from tests.realrpc import TlsDaemon

MiB = 1024 * 1024

# An HTTP server that announces 256 MiB, sends 4 MiB, then stalls.
STALLING_SERVER = r"""
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(256 << 20))
        self.end_headers()
        block = bytearray(1 << 20)
        block[510:512] = b"\x55\xaa"
        for _ in range(4):
            self.wfile.write(block)
        self.wfile.flush()
        time.sleep(600)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
server.serve_forever()
"""


class KilledDuringImageWorkTests(SynchronousTestCase):
    def setUp(self) -> None:
        support.ensure_bridge()
        self.daemon = TlsDaemon(
            self,
            {"admin": "*.*"},
            "-libvirtUri=test:///default",
            "-domainType=qemu",
        )
        self.images = os.path.join(self.daemon.dir, "images")
        os.makedirs(self.images)
        self.daemon.flags.append(f"-localImagesDirectory={self.images}")
        self.daemon.start(healthy=True)
        self.ips = self.daemon.setup_network("10.79.0", 4, 0x4F)
        self.cache = os.path.join(self.daemon.dir, "objectcache")

    def free(self) -> list[str]:
        with open(os.path.join(self.daemon.state_dir, "address-pool.json")) as f:
            return sorted(a["IpAddress"] for a in json.load(f)["Free"])

    def call_in_background(self, method: str, body: Any) -> threading.Thread:
        thread = threading.Thread(target=self.daemon.call, args=(method, body), daemon=True)
        thread.start()
        return thread

    def wait_for_file(self, directory: str, predicate: Any, what: str) -> str:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                for name in os.listdir(directory):
                    path = os.path.join(directory, name)
                    if predicate(name, path):
                        return path
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}")

    def kill_and_restart(self) -> None:
        self.daemon.kill()
        self.daemon.start(healthy=True)

    def assert_nothing_left(self, free: list[str]) -> None:
        self.assertEqual(os.listdir(os.path.join(self.cache, "partial")), [])
        self.assertEqual(self.daemon.vm_dirs(), [])
        self.assertEqual(self.daemon.volume_entries(), [])
        self.assertEqual(self.free(), free)
        with open(os.path.join(self.cache, "index.json")) as f:
            indexed = sorted(json.load(f).get("Images", {}))
        self.assertEqual(indexed, sorted(os.listdir(os.path.join(self.cache, "images"))))

    def create_body(self, **fields: Any) -> dict[str, Any]:
        body = {"MemoryInMiB": 16, "MilliCPUs": 10, "SubnetId": "hvtest", "DoNotStart": True}
        body.update(fields)
        return body

    def test_killed_during_download(self) -> None:
        port = support.free_port()
        server = subprocess.Popen(
            [sys.executable, "-c", STALLING_SERVER, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.addCleanup(server.kill)
        assert server.stdout is not None
        self.assertEqual(server.stdout.readline().strip(), "ready")
        free = self.free()
        self.call_in_background(
            "CreateVm", self.create_body(ImageURL=f"http://127.0.0.1:{port}/disk.raw")
        )
        self.wait_for_file(
            os.path.join(self.cache, "partial"),
            lambda name, path: os.path.getsize(path) >= 2 * MiB,
            "a partial download",
        )
        self.kill_and_restart()
        self.assert_nothing_left(free)

    def test_killed_during_copy_into_the_cache(self) -> None:
        image = os.path.join(self.images, "big.raw")
        with open(image, "wb") as f:
            f.truncate(2048 * MiB)
            f.seek(510)
            f.write(b"\x55\xaa")
        free = self.free()
        self.call_in_background("CreateVm", self.create_body(ImageURL=f"file://{image}"))
        self.wait_for_file(
            os.path.join(self.cache, "partial"),
            lambda name, path: os.path.getsize(path) > 0,
            "a partial copy",
        )
        self.kill_and_restart()
        self.assert_nothing_left(free)

    def test_killed_during_snapshot(self) -> None:
        reply = self.daemon.call("CreateVm", self.create_body(MinimumFreeBytes=MiB))
        ip = reply.last["IpAddress"]
        self.assertEqual(self.daemon.call("AcknowledgeVm", {"IpAddress": ip}).error, "")
        self.assertEqual(
            self.daemon.call("AddVmVolumes", {"IpAddress": ip, "VolumeSizes": [1536 * MiB]}).error,
            "",
        )
        volume_dir = os.path.join(self.daemon.volumes, ip)
        self.call_in_background("SnapshotVm", {"IpAddress": ip, "Name": "big"})
        self.wait_for_file(
            volume_dir,
            lambda name, path: name.endswith(".new"),
            "a snapshot being written",
        )
        self.kill_and_restart()
        names = sorted(os.listdir(volume_dir))
        self.assertFalse([n for n in names if n.endswith(".new")], names)
        info = self.daemon.call("GetVmInfo", {"IpAddress": ip}).last["VmInfo"]
        for volume, name in zip(info["Volumes"], ("root", "secondary-volume.0")):
            recorded = set(volume.get("Snapshots") or {})
            on_disk = {n.split(":", 1)[1] for n in names if n.startswith(name + ".snapshot:")}
            self.assertEqual(recorded, on_disk, names)
