#!/bin/sh
# README command 2: set up and run the whole test suite with trial, as root.
# Extra arguments name test modules (default: all of tests/).
set -eu
cd "$(dirname "$0")/.."
tools/setup.sh --test
tools/start-libvirtd.sh
if [ $# -eq 0 ]; then set -- tests; fi
exec .venv/bin/python -m twisted.trial "$@"
