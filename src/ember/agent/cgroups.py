"""Container resource usage from its cgroup.

The guest runs cgroup v2 (the real target). Host tests run on cgroup v1, so
the v1 files are read as a fallback, good enough for memory, cpu and pids.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


def is_v2(root: str = CGROUP_ROOT) -> bool:
    return os.path.exists(os.path.join(root, "cgroup.controllers"))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _int(text: str | None) -> int:
    """An integer file; 'max' (no limit) and missing files read as 0."""
    if not text:
        return 0
    text = text.strip()
    return int(text) if text.isdigit() else 0


def _kv(text: str | None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _join(*parts: str) -> str:
    return os.path.join(parts[0], *(p.lstrip("/") for p in parts[1:]))


def stats(cgroup_path: str, root: str = CGROUP_ROOT) -> dict:
    """Usage numbers named like StatsContainerResponse's fields."""
    if is_v2(root):
        d = _join(root, cgroup_path)
        cpu = _kv(_read(os.path.join(d, "cpu.stat")))
        read_b = write_b = 0
        for line in (_read(os.path.join(d, "io.stat")) or "").splitlines():
            for field in line.split()[1:]:
                key, _, val = field.partition("=")
                if key == "rbytes" and val.isdigit():
                    read_b += int(val)
                elif key == "wbytes" and val.isdigit():
                    write_b += int(val)
        return {
            "cpu_usage_ns": cpu.get("usage_usec", 0) * 1000,
            "cpu_user_ns": cpu.get("user_usec", 0) * 1000,
            "cpu_system_ns": cpu.get("system_usec", 0) * 1000,
            "memory_usage": _int(_read(os.path.join(d, "memory.current"))),
            "memory_limit": _int(_read(os.path.join(d, "memory.max"))),
            "pids_current": _int(_read(os.path.join(d, "pids.current"))),
            "pids_limit": _int(_read(os.path.join(d, "pids.max"))),
            "io_read_bytes": read_b,
            "io_write_bytes": write_b,
            "memory_stat": _kv(_read(os.path.join(d, "memory.stat"))),
        }
    mem = _join(root, "memory", cgroup_path)
    acct = _join(root, "cpuacct", cgroup_path)
    pids = _join(root, "pids", cgroup_path)
    ticks = _kv(_read(os.path.join(acct, "cpuacct.stat")))
    tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    limit = _int(_read(os.path.join(mem, "memory.limit_in_bytes")))
    return {
        "cpu_usage_ns": _int(_read(os.path.join(acct, "cpuacct.usage"))),
        "cpu_user_ns": ticks.get("user", 0) * tick_ns,
        "cpu_system_ns": ticks.get("system", 0) * tick_ns,
        "memory_usage": _int(_read(os.path.join(mem, "memory.usage_in_bytes"))),
        "memory_limit": 0 if limit >= 1 << 62 else limit,
        "pids_current": _int(_read(os.path.join(pids, "pids.current"))),
        "pids_limit": _int(_read(os.path.join(pids, "pids.max"))),
        "io_read_bytes": 0,
        "io_write_bytes": 0,
        "memory_stat": _kv(_read(os.path.join(mem, "memory.stat"))),
    }


def pids(cgroup_path: str, root: str = CGROUP_ROOT) -> list[int] | None:
    """Pids in the cgroup, or None when it cannot be read."""
    d = _join(root, cgroup_path) if is_v2(root) else _join(root, "pids", cgroup_path)
    text = _read(os.path.join(d, "cgroup.procs"))
    if text is None:
        return None
    return sorted(int(p) for p in text.split())


def oom_kills(cgroup_path: str, root: str = CGROUP_ROOT) -> int:
    """How many processes the OOM killer killed in this cgroup (0 if unknown)."""
    if is_v2(root):
        events = _kv(_read(os.path.join(_join(root, cgroup_path), "memory.events")))
        return events.get("oom_kill", 0)
    control = _kv(_read(os.path.join(_join(root, "memory", cgroup_path), "memory.oom_control")))
    return control.get("oom_kill", 0)


def make(cgroup_path: str, root: str = CGROUP_ROOT) -> str | None:
    """Make a cgroup v2 folder for a process the agent places itself (crun makes its
    containers' own); its path, or None on cgroup v1 (host tests), where it reads
    as missing (no pids, no stats)."""
    if not is_v2(root):
        return None
    d = _join(root, cgroup_path)
    os.makedirs(d, exist_ok=True)
    return d


def remove(cgroup_path: str, root: str = CGROUP_ROOT) -> None:
    """Remove a folder make() made, once empty; a missing one is fine."""
    if is_v2(root):
        try:
            os.rmdir(_join(root, cgroup_path))
        except OSError:
            pass
