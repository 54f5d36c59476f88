"""StopSignals: a stop signal is seen whether it comes before or during the wait,
other caught signals do not stop, and ``on_signal`` runs its action once.

Each case runs in its own Python process: the wake-up fd and the handlers are
per process, and pytest's own must not be disturbed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)  # a waiter that hangs must fail, not stall the suite
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": SRC})


@contextlib.contextmanager
def _ready_child(code: str) -> Iterator[subprocess.Popen[str]]:
    """A child that prints "ready" once it waits; killed afterwards whatever happened."""
    proc = _child(code)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_signal_before_the_wait_is_not_lost():
    proc = _child("""
        import os, signal, time
        from ember.stopsignal import StopSignals
        stop = StopSignals()
        assert stop.wait(0.1) is None and stop.wait(0) is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the (empty) handler has run long before the wait
        t0 = time.monotonic()
        print(stop.wait(10), stop.wait(0), round(time.monotonic() - t0))
    """)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == [str(int(signal.SIGTERM))] * 2 + ["0"]


def test_a_signal_during_the_wait_ends_it_and_other_signals_do_not():
    with _ready_child("""
        import signal
        from ember.stopsignal import StopSignals
        stop = StopSignals([signal.SIGTERM])
        signal.signal(signal.SIGUSR1, lambda *_: print("usr1", flush=True))
        print("ready", flush=True)
        print("got", stop.wait(60), flush=True)
    """) as proc:
        proc.send_signal(signal.SIGUSR1)
        assert proc.stdout.readline().strip() == "usr1"
        time.sleep(0.3)
        assert proc.poll() is None, "SIGUSR1 is not a stop signal"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert time.monotonic() - t0 < 2
        assert proc.returncode == 0, err
        assert out.strip() == f"got {int(signal.SIGTERM)}"


def test_on_signal_runs_the_action_once_off_the_main_thread():
    """...and a second waiter, in another thread, wakes with it (the pipe is
    read without holding a lock across the wait)."""
    with _ready_child("""
        import signal, threading, time
        from ember.stopsignal import StopSignals
        done = threading.Event()
        calls = []
        def action(sig):
            calls.append((sig, threading.current_thread() is threading.main_thread()))
            done.set()
        stop = StopSignals()
        stop.on_signal(action)
        other = []
        waiter = threading.Thread(target=lambda: other.append(stop.wait(60)))
        waiter.start()
        time.sleep(0.2)  # both are waiting now
        t0 = time.monotonic()
        assert stop.wait(0.2) is None and time.monotonic() - t0 < 5  # not stuck behind them
        print("ready", flush=True)
        assert done.wait(60)
        waiter.join(60)
        time.sleep(0.3)  # a second signal must not run it again
        print(calls, other, flush=True)
    """) as proc:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        sig = int(signal.SIGINT)
        assert out.strip() == f"[({sig}, False)] [{sig}]"


def test_a_storm_of_signals_never_hangs_the_waiter():
    """Thousands of signals while the main thread waits in short slices (the
    old ``Event.wait(1)`` loop's shape): every slice returns, and the stop is
    seen."""
    proc = _child("""
        import os, signal, threading, time
        from ember.stopsignal import StopSignals
        stop = StopSignals([signal.SIGTERM])
        signal.signal(signal.SIGUSR1, lambda *_: None)
        me = os.getpid()
        def storm():
            for _ in range(5000):
                os.kill(me, signal.SIGUSR1)
            os.kill(me, signal.SIGTERM)
        threading.Thread(target=storm, daemon=True).start()
        while stop.wait(0.001) is None:
            pass
        print("stopped", flush=True)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "stopped"


def test_a_forked_childs_signal_is_not_the_parents():
    """A helper forked without exec (pyroute2's NetNS is one) shares the pipe;
    its SIGTERM must kill it, not stop the parent."""
    proc = _child("""
        import os, signal
        from ember.stopsignal import StopSignals
        stop = StopSignals([signal.SIGTERM])
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)  # not reached: SIGTERM is fatal again in the child
        _, status = os.waitpid(pid, 0)
        print(os.WIFSIGNALED(status) and os.WTERMSIG(status), stop.wait(0.5), flush=True)
    """)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == [str(int(signal.SIGTERM)), "None"]
