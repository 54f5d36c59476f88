"""Snapshotter benchmark: prepare latency vs parent size, and unpack time.

1. Prepare latency of an active snapshot on a committed parent holding
   64 MiB, 1 GiB and 4 GiB of data. It must stay flat: a reflink clone is
   O(1). Floor, measured in the same run: a gRPC round trip to the same
   server (Stat) plus a bare FICLONE of the same parent image. For scale,
   one full copy of the 1 GiB parent (what a snapshotter without
   copy-on-write pays).
2. Unpack time of the same image through ember-snapshotter and through
   containerd's overlayfs snapshotter, as a ratio. Each unpack is an import
   minus an import with --no-unpack of the same tar (content ingest only).

    python bench/snapshotter.py [--sizes 64m,1g,4g] [--runs 15] [--unpack-runs 3]

Needs root (loop devices, mounts, containerd). Never gates CI on absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ember.snapshotter.pool import clone_file
from ember.snapshotter.proto import snapshots_pb2 as pb
from ember.util import parse_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # test support
from ember_testing.containerd import ContainerdInstance, proxy_snapshotter  # noqa: E402
from ember_testing.mounts import mounted  # noqa: E402
from ember_testing.oci import Entry, build_oci_archive, busybox_layer, tree_layer  # noqa: E402
from ember_testing.snapshotter import SnapshotterProcess  # noqa: E402


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def fill(root: Path, size: int) -> None:
    """Write ``size`` bytes of real (allocated, non-zero) data into a snapshot."""
    chunk = os.urandom(4 << 20)
    with open(root / "data", "wb") as f:
        left = size
        while left > 0:
            f.write(chunk[:min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())


def extents(path: Path) -> int:
    """How many extents the image has: a clone's work grows with this, not size."""
    out = subprocess.run(["xfs_io", "-r", "-c", "fiemap", str(path)], capture_output=True,
                         text=True).stdout
    return sum(1 for line in out.splitlines()[1:] if "hole" not in line)


