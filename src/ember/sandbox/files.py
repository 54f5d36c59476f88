"""Files in a running sandbox's container: ``ember cp``, ``Sandbox.files`` and
``-v SRC:DEST:copy``, as tar streams through the guest agent.

There is no filesystem sharing with the guest: the agent runs a helper
chrooted into the container's root (``Archive`` in agent.proto, see
:mod:`ember.agent.archive`) whose stdin or stdout carries a tar stream in
chunks that fit the agent's messages, through the sandbox monitor like every
agent call. A put streams the tar as it is made, a get unpacks it as it
arrives (the helper waits for the reader), so neither side holds a whole tree
in memory. What the guest sends is unpacked on the host with the same checks
the guest applies (:func:`ember.agent.archive.extract` with ``host=True``).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import posixpath
import secrets
import signal
import tarfile
import time
from collections.abc import Callable

from ember.agent import archive
from ember.errors import EmberError, NotFoundError

CHUNK = 1 << 20  # per WriteStdin / ReadStdout: well under the 4 MiB frame


class _SendFailed(Exception):
    """The helper no longer takes the tar (it failed: its exit says why)."""


class _AgentWriter(io.RawIOBase):
    """A write-only file whose bytes go to a process's stdin in CHUNK-sized calls."""

    def __init__(self, agent, cid: str, exec_id: str) -> None:
        self.agent, self.cid, self.exec_id = agent, cid, exec_id
        self.buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        self.buf += data
        while len(self.buf) >= CHUNK:
            self._send(bytes(self.buf[:CHUNK]))
            del self.buf[:CHUNK]
        return len(data)

    def _send(self, data: bytes) -> None:
        try:
            self.agent.write_stdin(self.cid, self.exec_id, data)
        except EmberError as exc:
            raise _SendFailed(str(exc)) from None

    def finish(self) -> None:
        if self.buf:
            self._send(bytes(self.buf))
            self.buf.clear()
        self.close_stdin()

    def close_stdin(self) -> None:
        try:
            self.agent.close_stdin(self.cid, self.exec_id)
        except EmberError:
            pass


class _AgentReader(io.RawIOBase):
    """A read-only file over a process's stdout, read from the agent by offset.

    A stream that ends before EOF (the helper gone, the agent closed) raises
    what ended it: a cut-off tar must not pass for a whole one.
    """

    def __init__(self, agent, cid: str, exec_id: str) -> None:
        self.output = agent.iter_output(cid, exec_id, "stdout", wait_ms=1000, max_bytes=CHUNK)
        self.chunks = iter(self.output)
        self.pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if not self.pending:
            self.pending = next(self.chunks, b"")
            if not self.pending and self.output.cause is not None:
                raise self.output.cause
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n


