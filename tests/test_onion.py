"""
Fast tests of L{hypervisor.onion} against a real C{tor} with C{DisableNetwork 1}
(it answers its control port at once and never touches the network): the key we make
is the one tor publishes, the key file is private and kept, the service is added,
comes back after tor restarts, fails clearly when tor cannot be reached (the local
listener keeps serving), and a tor the daemon launched leaves nothing behind.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hypervisor import onion
from hypervisor.diskio import ThreadPoolRunner
from tests import support, tornet


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class KeyTests(SynchronousTestCase):
    """
    Keys and addresses, without tor.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hv-onion-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_address_checksum(self) -> None:
        """
        An address is 56 base32 characters with a valid checksum and version; one
        changed character is refused.
        """
        key = onion.new_key()
        self.assertTrue(onion.valid_onion_address(key.address))
        self.assertEqual(len(key.address), 56 + len(".onion"))
        name = key.address[:-6]
        changed = ("b" if name[10] != "b" else "c").join([name[:10], name[11:]]) + ".onion"
        self.assertFalse(onion.valid_onion_address(changed))
        self.assertFalse(onion.valid_onion_address("example.onion"))
        self.assertNotEqual(onion.new_key().address, key.address)

    def test_expanded_key_is_clamped(self) -> None:
        """
        The key blob is tor's expanded ed25519 key: 64 bytes, the scalar clamped.
        """
        blob = onion.new_key().blob
        self.assertTrue(blob.startswith("ED25519-V3:"))
        raw = base64.b64decode(blob.split(":", 1)[1])
        self.assertEqual(len(raw), 64)
        self.assertEqual(raw[0] & 7, 0)
        self.assertEqual(raw[31] & 0xC0, 0x40)

    def test_key_file_private_and_kept(self) -> None:
        """
        The first call makes the key (file 0600 in a 0700 directory); the next returns
        the same key.
        """
        directory = os.path.join(self.dir, "onion")
        key, made = onion.load_or_create_key(directory)
        self.assertTrue(made)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        path = os.path.join(directory, "pb.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        again, made = onion.load_or_create_key(directory)
        self.assertFalse(made)
        self.assertEqual(again, key)

    def test_bad_key_file_changes_nothing(self) -> None:
        """
        A key file that is not ours is refused with a sentence naming it, and left as
        it is (no new key, no new address behind the operator's back).
        """
        directory = os.path.join(self.dir, "onion")
        os.makedirs(directory)
        path = os.path.join(directory, "pb.json")
        for content in (b"not json", b"[]", json.dumps({"Key": "x", "Address": "y"}).encode()):
            with open(path, "wb") as f:
                f.write(content)
            with self.assertRaises(onion.OnionKeyError) as caught:
                onion.load_or_create_key(directory)
            self.assertIn(path, str(caught.exception))
            with open(path, "rb") as f:
                self.assertEqual(f.read(), content)


class OfflineTorCase(TestCase):
    """
    A real tor with DisableNetwork 1 (not started), a disk pool, and onion services.
    """

    timeout = 120

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hv-onion-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.runner = ThreadPoolRunner(reactor, "onion-test")
        self.runner.startService()
        self.addCleanup(self.runner.stopService)
        self.tor = tornet.OfflineTor(self)

    def service(self, **kwargs: Any) -> onion.OnionService:
        service = onion.OnionService(
            reactor,
            self.runner,
            os.path.join(self.dir, "onion"),
            lambda: Factory.forProtocol(_Echo),
            onion_port=8787,
            **kwargs,
        )
        service.retry_first = 0.2
        service.startService()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    async def onions(self, service: onion.OnionService) -> list[str]:
        """
        The ephemeral onions of the service's own control connection (tor lists only
        those of the asking connection).
        """
        tor = service._tor
        assert tor is not None
        text = await tor.protocol.get_info("onions/current")
        return str(text["onions/current"]).split()


class OfflineTorTests(OfflineTorCase):
    """
    The onion service against a real tor with DisableNetwork 1.
    """

    async def test_published_with_our_key(self) -> None:
        """
        Tor accepts our key and names the service with the address we computed; the
        status says so; the local listener answers on loopback.
        """
        self.tor.start()
        service = self.service(control=self.tor.endpoint)
        await support.until(lambda: service.state == "publishing", 30, "ADD_ONION")
        address = service.address
        self.assertEqual(await self.onions(service), [address.removesuffix(".onion")])
        status = service.status()
        self.assertEqual(status["endpoint"], f"tor:{address}:8787")
        self.assertEqual(status["error"], "")
        with open(os.path.join(self.dir, "onion", "pb.json")) as f:
            self.assertEqual(json.load(f)["Address"], address)
        # The local listener the onion's port is forwarded to.
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        got: Deferred[bytes] = Deferred()

        class Client(Protocol):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(b"ping")

            def dataReceived(self, data: bytes) -> None:
                got.callback(data)
                assert self.transport is not None
                self.transport.loseConnection()

        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", service.local_port), Client()
        )
        self.assertEqual(await got, b"ping")

    async def test_restart_keeps_address(self) -> None:
        """
        A second service on the same state directory (a daemon restart) publishes the
        same address.
        """
        self.tor.start()
        first = self.service(control=self.tor.endpoint)
        await support.until(lambda: first.state == "publishing", 30, "first ADD_ONION")
        address = first.address
        await first.stopService()
        second = self.service(control=self.tor.endpoint)
        await support.until(lambda: second.state == "publishing", 30, "second ADD_ONION")
        self.assertEqual(second.address, address)
        self.assertEqual(await self.onions(second), [address.removesuffix(".onion")])

    async def test_unreachable_tor_then_recovers(self) -> None:
        """
        No tor at the control endpoint: the state is failed with a sentence naming
        the endpoint, the local listener still serves; once tor runs there, the
        service is added with the same address.
        """
        service = self.service(control=self.tor.endpoint)
        await support.until(lambda: service.state == "failed", 30, "the failure")
        self.assertIn(self.tor.control_path, service.error)
        self.assertIn("cannot reach tor's control port", service.error)
        self.assertTrue(service.address.endswith(".onion"))
        self.assertNotEqual(service.local_port, 0)
        self.tor.start()
        await support.until(lambda: service.state == "publishing", 60, "recovery")
        self.assertEqual(await self.onions(service), [service.address.removesuffix(".onion")])

    async def test_tor_restart_republishes(self) -> None:
        """
        Tor stops (the ephemeral service goes with it): the service says the
        connection was lost, then adds itself again to the new tor.
        """
        self.tor.start()
        service = self.service(control=self.tor.endpoint)
        await support.until(lambda: service.state == "publishing", 30, "ADD_ONION")
        publishes = service.publishes
        self.tor.stop()
        await support.until(lambda: service.state == "failed", 30, "the loss")
        self.tor.start()
        await support.until(
            lambda: service.state == "publishing" and service.publishes > publishes,
            60,
            "publishing again",
        )

    async def test_launched_tor_leaves_nothing(self) -> None:
        """
        Without a control endpoint the service launches its own tor (here offline:
        DisableNetwork 1), adds the service at once (no wait for bootstrap), and
        stopping the service stops that tor.
        """
        support.require(shutil.which("tor") is not None, "tor is not installed")
        data = os.path.join(self.dir, "tor")
        service = self.service(tor_data_directory=data, tor_config="DisableNetwork 1\n")
        await support.until(lambda: service.state == "publishing", 60, "launch and ADD_ONION")
        self.assertEqual(stat.S_IMODE(os.stat(data).st_mode), 0o700)
        self.assertEqual(len(tornet.tor_pids_using(data)), 1)
        self.assertEqual(await self.onions(service), [service.address.removesuffix(".onion")])
        await service.stopService()
        await support.until(lambda: not tornet.tor_pids_using(data), 15, "the tor to exit")
        self.assertEqual(service.state, "off")

    async def test_launch_failure_is_clear(self) -> None:
        """
        A tor that cannot start (a bad torrc line) fails with tor's own words, and is
        tried again; nothing is left running.
        """
        support.require(shutil.which("tor") is not None, "tor is not installed")
        data = os.path.join(self.dir, "tor")
        service = self.service(tor_data_directory=data, tor_config="NoSuchOption 1\n")
        await support.until(lambda: service.state == "failed", 60, "the failure")
        self.assertIn("NoSuchOption", service.error)
        await service.stopService()
        self.assertEqual(tornet.tor_pids_using(data), [])