def prepare_latency(tmp: Path, sizes: list[int], runs: int) -> None:
    image_size = max(sizes) + (2 << 30)
    sn = SnapshotterProcess(tmp / "sn", pool_size=f"{max(sizes) * 3 + (4 << 30)}",
                            image_size=str(image_size))
    try:
        stub = sn.stub()
        print(f"== prepare latency (median of {runs}, sizes interleaved), "
              "parent = committed layer holding N bytes")
        parents = {}
        for size in sizes:
            name = f"parent-{size}"
            m = stub.Prepare(pb.PrepareSnapshotRequest(key=f"{name}-a")).mounts
            with mounted(m, tmp / "mnt") as root:
                fill(root, size)
            stub.Commit(pb.CommitSnapshotRequest(name=name, key=f"{name}-a"))
            parents[size] = (name, Path(m[0].source))  # committing keeps the image
        os.sync()  # measure prepare, not the writeback of the data just written
        prep: dict[int, list[float]] = {s: [] for s in sizes}
        stat: dict[int, list[float]] = {s: [] for s in sizes}
        clone: dict[int, list[float]] = {s: [] for s in sizes}
        # Round-robin over the sizes so that load from elsewhere hits all alike.
        for i in range(runs):
            for size, (name, img) in parents.items():
                t = time.perf_counter()
                stub.Prepare(pb.PrepareSnapshotRequest(key=f"c-{size}-{i}", parent=name))
                prep[size].append(time.perf_counter() - t)
                t = time.perf_counter()
                stub.Stat(pb.StatSnapshotRequest(key=name))
                stat[size].append(time.perf_counter() - t)
                dst = img.with_name(f".bench-{i}.tmp")
                t = time.perf_counter()
                clone_file(img, dst)
                clone[size].append(time.perf_counter() - t)
                dst.unlink()
                stub.Remove(pb.RemoveSnapshotRequest(key=f"c-{size}-{i}"))
        for size, (_, img) in parents.items():
            p, floor = median_ms(prep[size]), median_ms(stat[size]) + median_ms(clone[size])
            print(f"  parent {size >> 20:>5} MiB ({extents(img):>3} extents): prepare "
                  f"{p:6.2f} ms (min {min(prep[size]) * 1000:.2f}) | floor: Stat RTT "
                  f"{median_ms(stat[size]):.2f} + FICLONE {median_ms(clone[size]):.2f} = "
                  f"{floor:.2f} ms | ratio {p / floor:.2f}")
        small, big = sizes[0], sizes[-1]
        print(f"  flatness: prepare on {big >> 20} MiB / on {small >> 20} MiB = "
              f"{median_ms(prep[big]) / median_ms(prep[small]):.2f} (1.0 = perfectly flat)")
        mid = sizes[len(sizes) // 2]
        img = parents[mid][1]
        t = time.perf_counter()
        subprocess.run(["cp", "--reflink=never", "--sparse=always", str(img),
                        str(img.with_name(".bench-copy.tmp"))], check=True)
        copy_ms = (time.perf_counter() - t) * 1000
        img.with_name(".bench-copy.tmp").unlink()
        print(f"  for scale: a full copy of the {mid >> 20} MiB parent takes {copy_ms:.0f} ms, "
              f"{copy_ms / median_ms(prep[mid]):.0f}x a prepare")
    finally:
        sn.close()


def build_image(tmp: Path) -> Path:
    layers = [busybox_layer(), tree_layer(Path("/usr/lib/python3.11"), "/usr/lib/python3.11"),
              [Entry("/data/blob", os.urandom(32 << 20))]]
    return build_oci_archive(tmp / "bench.tar", "localhost/ember-bench/unpack:1", layers)


def timed_import(ctrd: ContainerdInstance, image: Path, *flags: str) -> float:
    t = time.perf_counter()
    ctrd.ctr("images", "import", *flags, str(image))
    return time.perf_counter() - t


def unpack_ratio(tmp: Path, runs: int) -> None:
    image = build_image(tmp)
    ref = "localhost/ember-bench/unpack:1"
    sn = SnapshotterProcess(tmp / "sn2", pool_size="8g", image_size="4g")
    ctrd = None
    try:
        ctrd = ContainerdInstance(tmp / "ctrd", proxy_snapshotter("ember", sn.address))
        print(f"== unpack of {image.stat().st_size >> 20} MiB image (3 layers, ~1500 files), "
              f"median of {runs}")
        times: dict[str, list[float]] = {"ingest": [], "ember": [], "overlayfs": []}
        for _ in range(runs):
            for what, flags in (("ingest", ("--no-unpack",)),
                                ("ember", ("--snapshotter", "ember")),
                                ("overlayfs", ("--snapshotter", "overlayfs"))):
                times[what].append(timed_import(ctrd, image, *flags))
                ctrd.ctr("images", "rm", "--sync", ref)
        ingest = statistics.median(times["ingest"])
        ember = statistics.median(times["ember"]) - ingest
        overlay = statistics.median(times["overlayfs"]) - ingest
        print(f"  import --no-unpack (floor, content only): {ingest * 1000:7.0f} ms")
        print(f"  unpack via ember-snapshotter:            {ember * 1000:7.0f} ms")
        print(f"  unpack via overlayfs:                    {overlay * 1000:7.0f} ms")
        print(f"  ratio ember / overlayfs: {ember / overlay:.2f}")
    finally:
        if ctrd is not None:
            ctrd.stop()
        sn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64m,1g,4g")
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--unpack-runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/snapshotter.py: run as root (loop devices, mounts, containerd)")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="ember-bench-sn-", dir="/var/tmp") as tmp:
        prepare_latency(Path(tmp), sizes, args.runs)
        unpack_ratio(Path(tmp), args.unpack_runs)


if __name__ == "__main__":
    main()
