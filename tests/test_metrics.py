"""`ember metrics serve` and the guest's GuestStats call behind it.

The endpoint's text parses with Prometheus' own parser; with running sandboxes
the CPU and memory series are non-zero, 100 MiB a container allocates shows in
the guest memory series within two scrapes, a paused sandbox keeps the scrape
under a second (its guest series go, its host series stay), a SIGKILLed VMM
increments the crash counter and logs a line with the sandbox id, and a bad
--listen is one line of error with exit code 125.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ember_bin
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from ember.agent.proto import agent_pb2 as pb
from ember.agent.reaper import Reaper
from ember.agent.service import AgentService
from ember.metrics.collector import Events
from ember.metrics.targets import Target

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "ember"
DASHBOARD = ROOT / "deploy" / "grafana" / "ember-dashboard.json"


def test_guest_stats_reads_memory_load_and_cpu(tmp_path) -> None:
    """The agent side, on the host: /proc/meminfo, /proc/loadavg, /proc/stat."""
    svc = AgentService(str(tmp_path), Reaper())
    st = svc.GuestStats(pb.Empty(), None)
    assert st.mem_total_bytes > st.mem_available_bytes > 0
    assert st.mem_free_bytes > 0 and st.cpus >= 1 and st.uptime_s > 0
    assert st.cpu_user_ns + st.cpu_system_ns > 0 and st.cpu_idle_ns > 0
    assert st.load1 >= 0 and not st.containers


# ------------------------------------------------------------------ helpers
class Endpoint:
    """A running `ember metrics serve` (listening on a free loopback port)."""

    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url
        self.log: list[str] = []
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.log.append(line)

    def scrape(self) -> tuple[dict[str, list], float]:
        """{metric family name: samples} and how long the scrape took."""
        start = time.monotonic()
        with urllib.request.urlopen(self.url, timeout=10) as resp:
            text = resp.read().decode()
        took = time.monotonic() - start
        fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
        return fams, took


@contextlib.contextmanager
def serve(env: dict[str, str], *args: str) -> Iterator[Endpoint]:
    proc = subprocess.Popen([ember_bin(), "metrics", "serve", "--listen", "127.0.0.1:0", *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # type: ignore[union-attr]
        m = re.search(r"(http://127\.0\.0\.1:\d+/metrics)", first)
        assert m, f"ember metrics serve said {first!r} (exit {proc.poll()})"
        yield Endpoint(proc, m.group(1))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def value(fams: dict, name: str, **labels: str) -> float | None:
    """The one sample of family ``name`` (its exposition name) whose labels include ``labels``."""
    found = [s.value for samples in fams.values() for s in samples if s.name == name
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def family_names(fams: dict) -> set[str]:
    return {s.name for samples in fams.values() for s in samples}


def _inspect(ember_env, ref: str) -> dict:
    return json.loads(ember_env.run("inspect", ref, check=True).stdout)[0]


# --------------------------------------------------------------- no VM needed
@pytest.mark.parametrize("listen, words", [
    ("nope", "expected HOST:PORT"),
    ("127.0.0.1:99999", "port must be a number"),
    ("::1:8090", "in brackets"),
    ("[not-v6]:8090", "not an IPv6 address"),
    ("no-such-host.invalid:8090", "cannot resolve"),
    ("192.0.2.1:8090", "cannot listen"),
])
def test_bad_listen_is_one_line_and_exit_125(listen, words, tmp_path) -> None:
    env = dict(os.environ, EMBER_STATE_DIR=str(tmp_path))
    r = subprocess.run([ember_bin(), "metrics", "serve", "--listen", listen], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ember: error: --listen"), r.stderr
    assert words in r.stderr, r.stderr


def test_port_in_use_is_one_line_and_exit_125(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        listen = f"127.0.0.1:{s.getsockname()[1]}"
        env = dict(os.environ, EMBER_STATE_DIR=str(tmp_path))
        r = subprocess.run([ember_bin(), "metrics", "serve", "--listen", listen], env=env,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 125 and r.stderr.count("\n") == 1, r.stderr
    assert "Address already in use" in r.stderr, r.stderr


def test_empty_node_parses_with_prometheus_parser(tmp_path) -> None:
    env = dict(os.environ, EMBER_STATE_DIR=str(tmp_path))
    with serve(env) as ep:
        fams, took = ep.scrape()
    assert took < 1.0
    assert value(fams, "ember_sandboxes", kind="sandbox", status="running") == 0
    assert value(fams, "ember_sandboxes", kind="pod", status="running") == 0
    assert value(fams, "ember_sandbox_crashes_total", kind="vmm") == 0
    assert "ember_agent_rpc_seconds" in fams and "ember_metrics_scrape_duration_seconds" in fams
    assert not any(n.endswith("_created") for n in family_names(fams))


def _target(sid: str, status: str, error: str = "", oom: bool = False) -> Target:
    return Target(kind="sandbox", id=sid, name=f"n-{sid}", status=status, error=error,
                  oom_killed=oom, exit_code=137 if oom else None)


def test_events_count_each_record_once_after_the_baseline(caplog) -> None:
    reg = CollectorRegistry()
    ev = Events(reg)
    ev.observe([_target("a", "dead", "VMM exited unexpectedly (QEMU killed)")])  # baseline
    assert reg.get_sample_value("ember_sandbox_crashes_total", {"kind": "vmm"}) == 0
    caplog.set_level(logging.WARNING, logger="ember.metrics")
    crashed = [_target("a", "dead", "VMM exited unexpectedly (QEMU killed)"),
               _target("b", "dead", "VMM exited unexpectedly (QEMU killed by signal 9)"),
               _target("c", "dead", "the sandbox monitor (pid 7) and its VM are gone"),
               _target("d", "exited", oom=True), _target("e", "running")]
    for _ in range(3):
        ev.observe(crashed)
    assert reg.get_sample_value("ember_sandbox_crashes_total", {"kind": "vmm"}) == 1
    assert reg.get_sample_value("ember_sandbox_crashes_total", {"kind": "monitor"}) == 1
    assert reg.get_sample_value("ember_sandbox_oom_kills_total") == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert any("sandbox b " in ln and "vmm" in ln for ln in lines), lines
    assert any("sandbox d " in ln and "OOM" in ln for ln in lines), lines


def test_dashboard_uses_only_metrics_the_collector_makes() -> None:
    """Every ember_* name in the Grafana dashboard is one the code defines."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    used = {re.sub(r"_(bucket|total)$", "", n)
            for e in exprs for n in re.findall(r"\bember_[a-z0-9_]+", e)}
    source = "".join(p.read_text() for p in (SRC / "metrics").glob("*.py"))
    defined = set(re.findall(r'"(ember_[a-z0-9_]+)"', source))
    defined |= {f"ember_guest_{n}" for n in ("load1", "load5", "load15")}  # made in a loop
    assert used and used <= defined, used - defined
