"""Lifecycle events: the node's event log, `ember events`, and the metrics read from it.

Without a VM: concurrent writers never lose or interleave a record, rotation
keeps whole records and a follower sees each once, the files are root-only and
a link in their place is never followed, oversized records are shortened below
PIPE_BUF, --since/--until/--filter select like docker events and bad ones are
one line with exit 125.

With VMs: `ember run` then rm shows create, start, die with the exit code and
destroy (and the VM's boot), a follower streams them as they happen, filters
select; a SIGKILLed VMM gives a crash event; the metrics endpoint's start
histogram counts a start; a CRI pod through containerd shows its events with
the Kubernetes names.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import ember_bin
from test_metrics import serve, value

from ember.errors import EmberError
from ember.sandbox.events import (
    MAX_RECORD,
    EventLog,
    Filters,
    SandboxEvents,
    Tail,
    make_record,
    parse_time,
)


# --------------------------------------------------------------- no VM needed
def _writer(state_dir: str, tag: str, n: int, max_bytes: int, pace: float = 0.0) -> None:
    log = EventLog(Path(state_dir), max_bytes=max_bytes)
    for i in range(n):
        log.append(make_record("container", "start", tag, {"seq": i, "pad": "x" * (i % 50)}))
        time.sleep(pace)


def _records(log: EventLog) -> list[dict]:
    return list(log.read())


def test_concurrent_writers_lose_and_interleave_nothing(tmp_path) -> None:
    procs = [multiprocessing.Process(target=_writer, args=(str(tmp_path), f"w{k}", 300, 1 << 30))
             for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = (tmp_path / "events" / "events.log").read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 1201
    recs = [json.loads(ln) for ln in lines[:-1]]  # every line is one whole record
    for k in range(4):
        seqs = [int(r["Actor"]["Attributes"]["seq"]) for r in recs if r["id"] == f"w{k}"]
        assert seqs == list(range(300)), k  # each writer's own order kept


def test_rotation_keeps_whole_records_bounded_and_a_follower_sees_each_once(tmp_path) -> None:
    log = EventLog(tmp_path, max_bytes=4096, keep=3)
    tail = Tail(log)
    seen: list[int] = []
    procs = [multiprocessing.Process(target=_writer,
                                     args=(str(tmp_path), f"w{k}", 200, 4096, 0.003))
             for k in range(3)]
    for p in procs:
        p.start()
    # A follower in parallel, never more than `keep` rotations behind (a rotation is
    # ~27 records here, about 27 ms apart); it must see every record once, in order.
    while any(p.is_alive() for p in procs):
        seen += [int(r["Actor"]["Attributes"]["seq"]) for r in tail.poll() if r["id"] == "w0"]
        time.sleep(0.002)
    for p in procs:
        p.join()
    seen += [int(r["Actor"]["Attributes"]["seq"]) for r in tail.poll() if r["id"] == "w0"]
    tail.close()
    assert seen == list(range(200))  # none lost, none twice, in order
    files = [f for f in log.files() if f.exists()]
    assert len(files) == 4  # events.log and .1 .. .3: the oldest were dropped
    for f in files:
        assert f.stat().st_size <= 4096
        for line in f.read_bytes().splitlines():
            json.loads(line)
    kept = [int(r["Actor"]["Attributes"]["seq"]) for r in _records(log) if r["id"] == "w0"]
    assert kept == sorted(kept) and kept[-1] == 199


def test_files_are_root_only_and_a_link_is_never_followed(tmp_path, capfd) -> None:
    log = EventLog(tmp_path)
    SandboxEvents(tmp_path, "a" * 64, "n").container("create")
    assert stat.S_IMODE(os.stat(tmp_path / "events").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(log.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "events" / ".lock").st_mode) == 0o600
    # Something put a link where the log is: no write goes through it.
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    log.path.unlink()
    log.path.symlink_to(victim)
    SandboxEvents(tmp_path, "a" * 64, "n").container("start")
    assert victim.read_text() == "keep\n"
    assert "event container start aaaaaaaaaaaa lost" in capfd.readouterr().err
    with pytest.raises(OSError):
        log.append(make_record("container", "start", "x", {}))


def test_an_oversized_record_stays_one_write_below_pipe_buf(tmp_path) -> None:
    log = EventLog(tmp_path)
    rec = log.publish("vm", "crash", "b" * 64, error="e" * 20000, name="n")
    line = log.path.read_bytes()
    assert len(line) <= MAX_RECORD < 4096 and line.endswith(b"\n")
    back = json.loads(line)
    assert back["Actor"]["Attributes"]["name"] == "n" and back["Action"] == "crash"
    assert back["Actor"]["Attributes"]["error"].startswith("eee") and rec["Action"] == "crash"


def test_parse_time_forms() -> None:
    now = 1_800_000_000.0
    assert parse_time("1700000000", "--since", now) == 1_700_000_000 * 10**9
    assert parse_time("1700000000.5", "--since", now) == 1_700_000_000_500_000_000
    assert parse_time("10m", "--since", now) == int((now - 600) * 1e9)
    assert parse_time("1h30m", "--since", now) == int((now - 5400) * 1e9)
    assert parse_time("2026-01-02T15:04:05Z", "--since", now) == 1767366245 * 10**9
    assert parse_time("2026-01-02T16:04:05+01:00", "--since", now) == 1767366245 * 10**9
    for bad in ("", "yesterday", "10x", "-5m", "2026-13-40"):
        with pytest.raises(EmberError, match="--since"):
            parse_time(bad, "--since", now)


def test_filters_like_docker() -> None:
    rec = make_record("container", "die", "c" * 64, {"name": "web", "exitCode": 3,
                                                     "image": "busybox", "pod": "p1",
                                                     "k8s_namespace": "ns"})
    ok = [["event=die"], ["event=start", "event=die"], ["container=web"],
          ["container=" + "c" * 12], ["id=" + "c" * 64], ["type=container", "name=web"],
          ["exitcode=3"], ["pod=p1", "namespace=ns"], ["image=busybox"]]
    for f in ok:
        assert Filters.parse(f).match(rec), f
    for f in (["event=start"], ["container=other"], ["type=vm"], ["event=die", "name=x"],
              ["exitcode=0"]):
        assert not Filters.parse(f).match(rec), f
    for bad, words in (("nokey", "expected KEY=VALUE"), ("=x", "expected KEY=VALUE"),
                       ("event=", "expected KEY=VALUE"), ("colour=red", "unknown key")):
        with pytest.raises(EmberError, match=words):
            Filters.parse([bad])


@pytest.mark.parametrize("args, words", [
    (["--since", "last tuesday"], "--since 'last tuesday'"),
    (["--until", "soon"], "--until 'soon'"),
    (["--filter", "colour=red"], "unknown key 'colour'"),
    (["--filter", "event"], "expected KEY=VALUE"),
    (["--since", "1m", "--until", "2m"], "is before --since"),
])
def test_bad_options_are_one_line_and_exit_125(args, words, tmp_path) -> None:
    env = dict(os.environ, EMBER_STATE_DIR=str(tmp_path))
    r = subprocess.run([ember_bin(), "events", *args], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 125, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ember: error: "), r.stderr
    assert words in r.stderr, r.stderr
    assert not (tmp_path / "events").exists()  # nothing made


def test_cli_since_until_filter_and_text_form(tmp_path) -> None:
    env = dict(os.environ, EMBER_STATE_DIR=str(tmp_path))
    old = SandboxEvents(tmp_path, "1" * 64, "old")
    old.container("create")
    time.sleep(0.05)
    t0 = time.time()
    new = SandboxEvents(tmp_path, "2" * 64, "new", "busybox")
    new.container("create")
    new.container("start")
    new.outcome("exited", 7, False)
    t1 = time.time()
    time.sleep(0.05)
    new.container("destroy")

    def events(*args: str) -> list[dict]:
        r = subprocess.run([ember_bin(), "events", "--since", f"{t0:.6f}", "--until",
                            f"{t1:.6f}", "--format", "json", *args], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [json.loads(ln) for ln in r.stdout.splitlines()]

    assert [e["Action"] for e in events()] == ["create", "start", "die"]
    die = events("--filter", "event=die")
    assert len(die) == 1 and die[0]["Actor"]["Attributes"]["exitCode"] == "7"
    assert die[0]["Actor"]["ID"] == "2" * 64 and die[0]["from"] == "busybox"
    assert [e["Action"] for e in events("--filter", "event=die", "--filter",
                                        "event=create")] == ["create", "die"]
    assert events("--filter", "container=old") == []
    r = subprocess.run([ember_bin(), "events", "--since", f"{t0:.6f}", "--until", f"{t1:.6f}",
                        "--filter", "event=die"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.count("\n") == 1, r.stdout
    assert f" container die {'2' * 64} (" in r.stdout and "exitCode=7" in r.stdout


def test_follow_streams_new_events_and_ends_at_until(tmp_path) -> None:
    env = dict(os.environ, EMBER_STATE_DIR=str(tmp_path))
    until = time.time() + 3
    proc = subprocess.Popen([ember_bin(), "events", "--format", "json", "--until",
                             f"{until:.3f}"], env=env, stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the CLI is reading from the end by now
    SandboxEvents(tmp_path, "3" * 64, "live").container("start")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert [json.loads(ln)["Actor"]["Attributes"]["name"] for ln in out.splitlines()] == ["live"]
    assert time.time() >= until


def test_boot_and_restore_failures_and_boots_are_counted(tmp_path, caplog) -> None:
    """A failed start is a restore failure when the VMM was restoring a template, a
    boot failure otherwise; the metrics count each, and every boot in the histogram."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from ember.metrics.events import Events
    from ember.sandbox.events import vm_boot_failed, vm_booted

    reg = CollectorRegistry()
    counters = Events(reg, EventLog(tmp_path))
    ev = SandboxEvents(tmp_path, "d" * 64, "f")
    restoring = SimpleNamespace(vmm=SimpleNamespace(spec=SimpleNamespace(restore_from="x")))
    cold = SimpleNamespace(vmm=SimpleNamespace(spec=SimpleNamespace(restore_from=None)))
    vm_boot_failed(ev, restoring, "QEMU exited during start (exit code 1)")
    vm_boot_failed(ev, cold, "VM did not boot within 30s")
    vm_booted(ev, SimpleNamespace(restored=True, use_template=True, vm_id="d" * 64), 0.7)
    caplog.set_level("WARNING", logger="ember.metrics")
    counters.poll()
    assert [r["Action"] for r in EventLog(tmp_path).read()] == \
        ["restore_failed", "boot_failed", "boot"]
    assert reg.get_sample_value("ember_errors_total", {"kind": "restore_failure"}) == 1
    assert reg.get_sample_value("ember_errors_total", {"kind": "boot_failure"}) == 1
    assert reg.get_sample_value("ember_vm_start_seconds_count",
                                {"kind": "sandbox", "mode": "template"}) == 1
    assert reg.get_sample_value("ember_restore_floor_seconds") == 0.7
    assert any("d" * 64 in r.getMessage() and "restore failed" in r.getMessage()
               for r in caplog.records)


