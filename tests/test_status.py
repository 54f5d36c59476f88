"""Sandbox statuses are one enum, ember.sandbox.status.Status (issue 12, point 1).

* Records written before the enum (plain JSON strings) load as its members,
  and what is written back, ``ember ps --json`` and ``ember inspect`` show
  are the same bytes as before: the plain words.
* A record naming a status nobody knows is not taken for a live or a dead
  sandbox: it reads as unreadable (``unknown``, the word in the reason), is
  still listed under its name, and ``ember rm -f`` removes it; no code can
  write such a word into a record.
* No bare status word is left in the modules that decide on statuses.

Real CLI, no VM: the records are made on disk as a crashed or older ember
would have left them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import ember_bin

from ember.config import load_config
from ember.sandbox.state import SandboxState, StateStore
from ember.sandbox.status import LIVE, Status

SRC = Path(__file__).resolve().parent.parent / "src" / "ember"


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def _ember(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EMBER_STATE_DIR=str(state_dir))
    return subprocess.run([ember_bin(), *args], capture_output=True, env=env, timeout=60)


def _old_record(store: StateStore, name: str, status: str) -> str:
    """A record as written before the enum: every field, the status a plain string."""
    sid = os.urandom(32).hex()
    with store.lock():
        store.create(SandboxState(id=sid, name=name))
    path = store.dir(sid) / "state.json"
    data = json.loads(path.read_text())
    data.update(status=status, exit_code=0 if status == "exited" else None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return sid


def test_the_words_stay_what_they_were():
    assert [s.value for s in Status] == ["creating", "running", "paused", "exited", "dead",
                                          "unknown"]
    assert LIVE == ("running", "paused", "creating")
    assert f"{Status.RUNNING}" == str(Status.RUNNING) == "running"
    assert json.dumps({"status": Status.DEAD}) == '{"status": "dead"}'


def test_old_records_load_and_are_written_back_the_same(state_dir):
    store = StateStore(load_config())
    sid = _old_record(store, "old", "exited")
    before = (store.dir(sid) / "state.json").read_bytes()
    st = store.load(sid)
    assert st.status is Status.EXITED
    store.update(sid, error="")  # a rewrite of the record
    after = json.loads((store.dir(sid) / "state.json").read_bytes())
    assert after == json.loads(before) and after["status"] == "exited"
    assert json.dumps(asdict(store.load(sid)), sort_keys=True) == \
        json.dumps(json.loads(before), sort_keys=True)
    store.update(sid, status="paused")  # a plain word is still accepted from code...
    assert store.load(sid).status is Status.PAUSED
    with pytest.raises(ValueError, match="unknown status 'frozen'"):
        store.update(sid, status="frozen")  # ...but never a word that is no status
    assert store.load(sid).status is Status.PAUSED  # and the record is left as it was


def test_cli_shows_the_plain_words(state_dir):
    store = StateStore(load_config())
    sid = _old_record(store, "done", "exited")
    ps = _ember(state_dir, "ps", "-a", "--json")
    assert ps.returncode == 0, ps.stderr
    assert b'"status": "exited"' in ps.stdout
    assert [(p["id"], p["status"]) for p in json.loads(ps.stdout)] == [(sid, "exited")]
    inspect = _ember(state_dir, "inspect", "done")
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)[0]["status"] == "exited"
    assert b'"status": "exited"' in inspect.stdout
    assert "exited (0)" in _ember(state_dir, "ps", "-a").stdout.decode()


def test_a_status_nobody_knows_is_an_unreadable_record(state_dir):
    store = StateStore(load_config())
    sid = _old_record(store, "odd", "frozen")
    [st] = store.all()
    assert (st.id, st.name, st.status) == (sid, "odd", Status.UNKNOWN)
    assert st.error == ("record unreadable: state.json is not a valid record "
                        "(unknown status 'frozen')")
    table = _ember(state_dir, "ps", "-a").stdout.decode()
    assert "unknown (record unreadable: state.json is not a valid record " \
           "(unknown status 'frozen'))" in table, table
    refused = _ember(state_dir, "rm", "odd")
    assert refused.returncode == 125
    assert len(refused.stderr.decode().strip().splitlines()) == 1
    assert "unknown status 'frozen'" in refused.stderr.decode()
    assert store.dir(sid).exists()
    removed = _ember(state_dir, "rm", "-f", "odd")
    assert removed.returncode == 0, removed.stderr
    assert not store.dir(sid).exists() and store.all() == []


WORD = re.compile(r"""["'](creating|running|paused|exited|dead|unknown)["']""")
DECIDERS = ["api.py", "sandbox/state.py", "sandbox/monitor.py", "sandbox/volumes.py",
            "sandbox/events.py", "cli/sandboxes.py", "cli/cp.py", "cli/stats.py", "cli/info.py",
            "metrics/collector.py", "metrics/stats.py", "metrics/targets.py", "metrics/events.py"]


@pytest.mark.parametrize("module", DECIDERS)
def test_no_bare_status_words(module):
    code = [line for line in (SRC / module).read_text().splitlines()
            if not line.lstrip().startswith("#")]
    found = [line.strip() for line in code if WORD.search(line.split("#")[0])]
    # Words in docstrings and messages are prose, not decisions: allow those lines.
    found = [f for f in found if not re.search(r"(\"\"\"|f\"|EmberError\(|^\")", f)]
    assert found == []
