"""The jailer's hand-over to its lean waiter keeps the signals it caught.

A SIGTERM that reaches ember-jailer after the VMM is forked but before the
waiter runs must still end the VMM, and the jailer must still exit
128+SIGTERM (not 128+SIGKILL) when the VMM, as PID 1 of its namespace, had no
handler and the signal became SIGKILL. CI caught the second half failing once
in test_an_uncaught_forwarded_signal_still_ends_the_vmm; this drives the
hand-over directly so the window is hit every time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

HAND_OVER = r"""
import os, signal, sys
from types import SimpleNamespace
from ember.jailer import jail
base, signum, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
signal.pthread_sigmask(signal.SIG_BLOCK, jail._FORWARDED)
vmm = os.posix_spawn(argv[0], argv, os.environ, setsigmask=())
while argv[0] != "/bin/sleep" and not jail.waiter._catches(vmm, signum):
    pass  # a VMM with a handler: wait until it is installed
os.makedirs(os.path.join(base, "vmm", "jid"))
plan = SimpleNamespace(cgroups=SimpleNamespace(parent="ember-no-such-parent"),
                       spec=SimpleNamespace(chroot_base_dir=base, exec_name="vmm", id="jid"))
print(vmm, flush=True)
jail._become_waiter(plan, vmm, [signum])  # as if the jailer had caught signum
sys.exit(99)  # exec failed
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_caught_before_the_waiter_runs_ends_the_vmm_and_is_reported(tmp_path, signum):
    proc = subprocess.Popen([sys.executable, "-c", HAND_OVER, str(tmp_path), str(int(signum)),
                             "/bin/sleep", "30"],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        vmm = int(proc.stdout.readline())
        assert proc.wait(timeout=10) == 128 + signum  # sleep has no handler: SIGKILL, reported as signum
        with pytest.raises(ProcessLookupError):
            os.kill(vmm, 0)
        assert not (tmp_path / "vmm" / "jid").exists()  # the waiter removed the jail
    finally:
        proc.kill()
        proc.wait()


def test_a_handled_signal_is_passed_on_as_itself(tmp_path):
    """A VMM that catches SIGTERM gets SIGTERM, and its own exit code is returned."""
    script = tmp_path / "vmm.py"
    script.write_text("import signal, sys, time\n"
                      "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
                      "print('ready', flush=True)\n"
                      "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", HAND_OVER, str(tmp_path),
                             str(int(signal.SIGTERM)), sys.executable, str(script)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert "ready" in "".join(lines)
        assert proc.wait(timeout=10) == 7
    finally:
        proc.kill()
        proc.wait()
