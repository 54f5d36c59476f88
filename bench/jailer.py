"""Jailer overhead: the same VM run with and without ember-jailer, as a ratio.

Two scenarios with one shape (``plain()`` and ``jailed()``, each returning
seconds), so the measurement loop does not care what is timed:

* ``qemu`` (default, works today): QEMU microvm under TCG boots the guest
  kernel with a busybox initrd that powers off at once — bare, then through
  ``ember-jailer`` (hard-linked kernel/initrd, seccomp kill, new mount and PID
  namespaces, a memory cgroup, jail removed at exit).
* ``ember-run``: ``ember run --rm IMAGE true`` with ``jailer.enabled`` false,
  then true (the issue's benchmark; meaningful once sandboxes honour the flag).

Runs alternate between the two so a busy host slows both alike; the medians
and their ratio are printed (goal <= 1.05), with the CPU time of each (the
steadier figure on a shared machine) and, for ``qemu``, the jailer's fixed
cost measured on ``qemu -version``.

    python bench/jailer.py [--scenario qemu|ember-run] [--runs 5] [--image ember-demo:latest]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_jailer_support import busybox_initrd, guest_kernel, qemu_args  # noqa: E402

from ember.jailer.api import JailSpec, Placement, build_argv, cleanup  # noqa: E402

QEMU = "/usr/bin/qemu-system-x86_64"
GUEST_UP = "EMBER-BENCH-UP"


CPU: dict[str, list[float]] = {"plain": [], "jailed": []}


def _cpu_children() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _timed(argv: list[str], env: dict | None = None, kind: str = "") -> tuple[float, str]:
    """Wall seconds (and, by kind, the CPU seconds of it and all it waited for)."""
    cpu0, start = _cpu_children(), time.monotonic()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=600, env=env)
    elapsed = time.monotonic() - start
    if kind:
        CPU[kind].append(_cpu_children() - cpu0)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} exited {proc.returncode}: {proc.stderr[-500:]}")
    return elapsed, proc.stdout


class QemuBoot:
    """A busybox initrd guest booting to poweroff, bare or jailed."""

    def __init__(self, workdir: Path) -> None:
        from ember.config import load_config

        self.kernel = guest_kernel()
        if self.kernel is None:
            from ember.guest.build import build_guest

            self.kernel = build_guest(load_config(), progress=False).kernel
        self.initrd = busybox_initrd(workdir / "initrd.img",
                                     f"/bin/busybox echo {GUEST_UP}\n/bin/busybox poweroff -f\n")
        self.base = workdir / "jails"

    def _check(self, out: str) -> None:
        if GUEST_UP not in out:
            raise SystemExit(f"guest did not come up: {out[-500:]}")

    def plain(self) -> float:
        elapsed, out = _timed([QEMU, *qemu_args(str(self.kernel), str(self.initrd))],
                              kind="plain")
        self._check(out)
        return elapsed

    def jailed(self) -> float:
        spec = JailSpec(id=f"bench-{uuid.uuid4().hex[:8]}", exec_file=QEMU, uid=40000, gid=40000,
                        chroot_base_dir=str(self.base), vmm_kind="qemu", new_pid_ns=True,
                        parent_cgroup="ember-bench", cgroups={"memory.limit_in_bytes": str(1 << 30)},
                        files=[Placement(str(self.kernel), "/vmlinuz"),
                               Placement(str(self.initrd), "/initrd.img")],
                        args=qemu_args("/vmlinuz", "/initrd.img"))
        try:
            elapsed, out = _timed(build_argv(spec), kind="jailed")
        finally:
            cleanup(spec)
        self._check(out)
        return elapsed


    def fixed_cost(self) -> tuple[float, float]:
        """QEMU's ``-version`` bare and jailed: the jailer's own start/stop cost."""
        spec = JailSpec(id=f"bench-{uuid.uuid4().hex[:8]}", exec_file=QEMU, uid=40000, gid=40000,
                        chroot_base_dir=str(self.base), vmm_kind="qemu", new_pid_ns=True,
                        args=["-version"])
        try:
            return _timed([QEMU, "-version"])[0], _timed(build_argv(spec))[0]
        finally:
            cleanup(spec)


class EmberRun:
    """``ember run --rm IMAGE true`` with the jailer off, then on."""

    def __init__(self, workdir: Path, image: str) -> None:
        self.image = image
        self.envs = {}
        for enabled in (False, True):
            config = workdir / f"jailer-{enabled}.toml"
            config.write_text(f"[jailer]\nenabled = {str(enabled).lower()}\n")
            self.envs[enabled] = {**os.environ, "EMBER_CONFIG": str(config)}
        self.plain()  # warm-up: flattens the image, builds the template if needed

    def _run(self, enabled: bool) -> float:
        return _timed(["ember", "run", "--rm", self.image, "true"], env=self.envs[enabled],
                      kind="jailed" if enabled else "plain")[0]

    def plain(self) -> float:
        return self._run(False)

    def jailed(self) -> float:
        return self._run(True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", choices=("qemu", "ember-run"), default="qemu")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--image", default="ember-demo:latest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-jail-", dir="/tmp") as tmp:
        work = Path(tmp)
        scenario = QemuBoot(work) if args.scenario == "qemu" else EmberRun(work, args.image)
        plain, jailed = [], []
        for _ in range(args.runs):
            plain.append(scenario.plain())
            jailed.append(scenario.jailed())
        try:
            os.rmdir("/sys/fs/cgroup/memory/ember-bench")
        except OSError:
            pass
        fixed = [scenario.fixed_cost() for _ in range(args.runs)] \
            if isinstance(scenario, QemuBoot) else []
    p, j = statistics.median(plain), statistics.median(jailed)
    print(f"scenario {args.scenario}, {args.runs} runs each, alternating")
    print(f"without jailer: median {p:.3f}s  min {min(plain):.3f}s  {[round(x, 2) for x in plain]}")
    print(f"with jailer:    median {j:.3f}s  min {min(jailed):.3f}s  {[round(x, 2) for x in jailed]}")
    print(f"ratio jailed/plain: median {j / p:.3f}, min {min(jailed) / min(plain):.3f}  "
          "(goal <= 1.05)")
    cp, cj = statistics.median(CPU["plain"]), statistics.median(CPU["jailed"])
    print(f"CPU time (all processes, insensitive to a busy host): median {cp:.3f}s vs {cj:.3f}s, "
          f"ratio {cj / cp:.3f}")
    if fixed:
        cost = statistics.median(b - a for a, b in fixed)
        print(f"jailer fixed cost (qemu -version jailed minus bare): median {cost * 1000:.0f} ms")


if __name__ == "__main__":
    sys.exit(main())
