#!/bin/bash
# Sets up Ember on a Debian 12 machine, as root: system packages, a virtualenv
# with the ember package, the commands on PATH, /etc/ember/config.toml (if
# absent), the guest assets (kernel, initrd, rootfs) and a small demo image.
# Idempotent: a second run is fast.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EMBER_VENV:-/opt/ember/venv}"
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" != 0 ]; then echo "setup.sh: run as root" >&2; exit 1; fi

APT_PACKAGES=(
  qemu-system-x86 qemu-utils e2fsprogs xfsprogs util-linux kmod cpio
  busybox-static python3 python3-venv python3-dev gcc
  containerd runc crun docker-registry iproute2 openssl ca-certificates
  libseccomp2 lvm2 thin-provisioning-tools zstd lz4
  containernetworking-plugins
  iptables
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# QEMU 8.2 or later: sandboxes restored from one VM template share its memory
# only where QEMU maps a read-only file as private RAM (memory-backend-file
# `rom`, 8.2). Debian 12 ships 7.2; its backports have a current QEMU. Ember
# still works with 7.2 (every restore then copies the template's RAM).
QEMU_MIN="1:8.2"
qemu_version() { dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true; }
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ] && [ "${EMBER_QEMU_BACKPORTS:-1}" = 1 ] &&
   ! dpkg --compare-versions "$(qemu_version)" ge "$QEMU_MIN"; then
  echo "==> installing QEMU from bookworm-backports"
  echo "deb http://deb.debian.org/debian bookworm-backports main" \
    > /etc/apt/sources.list.d/ember-backports.list
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-utils >/dev/null
fi
# Debian starts these services on install; Ember's tests start their own.
for svc in containerd docker-registry; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating virtualenv $VENV"
  mkdir -p "$(dirname "$VENV")"
  /usr/bin/python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
echo "==> installing ember into $VENV"
"$VENV/bin/pip" install -q -e "$HERE[test]"

for cmd in ember containerd-shim-ember-v2 ember-snapshotter ember-jailer; do
  if [ -x "$VENV/bin/$cmd" ]; then ln -sf "$VENV/bin/$cmd" "/usr/local/bin/$cmd"; fi
done

# The config file containerd's runtime handlers name (deploy/containerd/
# ember-runtime.toml: ConfigPath). Generated from Ember's defaults, every key
# commented out; an existing file is never touched.
echo "==> configuration"
ember config default --write /etc/ember/config.toml

echo "==> building guest assets (cached)"
ember guest build

if [ "${EMBER_SETUP_DEMO:-1}" = 1 ]; then
  ember image inspect ember-demo:latest >/dev/null 2>&1 || {
    echo "==> creating the demo image ember-demo:latest (busybox)"
    "$VENV/bin/python" -m ember.image.demo ember-demo:latest
  }
fi
echo "==> ready"
