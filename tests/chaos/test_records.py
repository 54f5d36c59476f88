"""Corrupted, missing and half-written records (issue 13, point 6).

tests/test_state_truth.py covers an empty, garbage or missing ``state.json``
of a running sandbox; these cover what it does not:

* a record that names another sandbox (copied over): the other sandbox is
  untouched when this one is removed; then a running sandbox whose folder
  lost both ``state.json`` and its ``name`` file is removed by id;
* a record whose pids now belong to strangers (pid reuse): `rm -f` kills none;
* ``state.json`` that is a FIFO, a folder or a link to a file elsewhere;
* folders that a killed create (``.new-ID``) or a killed removal (``.rm-ID``)
  left half-done are finished, never listed.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from ember_testing.leftovers import leftovers

from ember.sandbox.state import SandboxState, StateStore

from .conftest import monitor_pids, vmm_pids

pytestmark = [pytest.mark.chaos, pytest.mark.root]


def _store(chaos) -> StateStore:
    return StateStore(chaos.cfg())


def _fake(chaos, name: str, **fields) -> SandboxState:
    """A record with no VM behind it."""
    store = _store(chaos)
    st = SandboxState(id=os.urandom(32).hex(), name=name, **fields)
    with store.lock():
        store.create(st)
    chaos.seen.add(st.id)
    return st


@pytest.mark.vm
@pytest.mark.timeout(600)
def test_record_naming_another_sandbox(chaos, image):
    with ThreadPoolExecutor(2) as pool:
        alpha, beta = pool.map(lambda n: chaos.run_detached(n, image), ["alpha", "beta"])
    (chaos.sandboxes / beta["id"] / "state.json").write_bytes(
        (chaos.sandboxes / alpha["id"] / "state.json").read_bytes())
    listed = {p["id"]: p for p in chaos.assert_truthful()}
    assert listed[alpha["id"]]["status"] == "running"
    assert listed[beta["id"]]["status"] == "unknown" and listed[beta["id"]]["name"] == "beta"
    assert "names sandbox" in listed[beta["id"]]["error"]
    alpha_vm = vmm_pids(alpha["id"])
    chaos.force_remove("beta", beta["id"])
    chaos.assert_clean(beta["id"])
    # alpha's record was the one copied: alpha itself is untouched and still works.
    assert vmm_pids(alpha["id"]) == alpha_vm and monitor_pids(alpha["id"])
    proc = chaos.run("exec", "alpha", "echo", "intact")
    assert (proc.returncode, proc.stdout) == (0, b"intact\n"), proc.stderr
    # Now alpha loses its record and its name file: listed by id, removed by id.
    for f in ("state.json", "name"):
        (chaos.sandboxes / alpha["id"] / f).unlink()
    [entry] = chaos.assert_truthful()
    assert (entry["id"], entry["name"], entry["status"]) == (alpha["id"], "", "unknown")
    chaos.finish(alpha["id"][:12], alpha["id"])


def test_stale_pids_never_kill_strangers(chaos):
    plain = subprocess.Popen(["sleep", "600"])
    st = _fake(chaos, "stale", status="running")
    # A stranger that merely mentions the short id (a user's `tail` or `ember logs -f`).
    mention = subprocess.Popen(["sh", "-c", f"sleep 600; : {st.short_id}"])
    try:
        _store(chaos).update(st.id, monitor_pid=plain.pid,
                             monitor_started=psutil.Process(plain.pid).create_time(),
                             vmm_pid=mention.pid)
        [entry] = chaos.assert_truthful()
        assert entry["status"] == "dead", entry
        chaos.finish("stale", st.id)
        assert plain.poll() is None and mention.poll() is None, "a stranger was killed"
    finally:
        for p in (plain, mention):
            p.kill()
            p.wait()


@pytest.mark.parametrize("kind", ["fifo", "folder", "link"])
def test_record_that_is_not_a_file(chaos, tmp_path, kind):
    st = _fake(chaos, "odd", status="running")
    record = chaos.sandboxes / st.id / "state.json"
    record.unlink()
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    if kind == "fifo":
        os.mkfifo(record)
    elif kind == "folder":
        record.mkdir()
        (record / "inner").write_text("x")
    else:
        record.symlink_to(outside)
    [entry] = chaos.assert_truthful()
    assert (entry["name"], entry["status"]) == ("odd", "unknown"), entry
    chaos.finish("odd", st.id)
    assert outside.read_text() == "keep me"


def test_half_done_folders_are_finished(chaos):
    store = _store(chaos)
    _fake(chaos, "keeper")  # a whole sandbox, listed throughout
    half_made, half_removed = os.urandom(32).hex(), os.urandom(32).hex()
    chaos.seen.update((half_made, half_removed))
    for name in (f".new-{half_made}", f".rm-{half_removed}"):
        folder = store.root / name
        folder.mkdir()
        (folder / "name").write_text("ghost\n")
        (folder / "state.json").write_text("{}")
    assert [p["name"] for p in chaos.assert_truthful()] == ["keeper"]
    assert leftovers(half_made, chaos.cfg()) == []
    assert leftovers(half_removed, chaos.cfg()) == []
    # The name of a half-made sandbox is not taken.
    assert not store.name_taken("ghost")
