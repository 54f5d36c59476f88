"""`ember --debug` / EMBER_TRACE=1: the time of every start phase of `ember run`.

The phases run in three processes (CLI, sandbox monitor, jailed VMM); the
test checks that one `ember run --rm` prints each of them once, on the CLI's
stderr, on one clock (a phase that needs another starts after it ended).
"""

from __future__ import annotations

import os
import re

import pytest

from ember import trace

LINE = re.compile(r"^ember-trace: +(-?[\d.]+) -> +(-?[\d.]+) ms \( *([\d.]+) ms\) (.+)$")
PHASES = ["cli", "image resolve", "monitor spawn", "disk prepare", "monitor start",
          "template lookup", "jail", "restore", "agent ready", "wait for monitor ready",
          "disk attach", "container create+start", "watch", "exit",
          "teardown: vm stop", "teardown: remove", "teardown (creator waits)"]


def _phases(stderr: str) -> dict[str, tuple[float, float]]:
    found: dict[str, tuple[float, float]] = {}
    for line in stderr.splitlines():
        m = LINE.match(line)
        assert m, f"not a trace line: {line!r}"
        start, end, took, name = float(m[1]), float(m[2]), float(m[3]), m[4]
        assert name not in found, f"{name} printed twice"
        assert start <= end + 0.05 and abs((end - start) - took) < 0.2, line
        found[name] = (start, end)
    return found


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_debug_trace_lists_every_phase_in_order(ember_env, image):
    proc = ember_env.run("--debug", "run", "--rm", image, "sh", "-c", "echo hi; exit 4")
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout == b"hi\n"
    ph = _phases(proc.stderr.decode())
    assert set(PHASES) <= set(ph), sorted(set(PHASES) - set(ph))  # others may add phases
    # One clock across processes: each step begins after the one it waits for.
    order = ["cli", "image resolve", "monitor spawn", "template lookup", "jail", "restore",
             "agent ready", "disk attach", "container create+start", "watch",
             "teardown: vm stop", "exit", "teardown: remove"]
    for before, after in zip(order, order[1:], strict=False):
        assert ph[before][1] <= ph[after][0] + 1.0, (before, ph[before], after, ph[after])
    assert ph["monitor start"][0] >= ph["monitor spawn"][0] - 15  # 10 ms process clock
    assert ph["wait for monitor ready"][1] >= ph["agent ready"][1]


@pytest.mark.root
@pytest.mark.vm
@pytest.mark.timeout(600)
def test_trace_env_and_quiet_without_it(ember_env, image):
    env = dict(ember_env.env, EMBER_TRACE="1")
    ember_env.env, saved = env, ember_env.env
    try:
        proc = ember_env.run("run", "--rm", image, "true")
    finally:
        ember_env.env = saved
    assert proc.returncode == 0, proc.stderr
    assert set(PHASES) <= set(_phases(proc.stderr.decode()))
    proc = ember_env.run("run", "--rm", image, "true")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr


def test_trace_off_writes_nothing_and_on_writes_one_line(monkeypatch, tmp_path):
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        monkeypatch.setenv(trace.FD_ENV, str(fd))
        monkeypatch.delenv(trace.ENV, raising=False)
        with trace.span("quiet"):
            pass
        assert out.read_bytes() == b""
        monkeypatch.setenv(trace.ENV, "1")
        monkeypatch.setenv(trace.T0_ENV, "100.0")
        trace.mark("phase one", 100.5, 100.75)
    finally:
        os.close(fd)
    m = LINE.match(out.read_text().strip())
    assert m and (float(m[1]), float(m[2]), float(m[3]), m[4]) == (500.0, 750.0, 250.0,
                                                                   "phase one")
