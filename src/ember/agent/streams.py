"""Container output kept in the guest, addressed by absolute byte offsets.

The agent drains every stdout/stderr pipe (or pty master) continuously, so a
container never blocks on a full pipe while nobody reads, and several readers
(an attached CLI, `ember logs`, the shim) can each read from their own offset.
At least the newest ``limit`` bytes are kept (trimmed in batches); a reader that fell behind is moved
up to the oldest kept byte, and the answer's offset says so.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time

log = logging.getLogger("ember.agent.streams")

KEEP_BYTES = 8 << 20
DEFAULT_READ = 1 << 20
MAX_READ = 3 << 20  # stays well under the 4 MiB ttrpc frame limit


class StreamBuffer:
    """A bounded, offset-addressed byte log with blocking reads."""

    def __init__(self, limit: int = KEEP_BYTES) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._start = 0  # absolute offset of _buf[0]
        self._closed = False
        self._cond = threading.Condition()

    @property
    def end(self) -> int:
        with self._cond:
            return self._start + len(self._buf)

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            # Trim in batches: moving 8 MiB for every 64 KiB read would be costly.
            if len(self._buf) > self._limit + self._limit // 4:
                extra = len(self._buf) - self._limit
                del self._buf[:extra]
                self._start += extra
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def read(self, offset: int, max_bytes: int = 0, wait_s: float = 0.0
             ) -> tuple[bytes, int, bool]:
        """Return (data, offset of data[0], eof) for bytes from offset on.

        Blocks up to wait_s for data past offset. eof is true once the stream
        is closed and the reader has everything.
        """
        max_bytes = min(max_bytes or DEFAULT_READ, MAX_READ)
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                end = self._start + len(self._buf)
                if offset < end or self._closed:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            end = self._start + len(self._buf)
            offset = min(max(offset, self._start), end)
            i = offset - self._start
            data = bytes(self._buf[i:i + max_bytes])
            eof = self._closed and offset + len(data) >= end
            return data, offset, eof


class PacedBuffer(StreamBuffer):
    """A stream for one reader that must get every byte (an archive for ember cp):
    the writer waits while more than ``limit`` bytes are unread, and what the
    reader has passed (its next offset) is dropped. Closing it lets a writer
    whose reader went away go on (its bytes are dropped)."""

    def __init__(self, limit: int = KEEP_BYTES) -> None:
        super().__init__(limit)
        self._read_to = 0

    def append(self, data: bytes) -> None:
        with self._cond:
            while not self._closed and \
                    self._start + len(self._buf) - self._read_to >= self._limit:
                self._cond.wait(1.0)
            if self._closed:
                return
            self._buf += data
            self._cond.notify_all()

    def read(self, offset: int, max_bytes: int = 0, wait_s: float = 0.0
             ) -> tuple[bytes, int, bool]:
        with self._cond:
            if offset > self._read_to:
                drop = min(offset, self._start + len(self._buf)) - self._start
                if drop > 0:
                    del self._buf[:drop]
                    self._start += drop
                self._read_to = offset
                self._cond.notify_all()
        return super().read(offset, max_bytes, wait_s)


def drain(fd: int, buf: StreamBuffer, name: str, also: StreamBuffer | None = None) -> threading.Thread:
    """Copy fd into buf until EOF in a thread; closes fd and buf at the end.

    A pty master reports EIO once the last slave fd closes: that is EOF too.
    """

    def run() -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:  # a pty master shares O_NONBLOCK with stdin's fd
                    poller.poll()
                    continue
                except OSError as e:
                    if e.errno != errno.EIO:
                        log.warning("reading %s: %s", name, e)
                    break
                if not chunk:
                    break
                buf.append(chunk)
        finally:
            buf.close()
            if also is not None:
                also.close()
            try:
                os.close(fd)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True, name=f"drain-{name}")
    t.start()
    return t
