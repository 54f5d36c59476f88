"""Sandbox monitors (and pod shims) forked from one warm Python process, so that
they share memory.

Every sandbox has a monitor for its whole life. Exec'd on its own, a monitor is
a new interpreter that imports ~230 modules: ~19 MiB of private memory per idle
sandbox (issue 14 wants monitor and waiter within 10 MiB together), and ~150 ms
of every start. The fork server imports those modules once, freezes them out of
the garbage collector's reach (``gc.freeze``: a collection would write to every
object and so copy every page), and forks a monitor per request. The children
share the server's pages until they write them. Measured with 6 idle
sandboxes: a monitor's own memory went from ~17 to ~10 MiB, and a start no
longer waits ~150 ms for the monitor's imports. (Python 3.11 writes an
object's reference count whenever it is used, so a monitor still copies many
of the pages it shares.)

One server per state folder and installation (the socket's name hashes the
interpreter and this package's folder), started on demand by whoever spawns a
monitor; it is root's (the socket is 0600 in the state folder and the peer's
uid is checked) and it runs only ``python [-P] -m MODULE ARGS`` for the modules in
:data:`MODULES`. A monitor is what ``python -m ember.sandbox.monitor ARGS``
would be: a new session, stdio and descriptors as given, the environment sent
with the request, and that command line in ``/proc/PID/cmdline``
(:mod:`ember.proctitle`), in the spawner's working folder, with its umask and
resource limits (a hard limit above the server's is left to an exec). It stays
in the server's cgroups: Ember puts what must be accounted (VMMs, a pod's shim)
where it belongs itself. A pod's shim (``python -m ember.shim.main ... serve``)
is forked the same way, from ``containerd-shim-ember-v2 start``. The server
is the monitor's parent: it reaps it and,
while the spawner still listens, sends it the exit status, which
``Popen.wait`` would have given.

The server leaves when nothing happened for :data:`IDLE` seconds and no
monitor it forked is alive, or at once (after its children) when a module it
loaded changed on disk, so an upgrade never runs old code. It holds no state:
when it is gone, or refuses, the caller execs the monitor as before.
``EMBER_FORKSERVER=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib
import json
import os
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from ember import proctitle
from ember.util import place_fds

MODULES = ("ember.sandbox.monitor", "ember.shim.main")
# Resource limits a child gets from its spawner, as through an exec.
RLIMITS = ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_STACK", "RLIMIT_MEMLOCK",
           "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_CPU")
# What a monitor imports on its way, also after start-up: in the shared pages.
PRELOAD = (
    "ember.sandbox.monitor", "ember.sandbox.vm", "ember.sandbox.template",
    "ember.sandbox.agent_client", "ember.sandbox.cleanup", "ember.sandbox.restart",
    "ember.jailer.main", "ember.jailer.jail", "ember.vmm.qemu.driver",
    "ember.vmm.qemu.snapshot", "ember.vmm.qemu.accel", "ember.vmm.firecracker.driver",
    "ember.guest.build", "ember.jailer.uids", "importlib.resources", "importlib.util",
    "importlib.readers", "importlib.resources.readers", "zipfile",  # resources.files()
    # A pod's shim (containerd-shim-ember-v2 serve) is forked too.
    "ember.shim.main", "ember.shim.service", "ember.shim.pod", "ember.shim.events",
)
IDLE = 60.0  # seconds; EMBER_FORKSERVER_IDLE in the server's environment overrides it
ENV = "EMBER_FORKSERVER"
_MAX_MESSAGE = 1 << 20
_MAX_FDS = 16


def module_call(argv: list[str]) -> tuple[str, list[str]] | None:
    """``(MODULE, ARGS)`` of ``python [-P] -m MODULE ARGS`` for a module we serve."""
    rest = argv[1:]
    if rest[:1] == ["-P"]:
        rest = rest[1:]
    if len(rest) < 2 or rest[0] != "-m" or rest[1] not in MODULES:
        return None
    return rest[1], rest[2:]


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def socket_path(state_dir: Path) -> Path:
    """The server's socket for this interpreter and package under state_dir."""
    here = str(Path(__file__).resolve().parent.parent)
    key = hashlib.sha256(f"{sys.executable}\0{here}".encode()).hexdigest()[:12]
    return state_dir / f".forkserver-{key}.sock"


