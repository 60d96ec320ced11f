#!/bin/sh
# README command 1: set up and run the hypervisor daemon in the foreground, as root.
# Extra arguments are daemon flags, e.g.: tools/run-daemon.sh -portNum 6976
# Creates what is missing for TLS: the CA (/etc/ssl/CA.pem), the daemon's certificate
# (/etc/ssl/hypervisor/) and an admin certificate in ~/.ssl for vm-control/hyper-control.
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh
tools/start-libvirtd.sh
if [ ! -e "$HOME/.ssl/admin.cert" ]; then
  .venv/bin/hypervisor "$@" make-certs --user admin --methods '*.*' \
    || echo "run-daemon: could not make certificates (see above); HTTPS may be off" >&2
elif [ ! -e /etc/ssl/hypervisor/cert.pem ]; then
  .venv/bin/hypervisor "$@" make-certs \
    || echo "run-daemon: could not make the daemon's certificate; HTTPS may be off" >&2
fi
exec .venv/bin/hypervisor "$@" run
