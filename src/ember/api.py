"""Ember's public Python API: :class:`Sandbox` and the one-call :func:`run`.

The CLI is a thin layer over this module. A sandbox is one micro-VM running one
container; it is served by a detached monitor process (see
:mod:`ember.sandbox.monitor`), so a Sandbox object can be dropped and found
again later with :meth:`Sandbox.get`, from any process.

Example::

    import ember
    result = ember.run("ember-demo", ["echo", "hi"])
    assert result.exit_code == 0 and result.stdout == b"hi\\n"

    sb = ember.Sandbox.create("ember-demo", ["sleep", "60"], name="web")
    print(sb.exec(["uname", "-r"]).stdout)
    sb.remove(force=True)
"""

from __future__ import annotations

import builtins
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember import trace
from ember.config import Config, load_config
from ember.errors import EmberError, NotFoundError
from ember.sandbox import forkserver
from ember.sandbox.options import (
    RunOptions,
    apply_to_spec,
    check_network,
    image_stop_signal,
    prepare_guest,
    resolve_image,
    signal_number,
)
from ember.sandbox.spec import ProcessOptions, build_process, build_spec, make_privileged
from ember.sandbox.state import (
    SandboxState,
    StateStore,
    process_started,
    sandbox_processes,
)
from ember.sandbox.status import ENDED, LIVE, UP, Status
from ember.util import new_id, parse_size, pause_for_test, private_dir

if TYPE_CHECKING:
    from ember.sandbox.monitor_rpc import MonitorClient
    from ember.sandbox.mounts import Mount

GUEST_OVERHEAD_MIB = 128  # guest kernel + agent, on top of a --memory limit
NAME_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_.-"


@dataclass
class RunResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass
class ExecResult(RunResult):
    exec_id: str = ""


