"""ember.agent.archive without a VM: the tar packing and the checked extraction
that `ember cp` runs in the guest (chrooted) and on the host (on what a guest sent)."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from ember.agent import archive


def _tree(root: Path) -> Path:
    src = root / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_bytes(b"hello")
    os.chmod(src / "sub" / "f.txt", 0o640)
    os.chown(src / "sub" / "f.txt", 1234, 5678)
    os.chmod(src / "sub", 0o750)
    (src / "exe").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "exe", 0o4755)
    os.symlink("sub/f.txt", src / "link")
    os.link(src / "sub" / "f.txt", src / "hard")
    os.mkfifo(src / "fifo")
    return src


def _roundtrip(src: str, dest: str, rename: str | None = None, host: bool = False) -> list:
    buf = io.BytesIO()
    archive.pack(buf, src, archive.top_name(src))
    buf.seek(0)
    return archive.extract(buf, dest, rename, host=host)


@pytest.mark.root
def test_roundtrip_keeps_modes_owners_links(tmp_path):
    src = _tree(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    _roundtrip(str(src), str(out))
    got = out / "src"
    st = os.lstat(got / "sub" / "f.txt")
    assert (got / "sub" / "f.txt").read_bytes() == b"hello"
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 5678)
    assert stat.S_IMODE(os.lstat(got / "sub").st_mode) == 0o750
    assert stat.S_IMODE(os.lstat(got / "exe").st_mode) == 0o4755  # guest side keeps setuid
    assert os.readlink(got / "link") == "sub/f.txt"
    assert os.lstat(got / "hard").st_ino == st.st_ino
    assert stat.S_ISFIFO(os.lstat(got / "fifo").st_mode)

    # As dest (rename), the contents of a folder (SRC/.), and on the host: no setuid.
    _roundtrip(str(src), str(out), rename="renamed", host=True)
    assert (out / "renamed" / "sub" / "f.txt").read_bytes() == b"hello"
    assert stat.S_IMODE(os.lstat(out / "renamed" / "exe").st_mode) == 0o755
    flat = tmp_path / "flat"
    flat.mkdir()
    _roundtrip(str(src) + "/.", str(flat))
    assert (flat / "sub" / "f.txt").read_bytes() == b"hello"


def _hostile(*members: tuple[str, str, str]) -> io.BytesIO:
    """A tar of (name, kind, target-or-data) members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, kind, extra in members:
            ti = tarfile.TarInfo(name)
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
            elif kind == "sym":
                ti.type, ti.linkname = tarfile.SYMTYPE, extra
                tar.addfile(ti)
            elif kind == "hard":
                ti.type, ti.linkname = tarfile.LNKTYPE, extra
                tar.addfile(ti)
            elif kind == "chr":
                ti.type, ti.devmajor, ti.devminor = tarfile.CHRTYPE, 1, 3
                tar.addfile(ti)
            else:
                ti.size = len(extra)
                tar.addfile(ti, io.BytesIO(extra.encode()))
    buf.seek(0)
    return buf


@pytest.mark.parametrize("members", [
    [("../escape", "file", "x")],
    [("top/../../escape", "file", "x")],
    [("/etc/escape", "file", "x")],
    [("top", "dir", ""), ("top/link", "sym", "/"), ("top/link/escape", "file", "x")],
    [("top", "dir", ""), ("top/link", "sym", "../.."), ("top/link/escape", "file", "x")],
    [("top", "dir", ""), ("top/h", "hard", "../outside")],
])
def test_hostile_archives_write_nothing_outside(tmp_path, members):
    dest = tmp_path / "dest"
    dest.mkdir()
    (tmp_path / "outside").write_text("keep")
    with pytest.raises(archive.ArchiveError):
        archive.extract(_hostile(*members), str(dest), host=True)
    assert not (tmp_path / "escape").exists()
    assert not Path("/escape").exists() and not Path("/etc/escape").exists()
    assert (tmp_path / "outside").read_text() == "keep"


@pytest.mark.root
def test_host_skips_device_nodes(tmp_path):
    skipped = archive.extract(_hostile(("top", "dir", ""), ("top/null", "chr", "")),
                              str(tmp_path), host=True)
    assert skipped == ["top/null"] and not (tmp_path / "top" / "null").exists()


def test_requests_are_checked():
    assert archive.check_request("get", "/a/../b/") == "/b"
    assert archive.check_request("get", "/srv/.") == "/srv/."
    for op, path in [("put", "relative"), ("put", "/proc/sys/x"), ("put-as", "/sys/x"),
                     ("put", "/dev/sda"), ("frob", "/x")]:
        with pytest.raises(archive.ArchiveError):
            archive.check_request(op, path)
