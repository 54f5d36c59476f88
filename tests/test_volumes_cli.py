"""Named volumes, host folders and tmpfs for `ember run` (issue 15, points 1 and 2).

The volume commands run without a VM against a data directory of their own;
the rest boots real sandboxes: data written in one sandbox is read in the
next, a volume is read-write to one running sandbox at a time (read-only to
many), a crashed holder frees it, and every refusal is one line, exit 125,
with nothing left behind.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time
import uuid
from pathlib import Path

import pytest
from clitools import one_line_error
from conftest import ember_bin

pytestmark = [pytest.mark.root]


def _vol() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def volumes_env(tmp_path):
    """The volume commands on a data directory of their own (no VM needed)."""
    import subprocess

    env = dict(os.environ, EMBER_DATA_DIR=str(tmp_path / "data"),
               EMBER_STATE_DIR=str(tmp_path / "state"))

    def run(*args: str):
        return subprocess.run([ember_bin(), *args], capture_output=True, env=env, timeout=60)

    run.data = tmp_path / "data"  # type: ignore[attr-defined]
    return run


def test_volume_commands(volumes_env):
    run = volumes_env
    assert run("volume", "create", "--size", "64m", "data").stdout == b"data\n"
    assert run("volume", "create", "data").returncode == 0  # exists: left as it is
    root = run.data / "volumes"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    image = root / "data" / "volume.img"
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    assert image.stat().st_size == 64 << 20 and image.stat().st_blocks * 512 < 16 << 20  # sparse
    info = json.loads(run("volume", "inspect", "data").stdout)[0]
    assert (info["name"], info["size"], info["in_use_by"]) == ("data", 64 << 20, [])
    assert run("volume", "ls", "-q").stdout == b"data\n"
    assert b"data" in run("volume", "ls").stdout

    one_line_error(run("volume", "create", "bad/name"), "invalid volume name")
    one_line_error(run("volume", "create", "--size", "1m", "tiny"), "too small")
    one_line_error(run("volume", "create", "--size", "lots", "big"), "invalid size")
    one_line_error(run("volume", "inspect", "nope"), "no such volume")
    one_line_error(run("volume", "rm", "nope"), "no such volume")
    assert sorted(p.name for p in root.iterdir()) == ["data"]  # nothing half-made

    # A create killed half-way leaves a .new- folder: the next listing sweeps it
    # once it is old enough not to be someone's create in progress.
    stale = root / ".new-dead-x"
    stale.mkdir()
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    run("volume", "ls")
    assert not stale.exists()

    assert run("volume", "create", "spare").returncode == 0
    pruned = run("volume", "prune", "-f")
    assert pruned.returncode == 0 and b"Deleted: data" in pruned.stdout
    assert run("volume", "ls", "-q").stdout == b""
    assert sorted(p.name for p in root.iterdir()) == []


def test_parse_errors_make_nothing(volumes_env, tmp_path):
    """Bad -v/--mount/--tmpfs are refused before the image is even looked up."""
    run = volumes_env
    host = tmp_path / "hostdir"
    host.mkdir()
    cases = [
        (["-v", f"{host}:/data"], "named volume"),  # read-write host folder: refused
        (["-v", "vol:relative"], "absolute"),
        (["-v", "vol:/data:rw,frob"], "unknown option"),
        (["-v", "vol"], "NAME:/path"),
        (["-v", "vol:/proc/x"], "kernel"),
        (["-v", "/no/such/dir:/data:ro"], "does not exist"),
        (["--mount", "type=nfs,src=a,dst=/a"], "type must be"),
        (["--mount", "type=volume,src=a"], "target"),
        (["--mount", f"type=bind,src={host},dst=/a"], "named volume"),
        (["--tmpfs", "/t:size=huge"], "invalid size"),
        (["--tmpfs", "/t:frob"], "unknown tmpfs option"),
        (["-v", "a:/x", "--tmpfs", "/x"], "two mounts"),
    ]
    for flags, words in cases:
        one_line_error(run("run", "--rm", *flags, "no-such-image", "true"), words)
    assert not (run.data / "volumes").exists()  # no volume made on a refused run



@pytest.mark.vm
@pytest.mark.timeout(900)
def test_volume_persists_and_is_exclusive(ember_env, image):
    name = _vol()
    try:
        # Made on first use; written by one sandbox (--rm: the guest still flushes it) ...
        w = ember_env.run("run", "--rm", "-v", f"{name}:/data", image,
                          "sh", "-c", "echo persisted > /data/f && mkdir /data/d")
        assert w.returncode == 0, w.stderr
        # ... read by the next.
        r = ember_env.run("run", "--rm", "-v", f"{name}:/data:ro", image, "cat", "/data/f")
        assert (r.returncode, r.stdout) == (0, b"persisted\n"), r.stderr

        # One read-write user at a time.
        assert ember_env.run("run", "-d", "--name", "holder", "-v", f"{name}:/data", image,
                             "sleep", "600").returncode == 0
        second = ember_env.run("run", "--rm", "--name", "second", "-v", f"{name}:/data", image,
                               "true")
        one_line_error(second, "in use read-write by sandbox holder")
        one_line_error(ember_env.run("run", "--rm", "--mount",
                                      f"type=volume,src={name},dst=/v,readonly", image, "true"),
                        "in use read-write")
        ps = ember_env.run("ps", "-a", "--json")
        assert [s["name"] for s in json.loads(ps.stdout)] == ["holder"]  # nothing left
        one_line_error(ember_env.run("volume", "rm", name), "in use by sandbox holder")
        inspect = json.loads(ember_env.run("volume", "inspect", name).stdout)[0]
        assert [u["sandbox"] for u in inspect["in_use_by"]] == ["holder"]

        # A crash frees it: no stale lock. Kill the holder's monitor and VMM.
        st = json.loads(ember_env.run("inspect", "holder").stdout)[0]
        for pid in (st["monitor_pid"], st["vmm_pid"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = json.loads(ember_env.run("ps", "-a", "--json").stdout)
            if out and out[0]["status"] == "dead":
                break
            time.sleep(0.5)
        after = ember_env.run("run", "--rm", "-v", f"{name}:/data", image, "cat", "/data/f")
        assert (after.returncode, after.stdout) == (0, b"persisted\n"), after.stderr
        assert ember_env.run("rm", "-f", "holder").returncode == 0

        # Read-only to many at once; then no writer beside them.
        for n in ("ro1", "ro2"):
            res = ember_env.run("run", "-d", "--name", n, "-v", f"{name}:/data:ro", image,
                                "sleep", "600")
            assert res.returncode == 0, res.stderr
        both = [ember_env.run("exec", n, "cat", "/data/f").stdout for n in ("ro1", "ro2")]
        assert both == [b"persisted\n"] * 2
        denied = ember_env.run("exec", "ro1", "sh", "-c", "echo x > /data/g")
        assert denied.returncode != 0 and b"Read-only" in denied.stderr
        one_line_error(ember_env.run("run", "--rm", "-v", f"{name}:/data", image, "true"),
                        "mounted read-only by sandbox")
        assert ember_env.run("rm", "-f", "ro1", "ro2").returncode == 0
        assert ember_env.run("volume", "rm", name).stdout == f"{name}\n".encode()
        assert not (Path("/var/lib/ember/volumes") / name).exists()
    finally:
        ember_env.run("rm", "-f", "holder", "ro1", "ro2")
        ember_env.run("volume", "rm", name)


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_host_folders_and_tmpfs(ember_env, image, tmp_path):
    ro = tmp_path / "ro"
    (ro / "sub").mkdir(parents=True)
    (ro / "sub" / "a.txt").write_text("from-host\n")
    (ro / "big.bin").write_bytes(os.urandom(24 << 20))  # any size: a packed image
    cp = tmp_path / "cp"
    cp.mkdir()
    (cp / "c.txt").write_text("copied\n")
    single = tmp_path / "one.conf"
    single.write_text("k=v\n")
    res = ember_env.run(
        "run", "--rm", "-v", f"{ro}:/ro:ro", "-v", f"{cp}:/work:copy",
        "-v", f"{single}:/etc/one.conf:copy",
        "--mount", f"type=bind,src={ro}/sub,dst=/ro2,readonly",
        "--tmpfs", "/scratch:size=8m", "--mount", "type=tmpfs,dst=/t2,tmpfs-size=4m", image,
        "sh", "-c",
        "cat /ro/sub/a.txt /ro2/a.txt /work/c.txt /etc/one.conf; md5sum /ro/big.bin; "
        "echo x > /ro/new 2>/dev/null || echo ro-refused; "
        "echo w > /work/c.txt && cat /work/c.txt; "
        "grep -E ' /(scratch|t2) ' /proc/mounts")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    assert lines[:4] == ["from-host", "from-host", "copied", "k=v"]
    import hashlib

    assert lines[4].split()[0] == hashlib.md5((ro / "big.bin").read_bytes()).hexdigest()
    assert lines[5:7] == ["ro-refused", "w"]
    mounts = " ".join(lines[7:])
    assert "/scratch tmpfs" in mounts and "size=8192k" in mounts and "noexec" in mounts
    assert "/t2 tmpfs" in mounts and "size=4096k" in mounts
    assert (cp / "c.txt").read_text() == "copied\n"  # the copy's writes stay in the sandbox
    assert ember_env.run("ps", "-a", "-q").stdout == b""


def test_volume_api_without_vm(tmp_path, monkeypatch):
    import ember

    monkeypatch.setenv("EMBER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("EMBER_STATE_DIR", str(tmp_path / "state"))
    vol = ember.Volume.create("apivol", size="32m")
    assert (vol.name, vol.size) == ("apivol", 32 << 20) and vol.path.is_file()
    assert ember.Volume.create("apivol").path == vol.path  # exists: the same one
    assert [v.name for v in ember.Volume.list()] == ["apivol"]
    assert ember.Volume.get("apivol").inspect()["in_use_by"] == []
    with pytest.raises(ember.EmberError, match="invalid volume name"):
        ember.Volume.create("../x")
    vol.remove()
    with pytest.raises(ember.EmberError, match="no such volume"):
        ember.Volume.get("apivol")
    ember.Volume.create("a")
    assert ember.Volume.prune() == ["a"]


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_volume_api_with_sandboxes(ember_env, image, monkeypatch):
    import ember

    monkeypatch.setenv("EMBER_STATE_DIR", str(ember_env.state_dir))
    name = _vol()
    vol = ember.Volume.create(name, size="64m")
    try:
        sb = ember.Sandbox.create(image, ["sleep", "600"], volumes=[f"{name}:/data"],
                                  tmpfs=["/scratch"])
        sb.files.write("/data/note", "kept\n")
        assert vol.in_use_by() == [(sb.name, False)]
        with pytest.raises(ember.EmberError, match="in use read-write"):
            ember.Sandbox.create(image, ["true"], volumes=[f"{name}:/data:ro"])
        sb.remove(force=True)
        nxt = ember.Sandbox.create(image, ["sleep", "600"], mounts=[
            f"type=volume,src={name},dst=/v,readonly"])
        assert nxt.files.read("/v/note") == b"kept\n"
        with pytest.raises(ember.EmberError, match="in use by sandbox"):
            vol.remove()
        nxt.remove(force=True)
        vol.remove()
    finally:
        for sb in ember.Sandbox.list(all=True):
            sb.remove(force=True)
        try:
            ember.Volume.get(name).remove()
        except ember.EmberError:
            pass


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_restarted_container_keeps_its_volumes(ember_env, image):
    """--restart creates the container again in the same VM: on the same volume."""
    name = _vol()
    try:
        res = ember_env.run("run", "-d", "--name", "again", "--restart", "on-failure:1",
                            "-v", f"{name}:/data", "--tmpfs", "/t", image,
                            "sh", "-c", "echo run >> /data/runs; exit 3")
        assert res.returncode == 0, res.stderr
        waited = ember_env.run("wait", "again", timeout=300)
        assert waited.stdout.strip() == b"3", waited.stderr
        st = json.loads(ember_env.run("inspect", "again").stdout)[0]
        assert st["restart_count"] == 1
        assert ember_env.run("rm", "-f", "again").returncode == 0
        out = ember_env.run("run", "--rm", "-v", f"{name}:/data:ro", image, "cat", "/data/runs")
        assert out.stdout == b"run\nrun\n", out.stderr
    finally:
        ember_env.run("rm", "-f", "again")
        ember_env.run("volume", "rm", name)
