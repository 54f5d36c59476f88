"""ember-snapshotter killed with SIGKILL mid-call: on restart the store is
consistent, half-made snapshots are gone and nothing committed is lost.

Two ways in: a SIGKILL at each precise step between "image made" and "row
written" (EMBER_SNAPSHOTTER_CRASH_AT, a real SIGKILL the server sends itself),
and SIGKILLs at random moments under a busy client.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time

import grpc
import pytest
from ember_testing.mounts import mounted
from ember_testing.snapshotter import running_snapshotter

from ember.snapshotter.proto import snapshots_pb2 as pb
from ember.snapshotter.proto import snapshots_pb2_grpc

pytestmark = [pytest.mark.root, pytest.mark.timeout(180),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mount)")]


@pytest.fixture
def sn(tmp_path):
    with running_snapshotter(tmp_path) as proc:
        yield proc


def listing(stub):
    return {i.name: (i.kind, i.parent) for r in stub.List(pb.ListSnapshotsRequest())
            for i in r.info}


def stored_ids(sn):
    """(ids in the metadata, ids of image files) — must be equal at rest."""
    db = sqlite3.connect(sn.root / "pool" / "metadata.db")
    try:
        rows = {r[0] for r in db.execute("SELECT id FROM snapshots")}
    finally:
        db.close()
    files = {int(n.split(".")[0]) for n in sn.images() if n.endswith(".ext4") and
             n[0].isdigit()}
    return rows, files


def setup_base(stub, tmp_path):
    m = stub.Prepare(pb.PrepareSnapshotRequest(key="base-a")).mounts
    with mounted(m, tmp_path / "m") as root:
        (root / "data").write_text("committed data\n")
    stub.Commit(pb.CommitSnapshotRequest(name="base", key="base-a"))
    stub.Prepare(pb.PrepareSnapshotRequest(key="work", parent="base"))


def crash_during(sn, point, call):
    sn.stop()
    sn.start(env={"EMBER_SNAPSHOTTER_CRASH_AT": point})
    with pytest.raises(grpc.RpcError) as exc:
        call(sn.stub())
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    sn.proc.wait(10)
    assert sn.proc.returncode == -9  # SIGKILL
    sn.start()
    return sn.stub()


def check_consistent(sn, tmp_path):
    stub = sn.stub()
    view = stub.View(pb.ViewSnapshotRequest(key="check", parent="base")).mounts
    with mounted(view, tmp_path / "v") as root:
        assert (root / "data").read_text() == "committed data\n"
    stub.Remove(pb.RemoveSnapshotRequest(key="check"))
    sn.stop()
    rows, files = stored_ids(sn)
    assert rows == files


def test_crash_while_creating_removes_the_half_made_snapshot(sn, tmp_path):
    setup_base(sn.stub(), tmp_path)
    stub = crash_during(sn, "create-before-commit",
                        lambda s: s.Prepare(pb.PrepareSnapshotRequest(key="new", parent="base")))
    assert listing(stub) == {"base": (pb.COMMITTED, ""), "work": (pb.ACTIVE, "base")}
    assert "removed 1 half-made" in sn.log_tail()
    # The key is free again: containerd can retry.
    stub.Prepare(pb.PrepareSnapshotRequest(key="new", parent="base"))
    check_consistent(sn, tmp_path)


def test_crash_while_committing_leaves_the_snapshot_active(sn, tmp_path):
    setup_base(sn.stub(), tmp_path)
    stub = crash_during(sn, "commit-before-commit",
                        lambda s: s.Commit(pb.CommitSnapshotRequest(name="done", key="work")))
    assert listing(stub) == {"base": (pb.COMMITTED, ""), "work": (pb.ACTIVE, "base")}
    stub.Commit(pb.CommitSnapshotRequest(name="done", key="work"))
    assert listing(stub)["done"] == (pb.COMMITTED, "base")
    check_consistent(sn, tmp_path)


def test_crash_while_removing_deletes_the_orphan_image(sn, tmp_path):
    setup_base(sn.stub(), tmp_path)
    stub = crash_during(sn, "remove-before-unlink",
                        lambda s: s.Remove(pb.RemoveSnapshotRequest(key="work")))
    assert listing(stub) == {"base": (pb.COMMITTED, "")}
    assert "removed 1 half-made or orphaned" in sn.log_tail()
    check_consistent(sn, tmp_path)


def test_random_sigkills_under_load_lose_nothing_committed(sn, tmp_path):
    setup_base(sn.stub(), tmp_path)
    committed: set[str] = {"base"}
    rng = random.Random(4)
    for round_ in range(4):
        stop = threading.Event()

        def worker(stub, r=round_, stop=stop):
            i = 0
            while not stop.is_set():
                key = f"r{r}-{i}"
                i += 1
                try:
                    stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent="base"))
                    stub.Commit(pb.CommitSnapshotRequest(name=f"{key}-c", key=f"{key}"))
                    committed.add(f"{key}-c")
                    if i % 3 == 0:
                        # Once a Remove is sent, the snapshot may be gone even
                        # if the answer never comes back.
                        committed.discard(f"{key}-c")
                        stub.Remove(pb.RemoveSnapshotRequest(key=f"{key}-c"))
                except grpc.RpcError:
                    return

        channel = grpc.insecure_channel(f"unix:{sn.address}")
        t = threading.Thread(target=worker, args=(snapshots_pb2_grpc.SnapshotsStub(channel),))
        t.start()
        time.sleep(rng.uniform(0.1, 0.4))
        sn.kill()
        stop.set()
        t.join(10)
        channel.close()
        sn.start()
        names = set(listing(sn.stub()))
        assert committed <= names, f"lost committed snapshots: {committed - names}"
    check_consistent(sn, tmp_path)
