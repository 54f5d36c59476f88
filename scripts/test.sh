#!/bin/bash
# Runs Ember's whole test suite: sets the machine up (idempotent), lints, checks
# the import layers, runs the CRI conformance gate (scripts/critest.sh: critest
# with runc and with ember; EMBER_SKIP_CRITEST=1 skips it), then every test, including those that
# boot VMs and start containerd. Fails if the gate or pytest fails; pytest's
# summary line is the last line of the output.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMBER_SETUP_DEMO=0 "$HERE/scripts/setup.sh"
VENV="${EMBER_VENV:-/opt/ember/venv}"
cd "$HERE"
"$VENV/bin/ruff" check src tests bench
PYTHONPATH="$HERE/src" "$VENV/bin/lint-imports"  # the layers (pyproject.toml [tool.importlinter])
PYTHONPATH="$HERE/src" "$VENV/bin/mypy"  # types (pyproject.toml [tool.mypy])
critest_rc=0
if [ "${EMBER_SKIP_CRITEST:-0}" = 1 ]; then
  echo "critest gate: skipped (EMBER_SKIP_CRITEST=1)"
else
  "$HERE/scripts/critest.sh" || critest_rc=$?
fi
pytest_rc=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@" || pytest_rc=$?
if [ "$pytest_rc" != 0 ]; then exit "$pytest_rc"; fi
exit "$critest_rc"
