"""Run a real ``ember-snapshotter`` process for tests and benchmarks.

    sn = SnapshotterProcess(tmp_path / "sn", pool_size="1g")
    stub = sn.stub()            # containerd.services.snapshots.v1.Snapshots
    sn.kill()                   # SIGKILL, as a crash would
    sn.start()                  # restart on the same root
    sn.close()                  # stop, unmount the pool, detach loop devices

Started as ``python -m ember.snapshotter.main`` so it works before the console
script is installed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from ember.snapshotter.proto import snapshots_pb2_grpc
from ember_testing.mounts import cleanup_under, mounts_under, wait_loops_gone


class SnapshotterProcess:
    """An ember-snapshotter serving ``DIR/root`` on ``DIR/snapshotter.sock``."""

    def __init__(self, tmpdir: str | os.PathLike, *args: str, pool_size: str = "2g",
                 image_size: str = "1g", start: bool = True) -> None:
        self.dir = Path(tmpdir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.root = self.dir / "root"
        self.address = self.dir / "snapshotter.sock"
        self.log_path = self.dir / "snapshotter.log"
        self.args = ["--pool-size", pool_size, "--image-size", image_size, *args]
        self.proc: subprocess.Popen | None = None
        self._channel: grpc.Channel | None = None
        if start:
            self.start()

    def start(self, timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        """Start (or restart) the server; ``env`` adds environment variables."""
        self._drop_channel()  # a channel to the old process would keep failing
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ember.snapshotter.main", "--root", str(self.root),
                 "--address", str(self.address), "--log-level", "debug", *self.args],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ember-snapshotter exited ({self.proc.returncode}):\n"
                                   f"{self.log_tail()}")
            if self._accepting():
                return
            time.sleep(0.05)
        raise RuntimeError(f"ember-snapshotter did not start:\n{self.log_tail()}")

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.address))
                return True
            except OSError:
                return False

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(f"unix:{self.address}")
        return self._channel

    def stub(self) -> snapshots_pb2_grpc.SnapshotsStub:
        return snapshots_pb2_grpc.SnapshotsStub(self.channel())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _drop_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, exactly like a crash."""
        self._drop_channel()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        self._drop_channel()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def images(self) -> list[str]:
        """Snapshot image files present on disk (to check for orphans)."""
        for d in (self.root / "pool" / "images", self.root / "images"):
            if d.is_dir():
                return sorted(p.name for p in d.iterdir())
        return []

    def close(self) -> list[str]:
        """Stop, then unmount the pool and detach every loop device under it."""
        self.stop()
        return cleanup_under(self.dir)


@contextlib.contextmanager
def running_snapshotter(tmpdir: str | os.PathLike, *args: str, **kw) -> Iterator[SnapshotterProcess]:
    """A SnapshotterProcess in ``tmpdir/sn``, closed on exit; then checks that
    nothing is left mounted or attached under ``tmpdir``."""
    proc = SnapshotterProcess(Path(tmpdir) / "sn", *args, **kw)
    try:
        yield proc
    finally:
        proc.close()
        left = list(wait_loops_gone(Path(tmpdir))) + mounts_under(Path(tmpdir))
        assert not left, f"left behind: {left}"
