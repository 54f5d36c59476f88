"""A pod's volumes, carried into its VM without filesystem sharing.

The kubelet lays volumes out as host directories and containerd asks for
them as bind mounts. The guest cannot see the host's filesystem, so each bind
mount of a host path is carried in the way that keeps its meaning:

* ``emptyDir`` (``…/volumes/kubernetes.io~empty-dir/NAME``): one volume per
  pod, shared by its containers and kept across container restarts: a tmpfs
  in the guest when the kubelet made it on a tmpfs (``medium: Memory``), else
  a sparse ext4 disk of its own, sized by the pod annotation
  ``ember.io/emptydir-size.NAME`` (e.g. ``1Gi``) or ``DEFAULT_EMPTYDIR_SIZE``;
* ``configMap``, ``secret``, ``projected``, ``downwardAPI`` and small
  read-only directories: copied into guest memory and kept in sync (the
  kubelet's atomic ``..data`` swap reaches the guest as an atomic swap);
* read-only directories or files too big to copy: packed into a read-only
  ext4 image (``mkfs.ext4 -d``, no host mount) attached as a disk;
* single files (``/etc/hosts``, ``/etc/resolv.conf``, the termination log):
  copied; the termination message file is written back to the host when the
  container exits, so ``kubectl describe`` shows it;
* the pod's ``/dev/shm``: one tmpfs per pod, shared by its containers.

What cannot be carried is refused at CreateContainer with the mount named:
a writable host directory other than an emptyDir (its writes would vanish
with a copy), a block device for a volumeDevice (not attached yet).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ember.agent.proto import agent_pb2 as pb
from ember.errors import EmberError
from ember.storage.ext4 import content_size, make_ext4
from ember.storage.rootfs import rootfs_size
from ember.ttrpc import Code

log = logging.getLogger("ember.shim.volumes")

GUEST_FILES = "/run/ember/files"
GUEST_VOLUMES = "/run/ember/volumes"
COPY_MAX_BYTES = 16 << 20   # a tree above this is packed into an image, not copied
COPY_MAX_FILE = 2 << 20     # one file must fit in one agent message
BATCH_BYTES = 2 << 20
READ_CHUNK = 2 << 20
SYNC_INTERVAL = 0.5
DEFAULT_EMPTYDIR_SIZE = 10 << 30  # sparse: costs only what is written
TERMINATION_ANNOTATION = "io.kubernetes.container.terminationMessagePath"
TERMINATION_DEFAULT = "/dev/termination-log"
TERMINATION_MAX = 1 << 20
SIZE_ANNOTATION = "ember.io/emptydir-size."
KUBELET_VOLUME = re.compile(r"/volumes/kubernetes\.io~([a-z-]+)/[^/]+(/mount)?$")  # csi: .../mount
SYNCED_KINDS = {"configmap", "secret", "projected", "downward-api"}
PROPAGATION = {"rshared", "shared", "rslave", "slave"}
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


class VolumeError(EmberError):
    """A mount that cannot be carried into the VM; CreateContainer is refused."""

    code = Code.INVALID_ARGUMENT


@dataclass
class GuestFile:
    path: str
    data: bytes
    mode: int


def parse_size(text: str) -> int:
    """A Kubernetes quantity ("512Mi", "1G", "1073741824") in bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTkmgt]i?)?\s*", text or "")
    if not m:
        raise VolumeError(f"size {text!r} is not a quantity like 512Mi or 1Gi")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def _key(host_path: str) -> str:
    return hashlib.sha256(host_path.encode()).hexdigest()[:16]


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding path (from /proc/self/mountinfo)."""
    real = os.path.realpath(path)
    best, fstype = "", ""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                point = fields[4].replace("\\040", " ")
                sep = fields.index("-")
                if (real == point or real.startswith(point.rstrip("/") + "/")) \
                        and len(point) >= len(best):
                    best, fstype = point, fields[sep + 1]
    except (OSError, ValueError, IndexError):
        return ""
    return fstype


# ------------------------------------------------------------------ host trees
@dataclass(frozen=True)
class Entry:
    """One host tree entry as the sync compares it."""

    kind: pb.TreeEntry.Kind
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str = ""


def _mounts_below(root: Path) -> set[str]:
    """Mount points strictly below root: a copy does not cross them (a host mount made
    inside a volume after the container started stays private to the host, as with
    runc's default rprivate bind mounts)."""
    prefix = os.path.realpath(root).rstrip("/") + "/"
    found = set()
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if point.startswith(prefix):
                    found.add(point[len(prefix):])
    except OSError:
        pass
    return found


def scan(root: Path) -> dict[str, Entry]:
    """Every directory, regular file and symlink below root (not root itself)."""
    out: dict[str, Entry] = {}
    mounts = _mounts_below(root)
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            children = list(os.scandir(root / rel_dir if rel_dir else root))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for child in children:
            rel = f"{rel_dir}/{child.name}" if rel_dir else child.name
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Entry(pb.TreeEntry.SYMLINK, 0, st.st_uid, st.st_gid, 0,
                                 st.st_mtime_ns, os.readlink(child.path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = Entry(pb.TreeEntry.DIR, mode, st.st_uid, st.st_gid, 0, 0)
                if rel not in mounts:
                    stack.append(rel)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = Entry(pb.TreeEntry.FILE, mode, st.st_uid, st.st_gid, st.st_size,
                                 st.st_mtime_ns)
            else:
                log.warning("%s: %s is not a file, folder or symlink; not copied", root, rel)
    return out


def tree_bytes(tree: dict[str, Entry]) -> tuple[int, int]:
    """(total bytes, largest file) of a scanned tree."""
    sizes = [e.size for e in tree.values() if e.kind == pb.TreeEntry.FILE]
    return sum(sizes), max(sizes, default=0)


def changes(root: Path, old: dict[str, Entry], new: dict[str, Entry]
            ) -> tuple[list[pb.TreeEntry], list[str]]:
    """The entries to write and the paths to remove to turn old into new."""
    entries = []
    for rel, e in sorted(new.items()):
        if old.get(rel) == e:
            continue
        data = b""
        if e.kind == pb.TreeEntry.FILE:
            try:
                data = (root / rel).read_bytes()
            except OSError:
                continue  # gone since the scan: the next round sees it
        entries.append(pb.TreeEntry(path=rel, kind=e.kind, data=data, mode=e.mode,
                                    target=e.target, uid=e.uid, gid=e.gid))
    gone = sorted(rel for rel in old if rel not in new)
    removes = [rel for rel in gone if not any(rel.startswith(g + "/") for g in gone)]
    return entries, removes


def push(agent, root: str, entries: list[pb.TreeEntry], removes: list[str]) -> None:
    """SyncTree in calls that fit the ttrpc frame; links and removals go last."""
    first = [e for e in entries if e.kind != pb.TreeEntry.SYMLINK]
    links = [e for e in entries if e.kind == pb.TreeEntry.SYMLINK]
    batch: list[pb.TreeEntry] = []
    size = 0
    for e in first:
        if batch and size + len(e.data) > BATCH_BYTES:
            agent.sync_tree(root, batch)
            batch, size = [], 0
        batch.append(e)
        size += len(e.data)
    agent.sync_tree(root, batch + links, removes)


# ------------------------------------------------------------------ pod volumes
@dataclass
class Synced:
    """A host tree copied into the guest and kept equal to it (both ways if writable)."""

    host: Path
    guest: str
    writable: bool = False
    state: dict[str, Entry] = field(default_factory=dict)  # host side, as last synced
    guest_state: dict[str, tuple] = field(default_factory=dict)  # guest side, ditto


@dataclass
class WriteBack:
    guest: str
    host: str


class PodVolumes:
    """The volumes of one pod: what each container mounts, and the sync loop."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir  # host images (emptyDir disks, packed volumes)
        self.pod = None  # ember.shim.pod.Pod, set by bind()
        self._lock = threading.Lock()
        self._carry_lock = threading.Lock()  # one container's volumes set up at a time
        self._guest_paths: dict[str, str] = {}  # host path -> guest path (pod-level)
        self._synced: list[Synced] = []
        self._write_back: dict[str, list[WriteBack]] = {}
        self._rw: dict[str, list[Synced]] = {}  # container id -> its writable copies
        self._sync_lock = threading.Lock()  # one sync of a copy at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bind(self, pod) -> None:
        self.pod = pod

    @property
    def _agent(self):
        agent = self.pod.agent if self.pod is not None else None
        if agent is None:
            raise VolumeError("the pod's VM is not running")
        return agent

    # -------------------------------------------------------------- create
    def check(self, spec: dict) -> None:
        """Refuse, before anything is booted or attached, what cannot be carried."""
        check_devices(spec)
        for m in _bind_mounts(spec):
            classify(m)

    def carry(self, spec: dict, cid: str) -> list[dict]:
        """The container's mounts for the guest; every volume made ready there."""
        with self._carry_lock:
            return self._carry(spec, cid)

    def _carry(self, spec: dict, cid: str) -> list[dict]:
        annotations = spec.get("annotations") or {}
        check_devices(spec)
        term = annotations.get(TERMINATION_ANNOTATION) or TERMINATION_DEFAULT
        mounts, files = [], []
        for n, m in enumerate(spec.get("mounts") or []):
            if not isinstance(m, dict):
                continue
            how = classify(m)
            src, dest = m.get("source", ""), m.get("destination", "")
            if how == "keep":
                mounts.append(m)
                continue
            if how == "shm":
                guest = self._tmpfs(src, _tmpfs_size(src))
            elif how == "file":
                guest = f"{GUEST_FILES}/{cid}/{n}-{os.path.basename(src)}"
                files.append((src, guest, dest))
            elif how == "emptydir":
                guest = self._emptydir(src, annotations)
            elif how == "packed":
                guest = self._known(src) or self._packed(src, dest)
            elif how == "rwcopy":
                guest = self._known(src) or self._synced_copy(src, writable=True)
                with self._lock:
                    item = next(i for i in self._synced if i.guest == guest)
                    self._rw.setdefault(cid, []).append(item)
            else:  # "copy"
                guest = self._known(src) or self._synced_copy(src)
            mounts.append({**m, "source": guest})
        if files:
            self._copy_files(cid, files, term)
        return mounts

    def _known(self, src: str) -> str | None:
        with self._lock:
            return self._guest_paths.get(src)

    def _emptydir(self, src: str, annotations: dict) -> str:
        known = self._known(src)
        if known:
            return known
        if _fs_type(src) == "tmpfs":
            return self._tmpfs(src, _tmpfs_size(src), copy_from=Path(src))
        return self._emptydir_disk(src, annotations)

    def _remember(self, src: str, guest: str) -> str:
        with self._lock:
            self._guest_paths[src] = guest
        return guest

    def _tmpfs(self, src: str, size: int, copy_from: Path | None = None) -> str:
        with self._lock:
            if src in self._guest_paths:
                return self._guest_paths[src]
        guest = f"{GUEST_VOLUMES}/{_key(src)}"
        self._agent.mount_volume(guest, tmpfs_size=size)
        if copy_from is not None:
            tree = scan(copy_from)
            if tree:
                push(self._agent, guest, *changes(copy_from, {}, tree))
        return self._remember(src, guest)

    def _emptydir_disk(self, src: str, annotations: dict) -> str:
        name = os.path.basename(src)
        raw = annotations.get(SIZE_ANNOTATION + name)
        size = parse_size(raw) if raw else DEFAULT_EMPTYDIR_SIZE
        image = self.data_dir / f"{_key(src)}.img"
        make_ext4(src, image, max(size, rootfs_size(content_size(Path(src)))),
                  label="ember-emptydir", journal=True, error=VolumeError)
        return self._attach(src, image, readonly=False)

    def _packed(self, src: str, dest: str) -> str:
        image = self.data_dir / f"{_key(src)}.img"
        make_ext4(src, image, rootfs_size(content_size(Path(src))), label="ember-volume",
                  error=VolumeError)
        log.info("volume %s -> %s: %s packed into a read-only image", src, dest, image.name)
        return self._attach(src, image, readonly=True)

    def _attach(self, src: str, image: Path, readonly: bool) -> str:
        guest = f"{GUEST_VOLUMES}/{_key(src)}"
        vm = self.pod.vm if self.pod is not None else None
        if vm is None:
            raise VolumeError("the pod's VM is not running")
        _, dev = vm.attach_disk(image, "raw", readonly, drive_id=f"v{_key(src)[:8]}")
        self._agent.mount_volume(guest, pb.BlockDevice(kind=dev.kind, address=dev.address,
                                                       fstype="ext4", readonly=readonly))
        return self._remember(src, guest)

    def _synced_copy(self, src: str, writable: bool = False) -> str:
        guest = f"{GUEST_VOLUMES}/{_key(src)}"
        item = Synced(Path(src), guest, writable)
        tree = scan(item.host)
        push(self._agent, guest, *changes(item.host, {}, tree))
        item.state = tree
        if writable:
            item.guest_state = _guest_signature(self._agent.list_tree(guest))
        with self._lock:
            self._synced.append(item)
        self._start_sync()
        return self._remember(src, guest)

    def _copy_files(self, cid: str, files: list[tuple[str, str, str]], term: str) -> None:
        root = f"{GUEST_FILES}/{cid}"
        entries = []
        for src, guest, dest in files:
            st = os.stat(src)
            if not stat.S_ISREG(st.st_mode):
                raise VolumeError(f"mount {dest}: host path {src} is not a regular file "
                                  "or a directory")
            if st.st_size > COPY_MAX_FILE:
                raise VolumeError(f"mount {dest}: file {src} is {st.st_size} bytes, more "
                                  f"than the {COPY_MAX_FILE} a copy carries; mount its "
                                  "folder instead")
            entries.append(pb.TreeEntry(path=os.path.basename(guest), kind=pb.TreeEntry.FILE,
                                        data=Path(src).read_bytes(), mode=stat.S_IMODE(st.st_mode),
                                        uid=st.st_uid, gid=st.st_gid))
            if dest == term:
                with self._lock:
                    self._write_back.setdefault(cid, []).append(WriteBack(guest, src))
        push(self._agent, root, entries, [])

    # ----------------------------------------------------------- lifecycle
    def process_exited(self, cid: str, init: bool) -> None:
        """Before containerd hears of an exit: the container's writes to writable
        host folders reach the host, and its termination message the kubelet's file."""
        with self._lock:
            rw = list(self._rw.get(cid, []))
        for item in rw:
            try:
                self.sync_once(item)
            except (EmberError, OSError) as exc:
                log.warning("writing %s back to the host: %s", item.host, exc)
        if init:
            self.container_exited(cid)

    def container_exited(self, cid: str) -> None:
        """Write the termination message back to the host file the kubelet reads."""
        with self._lock:
            items = list(self._write_back.get(cid, []))
        for wb in items:
            try:
                data = self._agent.read_file(wb.guest, TERMINATION_MAX)
            except EmberError as exc:
                log.warning("termination message of %s: %s", cid, exc)
                continue
            if data is None:
                continue
            try:
                _write_host_file(wb.host, data)
            except OSError as exc:
                log.warning("termination message of %s -> %s: %s", cid, wb.host, exc)

    def container_removed(self, cid: str) -> None:
        """Drop the container's file copies from guest memory."""
        with self._lock:
            self._write_back.pop(cid, None)
            self._rw.pop(cid, None)
        agent = self.pod.agent if self.pod is not None else None
        if agent is not None:
            try:
                agent.sync_tree(GUEST_FILES, [], [cid])
            except EmberError as exc:
                log.warning("removing %s's files in the guest: %s", cid, exc)

    def close(self) -> None:
        """Stop syncing and delete the host images (the VM is going or gone)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        with self._lock:
            self._synced.clear()
            self._guest_paths.clear()
            self._write_back.clear()
            self._rw.clear()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._stop = threading.Event()

    # ---------------------------------------------------------------- sync
    def _start_sync(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._sync_loop, name="volume-sync",
                                            daemon=True)
        self._thread.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(SYNC_INTERVAL):
            with self._lock:
                items = list(self._synced)
            for item in items:
                try:
                    self.sync_once(item)
                except (EmberError, OSError) as exc:
                    log.warning("syncing %s into the guest: %s", item.host, exc)

    def sync_once(self, item: Synced) -> bool:
        """Bring one copy up to date (the guest's writes first); True if anything changed."""
        with self._sync_lock:
            if not item.host.is_dir():
                return False  # the kubelet is tearing the volume down
            pulled = item.writable and self._pull(item)
            tree = scan(item.host)
            if tree == item.state:
                return pulled
            entries, removes = changes(item.host, item.state, tree)
            push(self._agent, item.guest, entries, removes)
            item.state = tree
            if item.writable:
                item.guest_state = _guest_signature(self._agent.list_tree(item.guest))
            return True

    def _pull(self, item: Synced) -> bool:
        """Apply what the guest changed in a writable copy to the host folder."""
        listed = self._agent.list_tree(item.guest)
        now = _guest_signature(listed)
        if now == item.guest_state:
            return False
        by_path = {e.path: e for e in listed}
        for rel in sorted(now, key=lambda r: (now[r][0] != pb.TreeEntry.DIR, r)):
            if item.guest_state.get(rel) == now[rel]:
                continue
            e = by_path[rel]
            data = self._read_guest(f"{item.guest}/{rel}", e.size) \
                if e.kind == pb.TreeEntry.FILE else b""
            if data is not None:
                apply_to_host(item.host, rel, e, data)
        gone = sorted(r for r in item.guest_state if r not in now)
        for rel in gone:
            if not any(rel.startswith(g + "/") for g in gone if g != rel):
                remove_on_host(item.host, rel)
        item.guest_state = now
        item.state = scan(item.host)  # what came from the guest is not pushed back
        return True

    def _read_guest(self, path: str, size: int) -> bytes | None:
        chunks, offset = [], 0
        while True:
            chunk = self._agent.read_file(path, READ_CHUNK, offset)
            if chunk is None:
                return None  # gone since the listing: the next round sees it
            chunks.append(chunk)
            offset += len(chunk)
            if len(chunk) < READ_CHUNK:
                return b"".join(chunks)


def _guest_signature(entries: list[pb.TreeEntry]) -> dict[str, tuple]:
    return {e.path: (e.kind, e.size, e.mtime_ns, e.target, e.mode, e.uid, e.gid)
            for e in entries}


def _host_parent(root: Path, rel: str) -> Path:
    """The host folder an entry goes in, refusing any symlink on the way (a guest
    could plant one to make the host write outside the volume)."""
    parts = [p for p in rel.split("/")]
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise VolumeError(f"guest entry {rel!r} is not a plain relative path")
    cur = root
    for part in parts[:-1]:
        cur = cur / part
        st = os.lstat(cur)
        if not stat.S_ISDIR(st.st_mode):
            raise VolumeError(f"guest entry {rel!r} goes through {cur}, not a folder")
    return cur


def apply_to_host(root: Path, rel: str, e: pb.TreeEntry, data: bytes) -> None:
    """Write one guest entry into the host folder: never through a symlink, files by rename."""
    parent = _host_parent(root, rel)
    path = parent / rel.rsplit("/", 1)[-1]
    if e.kind == pb.TreeEntry.DIR:
        if not path.is_dir() or path.is_symlink():
            remove_on_host(root, rel)
            os.mkdir(path, e.mode or 0o755)
        os.chmod(path, e.mode or 0o755, follow_symlinks=False)
        os.chown(path, e.uid, e.gid, follow_symlinks=False)
        return
    tmp = parent / f".ember-sync-{path.name}"
    remove_on_host(root, str(tmp.relative_to(root)))
    if e.kind == pb.TreeEntry.SYMLINK:
        os.symlink(e.target, tmp)
    else:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fchmod(fd, e.mode or 0o644)
        finally:
            os.close(fd)
    os.chown(tmp, e.uid, e.gid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.rename(tmp, path)


def remove_on_host(root: Path, rel: str) -> None:
    path = _host_parent(root, rel) / rel.rsplit("/", 1)[-1]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _bind_mounts(spec: dict) -> list[dict]:
    return [m for m in spec.get("mounts") or [] if isinstance(m, dict)]


def classify(m: dict) -> str:
    """How a mount is carried: keep (not a host bind), shm, file, emptydir, copy
    (synced into guest memory) or packed (a read-only image); VolumeError if it
    cannot be."""
    opts = list(m.get("options") or [])
    src, dest = m.get("source", ""), m.get("destination", "")
    if not (m.get("type") == "bind" or "bind" in opts or "rbind" in opts) \
            or not src.startswith("/"):
        return "keep"
    asked = PROPAGATION.intersection(opts)
    if asked:
        raise VolumeError(f"mount {dest}: {sorted(asked)[0]} propagation needs the host's "
                          "mount table, which a VM cannot share")
    if not os.path.lexists(src):
        raise VolumeError(f"mount {dest}: host path {src} does not exist")
    if dest == "/dev/shm":
        return "shm"
    if not os.path.isdir(src):
        return "file"
    found = KUBELET_VOLUME.search(src)
    kind = found.group(1) if found else ""
    if kind == "empty-dir":
        return "emptydir"
    total, largest = tree_bytes(scan(Path(src)))
    small = total <= COPY_MAX_BYTES and largest <= COPY_MAX_FILE
    readonly = "ro" in opts
    if kind in SYNCED_KINDS:
        if not small:
            raise VolumeError(f"mount {dest}: {kind} volume {src} holds {total} bytes, more "
                              f"than the {COPY_MAX_BYTES} a copy carries")
        return "copy"
    if readonly:
        return "copy" if small else "packed"
    if kind:  # a kubelet-managed filesystem volume (PVC: csi, nfs, local, ...)
        raise VolumeError(
            f"mount {dest}: writable {kind} volume {src} cannot be carried into the VM "
            "(no filesystem sharing): use a block volume (volumeDevices) or an emptyDir")
    if not small:
        raise VolumeError(
            f"mount {dest}: writable host directory {src} holds {total} bytes, more than "
            f"the {COPY_MAX_BYTES} a two-way copy carries (no filesystem sharing): mount "
            "it read-only, or use an emptyDir")
    return "rwcopy"


def _tmpfs_size(src: str) -> int:
    """The size of the host tmpfs behind src (0 if it is not one)."""
    if _fs_type(src) != "tmpfs":
        return 0
    st = os.statvfs(src)
    return st.f_blocks * st.f_frsize


def _write_host_file(path: str, data: bytes) -> None:
    """Overwrite an existing host file without following a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def check_devices(spec: dict) -> None:
    """Refuse a volumeDevice: a host block device asked for by a non-privileged container.

    A privileged container's host devices (containerd without
    ``privileged_without_host_devices``) come with an allow-all device rule and
    are not the pod's data: they are left to the guest's own /dev.
    """
    linux = spec.get("linux") or {}
    rules = ((linux.get("resources") or {}).get("devices") or [])
    allow_all = any(r.get("allow") and not r.get("type", "a").strip("a") and r.get("major") is None
                    for r in rules if isinstance(r, dict))
    if allow_all:
        linux["devices"] = []
        return
    for d in linux.get("devices") or []:
        if isinstance(d, dict) and d.get("type") == "b":
            raise VolumeError(f"device {d.get('path')}: host block devices (volumeDevices) "
                              "cannot be attached to an Ember pod yet")