class DaemonWithoutTorTests(TestCase):
    """
    The real daemon with C{-pbOnion} and no tor at C{-torControl}.
    """

    timeout = 180

    def test_unreachable_tor_is_clear_and_harmless(self) -> None:
        """
        The log and the status page say the onion service is not published and why
        (naming the endpoint), with the address it will have; the daemon serves its
        pages and RPC meanwhile.
        """
        support.require(os.geteuid() == 0, "the daemon test runs as root (state, libvirt)")
        support.require_libvirtd()
        missing = os.path.join(tempfile.mkdtemp(prefix="hv-notor-"), "control.sock")
        self.addCleanup(shutil.rmtree, os.path.dirname(missing), True)
        d = support.Daemon(
            self, "-domainType=qemu", "-pbPortNum=0", "-pbOnion", f"-torControl=unix:{missing}"
        )
        address = d.command("onion-address")
        self.assertEqual(address.returncode, 0, address.stderr)
        onion_address = address.stdout.strip()
        d.start()
        support.wait_for(
            lambda: "cannot reach tor's control port" in d.output(), 60, "the error in the log"
        )
        line = next(x for x in d.output().splitlines() if "cannot reach tor's control" in x)
        self.assertIn(onion_address, line)
        self.assertIn(missing, line)
        self.assertIn("the other endpoints are served", line)
        status, page = support.http_get(d.url + "/")
        self.assertEqual(status, 200)
        self.assertIn(">not published</span>", page)
        self.assertIn(f"tor:{onion_address}:8787", page)
        self.assertIn(missing, page)
        self.assertEqual(support.http_get(d.url + "/listSubnets")[0], 200)


