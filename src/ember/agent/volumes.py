"""Pod volumes inside the guest: synchronised copies and pod-level disks.

The guest shares no filesystem with the host, so a pod's volumes are carried
in two ways (the host side is ember.shim.volumes):

* copies (configMap, secret, projected, downwardAPI, small read-only host
  directories, single files): a directory under ``/run/ember`` (guest memory)
  that the host keeps equal to its own tree with SyncTree. The order of a
  sync (directories, files, symlinks, removals; every write a rename) keeps
  the kubelet's atomic-writer layout atomic: a reader that goes through
  ``..data`` sees the old tree or the new one, never a mix;
* pod-level mounts (emptyDir on a disk or a tmpfs, large read-only volumes
  packed into an image): mounted once at a path under ``/run/ember/volumes``
  for the pod's life, then bind-mounted into each container that names them,
  so containers share them and a restarted container finds its data again.

Every path the host names must stay under ``/run/ember``: the agent never
follows a symlink out of a volume while writing (the volume's own symlinks
are content, written as links, never written through).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading

from ember.agent import storage
from ember.agent.proto import agent_pb2 as pb
from ember.ttrpc import Code, TTRPCError

log = logging.getLogger("ember.agent.volumes")

ROOT = "/run/ember"
READ_DEFAULT = 1 << 20
READ_MAX = 3 << 20  # stays under the ttrpc frame limit
MS_NOSUID, MS_NODEV = 2, 4
LIST_MAX = 100_000


def _guest_path(path: str, under: str | None = None) -> str:
    """path, checked to be absolute, normalised and strictly below ``under`` (ROOT)."""
    under = under or ROOT
    if not os.path.isabs(path) or os.path.normpath(path) != path.rstrip("/") or \
            not path.startswith(under + "/"):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"path {path!r} must be a normalised "
                         f"absolute path under {under}")
    return path


def _relative(rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"tree entry {rel!r} must be a relative path "
                         "without '.', '..' or empty parts")
    return rel


def _no_symlink_parents(root: str, rel: str) -> None:
    """Refuse an entry whose parent folders, inside the volume, are symlinks."""
    cur = root
    for part in rel.split("/")[:-1]:
        cur = os.path.join(cur, part)
        try:
            if stat.S_ISLNK(os.lstat(cur).st_mode):
                raise TTRPCError(Code.INVALID_ARGUMENT,
                                 f"tree entry {rel!r} goes through the symlink {cur}")
        except FileNotFoundError:
            return


def _is_mount(path: str) -> bool:
    return path in storage.mounts_under(path)


class Volumes:
    """SyncTree, ReadFile, MountVolume, UnmountVolume; one per agent."""

    def __init__(self, run_command=None, disk_timeout: float = storage.RESOLVE_TIMEOUT) -> None:
        self.run_command = run_command
        self.disk_timeout = disk_timeout
        self._lock = threading.Lock()
        self.mounted: list[str] = []

    # -- copies ------------------------------------------------------------------

    def sync_tree(self, req: pb.SyncTreeRequest) -> None:
        root = _guest_path(req.root)
        entries = [(_relative(e.path), e) for e in req.entries]
        removes = [_relative(r) for r in req.remove]
        with self._lock:
            os.makedirs(root, mode=0o755, exist_ok=True)
            if req.tmpfs and not _is_mount(root):
                data = "mode=0755" + (f",size={req.tmpfs_size}" if req.tmpfs_size else "")
                try:
                    storage.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, data)
                except OSError as e:
                    raise TTRPCError(Code.INTERNAL, str(e)) from e
            kinds = (pb.TreeEntry.DIR, pb.TreeEntry.FILE, pb.TreeEntry.SYMLINK)
            for kind in kinds:  # the order that keeps an atomic-writer swap atomic
                for rel, entry in entries:
                    if entry.kind == kind:
                        _no_symlink_parents(root, rel)
                        self._apply(root, rel, entry)
            for rel in removes:
                _no_symlink_parents(root, rel)
                _remove(os.path.join(root, rel))

    def _apply(self, root: str, rel: str, e: pb.TreeEntry) -> None:
        path = os.path.join(root, rel)
        parent = os.path.dirname(path)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        mode = e.mode & 0o7777
        if e.kind == pb.TreeEntry.DIR:
            try:
                st = os.lstat(path)
                if not stat.S_ISDIR(st.st_mode):
                    _remove(path)
                    raise FileNotFoundError
            except FileNotFoundError:
                os.mkdir(path, mode or 0o755)
            os.chmod(path, mode or 0o755, follow_symlinks=False)
            os.chown(path, e.uid, e.gid, follow_symlinks=False)
            return
        tmp = os.path.join(parent, f".ember-sync-{os.path.basename(path)}")
        _remove(tmp)
        if e.kind == pb.TreeEntry.SYMLINK:
            os.symlink(e.target, tmp)
            with contextlib.suppress(OSError):
                os.chown(tmp, e.uid, e.gid, follow_symlinks=False)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, mode or 0o644)
            try:
                view = memoryview(e.data)
                while view:
                    view = view[os.write(fd, view):]
                os.fchmod(fd, mode or 0o644)
                os.fchown(fd, e.uid, e.gid)
            finally:
                os.close(fd)
        try:
            if stat.S_ISDIR(os.lstat(path).st_mode):
                _remove(path)  # a directory cannot be replaced by rename
        except FileNotFoundError:
            pass
        os.rename(tmp, path)

    def read_file(self, req: pb.ReadFileRequest) -> pb.ReadFileResponse:
        path = _guest_path(req.path)
        limit = min(req.max_bytes or READ_DEFAULT, READ_MAX)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return pb.ReadFileResponse(exists=False)
        except OSError as e:
            raise TTRPCError(Code.INVALID_ARGUMENT, f"cannot read {path}: {e.strerror}") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TTRPCError(Code.INVALID_ARGUMENT, f"{path} is not a regular file")
            if req.offset:
                os.lseek(fd, req.offset, os.SEEK_SET)
            chunks, left = [], limit
            while left > 0:
                chunk = os.read(fd, left)
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        return pb.ReadFileResponse(data=b"".join(chunks), exists=True)

    def list_tree(self, req: pb.ListTreeRequest) -> pb.ListTreeResponse:
        root = _guest_path(req.root)
        limit = req.max_entries or LIST_MAX
        out = pb.ListTreeResponse()
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                children = list(os.scandir(os.path.join(root, rel_dir) if rel_dir else root))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for child in children:
                if child.name.startswith(".ember-sync-"):
                    continue  # a sync in progress
                rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
                try:
                    st = child.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                e = out.entries.add(path=rel, mode=stat.S_IMODE(st.st_mode), uid=st.st_uid,
                                    gid=st.st_gid, mtime_ns=st.st_mtime_ns)
                if stat.S_ISLNK(st.st_mode):
                    e.kind, e.target = pb.TreeEntry.SYMLINK, os.readlink(child.path)
                elif stat.S_ISDIR(st.st_mode):
                    e.kind, e.mtime_ns = pb.TreeEntry.DIR, 0
                    if not _is_mount(child.path):  # never into another filesystem
                        stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    e.kind, e.size = pb.TreeEntry.FILE, st.st_size
                else:
                    del out.entries[-1]
                if len(out.entries) > limit:
                    raise TTRPCError(Code.RESOURCE_EXHAUSTED,
                                     f"{root} holds more than {limit} entries")
        return out

    # -- pod-level mounts -----------------------------------------------------------

    def mount_volume(self, req: pb.MountVolumeRequest) -> None:
        target = _guest_path(req.target, os.path.join(ROOT, "volumes"))
        with self._lock:
            if target in self.mounted:
                return  # idempotent: the host may retry
            if req.HasField("device") and req.device.kind:
                d = req.device
                storage.mount_disk(d.kind, d.address, target, d.fstype, d.readonly,
                                   list(d.options), self.run_command, self.disk_timeout)
            else:
                os.makedirs(target, mode=0o755, exist_ok=True)
                data = "mode=1777" + (f",size={req.tmpfs_size}" if req.tmpfs_size else "")
                try:
                    storage.mount("tmpfs", target, "tmpfs",
                                  MS_NOSUID | MS_NODEV, data)
                except OSError as e:
                    raise TTRPCError(Code.INTERNAL, str(e)) from e
            self.mounted.append(target)
            log.info("pod volume mounted at %s", target)

    def unmount_volume(self, req: pb.UnmountVolumeRequest) -> None:
        target = _guest_path(req.target, os.path.join(ROOT, "volumes"))
        with self._lock:
            try:
                storage.umount(target)
            except OSError as e:
                raise TTRPCError(Code.FAILED_PRECONDITION, str(e)) from e
            if target in self.mounted:
                self.mounted.remove(target)
            with contextlib.suppress(OSError):
                os.rmdir(target)

    def unmount_all(self) -> None:
        """Before power-off: flush and unmount every pod volume."""
        with self._lock:
            targets, self.mounted = list(reversed(self.mounted)), []
        for target in targets:
            try:
                storage.umount(target)
            except OSError as e:
                log.warning("%s", e)


def _remove(path: str) -> None:
    """rm -rf path without following symlinks and never through a mount."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        storage.remove_tree(path)
    else:
        os.unlink(path)
