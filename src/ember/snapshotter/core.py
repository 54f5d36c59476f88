"""The snapshotter's semantics, independent of gRPC.

containerd's rules (its snapshot test suite and bolt metastore): keys and
committed names share one namespace; only committed snapshots can be parents;
committed snapshots are immutable and cannot be mounted; a snapshot with
children cannot be removed. Errors carry containerd's error class so the
gRPC layer can return the status code containerd's client maps back.

Every call holds one lock: calls are short (a clone is one ioctl), and one
writer at a time keeps the SQLite transaction and the image files in step.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ember.snapshotter import filters
from ember.snapshotter.backend import Backend, MountSpec, is_disk_full
from ember.snapshotter.store import ACTIVE, COMMITTED, KIND_NAMES, VIEW, Record, Store
from ember.util import pause_for_test

log = logging.getLogger(__name__)

NOT_FOUND = "not_found"
ALREADY_EXISTS = "already_exists"
FAILED_PRECONDITION = "failed_precondition"
INVALID_ARGUMENT = "invalid_argument"
RESOURCE_EXHAUSTED = "resource_exhausted"
INTERNAL = "internal"

DEFAULT_MIN_FREE = 128 << 20


class SnapshotError(Exception):
    """A refused call: ``code`` is containerd's error class, ``message`` one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Info:
    name: str
    parent: str
    kind: int
    created: int
    updated: int
    labels: dict[str, str] = field(default_factory=dict)


def _info(r: Record) -> Info:
    return Info(r.key, r.parent, r.kind, r.created, r.updated, dict(r.labels))


