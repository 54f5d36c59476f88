#!/bin/sh
# Ember guest /init (busybox sh, PID 1 in the initramfs).
#
# Loads the virtio modules, mounts the read-only rootfs from /dev/vda, gives
# it /proc, /sys, /dev, cgroup2 and tmpfs scratch space, then hands PID 1 to
# the ember agent. Any failure prints one EMBER-INIT-ERROR line on the console
# and powers the VM off, so a broken guest fails fast instead of hanging until
# the host's boot timeout.
#
# Kernel command line knobs: ember.debug=1 (stage timestamps on the console,
# and the agent's --debug), ember.hostname=NAME, root=DEV (default /dev/vda),
# and `-- CMD ARGS...` to run CMD in the new root instead of the agent, then
# power off (diagnostics).
# The builder fills in the module list (in load order) and PYTHONPATH.

export PATH=/bin
DEBUG=
ROOT=/dev/vda
NAME=ember
PROC=/proc

die() {
	echo "EMBER-INIT-ERROR: $*"
	sync
	poweroff -f
	reboot -f
	while :; do sleep 1; done
}

stamp() {
	[ -n "$DEBUG" ] && echo "EMBER-INIT: $(cut -d' ' -f1 $PROC/uptime) $*"
	return 0
}

mount -t proc -o nosuid,nodev,noexec proc /proc || die "cannot mount /proc"
CMDLINE="$(cat /proc/cmdline)"
set -f # split the command line into words, but never glob them
for arg in $CMDLINE; do
	case "$arg" in
	--) break ;;
	ember.debug=1) DEBUG=1 ;;
	ember.hostname=*) NAME="${arg#*=}" ;;
	root=*) ROOT="${arg#root=}" ;;
	esac
done
set +f
stamp "init started"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || die "cannot mount /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || die "cannot mount devtmpfs on /dev"

LOADED=" "
load() {
	for mod in "$@"; do
		case "$LOADED" in *" $mod "*) continue ;; esac
		insmod "/lib/modules/$mod.ko" || die "cannot load kernel module $mod"
		LOADED="$LOADED$mod "
	done
}
@MODULE_LOADING@
stamp "modules loaded:$LOADED"

i=0
while [ ! -b "$ROOT" ]; do
	i=$((i + 1))
	[ $i -gt 1000 ] && die "root device $ROOT did not appear (attach the rootfs as a virtio-blk device)"
	sleep 0.01
done
mount -t ext4 -o ro "$ROOT" /newroot || die "cannot mount $ROOT read-only as ext4 on /newroot"
[ -x /newroot/usr/bin/python3.11 ] || die "$ROOT is not an ember guest rootfs (no /usr/bin/python3.11)"
stamp "rootfs mounted"

N=/newroot
mount --move /proc $N/proc || die "cannot move /proc"
PROC=$N/proc
mount --move /sys $N/sys || die "cannot move /sys"
mount --move /dev $N/dev || die "cannot move /dev"
mkdir -p $N/dev/pts $N/dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts $N/dev/pts || die "cannot mount /dev/pts"
mount -t tmpfs -o nosuid,nodev,mode=1777 shm $N/dev/shm || die "cannot mount /dev/shm"
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 $N/sys/fs/cgroup || die "cannot mount cgroup2"
for c in $(cat $N/sys/fs/cgroup/cgroup.controllers); do
	echo "+$c" >$N/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
done
for c in cpu memory pids io; do
	grep -qw $c $N/sys/fs/cgroup/cgroup.subtree_control || die "cannot enable the $c cgroup controller"
done
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs $N/run || die "cannot mount /run"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $N/tmp || die "cannot mount /tmp"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs $N/var/tmp || die "cannot mount /var/tmp"
hostname "$NAME" || die "cannot set hostname $NAME"
# Loopback up, as any init does: a container with no network (`--network none`)
# still has a working 127.0.0.1, and a pod's set-up finds it done (agent/netconf.py).
ip link set dev lo up || die "cannot bring up the loopback interface"
# udev-style names for virtio-serial ports, for humans; the agent reads sysfs.
mkdir -p $N/dev/virtio-ports
for p in $N/sys/class/virtio-ports/*; do
	[ -r "$p/name" ] && ln -sf "../${p##*/}" "$N/dev/virtio-ports/$(cat "$p/name")"
done
stamp "mounts ready"

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 TERM=linux
export PYTHONPATH=@PYTHONPATH@ PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
AGENT_DEBUG=
[ -n "$DEBUG" ] && AGENT_DEBUG=--debug
case " $CMDLINE " in
*" -- "*)
	[ $# -gt 0 ] || die "nothing to run after -- on the kernel command line"
	stamp "running $*"
	exec switch_root $N /bin/sh -c '"$@"; echo "EMBER-INIT: command exited with status $?"; poweroff -f' sh "$@"
	;;
esac
stamp "starting agent"
exec switch_root $N /usr/bin/python3.11 -m ember.agent --channel auto $AGENT_DEBUG
die "switch_root to $ROOT failed"
