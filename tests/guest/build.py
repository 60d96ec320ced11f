"""
Build the tiny test guest, offline, from Debian packages.

    python -m tests.guest.build [--cache DIR]    # prints the directory holding it

The guest is a kernel and an initramfs for direct kernel boot:

- C{vmlinux}: Debian's kernel (C{linux-image-amd64}'s dependency), its xz payload
  decompressed to the ELF image so QEMU boots it through PVH (about twice as fast to
  DHCP under TCG as the bzImage);
- C{initrd.cpio}: busybox (C{busybox-static}), the virtio network modules, the ACPI
  power button and evdev modules, and an C{/init} that brings up eth0 with udhcpc,
  fetches C{hv.url=} from the kernel command line (if given), prints everything to the
  serial console, and then powers off (C{hv.mode=poweroff}, default) or keeps running
  until the ACPI power button is pressed (C{hv.mode=stay}), or keeps running with an
  interactive busybox shell on the serial console (C{hv.mode=shell}: the console
  tests type commands into it); C{hv.dhcp=no} skips DHCP.

Packages come from apt (C{apt-get download}); nothing is installed. The result is
cached in C{/var/cache/smallstack-hypervisor/guest-<kernel package>/} (or C{--cache}) and
reused while the kernel package version and this file's guest scripts are unchanged
(their hash is in the directory name).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile

# QEMU runs as libvirt-qemu and must be able to reach the files: not under /root.
DEFAULT_CACHE = "/var/cache/smallstack-hypervisor"

MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "evdev",
    "button",
]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in __MODULES__; do insmod /lib/modules/$m.ko || echo "tiny-guest: insmod $m failed"; done
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p" | tail -n 1; }
URL=$(arg hv.url)
MODE=$(arg hv.mode)
DHCP=$(arg hv.dhcp)
echo "tiny-guest: booted, mode=${MODE:-poweroff}"
# The ACPI power button (StopVm) powers the guest off.
for e in /dev/input/event*; do
  ( head -c 24 "$e" >/dev/null && echo "tiny-guest: power button" && poweroff -f ) &
done
ip link set lo up
ip link set eth0 up
if [ "$DHCP" = "no" ]; then
  echo "tiny-guest: dhcp skipped"
elif udhcpc -i eth0 -n -q -f -t 10 -T 1 -s /udhcpc.sh; then
  echo "tiny-guest: dhcp ok $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
else
  echo "tiny-guest: dhcp failed"
fi
if [ -n "$URL" ]; then
  echo "tiny-guest: fetching $URL"
  timeout 10 wget -q -O /tmp/fetched "$URL" && echo "tiny-guest: fetched:" && cat /tmp/fetched
  echo
  echo "tiny-guest: fetch done"
fi
if [ "$MODE" = "shell" ]; then
  echo "tiny-guest: shell on the console"
  while :; do sh -i; done
fi
if [ "$MODE" = "stay" ]; then
  echo "tiny-guest: staying up"
  while :; do sleep 3600; done
fi
echo "tiny-guest: powering off"
poweroff -f
"""

UDHCPC = r"""#!/bin/sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
    echo "tiny-guest: lease $ip/$mask router=$router hostname=$hostname"
    ;;
esac
exit 0
"""


def run(*argv: str, cwd: str | None = None) -> str:
    """
    Run a command; raise with its output if it fails.
    """
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def kernel_package() -> str:
    """
    The versioned kernel package that C{linux-image-amd64} depends on.
    """
    try:
        out = run("apt-cache", "depends", "linux-image-amd64")
    except RuntimeError:
        out = ""
    if "Depends: linux-image-" not in out:
        # a fresh machine may have no package lists yet
        run("apt-get", "update", "-qq")
        out = run("apt-cache", "depends", "linux-image-amd64")
    m = re.search(r"Depends: (linux-image-[0-9][^\s]*-amd64)", out)
    if not m:
        raise RuntimeError(f"cannot find the kernel package in:\n{out}")
    return m.group(1)


