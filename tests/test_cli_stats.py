"""`ember stats`: numbers of real sandboxes (guest cgroup, VMM on the host), and its errors."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(600)]


def _json_rows(ember_env, *refs: str) -> dict[str, dict]:
    proc = ember_env.run("stats", "--no-stream", "--format", "json", *refs)
    assert proc.returncode == 0, proc.stderr
    return {r["name"]: r for r in map(json.loads, proc.stdout.decode().splitlines())}


def _wait_log(ember_env, name: str, text: bytes, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in ember_env.run("logs", name).stdout:
        assert time.monotonic() < deadline, f"{name} never logged {text!r}"
        time.sleep(0.3)


def test_stats_of_running_sandboxes(ember_env, image):
    # busy: one CPU spinning and 3 extra processes; idle: 24 MiB held in a tmpfs file.
    ember_env.run("run", "-d", "--name", "busy", image, "sh", "-c",
                  "sleep 1000 & sleep 1000 & sleep 1000 & while :; do :; done", check=True)
    ember_env.run("run", "-d", "--name", "idle", "-m", "256m", image, "sh", "-c",
                  "dd if=/dev/zero of=/dev/shm/fill bs=1M count=24 && echo filled; sleep 1000",
                  check=True)
    _wait_log(ember_env, "idle", b"filled")
    rows = _json_rows(ember_env)
    assert set(rows) == {"busy", "idle"}
    busy, idle = rows["busy"], rows["idle"]
    assert busy["cpu_percent"] > 20, busy  # the spinning shell (TCG on a shared host: lenient)
    assert busy["pids"] == 4, busy  # sh and its 3 sleeps
    assert idle["mem_usage"] >= 24 << 20, idle  # the container's own cgroup holds the file
    assert idle["mem_limit"] == 256 << 20, idle  # -m is the container's limit
    assert busy["mem_limit"] > 0 and busy["mem_usage"] > 0
    for r in (busy, idle):
        assert r["vmm_rss"] > 16 << 20, r  # the host side: the VMM process
        assert r["net_rx"] == r["net_tx"] == 0  # --network none
    assert busy["vmm_cpu_percent"] > 20

    # The table: a header and one line per named sandbox, Docker's columns.
    proc = ember_env.run("stats", "--no-stream", "idle")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["SANDBOX", "ID", "NAME"]
    assert "MEM USAGE / LIMIT" in lines[0] and "NET I/O" in lines[0]
    assert len(lines) == 2 and lines[1].split()[1] == "idle"
    assert "/ 256MiB" in lines[1]


def test_stats_network_and_block_io(ember_env, image):
    ember_env.run("run", "-d", "--name", "net", "--network", "bridge", image, "sh", "-c",
                  "ping -c 3 10.88.0.1 >/dev/null; cat /bin/busybox > /dev/null; sync; "
                  "echo done; sleep 1000", check=True)
    _wait_log(ember_env, "net", b"done")
    row = _json_rows(ember_env, "net")["net"]
    assert row["net_rx"] > 0 and row["net_tx"] > 0, row  # counted on the host's veth
    assert row["blk_read"] > 0, row  # the guest cgroup's io.stat


def test_stats_errors_are_one_line(ember_env, image):
    ember_env.run("run", "-d", "--name", "gone", image, "sh", "-c", "exit 3", check=True)
    deadline = time.monotonic() + 60
    while b"exited" not in ember_env.run("ps", "-a").stdout:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    for args, text in ((["gone"], b"sandbox gone is not running (status exited)"),
                       (["nosuch"], b"no such sandbox: nosuch")):
        proc = ember_env.run("stats", "--no-stream", *args)
        assert proc.returncode == 125
        assert proc.stdout == b""
        assert proc.stderr.decode().count("\n") == 1 and text in proc.stderr, proc.stderr
    # Nothing running: only the header.
    proc = ember_env.run("stats", "--no-stream")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
