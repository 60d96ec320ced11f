"""
The image flags of the real daemon (tap/service.py wiring): an https ImageURL from a
separate C{twist web} TLS server trusted through C{-imageCAfile}, and C{ImageName}
from C{hypervisor serve-images} using the daemon's own certificate and CA, with the
default image cache beside the volume directory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from hypervisor import certs
from tests import support
from tests.realrpc import TlsDaemon
from tests.test_image_sources import write_raw

MiB = 1024 * 1024


def wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert process.poll() is None, "the server exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.05)


class DaemonImageFlagsTests(SynchronousTestCase):
    def setUp(self) -> None:
        support.ensure_bridge()
        self.daemon = TlsDaemon(
            self, {"admin": "*.*"}, "-libvirtUri=test:///default", "-domainType=qemu"
        )
        d = self.daemon.dir
        self.served = os.path.join(d, "served")
        os.makedirs(os.path.join(self.served, "debian"))
        self.image = write_raw(os.path.join(self.served, "debian", "disk.raw"), 2 * MiB)
        # An HTTPS image server with a CA of its own, trusted only through -imageCAfile.
        ca_key, ca = certs.make_ca("web CA")
        key, cert = certs.make_certificate(ca_key, ca, "web", server_names=["127.0.0.1"])
        self.web_ca = os.path.join(d, "web-ca.pem")
        with open(self.web_ca, "wb") as f:
            f.write(certs.cert_pem(ca))
        certs.write_pair(os.path.join(d, "web.pem"), os.path.join(d, "web.key"), key, cert)
        self.web_port = support.free_port()
        self.web = subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "twist"),
                "web",
                "--path",
                self.served,
                "--listen",
                f"ssl:{self.web_port}:interface=127.0.0.1:privateKey={d}/web.key:"
                f"certKey={d}/web.pem",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(self.stop, self.web)
        wait_port(self.web_port, self.web)

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            process.wait(10)

    def create(self, **fields: object) -> dict:
        body = {"MemoryInMiB": 16, "MilliCPUs": 10, "SubnetId": "hvtest", "DoNotStart": True}
        body.update(fields)
        reply = self.daemon.call("CreateVm", body)
        self.assertEqual(reply.status, 200, reply)
        return reply.last

    def test_https_image_url_and_image_name(self) -> None:
        d = self.daemon.dir
        image_port = support.free_port()
        self.daemon.flags += [
            f"-imageCAfile={self.web_ca}",
            "-imageServerHostname=127.0.0.1",
            f"-imageServerPortNum={image_port}",
        ]
        self.daemon.start(healthy=True)
        self.daemon.setup_network("10.79.1", 3, 0x51)
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hypervisor",
                f"-CAfile={self.daemon.pki}/CA.pem",
                f"-certFile={self.daemon.pki}/server.pem",
                f"-keyFile={self.daemon.pki}/server.key",
                "serve-images",
                "--port",
                str(image_port),
                self.served,
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=d),
            stdout=open(os.path.join(d, "serve-images.log"), "wb"),
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(self.stop, server)
        wait_port(image_port, server)
        url = f"https://127.0.0.1:{self.web_port}/debian/disk.raw"
        last = self.create(ImageURL=url)
        self.assertEqual(last.get("Error", ""), "")
        ip = last["IpAddress"]
        self.daemon.call("AcknowledgeVm", {"IpAddress": ip})
        last = self.create(ImageName="debian/disk.raw")
        self.assertEqual(last.get("Error", ""), "")
        info = self.daemon.call("GetVmInfo", {"IpAddress": ip}).last["VmInfo"]
        self.assertEqual(info["Volumes"][0]["Format"], "qcow2")
        cache = os.path.join(d, "objectcache")  # the default: beside the volume directory
        with open(os.path.join(cache, "index.json")) as f:
            images = json.load(f)["Images"]
        self.assertEqual(len(images), 1)  # the same bytes from both sources
        sources = sorted(next(iter(images.values()))["Sources"])
        self.assertEqual(
            sources,
            sorted([url, f"https://127.0.0.1:{image_port}/images/debian/disk.raw"]),
        )

    def test_untrusted_https_refused(self) -> None:
        self.daemon.start(healthy=True)
        self.daemon.setup_network("10.79.2", 2, 0x52)
        last = self.create(ImageURL=f"https://127.0.0.1:{self.web_port}/debian/disk.raw")
        self.assertIn("certificate", last.get("Error", ""))
        self.assertEqual(self.daemon.vm_dirs(), [])
        last = self.create(ImageName="debian/disk.raw")
        # no image server runs at the default -imageServerHostname:-imageServerPortNum
        self.assertIn("https://localhost:6971/images/debian/disk.raw", last["Error"])
