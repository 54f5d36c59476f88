"""One container process (init or exec) and how it is launched through crun.

Launching is the same for ``crun create`` and ``crun exec --detach``: wire
stdio (pipes, or a pty whose master crun hands over on a console socket),
wait for crun, read the pid file, then watch the pid with the reaper.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import select
import socket
import struct
import tempfile
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ember.agent.crun import Crun, _unlink
from ember.agent.reaper import Exit
from ember.agent.streams import StreamBuffer, drain
from ember.ttrpc import Code, TTRPCError

log = logging.getLogger("ember.agent.process")

CRUN_TIMEOUT = 60.0
EOT = b"\x04"


@dataclass
class Process:
    container_id: str
    exec_id: str
    terminal: bool = False
    pid: int = 0
    exit: Exit | None = None
    stdout: StreamBuffer = field(default_factory=StreamBuffer)
    stderr: StreamBuffer = field(default_factory=StreamBuffer)
    stdin_fd: int | None = None  # pipe write end, or the pty master
    pty_fd: int | None = None
    helper: bool = False  # the agent's own forked helper (an archive), not crun's
    _wlock: threading.Lock = field(default_factory=threading.Lock)
    _stdin_closing: bool = False

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def running(self) -> bool:
        return self.exit is not None and not self.exit.done

    def write_stdin(self, data: bytes) -> int:
        """Write all of data, waiting while the process does not read.

        The fd is non-blocking and waited on in short slices, so CloseStdin
        and RemoveContainer are never stuck behind a writer.
        """
        with self._wlock:
            fd = self.stdin_fd
            if fd is None or self._stdin_closing:
                raise TTRPCError(Code.FAILED_PRECONDITION,
                                 f"process {self.name} has no open stdin")
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            view = memoryview(data)
            while view:
                if self._stdin_closing:
                    raise TTRPCError(Code.FAILED_PRECONDITION,
                                     f"stdin of process {self.name} was closed during the write")
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    poller.poll(200)
                except (BrokenPipeError, OSError) as e:
                    raise TTRPCError(Code.FAILED_PRECONDITION,
                                     f"process {self.name} no longer reads its stdin") from e
            return len(data)

    def close_stdin(self) -> None:
        """EOF on stdin: close the pipe, or send ^D through the pty."""
        if self.terminal:
            with self._wlock:
                if self.stdin_fd is not None:
                    try:
                        os.write(self.stdin_fd, EOT)
                    except OSError:
                        pass
            return
        self._stdin_closing = True
        with self._wlock:
            if self.stdin_fd is not None:
                os.close(self.stdin_fd)
                self.stdin_fd = None

    def resize(self, rows: int, cols: int) -> None:
        with self._wlock:
            if self.pty_fd is None:
                raise TTRPCError(Code.FAILED_PRECONDITION, f"process {self.name} has no terminal")
            fcntl.ioctl(self.pty_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def release(self) -> None:
        """Close the agent's ends of stdio (the drain threads own the read ends)."""
        self._stdin_closing = True
        with self._wlock:
            for fd in {self.stdin_fd, self.pty_fd} - {None}:
                try:
                    os.close(fd)  # type: ignore[arg-type]
                except OSError:
                    pass
            self.stdin_fd = self.pty_fd = None


def _recv_pty(listener: socket.socket, crun_exit: Exit, timeout: float) -> int | None:
    """Accept crun's console-socket connection and take the pty master it sends."""
    listener.settimeout(0.1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if crun_exit.done:
                return None
            continue
        with conn:
            conn.settimeout(max(0.1, deadline - time.monotonic()))
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
            for fd in fds[1:]:
                os.close(fd)
            if not fds:
                return None
            # Received fds are inheritable; later children must not get it.
            os.set_inheritable(fds[0], False)
            return fds[0]
    return None


def launch(crun: Crun, proc: Process, args: Sequence[str], pid_file: str, work_dir: str,
           want_stdin: bool, argv0: str) -> None:
    """Run ``crun <args>`` for proc and wire its stdio; raises the mapped error on failure.

    ``args`` is the crun subcommand without --pid-file/--console-socket.
    """
    args = list(args)
    sub, rest = args[0], args[1:]
    extra = ["--pid-file", pid_file]
    ours: list[int] = []  # fds the agent keeps on success
    theirs: list[int] = []  # fds only crun should hold
    listener = None
    # Not in work_dir: a 64-hex container id makes that path longer than a
    # Unix socket address may be (108 bytes).
    sock_path = os.path.join(tempfile.gettempdir(), f"ember-console-{secrets.token_hex(8)}.sock")
    stdin = stdout = stderr = None
    try:
        if proc.terminal:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            _unlink(sock_path)
            listener.bind(sock_path)
            listener.listen(1)
            extra += ["--console-socket", sock_path]
        else:
            if want_stdin:
                stdin, w = os.pipe()
                theirs.append(stdin)
                ours.append(w)
                proc.stdin_fd = w
            out_r, stdout = os.pipe()
            err_r, stderr = os.pipe()
            theirs += [stdout, stderr]
            ours += [out_r, err_r]
        crun_log = crun.new_log()
        try:
            ex = crun.spawn([sub] + extra + rest, crun_log, stdin, stdout, stderr)
            for fd in theirs:
                os.close(fd)
            theirs = []
            master = None
            if listener is not None:
                master = _recv_pty(listener, ex, CRUN_TIMEOUT)
                if master is not None:
                    ours.append(master)
            if not ex.wait(CRUN_TIMEOUT):
                os.kill(ex.pid, 9)
                ex.wait(5)
                raise TTRPCError(Code.DEADLINE_EXCEEDED, f"crun {sub} for {proc.name} hung")
            if ex.exit_code != 0:
                raise crun.failure(sub, crun_log, argv0=argv0)
        finally:
            _unlink(crun_log)
        if proc.terminal and master is None:
            raise TTRPCError(Code.INTERNAL, f"crun {sub} for {proc.name} sent no terminal")
        with open(pid_file) as f:
            proc.pid = int(f.read().strip())
    except BaseException:
        for fd in ours + theirs:
            try:
                os.close(fd)
            except OSError:
                pass
        proc.stdin_fd = None
        raise
    finally:
        if listener is not None:
            listener.close()
            _unlink(sock_path)
    proc.exit = crun.reaper.watch(proc.pid)
    if master is not None:  # a terminal: crun sent its pty master (checked above)
        proc.stdin_fd = proc.pty_fd = master
        drain(os.dup(master), proc.stdout, f"{proc.name}-tty")
        proc.stderr.close()
    else:
        drain(out_r, proc.stdout, f"{proc.name}-stdout")
        drain(err_r, proc.stderr, f"{proc.name}-stderr")
    if proc.stdin_fd is not None:
        os.set_blocking(proc.stdin_fd, False)
