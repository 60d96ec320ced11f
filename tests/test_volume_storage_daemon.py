"""
The volume directory methods on the real daemon (two volume directories from
C{-volumeDirectories}): killed (SIGKILL) in the middle of ChangeVmVolumeStorageIndex
and started again, the VM has exactly one copy of the volume, the one its info.json
names, and the move can be done again; ListVolumeDirectories answers over HTTPS and
SRPC from loopback and refuses a caller connecting to the host's own non-loopback
address; vm-control and hyper-control run the new commands.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests import support
from tests.realrpc import TlsDaemon

MiB = 1024 * 1024


def host_address() -> str:
    """
    One of this host's non-loopback IPv4 addresses (skip when it has none).
    """
    out = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith("127."):
            return address
    support.require(False, "this host has no non-loopback IPv4 address")
    raise AssertionError


class VolumeStorageDaemonTests(SynchronousTestCase):
    def setUp(self) -> None:
        support.ensure_bridge()
        self.daemon = TlsDaemon(
            self, {"admin": "*.*", "alice": ""}, "-libvirtUri=test:///default", "-domainType=qemu"
        )
        self.dirs = [os.path.join(self.daemon.dir, "v0"), os.path.join(self.daemon.dir, "v1")]
        self.daemon.flags = [
            f for f in self.daemon.flags if not f.startswith("-volumeDirectories=")
        ] + [f"-volumeDirectories={','.join(self.dirs)}"]
        self.daemon.start(healthy=True)
        self.daemon.setup_network("10.79.14", 4, 0x5E)

    def cli(self, module: str, *args: str, host: str = "127.0.0.1") -> Any:
        pki = self.daemon.pki
        return subprocess.run(
            [
                sys.executable,
                "-m",
                f"hypervisor.cli.{module}",
                f"-hypervisorHostname={host}",
                f"-hypervisorPortNum={self.daemon.port}",
                f"-certDirectory={pki}/admin",
                f"-CAfile={pki}/CA.pem",
                *args,
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            capture_output=True,
            text=True,
            timeout=120,
        )

    def stopped_vm(self, extra: int) -> str:
        reply = self.daemon.call(
            "CreateVm",
            {
                "MemoryInMiB": 16,
                "MilliCPUs": 10,
                "SubnetId": "hvtest",
                "DoNotStart": True,
                "MinimumFreeBytes": MiB,
            },
        )
        ip = str(reply.last["IpAddress"])
        self.assertEqual(self.daemon.call("AcknowledgeVm", {"IpAddress": ip}).error, "")
        reply = self.daemon.call("AddVmVolumes", {"IpAddress": ip, "VolumeSizes": [extra]})
        self.assertEqual(reply.error, "")
        return ip

    def copies(self, ip: str) -> list[str]:
        out = []
        for d in self.dirs:
            try:
                out += [os.path.join(d, ip, n) for n in os.listdir(os.path.join(d, ip))]
            except FileNotFoundError:
                pass
        return sorted(out)

    def info(self, ip: str) -> Any:
        with open(os.path.join(self.daemon.state_dir, "VMs", ip, "info.json")) as f:
            return json.load(f)

    def test_killed_during_move(self) -> None:
        """
        SIGKILL while the volume is being copied to the other directory: after the
        restart the VM names its old copy, which is the only one (the partial
        copy is gone); the move then completes and the old copy goes.
        """
        ip = self.stopped_vm(2048 * MiB)
        old = os.path.join(self.dirs[0], ip, "secondary-volume.0")
        with open(old, "r+b") as f:
            f.seek(1000 * MiB)
            f.write(b"still here")
        new_dir = os.path.join(self.dirs[1], ip)
        threading.Thread(
            target=self.daemon.call,
            args=(
                "ChangeVmVolumeStorageIndex",
                {"IpAddress": ip, "StorageIndex": 1, "VolumeIndex": 1},
            ),
            daemon=True,
        ).start()
        deadline = time.monotonic() + 60
        partial = os.path.join(new_dir, "secondary-volume.0.moving")
        while time.monotonic() < deadline:
            try:
                if os.path.getsize(partial) > 0:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        else:
            raise AssertionError("the copy never started")
        self.daemon.kill()
        self.assertTrue(os.path.exists(partial) or os.path.exists(new_dir))
        self.daemon.start(healthy=True)
        self.assertEqual(self.copies(ip), [os.path.join(self.dirs[0], ip, "root"), old])
        self.assertEqual(self.info(ip)["VolumeLocations"][1]["Filename"], old)
        reply = self.daemon.call("GetVmVolumeStorageConfiguration", {"IpAddress": ip})
        self.assertEqual(reply.last["VolumeStorageIndices"], [0, 0], reply.raw)
        self.assertEqual(
            self.daemon.call(
                "ChangeVmVolumeStorageIndex", {"IpAddress": ip, "StorageIndex": 1, "VolumeIndex": 1}
            ).error,
            "",
        )
        moved = os.path.join(new_dir, "secondary-volume.0")
        self.assertEqual(self.copies(ip), [os.path.join(self.dirs[0], ip, "root"), moved])
        with open(moved, "rb") as f:
            f.seek(1000 * MiB)
            self.assertEqual(f.read(10), b"still here")
        reply = self.daemon.call("GetVmVolumeStorageConfiguration", {"IpAddress": ip})
        self.assertEqual(reply.last["VolumeStorageIndices"], [0, 1])
        # The reply as vm-control prints it (Go-indented JSON).
        r = self.cli("vm_control", "get-vm-volume-storage-configuration", ip)
        self.assertEqual(r.returncode, 0, r.stderr)
        printed = json.loads(r.stdout)
        self.assertEqual(printed["VolumeStorageIndices"], [0, 1])
        self.assertEqual(len(printed["StorageInfos"]), 2)
        self.assertEqual(
            sorted(printed["StorageInfos"][0]),
            ["AvailableBytes", "FreeBytes", "SizeBytes", "UsableBytes"],
        )
        r = self.cli(
            "vm_control", "-storageIndex=0", "-volumeIndex=1", "change-vm-volume-storage-index", ip
        )
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(self.copies(ip), [os.path.join(self.dirs[0], ip, "root"), old])
        r = self.cli(
            "vm_control", "-storageIndex=7", "-volumeIndex=1", "change-vm-volume-storage-index", ip
        )
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("invalid storage index 7", r.stderr)

    def test_list_volume_directories_loopback_only(self) -> None:
        """
        From 127.0.0.1 the directories come back (HTTPS, and hyper-control over HTTPS
        and SRPC); a caller reaching the daemon at the host's own non-loopback
        address is refused with the reference's words.
        """
        reply = self.daemon.call("ListVolumeDirectories", {})
        self.assertEqual(reply.status, 200, reply.raw)
        self.assertEqual(reply.last["Directories"], self.dirs)
        for transport in ("https", "srpc"):
            r = self.cli("hyper_control", f"-transport={transport}", "list-volume-directories")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.splitlines(), self.dirs)
        address = host_address()
        connection = http.client.HTTPSConnection(
            address, self.daemon.port, timeout=30, context=self.daemon.context("admin")
        )
        try:
            connection.request("POST", "/rpc/Hypervisor.ListVolumeDirectories", body=b"{}")
            response = connection.getresponse()
            body = json.loads(response.read())
        finally:
            connection.close()
        self.assertEqual(response.status, 403)
        self.assertEqual(body["Error"], "local connection required")
        self.assertFalse(body.get("Directories"))
        # The same over SRPC (CONNECT, TLS, method line, request): the reply's Error.
        raw = socket.create_connection((address, self.daemon.port), timeout=30)
        try:
            raw.sendall(b"CONNECT /_SRPC_/TLS/JSON HTTP/1.0\n\n")
            head = b""
            while not head.endswith(b"\n\n"):
                chunk = raw.recv(1)
                self.assertTrue(chunk, head)
                head += chunk
            self.assertIn(b" 200 ", head)
            tls = self.daemon.context("admin").wrap_socket(raw)
            reader = tls.makefile("rb")
            tls.sendall(b"Hypervisor.ListVolumeDirectories\n")
            self.assertEqual(reader.readline(), b"\n")
            tls.sendall(b"{}\n")
            line = reader.readline()
            while line == b"\n":
                line = reader.readline()
            reply = json.loads(line)
        finally:
            raw.close()
        self.assertEqual(reply["Error"], "local connection required")
        self.assertFalse(reply.get("Directories"))
        # The same caller may read a VM's storage configuration from anywhere.
        ip = self.stopped_vm(MiB)
        reply = self.daemon.call("GetVmVolumeStorageConfiguration", {"IpAddress": ip}, user="alice")
        self.assertEqual(reply.error, "")
        self.assertEqual(reply.last["VolumeStorageIndices"], [0, 0])