def _a(kind: int) -> str:
    name = KIND_NAMES[kind]
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL ourselves at ``name``.

    Set EMBER_SNAPSHOTTER_CRASH_AT=name in the server's environment. A real
    SIGKILL (no cleanup handlers run), at a precise step of a call.
    """
    if os.environ.get("EMBER_SNAPSHOTTER_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _full(exc: BaseException, where: str) -> SnapshotError:
    return SnapshotError(RESOURCE_EXHAUSTED, f"snapshot storage is full ({where}): {exc}")


class Snapshotter:
    """containerd snapshot semantics over a :class:`Store` and a :class:`Backend`."""

    def __init__(self, store: Store, backend: Backend, min_free: int = DEFAULT_MIN_FREE) -> None:
        self.store = store
        self.backend = backend
        self.min_free = min_free
        self.lock = threading.RLock()

    # -- helpers -------------------------------------------------------------

    def _get(self, key: str, what: str = "snapshot") -> Record:
        if not key:
            raise SnapshotError(INVALID_ARGUMENT, f"{what} key is empty")
        rec = self.store.get(key)
        if rec is None:
            raise SnapshotError(NOT_FOUND, f"{what} {key!r} does not exist")
        return rec

    def _usable(self, rec: Record, key: str) -> Record:
        if rec.broken:
            raise SnapshotError(FAILED_PRECONDITION, f"snapshot {key!r} is broken: {rec.broken}; "
                                "remove it")
        return rec

    def _check_space(self) -> None:
        reason = self.backend.capacity_error()
        if reason:
            raise SnapshotError(RESOURCE_EXHAUSTED, reason)
        free, where = self.backend.free_bytes()
        if free < self.min_free:
            # XFS frees the blocks of unlinked files in the background; flush
            # before refusing, or a Prepare right after a Remove would fail.
            os.sync()
            free, where = self.backend.free_bytes()
        if free < self.min_free:
            raise SnapshotError(
                RESOURCE_EXHAUSTED,
                f"snapshot storage is full: {free >> 20} MiB free in {where}, "
                f"{self.min_free >> 20} MiB needed; remove unused images or snapshots")

    # -- calls ---------------------------------------------------------------

    def prepare(self, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        return self._create(ACTIVE, key, parent, labels)

    def view(self, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        return self._create(VIEW, key, parent, labels)

    def _create(self, kind: int, key: str, parent: str, labels: dict[str, str]) -> list[MountSpec]:
        if not key:
            raise SnapshotError(INVALID_ARGUMENT, "snapshot key is empty")
        with self.lock:
            if self.store.get(key) is not None:
                raise SnapshotError(ALREADY_EXISTS, f"snapshot {key!r} already exists")
            parent_id = None
            if parent:
                prec = self._usable(self._get(parent, "parent snapshot"), parent)
                if prec.kind != COMMITTED:
                    raise SnapshotError(
                        INVALID_ARGUMENT,
                        f"parent {parent!r} is {_a(prec.kind)} snapshot; "
                        "only committed snapshots can be parents")
                parent_id = prec.id
            self._check_space()
            sid = None
            try:
                # The image is made inside the transaction: a crash before
                # COMMIT leaves an image without a row, which start-up removes.
                with self.store.tx():
                    sid = self.store.insert(key, parent_id, kind, labels)
                    if parent_id is None:
                        self.backend.create(sid)
                    else:
                        self.backend.clone(parent_id, sid)
                    crash_point("create-before-commit")
                    pause_for_test("snapshotter-created")
            except Exception as exc:
                if sid is not None:
                    self.backend.remove(sid)
                if is_disk_full(exc):
                    raise _full(exc, f"creating {key!r}") from None
                raise
            log.debug("%s %r (id %d) on %r", KIND_NAMES[kind], key, sid, parent)
            return self.backend.mounts(sid, readonly=kind == VIEW)

    def mounts(self, key: str) -> list[MountSpec]:
        with self.lock:
            rec = self._usable(self._get(key), key)
            if rec.kind == COMMITTED:
                raise SnapshotError(
                    FAILED_PRECONDITION,
                    f"snapshot {key!r} is committed; only active snapshots and views have mounts")
            return self.backend.mounts(rec.id, readonly=rec.kind == VIEW)

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        if not name:
            raise SnapshotError(INVALID_ARGUMENT, "committed snapshot name is empty")
        with self.lock:
            if self.store.get(name) is not None:
                raise SnapshotError(ALREADY_EXISTS, f"snapshot {name!r} already exists")
            rec = self._usable(self._get(key, "active snapshot"), key)
            if rec.kind != ACTIVE:
                raise SnapshotError(
                    FAILED_PRECONDITION,
                    f"snapshot {key!r} is {_a(rec.kind)} snapshot, not an active one")
            try:
                self.backend.seal(rec.id)
                size, inodes = self.backend.usage(rec.id, rec.parent_id)
                with self.store.tx():
                    self.store.commit(rec.id, name, labels, size, inodes)
                    crash_point("commit-before-commit")
            except Exception as exc:
                if is_disk_full(exc):
                    raise _full(exc, f"committing {key!r}") from None
                raise
            # Recorded: now the device may become read-only (a crash before
            # this is put right by reconcile at the next start).
            self.backend.committed(rec.id)

    def remove(self, key: str) -> None:
        with self.lock:
            rec = self._get(key)
            n = self.store.children(rec.id)
            if n:
                raise SnapshotError(
                    FAILED_PRECONDITION,
                    f"cannot remove snapshot {key!r}: it is the parent of {n} other snapshot(s)")
            # Row first, image after: a crash in between leaves an orphan
            # image (removed at start-up), never a row without its image.
            with self.store.tx():
                self.store.delete(rec.id)
            crash_point("remove-before-unlink")
            self.backend.remove(rec.id)

    def stat(self, key: str) -> Info:
        with self.lock:
            return _info(self._get(key))

    def update(self, name: str, labels: dict[str, str], paths: list[str]) -> Info:
        with self.lock:
            rec = self._get(name)
            new = dict(rec.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path.startswith("labels."):
                    lkey = path.removeprefix("labels.")
                    if labels.get(lkey):
                        new[lkey] = labels[lkey]
                    else:
                        new.pop(lkey, None)
                elif path == "labels":
                    new = dict(labels)
                else:
                    raise SnapshotError(
                        INVALID_ARGUMENT,
                        f"cannot update field {path!r} of snapshot {name!r}: only labels change")
            with self.store.tx():
                self.store.set_labels(rec.id, {k: v for k, v in new.items() if v})
            return _info(self._get(name))

    def list(self, filter_strings: list[str]) -> Iterator[Info]:
        try:
            match = filters.parse(filter_strings)
        except filters.FilterError as exc:
            raise SnapshotError(INVALID_ARGUMENT, str(exc)) from None
        with self.lock:
            records = self.store.all()
        for r in records:
            if match(filters.fields_of(r.key, r.parent, KIND_NAMES[r.kind], r.labels)):
                yield _info(r)

    def usage(self, key: str) -> tuple[int, int]:
        with self.lock:
            rec = self._get(key)
            if rec.kind == COMMITTED and rec.size is not None:
                return rec.size, rec.inodes or 0
            return self.backend.usage(rec.id, rec.parent_id)

    def cleanup(self) -> int:
        """Delete stored data no snapshot refers to; returns how many items."""
        with self.lock:
            removed = self.backend.purge_partial()
            known = self.store.ids()
            for sid in sorted(self.backend.stored_ids() - known):
                self.backend.remove(sid)
                removed += 1
            return removed

    def recover(self) -> None:
        """Start-up check after any kind of exit, clean or not."""
        with self.lock:
            removed = self.cleanup()
            if removed:
                log.warning("removed %d half-made or orphaned snapshot image(s)", removed)
            stored = self.backend.stored_ids()
            records = self.store.all()
            for rec in records:
                if rec.id not in stored and not rec.broken:
                    reason = f"its {self.backend.name} device {rec.id} is missing"
                    log.error("snapshot %r is broken: %s", rec.key, reason)
                    with self.store.tx():
                        self.store.set_broken(rec.id, reason)
            self.backend.reconcile({r.id for r in records if r.kind == COMMITTED and r.id in stored},
                                   {r.id for r in records if r.kind != COMMITTED and r.id in stored})


def open_snapshotter(data_dir: Path, backend: Backend, min_free: int = DEFAULT_MIN_FREE,
                     ) -> Snapshotter:
    """Open the metadata next to the images and run crash recovery."""
    sn = Snapshotter(Store(data_dir / "metadata.db"), backend, min_free)
    sn.recover()
    return sn
