"""
The metadata server under load, beside its peers in the same run:

    python -m bench.metadata [--duration 10] [--connections 50] [--threads 2]

In a private network world (C{tests.netns}: C{unshare -nm}), a bridge with the real
daemon (C{python -m hypervisor ... run}, its metadata server in the bridge's namespace)
and two namespaces on the bridge: a "VM" (one of the daemon's VMs: its MAC and IP)
running C{wrk}, and a peer host serving the same document (the VM's
C{/openstack/latest/meta_data.json}, fetched from our server first) with

- nginx (one worker, C{nginx-light}), and
- a plain C{twisted.web} C{static.Data} leaf resource in its own Python process (the
  ceiling for one Python process here).

Each is measured with C{wrk --latency} over the same bridge; the table gives
requests/s and latency p50/p99. Needs root, wrk, nginx and nft (C{tools/setup.sh
--bench}).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

from tests import netns, support
from tests.test_metadata_real import GATEWAY, VMS, WorldDaemon

PEER_IP = "10.112.0.200"
PATH = "/openstack/latest/meta_data.json"

STATIC_SERVER = r"""
import sys
from twisted.internet import reactor
from twisted.web import server, static
data = open(sys.argv[1], "rb").read()
root = static.Data(data, "application/json")
root.isLeaf = True
site = server.Site(root)
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[3]), site, interface=sys.argv[2], backlog=1024)
print("ready", flush=True)
reactor.run()
"""

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  default_type application/json;
  server {{
    listen {ip}:{port};
    location / {{ root {dir}/www; }}
  }}
}}
"""


def to_ms(text: str) -> float:
    """
    A wrk duration (C{812.00us}, C{1.23ms}, C{2.01s}) in milliseconds.
    """
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text.strip())
    if not m:
        return float("nan")
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(output: str) -> dict[str, float]:
    """
    Requests/s, p50 and p99 (ms) and errors from C{wrk --latency} output.
    """
    out: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", output)
    out["rps"] = float(m.group(1)) if m else float("nan")
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", output, re.M)
        out[f"p{pct}"] = to_ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    out["non2xx"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    out["errors"] = float(sum(int(g) for g in m.groups())) if m else 0.0
    return out


def wrk(world: netns.World, client: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    """
    One wrk run from namespace C{client}.
    """
    result = world.client(
        client,
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{args.duration}s",
        "--latency",
        url,
        timeout=args.duration + 60,
    )
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed: {result.stdout}{result.stderr}")
    return parse_wrk(result.stdout)


def main(argv: Optional[list[str]] = None) -> int:
    """
    Run the benchmark and print the table.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    for tool in ("wrk", "nginx", "nft", "unshare"):
        if shutil.which(tool) is None:
            print(f"bench/metadata: {tool} is not installed (tools/setup.sh --bench)")
            return 2
    world = netns.World()
    daemon: Optional[WorldDaemon] = None
    try:
        world.bridge("br0", f"{GATEWAY}/24", mac="02:00:00:70:00:01")
        ip, mac = VMS["alpha"]
        world.add_client("alpha", mac, "br0")
        world.client("alpha", "ip", "addr", "add", f"{ip}/24", "dev", "eth0", check=True)
        world.client(
            "alpha", "ip", "route", "add", "169.254.169.254/32", "via", GATEWAY, check=True
        )
        world.add_client("peer", "02:00:00:70:00:c8", "br0")
        world.client("peer", "ip", "addr", "add", f"{PEER_IP}/24", "dev", "eth0", check=True)
        daemon = WorldDaemon(world)
        daemon.start()
        document = world.client(
            "alpha", "curl", "-sS", "--max-time", "5", f"http://169.254.169.254{PATH}", check=True
        ).stdout.encode()
        www = os.path.join(world.dir, "www", os.path.dirname(PATH).lstrip("/"))
        os.makedirs(www)
        with open(os.path.join(www, os.path.basename(PATH)), "wb") as f:
            f.write(document)
        doc_path = os.path.join(world.dir, "document.json")
        with open(doc_path, "wb") as f:
            f.write(document)
        conf = world.file("nginx.conf", NGINX_CONF.format(dir=world.dir, ip=PEER_IP, port=80))
        world.spawn_client(
            "peer", ["nginx", "-c", conf, "-p", world.dir], stdout=subprocess.DEVNULL
        )
        script = world.file("static_server.py", STATIC_SERVER)
        static = world.spawn_client(
            "peer",
            [sys.executable, script, doc_path, PEER_IP, "8080"],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=support.REPO),
        )
        assert static.stdout is not None
        static.stdout.readline()
        support.wait_for(
            lambda: world.client(
                "alpha", "curl", "-s", "-o", "/dev/null", f"http://{PEER_IP}{PATH}"
            ).returncode
            == 0,
            20,
            "nginx",
        )
        targets = [
            ("our metadata server (in the daemon)", f"http://169.254.169.254{PATH}"),
            ("nginx, 1 worker (same document)", f"http://{PEER_IP}{PATH}"),
            ("twisted.web static.Data (Python ceiling)", f"http://{PEER_IP}:8080{PATH}"),
        ]
        rows = []
        for name, url in targets:
            wrk(world, "alpha", url, argparse.Namespace(**{**vars(args), "duration": 2}))
            rows.append((name, wrk(world, "alpha", url, args)))
        print(
            f"\nmetadata bench: wrk -t{args.threads} -c{args.connections} -d{args.duration}s "
            f"GET {PATH} ({len(document)} bytes) from a VM namespace over a bridge; "
            f"load average {os.getloadavg()[0]:.2f}\n"
        )
        print(f"| {'server':<42} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'errors':>6} |")
        print(f"|{'-' * 44}|{'-' * 10}|{'-' * 9}|{'-' * 9}|{'-' * 8}|")
        for name, r in rows:
            errors = int(r["errors"] + r["non2xx"])
            print(
                f"| {name:<42} | {r['rps']:>8.0f} | {r['p50']:>7.2f} | {r['p99']:>7.2f} "
                f"| {errors:>6} |"
            )
        return 0
    finally:
        if daemon is not None:
            daemon.stop(signal.SIGTERM)
        world.close()
        time.sleep(0)


if __name__ == "__main__":
    sys.exit(main())
