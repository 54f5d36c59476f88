"""LVM thin-pool backend: every snapshot is a thin LV in a pool the user names.

The storage Kata and Firecracker users run in production (containerd's
devmapper snapshotter), through LVM's own tools rather than raw device-mapper
tables, so ``lvs``/``lvremove`` show and fix what the snapshotter did.

* A snapshot without a parent is a thin snapshot of a per-root template LV,
  formatted once (``mkfs.ext4``), so a base layer costs one ``lvcreate``.
* Prepare/View on a parent: ``lvcreate --snapshot`` of the parent's LV, a
  metadata-only operation in the pool whatever the parent holds: O(1).
* Commit: the LV is flushed, its usage recorded, and after the metadata commit
  it becomes read-only and inactive (``lvchange -pr -an``). An inactive origin
  is snapshotted without suspending anything.
* Remove: ``lvremove`` after the row is gone (a crash in between leaves an
  orphan LV, which start-up removes).

Safety: LV names are ``ember-<root token>-<snapshot id>``; no string from a
client reaches an lvm argument. The token (random, in ``ROOT/lvm.json``) keeps
two snapshotter roots sharing one pool from taking each other's LVs for
orphans. The volume group and pool names are checked against LVM's own name
rules before any command runs.

Every command of a serving snapshotter goes through one long-lived ``lvm`` shell
(:mod:`ember.snapshotter.lvmshell`): an lvm process's start-up costs more
than most of the commands it runs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ember.errors import EmberError
from ember.snapshotter.backend import DEFAULT_IMAGE_SIZE, Backend, MountSpec
from ember.snapshotter.lvmshell import LvmError, OneShot, Runner, lv_rows, open_runner
from ember.snapshotter.usage import used_inodes
from ember.util import atomic_write_json

log = logging.getLogger(__name__)

STATE_FILE = "lvm.json"
TAG = "ember-snapshotter"
# Refuse new snapshots past this fill of the pool's data or metadata: a
# thin pool that runs out mid-write fails I/O inside running containers.
FULL_PERCENT = 90.0
# LVM's rule for VG and LV names (lvm(8), "VALID NAMES"), less the leading '-'.
_NAME = re.compile(r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]{0,126}$")
_RESERVED = re.compile(r"^(\.|\.\.|snapshot|pvmove)$|_(cdata|cmeta|corig|mlog|mimage|pmspare|"
                       r"rimage|rmeta|tdata|tmeta|vorigin|vdata)")
_TEMPLATE, _TEMPLATE_NEW = "empty", "empty.new"
# lvs columns the backend reads, in this order (a row is a list of them).
_COLUMNS = ("lv_name", "lv_size", "data_percent", "lv_attr", "lv_tags")


def check_name(kind: str, name: str) -> str:
    """A volume group / thin pool name LVM accepts, or a one-line error."""
    if not _NAME.match(name) or _RESERVED.search(name):
        raise EmberError(f"{kind} {name!r} is not a valid LVM name "
                         "(letters, digits, '+', '_', '.', '-'; not starting with '-')")
    return name


@dataclass
class PoolStatus:
    size: int  # bytes of data space
    data_percent: float
    metadata_percent: float

    @property
    def free(self) -> int:
        return int(self.size * (100.0 - self.data_percent) / 100.0)


def pool_status(vg: str, pool: str, runner: Runner | None = None) -> PoolStatus:
    """Size and fill of a thin pool, or a one-line error if it is not one."""
    rows = lv_rows((runner or OneShot()).run(
        "lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
        "-o", "lv_attr,lv_size,data_percent,metadata_percent", f"{vg}/{pool}",
        what=f"reading thin pool {vg}/{pool}"))
    if not rows:
        raise LvmError(f"reading thin pool {vg}/{pool}: lvs printed nothing")
    row = rows[0]
    if not row.get("lv_attr", "").startswith("t"):
        raise LvmError(f"{vg}/{pool} is not a thin pool (lv_attr {row.get('lv_attr')})")
    return PoolStatus(int(row["lv_size"]), float(row.get("data_percent") or 0),
                      float(row.get("metadata_percent") or 0))


def _dm_name(vg: str, lv: str) -> str:
    """device-mapper's name for VG/LV (LVM doubles the '-' in each part)."""
    return f"{vg.replace('-', '--')}-{lv.replace('-', '--')}"


