"""`ember cp` and `Sandbox.files` (issue 15, points 3 and 6) on a real VM.

Files go as tar streams through the guest agent to a helper chrooted into
the container's root: modes, numeric owners, symlinks and hard links are
kept, large files stream (the agent keeps at most 8 MiB and a message carries
at most 4 MiB), and neither `..` nor a symlink the container planted leads
out of the container's root.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from clitools import one_line_error

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.timeout(900)]


def _host_tree(root: Path) -> Path:
    src = root / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hello\n")
    os.chmod(src / "sub" / "f.txt", 0o640)
    os.chown(src / "sub" / "f.txt", 1234, 5678)
    os.chmod(src / "sub", 0o710)
    os.symlink("sub/f.txt", src / "link")
    os.link(src / "sub" / "f.txt", src / "hard")
    (src / "big.bin").write_bytes(os.urandom(20 << 20))  # > the agent's 8 MiB, > a message
    return src


def test_cp_in_and_out_keeps_files_modes_owners_links(ember_env, image, tmp_path):
    src = _host_tree(tmp_path)
    assert ember_env.run("run", "-d", "--name", "box", image, "sleep", "600").returncode == 0

    into = ember_env.run("cp", str(src), "box:/srv/")  # an existing folder: into it
    assert into.returncode == 0, into.stderr
    out = ember_env.run("exec", "box", "sh", "-c",
                        "cd /srv/tree && stat -c '%a %u %g' sub/f.txt sub && cat sub/f.txt && "
                        "readlink link && stat -c %h hard && md5sum big.bin")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.decode().splitlines()
    assert lines[:5] == ["640 1234 5678", "710 0 0", "hello", "sub/f.txt", "2"]
    assert lines[5].split()[0] == subprocess.run(["md5sum", str(src / "big.bin")],
                                                 capture_output=True, text=True).stdout.split()[0]

    # As a new name, and a folder's contents (SRC/.) into a new folder.
    assert ember_env.run("cp", str(src / "sub" / "f.txt"), "box:/tmp/renamed").returncode == 0
    assert ember_env.run("cp", f"{src}/.", "box:/contents").returncode == 0
    out = ember_env.run("exec", "box", "sh", "-c", "cat /tmp/renamed /contents/sub/f.txt")
    assert out.stdout == b"hello\nhello\n"

    back = tmp_path / "back"
    got = ember_env.run("cp", "box:/srv/tree", str(back))  # a new name on the host
    assert got.returncode == 0, got.stderr
    st = os.lstat(back / "sub" / "f.txt")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    assert (back / "sub" / "f.txt").read_text() == "hello\n"
    assert os.readlink(back / "link") == "sub/f.txt"
    assert os.lstat(back / "hard").st_ino == st.st_ino
    assert (back / "big.bin").read_bytes() == (src / "big.bin").read_bytes()

    # Tar streams on stdin and stdout, as docker cp - does.
    tar = ember_env.run("cp", "box:/srv/tree/sub", "-")
    assert tar.returncode == 0, tar.stderr
    names = tarfile.open(fileobj=io.BytesIO(tar.stdout)).getnames()
    assert sorted(names) == ["sub", "sub/f.txt"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        ti = tarfile.TarInfo("from-stdin.txt")
        ti.size = 3
        t.addfile(ti, io.BytesIO(b"abc"))
    put = ember_env.run("cp", "-", "box:/tmp", input=buf.getvalue())
    assert put.returncode == 0, put.stderr
    assert ember_env.run("exec", "box", "cat", "/tmp/from-stdin.txt").stdout == b"abc"


def test_cp_stays_inside_the_container_root(ember_env, image, tmp_path):
    assert ember_env.run("run", "-d", "--name", "jail", image, "sleep", "600").returncode == 0
    # Symlinks the container planted, pointing at / and above it.
    plant = ember_env.run("exec", "jail", "sh", "-c",
                          "mkdir -p /srv && ln -s / /srv/root && ln -s ../../../../.. /srv/up")
    assert plant.returncode == 0, plant.stderr
    f = tmp_path / "marker.txt"
    f.write_text("m\n")
    for dest in ("jail:/srv/root/marker-a", "jail:/srv/up/marker-b", "jail:../../../marker-c"):
        res = ember_env.run("cp", str(f), dest)
        assert res.returncode == 0, (dest, res.stderr)
    # Every copy landed at the container's own root, nowhere else.
    out = ember_env.run("exec", "jail", "sh", "-c", "cat /marker-a /marker-b /marker-c")
    assert out.stdout == b"m\nm\nm\n", out.stderr
    # The guest's own files are out of reach: its rootfs holds crun, the
    # container's (busybox) does not.
    res = ember_env.run("cp", "jail:/srv/up/usr/bin/crun", str(tmp_path))
    one_line_error(res, "no such file or directory")
    res = ember_env.run("cp", str(f), "jail:/proc/sys/kernel/marker")  # the kernel's, refused
    one_line_error(res, "/proc")
    # A symlink out of the container is copied as a symlink, never followed on the host.
    assert ember_env.run("cp", "jail:/srv/root", str(tmp_path / "r")).returncode == 0
    assert os.readlink(tmp_path / "r") == "/"


def test_cp_failures_are_one_line(ember_env, image, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    assert ember_env.run("run", "-d", "--name", "live", image, "sleep", "600").returncode == 0
    one_line_error(ember_env.run("cp", "live:/no/such", str(tmp_path / "o")),
                    "no such file or directory")
    one_line_error(ember_env.run("cp", str(tmp_path / "missing"), "live:/tmp"),
                    "no such file or directory on the host")
    one_line_error(ember_env.run("cp", str(f), "live:/no/such/folder/f"), "no such folder")
    one_line_error(ember_env.run("cp", "live:/etc/hostname", str(tmp_path / "x" / "y")),
                    "no such folder on the host")
    one_line_error(ember_env.run("cp", str(f), str(tmp_path / "g")), "exactly one")
    one_line_error(ember_env.run("cp", str(f), "nobody:/tmp"), "nobody")
    assert not (tmp_path / "o").exists()
    # A stopped sandbox is refused, saying why.
    assert ember_env.run("run", "--name", "done", image, "true").returncode == 0
    one_line_error(ember_env.run("cp", "done:/etc/hostname", str(tmp_path)),
                    "not running", "exited")
    # The sandbox still works after all that (no helper left behind).
    assert ember_env.run("exec", "live", "true").returncode == 0


def test_files_api(ember_env, image, monkeypatch):
    import ember

    monkeypatch.setenv("EMBER_STATE_DIR", str(ember_env.state_dir))
    sb = ember.Sandbox.create(image, ["sleep", "600"])
    try:
        sb.files.write("/work/deep/hello.py", "print('hi')\n", mode=0o755, uid=1000, gid=100)
        assert sb.files.read("/work/deep/hello.py") == b"print('hi')\n"
        listing = {e["name"]: e for e in sb.files.list("/work/deep")}
        assert listing["hello.py"]["type"] == "file"
        assert (listing["hello.py"]["mode"], listing["hello.py"]["uid"]) == (0o755, 1000)
        assert sb.exec(["sh", "-c", "stat -c '%a %u %g' /work/deep/hello.py"]).stdout \
            == b"755 1000 100\n"
        big = os.urandom(9 << 20)
        sb.files.write("/tmp/big", big)
        assert sb.files.read("/tmp/big") == big
        with pytest.raises(ember.EmberError, match="no such file"):
            sb.files.read("/nope")
        with pytest.raises(ember.EmberError, match="not a regular file"):
            sb.files.read("/work")
    finally:
        sb.remove(force=True)
