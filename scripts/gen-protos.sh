#!/bin/bash
# Regenerates the Python code for Ember's .proto files (committed, so that the
# guest and a fresh install need no compiler). Run after editing a .proto.
set -euo pipefail
cd "$(dirname "$0")/../src"
PY="${EMBER_VENV:-/opt/ember/venv}/bin/python"
for proto in $(find ember -name '*.proto'); do
  extra=()
  # Services served over gRPC (not ttrpc) say so with a "// ember:grpc" line.
  if grep -q '^// ember:grpc' "$proto"; then extra=(--grpc_python_out=.); fi
  "$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. "${extra[@]}" "$proto"
done
