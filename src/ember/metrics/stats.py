"""Live resource usage of ``ember run`` sandboxes, for ``ember stats``.

One sample of a sandbox joins two sides, read by the same code as
``ember metrics serve`` (:mod:`ember.metrics.collector`), so the two never
disagree:

* the guest: one ``GuestStats`` agent call through the monitor's ``api.sock``
  gives the container's own cgroup in the guest (CPU time, memory and its
  limit, pids, block I/O);
* the host: the VMM process (CPU time, RSS) and the sandbox's jail cgroup,
  and the bytes through the sandbox's veth on the ember0 bridge (network
  ``none`` has no traffic to count, as in Docker).

Percentages need two samples: :func:`rates` turns a pair into a :class:`Row`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ember.config import Config
from ember.errors import EmberError
from ember.metrics.collector import (
    CgroupMounts,
    GuestUnavailable,
    guest_stats,
    host_stats,
    working_set,
)
from ember.metrics.targets import Target, sandboxes
from ember.sandbox.state import SandboxState
from ember.sandbox.status import Status

GUEST_TIMEOUT = 3.0  # TCG guests on a busy host answer slowly


@dataclass
class Sample:
    """Counters and gauges of one sandbox at one moment (``at``: monotonic seconds)."""

    id: str
    name: str
    at: float
    cpu_ns: int = 0  # the container's guest cgroup
    mem_usage: int = 0  # working set: usage less inactive file pages (what Docker shows)
    mem_limit: int = 0  # the container's limit, else the guest's memory
    pids: int = 0
    blk_read: int = 0
    blk_write: int = 0
    net_rx: int = 0  # as the container sees it: received
    net_tx: int = 0
    vmm_cpu_s: float = 0.0  # the VMM process on the host
    vmm_rss: int = 0
    host_cgroup_memory: int | None = None  # the jail's cgroup, when jailed


@dataclass
class Row:
    """What one line of ``ember stats`` says."""

    id: str
    name: str
    cpu_percent: float
    mem_usage: int
    mem_limit: int
    net_rx: int
    net_tx: int
    blk_read: int
    blk_write: int
    pids: int
    vmm_cpu_percent: float
    vmm_rss: int
    host_cgroup_memory: int | None

    @property
    def mem_percent(self) -> float:
        return 100.0 * self.mem_usage / self.mem_limit if self.mem_limit else 0.0

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "mem_percent": round(self.mem_percent, 2)}


def _veth_bytes(sandbox_id: str) -> tuple[int, int]:
    """(received, sent) by the sandbox through its veth, seen from the container's side
    (the host end's tx is what the container received)."""
    from ember.net.bridge import veth_name

    base = Path("/sys/class/net") / veth_name(sandbox_id) / "statistics"
    try:
        return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())
    except (OSError, ValueError):
        return 0, 0


def target(cfg: Config, st: SandboxState) -> Target:
    """The metrics collector's view of one sandbox (socket, VMM pid, jail cgroup)."""
    for t in sandboxes(cfg):
        if t.id == st.id:
            return t
    raise EmberError(f"sandbox {st.name or st.short_id} was removed")


def sample(cfg: Config, st: SandboxState, mounts: CgroupMounts | None = None) -> Sample:
    """One sample of a running sandbox; a one-line EmberError when it is not running
    or its guest does not answer."""
    label = st.name or st.short_id
    if st.status == Status.PAUSED:
        raise EmberError(f"sandbox {label} is paused: its guest cannot be asked")
    if st.status != Status.RUNNING:
        why = f": {st.error}" if st.error and st.status in (Status.DEAD, Status.UNKNOWN) else ""
        raise EmberError(f"sandbox {label} is not running (status {st.status}){why}")
    t = target(cfg, st)
    try:
        g = guest_stats(t.socket, GUEST_TIMEOUT)  # type: ignore[arg-type]
    except GuestUnavailable as exc:
        raise EmberError(f"sandbox {label}: its guest did not answer: {exc}") from None
    out = Sample(id=st.id, name=st.name, at=time.monotonic())
    c = g.containers.get(st.id)
    if c is not None:
        out.cpu_ns = c.cpu_usage_ns
        out.mem_usage = working_set(c)
        out.mem_limit = c.memory_limit or g.mem_total_bytes
        out.pids = c.pids_current
        out.blk_read, out.blk_write = c.io_read_bytes, c.io_write_bytes
    else:  # between a restart's remove and create: the guest alone
        out.mem_limit = g.mem_total_bytes
    if st.network == "bridge":
        out.net_rx, out.net_tx = _veth_bytes(st.id)
    h = host_stats(t, mounts or CgroupMounts())
    if h is not None:
        out.vmm_cpu_s = h.cpu_user + h.cpu_system
        out.vmm_rss = h.rss
        out.host_cgroup_memory = h.cgroup_memory
    return out


def rates(before: Sample, after: Sample) -> Row:
    """The row for ``after``, with CPU percentages over the time since ``before``
    (100% is one CPU busy, as in Docker)."""
    wall = max(after.at - before.at, 1e-6)
    cpu = max(0, after.cpu_ns - before.cpu_ns) / 1e9 / wall * 100.0
    vmm = max(0.0, after.vmm_cpu_s - before.vmm_cpu_s) / wall * 100.0
    return Row(id=after.id, name=after.name, cpu_percent=cpu, mem_usage=after.mem_usage,
               mem_limit=after.mem_limit, net_rx=after.net_rx, net_tx=after.net_tx,
               blk_read=after.blk_read, blk_write=after.blk_write, pids=after.pids,
               vmm_cpu_percent=vmm, vmm_rss=after.vmm_rss,
               host_cgroup_memory=after.host_cgroup_memory)
