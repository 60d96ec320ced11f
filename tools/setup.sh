#!/bin/sh
# Install what smallstack-hypervisor needs on Debian 12, as root: Debian packages and a
# Python virtual environment in .venv with the project installed in it.
#   tools/setup.sh          the daemon's needs
#   tools/setup.sh --test   also what the test suite needs (its real peers included)
#   tools/setup.sh --bench  also the peers of the benchmarks (bench/dhcp.py: perfdhcp,
#                           Kea, dnsmasq; the bench runs its own instances)
set -eu
cd "$(dirname "$0")/.."

packages="libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils libvirt-dev pkg-config
gcc python3-dev python3-venv curl nftables e2fsprogs fdisk"
# nftables: the metadata server's bridge rule (a table of its own).
# e2fsprogs, fdisk (sfdisk): ChangeVmVolumeSize grows the file system in a volume.
extra=""
if [ "${1:-}" = "--test" ]; then
  # openssl: real TLS client in tests; procps: pgrep for libvirtd restarts;
  # chromium: the real browser of the page tests.
  # busybox (udhcpc), isc-dhcp-client, dhcpcd-base: the DHCP server's real clients;
  # kea-admin (perfdhcp) and tcpdump: the smoke run of bench/dhcp.py.
  packages="$packages openssl procps chromium busybox isc-dhcp-client dhcpcd-base"
  packages="$packages kea-admin tcpdump"
  # cloud-init: its readers against the metadata server; mmdebstrap: the Debian guest
  # with stock cloud-init (tests/guest/debian.py).
  packages="$packages cloud-init mmdebstrap"
  # tftp-hpa, atftp (and curl, busybox): the TFTP server's real clients.
  packages="$packages tftp-hpa atftp"
  # tor (with tor-gencert): the onion-service tests run a private Tor network on loopback
  # (tests/tornet.py); an operator using -pbOnion installs tor the same way.
  packages="$packages tor"
  # iputils-ping: the migration tests ping the guest while it moves; rsync: bench/migrate.py.
  packages="$packages iputils-ping rsync"
  extra="[test]"
fi
if [ "${1:-}" = "--bench" ]; then
  # kea-admin: perfdhcp; tcpdump: its latencies; kea-dhcp4-server and dnsmasq-base:
  # the DHCP peers (bench/dhcp.py --profile also wants: .venv/bin/pip install py-spy).
  packages="$packages kea-admin tcpdump kea-dhcp4-server dnsmasq-base"
  # wrk and nginx-light: bench/metadata.py's load generator and peer.
  packages="$packages wrk nginx-light"
  # tftpd-hpa: bench/tftp.py's lock-step peer (atftpd, the windowed one, is unpacked
  # below: the two conflict as packages); atftp: its client.
  packages="$packages tftpd-hpa atftp"
  extra="[test]"
fi

missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if [ "${1:-}" = "--bench" ] && [ ! -x /opt/atftpd/usr/sbin/atftpd ]; then
  echo "setup: unpacking atftpd into /opt/atftpd"
  tmp=$(mktemp -d)
  chmod 755 "$tmp"
  (cd "$tmp" && apt-get download -qq atftpd)
  dpkg-deb -x "$tmp"/atftpd_*.deb /opt/atftpd
  rm -rf "$tmp"
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
echo "setup: installing smallstack-hypervisor$extra into .venv"
.venv/bin/pip install -q --disable-pip-version-check ".$extra"