class CommandTests(SynchronousTestCase):
    """
    C{hypervisor onion-address} and C{hypervisor -pbOnion make-certs}.
    """

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hv-onion-cli-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.flags = [
            f"-stateDir={self.dir}/state",
            f"-CAfile={self.dir}/CA.pem",
            f"-certFile={self.dir}/server.pem",
            f"-keyFile={self.dir}/server.key",
        ]

    def hypervisor(self, *args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(
            [sys.executable, "-m", "hypervisor", *self.flags, *args],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO, HYPERVISOR_FLAGS_DIRECTORY=self.dir),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def test_address_stable_and_in_certificate(self) -> None:
        """
        onion-address prints the same address each time; -pbOnion make-certs names it
        in the daemon's certificate; a certificate made without it gets a warning.
        """
        first = self.hypervisor("onion-address")
        self.assertEqual(first.returncode, 0, first.stderr)
        address = first.stdout.strip()
        self.assertTrue(onion.valid_onion_address(address), address)
        self.assertEqual(self.hypervisor("onion-address").stdout.strip(), address)
        made = self.hypervisor("-pbOnion", "make-certs")
        self.assertEqual(made.returncode, 0, made.stderr)
        self.assertIn(address, made.stdout)
        self.assertEqual(
            onion.certificate_lacks_onion(f"{self.dir}/server.pem", f"{self.dir}/state"), ""
        )
        again = self.hypervisor("-pbOnion", "make-certs")
        self.assertEqual(again.stderr, "")
        os.unlink(f"{self.dir}/server.pem")
        os.unlink(f"{self.dir}/server.key")
        self.assertEqual(self.hypervisor("make-certs").returncode, 0)
        lacking = self.hypervisor("-pbOnion", "make-certs")
        self.assertIn(f"does not name {address}", lacking.stderr)

    def test_bad_key_file(self) -> None:
        """
        A key file that is not ours: onion-address fails (exit 1) naming it.
        """
        os.makedirs(f"{self.dir}/state/onion")
        with open(f"{self.dir}/state/onion/pb.json", "w") as f:
            f.write("{}")
        result = self.hypervisor("onion-address")
        self.assertEqual(result.returncode, 1)
        self.assertIn("pb.json", result.stderr)


class ReactorIoTests(OfflineTorCase):
    """
    The onion service does no disk I/O on the reactor thread (the key and the launched
    tor's files go through the disk threads), watched as L{tests.test_reactor_io}
    watches the request paths.
    """

    async def watched(self, **kwargs: Any) -> list[tuple[str, str]]:
        from tests.test_reactor_io import Monitor

        # Watched from just after start-up (where every listener of the daemon opens
        # its sockets, before the reactor runs).
        service = self.service(**kwargs)
        monitor = Monitor()
        monitor.install()
        try:
            await support.until(lambda: service.state == "publishing", 60, "ADD_ONION")
            await service.stopService()
        finally:
            monitor.uninstall()
        # spawnProcess checks that its pipes are pipes (fstat of a pipe: no disk).
        return [
            (call, stack)
            for call, stack in monitor.violations
            if not (call.startswith("os.fstat(") and "internet/process.py" in stack)
        ]

    async def test_connect_mode(self) -> None:
        """
        Key made, tor reached, service added and removed: no disk I/O on the reactor.
        """
        self.tor.start()
        violations = await self.watched(control=self.tor.endpoint)
        self.assertEqual(violations, [], "\n".join(f"{c}\n{s}" for c, s in violations))

    async def test_launch_mode(self) -> None:
        """
        Tor launched (its directory and torrc made), service added, tor stopped: no
        disk I/O on the reactor.
        """
        support.require(shutil.which("tor") is not None, "tor is not installed")
        violations = await self.watched(
            tor_data_directory=os.path.join(self.dir, "tor"), tor_config="DisableNetwork 1\n"
        )
        self.assertEqual(violations, [], "\n".join(f"{c}\n{s}" for c, s in violations))
