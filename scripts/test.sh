#!/bin/bash
# Runs Ember's whole test suite: sets the machine up (idempotent), lints, then
# runs every test, including those that boot VMs and start containerd.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMBER_SETUP_DEMO=0 "$HERE/scripts/setup.sh"
VENV="${EMBER_VENV:-/opt/ember/venv}"
cd "$HERE"
"$VENV/bin/ruff" check src tests bench
exec "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
