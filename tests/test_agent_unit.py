"""Agent pieces that need no root: stream buffers, spec preparation, error mapping, reaper."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ember.agent import spec
from ember.agent.crun import exec_error, read_log
from ember.agent.streams import StreamBuffer
from ember.errors import AgentError, CommandNotFound, CommandNotRunnable, NotFoundError
from ember.sandbox.agent_client import translate
from ember.ttrpc import Code, TTRPCError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_stream_offsets_and_eof():
    b = StreamBuffer()
    b.append(b"hello ")
    b.append(b"world")
    assert b.read(0) == (b"hello world", 0, False)
    assert b.read(6, max_bytes=3) == (b"wor", 6, False)
    assert b.read(11) == (b"", 11, False)
    b.close()
    assert b.read(6) == (b"world", 6, True)
    assert b.read(11) == (b"", 11, True)
    assert b.read(99) == (b"", 11, True)  # past the end: clamped


def test_stream_keeps_only_the_newest_bytes():
    b = StreamBuffer(limit=10)
    b.append(b"0123456789")
    b.append(b"abcde")
    data, off, _ = b.read(0)
    assert (data, off) == (b"56789abcde", 5)  # a late reader is moved up, and told
    assert b.read(12) == (b"cde", 12, False)


def test_stream_read_waits_for_data():
    b = StreamBuffer()
    start = time.monotonic()
    assert b.read(0, wait_s=0.2) == (b"", 0, False)
    assert time.monotonic() - start >= 0.19
    threading.Timer(0.1, b.append, args=(b"late",)).start()
    start = time.monotonic()
    assert b.read(0, wait_s=5)[0] == b"late"
    assert time.monotonic() - start < 2
    threading.Timer(0.1, b.close).start()
    assert b.read(4, wait_s=5) == (b"", 4, True)


@pytest.mark.parametrize("msg,code,text", [
    ("executable file `foo` not found in $PATH: No such file or directory", Code.NOT_FOUND,
     'exec: "foo": executable file not found in $PATH'),
    ("open executable: No such file or directory", Code.NOT_FOUND,
     'exec: "/x": no such file or directory'),
    ("open executable: Permission denied", Code.PERMISSION_DENIED, 'exec: "/x": permission denied'),
    ("open executable: Operation not permitted", Code.PERMISSION_DENIED,
     'exec: "/x": permission denied'),
    ("exec container process `/x`: Permission denied", Code.PERMISSION_DENIED,
     'exec: "/x": permission denied'),
])
def test_exec_errors_are_mapped(msg, code, text):
    err = exec_error(msg, "/x")
    assert (err.code, err.message) == (code, text)


def test_other_crun_errors_are_not_exec_errors(tmp_path):
    assert exec_error("chdir to cwd `/nope` set in config.json: No such file or directory", "sh") is None
    log = tmp_path / "log"
    log.write_text('{"msg":"first","level":"error"}\n{"msg":"dbg","level":"debug"}\nplain line\n')
    assert read_log(str(log)) == ["first", "plain line"]
    assert read_log(str(tmp_path / "missing")) == []


def test_translate_to_ember_errors():
    assert isinstance(translate(TTRPCError(5, 'exec: "x": executable file not found in $PATH')),
                      CommandNotFound)
    assert isinstance(translate(TTRPCError(7, 'exec: "x": permission denied')), CommandNotRunnable)
    assert isinstance(translate(TTRPCError(5, 'exec: "/x": no such file or directory')),
                      CommandNotFound)
    crun_nf = translate(TTRPCError(5, "crun kill: error opening file `/run/c/status`: "
                                      "No such file or directory"))
    assert type(crun_nf) is NotFoundError
    nf = translate(TTRPCError(5, "container 'c' not found"))
    assert isinstance(nf, NotFoundError) and nf.exit_code == 125
    other = translate(TTRPCError(6, "container 'c' already exists"))
    assert isinstance(other, AgentError) and other.code == 6 and "already exists" in str(other)


def test_spec_prepare_fills_in_guest_details():
    raw = json.dumps({"process": {"args": ["sh"]}, "root": {"path": "ignored", "readonly": True},
                      "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]},
                      "mounts": [{"destination": "/data", "source": "ember-disk:0"}]}).encode()
    out = spec.prepare(raw, "c1", "/run/x/rootfs", False, ["/run/x/disks/0"])
    assert out["root"] == {"path": "/run/x/rootfs", "readonly": True}
    assert sorted(n["type"] for n in out["linux"]["namespaces"]) == \
        ["ipc", "mount", "network", "pid", "uts"]
    assert out["linux"]["cgroupsPath"] == "/ember/c1"
    assert out["mounts"][0]["source"] == "/run/x/disks/0" and "rbind" in out["mounts"][0]["options"]
    out = spec.prepare(json.dumps({"process": {"args": ["sh"]},
                                   "linux": {"cgroupsPath": "/pod/c"}}).encode(),
                       "c1", "/r", True, [])
    assert out["linux"]["cgroupsPath"] == "/pod/c" and out["root"]["readonly"] is True


@pytest.mark.parametrize("raw,words", [
    (b"{nope", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"process": {"args": []}}', "process.args"),
    (b'{"mounts": [{"destination": "/d", "source": "ember-disk:1"}], "process": {"args": ["x"]}}',
     "only 0 extra disk"),
])
def test_spec_prepare_rejects_bad_input(raw, words):
    with pytest.raises(TTRPCError) as e:
        spec.prepare(raw, "c", "/r", False, [])
    assert e.value.code == Code.INVALID_ARGUMENT and words in e.value.message


def test_ids_are_checked():
    spec.check_id("container id", "abc-1.2_3")
    for bad in ("", "../etc", "a/b", "x" * 129, "-lead"):
        with pytest.raises(TTRPCError):
            spec.check_id("container id", bad)


def test_reaper_dispatches_exits():
    """Run in a child: the reaper waits on every pid of its process."""
    script = textwrap.dedent("""
        import os, time
        from ember.agent.reaper import Reaper, set_subreaper
        set_subreaper()
        r = Reaper(); r.start()
        assert r.spawn(["sh", "-c", "exit 7"]).wait(5)
        e = r.spawn(["sh", "-c", "kill -9 $$"]); e.wait(5)
        assert (e.exit_code, e.signal) == (137, 9), (e.exit_code, e.signal)
        assert r.run_command(["sh", "-c", "echo out; echo err >&2; exit 2"]) == (2, b"out\\nerr\\n")
        # an orphan re-parented to us, reaped before anyone asked about it
        rc, out = r.run_command(["sh", "-c", "(sleep 0.1; exit 9) >/dev/null 2>&1 & echo $!"])
        time.sleep(0.3)
        orphan = r.watch(int(out))
        assert orphan.wait(5) and orphan.exit_code == 9, orphan.status
        # and one that is still running when watched
        rc, out = r.run_command(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"])
        late = r.watch(int(out))
        assert not late.done
        os.kill(late.pid, 9)
        assert late.wait(5) and late.exit_code == 137
        # With no child left the reaper sleeps until the next spawn: it does
        # not wake itself (an idle guest must stay idle), yet still reaps.
        def switches():
            with open(f"/proc/self/task/{r._thread.native_id}/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("voluntary_ctxt"))
        time.sleep(0.3)
        before = switches()
        time.sleep(1.2)
        assert switches() - before <= 1, switches() - before
        assert r.run_command(["sh", "-c", "exit 4"]) == (4, b"")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("kind,address,words", [
    ("floppy", "a", "unknown block device kind"),
    ("scsi", "x:y", "bad SCSI address"),
    ("fcdisk", "no-sectors", "SERIAL:SECTORS"),
    ("path", "", "no address"),
])
def test_bad_disk_addresses_are_invalid(kind, address, words):
    from ember.agent import storage

    with pytest.raises(TTRPCError) as e:
        storage.resolve(kind, address, timeout=0.1)
    assert e.value.code == Code.INVALID_ARGUMENT and words in e.value.message


def test_missing_disk_is_not_found_after_the_timeout():
    from ember.agent import storage

    start = time.monotonic()
    with pytest.raises(TTRPCError) as e:
        storage.resolve("serial", "no-such-serial", timeout=0.3)
    assert e.value.code == Code.NOT_FOUND and "no-such-serial" in e.value.message
    assert 0.3 <= time.monotonic() - start < 3


def test_warm_reads_crun_and_every_library_it_loads():
    """What the agent caches before its first answer (so VM templates hold it):
    crun and each library the dynamic loader lists for it, whole; a missing
    binary reads nothing and does not fail."""
    script = textwrap.dedent("""
        import os
        from ember.agent import crun
        from ember.agent.reaper import Reaper
        r = Reaper(); r.start()
        size = crun.warm(r, "crun")
        rc, listing = r.run_command([crun.LOADER, "--list", "/usr/bin/crun"])
        libs = [t for line in listing.decode().splitlines() for t in line.split()
                if t.startswith("/")]
        assert len(libs) >= 3, listing
        want = sum(os.path.getsize(p) for p in {"/usr/bin/crun", *libs})
        assert size == want, (size, want)
        assert crun.warm(r, "/nonexistent/crun") == 0
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "ok", out.stderr
