"""Tar streams into and out of a container's root: ``ember cp``, ``Sandbox.files``
and ``-v SRC:DEST:copy``.

The agent forks one helper per request (``Archive`` in agent.proto). The
helper ``chroot``\\s into ``/proc/<init pid>/root``: the container's root as its
own mount namespace sees it, volumes and tmpfs mounts included. Every path,
every ``..`` and every symlink, absolute ones too, is then resolved inside the
container's root by the kernel, so a hostile container cannot make the helper
read or write anything of the guest's. The helper never asks NSS for user or
group names (that could load the container's own libraries into a root
process): ownership travels as numbers.

Extraction is the same code in the guest and on the host (``ember cp
NAME:SRC DEST`` unpacks a tar the guest made, which the host does not trust):
names must be relative without ``..``, an entry never goes through a symlink
(a link the archive made first included), a hard link only points at a file
the archive already wrote, and on the host device nodes are skipped and
setuid/setgid bits dropped.

Every member's name is ``TOP`` or ``TOP/...``: ``TOP`` is the basename of what
was packed, or ``.`` for a folder's contents (``SRC/.``, as with ``docker cp``).
"""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tarfile

OPS = ("put", "put-into", "put-as", "get", "list")
WRITE_OPS = ("put", "put-into", "put-as")
NO_WRITE = ("/proc", "/sys", "/dev")  # the guest kernel's, not the container's files
CHUNK = 1 << 20


class ArchiveError(Exception):
    """A request that cannot be carried out; the message is for the user."""


def check_request(op: str, path: str) -> str:
    """The normalised absolute path of a request; ArchiveError if it is not one."""
    if op not in OPS:
        raise ArchiveError(f"unknown archive operation {op!r}")
    if not path.startswith("/") or "\0" in path:
        raise ArchiveError(f"path {path!r} must be absolute in the container")
    norm = posixpath.normpath(path)
    norm = "/" + norm.lstrip("/")  # normpath keeps a leading "//"
    if op in WRITE_OPS and any(norm == p or norm.startswith(p + "/") for p in NO_WRITE):
        raise ArchiveError(f"cannot copy into {norm}: it belongs to the kernel, not the "
                           "container's filesystem")
    if path.endswith("/.") and norm != "/":
        norm += "/."  # "the folder's contents", kept for get
    return norm


def top_name(path: str) -> str:
    """The archive's top name for path: its basename, or "." for ``DIR/.`` and ``/``."""
    if path.endswith("/.") or path.rstrip("/") == "":
        return "."
    return posixpath.basename(path.rstrip("/"))


# ------------------------------------------------------------------ packing
def pack(out, path: str, top: str, skip: tuple[str, ...] = ()) -> None:
    """Write a tar of path (not following symlinks) to the binary file ``out``.

    ``skip``: absolute paths not descended into (the guest's /proc and /sys).
    """
    src = path[:-2] or "/" if path.endswith("/.") else path
    os.lstat(src)  # FileNotFoundError before anything is written
    seen: dict[tuple[int, int], str] = {}
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        stack = [(src, top)]
        while stack:
            p, arc = stack.pop()
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue  # gone since its folder was listed
            ti = tarfile.TarInfo(arc)
            ti.mode, ti.uid, ti.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
            ti.mtime, ti.uname, ti.gname = int(st.st_mtime), "", ""
            if stat.S_ISDIR(st.st_mode):
                ti.type = tarfile.DIRTYPE
                tar.addfile(ti)
                if p in skip and p != src:
                    continue
                try:
                    names = sorted(os.listdir(p), reverse=True)
                except OSError:
                    continue
                stack += [(posixpath.join(p, n), f"{arc}/{n}") for n in names]
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in seen:
                    ti.type, ti.linkname = tarfile.LNKTYPE, seen[key]
                    tar.addfile(ti)
                    continue
                seen[key] = arc
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with os.fdopen(fd, "rb") as f:
                    ti.size = os.fstat(fd).st_size
                    tar.addfile(ti, f)
            elif stat.S_ISLNK(st.st_mode):
                ti.type, ti.linkname = tarfile.SYMTYPE, os.readlink(p)
                tar.addfile(ti)
            elif stat.S_ISFIFO(st.st_mode):
                ti.type = tarfile.FIFOTYPE
                tar.addfile(ti)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                ti.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
                ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                tar.addfile(ti)
            # sockets are not copied (as with docker cp)


# --------------------------------------------------------------- extracting
def _parts(name: str, rename_top: str | None) -> list[str]:
    parts = [p for p in name.split("/") if p]
    if not parts or name.startswith("/") or any(p in ("..",) for p in parts) \
            or any(p == "." for p in parts[1:]):
        raise ArchiveError(f"archive entry {name!r} is not a plain relative path")
    if rename_top is not None:
        parts[0] = rename_top
    elif parts[0] == ".":
        parts = parts[1:]
    return parts


def _parent(dest: str, parts: list[str]) -> str:
    """The folder an entry goes in; never through a symlink or a non-folder."""
    cur = dest
    for part in parts[:-1]:
        cur = posixpath.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise ArchiveError(f"archive entry {'/'.join(parts)!r} comes before its "
                               "folder") from None
        if stat.S_ISLNK(st.st_mode):
            raise ArchiveError(f"archive entry {'/'.join(parts)!r} goes through the "
                               f"symlink {cur}")
        if not stat.S_ISDIR(st.st_mode):
            raise ArchiveError(f"archive entry {'/'.join(parts)!r} goes through {cur}, "
                               "not a folder")
    return cur


