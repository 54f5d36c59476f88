#!/bin/bash
# Regenerates the Python code for Ember's .proto files (committed, so that the
# guest and a fresh install need no compiler). Run after editing a .proto.
set -euo pipefail
cd "$(dirname "$0")/../src"
PY="${EMBER_VENV:-/opt/ember/venv}/bin/python"
for proto in $(find ember -name '*.proto'); do
  "$PY" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. "$proto"
done
# Drop empty *_pb2_grpc.py files for services we serve over ttrpc only.
find ember -name '*_pb2_grpc.py' -size -400c -delete