def pool_fill(vg: str, pool: str, runner: Runner | None = None) -> PoolStatus:
    """The pool's fill from the kernel (``dmsetup status``: no VG metadata scan,
    a few ms against lvs' hundreds under TCG); lvs when the pool is inactive.

    The thin-pool status line: ``<transaction> <used>/<total metadata blocks>
    <used>/<total data blocks> ...``.
    """
    proc = subprocess.run(["dmsetup", "status", _dm_name(vg, pool) + "-tpool"],
                          capture_output=True, text=True, check=False)
    fields = proc.stdout.split()
    if proc.returncode == 0 and len(fields) >= 6 and fields[2] == "thin-pool":
        try:
            meta_used, meta_total = (int(x) for x in fields[4].split("/"))
            data_used, data_total = (int(x) for x in fields[5].split("/"))
            size = int(fields[1]) * 512
            return PoolStatus(size, 100.0 * data_used / data_total,
                              100.0 * meta_used / meta_total)
        except (ValueError, ZeroDivisionError):
            pass
    return pool_status(vg, pool, runner)


def release_root(root: Path) -> tuple[int, str]:
    """Remove every thin LV of ``root`` (uninstall, before the root is deleted).

    The LVs hold the root's snapshots outside of it, so deleting the folder
    alone would leave them in the pool with nothing to find them by. Only the
    names with this root's token are touched; an LV still open (a mounted
    snapshot, a running VM's disk) fails the call with lvm's message.
    Returns how many were removed and the pool's name.
    """
    path = root / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return 0, ""
    except (OSError, ValueError) as exc:
        raise EmberError(f"snapshotter state {path} is unreadable: {exc}") from None
    vg = check_name("volume group", str(state.get("volume_group", "")))
    token = str(state.get("token", ""))
    if not re.fullmatch(r"[0-9a-f]{8}", token):
        raise EmberError(f"snapshotter state {path}: bad token {token!r}")
    runner = OneShot()
    rows = lv_rows(runner.run("lvs", "--reportformat", "json", "-o", "lv_name", vg,
                              what=f"listing LVs of {vg}"))
    names = [r["lv_name"] for r in rows if r.get("lv_name", "").startswith(f"ember-{token}-")]
    if names:
        runner.run("lvremove", "-q", "-f", *(f"{vg}/{n}" for n in names),
                   what=f"removing the {len(names)} LVs of {root}")
    return len(names), f"{vg}/{state.get('thin_pool', '')}"


