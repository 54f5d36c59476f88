"""Density benchmark: how much host memory one more idle sandbox costs, and
whether starting gets slower as sandboxes pile up.

Starts N idle sandboxes one by one (``ember run -d IMAGE sleep 3600``) and
after each records the start time, the host memory in use (MemTotal -
MemAvailable: noisy when others run on the host) and the PSS of this run's own
processes: every sandbox's VMM (QEMU), its jailer waiter (the VMM's parent
when jailed, if that is not the monitor itself) and its sandbox monitor. It prints the per-sandbox slope of both
(least squares over all N), the split of the last sandbox's PSS, and the start
time of the last sandboxes against the first: medians of 3, and the least-squares
line through all N starts at N against at 1 (on this 2-core machine one start
swings by +-20%, so three at each end can make a trend of noise; the line uses
every start). Then it removes
them all and checks that none of its processes is left and that the host
memory came back (within 64 MiB + 2%; others' work on the host counts too).

Issue 14's goals: <= 60 MiB PSS per idle sandbox (512 MiB guest), last start
<= 1.3 x first.

    python bench/density.py [--count 40] [--image ember-demo:latest] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import psutil


def ember(*args: str, timeout: float = 300) -> str:
    proc = subprocess.run(["ember", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"ember {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


def host_used_mib() -> float:
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


def pss_mib(pid: int | None) -> float:
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def sandbox_pids(sid: str) -> dict[str, int | None]:
    info = json.loads(ember("inspect", sid))[0]
    vmm, monitor = info.get("vmm_pid"), info.get("monitor_pid")
    waiter = None
    if vmm and info.get("jail"):
        try:
            waiter = psutil.Process(vmm).ppid()
        except psutil.Error:
            waiter = None
    if waiter == monitor:  # QEMU ran in place (docs/jailer.md): no waiter between
        waiter = None
    return {"qemu": vmm, "waiter": waiter, "monitor": monitor}


def slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--image", default="ember-demo:latest")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds to wait after each start before measuring")
    parser.add_argument("--json", help="also write the samples to this file")
    args = parser.parse_args()

    ember("run", "--rm", args.image, "true")  # warm-up: image flattened, template built
    time.sleep(1)
    base_used = host_used_mib()
    ids: list[str] = []
    pids: dict[str, dict[str, int | None]] = {}
    samples = []
    try:
        for i in range(1, args.count + 1):
            start = time.monotonic()
            sid = ember("run", "-d", "--label", "bench=density", args.image,
                        "sleep", "3600").strip().splitlines()[-1]
            took = time.monotonic() - start
            ids.append(sid)
            pids[sid] = sandbox_pids(sid)
            time.sleep(args.settle)
            split = {kind: sum(pss_mib(p[kind]) for p in pids.values())
                     for kind in ("qemu", "waiter", "monitor")}
            sample = {"n": i, "start_s": round(took, 3),
                      "host_used_mib": round(host_used_mib() - base_used, 1),
                      "pss_mib": round(sum(split.values()), 1),
                      **{f"pss_{k}_mib": round(v, 1) for k, v in split.items()}}
            samples.append(sample)
            print(f"{i:3d}: start {took:5.2f}s  PSS {sample['pss_mib']:8.1f} MiB  "
                  f"host used +{sample['host_used_mib']:8.1f} MiB", flush=True)
    finally:
        for sid in ids:
            subprocess.run(["ember", "rm", "-f", sid], capture_output=True, timeout=120)
    time.sleep(2)
    after = host_used_mib() - base_used
    left = [pid for p in pids.values() for pid in p.values() if pid and psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

    n = [s["n"] for s in samples]
    pss_slope = slope(n, [s["pss_mib"] for s in samples])
    host_slope = slope(n, [s["host_used_mib"] for s in samples])
    last = samples[-1]
    k = min(3, len(samples))
    first_start = statistics.median(s["start_s"] for s in samples[:k])
    last_start = statistics.median(s["start_s"] for s in samples[-k:])
    print(f"\n{len(samples)} idle sandboxes of {args.image}")
    print(f"PSS per sandbox (slope): {pss_slope:.1f} MiB  (goal <= 60)")
    print(f"  all sandboxes together: QEMU {last['pss_qemu_mib']:.0f} MiB, waiters "
          f"{last['pss_waiter_mib']:.0f} MiB, monitors {last['pss_monitor_mib']:.0f} MiB "
          f"(monitor + waiter per sandbox: "
          f"{(last['pss_waiter_mib'] + last['pss_monitor_mib']) / len(samples):.1f} MiB, "
          f"goal <= 10)")
    print(f"host memory used per sandbox (slope): {host_slope:.1f} MiB")
    print(f"start time, median of first {k}: {first_start:.2f}s, of last {k}: {last_start:.2f}s;"
          f" last/first: {last_start / first_start:.2f}  (goal <= 1.3)")
    starts = [s["start_s"] for s in samples]
    trend = slope(n, starts)
    at_first = statistics.fmean(starts) + trend * (n[0] - statistics.fmean(n))
    fitted = (at_first + trend * (n[-1] - n[0])) / at_first
    print(f"start time, least-squares line over all {len(n)}: {at_first:.2f}s at {n[0]}, "
          f"{trend * 1000:+.1f} ms per sandbox; at {n[-1]} against at {n[0]}: {fitted:.2f}")
    # Host memory also moves with whatever else runs here; our own processes must be gone.
    returned = after <= 64 + 0.02 * (base_used + last["host_used_mib"])
    print(f"after removing all: {len(left)} of this run's processes left; host memory "
          f"{after:+.1f} MiB against the start: {'returned' if returned else 'NOT returned'} "
          "(other work on the host counts too)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"samples": samples, "pss_slope_mib": pss_slope,
                       "host_slope_mib": host_slope, "start_ratio": last_start / first_start,
                       "start_ratio_fitted": fitted,
                       "after_removal_mib": after}, f, indent=1)
    return 0 if returned and not left else 1


if __name__ == "__main__":
    sys.exit(main())
