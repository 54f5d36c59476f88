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
import signal
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
from ember.metrics.events import Events
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


def value(fams: dict, metric: str, /, **labels: str) -> float | None:
    """The one sample named ``metric`` (as exposed) whose labels include ``labels``."""
    found = [s.value for samples in fams.values() for s in samples if s.name == metric
             and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) <= 1, (metric, labels, found)
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


def test_dead_records_count_once_after_the_baseline_vmm_crashes_only_from_events(caplog):
    """A dead monitor publishes nothing: its record is counted (once). A VMM crash is
    counted from its event (tests/test_events.py), never a second time from the record."""
    reg = CollectorRegistry()
    ev = Events(reg)
    ev.observe([_target("a", "dead", "the sandbox monitor (pid 6) and its VM are gone")])
    assert reg.get_sample_value("ember_sandbox_crashes_total", {"kind": "monitor"}) == 0
    caplog.set_level(logging.WARNING, logger="ember.metrics")
    crashed = [_target("a", "dead", "the sandbox monitor (pid 6) and its VM are gone"),
               _target("b", "dead", "VMM exited unexpectedly (QEMU killed by signal 9)"),
               _target("c", "dead", "the sandbox monitor (pid 7) and its VM are gone"),
               _target("d", "exited", oom=True), _target("e", "running")]
    for _ in range(3):
        ev.observe(crashed)
    assert reg.get_sample_value("ember_sandbox_crashes_total", {"kind": "vmm"}) == 0
    assert reg.get_sample_value("ember_sandbox_crashes_total", {"kind": "monitor"}) == 1
    assert reg.get_sample_value("ember_errors_total", {"kind": "monitor_crash"}) == 1
    assert reg.get_sample_value("ember_sandbox_oom_kills_total") == 0  # its oom event counts
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "sandbox c " in lines[0] and "(monitor)" in lines[0], lines


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


# ----------------------------------------------------------------- sandboxes
MIB = 1 << 20


def _labels(ember_env, name: str) -> dict[str, str]:
    info = _inspect(ember_env, name)
    return {"id": info["id"], "name": name}


def _start(ember_env, image: str, *names: str) -> None:
    for name in names:
        ember_env.run("run", "-d", "--name", name, image, "sleep", "1000", check=True)


def vm_test(fn):
    return pytest.mark.root(pytest.mark.vm(pytest.mark.timeout(600)(fn)))


@vm_test
def test_running_sandboxes_have_cpu_memory_and_a_guest_allocation_shows(ember_env, image):
    _start(ember_env, image, "mx-a", "mx-b")
    with serve(ember_env.env) as ep:
        fams, took = ep.scrape()
        assert took < 1.0, took
        assert value(fams, "ember_sandboxes", kind="sandbox", status="running") == 2
        for name in ("mx-a", "mx-b"):
            lab = _labels(ember_env, name)
            assert value(fams, "ember_sandbox_info", status="running", kind="sandbox",
                         hypervisor="qemu", **lab) == 1
            assert value(fams, "ember_guest_up", **lab) == 1
            for series in ("ember_vmm_memory_rss_bytes", "ember_vmm_memory_pss_bytes",
                           "ember_guest_memory_total_bytes", "ember_guest_memory_used_bytes",
                           "ember_sandbox_uptime_seconds"):
                assert value(fams, series, **lab) > 0, (series, name)
            cpu = value(fams, "ember_vmm_cpu_seconds_total", mode="user", **lab) + \
                value(fams, "ember_vmm_cpu_seconds_total", mode="system", **lab)
            assert cpu > 0
            assert value(fams, "ember_container_memory_usage_bytes", container=name, **lab) > 0
            assert value(fams, "ember_container_cpu_usage_seconds_total", container=name,
                         **lab) > 0
            assert value(fams, "ember_container_pids", container=name, **lab) >= 1
        # Every series the dashboard draws per sandbox is there for a running one.
        names = {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in family_names(fams)}
        dash = json.loads(DASHBOARD.read_text())
        drawn = {re.sub(r"_(bucket|total)$", "", n) for p in dash["panels"]
                 for t in p["targets"] for n in re.findall(r"\bember_[a-z0-9_]+", t["expr"])}
        # (Network series only exist for sandboxes with a network: the block I/O test.)
        assert drawn - {"ember_sandbox_network_bytes"} <= names, drawn - names

        # A container allocates 100 MiB (dd's buffer, held while its pipe is full).
        lab = _labels(ember_env, "mx-a")
        used0 = value(fams, "ember_guest_memory_used_bytes", **lab)
        ember_env.run("exec", "mx-a", "sh", "-c",
                      "(dd if=/dev/zero bs=100M count=1 | sleep 1000) >/dev/null 2>&1 &",
                      check=True)
        seen = []
        for _ in range(2):
            time.sleep(1)
            fams, _took = ep.scrape()
            seen.append(value(fams, "ember_guest_memory_used_bytes", **lab) - used0)
            if seen[-1] >= 90 * MIB:
                break
        assert seen[-1] >= 90 * MIB, f"guest memory grew by {[s // MIB for s in seen]} MiB"
        assert value(fams, "ember_container_memory_usage_bytes", container="mx-a",
                     **lab) >= 90 * MIB