class LvmBackend(Backend):
    """Thin LVs ``VG/ember-<token>-<id>`` in the thin pool ``VG/POOL``."""

    name = "lvm"

    def __init__(self, root: Path, vg: str, pool: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 ) -> None:
        self.vg = check_name("volume group", vg)
        self.pool = check_name("thin pool", pool)
        self.image_size = image_size
        self.lvm = open_runner()
        # Fails at start, not later.
        self._fresh: PoolStatus | None = pool_status(vg, pool, self.lvm)
        self.token = self._token(root)
        self.prefix = f"ember-{self.token}-"
        self._measured: dict[int, int] = {}

    def _token(self, root: Path) -> str:
        """This root's LV name prefix, fixed at its first start with a VG and pool.

        A root made for another VG or pool is refused: its metadata names LVs
        that are not there, and start-up would mark every snapshot broken.
        """
        path = root / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            state = {"token": secrets.token_hex(4), "volume_group": self.vg,
                     "thin_pool": self.pool}
            atomic_write_json(path, state)
        except (OSError, ValueError) as exc:
            raise EmberError(f"snapshotter state {path} is unreadable: {exc}") from None
        if (state.get("volume_group"), state.get("thin_pool")) != (self.vg, self.pool):
            raise EmberError(
                f"{root} holds snapshots of thin pool {state.get('volume_group')}/"
                f"{state.get('thin_pool')}, not {self.vg}/{self.pool}; use another --root")
        token = str(state.get("token", ""))
        if not re.fullmatch(r"[0-9a-f]{8}", token):
            raise EmberError(f"snapshotter state {path}: bad token {token!r}")
        return token

    # -- names ---------------------------------------------------------------

    def lv(self, sid: int) -> str:
        return f"{self.prefix}{int(sid)}"

    def device(self, sid: int) -> str:
        return f"/dev/{self.vg}/{self.lv(sid)}"

    def _ref(self, name: str) -> str:
        return f"{self.vg}/{name}"

    # -- the template every base layer starts from -----------------------------

    def _template(self) -> str:
        name = self.prefix + _TEMPLATE
        if name in self._names():
            return name
        new = self.prefix + _TEMPLATE_NEW
        self._remove_lv(new)
        self.lvm.run("lvcreate", "-q", "--type", "thin", "--thinpool", self.pool, "-V",
                     f"{self.image_size}b", "-n", new, "--addtag", TAG, self.vg,
                     what="creating the empty template LV")
        dev = f"/dev/{self.vg}/{new}"
        # Options as the reflink backend's template: no reserved blocks, no
        # lost+found (a container rootfs has none); discard tells the pool
        # nothing is mapped yet, so the template costs no data space.
        _tool(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-m", "0", "-J", "size=16",
               "-E", "root_owner=0:0,discard", "-L", "ember-rootfs", dev], "mkfs.ext4 for the template")
        _tool(["debugfs", "-w", "-R", "rmdir lost+found", dev], "debugfs on the template")
        self.lvm.run("lvchange", "-q", "-pr", "-an",
                     "--addtag", f"ember.inodes={used_inodes(Path(dev))}",
                     "--addtag", f"ember.mapped={self._mapped(self._lvs(new).get(new))}",
                     self._ref(new), what="sealing the template LV")
        self.lvm.run("lvrename", "-q", self.vg, new, name, what="naming the template LV")
        return name

    # -- Backend -------------------------------------------------------------

    def create(self, sid: int) -> None:
        self._snapshot(self._template(), sid)

    def clone(self, parent: int, sid: int) -> None:
        self._snapshot(self.lv(parent), sid)

    def _snapshot(self, origin: str, sid: int) -> None:
        # -kn -ay: thin snapshots skip activation by default; this one is used.
        # -prw: writable whatever the (read-only, committed) origin is.
        self.lvm.run("lvcreate", "-q", "--snapshot", "-kn", "-ay", "-prw", "-n", self.lv(sid),
                     "--addtag", TAG, self._ref(origin), what=f"creating LV {self.lv(sid)}")

    def remove(self, sid: int) -> None:
        self._remove_lv(self.lv(sid))

    def _remove_lv(self, name: str) -> None:
        try:
            self.lvm.run("lvremove", "-q", "-f", self._ref(name), what=f"removing LV {name}")
        except LvmError as exc:
            if "Failed to find logical volume" not in exc.message:
                raise

    def seal(self, sid: int) -> None:
        fd = os.open(self.device(sid), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def committed(self, sid: int, row: list[str] | None = None) -> None:
        """After the commit is recorded: the LV becomes read-only and inactive.

        Its inode count goes into a tag, since its children's usage is counted
        against it and an inactive LV's filesystem cannot be read. Fresh from
        Commit (no ``row``) that is one lvchange. Otherwise (that lvchange
        failed, or start-up's reconcile found the LV half done) it goes step by
        step from the LV's state: lvchange refuses a change already made (it
        may have made the LV read-only before refusing to deactivate one still
        mounted), and a tag already there keeps its value.
        """
        name = self.lv(sid)
        ref, what = self._ref(name), f"making LV {name} read-only"
        if row is None:
            try:
                self.lvm.run("lvchange", "-q", "-pr", "-an", *_addtags(self._tags(sid, None)),
                             ref, what=what)
                return
            except LvmError as exc:
                log.warning("%s; finishing it step by step", exc.message)
            row = self._lvs(name).get(name)
            if row is None:
                raise LvmError(f"{what}: the LV is gone")
        have = {tag.split("=", 1)[0] for tag in row[4].split(",") if tag}
        todo = [] if row[3][1:2] == "r" else ["-pr"]
        todo += _addtags(t for t in self._tags(sid, row) if t.split("=", 1)[0] not in have)
        if todo:
            self.lvm.run("lvchange", "-q", *todo, ref, what=what)
        if row[3][4:5] == "a":
            try:
                self.lvm.run("lvchange", "-q", "-an", ref, what=f"deactivating LV {name}")
            except LvmError as exc:
                # Still open (mounted somewhere): read-only is what matters;
                # the next start deactivates it.
                log.warning("%s; keeping it active, read-only", exc.message)

    def _tags(self, sid: int, row: list[str] | None) -> list[str]:
        mapped = self._measured.pop(sid, None)  # Commit has just asked usage()
        if mapped is None:
            mapped = self._mapped(row or self._lvs(self.lv(sid)).get(self.lv(sid)))
        return [f"ember.inodes={used_inodes(Path(self.device(sid)))}", f"ember.mapped={mapped}"]

    def mounts(self, sid: int, readonly: bool) -> list[MountSpec]:
        # A block device node: containerd mounts it on the host as it is, and
        # Ember's shim attaches the device itself to the VM (no copy, no loop).
        return [MountSpec("ext4", self.device(sid), ["ro" if readonly else "rw"])]

    def _lvs(self, *names: str) -> dict[str, list[str]]:
        doc = self.lvm.run("lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                           "-o", ",".join(_COLUMNS),
                           *(self._ref(n) for n in names) if names else (self.vg,),
                           what=f"listing LVs of {self.vg}")
        return {row["lv_name"]: [row.get(c, "") for c in _COLUMNS] for row in lv_rows(doc)}

    def _names(self) -> set[str]:
        return {n for n in self._lvs() if n.startswith(self.prefix)}

    @classmethod
    def _mapped(cls, row: list[str] | None) -> int:
        """Pool bytes an LV maps: lvs knows it only while the LV is active, so a
        committed (inactive) LV carries it in a tag written at commit."""
        if row and row[2]:
            return int(int(row[1]) * float(row[2]) / 100.0)
        return cls._tag(row, "ember.mapped") or 0

    @staticmethod
    def _tag(row: list[str] | None, key: str) -> int | None:
        for tag in (row[4].split(",") if row and len(row) > 4 else []):
            if tag.startswith(f"{key}="):
                return int(tag.split("=", 1)[1])
        return None

    def usage(self, sid: int, parent: int | None) -> tuple[int, int]:
        """Bytes: the pool data this LV maps less what its origin maps (from
        lvs data percent); inodes: the filesystem's count less the origin's,
        which is kept in an LV tag at commit since a committed LV is inactive."""
        origin = self.lv(parent) if parent is not None else self.prefix + _TEMPLATE
        rows = self._lvs(self.lv(sid), origin)
        me, base = rows.get(self.lv(sid)), rows.get(origin)
        self._measured = {sid: self._mapped(me)}
        size = max(0, self._mapped(me) - self._mapped(base))
        inodes = used_inodes(Path(self.device(sid))) if me and me[3][4:5] == "a" else 0
        base_inodes = self._tag(base, "ember.inodes") or 0
        return size, max(0, inodes - base_inodes)

    def stored_ids(self) -> set[int]:
        ids = set()
        for name in self._names():
            rest = name[len(self.prefix):]
            if rest.isdigit():
                ids.add(int(rest))
        return ids

    def purge_partial(self) -> int:
        new = self.prefix + _TEMPLATE_NEW
        if new in self._names():
            self._remove_lv(new)
            return 1
        return 0

    def free_bytes(self) -> tuple[int, str]:
        # capacity_error has just read the pool before each Prepare: one lvs, not two.
        st, self._fresh = self._fresh or pool_fill(self.vg, self.pool, self.lvm), None
        return st.free, f"thin pool {self.vg}/{self.pool}"

    def capacity_error(self) -> str | None:
        st = self._fresh = pool_fill(self.vg, self.pool, self.lvm)
        for what, pct in (("data", st.data_percent), ("metadata", st.metadata_percent)):
            if pct > FULL_PERCENT:
                return (f"thin pool {self.vg}/{self.pool} {what} is {pct:.1f}% full "
                        f"(over {FULL_PERCENT:.0f}%); extend it (lvextend) or remove snapshots")
        return None

    def close(self) -> None:
        self.lvm.close()

    def reconcile(self, committed: set[int], active: set[int]) -> None:
        """After a crash: committed LVs read-only and inactive, the others writable."""
        rows = self._lvs()
        for sid in committed:
            row = rows.get(self.lv(sid))
            if row and (row[3][1:2] == "w" or row[3][4:5] == "a"):
                self.committed(sid, row)
        for sid in active:
            row = rows.get(self.lv(sid))
            if row and (row[3][1:2] != "w" or row[3][4:5] != "a"):
                self.lvm.run("lvchange", "-q", "-prw", "-ay", "-kn", self._ref(self.lv(sid)),
                             what=f"activating LV {self.lv(sid)}")


def _addtags(tags: Iterable[str]) -> list[str]:
    return [arg for tag in tags for arg in ("--addtag", tag)]


def _tool(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise LvmError(f"{what}: {lines[-1] if lines else f'exit {proc.returncode}'}")
