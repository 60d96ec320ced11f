#!/bin/sh
# README command 1: set up and run the hypervisor daemon in the foreground, as root.
# Extra arguments are daemon flags, e.g.: tools/run-daemon.sh -portNum 6976
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh
tools/start-libvirtd.sh
exec .venv/bin/hypervisor "$@" run
