"""The Prometheus collector: per-sandbox host and guest series, node series, events.

Per scrape and per sandbox (``ember run`` sandbox or containerd pod):

* host side, read locally: the VMM process's CPU seconds, RSS and PSS
  (``psutil``), and the memory and CPU of the sandbox's own host cgroup (the
  jail's, or the pod's when the VMM is not jailed), found from
  ``/proc/<vmm>/cgroup`` and reported only when that cgroup is the sandbox's;
* guest side: one ``GuestStats`` agent call (guest memory, load, CPU and every
  container's cgroup CPU/memory/pids/IO). The calls run in parallel, each
  bounded by ``timeout``; a paused sandbox is not asked at all, and a guest
  that does not answer in time only loses its guest series for this scrape
  (``ember_guest_up`` 0). Nothing a guest does can hold the scrape longer.

Node series: sandboxes by kind and status, counters from the node's lifecycle
events (:mod:`ember.metrics.events`: crashes, OOM kills, failures, VM start
times, template lookups, restore floor), agent RPC latency, guest scrape
errors by reason.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ALL_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ember.agent.proto import AGENT_SERVICE
from ember.agent.proto import agent_pb2 as pb
from ember.config import Config
from ember.metrics import DEFAULT_TIMEOUT
from ember.metrics.events import Events
from ember.metrics.targets import LABELS, PodFinder, Target, sandboxes, vmm_process
from ember.sandbox.events import EventLog
from ember.sandbox.status import UP, Status

log = logging.getLogger("ember.metrics")

STATUSES = tuple(Status)
KINDS = ("sandbox", "pod")
NS = 1e-9


# ------------------------------------------------------------------ host side
@dataclass
class HostStats:
    cpu_user: float = 0.0
    cpu_system: float = 0.0
    rss: int = 0
    pss: int | None = None
    cgroup_memory: int | None = None
    cgroup_cpu: float | None = None
    io_read: int | None = None  # bytes the VMM had read from / written to storage
    io_write: int | None = None
    net: dict[str, int] | None = None  # rx/tx bytes/packets as the sandbox sees them


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _within(path: str, scope: str) -> bool:
    scope = "/" + scope.strip("/")
    return scope != "/" and (path == scope or path.startswith(scope + "/"))


class CgroupMounts:
    """Where the cgroup hierarchies are mounted (read once per scrape)."""

    def __init__(self) -> None:
        from ember.jailer import cgroups

        self.v2 = cgroups.v2_mount()
        self.memory = cgroups.v1_mount("memory")
        self.cpuacct = cgroups.v1_mount("cpuacct")


def cgroup_usage(pid: int, scope: str, mounts: CgroupMounts) -> tuple[int | None, float | None]:
    """(memory bytes, CPU seconds) of the host cgroup of ``pid`` when it lies in
    ``scope`` (the sandbox's own cgroup); None for what is not the sandbox's."""
    memory = cpu = None
    text = _read(Path(f"/proc/{pid}/cgroup"))
    if not text or not scope:
        return None, None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if not _within(path, scope):
            continue
        rel = path.lstrip("/")
        names = ctrls.split(",") if ctrls else []
        if hid == "0" and not names and mounts.v2 is not None:
            cur = _read(mounts.v2 / rel / "memory.current")
            if cur and cur.strip().isdigit():
                memory = int(cur)
            for stat_line in (_read(mounts.v2 / rel / "cpu.stat") or "").splitlines():
                key, _, val = stat_line.partition(" ")
                if key == "usage_usec" and val.strip().isdigit():
                    cpu = int(val) / 1e6
        if "memory" in names and mounts.memory is not None:
            cur = _read(mounts.memory / rel / "memory.usage_in_bytes")
            if cur and cur.strip().isdigit():
                memory = int(cur)
        if "cpuacct" in names and mounts.cpuacct is not None:
            cur = _read(mounts.cpuacct / rel / "cpuacct.usage")
            if cur and cur.strip().isdigit():
                cpu = int(cur) * NS
    return memory, cpu


def host_stats(t: Target, mounts: CgroupMounts) -> HostStats | None:
    proc = vmm_process(t.vmm_pid, t.started if t.kind == "sandbox" else 0.0)
    if proc is None:
        return None
    try:
        with proc.oneshot():
            times = proc.cpu_times()
            out = HostStats(cpu_user=times.user, cpu_system=times.system)
            try:
                full = proc.memory_full_info()  # PSS: /proc/<pid>/smaps_rollup
                out.rss, out.pss = full.rss, getattr(full, "pss", None)
            except psutil.AccessDenied:
                out.rss = proc.memory_info().rss
            try:
                io = proc.io_counters()  # /proc/<vmm>/io: readable by root, jailed or not
                out.io_read, out.io_write = io.read_bytes, io.write_bytes
            except (psutil.AccessDenied, AttributeError):
                pass
    except psutil.Error:
        return None
    out.cgroup_memory, out.cgroup_cpu = cgroup_usage(proc.pid, t.cgroup_scope, mounts)
    out.net = net_stats(t)
    return out


def _swap(host_side: dict[str, int]) -> dict[str, int]:
    """Counters of the host end of the sandbox's link, as the sandbox sees them (what
    the host end sent, the sandbox received)."""
    return {"rx_bytes": host_side.get("tx_bytes", 0), "tx_bytes": host_side.get("rx_bytes", 0),
            "rx_packets": host_side.get("tx_packets", 0),
            "tx_packets": host_side.get("rx_packets", 0)}


def net_stats(t: Target) -> dict[str, int] | None:
    """Network bytes and packets of a sandbox, from the host side of its link: the
    veth's host end on the ember0 bridge (``ember run --network bridge``), or the
    VM's tap in the pod's network namespace (pods; read over netlink from inside
    it). None without a network of its own."""
    if t.veth:
        base = Path("/sys/class/net") / t.veth / "statistics"
        try:
            return _swap({k: int((base / k).read_text())
                          for k in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")})
        except (OSError, ValueError):
            return None
    if t.netns:
        from ember.net import podnet

        try:
            return _swap(podnet.link_stats(t.netns))
        except podnet.NetError:
            return None
    return None


# ----------------------------------------------------------------- guest side
class GuestUnavailable(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def guest_stats(sock: Path, timeout: float) -> pb.GuestStatsResponse:
    """One GuestStats call through the monitor's or the shim's socket, bounded by timeout."""
    from ember.ttrpc import Client, Code, TTRPCError

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.settimeout(None)
    except OSError as exc:
        s.close()
        raise GuestUnavailable("connect", f"cannot connect to {sock}: {exc}") from None
    client = Client(s)
    try:
        return client.call(AGENT_SERVICE, "GuestStats", pb.Empty(), pb.GuestStatsResponse,
                           timeout=timeout)
    except TTRPCError as exc:
        reason = "timeout" if exc.code == Code.DEADLINE_EXCEEDED else \
            "unimplemented" if exc.code == Code.UNIMPLEMENTED else "error"
        raise GuestUnavailable(reason, exc.message) from None
    except OSError as exc:
        raise GuestUnavailable("error", str(exc)) from None
    finally:
        client.close()


def working_set(st: pb.StatsContainerResponse) -> int:
    """As the kubelet computes it: usage less inactive file pages."""
    inactive = st.memory_stat.get("total_inactive_file", st.memory_stat.get("inactive_file", 0))
    return max(0, st.memory_usage - inactive)


# ------------------------------------------------------------------ collector
class _Families:
    """Metric families made on first use, yielded in creation order."""

    def __init__(self) -> None:
        self._fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}

    def add(self, kind: str, name: str, doc: str, extra: tuple[str, ...], labels: list[str],
            value: float) -> None:
        fam = self._fams.get(name)
        if fam is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(name, doc, labels=[*LABELS, *extra])
            self._fams[name] = fam
        fam.add_metric(labels, value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._fams.values())


class EmberCollector:
    """A prometheus_client collector over every sandbox and pod of the node."""

    def __init__(self, cfg: Config, registry: CollectorRegistry,
                 timeout: float = DEFAULT_TIMEOUT, workers: int = 16) -> None:
        self.cfg = cfg
        self.timeout = timeout
        self.pods = PodFinder(cfg)
        import pyroute2  # noqa: F401 - pods' network counters; loaded now, not in a scrape
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="guest-stats")
        self._lock = threading.Lock()  # one scrape at a time
        # The collector goes into the registry before its counters, so that a
        # scrape counts what it finds before the counters are read out.
        registry.register(self)
        self.events = Events(registry, EventLog(cfg.state_dir))
        self.rpc_seconds = Histogram(
            "ember_agent_rpc_seconds", "Time of the collector's GuestStats agent calls "
            "(through the sandbox monitor or the shim), answered or not.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5), registry=registry)
        self.guest_errors = Counter(
            "ember_guest_scrape_errors", "Guest stats not had in a scrape, by reason "
            "(timeout, connect, error, unimplemented).", ["reason"], registry=registry)
        for reason in ("timeout", "connect", "error", "unimplemented"):
            self.guest_errors.labels(reason)

    def describe(self) -> list[Metric]:
        return []  # names vary with what runs; no scrape at registration

    def targets(self) -> list[Target]:
        return [*sandboxes(self.cfg), *self.pods.pods()]

    def watch(self) -> None:
        """Count new lifecycle events and dead records (between scrapes too)."""
        self.events.poll()
        self.events.observe(sandboxes(self.cfg))

    def _ask(self, t: Target) -> pb.GuestStatsResponse:
        start = time.monotonic()
        try:
            return guest_stats(t.socket, self.timeout)  # type: ignore[arg-type]
        finally:
            self.rpc_seconds.observe(time.monotonic() - start)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect()

    def _collect(self) -> Iterator[Metric]:
        began = time.monotonic()
        targets = self.targets()
        self.events.poll()
        self.events.observe(targets)
        live = [t for t in targets if t.status in UP
                and vmm_process(t.vmm_pid, t.started if t.kind == "sandbox" else 0.0)]
        # Guest calls first, in parallel; host numbers meanwhile.
        asked = {t.id: self.pool.submit(self._ask, t) for t in live
                 if t.status == Status.RUNNING and t.socket is not None}
        live_ids = {t.id for t in live}
        mounts = CgroupMounts()
        host = {t.id: host_stats(t, mounts) for t in live}
        deadline = began + self.timeout + 0.2
        if asked:
            wait(list(asked.values()), timeout=max(0.0, deadline - time.monotonic()),
                 return_when=ALL_COMPLETED)
        guest: dict[str, pb.GuestStatsResponse] = {}
        for sid, fut in asked.items():
            if not fut.done():
                fut.cancel()
                self.guest_errors.labels("timeout").inc()
                continue
            try:
                guest[sid] = fut.result()
            except GuestUnavailable as exc:
                self.guest_errors.labels(exc.reason).inc()
                log.debug("guest stats of %s: %s", sid, exc)
            except Exception:  # noqa: BLE001 - one sandbox never breaks the scrape
                self.guest_errors.labels("error").inc()
                log.exception("guest stats of %s", sid)

        fams = _Families()
        now = time.time()
        counts = {(k, s): 0 for k in KINDS for s in STATUSES}
        for t in targets:
            counts[(t.kind, t.status if t.status in STATUSES else Status.UNKNOWN)] += 1
        node = GaugeMetricFamily("ember_sandboxes", "Sandboxes (ember run) and pods "
                                 "(containerd shim) on this node, by status.",
                                 labels=["kind", "status"])
        for (kind, status), n in counts.items():
            node.add_metric([kind, status], n)
        yield node

        for t in targets:
            lv = t.label_values()
            fams.add("gauge", "ember_sandbox_info", "One per sandbox, with its status.",
                     ("status",), [*lv, t.status], 1)
            if t.id not in live_ids:
                continue
            fams.add("gauge", "ember_sandbox_start_time_seconds",
                     "When the sandbox was created (pods: when their VMM started), Unix time.",
                     (), lv, t.started)
            fams.add("gauge", "ember_sandbox_uptime_seconds", "Time since the sandbox started.",
                     (), lv, max(0.0, now - t.started))
            h = host.get(t.id)
            if h is not None:
                for mode, v in (("user", h.cpu_user), ("system", h.cpu_system)):
                    fams.add("counter", "ember_vmm_cpu_seconds", "CPU time of the VMM process.",
                             ("mode",), [*lv, mode], v)
                fams.add("gauge", "ember_vmm_memory_rss_bytes", "Resident memory of the VMM.",
                         (), lv, h.rss)
                if h.pss is not None:
                    fams.add("gauge", "ember_vmm_memory_pss_bytes", "Proportional set size of "
                             "the VMM: its memory with shared pages split among their users.",
                             (), lv, h.pss)
                if h.cgroup_memory is not None:
                    fams.add("gauge", "ember_sandbox_cgroup_memory_bytes", "Memory charged to "
                             "the sandbox's host cgroup (the VMM's jail, or the pod's).",
                             (), lv, h.cgroup_memory)
                if h.cgroup_cpu is not None:
                    fams.add("counter", "ember_sandbox_cgroup_cpu_seconds", "CPU time "
                             "charged to the sandbox's host cgroup.", (), lv, h.cgroup_cpu)
                self._io_net_series(fams, lv, h)
            g = guest.get(t.id)
            fams.add("gauge", "ember_guest_up", "1 when the guest agent answered this scrape "
                     "in time, 0 when not (paused, stuck, or gone).", (), lv, int(g is not None))
            if g is None:
                continue
            self.events.guest_oom_count(t, g.oom_kills)
            self._guest_series(fams, t, lv, g)
        self.events.forget(live_ids)
        yield from fams
        yield GaugeMetricFamily("ember_metrics_scrape_duration_seconds",
                                "How long this scrape took.", value=time.monotonic() - began)

    @staticmethod
    def _io_net_series(fams: _Families, lv: list[str], h: HostStats) -> None:
        if h.io_read is not None and h.io_write is not None:
            for direction, n in (("read", h.io_read), ("write", h.io_write)):
                fams.add("counter", "ember_vmm_block_io_bytes", "Bytes the VMM read from or "
                         "wrote to storage for the sandbox's disks (/proc/<vmm>/io).",
                         ("direction",), [*lv, direction], n)
        if h.net is not None:
            for direction in ("rx", "tx"):
                fams.add("counter", "ember_sandbox_network_bytes", "Bytes the sandbox "
                         "received (rx) or sent (tx), from the host side of its link.",
                         ("direction",), [*lv, direction], h.net[f"{direction}_bytes"])
                fams.add("counter", "ember_sandbox_network_packets", "Packets the sandbox "
                         "received (rx) or sent (tx), from the host side of its link.",
                         ("direction",), [*lv, direction], h.net[f"{direction}_packets"])

    def _guest_series(self, fams: _Families, t: Target, lv: list[str],
                      g: pb.GuestStatsResponse) -> None:
        fams.add("gauge", "ember_guest_memory_total_bytes", "Guest memory (MemTotal).",
                 (), lv, g.mem_total_bytes)
        fams.add("gauge", "ember_guest_memory_available_bytes", "Guest MemAvailable.",
                 (), lv, g.mem_available_bytes)
        fams.add("gauge", "ember_guest_memory_used_bytes", "Guest MemTotal - MemAvailable.",
                 (), lv, max(0, g.mem_total_bytes - g.mem_available_bytes))
        fams.add("gauge", "ember_guest_memory_free_bytes", "Guest MemFree.",
                 (), lv, g.mem_free_bytes)
        for name, value in (("load1", g.load1), ("load5", g.load5), ("load15", g.load15)):
            fams.add("gauge", f"ember_guest_{name}", f"Guest load average ({name[4:]} min).",
                     (), lv, value)
        for mode, ns in (("user", g.cpu_user_ns), ("system", g.cpu_system_ns),
                         ("idle", g.cpu_idle_ns)):
            fams.add("counter", "ember_guest_cpu_seconds", "Guest CPU time, all vCPUs.",
                     ("mode",), [*lv, mode], ns * NS)
        fams.add("gauge", "ember_guest_cpus", "Guest vCPUs.", (), lv, g.cpus)
        fams.add("counter", "ember_guest_oom_kills", "Processes the guest kernel's OOM "
                 "killer killed since boot.", (), lv, g.oom_kills)
        for cid, st in sorted(g.containers.items()):
            cl = [*lv, cid, t.containers.get(cid, cid[:12])]
            extra = ("container_id", "container")
            fams.add("counter", "ember_container_cpu_usage_seconds", "Container CPU time "
                     "(its guest cgroup).", extra, cl, st.cpu_usage_ns * NS)
            for mode, ns in (("user", st.cpu_user_ns), ("system", st.cpu_system_ns)):
                fams.add("counter", "ember_container_cpu_seconds", "Container CPU time by mode.",
                         (*extra, "mode"), [*cl, mode], ns * NS)
            fams.add("gauge", "ember_container_memory_usage_bytes", "Container memory "
                     "(its guest cgroup).", extra, cl, st.memory_usage)
            fams.add("gauge", "ember_container_memory_working_set_bytes", "Container memory "
                     "less inactive file pages (the kubelet's working set).", extra, cl,
                     working_set(st))
            if st.memory_limit:
                fams.add("gauge", "ember_container_memory_limit_bytes", "Container memory "
                         "limit.", extra, cl, st.memory_limit)
            fams.add("gauge", "ember_container_pids", "Processes in the container.",
                     extra, cl, st.pids_current)
            if st.pids_limit:
                fams.add("gauge", "ember_container_pids_limit", "Container pids limit.",
                         extra, cl, st.pids_limit)
            for direction, n in (("read", st.io_read_bytes), ("write", st.io_write_bytes)):
                fams.add("counter", "ember_container_io_bytes", "Container block I/O.",
                         (*extra, "direction"), [*cl, direction], n)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.events.close()
