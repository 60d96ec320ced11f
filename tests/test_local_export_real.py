"""
ExportLocalVm, ImportLocalVm and CommitImportedVm between two real daemons on one
host (the local upgrade: export from the old daemon, import into the new), with the
tiny guest on real libvirtd and a client in a namespace pinging it; the refusals
with real clients (our SRPC client and curl, from loopback and from the host's
non-loopback address); an import that fails half-way leaves nothing behind.

The two daemons and the network are L{tests.test_migration_real}'s.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from hypervisor.srpc import client as srpc
from tests import support
from tests.test_migration_real import BRIDGE, NET, Pair, World, mac


def host_address() -> str:
    """
    A non-loopback address of this host (the source address of its default route).
    """
    out = subprocess.run(
        ["ip", "-4", "route", "get", "192.0.2.200"], capture_output=True, text=True
    ).stdout
    words = out.split()
    if "src" in words:
        return words[words.index("src") + 1]
    found = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    for address in found:
        if "." in address and not address.startswith("127."):
            return address
    raise AssertionError("this host has no non-loopback IPv4 address")


class LocalExportTests(World):
    """
    A running VM goes from daemon A to daemon B with vm-control export-local-vm whose
    -localVmCreate runs vm-control import-local-vm on B.
    """

    def cookie(self, d: support.Daemon) -> str:
        with open(os.path.join(d.state_dir, "root-cookie"), "rb") as f:
            return base64.b64encode(f.read()).decode()

    def srpc_call(
        self, pair: Pair, host: str, d: support.Daemon, method: str, request: Any
    ) -> dict:
        cert, key = pair.alice
        with srpc.connect_tls_json(host, d.port, cert, key, timeout=120) as c:
            return c.call(method, request)

    def curl(self, pair: Pair, host: str, d: support.Daemon, method: str, request: Any) -> str:
        cert, key = pair.alice
        r = subprocess.run(
            [
                "curl",
                "-sS",
                "--cacert",
                f"{pair.pki}/CA.pem",
                "--cert",
                cert,
                "--key",
                key,
                "--resolve",
                f"localhost:{d.port}:{host}",
                "-w",
                "\n%{http_code}",
                "--data-binary",
                json.dumps(request),
                f"https://localhost:{d.port}/rpc/Hypervisor.{method}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return r.stdout

    def files(self, d: support.Daemon, ip: str) -> list[str]:
        return [
            p
            for p in (
                os.path.join(d.state_dir, "VMs", ip),
                os.path.join(d.dir, "volumes", ip),
            )
            if os.path.exists(p)
        ]

    def domains_of(self, ip: str) -> int:
        import libvirt

        conn = libvirt.open(support.QEMU_URI)
        try:
            return sum(
                1 for dom in conn.listAllDomains() if dom.name() == f"vm-{ip}" and dom.isActive()
            )
        finally:
            conn.close()

    def test_export_import_commit(self) -> None:
        """
        Refusals first (non-loopback caller, bad cookie, an address in B's pool, a
        half-way failure), each changing nothing; then the local upgrade: the VM runs
        on B with its address (registered once, on B), and A holds nothing.
        """
        pair, a, b, ip = self.started_pair(5)
        self.wait_ping(ip)
        cookie_a, cookie_b = self.cookie(a), self.cookie(b)
        stop = pair.call(a, "StopVm", {"IpAddress": ip})
        self.assertFalse(stop.get("Error"), stop)

        # 1. A caller on the host's non-loopback address, with the right cookie, is
        # refused before its request is read (SRPC and HTTPS); nothing changes.
        outside = host_address()
        export = {"IpAddress": ip, "VerificationCookie": cookie_a}
        # SRPC refuses at the method line (the request is never read).
        e = self.assertRaises(
            srpc.SrpcError, self.srpc_call, pair, outside, a, "ExportLocalVm", export
        )
        self.assertIn("access to method denied", str(e))
        out = self.curl(pair, outside, a, "ExportLocalVm", export)
        self.assertTrue(out.endswith("\n403"), out)
        self.assertIn("local connection required", out)
        out = self.curl(pair, outside, b, "ImportLocalVm", {"VerificationCookie": cookie_b})
        self.assertTrue(out.endswith("\n403"), out)
        # From loopback (curl to 127.0.0.1) the same call gets past admission.
        out = self.curl(pair, "127.0.0.1", a, "ExportLocalVm", {"IpAddress": ip})
        self.assertTrue(out.endswith("\n403"), out)
        self.assertIn("bad verification cookie: you are not root", out)
        self.assertEqual(self.vm_state(pair, a, ip)["State"], "stopped")  # type: ignore

        # 2. Bad cookies: B's cookie at A, a truncated one.
        for cookie in (cookie_b, base64.b64encode(b"x" * 31).decode(), ""):
            reply = pair.call(a, "ExportLocalVm", {"IpAddress": ip, "VerificationCookie": cookie})
            self.assertEqual(reply.get("Error"), "bad verification cookie: you are not root")
        self.assertEqual(self.vm_state(pair, a, ip)["State"], "stopped")  # type: ignore

        # 3. The export (A): stopped -> exporting; its info and bridges.
        reply = pair.call(a, "ExportLocalVm", export)
        self.assertFalse(reply.get("Error"), reply)
        exported = reply["VmInfo"]
        self.assertEqual(exported["Bridges"], [BRIDGE])
        self.assertEqual(exported["Address"]["IpAddress"], ip)
        root = exported["VolumeLocations"][0]["Filename"]
        self.assertEqual(root, os.path.join(a.dir, "volumes", ip, "root"))
        self.assertEqual(self.vm_state(pair, a, ip)["State"], "exporting")  # type: ignore
        again = pair.call(a, "ExportLocalVm", export)
        self.assertEqual(again.get("Error"), "VM is not stopped")

        # 4. Imports into B that are refused, or fail half-way, leave nothing.
        staging = os.path.join(b.dir, "volumes", "import", "test")
        os.makedirs(staging)
        for name in ("root", "kernel", "initrd"):
            os.link(os.path.join(os.path.dirname(root), name), os.path.join(staging, name))
        os.symlink(root, os.path.join(staging, "link"))
        info = {k: v for k, v in exported.items() if k not in ("Bridges", "VolumeLocations")}
        request = dict(info, VerificationCookie=cookie_b, VolumeFilenames=[f"{staging}/root"])
        pool_b = pair.pool(b)
        cases = [
            (dict(request, VerificationCookie=cookie_a), "bad verification cookie"),
            (dict(request, VolumeFilenames=[root]), "not in a volume directory"),
            (dict(request, VolumeFilenames=[f"{staging}/../test/root"]), "clean absolute"),
            (dict(request, VolumeFilenames=[f"{staging}/nothing"]), "No such file"),
            (dict(request, VolumeFilenames=[f"{staging}/link"]), "symbolic link"),
            (
                dict(request, Address={"IpAddress": f"{NET}.5", "MacAddress": mac(5)}),
                "is in address pool",
            ),
            (
                dict(request, SecondaryAddresses=[info["Address"]]),
                "duplicate address",
            ),
            # Half-way: the files are linked and the domain is tried, but QEMU cannot
            # open a raw file as qcow2: the VM, the links and its directories go.
            (dict(request, Volumes=[dict(info["Volumes"][0], Format="qcow2")]), "failed to start"),
        ]
        for bad, expected in cases:
            reply = pair.call(b, "ImportLocalVm", bad)
            self.assertIn(expected, reply.get("Error", ""), (expected, b.output()[-3000:]))
            self.assertIsNone(self.vm_state(pair, b, ip))
            self.assertEqual(self.files(b, ip), [])
            self.assertEqual(pair.pool(b), pool_b)
            self.assertTrue(os.path.exists(f"{staging}/root"))
        self.assertEqual(self.domains_of(ip), 0)
        # B killed in the middle of an import: at its next start the reconciliation
        # removes the unfinished VM (its pending.json says creating) and its domain.
        pending = os.path.join(b.state_dir, "VMs", ip, "pending.json")
        outcome: list[Any] = []

        def call() -> None:
            try:
                outcome.append(pair.call(b, "ImportLocalVm", request))
            except Exception as e:  # noqa: BLE001 - the connection dies with the daemon
                outcome.append(e)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        support.wait_for(lambda: os.path.exists(pending), 60, "the import to begin", 0.002)
        assert b.process is not None
        b.process.send_signal(signal.SIGKILL)
        b.wait()
        caller.join(30)
        self.assertFalse(outcome and isinstance(outcome[0], dict) and not outcome[0].get("Error"))
        b.start()
        support.wait_for(
            lambda: self.vm_state(pair, b, ip) is None and self.files(b, ip) == [],
            120,
            "the unfinished import to be removed",
        )
        support.wait_for(lambda: self.domains_of(ip) == 0, 60, "its domain to be gone")
        self.assertRegex(
            b.output(), "its creation was interrupted|an interrupted VM creation or removal"
        )
        self.assertEqual(pair.pool(b), pool_b)
        self.assertTrue(os.path.exists(f"{staging}/root"))
        subprocess.run(["rm", "-rf", os.path.dirname(staging)], check=True)

        # 5. The local upgrade, as an operator runs it: vm-control export-local-vm on
        # A whose -localVmCreate imports into B (vm-control import-local-vm, answered
        # "commit"), then "commit" to the export: A destroys its copy.
        script = os.path.join(pair.root, "create-on-b")
        with open(script, "w") as f:
            f.write(
                "#!/bin/sh\nset -e\n"
                f'cat > "{pair.root}/export.json"\n'
                f'root=$({sys.executable} -c "import json,sys; '
                "print(json.load(open(sys.argv[1]))['VolumeLocations'][0]['Filename'])\" "
                f'"{pair.root}/export.json")\n'
                f"echo commit | {sys.executable} -m hypervisor.cli.vm_control "
                f"-hypervisorPortNum={b.port} -certDirectory={pair.pki}/alice "
                f"-CAfile={pair.pki}/CA.pem -logDebugLevel=0 "
                f'import-local-vm "{pair.root}/export.json" "$root"\n'
            )
        os.chmod(script, 0o755)
        # The VM is exporting from step 3: start it so that the tool's run is whole.
        self.assertFalse(pair.call(a, "StartVm", {"IpAddress": ip}).get("Error"))
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "hypervisor.cli.vm_control",
                f"-hypervisorPortNum={a.port}",
                f"-certDirectory={pair.pki}/alice",
                f"-CAfile={pair.pki}/CA.pem",
                f"-localVmCreate={script}",
                "export-local-vm",
                ip,
            ],
            cwd=support.REPO,
            env=dict(os.environ, PYTHONPATH=support.REPO),
            input="commit\n",
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.assertEqual(
            r.returncode, 0, r.stdout + r.stderr + b.output()[-3000:] + a.output()[-2000:]
        )
        self.assertIn(f"Commit VM {ip} (commit/defer/abandon)? ", r.stderr)
        self.assertIn("imported VM", r.stderr)
        info_b = self.vm_state(pair, b, ip)
        assert info_b is not None
        self.assertEqual(info_b["State"], "running")
        self.assertFalse(info_b.get("Uncommitted"))
        self.assertEqual(info_b["OwnerUsers"], ["alice"])
        self.assertEqual(info_b["Address"], {"IpAddress": ip, "MacAddress": mac(2)})
        self.assertEqual(self.registered(pair, b, ip), 1)
        self.assertNotIn(ip, [x["IpAddress"] for x in pair.pool(b).get("Free") or []])
        # A: the VM is gone, its address unregistered (not freed for another VM).
        self.assertIsNone(self.vm_state(pair, a, ip))
        self.assertEqual(self.registered(pair, a, ip), 0)
        self.assertEqual(self.files(a, ip), [])
        self.assertFalse(
            os.path.exists(os.path.join(b.dir, "volumes", "import"))
            and any(os.scandir(os.path.join(b.dir, "volumes", "import")))
        )
        self.assertEqual(self.domains_of(ip), 1)
        self.wait_ping(ip)
        # Committed once only.
        again = pair.call(b, "CommitImportedVm", {"IpAddress": ip})
        self.assertEqual(again.get("Error"), f"{ip} is already committed")
        # B keeps it across a restart (killed: libvirtd keeps the domain running).
        assert b.process is not None
        b.process.send_signal(signal.SIGKILL)
        b.wait()
        b.start()
        info_b = self.vm_state(pair, b, ip)
        assert info_b is not None
        self.assertEqual(info_b["State"], "running")
        self.assertEqual(self.registered(pair, b, ip), 1)
        self.wait_ping(ip)
