"""A sandbox's log files: ``container.log`` capped and rotated, ``console.log`` capped.

``container.log`` holds the container's output as JSON lines, one record per
chunk of output, the bytes base64-encoded so any output round-trips::

    {"stream": "stdout", "time": 1700000000.25, "b64": "aGkK"}

:class:`RotatingLog` (the monitor's writer) rotates it as Docker's json-file
driver does: when the next record would take ``container.log`` past
``max_size`` the file becomes ``container.log.1`` (``.1`` becomes ``.2``, and
so on), the file that would be number ``max_files`` is dropped, and a new
``container.log`` starts. Records are never split across files, and a chunk
of output is cut into records that each fit in ``max_size``.
:func:`read_log` (``ember logs``) reads the rotated files oldest first, then
the current one, in bounded chunks, and with ``follow`` keeps reading across
rotations; it trusts a look at the files only when a second look agrees,
because the writer may rename them meanwhile.

The sandbox folder is also the jailed VMM's ``/run`` and belongs to its uid,
so anything in it may have been swapped for a symbolic link, a FIFO or a
directory: every file here is opened with ``O_NOFOLLOW`` (and non-blocking)
and must be a regular file; new files are made ``O_EXCL`` and mode 0600 (the
output can hold secrets), and renames never follow links.

:func:`cap_console` keeps the guest console log (written by the VMM through
an ``O_APPEND`` descriptor) under a size: its newest half moves to
``console.log.1`` and the file is truncated in place.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ember.errors import EmberError

LOG_NAME = "container.log"
CONSOLE_NAME = "console.log"
RECORD_DATA_MAX = 64 << 10  # bytes of output per record (a line of about 87 KiB)
RECORD_OVERHEAD = 128  # JSON around the base64 text, with room to spare
READ_CHUNK = 64 << 10
MAX_LINE = 8 << 20  # longer lines are not records we wrote: skipped, never buffered
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(path: Path, flags: int, mode: int = 0o600) -> int:
    """os.open with O_NOFOLLOW; refuses anything but a regular file (EmberError)."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise EmberError(f"refusing {path}: it is a symbolic link") from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a FIFO or socket; a directory
            raise EmberError(f"refusing {path}: not a regular file") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise EmberError(f"refusing {path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def encode_record(stream: str, data: bytes, now: float | None = None) -> bytes:
    record = {"stream": stream, "time": time.time() if now is None else now,
              "b64": base64.b64encode(data).decode()}
    return json.dumps(record).encode() + b"\n"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# ------------------------------------------------------------------- writing

class RotatingLog:
    """container.log's writer: whole records, rotated past max_size; thread-safe."""

    def __init__(self, path: Path, max_size: int, max_files: int) -> None:
        self.path = Path(path)
        self.max_size = max_size
        self.max_files = max_files
        # Output per record, so that one record always fits in max_size.
        self.chunk = max(1, min(RECORD_DATA_MAX, (max_size - RECORD_OVERHEAD) * 3 // 4))
        self._lock = threading.Lock()
        self._fd = open_regular(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.fchmod(self._fd, 0o600)
            self._size = os.fstat(self._fd).st_size
        except OSError:
            os.close(self._fd)
            raise

    def write(self, stream: str, data: bytes, now: float | None = None) -> None:
        """Append data as one or more records (OSError or EmberError if the disk refuses).

        After :meth:`close`, output is dropped: the monitor is shutting down.
        """
        with self._lock:
            if self._fd < 0:
                return
            for i in range(0, len(data), self.chunk):
                record = encode_record(stream, data[i:i + self.chunk], now)
                if self._size and self._size + len(record) > self.max_size:
                    self._rotate()
                _write_all(self._fd, record)
                self._size += len(record)

    def _rotate(self) -> None:
        name = self.path.name
        if self.max_files > 1:
            for n in range(self.max_files - 1, 0, -1):
                src = self.path.with_name(f"{name}.{n - 1}" if n > 1 else name)
                try:
                    os.replace(src, self.path.with_name(f"{name}.{n}"))
                except FileNotFoundError:
                    pass
        else:
            self.path.unlink(missing_ok=True)
        # O_EXCL: whatever appeared at the name since the rename is refused, not reused.
        fd = open_regular(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        os.close(self._fd)
        self._fd, self._size = fd, 0

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# ------------------------------------------------------------------- reading

def _numbers(path: Path) -> list[int]:
    """The numbers of path.1, path.2, ... as a listing shows them now."""
    prefix = path.name + "."
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    return sorted(int(n[len(prefix):]) for n in names
                  if n.startswith(prefix) and n[len(prefix):].isdigit())


CHAIN_TRIES = 50  # looks at the rotated files while a rotation keeps moving them


def _scan(path: Path, want: tuple[int, int] | None) -> tuple[list[int], bool]:
    """(descriptors of path, path.1, ... oldest first; whether ``want`` was met).

    Names are tried by number, every one up to the highest a listing shows (no
    further than the listing's length allows) and on while the next one
    exists: a listing taken while the writer renames can miss names. The
    writer moves files to higher numbers from the top down while this goes up, so a file may turn up twice (skipped) but none that
    still exists is passed over. Stops at ``want``, a file's (device, inode).
    """
    fds: list[int] = []
    seen = set()
    try:
        top: int | None = None  # listed once path is not the file wanted
        n = 0
        while True:
            if n == 1:
                numbers = _numbers(path)
                # No higher than as many as are listed (the writer keeps them
                # contiguous): a name far above is not ours (the folder is the
                # jailed VMM's, and .999999999 must not make us try every number).
                top = min(max(numbers, default=0), len(numbers) + 1)
            if top is not None and n > top and \
                    not os.path.lexists(path.with_name(f"{path.name}.{n}")):
                break
            p = path if n == 0 else path.with_name(f"{path.name}.{n}")
            n += 1
            try:
                fd = open_regular(p, os.O_RDONLY)
            except FileNotFoundError:
                continue  # between two renames of the writer's
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            if key == want:
                os.close(fd)
                return fds[::-1], True
            if key in seen:
                os.close(fd)
                continue
            seen.add(key)
            fds.append(fd)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds[::-1], False


def _open_chain(path: Path, after: int | None = None) -> list[int]:
    """Descriptors of path and its rotated files, oldest first.

    With ``after`` (the descriptor of the file being read), only the files
    newer than that one. A scan taken while the writer rotates can be wrong
    twice over: the file ``after`` names can be carried past it, and a file
    made after the scan began can turn up above older ones. So a scan counts
    only if a second one finds the same files (and meets ``after``'s file
    while it still has a name); otherwise look again. If the writer keeps
    rotating, a follower is told nothing new this time (it polls again) and a
    first read gets the last scan. Once ``after``'s file has no name left
    (dropped past max_files), every file there is newer.
    """
    want = None
    if after is not None:
        st = os.fstat(after)
        want = (st.st_dev, st.st_ino)
    for attempt in range(CHAIN_TRIES):
        fds, met = _scan(path, want)
        if after is None or met or os.fstat(after).st_nlink == 0:
            check, _ = _scan(path, want)
            same = [_key(fd) for fd in check] == [_key(fd) for fd in fds]
            _close_all(check)
            if same or (after is None and attempt == CHAIN_TRIES - 1):
                return fds
        _close_all(fds)
    return []


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class _Lines:
    """Records from a stream of chunks, holding at most one line in memory."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.skipping = False  # inside an over-long line, dropped up to its newline

    def reset(self) -> None:
        self.pending.clear()
        self.skipping = False

    def feed(self, chunk: bytes) -> Iterator[tuple[str, bytes]]:
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            if self.skipping:
                self.skipping = False
            else:
                self.pending += chunk[start:nl]
                line, self.pending = bytes(self.pending), bytearray()
                rec = _decode(line)
                if rec is not None:
                    yield rec
            start = nl + 1
        if not self.skipping:
            self.pending += chunk[start:]
            if len(self.pending) > MAX_LINE:
                self.pending.clear()
                self.skipping = True


def _decode(line: bytes) -> tuple[str, bytes] | None:
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
        return str(rec["stream"]), base64.b64decode(rec["b64"], validate=True)
    except (ValueError, KeyError, TypeError):
        return None  # not a record: skipped


def read_log(path: Path, follow: bool = False, running: Callable[[], bool] = lambda: False,
             poll: float = 0.1) -> Iterator[tuple[str, bytes]]:
    """(stream, data) for every record of container.log and its rotated files.

    Oldest first, READ_CHUNK bytes at a time. With ``follow``, keeps reading
    while ``running()`` says the container may still write, following
    container.log through rotations: a replaced file is read to its end, then
    the files that came after it.
    """
    queue = _open_chain(path)  # oldest first; the last is the newest we know
    lines = _Lines()
    last_pass = False
    try:
        while True:
            while queue:
                while chunk := os.read(queue[0], READ_CHUNK):
                    yield from lines.feed(chunk)
                if len(queue) == 1:
                    break
                os.close(queue.pop(0))
                lines.reset()  # a whole file holds whole records
            if not follow:
                return
            newer = _open_chain(path, after=queue[0] if queue else None)
            if newer:
                queue += newer  # the old file is read to its end first
                continue
            if last_pass:
                return
            if not running():
                last_pass = True  # whatever was written before it stopped
                continue
            time.sleep(poll)
    finally:
        for fd in queue:
            os.close(fd)


# ------------------------------------------------------------------- console

def cap_console(path: Path, max_size: int) -> bool:
    """If the console log is over max_size, move its newest half to path.1 and empty it.

    The VMM appends (O_APPEND), so after the truncation its next write lands at
    the start. Bytes it writes between the last copy and the truncation are
    lost: a few at most. Returns whether the file was cut.
    """
    try:
        fd = open_regular(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        end = os.fstat(fd).st_size
        if end <= max_size:
            return False
        keep = path.with_name(path.name + ".1")
        tmp = path.with_name(path.name + ".1.tmp")
        tmp.unlink(missing_ok=True)
        out = open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            pos = max(0, end - max_size // 2)
            for _ in range(4):  # catch up with what the VMM wrote meanwhile
                while pos < end:
                    data = os.pread(fd, min(READ_CHUNK, end - pos), pos)
                    if not data:
                        break
                    _write_all(out, data)
                    pos += len(data)
                end = os.fstat(fd).st_size
                if end <= pos or end - pos > max_size:
                    break
            os.ftruncate(fd, 0)
        finally:
            os.close(out)
        os.replace(tmp, keep)
        return True
    finally:
        os.close(fd)