# ------------------------------------------------------------------- client
class Spawned:
    """The part of :class:`subprocess.Popen` a monitor's spawner uses, for a
    monitor the fork server started: its pid, and its exit status while the
    spawner keeps the connection (:meth:`close` once the monitor reported)."""

    def __init__(self, pid: int, args: list[str], conn: socket.socket) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._conn: socket.socket | None = conn

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is not None:
            return self.returncode
        if self._conn is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self._conn.settimeout(timeout)
        try:
            data = self._conn.recv(64)
        except TimeoutError:
            raise subprocess.TimeoutExpired(self.args, timeout or 0) from None
        self.close()
        if not data.startswith(b"exit "):  # the server went away: the status is lost
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.returncode = int(data.split()[1])
        return self.returncode

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for
    every thread of a program that embeds the API, if only for a moment)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _limits() -> dict[str, list[int]]:
    return {name: list(resource.getrlimit(getattr(resource, name))) for name in RLIMITS}


def spawn(state_dir: Path, argv: list[str], env: dict[str, str], stdout: int,
          pass_fds: tuple[int, ...], cwd: str | None = None) -> Spawned | None:
    """Have the fork server start ``argv`` (``python -m MODULE ARGS``) with
    stdin from /dev/null, stdout and stderr to ``stdout``, ``pass_fds`` at
    their numbers, in ``cwd`` (default: ours), with our umask and resource
    limits; None if there is no server to do it (the caller execs)."""
    if not enabled() or module_call(argv) is None:
        return None
    path = socket_path(state_dir)
    mask = _umask()
    try:
        conn = _connect(path) or _start_server(path, env)
        if conn is None:
            return None
        request = json.dumps({"argv": argv, "env": env, "fds": list(pass_fds),
                              "cwd": cwd or os.getcwd(), "umask": mask,
                              "limits": _limits()}).encode()
        socket.send_fds(conn, [request], [stdout, *pass_fds])
        conn.settimeout(30)
        reply = conn.recv(64).decode(errors="replace").split()
    except OSError:
        return None
    if len(reply) != 2 or reply[0] != "pid":
        conn.close()
        return None
    return Spawned(int(reply[1]), argv, conn)


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        return None
    return conn


