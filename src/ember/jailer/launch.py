"""Starting ``ember-jailer`` without a new Python interpreter where that is safe.

ember-jailer is Python. A new interpreter and its imports cost about 60 ms of
every jailed start, most of the jail's whole price over an unjailed restore
(issue 14 wants at most 50 ms). The sandbox monitor that starts the jailer
already runs Python with most of those modules loaded, so a fork of it can run
the jailer's ``main`` at once; the fork imports the jailer's own modules while
it waits for its request.

A fork is only safe in a process with one thread: a lock another thread holds
(the import lock, a logging handler's) would stay held for ever in the child.
The monitor has a thread from its first moments (it follows its creator), so
it calls :func:`prefork` before that: a helper child is forked then, closes
every descriptor it inherited, and waits on a socket. :func:`popen` sends it
the jailer's arguments with stdio and ``pass_fds`` (SCM_RIGHTS, placed at the
same numbers), and the helper becomes ``ember-jailer ARGS``. A caller with one
thread and no helper yet makes one on the spot; any other caller, a helper that
died, or a ``jailer_binary`` other than this package's gets the exec as before.

However it starts, the child is what ``ember-jailer ARGS`` would be: a new
session, stdio as given, Python's default signal handling, no descriptor but
stdio and ``pass_fds`` (the jailer closes the rest itself, as after an exec),
and its exit status, read with ``waitpid`` by its parent.

The helper is forked as PID 1 of a PID namespace of its own (where this
process may make one). The jailer would otherwise fork the VMM into a new PID
namespace and stay behind as its waiter, a ~4 MiB interpreter for the whole
life of every sandbox (issue 14 wants monitor and waiter within 10 MiB). In
the helper it needs no second namespace, so it execs the VMM in place
(``Forked.vmm``): the VMM is then this process's own child, its status the
VMM's, and its jail this process's to remove (:func:`ember.jailer.api.cleanup`)
once it has exited. The VMM dies with the thread that forked the helper
(PDEATHSIG), as it died with its waiter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from ember.jailer import linux
from ember.util import place_fds

Stdio = int | IO | None
_MAX_MESSAGE = 1 << 20  # the jailer's whole command line, QEMU's included
_MAX_FDS = 32


class Forked:
    """The part of :class:`subprocess.Popen` the VMM drivers use, for a child
    this process forked. As in Popen, one thread at a time reaps it (a monitor
    waits for its VMM in one thread and asks whether it exited in others)."""

    def __init__(self, pid: int, args: Sequence[str], vmm: bool = False) -> None:
        self.pid = pid
        self.args = list(args)
        self.vmm = vmm  # the VMM itself (exec'd in place), not a jailer that waits on it
        self.returncode: int | None = None
        self._reaping = threading.Lock()

    def _reap(self, flags: int) -> None:
        """waitpid once, holding the lock; records the status if it came."""
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # reaped by someone else: gone, status unknown
            self.returncode = 255
            return
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)

    def poll(self) -> int | None:
        if self.returncode is None and self._reaping.acquire(blocking=False):
            try:
                if self.returncode is None:
                    self._reap(os.WNOHANG)
            finally:
                self._reaping.release()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            with self._reaping:
                if self.returncode is None:
                    self._reap(0)
            return self.returncode  # type: ignore[return-value]
        deadline = time.monotonic() + timeout
        delay = 0.001
        while (code := self.poll()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


# ----------------------------------------------------------------- the helper
_helper: tuple[int, socket.socket, bool] | None = None  # pid, socket, PID 1 of its own
_ns_init = False  # in the helper: we are PID 1 of a PID namespace made for us


def _single_threaded() -> bool:
    """One thread in this process, counting threads Python did not start."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return threading.active_count() == 1


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()  # or a child would write the parent's buffered output again


def prefork() -> bool:
    """Fork the helper now, while this process has one thread; False if it has more."""
    global _helper, _ns_init
    if _helper is not None:
        return True
    if not _single_threaded():
        return False
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    _flush_stdio()
    pid, own_ns = _fork_as_namespace_init()
    if pid == 0:
        _ns_init = own_ns
        ours.close()
        _helper_main(theirs)  # never returns
    theirs.close()
    _helper = (pid, ours, own_ns)
    return True