def decompress_bzimage(data: bytes) -> bytes:
    """
    Extract the ELF C{vmlinux} from an xz-compressed bzImage.
    """
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise RuntimeError("no xz payload in the kernel image")
    out = lzma.LZMADecompressor().decompress(data[start:])
    if not out.startswith(b"\x7fELF"):
        raise RuntimeError("the kernel payload is not an ELF image")
    return out


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """
    A cpio "newc" archive of (path, mode, content) entries (directories have no content).
    """
    out = io.BytesIO()
    ino = 1

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for path, mode, content in entries + [("TRAILER!!!", 0, b"")]:
        name = path.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08X}" for v in (ino, mode, 0, 0, 1, 0, len(content), 0, 0, 0, 0, len(name), 0)
        )
        out.write(header.encode())
        out.write(name)
        pad(110 + len(name))
        out.write(content)
        pad(len(content))
        ino += 1
    return out.getvalue()


def build(cache: str) -> str:
    """
    Build (or reuse) the guest; return its directory.
    """
    package = kernel_package()
    scripts = hashlib.sha256((INIT + UDHCPC + " ".join(MODULES)).encode()).hexdigest()[:12]
    target = os.path.join(cache, f"guest-{package}-{scripts}")
    if os.path.exists(os.path.join(target, "initrd.cpio")):
        return target
    work = tempfile.mkdtemp(prefix="tiny-guest-")
    try:
        run("apt-get", "download", package, "busybox-static", cwd=work)
        debs = [f for f in os.listdir(work) if f.endswith(".deb")]
        for deb in debs:
            run("dpkg-deb", "-x", deb, "root", cwd=work)
        root = os.path.join(work, "root")
        boot = os.path.join(root, "boot")
        vmlinuz = next(f for f in os.listdir(boot) if f.startswith("vmlinuz-"))
        version = vmlinuz[len("vmlinuz-") :]
        with open(os.path.join(boot, vmlinuz), "rb") as f:
            vmlinux = decompress_bzimage(f.read())
        modules_dir = os.path.join(root, "lib", "modules", version)
        found: dict[str, str] = {}
        for directory, _, files in os.walk(modules_dir):
            for name in files:
                if name.endswith(".ko") and name[:-3] in MODULES:
                    found[name[:-3]] = os.path.join(directory, name)
        missing = [m for m in MODULES if m not in found]
        if missing:
            raise RuntimeError(f"kernel {version} lacks modules {missing}")
        with open(os.path.join(root, "bin", "busybox"), "rb") as f:
            busybox = f.read()
        entries: list[tuple[str, int, bytes]] = [
            (d, 0o40755, b"") for d in ("bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules")
        ]
        entries.append(("bin/busybox", 0o100755, busybox))
        entries.append(("bin/sh", 0o100755, busybox))
        for m in MODULES:
            with open(found[m], "rb") as f:
                entries.append((f"lib/modules/{m}.ko", 0o100644, f.read()))
        entries.append(("init", 0o100755, INIT.replace("__MODULES__", " ".join(MODULES)).encode()))
        entries.append(("udhcpc.sh", 0o100755, UDHCPC.encode()))
        # A staging directory of this build's own: builds running at the same time
        # (parallel test runs) do not write into each other's.
        os.makedirs(cache, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=os.path.basename(target) + ".", dir=cache)
        os.chmod(cache, 0o755)
        os.chmod(staging, 0o755)
        with open(os.path.join(staging, "vmlinux"), "wb") as f:
            f.write(vmlinux)
        with open(os.path.join(staging, "initrd.cpio"), "wb") as f:
            f.write(newc_archive(entries))
        with open(os.path.join(staging, "VERSION"), "w") as f:
            f.write(f"{package}\n")
        try:
            os.rename(staging, target)
        except OSError:
            # Another build finished first (same inputs, same result): keep its.
            shutil.rmtree(staging, ignore_errors=True)
            if not os.path.exists(os.path.join(target, "initrd.cpio")):
                raise
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    """
    Build the guest and print its directory.
    """
    parser = argparse.ArgumentParser(description="Build the tiny test guest.")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help="cache directory")
    args = parser.parse_args()
    print(build(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
