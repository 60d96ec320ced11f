"""
Capture the golden DHCP packets of tests/data/dhcp/ from real clients (as root):

    python -m tests.dhcp_capture [OUTDIR]

In a private network world (L{tests.netns}), a throw-away responder (this module's
C{responder} mode: OFFER and ACK for anything, from 10.44.0.1) records what busybox
udhcpc, ISC dhclient (twice: the second time from its lease file, INIT-REBOOT),
dhcpcd and a PXE-style udhcpc send; a real iPXE ROM (QEMU's
e1000 with Debian's C{ipxe-qemu}, TCG, its frames sent over a UDP socket netdev)
gives a firmware DISCOVER. Each message is stored as C{<client>-<type>.bin}, the
UDP payload exactly as received.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from hypervisor.dhcp import codec
from tests import netns, support

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dhcp")

CLIENTS = {
    "udhcpc": "52:54:0a:2c:00:11",
    "dhclient": "52:54:0a:2c:00:12",
    "dhcpcd": "52:54:0a:2c:00:13",
    "pxe": "52:54:0a:2c:00:14",
}


def responder(out: str, count: int) -> None:
    """
    Answer DISCOVER with OFFER and REQUEST with ACK on br0; store the first DISCOVER
    and REQUEST of each client (named by MAC) in C{out}.
    """
    names = {mac: name for name, mac in CLIENTS.items()}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"br0")
    s.bind(("0.0.0.0", 67))
    seen: set[str] = set()
    print("listening", flush=True)
    while len(seen) < count:
        data, _ = s.recvfrom(4096)
        packet = codec.decode(data)
        kind = packet.message_type
        name = names.get(packet.mac, packet.mac.replace(":", ""))
        if kind is None:
            continue
        label = kind.label
        if kind == codec.MessageType.REQUEST and codec.SERVER_ID not in packet.options:
            label = "reboot"  # INIT-REBOOT: no server identifier
        key = f"{name}-{label}"
        if key not in seen:
            seen.add(key)
            with open(os.path.join(out, key + ".bin"), "wb") as f:
                f.write(data)
        if kind not in (codec.MessageType.DISCOVER, codec.MessageType.REQUEST):
            continue
        reply_type = (
            codec.MessageType.OFFER if kind == codec.MessageType.DISCOVER else codec.MessageType.ACK
        )
        ip = f"10.44.0.{0x40 + packet.chaddr[5]}"
        reply = codec.Packet(
            op=codec.BOOTREPLY,
            xid=packet.xid,
            flags=packet.flags,
            yiaddr=ip,
            siaddr="10.44.0.1",
            chaddr=packet.chaddr,
            options={
                codec.MESSAGE_TYPE: bytes((reply_type,)),
                codec.SERVER_ID: socket.inet_aton("10.44.0.1"),
                codec.LEASE_TIME: (3600).to_bytes(4, "big"),
                codec.SUBNET_MASK: socket.inet_aton("255.255.255.0"),
                codec.ROUTER: socket.inet_aton("10.44.0.1"),
            },
        )
        s.sendto(codec.encode(reply, min_size=codec.MIN_BOOTP), ("255.255.255.255", 68))


def capture_clients(out: str) -> None:
    """
    Run each client once against the responder in a private world.
    """
    world = netns.World()
    try:
        world.bridge("br0", "10.44.0.1/24")
        for i, (name, mac) in enumerate(CLIENTS.items()):
            world.add_client(f"c{i}", mac, "br0")
        env = dict(os.environ, OUT_DIR=world.dir)
        udhcpc_hook = netns.hook(world, "udhcpc.sh", netns.UDHCPC_HOOK)
        dhclient_hook = netns.hook(world, "dhclient.sh", netns.DHCLIENT_HOOK)
        dhcpcd_hook = netns.hook(world, "dhcpcd.sh", netns.DHCPCD_HOOK)
        expected = 2 * len(CLIENTS) + 1  # and dhclient's INIT-REBOOT
        server = world.spawn(
            [sys.executable, "-m", "tests.dhcp_capture", "responder", out, str(expected)],
            stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=support.REPO),
        )
        assert server.stdout is not None
        server.stdout.readline()
        lf = os.path.join(world.dir, "dhclient.leases")
        runs = [
            (
                "c0",
                ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-T", "1"]
                + ["-s", udhcpc_hook],
            ),
            (
                "c1",
                ["dhclient", "-1", "-d", "-lf", lf, "-pf", lf + ".pid", "-sf", dhclient_hook]
                + ["eth0"],
            ),
            (
                "c2",
                [
                    "sh",
                    "-c",
                    "mount -t tmpfs none /var/lib/dhcpcd && mount -t tmpfs none /run"
                    f" && dhcpcd -1 -4 -B --noarp --noipv4ll -c {dhcpcd_hook} -t 10 eth0",
                ],
            ),
            (
                "c3",
                ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "3", "-T", "1"]
                + ["-s", udhcpc_hook, "-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"]
                + ["-O", "bootfile", "-O", "tftp"],
            ),
        ]
        # dhclient runs twice: the second time from its lease file (INIT-REBOOT).
        runs.insert(2, runs[1])
        records = ["udhcpc.bound", "dhclient.BOUND", "dhclient.REBOOT", "dhcpcd.BOUND"]
        records.append("udhcpc.bound")
        for (name, argv), record in zip(runs, records):
            path = os.path.join(world.dir, record)
            if os.path.exists(path):
                os.unlink(path)
            done = world.client_until(name, argv, path, env=env)
            print(name, argv[0] if argv[0] != "busybox" else argv[1], done)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            print("some client did not finish DORA")
    finally:
        world.close()


def capture_ipxe(out: str) -> None:
    """
    The DISCOVER of a real iPXE ROM (QEMU e1000, TCG), from the netdev's UDP frames.
    """
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    rom = "/usr/lib/ipxe/qemu/efi-e1000.rom"
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-display",
            "none",
            "-machine",
            "pc,accel=tcg",
            "-m",
            "64",
            "-boot",
            "order=n",
            "-netdev",
            f"socket,id=n0,udp=127.0.0.1:{port},localaddr=127.0.0.1:{port + 1}",
            "-device",
            f"e1000,netdev=n0,mac=52:54:0a:2c:00:15,romfile={rom},bootindex=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rx.settimeout(60)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            frame, _ = rx.recvfrom(4096)
            if frame[12:14] != b"\x08\x00" or frame[23] != socket.IPPROTO_UDP:
                continue
            udp = frame[14 + (frame[14] & 15) * 4 :]
            if udp[2:4] == (67).to_bytes(2, "big"):
                with open(os.path.join(out, "ipxe-discover.bin"), "wb") as f:
                    f.write(udp[8:])
                print("ipxe discover", len(udp) - 8)
                return
    finally:
        qemu.kill()
        qemu.wait()
        rx.close()


def main(argv: list[str]) -> None:
    """
    C{[OUTDIR]}, or C{responder OUTDIR COUNT} (inside the world).
    """
    if argv[:1] == ["responder"]:
        responder(argv[1], int(argv[2]))
        return
    out = argv[0] if argv else DATA
    os.makedirs(out, exist_ok=True)
    capture_clients(out)
    capture_ipxe(out)


if __name__ == "__main__":
    main(sys.argv[1:])
