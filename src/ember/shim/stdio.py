"""Copying a guest process's stdio to and from the FIFOs containerd hands the shim.

The agent keeps each process's output in the guest with absolute offsets, so
the shim reads it with long-polling calls and writes it to the stdout/stderr
FIFOs; stdin goes the other way (FIFO -> WriteStdin), and EOF on the stdin
FIFO closes the process's stdin. In terminal mode there is one output stream
(the pty) and stderr is empty.

FIFOs are opened without blocking the shim: a writer end retries until
containerd's reader is there; the stdin reader is opened in its own thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time

from ember.errors import EmberError

log = logging.getLogger("ember.shim.stdio")

READ_WAIT_MS = 1000


class StdioPumps:
    """The copy threads of one process (init or exec)."""

    def __init__(self, agent, cid: str, exec_id: str, stdin: str, stdout: str,
                 stderr: str) -> None:
        self.agent = agent
        self.cid = cid
        self.exec_id = exec_id
        self.paths = {"stdin": stdin, "stdout": stdout, "stderr": stderr}
        self.stop = threading.Event()  # give up on readers that never come
        self.stdin_done = threading.Event()
        self._out_threads: list[threading.Thread] = []
        self._stdin_fd: int | None = None

    def start(self) -> None:
        for stream in ("stdout", "stderr"):
            if self.paths[stream]:
                t = threading.Thread(target=self._pump_out, args=(stream,), daemon=True,
                                     name=f"out-{self.cid[:8]}-{self.exec_id[:8]}-{stream}")
                t.start()
                self._out_threads.append(t)
        if self.paths["stdin"]:
            threading.Thread(target=self._pump_in, daemon=True,
                             name=f"in-{self.cid[:8]}-{self.exec_id[:8]}").start()
        else:
            self.stdin_done.set()

    def drain(self, timeout: float) -> None:
        """Wait for the output copies to reach EOF (after the process exited)."""
        deadline = time.monotonic() + timeout
        for t in self._out_threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stop.set()

    def close(self) -> None:
        """Stop everything (the process is being deleted)."""
        self.stop.set()
        path = self.paths["stdin"]
        if path and not self.stdin_done.is_set():
            # Unblock a reader still waiting in open(): become its writer for a moment.
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    def close_stdin(self, wait: float = 1.0) -> None:
        """containerd's CloseIO: let the copy finish what is in the FIFO, then EOF."""
        if self.paths["stdin"]:
            self.stdin_done.wait(wait)
        try:
            self.agent.close_stdin(self.cid, self.exec_id)
        except EmberError as exc:
            log.debug("close stdin of %s/%s: %s", self.cid, self.exec_id, exc)

    # ------------------------------------------------------------ threads
    def _open_writer(self, path: str) -> int | None:
        while not self.stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no reader yet
                    time.sleep(0.02)
                    continue
                log.warning("cannot open %s: %s", path, exc)
                return None
            os.set_blocking(fd, True)
            return fd
        return None

    def _pump_out(self, stream: str) -> None:
        """Copy one stream to its FIFO until it ends (ember.sandbox.output's policy)."""
        fd = self._open_writer(self.paths[stream])
        # A paused VM answers nothing until resumed: keep asking unless the process is
        # being deleted (a lost connection or a process gone ends the stream anyway).
        reader = self.agent.iter_output(self.cid, self.exec_id, stream, wait_ms=READ_WAIT_MS,
                                        stop=lambda: fd is None and self.stop.is_set(),
                                        retry=lambda exc: not self.stop.is_set())
        try:
            for data in reader:
                if fd is None:
                    continue
                try:
                    _write_all(fd, data)
                except OSError as exc:  # the reader went away (EPIPE)
                    log.debug("%s reader gone: %s", stream, exc)
                    os.close(fd)
                    fd = None
        except (EmberError, OSError) as exc:
            log.debug("%s of %s/%s ends: %s", stream, self.cid, self.exec_id, exc)
        finally:
            if fd is not None:
                os.close(fd)

    def _pump_in(self) -> None:
        try:
            fd = os.open(self.paths["stdin"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            log.warning("cannot open stdin %s: %s", self.paths["stdin"], exc)
            self.stdin_done.set()
            return
        try:
            while not self.stop.is_set():
                data = os.read(fd, 65536)
                if not data:
                    break
                while data:
                    try:
                        n = self.agent.write_stdin(self.cid, self.exec_id, data)
                    except EmberError as exc:
                        log.debug("stdin of %s/%s: %s", self.cid, self.exec_id, exc)
                        return
                    data = data[n or len(data):]
            if not self.stop.is_set():
                with contextlib.suppress(EmberError):
                    self.agent.close_stdin(self.cid, self.exec_id)
        finally:
            os.close(fd)
            self.stdin_done.set()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
