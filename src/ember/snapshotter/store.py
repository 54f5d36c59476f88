"""Snapshot metadata in SQLite: one row per snapshot, written crash-safely.

WAL journal with ``synchronous=FULL``: a transaction that returned is on disk,
one that did not is gone, whatever kills the process. The snapshotter makes a
snapshot's image *inside* the transaction that inserts its row and removes the
image only *after* the transaction that deletes its row, so after a crash the
only possible leftovers are image files without a row, which start-up deletes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

VIEW, ACTIVE, COMMITTED = 1, 2, 3
KIND_NAMES = {VIEW: "view", ACTIVE: "active", COMMITTED: "committed"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL UNIQUE,
    parent   INTEGER REFERENCES snapshots(id),
    kind     INTEGER NOT NULL,
    created  INTEGER NOT NULL,   -- nanoseconds since the epoch, UTC
    updated  INTEGER NOT NULL,
    labels   TEXT NOT NULL DEFAULT '{}',
    size     INTEGER,            -- usage, fixed when the snapshot is committed
    inodes   INTEGER,
    broken   TEXT                -- why its device is unusable (set at start-up)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""

_SELECT = """
SELECT s.id, s.key, s.parent, p.key, s.kind, s.created, s.updated, s.labels, s.size, s.inodes,
       s.broken
FROM snapshots s LEFT JOIN snapshots p ON p.id = s.parent
"""


@dataclass
class Record:
    id: int
    key: str
    parent_id: int | None
    parent: str
    kind: int
    created: int
    updated: int
    labels: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    inodes: int | None = None
    broken: str | None = None


def _record(row: tuple) -> Record:
    return Record(row[0], row[1], row[2], row[3] or "", row[4], row[5], row[6],
                  json.loads(row[7]), row[8], row[9], row[10])


class Store:
    """The metadata database. Not thread-safe: the snapshotter serialises calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(snapshots)")}
        if "broken" not in columns:  # a database made before the column existed
            self.db.execute("ALTER TABLE snapshots ADD COLUMN broken TEXT")

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[None]:
        """One write transaction; rolled back if the body raises."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def get(self, key: str) -> Record | None:
        row = self.db.execute(_SELECT + " WHERE s.key = ?", (key,)).fetchone()
        return _record(row) if row else None

    def all(self) -> list[Record]:
        return [_record(r) for r in self.db.execute(_SELECT + " ORDER BY s.id")]

    def ids(self) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT id FROM snapshots")}

    def children(self, sid: int) -> int:
        return self.db.execute("SELECT count(*) FROM snapshots WHERE parent = ?",
                               (sid,)).fetchone()[0]

    def insert(self, key: str, parent: int | None, kind: int, labels: dict[str, str]) -> int:
        now = time.time_ns()
        cur = self.db.execute(
            "INSERT INTO snapshots (key, parent, kind, created, updated, labels)"
            " VALUES (?, ?, ?, ?, ?, ?)", (key, parent, kind, now, now, json.dumps(labels)))
        sid = cur.lastrowid
        if sid is None:  # sqlite3 sets it after every INSERT that made a row
            raise sqlite3.DatabaseError(f"snapshot {key}: the INSERT made no row")
        return sid

    def commit(self, sid: int, name: str, labels: dict[str, str], size: int, inodes: int) -> None:
        now = time.time_ns()
        self.db.execute(
            "UPDATE snapshots SET key = ?, kind = ?, created = ?, updated = ?, labels = ?,"
            " size = ?, inodes = ? WHERE id = ?",
            (name, COMMITTED, now, now, json.dumps(labels), size, inodes, sid))

    def set_labels(self, sid: int, labels: dict[str, str]) -> None:
        self.db.execute("UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
                        (json.dumps(labels), time.time_ns(), sid))

    def set_broken(self, sid: int, reason: str) -> None:
        self.db.execute("UPDATE snapshots SET broken = ? WHERE id = ?", (reason, sid))

    def delete(self, sid: int) -> None:
        self.db.execute("DELETE FROM snapshots WHERE id = ?", (sid,))