@vm_test
def test_paused_or_stuck_guest_never_holds_the_scrape_and_a_vmm_kill_counts(ember_env, image):
    _start(ember_env, image, "mx-p", "mx-k")
    paused, victim = _labels(ember_env, "mx-p"), _labels(ember_env, "mx-k")
    ember_env.run("pause", "mx-p", check=True)
    with serve(ember_env.env) as ep:
        fams, took = ep.scrape()
        assert took < 1.0, took
        assert value(fams, "ember_sandboxes", kind="sandbox", status="paused") == 1
        assert value(fams, "ember_guest_up", **paused) == 0
        assert value(fams, "ember_guest_memory_total_bytes", **paused) is None
        assert value(fams, "ember_vmm_memory_rss_bytes", **paused) > 0  # host side stays
        assert value(fams, "ember_guest_up", **victim) == 1

        # A stuck guest (its VMM stopped, its record still "running"): the call times out.
        vmm_pid = _inspect(ember_env, "mx-k")["vmm_pid"]
        os.kill(vmm_pid, signal.SIGSTOP)
        try:
            fams, took = ep.scrape()
        finally:
            os.kill(vmm_pid, signal.SIGCONT)
        assert took < 1.0, took
        assert value(fams, "ember_guest_up", **victim) == 0
        assert value(fams, "ember_vmm_memory_rss_bytes", **victim) > 0
        assert value(fams, "ember_guest_scrape_errors_total", reason="timeout") >= 1

        # A VMM killed under its sandbox: one crash, counted once, logged with the id.
        before = value(fams, "ember_sandbox_crashes_total", kind="vmm")
        os.kill(vmm_pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _inspect(ember_env, "mx-k")["status"] != "dead":
            assert time.monotonic() < deadline, "the sandbox was never recorded dead"
            time.sleep(0.2)
        for _ in range(2):
            fams, _took = ep.scrape()
            assert value(fams, "ember_sandbox_crashes_total", kind="vmm") == before + 1
        assert value(fams, "ember_sandbox_info", status="dead", **victim) == 1
        assert value(fams, "ember_guest_up", **victim) is None
        assert any(victim["id"] in line and "crashed (vmm)" in line for line in ep.log), ep.log
    ember_env.run("unpause", "mx-p", check=True)


@vm_test
def test_block_io_and_network_move_with_the_workload(ember_env, image):
    """The VMM's storage I/O (/proc/<vmm>/io) and the bytes and packets through the
    sandbox's veth grow when the container writes a file and pings the bridge."""
    ember_env.run("run", "-d", "--name", "mx-io", "--network", "bridge", image, "sleep", "1000",
                  check=True)
    lab = _labels(ember_env, "mx-io")
    with serve(ember_env.env) as ep:
        fams, took = ep.scrape()
        assert took < 1.0, took
        w0 = value(fams, "ember_vmm_block_io_bytes_total", direction="write", **lab)
        rx0 = value(fams, "ember_sandbox_network_bytes_total", direction="rx", **lab)
        tx0 = value(fams, "ember_sandbox_network_packets_total", direction="tx", **lab)
        assert None not in (w0, rx0, tx0), family_names(fams)
        ember_env.run("exec", "mx-io", "sh", "-c", "dd if=/dev/urandom of=/blob bs=1M count=8 "
                      "2>/dev/null && sync && ping -c 3 -W 2 10.88.0.1 >/dev/null", check=True)
        fams, _took = ep.scrape()
        assert value(fams, "ember_vmm_block_io_bytes_total", direction="write",
                     **lab) - w0 >= 8 * MIB
        assert value(fams, "ember_sandbox_network_bytes_total", direction="rx", **lab) > rx0
        assert value(fams, "ember_sandbox_network_packets_total", direction="tx",
                     **lab) >= tx0 + 3
    # A sandbox without a network has no network series (nothing to count), but I/O.
    _start(ember_env, image, "mx-nonet")
    with serve(ember_env.env) as ep:
        fams, _took = ep.scrape()
    plain = _labels(ember_env, "mx-nonet")
    assert value(fams, "ember_sandbox_network_bytes_total", direction="rx", **plain) is None
    assert value(fams, "ember_vmm_block_io_bytes_total", direction="read", **plain) is not None


# ---------------------------------------------------------------------- pods
@pytest.mark.root
@pytest.mark.vm
@pytest.mark.containerd
@pytest.mark.timeout(900)
def test_cri_pod_stats_and_pod_series(guest_assets) -> None:
    """kubelet-style stats (containerd's CRI from the shim's Stats) are non-zero, and the
    endpoint lists the pod with its Kubernetes namespace and name, guest and containers."""
    import grpc
    from shimtools import BUSYBOX, discard_pod, private_containerd

    from ember.cri import api_pb2 as api
    from ember.cri.client import CRIClient

    with private_containerd(cri=True) as (c, work), CRIClient(c.address) as client:
        # With a cgroup parent, as a kubelet gives: containerd's PodSandboxStats reads it.
        pod = client.run_pod("mx-pod", runtime_handler="ember", namespace="mx-ns",
                             cgroup_parent=f"/ember-mx-{os.getpid()}")
        try:
            cid = client.create_container(pod, "app", BUSYBOX, ["sh", "-c",
                                          "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; "
                                          "sleep 1000"])
            client.start_container(cid)
            time.sleep(1)
            stats = client.runtime.ContainerStats(
                api.ContainerStatsRequest(container_id=cid), timeout=60).stats
            assert stats.cpu.usage_core_nano_seconds.value > 0, stats
            assert stats.memory.working_set_bytes.value > 0, stats
            listed = client.runtime.ListContainerStats(api.ListContainerStatsRequest(),
                                                       timeout=60).stats
            assert any(s.attributes.id == cid and s.cpu.usage_core_nano_seconds.value > 0
                       for s in listed), listed
            try:
                pstats = client.runtime.PodSandboxStats(
                    api.PodSandboxStatsRequest(pod_sandbox_id=pod), timeout=60).stats
            except grpc.RpcError as exc:  # containerd builds without pod stats
                assert exc.code() == grpc.StatusCode.UNIMPLEMENTED, exc
            else:  # the pod's host cgroup (VMM and shim), and each container's Stats
                assert pstats.linux.memory.working_set_bytes.value > 0, pstats
                assert any(cs.attributes.id == cid and cs.memory.working_set_bytes.value > 0
                           for cs in pstats.linux.containers), pstats

            env = dict(os.environ, EMBER_CONFIG=str(work / "ember.toml"))
            env.pop("EMBER_STATE_DIR", None)
            with serve(env) as ep:
                fams, took = ep.scrape()
            assert took < 1.0, took
            lab = {"id": pod, "kind": "pod", "k8s_namespace": "mx-ns", "k8s_pod": "mx-pod",
                   "name": "mx-pod"}
            assert value(fams, "ember_sandboxes", kind="pod", status="running") == 1
            assert value(fams, "ember_sandbox_info", status="running", **lab) == 1
            assert value(fams, "ember_guest_up", **lab) == 1
            assert value(fams, "ember_vmm_memory_pss_bytes", **lab) > 0
            assert value(fams, "ember_vmm_cpu_seconds_total", mode="user", **lab) > 0
            assert value(fams, "ember_guest_memory_used_bytes", **lab) > 0
            assert value(fams, "ember_container_memory_usage_bytes", container="app",
                         container_id=cid, **lab) > 0
            assert value(fams, "ember_container_cpu_usage_seconds_total", container="app",
                         container_id=cid, **lab) > 0
            assert value(fams, "ember_vmm_block_io_bytes_total", direction="read", **lab) >= 0
            pod_json = next((work / "st" / "shim").glob("*/pod.json"))
            if json.loads(pod_json.read_text()).get("netns"):  # the VM's tap, read in there
                assert value(fams, "ember_sandbox_network_packets_total", direction="rx",
                             **lab) is not None
        finally:
            discard_pod(client, pod)
