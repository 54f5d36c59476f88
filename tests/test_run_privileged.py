"""ember run --privileged: all capabilities and devices of the guest, never the host's.

One container of each kind runs the same script: the privileged one has every
capability, sees the guest's devices (its container disk, /dev/loop-control,
/dev/mapper/control, whose modules load on open), can make a bridge and
writes /sys; the unprivileged one has Docker's default set and
none of that.
"""

from __future__ import annotations

import os
import re

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

SCRIPT = (
    "grep CapEff /proc/self/status | tr -d '\\t' | sed 's/CapEff:/CAPEFF=/';"
    "for d in loop-control mapper/control sda net/tun; do"
    "  [ -c /dev/$d ] || [ -b /dev/$d ] && echo HAS=$d; done;"
    "brctl addbr br7 2>/dev/null && echo BRIDGE=ok;"
    "echo 1 > /sys/class/net/lo/mtu 2>/dev/null; echo SYS_RW=$?;"
    "echo DONE"
)


def run_script(ember_env, image, *flags):
    proc = ember_env.run("run", "--rm", *flags, image, "sh", "-c", SCRIPT, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0 and "DONE" in out, (out, proc.stderr.decode())
    return out, dict(re.findall(r"^([A-Z_]+)=(\S+)$", out, re.M))


def test_privileged_container_gets_the_guests_capabilities_and_devices(ember_env, image):
    out, v = run_script(ember_env, image, "--privileged")
    assert int(v["CAPEFF"], 16) == (1 << 41) - 1  # all 41 capabilities of the 6.1 kernel
    has = set(re.findall(r"^HAS=(\S+)$", out, re.M))
    assert {"loop-control", "mapper/control", "sda", "net/tun"} <= has, out
    assert v.get("BRIDGE") == "ok", out
    assert v["SYS_RW"] == "0", out


def test_unprivileged_container_gets_none_of_it(ember_env, image):
    out, v = run_script(ember_env, image)
    assert v["CAPEFF"] == "00000000a80425fb"  # Docker's default set
    assert not re.findall(r"^HAS=", out, re.M), out
    assert "BRIDGE" not in v, out
    assert v["SYS_RW"] != "0", out


def test_the_guest_kernel_loads_no_apparmor_policy(ember_env, image):
    """What the feature matrix says of appArmorProfile: the guest kernel has the
    AppArmor LSM but no profile is loaded in it, so a pod's profile is not enforced."""
    script = ("mount -t securityfs none /sys/kernel/security && "
              "echo LSM=$(cat /sys/kernel/security/lsm) && "
              "echo PROFILES=$(wc -l < /sys/kernel/security/apparmor/profiles)")
    proc = ember_env.run("run", "--rm", "--privileged", image, "sh", "-c", script,
                         timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    v = dict(re.findall(r"^([A-Z]+)=(\S+)$", proc.stdout.decode(), re.M))
    assert "apparmor" in v["LSM"].split(","), v
    assert v["PROFILES"] == "0", v
