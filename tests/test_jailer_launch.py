"""ember.jailer.launch: ember-jailer run by a pre-forked helper, or forked by a
one-thread caller, or exec'd; the same confined run and exit status each way.

Each case runs the launcher in a fresh Python process (HELPER below), so the
thread count is the one the case sets up, not pytest's. The jailed "VMM" is
busybox, as in tests/test_jailer.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_jailer import UID, jail_env, make_spec

from ember.jailer.api import build_argv, cleanup, jail_dir, jailer_command

pytestmark = pytest.mark.root


@pytest.fixture
def env(tmp_path):
    with jail_env(tmp_path) as holder:
        yield holder

HELPER = r"""
import json, os, subprocess, sys, threading, time
from ember.jailer import launch
argv, opts, out_path = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
before = os.open("/dev/null", os.O_RDONLY)  # inheritable, as a monitor's lock or socket
os.set_inheritable(before, True)
if opts.get("no_pidns"):  # as if this process could not make a PID namespace
    real_unshare, parent = launch.linux.unshare, os.getpid()
    def unshare(flags):
        if flags == launch.linux.CLONE_NEWPID and os.getpid() == parent:
            raise PermissionError(1, "unshare: Operation not permitted")
        real_unshare(flags)
    launch.linux.unshare = unshare
if opts.get("break_jail"):  # the jailer's module cannot be imported (a broken install)
    sys.modules["ember.jailer.jail"] = None
report = {"preforked": launch.prefork() if opts.get("prefork") else None}
for _ in range(opts.get("threads", 0)):
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
after = os.open("/dev/null", os.O_RDONLY)
os.set_inheritable(after, True)
if opts.get("kill_helper"):
    pid = launch._helper[0]
    os.kill(pid, 9)
    os.waitpid(pid, 0)
if opts.get("discard"):
    launch.discard()
    report["children"] = open(f"/proc/self/task/{os.getpid()}/children").read().split()
    print(json.dumps(report))
    sys.exit(0)
r, w = os.pipe()
cut = argv.index("--")
argv[cut:cut] = ["--keep-fd", str(w)]
argv = [a.replace("{FD}", str(w)) for a in argv]
out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
p = launch.popen(argv, stdout=out, stderr=out, pass_fds=[w])
os.close(out)
os.close(w)
report.update(kind=type(p).__name__, own_session=None, timed_out=False, kept=w,
              vmm=getattr(p, "vmm", False), parent=None, nspid=None, me=os.getpid())
try:
    p.wait(0.3)
except subprocess.TimeoutExpired:
    report["timed_out"] = True
    report["own_session"] = os.getsid(p.pid) == p.pid
    report["parent"] = int(open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()[1])
    report["nspid"] = [l.split()[1:] for l in open(f"/proc/{p.pid}/status")
                       if l.startswith("NSpid")][0]
report["code"] = p.wait(30)
report["poll"] = p.poll()
report["pipe"] = os.read(r, 100).decode()
print(json.dumps(report))
"""

# Writes to the kept descriptor, then lists which of 1 and 3..12 are open in the
# jailed program (busybox sh, no /proc needed; it keeps its own fds at 10 and up):
# stdout and the kept one only.
PROBE = ("echo kept >&{FD}; "
         "for f in 1 3 4 5 6 7 8 9; do { true <&$f; } 2>/dev/null && echo fd$f; done; "
         "id -u; /busybox sleep 1; exit 7")


def _launch(env, argv: list[str], **opts) -> tuple[dict, str]:
    out = env["tmp"] / f"out-{len(list(env['tmp'].iterdir()))}"
    res = subprocess.run([sys.executable, "-c", HELPER, json.dumps(argv), json.dumps(opts),
                          str(out)], capture_output=True, text=True, timeout=60,
                         env={**env["env"], "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout), out.read_text() if out.exists() else ""


def _check_runs_jailed(env, kind: str, **opts) -> dict:
    spec = make_spec(env, args=["sh", "-c", PROBE], seccomp="off")
    report, out = _launch(env, build_argv(spec), **opts)
    assert report["kind"] == kind, report
    assert report["timed_out"] and report["own_session"]  # wait(timeout) gives up; setsid
    assert (report["code"], report["poll"]) == (7, 7)
    assert report["pipe"] == "kept\n"  # --keep-fd arrived at its number
    # Only stdout and the kept one are open: nothing else the caller held
    # (before or after the helper was forked) reached the VMM.
    assert 3 < report["kept"] <= 9
    assert out.split() == ["fd1", f"fd{report['kept']}", str(UID)], out
    if report["vmm"]:
        # In place: the VMM was the caller's own child, PID 1 of a namespace of its own,
        # and the jail is the caller's to remove.
        assert report["parent"] == report["me"], report
        assert report["nspid"][-1] == "1" and len(report["nspid"]) == 2, report
        assert jail_dir(spec).exists()
        cleanup(spec)
    assert not jail_dir(spec).exists()
    return report


def test_a_preforked_helper_runs_the_jailer_in_a_threaded_caller(env):
    report = _check_runs_jailed(env, "Forked", prefork=True, threads=2)
    assert report["preforked"] is True
    assert report["vmm"], "as root the helper becomes the VMM in place: no waiter"


def test_a_helper_without_a_pid_namespace_of_its_own_runs_the_jailer_with_its_waiter(env):
    """Where the caller cannot make a PID namespace, the helper is an ordinary
    child: the jailer forks the VMM and waits, and removes the jail itself."""
    report = _check_runs_jailed(env, "Forked", prefork=True, threads=1, no_pidns=True)
    assert not report["vmm"] and len(report["nspid"]) == 1, report


def test_a_one_thread_caller_without_a_helper_makes_one(env):
    assert _check_runs_jailed(env, "Forked")["vmm"]


def test_a_helper_that_died_means_an_exec(env):
    """Killed before it was used: the send fails and the jailer is exec'd,
    confined the same, with its waiter (the VMM is PID 1 of a namespace too)."""
    report = _check_runs_jailed(env, "Popen", prefork=True, kill_helper=True, threads=1)
    assert not report["vmm"] and len(report["nspid"]) == 1  # the waiter, in our namespace


def test_a_threaded_caller_without_a_helper_execs(env):
    _check_runs_jailed(env, "Popen", threads=2)


def test_prefork_refuses_a_threaded_process_and_discard_reaps(env):
    report, _ = _launch(env, [], prefork=True, discard=True)
    assert report == {"preforked": True, "children": []}
    report, _ = _launch(env, [], threads=1, discard=True)
    assert report == {"preforked": None, "children": []}


PRELOAD = r"""
import json, os, sys, time
from ember.jailer import launch
def seccomp_loaded(pid):
    return "libseccomp" in open(f"/proc/{pid}/maps").read()