def _clear(path: str, for_dir: bool) -> bool:
    """Make room for a new entry; True if a folder is already there (kept for a folder)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        if for_dir:
            return True
        raise ArchiveError(f"cannot overwrite the folder {path} with a non-folder")
    os.unlink(path)
    return False


def _own(path: str, ti: tarfile.TarInfo, mode: int, is_link: bool = False) -> None:
    try:
        os.chown(path, ti.uid, ti.gid, follow_symlinks=False)
    except PermissionError:
        pass  # not root (a host user's cp): the files are theirs
    if not is_link:
        os.chmod(path, mode)
    try:
        os.utime(path, (ti.mtime, ti.mtime), follow_symlinks=False)
    except OSError:
        pass


def extract(src, dest: str, rename_top: str | None = None, host: bool = False) -> list[str]:
    """Unpack the tar stream ``src`` (a binary file) into the existing folder dest;
    the names skipped (device nodes on the host)."""
    skipped: list[str] = []
    dirs: list[tuple[str, tarfile.TarInfo, int]] = []
    strip = 0o6000 if host else 0  # setuid/setgid from a guest do not reach the host
    try:
        tar = tarfile.open(fileobj=src, mode="r|")
    except tarfile.ReadError as exc:
        raise ArchiveError(f"not a tar stream: {exc}") from None
    with tar:
        for ti in tar:
            parts = _parts(ti.name, rename_top)
            if not parts:
                continue  # "." itself: dest is there already
            path = posixpath.join(_parent(dest, parts), parts[-1])
            mode = ti.mode & 0o7777 & ~strip
            if ti.isdir():
                if not _clear(path, True):
                    os.mkdir(path, 0o700)
                dirs.append((path, ti, mode))
            elif ti.isreg():
                _clear(path, False)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    data = tar.extractfile(ti)
                    while chunk := data.read(CHUNK):  # type: ignore[union-attr]
                        out.write(chunk)
                _own(path, ti, mode)
            elif ti.issym():
                _clear(path, False)
                os.symlink(ti.linkname, path)
                _own(path, ti, mode, is_link=True)
            elif ti.islnk():
                target_parts = _parts(ti.linkname, rename_top)
                target = posixpath.join(_parent(dest, target_parts), target_parts[-1]) \
                    if target_parts else dest
                if not stat.S_ISREG(os.lstat(target).st_mode):
                    raise ArchiveError(f"hard link {ti.name!r} must point at a file")
                _clear(path, False)
                os.link(target, path, follow_symlinks=False)
            elif ti.isfifo():
                _clear(path, False)
                os.mkfifo(path, 0o600)
                _own(path, ti, mode)
            elif (ti.ischr() or ti.isblk()) and not host:
                _clear(path, False)
                kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
                os.mknod(path, kind | 0o600, os.makedev(ti.devmajor, ti.devminor))
                _own(path, ti, mode)
            else:
                skipped.append(ti.name)
    for path, ti, mode in reversed(dirs):  # deepest first: their files are in place
        _own(path, ti, mode)
    return skipped


# ---------------------------------------------------------------- listing
def list_entries(path: str) -> list[dict]:
    """A folder's entries (or the one entry of a non-folder), not following symlinks."""
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        names = sorted(os.listdir(path))
        return [e for e in (_entry(posixpath.join(path, n), n) for n in names) if e]
    return [e for e in [_entry(path, posixpath.basename(path))] if e]


def _entry(path: str, name: str) -> dict | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    kind = ("dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "symlink" if stat.S_ISLNK(st.st_mode) else "other")
    out = {"name": name, "type": kind, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode),
           "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime}
    if kind == "symlink":
        out["target"] = os.readlink(path)
    return out


# ------------------------------------------------------- the guest helper
def run_in_container(init_pid: int, op: str, path: str) -> int:
    """The forked helper's body (stdio on fds 0-2): chroot, then carry out op.

    Exit 0 on success, 1 with one line on stderr otherwise (2: path not found).
    """
    try:
        os.chroot(f"/proc/{init_pid}/root")
        os.chdir("/")
        _carry_out(op, path)
        return 0
    except FileNotFoundError as exc:
        _say(f"no such file or directory: {exc.filename or path}")
        return 2
    except ArchiveError as exc:
        _say(str(exc))
    except (OSError, tarfile.TarError) as exc:
        _say(f"{op} {path}: {exc}")
    return 1


def _say(text: str) -> None:
    os.write(2, (text.replace("\n", " ") + "\n").encode(errors="replace"))


def _carry_out(op: str, path: str) -> None:
    with os.fdopen(0, "rb", closefd=False) as stdin, os.fdopen(1, "wb", closefd=False) as out:
        if op == "get":
            pack(out, path, top_name(path), skip=NO_WRITE)
        elif op == "list":
            out.write(json.dumps(list_entries(path)).encode())
        elif op == "put-into":
            _need_dir(path)
            extract(stdin, path)
        elif op == "put-as":
            parent = posixpath.dirname(path) or "/"
            os.makedirs(parent, mode=0o755, exist_ok=True)
            extract(stdin, parent, rename_top=posixpath.basename(path))
        else:  # put: into an existing folder, else as path (docker cp's rule)
            if os.path.isdir(path):
                extract(stdin, path)
            else:
                parent = posixpath.dirname(path) or "/"
                if not os.path.isdir(parent):
                    raise ArchiveError(f"no such folder: {parent}")
                extract(stdin, parent, rename_top=posixpath.basename(path))


def _need_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise ArchiveError(f"{path} is not a folder in the container")
