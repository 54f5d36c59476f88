#!/bin/bash
# Makes the webhook's CA and serving certificate, stores them as the Secret
# ember-system/ember-webhook-tls, and applies the webhook configurations with
# caBundle filled in. Needs `ember` and `kubectl` on PATH.
#   deploy/kubernetes/make-webhook-cert.sh [--dry-run]   (dry run: print, apply nothing)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NS=ember-system
SERVICE=ember-webhook
DIR="$(mktemp -d)"
trap 'rm -rf "$DIR"' EXIT

ember k8s certs --out "$DIR" --service "$SERVICE" --namespace "$NS" \
  --fill "$HERE/webhook-configuration.yaml" > "$DIR/webhook-configuration.yaml"

if [ "${1:-}" = "--dry-run" ]; then
  cat "$DIR/webhook-configuration.yaml"
  exit 0
fi
kubectl -n "$NS" create secret tls ember-webhook-tls \
  --cert="$DIR/tls.crt" --key="$DIR/tls.key" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f "$DIR/webhook-configuration.yaml"
