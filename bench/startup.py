"""Start-up benchmark: `ember run --rm IMAGE true` against the floors it stands on.

Measured in one run, interleaved so a busy host slows all alike:

* the cold-boot floor: bare QEMU booting the same kernel, initrd and guest
  rootfs with the same devices to init, running `true` and powering off;
* the restore floor: Ember's own unjailed restore of the VM template to an
  agent that answers, then kill — what every sandbox start must pay;
* the jailed restore: the same through ember-jailer;
* `ember run --rm IMAGE true`.

It prints each median and the ratios `ember run / restore floor` (issue 14's
goal: <= 2.0), `jailed restore / restore floor` (goal <= 1.25) and `ember run /
cold-boot floor`, and the host memory of one idle sandbox beyond the guest RAM
it actually touched.

    python bench/startup.py [--image ember-demo:latest] [--runs 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ember.config import load_config
from ember.sandbox.vm import SandboxVM
from ember.vmm.qemu import QemuVMM


def floor_once(cfg) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
        vm = SandboxVM(cfg, "bench-floor", Path(tmp), cfg.vm.vcpus, cfg.vm.memory_mib)
        spec = vm.base_spec()
        spec.cmdline += " -- /bin/true"
        spec.jailer = None  # the floor is bare QEMU
        vmm = QemuVMM(spec, cfg.vm.qemu_binary)
        argv = vmm.argv()  # opens the QMP/agent sockets and console QEMU inherits
        start = time.monotonic()
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=300, check=True,
                           pass_fds=tuple(vmm._inherited_fds()))
        finally:
            vmm._close_channels()
        elapsed = time.monotonic() - start
        console = (Path(tmp) / "console.log").read_text(errors="replace")
        if "command exited with status 0" not in console:
            raise SystemExit(f"floor VM did not run /bin/true: {console[-500:]}")
        return elapsed


def restore_once(jailed: bool) -> float:
    """One restore in a fresh process, as a sandbox monitor boots: each its own
    (a VM leaves threads behind, and a monitor starts the jailer before it has
    any: ember.jailer.launch)."""
    out = subprocess.run([sys.executable, __file__, "--restore-once",
                          "jailed" if jailed else "unjailed"], check=True, timeout=300,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL).stdout
    return float(out.split()[-1])


def _restore_in_this_process(cfg, jailed: bool) -> float:
    """Restore the template to an agent that answers (SandboxVM.boot), then kill."""
    cfg = copy.deepcopy(cfg)
    if jailed:
        from ember.jailer import launch

        launch.prefork()  # what the monitor does first thing (a fork, ~1 ms: untimed)
    cfg.jailer.enabled = jailed
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/tmp") as tmp:
        vm = SandboxVM(cfg, f"bench-restore-{os.getpid()}", Path(tmp), cfg.vm.vcpus,
                       cfg.vm.memory_mib, use_template=True)
        start = time.monotonic()
        try:
            vm.boot()
            elapsed = time.monotonic() - start
            if not vm.restored:
                raise SystemExit("the restore floor needs a VM template (run `ember run` once)")
        finally:
            vm.kill()
        return elapsed


def ember_once(image: str) -> float:
    start = time.monotonic()
    subprocess.run(["ember", "run", "--rm", image, "true"], check=True, timeout=300,
                   stdin=subprocess.DEVNULL)
    return time.monotonic() - start


def guest_touched_bytes(pid: int, guest_bytes: int) -> int:
    """RSS of QEMU's guest-RAM mapping: the guest memory actually touched."""
    touched = 0
    size = rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.startswith(("Size", "Rss")):
                if size == guest_bytes:
                    touched = max(touched, rss)
                size = rss = 0
            elif line.startswith("Size:"):
                size = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
    if size == guest_bytes:
        touched = max(touched, rss)
    return touched


def idle_memory(image: str) -> dict:
    out = subprocess.run(["ember", "run", "-d", image, "sleep", "600"], check=True,
                         capture_output=True, text=True, timeout=300).stdout.strip()
    sid = out.splitlines()[-1]
    try:
        time.sleep(3)
        info = json.loads(subprocess.run(["ember", "inspect", sid], check=True,
                                         capture_output=True, text=True).stdout)[0]
        guest = info["memory_mib"] << 20
        qemu = psutil.Process(info["vmm_pid"])
        monitor = psutil.Process(info["monitor_pid"])
        touched = guest_touched_bytes(qemu.pid, guest)
        qemu_rss = qemu.memory_info().rss
        mon_rss = monitor.memory_info().rss
        # USS leaves out shared libraries, which every sandbox shares.
        qemu_uss = qemu.memory_full_info().uss
        mon_uss = monitor.memory_full_info().uss
        return {
            "guest_ram_mib": guest >> 20,
            "guest_touched_mib": round(touched / 2**20, 1),
            "qemu_rss_mib": round(qemu_rss / 2**20, 1),
            "monitor_rss_mib": round(mon_rss / 2**20, 1),
            "overhead_rss_mib": round((qemu_rss - touched + mon_rss) / 2**20, 1),
            "overhead_uss_mib": round((qemu_uss - touched + mon_uss) / 2**20, 1),
        }
    finally:
        subprocess.run(["ember", "rm", "-f", sid], check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="ember-demo:latest")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--restore-once", choices=("jailed", "unjailed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = load_config()
    if args.restore_once:
        print(_restore_in_this_process(cfg, args.restore_once == "jailed"))
        return
    ember_once(args.image)  # warm-up: flattens the image, builds the template if needed
    runs: dict[str, list[float]] = {"floor": [], "restore": [], "jailed": [], "ember": []}
    for _ in range(args.runs):
        runs["floor"].append(floor_once(cfg))
        runs["restore"].append(restore_once(jailed=False))
        runs["jailed"].append(restore_once(jailed=True))
        runs["ember"].append(ember_once(args.image))
    m = {k: statistics.median(v) for k, v in runs.items()}
    n = args.runs
    print(f"cold-boot floor (bare QEMU boot to init + poweroff): median {m['floor']:.2f}s ({n} runs)")
    print(f"restore floor (unjailed template restore to agent): median {m['restore']:.2f}s")
    print(f"jailed restore:                                      median {m['jailed']:.2f}s")
    print(f"ember run --rm {args.image} true:               median {m['ember']:.2f}s")
    print(f"ember run / restore floor: {m['ember'] / m['restore']:.2f}  (goal <= 2.0)")
    print(f"jailed restore / restore floor: {m['jailed'] / m['restore']:.2f}  (goal <= 1.25)")
    print(f"ember run / cold-boot floor: {m['ember'] / m['floor']:.2f}")
    mem = idle_memory(args.image)
    print(f"idle sandbox host memory beyond touched guest RAM: {mem['overhead_uss_mib']} MiB "
          f"unique (USS), {mem['overhead_rss_mib']} MiB counting shared libraries (RSS)")
    print(json.dumps(mem))


if __name__ == "__main__":
    sys.exit(main())