class Sandbox:
    """A micro-VM with one container in it."""

    def __init__(self, state: SandboxState, cfg: Config) -> None:
        self.cfg = cfg
        self.store = StateStore(cfg)
        self._state = state
        self._rpc = None
        self._agent = None
        self._mounts: builtins.list[Mount] = []  # what create() planned, for _launch
        self._created = False  # this object created the sandbox (see wait, auto_remove)

    # --------------------------------------------------------------- lookup
    @classmethod
    def get(cls, ref: str, cfg: Config | None = None) -> Sandbox:
        cfg = cfg or load_config()
        return cls(StateStore(cfg).find(ref), cfg)

    @classmethod
    def list(cls, all: bool = True, cfg: Config | None = None) -> builtins.list[Sandbox]:
        cfg = cfg or load_config()
        states = StateStore(cfg).all()
        # Without all: what may still run, an unreadable record included.
        return [cls(s, cfg) for s in states if all or s.status in (*LIVE, Status.UNKNOWN)]

    @property
    def state(self) -> SandboxState:
        """The record, refreshed: ``dead`` once the monitor is gone, ``unknown``
        (with the reason in ``error``) when it cannot be read."""
        try:
            self._state = self.store.read(self._state.id)
        except NotFoundError:
            pass
        return self._state

    @property
    def id(self) -> str:
        return self._state.id

    @property
    def name(self) -> str:
        return self._state.name

    @property
    def status(self) -> Status:
        return self.state.status

    @property
    def dir(self) -> Path:
        return self.store.dir(self.id)

    @property
    def files(self):
        """Read, write and list files in the running container (ember.sandbox.files.Files)."""
        from ember.sandbox.files import Files

        return Files(self)

    # --------------------------------------------------------------- create
    @classmethod
    def create(
        cls,
        image: str,
        command: builtins.list[str] | None = None,
        *,
        name: str | None = None,
        env: builtins.list[str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        entrypoint: builtins.list[str] | None = None,
        cpus: float | None = None,
        memory: str | int | None = None,
        tty: bool = False,
        stdin: bool = False,
        auto_remove: bool = False,
        ulimits: builtins.list[str] | None = None,
        labels: dict[str, str] | None = None,
        network: str = "none",
        publish: builtins.list[str] | None = None,
        console_size: tuple[int, int] | None = None,
        volumes: builtins.list[str] | None = None,
        mounts: builtins.list[str] | None = None,
        tmpfs: builtins.list[str] | None = None,
        privileged: bool = False,
        options: RunOptions | None = None,
        cfg: Config | None = None,
    ) -> Sandbox:
        """Boot a micro-VM and start the image's command in it; returns once it runs.

        network: "none" (loopback only) or "bridge" (ember0, see ember.net.bridge);
        publish: ``[IP:]HOSTPORT:CONTAINERPORT[/tcp]`` entries, bridge only.
        console_size: (rows, cols) the terminal starts with (tty only).
        volumes, mounts, tmpfs: ``-v``, ``--mount`` and ``--tmpfs`` as Docker spells
        them (named volumes, read-only or copied host folders, tmpfs; see
        :mod:`ember.sandbox.mounts`).
        privileged: every capability and the guest's devices, as Docker's
        ``--privileged`` (``ember.sandbox.spec.make_privileged``); guest only.
        options: capabilities, read-only root, hostname, /etc/hosts and DNS entries,
        restart policy, stop signal and time-out, health check, pull policy
        (:class:`ember.sandbox.options.RunOptions`).

        The sandbox monitor watches this process: if it ends before the
        container has started, the sandbox is torn down. With ``auto_remove``
        the monitor removes the sandbox once the container has exited and this
        process has read the exit code (:meth:`wait`) or ended.
        """
        cfg = cfg or load_config()
        run_opts = (options or RunOptions()).check(auto_remove)
        ports = check_network(network, publish or [])
        from ember.sandbox import mounts as mounts_mod

        wanted = mounts_mod.plan(volumes, mounts, tmpfs)  # checked before anything is made
        if cpus is not None and not (0 < cpus <= (os.cpu_count() or 1) * 4):
            raise EmberError(f"invalid --cpus {cpus}: must be > 0 and at most 4 x host cores")
        from ember.image.store import ImageStore

        images = ImageStore(cfg)
        with trace.span("image resolve"):
            img = resolve_image(images, image, run_opts.pull)
        memory_bytes = parse_size(memory) if memory is not None else None
        if memory_bytes is not None and memory_bytes < (6 << 20):
            raise EmberError(f"memory {memory} is too small: the minimum is 6m")
        vcpus = max(1, int(-(-cpus // 1))) if cpus else cfg.vm.vcpus
        mem_mib = (memory_bytes >> 20) + GUEST_OVERHEAD_MIB if memory_bytes else cfg.vm.memory_mib
        sandbox_id = new_id()
        opts = ProcessOptions(command=command or None, entrypoint=entrypoint, env=env or [],
                              workdir=workdir, user=user, tty=tty, ulimits=ulimits or [],
                              console_size=console_size)
        spec = build_spec(img.config, opts, hostname=sandbox_id[:12], cpus=cpus,
                          memory_bytes=memory_bytes)
        if privileged:
            make_privileged(spec)
        image_stop_signal(run_opts, img.config)
        apply_to_spec(spec, run_opts, sandbox_id)
        store = StateStore(cfg)
        with store.lock():
            if name is None:
                name = _generate_name(store)
            _check_name(name)
            if store.name_taken(name):
                raise EmberError(f"the name {name!r} is already in use by another sandbox")
            # Volumes in use are refused here, under the lock that orders every create.
            mount_records = mounts_mod.reserve(cfg, store.all(), wanted) if wanted else []
            state = SandboxState(
                id=sandbox_id, name=name, image=image, image_id=img.id,
                command=spec["process"]["args"], vcpus=vcpus, cpus=cpus, memory_mib=mem_mib,
                tty=tty, stdin=stdin, auto_remove=auto_remove, labels=labels or {},
                vmm_kind=cfg.vm.hypervisor, network=network, publish=ports,
                exec_defaults=_exec_defaults(spec["process"]), mounts=mount_records,
                creator_pid=os.getpid(), creator_started=process_started(os.getpid()),
                options=run_opts.record(),
            )
            store.create(state)
        pause_for_test("recorded")
        sb = cls(state, cfg)
        sb._created = True
        sb._mounts = wanted
        try:
            sb._launch(images, img, spec, stdin)
        except BaseException:
            sb._destroy()
            raise
        return sb

    def _launch(self, images, img, spec: dict, stdin: bool) -> None:
        from ember.storage.rootfs import flatten, prepare_writable

        with trace.span("monitor spawn"):
            proc, ready_r = self._spawn_monitor()
        with trace.span("disk prepare"):  # while the monitor starts the VM
            disk_dir = self.store.disk_dir(self.id)
            private_dir(disk_dir.parent)  # writable disks hold what the container wrote
            disk_dir.mkdir(mode=0o700, exist_ok=True)
            base = flatten(images, img)
            disk = prepare_writable(base, disk_dir / "rootfs")
            self.store.update(self.id, disk=str(disk.path))
        with trace.span("wait for monitor ready"):
            try:
                self._wait_ready(proc, ready_r)
            finally:
                if isinstance(proc, forkserver.Spawned):
                    proc.close()  # the server reaps it; we no longer want its status
        with trace.span("disk attach"):
            dev = self.monitor().attach_disk(str(disk.path), disk.format, drive_id="rootfs")
        from ember.sandbox import mounts

        wanted = self._mounts
        with trace.span("mounts attach"):
            extra_disks = mounts.attach(self, wanted, spec, disk_dir)
        agent = self.agent()
        prepare_guest(agent, self.dir, self.state, spec)  # /etc files; spec.json for restarts
        # -v SRC:DEST:copy goes in between create and start; without it the
        # agent starts the container in the same call.
        copies = mounts.has_copies(wanted)
        with trace.span("container create" if copies else "container create+start"):
            agent.create_container(self.id, spec,
                                   {"kind": dev.kind, "address": dev.address}, stdin=stdin,
                                   extra_disks=extra_disks, start=not copies)
        if copies:
            mounts.copy_in(self, wanted)
            with trace.span("container start"):
                agent.start_container(self.id)
        with trace.span("watch"):
            # The monitor records "running" (and from here on outlives us).
            self.monitor().watch(self.id, auto_stop=True)

    def _spawn_monitor(self) -> tuple[subprocess.Popen | forkserver.Spawned, int]:
        ready_r, ready_w = os.pipe()
        env = dict(os.environ)
        env["EMBER_DATA_DIR"] = str(self.cfg.data_dir)
        env["EMBER_STATE_DIR"] = str(self.cfg.state_dir)
        env["EMBER_ACCEL"] = self.cfg.vm.accel
        env["EMBER_TCG_TB_MIB"] = str(self.cfg.vm.tcg_tb_size_mib)
        if self.cfg.source:
            env["EMBER_CONFIG"] = self.cfg.source
        self.dir.mkdir(parents=True, exist_ok=True)
        trace_fd = trace.child_fd()  # EMBER_TRACE: the monitor's phases go to our stderr
        if trace_fd is not None:
            env[trace.FD_ENV] = str(trace_fd)
        # -P: `python -m` would put our working folder first on sys.path, and a
        # root monitor must not import a module someone left in it.
        argv = [sys.executable, "-P", "-m", "ember.sandbox.monitor", "--id", self.id,
                "--ready-fd", str(ready_w), "--creator-pid", str(os.getpid())]
        fds = (ready_w,) if trace_fd is None else (ready_w, trace_fd)
        try:
            with open(self.dir / "monitor.log", "ab") as log:
                # Forked by the fork server where it can (shared memory), else exec'd.
                proc = forkserver.spawn(self.cfg.state_dir, argv, env, log.fileno(), fds) or \
                    subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, start_new_session=True, env=env,
                                     close_fds=True)
        finally:
            os.close(ready_w)
            if trace_fd is not None:
                os.close(trace_fd)
        # At once, not only when the monitor gets to it: `ember ps` can tell
        # from the first moment whether a monitor serves this sandbox.
        self.store.modify(self.id, lambda st: None if st.monitor_pid else {
            "monitor_pid": proc.pid, "monitor_started": process_started(proc.pid)})
        return proc, ready_r

    def _wait_ready(self, proc: subprocess.Popen | forkserver.Spawned, ready_r: int) -> None:
        import select

        deadline = time.monotonic() + self.cfg.vm.boot_timeout + 120
        buf = b""
        try:
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EmberError("sandbox monitor did not report within the boot time-out")
                r, _, _ = select.select([ready_r], [], [], min(left, 1.0))
                if r:
                    chunk = os.read(ready_r, 4096)
                    if not chunk:
                        break
                    buf += chunk
        finally:
            os.close(ready_r)
        line = buf.decode(errors="replace").strip()
        if line == "OK":
            return
        if line.startswith("ERR "):
            _, err_code, msg = line.split(" ", 2)
            raise EmberError(msg, int(err_code))
        # The sandbox folder (and its logs) goes with the failed start: the error
        # carries what they say.
        code: int | None
        try:
            code = proc.wait(2)
        except subprocess.TimeoutExpired:
            code = None
        from ember.vmm.base import describe_exit

        how = "without a word" if code is None else describe_exit(code)
        raise EmberError(f"sandbox monitor exited during start-up ({how})"
                         f"{_log_tail(self.dir / 'monitor.log', 'monitor log')}"
                         f"{_log_tail(self.dir / 'console.log', 'guest console')}")

    # ------------------------------------------------------------ channels
    def _client(self):
        from ember.ttrpc import Client

        if self._rpc is None or self._rpc.closed:
            sock = self.dir / "api.sock"
            if not sock.exists():
                raise self.not_running_error()
            try:
                self._rpc = Client.connect_unix(str(sock), timeout=5)
            except OSError:
                raise self.not_running_error() from None
        return self._rpc

    def agent(self):
        """An AgentClient talking to the guest agent through the monitor."""
        from ember.sandbox.agent_client import AgentClient

        if self._agent is None or self._rpc is None or self._rpc.closed:
            self._agent = AgentClient(self._client())
        return self._agent

    def monitor(self) -> MonitorClient:
        """The sandbox monitor's own API (ember.sandbox.v1.Monitor), typed; its
        calls fail with one-line EmberErrors."""
        from ember.sandbox.monitor_rpc import MonitorClient

        return MonitorClient(self._client())

    def close(self) -> None:
        if self._rpc is not None:
            self._rpc.close()
        self._rpc = self._agent = None

    # ------------------------------------------------------------- process
    def wait(self, timeout: float | None = None) -> int:
        """Wait for the container to exit; its exit code.

        The monitor records the exit status only after it has copied all of the
        container's output to the log, so a caller that waits and then reads
        the log sees everything. The monitor answers (its ``Wait`` call) before
        an ``auto_remove`` sandbox goes; for the process that created such a
        sandbox, wait() then lets the monitor remove it and returns once it
        is gone.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with trace.span("exit"):
            code = self._wait_monitor(deadline)
            if code is None:  # no monitor to ask: the record tells
                code = self._wait_record(deadline)
        if self._created and self._state.auto_remove:
            with trace.span("teardown (creator waits)"):
                self.release()
        return code

    def _wait_monitor(self, deadline: float | None) -> int | None:
        """The exit code from the monitor's Wait; None if no monitor answers."""
        while True:
            left = 30.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"sandbox {self.name} still running")
            if not os.path.exists(self.dir / "api.sock"):
                return None
            try:
                out = self.monitor().wait(min(left, 30.0))
            except EmberError:
                return None
            if out.exited:
                return out.exit_code if out.HasField("exit_code") else 137

    def _wait_record(self, deadline: float | None) -> int:
        while True:
            try:
                st = self._state = self.store.read(self.id)
            except NotFoundError:
                raise NotFoundError(f"sandbox {self.name or self.id[:12]} was removed before "
                                    "its exit code could be read") from None
            if st.status in ENDED:
                return st.exit_code if st.exit_code is not None else 137
            if st.status == Status.UNKNOWN:
                raise self.not_running_error()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"sandbox {self.name} still running")
            time.sleep(0.05)

    def release(self, timeout: float = 60.0) -> None:
        """For the creator of an ``auto_remove`` sandbox: it has the output and the
        exit code, so the monitor may remove the sandbox now. Returns once the
        sandbox is gone; removes it here if its monitor died."""
        if not os.path.lexists(self.dir):
            return
        try:
            self.monitor().release()
        except EmberError:
            pass  # no monitor: removed below
        self.close()
        deadline = time.monotonic() + timeout
        next_look = time.monotonic() + 1.0
        while os.path.lexists(self.dir) and time.monotonic() < deadline:
            if time.monotonic() >= next_look:
                next_look += 1.0
                if not sandbox_processes(self.id)[0]:
                    break  # the monitor is gone (killed): finish the removal here
            time.sleep(0.01)
        if os.path.lexists(self.dir):
            self._destroy()

    def kill(self, sig: int | str = signal.SIGKILL) -> None:
        signum = signal_number(sig)
        self._require_running()
        self._hold_restarts()
        self.agent().signal_process(self.id, "", signum, all=False)

    def rename(self, name: str) -> None:
        """A new name (Docker's rename), checked and taken under the host-wide lock,
        so two renames (or a rename and a create) never end with one name twice."""
        _check_name(name)
        with self.store.lock():
            if self.store.name_taken(name):
                raise EmberError(f"the name {name!r} is already in use by another sandbox")
            self._state = self.store.rename(self.id, name)

    def _hold_restarts(self) -> None:
        """A container stopped or killed by hand is not restarted (Docker's rule)."""
        if RunOptions.from_record(self._state.options).restart != "no":
            self.store.update(self.id, stop_requested=True)

    def stop(self, timeout: float | None = None) -> int | None:
        """The stop signal (``--stop-signal``, else the image's, else SIGTERM), then
        SIGKILL after ``timeout`` seconds (else ``--stop-timeout``, else 10; -1 waits
        as long as it takes); the exit code."""
        st = self.state
        if st.status == Status.UNKNOWN:
            raise self.not_running_error()
        if st.status not in UP:
            return st.exit_code
        opts = RunOptions.from_record(st.options)
        if timeout is None:
            timeout = opts.stop_timeout if opts.stop_timeout is not None else 10.0
        try:
            try:
                self.kill(opts.stop_signal or signal.SIGTERM)
            except EmberError:
                if self.state.status not in UP:
                    raise
                # Between two runs of a restarting container: nothing to signal, and
                # the held restart makes the monitor stop now.
            try:
                return self.wait(None if timeout < 0 else timeout)
            except TimeoutError:
                self.kill(signal.SIGKILL)
                return self.wait(30)
        except EmberError:
            return self.state.exit_code

    def pause(self) -> None:
        self._require_running()
        self.monitor().pause()

    def resume(self) -> None:
        self.monitor().resume()

    def exec(self, command: builtins.list[str], *, env: builtins.list[str] | None = None, workdir: str | None = None,
             user: str | None = None, tty: bool = False, stdin: bytes | None = None,
             timeout: float | None = None, stream: bool = False):
        """Run a command in the running container and collect its output.

        Like ``docker exec``, the command gets the container's environment,
        working directory and user; ``env`` adds to (or overrides) the
        environment, ``workdir`` and ``user`` replace the others.

        With ``stream=True`` this returns an :class:`ember.sandbox.execstream.ExecStream`
        at once: iterate it for ``(stream, data)`` pairs as the process writes
        them, then read its ``exit_code``.
        """
        exec_id = self.start_exec(command, env=env, workdir=workdir, user=user, tty=tty,
                                  stdin=stdin is not None)
        if stream:
            from ember.sandbox.execstream import ExecStream

            return ExecStream(self, exec_id, stdin)
        agent = self.agent()
        if stdin is not None:
            if stdin:
                agent.write_stdin(self.id, exec_id, stdin)
            agent.close_stdin(self.id, exec_id)
        out, err = _collect(agent, self.id, exec_id)
        code = agent.wait_process(self.id, exec_id).exit_status
        return ExecResult(code, out(), err(), exec_id)

    def start_exec(self, command: builtins.list[str], *, env: builtins.list[str] | None = None,
                   workdir: str | None = None, user: str | None = None, tty: bool = False,
                   stdin: bool = False, console_size: tuple[int, int] | None = None) -> str:
        self._require_running()
        if not command:
            raise EmberError("exec needs a command")
        from ember.image.store import ImageStore

        st = self.state
        try:
            img_cfg = ImageStore(self.cfg).resolve(st.image_id).config
        except EmberError:
            img_cfg = {}
        base = st.exec_defaults  # the container's own process (empty in older records)
        opts = ProcessOptions(command=command, entrypoint=[], env=env or [],
                              workdir=workdir or base.get("cwd"),
                              user=user if user is not None else base.get("user"), tty=tty,
                              console_size=console_size)
        process = build_process(img_cfg, opts, base_env=base.get("env"))
        exec_id = "exec-" + secrets.token_hex(6)
        self.agent().exec_process(self.id, exec_id, process, stdin=stdin)
        return exec_id

    def _require_running(self) -> None:
        if self.state.status not in UP:
            raise self.not_running_error()

    def not_running_error(self) -> EmberError:
        """A one-line error saying why the sandbox cannot be used."""
        st = self.state
        label = st.name or st.short_id
        if st.status == Status.DEAD:
            return EmberError(f"sandbox {label} is dead: {st.error or 'its VM is gone'}")
        if st.status == Status.UNKNOWN:
            return EmberError(f"sandbox {label}: {st.error}; `ember rm -f {st.short_id}` "
                              "removes it")
        if st.status in UP:
            return EmberError(f"sandbox {label} does not answer (status {st.status})")
        return EmberError(f"sandbox {label} is not running (status {st.status})")

    def death_error(self, wait: float = 0.0) -> EmberError | None:
        """The error to end with if the sandbox died (monitor or VM gone), waiting up
        to ``wait`` seconds for the monitor to record it; None while it lives."""
        deadline = time.monotonic() + wait
        while True:
            if self.state.status in (Status.DEAD, Status.UNKNOWN):
                return self.not_running_error()
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    # ----------------------------------------------------------------- logs
    def logs(self, follow: bool = False, poll: float = 0.1) -> Iterator[tuple[str, bytes]]:
        """(stream, data) pairs from the container's log, optionally following it.

        The rotated files (``container.log.N``, oldest first) come before
        ``container.log``; the files are streamed in small chunks, and a
        follower keeps up with rotations until the container has exited.
        """
        from ember.sandbox.logfile import LOG_NAME, read_log

        return read_log(self.dir / LOG_NAME, follow=follow, poll=poll,
                        running=lambda: self.status in LIVE)

    # -------------------------------------------------------------- inspect
    def inspect(self) -> dict:
        st = self.state
        data = asdict(st)
        data["short_id"] = st.short_id
        data["state_dir"] = str(self.dir)
        data["console_log"] = str(self.dir / "console.log")
        data["log_path"] = str(self.dir / "container.log")
        return data

    def host_pids(self) -> builtins.list[int]:
        st = self.state
        return [p for p in (st.vmm_pid, st.monitor_pid) if p]

    def guest_memory_bytes(self) -> int:
        return self.state.memory_mib << 20

    # --------------------------------------------------------------- remove
    def remove(self, force: bool = False) -> None:
        """Delete the sandbox; with force, stop it first even if it runs."""
        st = self.state
        if st.status in LIVE and not force:
            raise EmberError(f"sandbox {st.name} is {st.status}: stop it first or use force")
        if st.status == Status.UNKNOWN and not force:
            raise EmberError(f"sandbox {st.name or st.short_id}: {st.error}: it may still run, "
                             "remove it with force (`ember rm -f`)")
        self._destroy()

    def _destroy(self) -> None:
        """Remove the sandbox and everything it made, from its id alone; idempotent
        (:func:`ember.sandbox.cleanup.destroy`, which a monitor's ``--rm`` runs too)."""
        from ember.sandbox.cleanup import destroy

        st = self._state
        try:
            st = self.store.load(self.id)
        except EmberError:
            pass  # unreadable: what cleanup needs is worked out from the id
        try:
            destroy(self.cfg, st, ask_shutdown=self._ask_shutdown)
        finally:
            self.close()

    def _ask_shutdown(self) -> bool:
        """Ask the monitor to power the VM off and exit; False if it does not answer."""
        try:
            self.monitor().shutdown(timeout=10)
            return True
        except EmberError:  # no socket, refused, or the monitor went away
            return False
        finally:
            self.close()


def _exec_defaults(process: dict) -> dict:
    """What `ember exec` inherits from the container's process: env, cwd, user
    (not the TERM a terminal added: the exec says whether it has one)."""
    env = [e for e in process.get("env", []) if e != "TERM=xterm" or not process.get("terminal")]
    user = process.get("user") or {}
    return {"env": env, "cwd": process.get("cwd") or "/",
            "user": f"{user.get('uid', 0)}:{user.get('gid', 0)}"}


def _log_tail(path: Path, what: str, lines: int = 4) -> str:
    """``; WHAT: last | lines`` of a log in the sandbox folder, for an error message
    (the folder may be gone by the time anyone reads the message)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            f.seek(max(0, os.fstat(fd).st_size - 8192))
            text = f.read(8192).decode("utf-8", "replace").replace("\r", "")
    except OSError:
        return ""
    tail = [line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()]
    return f"; {what}: {' | '.join(tail)}" if tail else ""


def _collect(agent, cid: str, exec_id: str):
    """Read stdout and stderr to their end in two threads; returns two getters.

    A getter waits for both and raises the error a reader met, if any (a
    process gone or a closed agent only ends the output: see ember.sandbox.output).
    """
    results: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    errors: list[Exception] = []

    def pump(stream: str) -> None:
        try:
            for data in agent.iter_output(cid, exec_id, stream, wait_ms=1000):
                results[stream] += data
        except (EmberError, OSError) as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pump, args=(s,), daemon=True) for s in results]
    for t in threads:
        t.start()

    def getter(stream: str):
        def get() -> bytes:
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return bytes(results[stream])
        return get

    return getter("stdout"), getter("stderr")


def _check_name(name: str) -> None:
    if not name or name[0] in ".-" or any(c not in NAME_CHARS for c in name.lower()) or len(name) > 128:
        raise EmberError(f"invalid sandbox name {name!r}: use letters, digits, _ . -")


_ADJ = ["brave", "calm", "eager", "fancy", "gentle", "happy", "keen", "lucid", "merry", "quiet"]
_NOUN = ["ember", "spark", "flame", "cinder", "blaze", "torch", "glow", "flare", "coal", "ash"]


def _generate_name(store: StateStore) -> str:
    for _ in range(50):
        name = f"{secrets.choice(_ADJ)}_{secrets.choice(_NOUN)}_{secrets.token_hex(2)}"
        if not store.name_taken(name):
            return name
    return "sandbox_" + secrets.token_hex(6)


def run(image: str, command: list[str] | None = None, *, stdin: bytes | None = None,
        remove: bool = True, **kwargs: object) -> RunResult:
    """Run a container to completion and return its exit code and output."""
    sb = Sandbox.create(image, command, stdin=stdin is not None, **kwargs)  # type: ignore[arg-type]
    try:
        if stdin is not None:
            agent = sb.agent()
            if stdin:
                agent.write_stdin(sb.id, "", stdin)
            agent.close_stdin(sb.id, "")
        out, err = bytearray(), bytearray()
        for stream, data in sb.logs(follow=True, poll=0.02):
            (out if stream == "stdout" else err).extend(data)
        code = sb.wait()
        return RunResult(code, bytes(out), bytes(err))
    finally:
        if remove and os.path.lexists(sb.dir):  # auto_remove: the monitor removed it
            sb._destroy()