def _fork_as_namespace_init() -> tuple[int, bool]:
    """fork(), the child made PID 1 of a new PID namespace if this process may
    make one (root); then this process's later children are born in its own
    namespace again. The pid, and whether the namespace was made."""
    try:
        own = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.fork(), False
    try:
        try:
            linux.unshare(linux.CLONE_NEWPID)
        except OSError:  # not root: the helper forks the VMM and waits, as ember-jailer does
            return os.fork(), False
        pid = os.fork()
        if pid:
            # Only this process's children-to-be changed namespace; put them back.
            # Should that fail, nothing it starts later may land in the helper's.
            try:
                linux.setns(own, linux.CLONE_NEWPID)
            except OSError:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        return pid, True
    finally:
        os.close(own)


def discard() -> None:
    """Let an unused helper go (it exits at end of file) and reap it."""
    global _helper
    if _helper is None:
        return
    pid, sock, _ = _helper
    _helper = None
    sock.close()
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _helper_main(sock: socket.socket) -> None:
    """In the helper: hold nothing of the parent's, wait for the jailer's
    arguments and descriptors, then run it."""
    code = 125
    try:
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        _preload_jailer()
        msg, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, _MAX_FDS)
        sock.close()
        if not msg:
            code = 0  # not needed after all
            return
        request = json.loads(msg)
        argv, numbers = request["argv"], request["fds"]
        place_fds(list(zip(fds, numbers, strict=True)))
        code = _run_jailer(argv)
    except BaseException as exc:  # noqa: BLE001 - the helper must never return
        _last_words(exc)
    finally:
        os._exit(code)


def _preload_jailer() -> None:
    """Import the jailer's modules while the helper waits for its request, so
    a start does not wait for them (~20 ms of a jailed restore). The helper
    becomes the VMM by exec, so this memory goes with it. A failure is left to
    the run itself, which reports it on the request's stderr, not ours."""
    try:
        import ember.jailer.jail  # noqa: F401 - imported for its side effect
        import ember.jailer.main  # noqa: F401
    except Exception:  # noqa: BLE001, S110 - the jailer's run imports them again
        pass


def _send(argv: Sequence[str], stdio: list[int], pass_fds: Sequence[int]) -> Forked | None:
    """Hand the jailer's run to the helper; None if there is none (or it is gone)."""
    global _helper
    if _helper is None:
        return None
    pid, sock, in_place = _helper
    _helper = None
    numbers = [0, 1, 2, *pass_fds]
    try:
        socket.send_fds(sock, [json.dumps({"argv": list(argv), "fds": numbers}).encode()],
                        [*stdio, *pass_fds])
    except OSError:
        sock.close()
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return None
    sock.close()
    return Forked(pid, argv, vmm=in_place)


# --------------------------------------------------------------- the launcher
def _fd(stream: Stdio, default: int) -> int:
    if stream is None:
        return default
    if stream == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    return stream if isinstance(stream, int) else stream.fileno()


def popen(argv: Sequence[str], *, stdin: Stdio = subprocess.DEVNULL, stdout: Stdio = None,
          stderr: Stdio = None, pass_fds: Sequence[int] = ()) -> subprocess.Popen | Forked:
    """Start ``ember-jailer`` (``argv[0]``) with ``argv[1:]``: by the pre-forked
    helper (made now if this process has one thread), else exec'd. A result
    whose ``vmm`` is true is the VMM itself, exec'd in place (see above)."""
    from ember.jailer.api import jailer_command

    def execd() -> subprocess.Popen:
        return subprocess.Popen(list(argv), stdin=stdin, stdout=stdout, stderr=stderr,
                                start_new_session=True, close_fds=True, pass_fds=tuple(pass_fds))

    ours = bool(argv) and argv[0] == jailer_command()
    if not ours:
        discard()
        return execd()
    if _helper is None:
        prefork()  # a caller with one thread makes its helper now; others cannot
    stdio = [_fd(stdin, 0), _fd(stdout, 1), _fd(stderr, 2)]
    opened = [fd for fd, given in zip(stdio, (stdin, stdout, stderr), strict=True)
              if given == subprocess.DEVNULL]
    try:
        child = _send(argv, stdio, pass_fds)
    finally:
        for fd in opened:
            os.close(fd)
    return child if child is not None else execd()  # no helper, or it was gone


def _run_jailer(argv: list[str]) -> int:
    """Become ``ember-jailer argv[1:]`` in the helper; its exit status."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from ember.jailer.main import main

    try:
        main(argv[1:], in_place=_ns_init)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def _last_words(exc: BaseException) -> None:
    try:
        os.write(2, f"ember-jailer: {type(exc).__name__}: {exc}\n".encode())
    except OSError:
        pass
