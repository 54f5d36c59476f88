"""The guest's cgroup statistics for a container, as containerd's cgroup v1 Metrics.

The agent reads the container's cgroup inside the VM; `ctr task metrics` and
the CRI plugin (kubelet's container stats) decode the Any by its bare type
URL ``io.containerd.cgroups.v1.Metrics``.
"""

from __future__ import annotations

from google.protobuf import any_pb2

from ember.agent.proto import agent_pb2
from ember.shim.proto import metrics_pb2 as m

# memory.stat keys that map one-to-one onto MemoryStat fields.
_MEMORY_FIELDS = {f.name for f in m.MemoryStat.DESCRIPTOR.fields if f.type != f.TYPE_MESSAGE}
_ALIASES = {"pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault",
            "pgmajfault": "pg_maj_fault", "total_pgpgin": "total_pg_pg_in",
            "total_pgpgout": "total_pg_pg_out", "total_pgfault": "total_pg_fault",
            "total_pgmajfault": "total_pg_maj_fault",
            # cgroup v2 names, in case the guest runs the unified hierarchy
            "anon": "rss", "file": "cache", "file_mapped": "mapped_file",
            "file_dirty": "dirty", "file_writeback": "writeback"}


def to_metrics(st: agent_pb2.StatsContainerResponse) -> m.Metrics:
    mem = m.MemoryStat(usage=m.MemoryEntry(usage=st.memory_usage, limit=st.memory_limit))
    for key, value in st.memory_stat.items():
        name = _ALIASES.get(key, key)
        if name in _MEMORY_FIELDS:
            setattr(mem, name, value)
    blkio = m.BlkIOStat()
    if st.io_read_bytes or st.io_write_bytes:
        blkio.io_service_bytes_recursive.add(op="Read", value=st.io_read_bytes)
        blkio.io_service_bytes_recursive.add(op="Write", value=st.io_write_bytes)
    return m.Metrics(
        pids=m.PidsStat(current=st.pids_current, limit=st.pids_limit),
        cpu=m.CPUStat(usage=m.CPUUsage(total=st.cpu_usage_ns, user=st.cpu_user_ns,
                                       kernel=st.cpu_system_ns)),
        memory=mem,
        blkio=blkio,
    )


def pack(metrics: m.Metrics) -> any_pb2.Any:
    return any_pb2.Any(type_url=metrics.DESCRIPTOR.full_name, value=metrics.SerializeToString())