mine = seccomp_loaded(os.getpid())
launch.prefork()
helper = launch._helper[0]
deadline = time.monotonic() + 20
while not seccomp_loaded(helper) and time.monotonic() < deadline:
    time.sleep(0.02)
print(json.dumps({"mine": mine, "helper": seccomp_loaded(helper),
                  "mine_after": seccomp_loaded(os.getpid())}))
launch.discard()
"""


def test_the_helper_loads_the_jailer_before_it_is_asked(env):
    """The helper imports the jailer's modules while it waits, so a jailed start
    does not wait for them (they took ~20 ms of every jailed restore). Seen
    from outside: libseccomp (loaded by the jailer's seccomp module) is mapped in the
    helper before any request came, though its parent never loaded it."""
    res = subprocess.run([sys.executable, "-c", PRELOAD], capture_output=True, text=True,
                         timeout=60, env={**env["env"],
                                          "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"mine": False, "helper": True, "mine_after": False}


def test_another_program_is_execd_and_the_helper_let_go(env):
    report, _ = _launch(env, ["/bin/sh", "-c", "exit 3", "--"], prefork=True)
    assert (report["kind"], report["code"]) == ("Popen", 3)


def test_a_bad_argument_is_one_line_and_status_125(env):
    for opts in ({"prefork": True}, {}):
        report, out = _launch(env, [jailer_command(), "--id", "x", "--uid", "nope", "--"], **opts)
        assert (report["kind"], report["code"]) == ("Forked", 125)
        assert len(out.splitlines()) == 1 and out.startswith("ember-jailer: "), out
        assert "--uid" in out


def test_a_jailer_that_cannot_be_imported_fails_on_the_requests_stderr(env):
    """The helper imports the jailer before it is asked; when that import fails
    the helper must still take the request and say why on the stderr it was
    given (status 125), not die first (its words on its parent's stderr, and
    the start left to race its death: a send before it sees a dead helper)."""
    report, out = _launch(env, [jailer_command(), "--id", "x", "--"], prefork=True,
                          break_jail=True)
    assert (report["kind"], report["code"]) == ("Forked", 125)
    assert out.startswith("ember-jailer: ") and "ember.jailer.jail" in out, out


def test_forked_gives_one_status_to_every_thread():
    """A monitor waits for its VMM in one thread and polls it in others: all of
    them must see the child's own status, never a stand-in."""
    import os
    import threading
    import time

    from ember.jailer.launch import Forked

    for i in range(20):
        pid = os.fork()
        if pid == 0:
            time.sleep(0.01 * (i % 3))
            os._exit(7)
        child = Forked(pid, ["x"])
        seen: list[int | None] = []

        def poller(child=child, seen=seen) -> None:
            while child.poll() is None:
                pass
            seen.append(child.poll())

        threads = [threading.Thread(target=poller) for _ in range(2)]
        for t in threads:
            t.start()
        seen.append(child.wait())
        seen.append(child.wait(1))
        for t in threads:
            t.join(5)
        assert seen == [7, 7, 7, 7], seen


def test_a_setup_failure_in_place_is_one_line_and_125_and_leaves_the_jail_to_clean(env):
    """The helper became the VMM's process and failed inside the jail's set-up
    (here: joining a "network namespace" that is a plain file): one line on
    stderr, status 125, and the jail is the caller's to remove, which works."""
    bogus = env["tmp"] / "not-a-netns"
    bogus.write_text("")
    spec = make_spec(env, args=["sh", "-c", "echo ran >&{FD}"], seccomp="off", netns=str(bogus))
    report, out = _launch(env, build_argv(spec), prefork=True)
    assert (report["kind"], report["vmm"], report["code"]) == ("Forked", True, 125), report
    assert report["pipe"] == ""  # the VMM never ran
    assert len(out.splitlines()) == 1, out
    assert out.startswith("ember-jailer: jail setup failed: ") and "Invalid argument" in out, out
    assert jail_dir(spec).exists()
    cleanup(spec)
    assert not jail_dir(spec).exists()
