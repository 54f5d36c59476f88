"""Start-up benchmark: `ember run --rm IMAGE true` against a bare QEMU boot.

The floor, measured in the same run, is QEMU booting the same kernel, initrd
and guest rootfs with the same devices to init, running `true` and powering
off — everything a VM must do, with none of Ember's work. The benchmark
prints the median of each, their ratio (goal: <= 1.3), and the host memory of
one idle sandbox beyond the guest RAM it actually touched.

    python bench/startup.py [--image ember-demo:latest] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
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
        argv = QemuVMM(spec, cfg.vm.qemu_binary).argv()
        start = time.monotonic()
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=300, check=True)
        elapsed = time.monotonic() - start
        console = (Path(tmp) / "console.log").read_text(errors="replace")
        if "command exited with status 0" not in console:
            raise SystemExit(f"floor VM did not run /bin/true: {console[-500:]}")
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
    args = parser.parse_args()
    cfg = load_config()
    ember_once(args.image)  # warm-up: flattens the image, builds the template if needed
    floor, ember = [], []
    for _ in range(args.runs):
        floor.append(floor_once(cfg))
        ember.append(ember_once(args.image))
    f, e = statistics.median(floor), statistics.median(ember)
    print(f"floor (bare QEMU boot to init + poweroff): median {f:.2f}s over {args.runs} runs")
    print(f"ember run --rm {args.image} true:          median {e:.2f}s over {args.runs} runs")
    print(f"ratio ember/floor: {e / f:.2f}  (goal <= 1.3)")
    mem = idle_memory(args.image)
    print(f"idle sandbox host memory beyond touched guest RAM: {mem['overhead_uss_mib']} MiB "
          f"unique (USS), {mem['overhead_rss_mib']} MiB counting shared libraries (RSS)")
    print(json.dumps(mem))


if __name__ == "__main__":
    sys.exit(main())
