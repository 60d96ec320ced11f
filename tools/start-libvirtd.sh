#!/bin/sh
# Make sure libvirtd (and virtlogd, which domain starts need) run, as root.
# Uses systemd where it is PID 1; otherwise starts both daemons in the background
# (logs under /var/log/libvirt/). Does nothing if qemu:///system already answers.
set -eu

answers() { virsh -c qemu:///system version >/dev/null 2>&1; }

# Without this libvirt re-probes QEMU on every call (+4 s per domain start).
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
  chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

answers && exit 0
if [ -d /run/systemd/system ]; then
  systemctl start virtlogd.socket libvirtd.socket libvirtd.service
else
  mkdir -p /var/log/libvirt
  pgrep -x virtlogd >/dev/null || virtlogd -d
  if ! pgrep -x libvirtd >/dev/null; then
    LIBVIRT_LOG_OUTPUTS="3:file:/var/log/libvirt/libvirtd.log" libvirtd -d
  fi
fi
i=0
until answers; do
  i=$((i + 1))
  if [ $i -gt 600 ]; then
    echo "start-libvirtd: libvirtd did not answer on qemu:///system within 60 s" >&2
    echo "see /var/log/libvirt/libvirtd.log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "start-libvirtd: libvirtd answers on qemu:///system"