def _start_server(path: Path, env: dict[str, str]) -> socket.socket | None:
    """Bind the socket (under a lock: one server per path) and exec the server on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:  # the folder itself is the lock: no lock file left behind
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _connect(path)  # another spawner may have started it meanwhile
        if conn is not None:
            return conn
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            listener.bind(str(tmp))
            os.chmod(tmp, 0o600)  # before it has its name (and the peer's uid is checked)
            listener.listen(64)
            os.replace(tmp, path)
            subprocess.Popen(
                # The padding is room for the command lines its children show.
                # -P: no module is ever found in whatever folder the spawner was in.
                [sys.executable, "-P", "-m", "ember.sandbox.forkserver", "--fd",
                 str(listener.fileno()), str(path), "-" * proctitle.ROOM],
                pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True, env=env)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    finally:
        os.close(lock)  # releases the flock
    return _connect(path)  # answered once the server has loaded its modules


# ------------------------------------------------------------------- server
class Server:
    def __init__(self, listener: socket.socket, path: str, idle: float = IDLE) -> None:
        self.idle = idle
        self.listener: socket.socket | None = listener
        self.path = path  # bound under a temporary name, then renamed
        try:
            self.inode: int | None = os.stat(self.path).st_ino
        except OSError:
            self.inode = None  # gone already (its folder was removed): retire leaves it
        self.children: dict[int, socket.socket | None] = {}  # pid -> its spawner, if listening
        self.last = time.monotonic()
        self.loaded: dict[str, float] = {}

    def preload(self) -> None:
        for name in PRELOAD:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)
        for mod in list(sys.modules.values()):
            f = getattr(mod, "__file__", None)
            if f and (mod.__name__ == "ember" or mod.__name__.startswith("ember.")):
                with contextlib.suppress(OSError):
                    self.loaded[f] = os.stat(f).st_mtime
        gc.collect()
        gc.freeze()  # children never collect (and so never write) what is here now

    def stale(self) -> bool:
        """A module this process loaded changed on disk: children would run old code."""
        for f, mtime in self.loaded.items():
            try:
                if os.stat(f).st_mtime != mtime:
                    return True
            except OSError:
                return True
        return False

    def retire(self) -> None:
        """Take no new requests; the socket goes if it is still ours."""
        if self.listener is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        self.listener.close()
        self.listener = None

    def run(self) -> None:
        # SIGCHLD wakes the loop, so a monitor that ended is reaped at once (a
        # zombie would still hold its pid for `ember ps` and `rm` a moment).
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            self.reap()
            if self.listener is None and not self.children:
                return
            if not self.children and time.monotonic() - self.last > self.idle:
                self.retire()
                return
            watched: list = [c for c in self.children.values() if c is not None]
            if self.listener is not None:
                watched.append(self.listener)
            ready, _, _ = select.select([*watched, wake_r], [], [], 1.0)
            for s in ready:
                if s == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 256)
                elif s is self.listener:
                    self.accept()
                else:  # the spawner hung up: it no longer wants the status
                    for pid, c in self.children.items():
                        if c is s:
                            c.close()
                            self.children[pid] = None

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if not pid:
                return
            conn = self.children.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(f"exit {os.waitstatus_to_exitcode(status)}".encode())
                conn.close()

    def accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        self.last = time.monotonic()
        fds: list[int] = []
        try:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            conn.settimeout(10)
            msg, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MESSAGE, _MAX_FDS)
            request = json.loads(msg) if msg else None
            if uid != os.geteuid() or not isinstance(request, dict):
                raise ValueError("refused")
            argv, env, numbers = request["argv"], request["env"], request["fds"]
            if (module_call(argv) is None or len(fds) != len(numbers) + 1
                    or any(n < 3 for n in numbers)):
                raise ValueError("refused")
            proctitle.check(argv)  # it must show as exec'd, or be exec'd
            limits = {k: v for k, v in request["limits"].items() if k in RLIMITS}
            if not _can_set(limits):
                raise ValueError("limits")  # only an exec can raise a hard limit here
            if self.stale():
                self.retire()
                raise ValueError("stale")
            how = {"cwd": str(request["cwd"]), "umask": int(request["umask"]), "limits": limits}
            pid = self.fork(argv, env, fds[0], dict(zip(numbers, fds[1:], strict=True)), how)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            with contextlib.suppress(OSError):
                conn.send(f"no {type(exc).__name__}".encode())
            conn.close()
            return
        finally:
            for fd in fds:
                os.close(fd)
        self.children[pid] = conn
        try:
            conn.send(f"pid {pid}".encode())
        except OSError:
            conn.close()
            self.children[pid] = None

    def fork(self, argv: list[str], env: dict[str, str], out: int, fds: dict[int, int],
             how: dict) -> int:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1  # what python gives an uncaught exception, after its traceback
        try:
            code = _child(argv, env, out, fds, how)
        except BaseException:  # noqa: BLE001 - a child never returns into the server
            with contextlib.suppress(BaseException):
                sys.excepthook(*sys.exc_info())
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _can_set(limits: dict[str, list[int]]) -> bool:
    """Whether every limit is within ours (raising a hard limit needs CAP_SYS_RESOURCE)."""
    for name, (_soft, hard) in limits.items():
        ours = resource.getrlimit(getattr(resource, name))[1]
        if ours != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > ours):
            return False
    return True


def _child(argv: list[str], env: dict[str, str], out: int, fds: dict[int, int],
           how: dict) -> int:
    """In a forked child: become ``python -m MODULE ARGS`` and run it."""
    signal.set_wakeup_fd(-1)  # the server's; closed below, and the number reused
    os.setsid()
    os.chdir(how["cwd"])
    os.umask(how["umask"])
    for name, (soft, hard) in how["limits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                signal.SIGUSR2, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    place_fds([(os.open(os.devnull, os.O_RDONLY), 0), (out, 1), (os.dup(out), 2),
               *((fd, n) for n, fd in fds.items())])
    keep = {0, 1, 2, *fds}
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    proctitle.set_cmdline(argv)
    name, args = module_call(argv) or ("", [])
    sys.argv = [name, *args]
    module = importlib.import_module(name)
    try:
        code = module.main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[0] != "--fd":
        print("usage: python -m ember.sandbox.forkserver --fd N SOCKET [PADDING]",
              file=sys.stderr)
        return 2
    listener = socket.socket(fileno=int(args[1]))
    listener.set_inheritable(False)
    os.chdir("/")  # pin no folder of whoever started it; children get theirs
    proctitle.set_cmdline([sys.executable, "-P", "-m", "ember.sandbox.forkserver"])
    server = Server(listener, args[2], float(os.environ.get(f"{ENV}_IDLE", IDLE)))
    server.preload()
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