# ----------------------------------------------------------------- sandboxes
def vm_test(fn):
    return pytest.mark.root(pytest.mark.vm(pytest.mark.timeout(600)(fn)))


def _events(ember_env, since: float, *args: str) -> list[dict]:
    r = ember_env.run("events", "--since", f"{since:.6f}", "--until", f"{time.time():.6f}",
                      "--format", "json", *args, check=True)
    return [json.loads(ln) for ln in r.stdout.decode().splitlines()]


def _wait_for(fn, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


@vm_test
def test_run_exit_rm_gives_create_start_die_destroy_and_the_histogram_counts(ember_env, image):
    since = time.time()
    follower = subprocess.Popen([ember_bin(), "events", "--format", "json", "--filter",
                                 "container=ev-run"], env=ember_env.env, stdout=subprocess.PIPE,
                                text=True)
    streamed: list[dict] = []
    threading.Thread(target=lambda: streamed.extend(json.loads(ln) for ln in follower.stdout),
                     daemon=True).start()
    try:
        with serve(ember_env.env) as ep:
            fams, _ = ep.scrape()
            before = sum(value(fams, "ember_vm_start_seconds_count", kind="sandbox", mode=m)
                         for m in ("cold", "template"))
            r = ember_env.run("run", "--name", "ev-run", image, "sh", "-c", "exit 3")
            assert r.returncode == 3, r.stderr
            ember_env.run("rm", "ev-run", check=True)
            fams, _ = ep.scrape()
            after = sum(value(fams, "ember_vm_start_seconds_count", kind="sandbox", mode=m)
                        for m in ("cold", "template"))
            assert after == before + 1
            lookups = sum(value(fams, "ember_template_cache_lookups_total", result=k)
                          for k in ("hit", "miss", "busy", "failed"))
            assert lookups == 1  # snapshots on: the one start looked its template up
            assert value(fams, "ember_events_total", type="container", action="die") == 1
            assert value(fams, "ember_events_total", type="container", action="destroy") == 1

        evs = _events(ember_env, since, "--filter", "container=ev-run")
        actions = [e["Action"] for e in evs if e["Type"] == "container"]
        assert actions == ["create", "start", "die", "destroy"], actions
        die = next(e for e in evs if e["Action"] == "die")
        assert die["Actor"]["Attributes"]["exitCode"] == "3"
        assert die["Actor"]["Attributes"]["name"] == "ev-run" and die["from"] == image
        boot = [e for e in evs if e["Type"] == "vm"]
        assert [e["Action"] for e in boot] == ["boot"], boot
        attrs = boot[0]["Actor"]["Attributes"]
        assert float(attrs["seconds"]) > 0 and attrs["mode"] in ("cold", "template")
        assert [e["Action"] for e in _events(ember_env, since, "--filter", "event=die",
                                             "--filter", "container=ev-run")] == ["die"]
        assert _events(ember_env, since, "--filter", "container=ev-run", "--filter",
                       "type=vm", "--filter", "event=crash") == []
        # The follower (started before, no --since) got the same stream as it happened.
        _wait_for(lambda: len(streamed) >= 5, f"follower saw {streamed}", 10)
        assert [(e["Type"], e["Action"]) for e in streamed] == \
            [(e["Type"], e["Action"]) for e in evs]
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    assert follower.returncode == 0


@vm_test
def test_sigkilled_vmm_gives_a_crash_event(ember_env, image):
    since = time.time()
    ember_env.run("run", "-d", "--name", "ev-kill", image, "sleep", "1000", check=True)
    info = json.loads(ember_env.run("inspect", "ev-kill", check=True).stdout)[0]
    os.kill(info["vmm_pid"], signal.SIGKILL)
    crash = _wait_for(lambda: _events(ember_env, since, "--filter", "type=vm", "--filter",
                                      "event=crash"), "no crash event")
    assert len(crash) == 1 and crash[0]["Actor"]["ID"] == info["id"]
    assert "killed by signal 9" in crash[0]["Actor"]["Attributes"]["error"]
    die = _wait_for(lambda: _events(ember_env, since, "--filter", "event=die"), "no die event")
    assert die[0]["Actor"]["Attributes"]["error"].startswith("VMM exited unexpectedly")
    ember_env.run("rm", "-f", "ev-kill", check=True)


# ---------------------------------------------------------------------- pods
@pytest.mark.root
@pytest.mark.vm
@pytest.mark.containerd
@pytest.mark.timeout(900)
def test_cri_pod_events(guest_assets) -> None:
    from shimtools import BUSYBOX, discard_pod, private_containerd

    from ember.cri.client import CRIClient

    since = time.time()
    with private_containerd(cri=True) as (c, work), CRIClient(c.address) as client:
        env = dict(os.environ, EMBER_CONFIG=str(work / "ember.toml"))
        env.pop("EMBER_STATE_DIR", None)

        def events(*args: str) -> list[dict]:
            r = subprocess.run([ember_bin(), "events", "--since", f"{since:.6f}", "--until",
                                f"{time.time():.6f}", "--format", "json", *args], env=env,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return [json.loads(ln) for ln in r.stdout.splitlines()]

        pod = client.run_pod("ev-pod", runtime_handler="ember", namespace="ev-ns")
        try:
            cid = client.create_container(pod, "app", BUSYBOX, ["sh", "-c", "exit 4"])
            client.start_container(cid)
            die = _wait_for(lambda: events("--filter", f"container={cid}", "--filter",
                                           "event=die"), "no die event for the pod's container")
            attrs = die[0]["Actor"]["Attributes"]
            assert attrs["exitCode"] == "4" and attrs["name"] == "app", attrs
            assert attrs["pod"] == pod and attrs["k8s_namespace"] == "ev-ns"
            assert attrs["k8s_pod"] == "ev-pod" and attrs["kind"] == "pod"
            # containerd deletes a task once it exited (the shim then removes the
            # container from the guest: destroy), so destroy may follow at once.
            mine = [e["Action"] for e in events("--filter", f"container={cid}")]
            assert mine in (["create", "start", "die"], ["create", "start", "die", "destroy"]), \
                mine
            boot = events("--filter", f"pod={pod}", "--filter", "type=vm")
            assert [e["Action"] for e in boot] == ["boot"], boot
            assert boot[0]["Actor"]["Attributes"]["k8s_pod"] == "ev-pod"
            assert events("--filter", "namespace=ev-ns", "--filter", "event=create")

            # The pod's VMM killed under it: the shim publishes a crash with the pod id.
            sleeper = client.create_container(pod, "sleeper", BUSYBOX, ["sleep", "1000"])
            client.start_container(sleeper)
            rec = next(r for r in (json.loads(f.read_text())
                                   for f in (work / "st" / "shim").glob("*/pod.json"))
                       if r.get("group") == pod)
            os.kill(rec["vmm_pid"], signal.SIGKILL)
            crash = _wait_for(lambda: events("--filter", f"pod={pod}", "--filter",
                                             "event=crash"), "no crash event for the pod's VM")
            assert crash[0]["Actor"]["ID"] == pod and crash[0]["Type"] == "vm"
            assert "killed by signal 9" in crash[0]["Actor"]["Attributes"]["error"]
        finally:
            discard_pod(client, pod)
        gone = _wait_for(lambda: events("--filter", f"container={cid}", "--filter",
                                        "event=destroy"), "no destroy event")
        assert len(gone) == 1