class Files:
    """``sandbox.files``: read, write and list files in the running container.

    Paths are absolute inside the container (its volumes and tmpfs mounts
    included); ``..`` and symlinks resolve inside the container's root.
    """

    def __init__(self, sandbox, starting: bool = False) -> None:
        self.sandbox = sandbox
        self.starting = starting  # the container is created, not started (-v ...:copy)

    # ------------------------------------------------------------ streams
    def _start(self, op: str, path: str) -> tuple[object, str]:
        sb = self.sandbox
        if not self.starting:
            sb._require_running()
        try:
            path = archive.check_request(op, path)
        except archive.ArchiveError as exc:
            raise EmberError(str(exc)) from None
        agent = sb.agent()
        exec_id = "archive-" + secrets.token_hex(6)
        agent.archive(sb.id, exec_id, op, path)
        return agent, exec_id

    def _outcome(self, agent, exec_id: str, path: str) -> None:
        code = agent.wait_process(self.sandbox.id, exec_id).exit_status
        if code == 0:
            return
        err = b""
        for data in agent.iter_output(self.sandbox.id, exec_id, "stderr", wait_ms=1000):
            err += data
            if len(err) > 4096:
                break
        msg = err.decode(errors="replace").strip().splitlines()
        text = msg[-1] if msg else f"copy helper exited {code}"
        label = self.sandbox.name or self.sandbox.id[:12]
        cls = NotFoundError if code == 2 else EmberError
        raise cls(f"sandbox {label}: {text}")

    def put(self, op: str, path: str, produce: Callable[[io.RawIOBase], None]) -> None:
        """Send the tar that ``produce(file)`` writes; op is put, put-into or put-as."""
        agent, exec_id = self._start(op, path)
        writer = _AgentWriter(agent, self.sandbox.id, exec_id)
        try:
            produce(writer)
            writer.finish()
        except _SendFailed:
            pass  # the helper stopped reading: its own error says why, below
        except BaseException:
            writer.close_stdin()  # a cut-off tar: the helper stops with an error
            self._stop(agent, exec_id)
            raise
        self._outcome(agent, exec_id, path)

    def get(self, path: str, consume: Callable[[io.RawIOBase], None]) -> None:
        """Hand the tar of path to ``consume(file)``."""
        agent, exec_id = self._start("get", path)
        reader = _AgentReader(agent, self.sandbox.id, exec_id)
        try:
            consume(reader)
            while reader.read(CHUNK):  # the rest (tar padding): the helper ends
                pass
        except (archive.ArchiveError, tarfile.TarError, OSError) as exc:
            if not self._stop(agent, exec_id):
                self._outcome(agent, exec_id, path)  # it failed first: its error says why
            raise EmberError(f"copying {path} out of sandbox "
                             f"{self.sandbox.name or self.sandbox.id[:12]}: {exc}") from None
        except BaseException:
            self._stop(agent, exec_id)
            raise
        self._outcome(agent, exec_id, path)

    def _stop(self, agent, exec_id: str) -> bool:
        """SIGKILL a helper the host gave up on; True if it was still running."""
        try:
            agent.signal_process(self.sandbox.id, exec_id, int(signal.SIGKILL))
        except EmberError:
            return False  # it had ended already
        try:
            agent.wait_process(self.sandbox.id, exec_id)
        except EmberError:
            pass
        return True

    # ----------------------------------------------------------- the API
    def write(self, path: str, data: bytes | str, mode: int = 0o644, uid: int = 0,
              gid: int = 0) -> None:
        """Create or replace the file path (its folders are made as needed)."""
        if isinstance(data, str):
            data = data.encode()

        def produce(out) -> None:
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                ti = tarfile.TarInfo(posixpath.basename(path.rstrip("/")) or "file")
                ti.size, ti.mode, ti.uid, ti.gid = len(data), mode, uid, gid
                ti.mtime = int(time.time())
                tar.addfile(ti, io.BytesIO(data))

        self.put("put-as", path, produce)

    def read(self, path: str) -> bytes:
        """The content of the regular file path."""
        found: list[bytes] = []

        def consume(src) -> None:
            with tarfile.open(fileobj=src, mode="r|") as tar:
                for ti in tar:
                    if not found:
                        if not ti.isreg():
                            raise archive.ArchiveError(f"{path} is not a regular file")
                        found.append(tar.extractfile(ti).read())  # type: ignore[union-attr]
                        return

        self.get(path, consume)
        return found[0]

    def list(self, path: str = "/") -> builtins.list[dict]:
        """The entries of the folder path (or path itself if it is not a folder):
        dicts with name, type (file, dir, symlink, other), size, mode, uid, gid,
        mtime and, for a symlink, target."""
        agent, exec_id = self._start("list", path)
        reader = _AgentReader(agent, self.sandbox.id, exec_id)
        raw = reader.readall()
        self._outcome(agent, exec_id, path)
        return json.loads(raw or b"[]")

    # -------------------------------------------------------- host trees
    def copy_in(self, src: str, dest: str, op: str = "put") -> None:
        """Copy the host file or folder src to dest in the container (docker cp's
        rules: into dest if it is a folder, else as dest; ``src/.`` copies a
        folder's contents)."""
        if not os.path.lexists(src.rstrip("/.") or "/"):
            raise NotFoundError(f"no such file or directory on the host: {src}")
        top = archive.top_name(src)
        self.put(op, dest, lambda out: _pack_host(out, src, top))

    def copy_out(self, src: str, dest: str) -> builtins.list[str]:
        """Copy src in the container to the host path dest (the same rules);
        the names skipped (device nodes)."""
        dest = os.path.abspath(dest)
        if os.path.isdir(dest):
            into, rename = dest, None
        else:
            into, rename = os.path.dirname(dest), os.path.basename(dest)
            if not os.path.isdir(into):
                raise NotFoundError(f"no such folder on the host: {into}")
        skipped: list[str] = []
        self.get(src, lambda s: skipped.extend(archive.extract(s, into, rename, host=True)))
        return skipped


def _pack_host(out, src: str, top: str) -> None:
    try:
        archive.pack(out, src, top)
    except FileNotFoundError:
        raise NotFoundError(f"no such file or directory on the host: {src}") from None

