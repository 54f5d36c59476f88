"""Apply OCI layer tars onto a folder, the way an overlay filesystem would stack them.

We extract as root so that ownership, setuid bits and device nodes survive, which
makes a hostile layer dangerous: every path is therefore resolved *inside* the
root (symlinks followed as the container would see them, never out to the host),
the final component is never followed, and ".." names are refused.
Whiteouts follow the OCI spec: ``.wh.NAME`` deletes NAME from lower layers,
``.wh..wh..opq`` hides everything the lower layers had in that directory; a
whiteout may only name an entry of its own folder (``.wh..`` would delete the
folder itself, ``.wh...`` its parent: the staging folder's, on the host).
File data is written with holes wherever the layer has them (sparse members)
or holds only zeros, so a tiny layer cannot fill the host's disk.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from ember.errors import ImageError
from ember.image.blobs import CHUNK, open_layer

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
AUFS_META = ".wh..wh."
_MAX_SYMLINKS = 40


def resolve_in_root(root: Path, rel: str) -> Path:
    """Resolve ``rel`` below ``root`` following symlinks, clamped to ``root``."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    current = root
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            current = current.parent if current != root else root
            continue
        candidate = current / part
        if candidate.is_symlink():
            hops += 1
            if hops > _MAX_SYMLINKS:
                raise ImageError(f"too many levels of symbolic links resolving {rel}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = root
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        current = candidate
    return current


def _member_path(name: str, what: str) -> tuple[str, str] | None:
    """Split a member name into (parent, basename); None for the root entry itself."""
    parts = [p for p in PurePosixPath("/" + name).parts[1:] if p != "."]
    if ".." in parts:
        raise ImageError(f"{what}: unsafe path {name!r} in layer")
    if not parts:
        return None
    return "/".join(parts[:-1]), parts[-1]


def _whiteout_target(parent: Path, base: str, what: str, name: str) -> Path:
    """The entry a ``.wh.NAME`` member deletes; refused unless NAME is one entry of ``parent``."""
    victim = base[len(WHITEOUT) :]
    if victim in ("", ".", "..") or "/" in victim:
        raise ImageError(f"{what}: unsafe whiteout {name!r} in layer")
    return parent / victim


def _copy_sparse(src: IO[bytes], out: int, member: tarfile.TarInfo) -> None:
    """Copy a member's data into ``out``, leaving holes for its holes and its zero runs.

    A sparse member lists its data regions; only those are read. Within them,
    whole chunks of zeros are skipped too (a plain tar of a zero-filled file
    compresses to almost nothing). The file's length is set at the end.
    """
    raw = getattr(src, "raw", src)  # tarfile's unbuffered view: seek() is free in holes
    # typeshed types TarInfo.sparse loosely; it is a list of (offset, size) pairs
    sparse: list[tuple[int, int]] = getattr(member, "sparse", None) or [(0, member.size)]
    regions = [(o, n) for o, n in sparse if n > 0]
    for offset, length in regions:
        raw.seek(offset)
        done = 0
        while done < length:
            chunk = raw.read(min(CHUNK, length - done))
            if not chunk:
                raise ImageError(f"unexpected end of data in {member.name!r}")
            if chunk != bytes(len(chunk)):
                os.pwrite(out, chunk, offset + done)
            done += len(chunk)
    os.ftruncate(out, member.size)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        shutil.rmtree(path)


class _LayerApplier:
    def __init__(self, root: Path, what: str) -> None:
        self.root = root
        self.what = what
        self.created: set[Path] = set()
        self.dir_times: list[tuple[Path, float]] = []

    def apply(self, tar: tarfile.TarFile) -> None:
        for member in tar:
            split = _member_path(member.name, self.what)
            if split is None:
                continue
            parent_rel, base = split
            if any(p.startswith(AUFS_META) for p in parent_rel.split("/")) or (
                base.startswith(AUFS_META) and base != OPAQUE
            ):
                continue  # AUFS bookkeeping (.wh..wh.plnk etc.) is not part of the image
            parent = resolve_in_root(self.root, parent_rel)
            if base == OPAQUE:
                self._opaque(parent)
            elif base.startswith(WHITEOUT):
                target = _whiteout_target(parent, base, self.what, member.name)
                if target.is_symlink() or target.exists():
                    _remove(target)
            else:
                self._ensure_dir(parent)
                self._create(tar, member, parent / base)
        for path, mtime in reversed(self.dir_times):
            with contextlib.suppress(OSError):
                os.utime(path, (mtime, mtime), follow_symlinks=False)

    def _ensure_dir(self, path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            return
        if path.is_symlink() or path.exists():
            raise ImageError(f"{self.what}: {path.relative_to(self.root)} is not a directory")
        path.mkdir(mode=0o755, parents=True)

    def _opaque(self, directory: Path) -> None:
        """Delete what lower layers put in ``directory``; keep this layer's entries."""
        if not directory.is_dir() or directory.is_symlink():
            return
        for child in list(directory.iterdir()):
            if child not in self.created:
                _remove(child)
            elif child.is_dir() and not child.is_symlink():
                self._opaque(child)

    def _create(self, tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
        exists = target.is_symlink() or target.exists()
        if member.isdir():
            if exists and (target.is_symlink() or not target.is_dir()):
                target.unlink()
                exists = False
            if not exists:
                target.mkdir(mode=0o700)
        elif exists:
            _remove(target)
        if member.isfile():
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                src = tar.extractfile(member)
                if src is not None:
                    _copy_sparse(src, fd, member)
            finally:
                os.close(fd)
        elif member.issym():
            os.symlink(member.linkname, target)
        elif member.islnk():
            split = _member_path(member.linkname, self.what)
            if split is None:
                raise ImageError(f"{self.what}: hard link {member.name!r} points at the root")
            source = resolve_in_root(self.root, split[0]) / split[1]
            if not (source.is_symlink() or source.exists()):
                raise ImageError(
                    f"{self.what}: hard link {member.name!r} to missing {member.linkname!r}"
                )
            os.link(source, target, follow_symlinks=False)
            self.created.add(target)
            return  # the inode's attributes belong to the link's source
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        elif not member.isdir():
            return  # nothing else (e.g. GNU volume headers) belongs in a rootfs
        self.created.add(target)
        self._attrs(member, target)

    def _attrs(self, member: tarfile.TarInfo, target: Path) -> None:
        os.lchown(target, member.uid, member.gid)
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                with contextlib.suppress(OSError):
                    os.setxattr(
                        target,
                        key[len("SCHILY.xattr.") :],
                        value.encode("utf-8", "surrogateescape"),
                        follow_symlinks=False,
                    )
        if member.issym():
            with contextlib.suppress(OSError):
                os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
            return
        os.chmod(target, member.mode & 0o7777)  # after chown, which clears setuid
        if member.isdir():
            self.dir_times.append((target, member.mtime))
        else:
            os.utime(target, (member.mtime, member.mtime))


def apply_layer(root: Path, blob: Path, what: str) -> None:
    """Unpack one layer blob (gzip, zstd or plain tar) on top of ``root``."""
    try:
        with open_layer(blob, what) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            _LayerApplier(root, what).apply(tar)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise ImageError(f"{what}: corrupt layer ({exc})") from None
    except OSError as exc:
        raise ImageError(f"{what}: cannot unpack ({exc.strerror or exc}: {exc.filename})") from None
