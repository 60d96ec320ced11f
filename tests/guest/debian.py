"""
Build the Debian 12 guest with stock cloud-init, offline, from the distribution's
archive (apt works without internet here), for the end-to-end metadata test.

    python -m tests.guest.debian [--cache DIR]    # prints the directory holding it

C{mmdebstrap --variant=minbase} of bookworm with Debian's unmodified C{cloud-init}
package (and C{/etc/cloud} untouched), made into:

- C{root.img}: a raw ext4 image of the tree (the VM's root volume, C{/dev/vda});
- C{vmlinux}: the image's kernel, its xz payload decompressed to the ELF image (PVH
  boot, about twice as fast under TCG as the bzImage);
- C{initrd.img}: an initramfs of initramfs-tools with only C{virtio_pci virtio_blk
  ext4} (C{MODULES=list}).

The guest boots with C{init=/usr/local/sbin/hv-cloud-init}: a short script that runs
cloud-init's own stages in the order systemd would (C{ds-identify}, C{init --local},
C{ifup -a} of the configuration cloud-init wrote, C{init}, C{modules --mode config},
C{modules --mode final}) and powers off; a full systemd boot works too but costs
another 30-60 s under TCG (reference/environment.md, "A Debian guest with stock
cloud-init"). Pitfalls handled: the host's C{/etc/resolv.conf} and C{/etc/hostname}
are not kept (cloud-init would wait on DNS), and the C{en_US.UTF-8} locale is made.

The result is cached in C{/var/cache/smallstack-hypervisor/debian-cloud-<hash>/} (the
tiny guest's cache; the hash covers this recipe and the kernel package version) and
reused while unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from tests.guest import build

PACKAGES = [
    "linux-image-amd64",
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "locales",
    "kmod",
]

SOURCES = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]

# Runs as PID 1: cloud-init's stages, as its systemd units would run them.
INIT = r"""#!/bin/sh
exec </dev/console >/dev/console 2>&1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=en_US.UTF-8
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
mkdir -p /run/lock /run/network
hostname localhost
ip link set lo up
modprobe virtio_net
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
echo "hv-cloud-init: eth0 present, ds-identify"
/usr/lib/cloud-init/ds-identify
cat /run/cloud-init/cloud.cfg 2>/dev/null
echo "hv-cloud-init: init --local"
cloud-init init --local
echo "hv-cloud-init: ifup"
ifup -a
echo "hv-cloud-init: init"
cloud-init init
echo "hv-cloud-init: modules config"
cloud-init modules --mode config
echo "hv-cloud-init: modules final"
cloud-init modules --mode final
echo "hv-cloud-init: hostname=$(hostname)"
cloud-init status --long
echo "hv-cloud-init: powering off"
sync
echo o > /proc/sysrq-trigger
sleep 30
"""

SETUP_HOOK = (
    'mkdir -p "$1/etc/initramfs-tools/conf.d" && '
    'printf "MODULES=list\\nCOMPRESS=gzip\\n" > "$1/etc/initramfs-tools/conf.d/hv-guest"'
)

CUSTOMIZE_HOOKS = [
    'printf "virtio_pci\\nvirtio_blk\\next4\\n" > "$1/etc/initramfs-tools/modules"',
    'chroot "$1" update-initramfs -u -k all',
    'echo "en_US.UTF-8 UTF-8" > "$1/etc/locale.gen" && chroot "$1" locale-gen',
    'echo "LANG=en_US.UTF-8" > "$1/etc/default/locale"',
    'rm -f "$1/etc/hostname" && : > "$1/etc/resolv.conf"',
    'echo "/dev/vda / ext4 rw 0 1" > "$1/etc/fstab"',
    'rm -rf "$1/usr/share/doc" "$1/usr/share/man" "$1/var/cache/apt" "$1/var/lib/apt/lists"',
]

IMAGE_SIZE = "1536M"


def recipe_hash(kernel: str) -> str:
    """
    A short hash of everything the image is made from.
    """
    text = "\n".join([kernel, *PACKAGES, *SOURCES, INIT, SETUP_HOOK, *CUSTOMIZE_HOOKS, IMAGE_SIZE])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_image(cache: str) -> str:
    """
    Build (or reuse) the guest; return its directory (C{root.img}, C{vmlinux},
    C{initrd.img}).
    """
    kernel = build.kernel_package()
    target = os.path.join(cache, f"debian-cloud-{recipe_hash(kernel)}")
    if os.path.exists(os.path.join(target, "root.img")):
        return target
    for tool in ("mmdebstrap", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (tools/setup.sh --test installs it)")
    os.makedirs(cache, exist_ok=True)
    os.chmod(cache, 0o755)
    work = tempfile.mkdtemp(prefix="debian-guest-", dir=cache)
    try:
        tree = os.path.join(work, "tree")
        init_path = os.path.join(work, "hv-cloud-init")
        with open(init_path, "w") as script:
            script.write(INIT)
        hooks = [
            f'install -m 0755 "{init_path}" "$1/usr/local/sbin/hv-cloud-init"',
            *CUSTOMIZE_HOOKS,
        ]
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--quiet",
            f"--include={','.join(PACKAGES)}",
            f"--setup-hook={SETUP_HOOK}",
            *[f"--customize-hook={h}" for h in hooks],
            "bookworm",
            tree,
            *SOURCES,
        ]
        build.run(*argv)
        boot = os.path.join(tree, "boot")
        vmlinuz = sorted(f for f in os.listdir(boot) if f.startswith("vmlinuz-"))[-1]
        version = vmlinuz[len("vmlinuz-") :]
        staging = os.path.join(work, "out")
        os.makedirs(staging)
        os.chmod(staging, 0o755)
        with open(os.path.join(boot, vmlinuz), "rb") as packed:
            vmlinux = build.decompress_bzimage(packed.read())
        with open(os.path.join(staging, "vmlinux"), "wb") as out:
            out.write(vmlinux)
        shutil.copyfile(
            os.path.join(boot, f"initrd.img-{version}"), os.path.join(staging, "initrd.img")
        )
        build.run(
            "mkfs.ext4",
            "-q",
            "-L",
            "root",
            "-d",
            tree,
            os.path.join(staging, "root.img"),
            IMAGE_SIZE,
        )
        with open(os.path.join(staging, "VERSION"), "w") as version_file:
            version_file.write(f"{kernel}\n{recipe_hash(kernel)}\n")
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
        shutil.rmtree(target, ignore_errors=True)
        os.rename(staging, target)
        return target
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)


def main() -> int:
    """
    Build the guest and print its directory.
    """
    parser = argparse.ArgumentParser(description="Build the Debian cloud-init test guest.")
    parser.add_argument("--cache", default=build.DEFAULT_CACHE, help="cache directory")
    args = parser.parse_args()
    print(build_image(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
