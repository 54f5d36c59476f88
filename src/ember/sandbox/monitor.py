"""The sandbox monitor: one small host process per ``ember run`` sandbox.

Like a containerd shim, it outlives the CLI that started it. It owns the VM
(QEMU is its child), holds the single agent connection, and serves a ttrpc
socket (``api.sock``) in the sandbox folder that any number of CLI processes
may use at once:

* ``ember.agent.v1.Agent``: every agent method, forwarded byte-for-byte;
* ``ember.sandbox.v1.Monitor``: host-side operations (``monitor.proto``, both
  ends in :mod:`ember.sandbox.monitor_rpc`): attach and detach disks, watch the
  main container, pause/resume, wait for its end, shut down.

While a container is watched, its output is copied into ``container.log``
(JSON lines, like Docker's json-file driver, rotated past ``[logs] max_size``:
see :mod:`ember.sandbox.logfile`) so ``ember logs`` works after the VM is gone,
and its exit status is recorded in ``state.json``. The guest console log is
kept under ``[logs] console_max_size``. When the main container exits, the
monitor stops the VM and exits.

The monitor also carries out what no CLI process has to survive for:

* ``--rm`` (``auto_remove`` in the record): once the container has exited (or
  the VM died, or the monitor got SIGTERM), the monitor removes the sandbox
  itself, with the same code as ``ember rm -f``: VM, jail, cgroups, network,
  disks, sandbox folder. The process that created the sandbox (``--creator-pid``,
  watched through a pidfd, so no polling) may hold the removal until it has
  read the output and the exit code (``Release``, or it ends); ``Wait`` answers
  anyone who waits for the exit, before anything is removed.
* abandoned starts: if the creator ends before the container was started
  (``Watch``), the start is abandoned and the sandbox torn down at once, the
  VM killed even mid-boot. Without a creator pid, a container not started
  within ``START_TIMEOUT_S`` of the VM being ready is abandoned the same way.

Run as ``python -m ember.sandbox.monitor --id ID --ready-fd N [--creator-pid PID]``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ember import trace
from ember.agent.proto import AGENT_SERVICE, agent_pb2
from ember.config import load_config
from ember.errors import EmberError, NotFoundError
from ember.jailer import launch
from ember.sandbox import events
from ember.sandbox.health import HealthChecker
from ember.sandbox.logfile import LOG_NAME, RotatingLog
from ember.sandbox.monitor_rpc import MonitorService
from ember.sandbox.output import OutputReader, read_method
from ember.sandbox.restart import Restarter
from ember.sandbox.state import StateStore, kill_pid
from ember.sandbox.status import Status
from ember.sandbox.vm import SandboxVM, prepare_launch
from ember.stopsignal import StopSignals
from ember.ttrpc import Server, TTRPCError

START_TIMEOUT_S = 300.0  # without a creator pid: ready VM, no container started → abandoned
WAIT_MAX_S = 60.0  # the longest a Wait call blocks before answering "not yet"
PUMP_WAIT_MS = 30_000  # container output long poll (issue 14: idle guests stay idle)


class Monitor:
    def __init__(self, sandbox_id: str, creator_pid: int | None = None) -> None:
        self.cfg = load_config()
        self.store = StateStore(self.cfg)
        self.id = sandbox_id
        self.dir = self.store.dir(sandbox_id)
        st = self.store.load(sandbox_id)
        self.auto_remove = st.auto_remove
        # Named volumes outlive the sandbox: the guest must flush them even with --rm.
        self.keeps_data = any(m.get("kind") == "volume" and not m.get("readonly")
                              for m in st.mounts)
        self.creator_pid = creator_pid
        self.creator_started = st.creator_started if st.creator_pid == creator_pid else None
        self.network = st.network
        self.publish = list(st.publish)
        self.proxies: list = []  # ember.net.proxy.TCPProxy, one per published port
        self.vm = SandboxVM(self.cfg, sandbox_id, self.dir, st.vcpus, st.memory_mib,
                            nic=st.network == "bridge", cpus=st.cpus)
        self.events = events.SandboxEvents(self.cfg.state_dir, sandbox_id, st.name, st.image,
                                           st.vmm_kind)
        self.restarter = Restarter(self.store, sandbox_id, st.options)  # --restart
        self.health = HealthChecker(self.store, sandbox_id, st.options)  # --health-cmd
        self.rootfs: dict | None = None  # the container's disk, for restarts
        self.server = Server()
        self.done = threading.Event()  # stopping: nothing new starts
        self._stopping = threading.Lock()
        # Lifecycle (see the module docstring); _phase orders "started" against "abandoned".
        self._phase = threading.Lock()
        self.booted = threading.Event()  # the boot is over, one way or the other
        self.serving = False  # ready was reported: api.sock serves
        self.started = threading.Event()  # Watch: the container runs
        self.finished = threading.Event()  # stopped, and the outcome recorded in self.result
        self.released = threading.Event()  # the creator has what it needs, or is gone
        self.removing = False  # Shutdown: `ember rm` removes the sandbox, not us
        self.abandoned = ""  # why the start was given up
        self.result: dict[str, object] = {}
        self._waits = 0  # Wait calls not yet answered
        self._waits_cv = threading.Condition()
        self._log: RotatingLog | None = None
        self._complained: set[str] = set()

    # ------------------------------------------------------------- serving
    def register(self) -> None:
        """api.sock serves the agent's methods (forwarded) and monitor.proto's."""
        service = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
        for method in service.methods:
            self.server.register(AGENT_SERVICE, method.name, self._forwarder(method.name))
        MonitorService(self).register(self.server)

    def _forwarder(self, method: str):
        def forward(payload: bytes, ctx) -> bytes:
            if self.vm.rpc is None:
                raise TTRPCError(14, "sandbox VM is not running")
            return self.vm.rpc.call(AGENT_SERVICE, method, payload, timeout=ctx.time_left())
        return forward

    # ---------------------------------- methods (the wire: ember.sandbox.monitor_rpc)
    def status(self) -> tuple[int | None, bool]:
        """(the VMM's pid, whether the VM came from a template)."""
        vmm = self.vm.vmm
        return (vmm.pid if vmm else None), self.vm.restored

    def attach_disk(self, path: str, format: str = "raw", readonly: bool = False,
                    drive_id: str | None = None) -> tuple[str, str, str]:
        """Hot-plug a disk image; (drive id, kind, address) for the guest to find it."""
        drive_id, dev = self.vm.attach_disk(Path(path), format, readonly, drive_id)
        if drive_id == "rootfs":
            self.rootfs = {"kind": dev.kind, "address": dev.address}
        return drive_id, dev.kind, dev.address

    def detach_disk(self, drive_id: str) -> None:
        self.vm.detach_disk(drive_id)

    def pause(self) -> None:
        assert self.vm.vmm is not None
        self.vm.vmm.pause()
        self.store.update(self.id, status=Status.PAUSED)
        self.events.container("pause")

    def resume(self) -> None:
        assert self.vm.vmm is not None
        self.vm.vmm.resume()
        self.store.update(self.id, status=Status.RUNNING)
        self.events.container("unpause")

    def watch(self, container_id: str, auto_stop: bool = True) -> None:
        with self._phase:
            if self.done.is_set():
                why = f": start abandoned: {self.abandoned}" if self.abandoned else ""
                raise EmberError(f"the sandbox is stopping{why}")
            self.started.set()  # from here on, the creator may go away
        # The monitor says "running", so a creator killed right after this call
        # leaves no sandbox "creating" forever; an exit is recorded only later.
        self.store.modify(self.id, lambda st: {"status": Status.RUNNING}
                          if st.status == Status.CREATING else None)
        self.events.container("start")
        if self._log is None:
            self._log = RotatingLog(self.dir / LOG_NAME, self.cfg.logs.max_bytes,
                                    self.cfg.logs.max_files)
        streams = self._pumps(container_id)
        threading.Thread(target=self._wait_main, args=(container_id, streams, auto_stop),
                         daemon=True).start()
        self.health.start(self.vm, container_id, self.done)

    def _pumps(self, container_id: str) -> list[threading.Thread]:
        """Copy the container's stdout and stderr into the log (each run of it)."""
        assert self._log is not None
        streams = [threading.Thread(target=self._pump, args=(container_id, s, self._log),
                                    daemon=True) for s in ("stdout", "stderr")]
        for t in streams:
            t.start()
        return streams

    def shutdown(self) -> None:
        """`ember rm` (or a failed create) removes the sandbox: stop, and leave it to them."""
        self.removing = True
        self.released.set()
        threading.Thread(target=self.stop, args=(Status.EXITED,), daemon=True).start()

    def release(self) -> None:
        """The creator has read the output and the exit code: --rm may go ahead."""
        self.released.set()

    def wait(self, timeout: float | None,
             after_response: Callable[[Callable[[], None]], None]) -> dict | None:
        """Block until the sandbox has stopped, at most ``timeout`` seconds (None or
        more than WAIT_MAX_S: WAIT_MAX_S); its outcome (status, exit_code,
        oom_killed, error), or None if it still runs.

        ``after_response`` runs a function once the answer is on the wire: nothing
        is removed before every such answer has been sent.
        """
        with self._waits_cv:
            self._waits += 1
        after_response(self._wait_answered)
        limit = WAIT_MAX_S if timeout is None else min(max(timeout, 0.0), WAIT_MAX_S)
        return dict(self.result) if self.finished.wait(limit) else None

    def _wait_answered(self) -> None:
        with self._waits_cv:
            self._waits -= 1
            self._waits_cv.notify_all()

    def _drain_waits(self, timeout: float) -> None:
        with self._waits_cv:
            self._waits_cv.wait_for(lambda: self._waits <= 0, timeout)

    # ---------------------------------------------------------- watching
    def _pump(self, cid: str, stream: str, log: RotatingLog) -> None:
        """Copy one stream into the log until it ends (ember.sandbox.output's policy)."""
        rpc = self.vm.rpc
        if rpc is None:
            return  # never booted: nothing to copy
        method = read_method(stream)

        def read(offset: int, wait_ms: int) -> agent_pb2.ReadStreamResponse:
            req = agent_pb2.ReadStreamRequest(container_id=cid, offset=offset, wait_ms=wait_ms)
            return rpc.call(AGENT_SERVICE, method, req, agent_pb2.ReadStreamResponse,
                            timeout=wait_ms / 1000 + 30)

        # A long poll: the agent answers as soon as there is output or EOF, so an
        # idle container costs the guest one wake-up per PUMP_WAIT_MS, not per second.
        reader = OutputReader(read, wait_ms=PUMP_WAIT_MS, closed=lambda: rpc.closed,
                              stop=self.done.is_set)
        try:
            for data in reader:
                try:
                    log.write(stream, data)
                except (OSError, EmberError) as exc:
                    # Keep draining, so the container never blocks on a full pipe.
                    self._complain("log", f"container output dropped: {exc}")
        except (TTRPCError, OSError, EmberError) as exc:
            self._complain("output", f"container {stream} no longer copied: {exc}")

    def _complain(self, what: str, message: str) -> None:
        """One line in monitor.log per kind of trouble, not one per record."""
        if what not in self._complained:
            self._complained.add(what)
            print(f"ember-monitor {self.id[:12]}: {message}", file=sys.stderr, flush=True)

    def _wait_main(self, cid: str, streams: list[threading.Thread], auto_stop: bool) -> None:
        req = agent_pb2.ProcessRequest(container_id=cid)
        while True:
            try:
                rpc = self.vm.rpc
                if rpc is None:
                    return  # never booted: nothing to wait for
                resp = rpc.call(AGENT_SERVICE, "WaitProcess", req, agent_pb2.WaitProcessResponse)
            except (TTRPCError, OSError, AttributeError):
                return  # the VM went away: stop() records why
            for t in streams:
                t.join(timeout=5)
            if not self._restarted(cid, resp):
                break
            streams = self._pumps(cid)
        result = {"status": Status.EXITED, "exit_code": resp.exit_status, "finished": time.time(),
                  "oom_killed": resp.oom_killed}
        if auto_stop:
            # Stop the VM before saying "exited": whoever waits on the status may
            # then count on the VM being gone.
            self.stop(None, final=result)
        else:
            self.store.update(self.id, **result)

    def _restarted(self, cid: str, resp) -> bool:
        """--restart: the container was started again (see ember.sandbox.restart)."""
        if self.rootfs is None or not self.restarter.wanted(resp.exit_status):
            return False
        from ember.sandbox.agent_client import AgentClient

        self.events.outcome(Status.EXITED, resp.exit_status, resp.oom_killed)
        try:
            rpc = self.vm.rpc
            if rpc is None:  # not after _wait_main waited through it
                raise EmberError("the VM has no agent connection")
            if not self.restarter.restart(AgentClient(rpc), self.rootfs, self.done.is_set):
                return False
        except (EmberError, TTRPCError, OSError, ValueError) as exc:
            self._complain("restart", f"restart failed: {exc}")
            return False
        self.events.container("restart")
        return True

    def _watch_vmm(self) -> None:
        """Record a VMM that dies on its own (crash, kill -9) and stop serving."""
        vmm = self.vm.vmm
        assert vmm is not None
        vmm.wait()
        if not self.done.is_set():
            tail = vmm.console_tail(3).replace("\n", " | ") or "(empty)"
            error = (f"VMM exited unexpectedly ({vmm.label} {vmm.exit_description()}); "
                     f"guest console: {tail}")
            self._complain("vmm", error)
            self.events.vm("crash", error=error)
            self.stop(Status.DEAD, error=error)

    # ------------------------------------------------------------ creator
    def _watch_creator(self) -> None:
        """Follow the process that creates the sandbox (a pidfd: no polling)."""
        pid = self.creator_pid
        if not pid:
            self.released.set()  # nobody to wait for; a start deadline instead
            threading.Thread(target=self._start_deadline, daemon=True).start()
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = None
        # The pid may already be someone else's: the creator's start time (in
        # the record) tells. (Our parent is not a sign: the fork server forks us.)
        if fd is None or not self._is_creator(pid):
            if fd is not None:
                os.close(fd)
            threading.Thread(target=self._creator_gone, daemon=True).start()
            return

        def follow() -> None:
            try:
                select.select([fd], [], [])
            finally:
                os.close(fd)
            self._creator_gone()

        threading.Thread(target=follow, daemon=True, name="creator").start()

    def _is_creator(self, pid: int) -> bool:
        from ember.sandbox.state import process_started

        if self.creator_started is None:  # a record without it: alive (the pidfd) is all
            return True
        started = process_started(pid)
        return started is not None and abs(started - self.creator_started) <= 0.5

    def _start_deadline(self) -> None:
        if not self.booted.wait(self.cfg.vm.boot_timeout + 600):
            return
        if not self.started.wait(START_TIMEOUT_S):
            self._abandon(f"no container was started within {START_TIMEOUT_S:.0f}s")

    def _creator_gone(self) -> None:
        self.released.set()
        self._abandon(f"its creator (pid {self.creator_pid}) ended before the container "
                      "was started")

    def _abandon(self, why: str) -> None:
        """Give up a start that nobody will finish: the sandbox is torn down."""
        with self._phase:
            if self.started.is_set() or self.abandoned:
                return
            self.abandoned = why
            serving, stopping = self.serving, self.done.is_set()
        self._complain("start", f"start abandoned: {why}")
        if stopping:
            return  # run() removes a sandbox whose container never started
        if serving:
            self.stop(Status.DEAD, error=f"start abandoned: {why}")
            return
        # Mid-boot: kill the VMM as soon as it exists, so the boot fails now
        # rather than after a full boot; run() then tears everything down.
        while not self.booted.is_set():
            vmm = self.vm.vmm
            if vmm is not None and vmm.pid:
                kill_pid(vmm.pid, self.id[:12])
            self.booted.wait(0.05)

    # ----------------------------------------------------------- lifecycle
    def stop(self, status: Status | None, error: str = "", final: dict | None = None) -> None:
        """Stop the VM and record the outcome; run() then stops serving (and, for
        --rm or an abandoned start, removes the sandbox). ``status``: DEAD (the VM
        or the start is lost), EXITED (asked to stop), None (the container ended:
        ``final`` says how)."""
        with self._stopping:
            if self.done.is_set():
                return
            self.done.set()
        result: dict[str, object] = {"status": status or Status.EXITED, "exit_code": None,
                                     "oom_killed": False, "error": error, **(final or {})}
        try:
            with trace.span("teardown: vm stop"):
                # --rm: the disks go with the sandbox, so no guest power-off to wait for
                # (unless a named volume, which stays, was written).
                self.vm.shutdown(timeout=5, clean=not self.auto_remove or self.keeps_data)
        finally:
            if self._log is not None:
                self._log.close()
            self._release_network()
            changes: dict[str, object] = {"vmm_pid": None, "monitor_pid": None, **(final or {})}
            if self.network == "bridge":
                changes.update(ip_address="", netns="")  # released, as Docker does on stop
            try:
                st = self.store.load(self.id)
                if status == Status.DEAD or (status and st.status != Status.EXITED):
                    changes["status"] = status
                if error:
                    changes["error"] = error
                st = self.store.update(self.id, **changes)
                result = {"status": st.status, "exit_code": st.exit_code,
                          "oom_killed": st.oom_killed, "error": st.error}
            except EmberError:
                pass  # the folder is already being removed
            if self.started.is_set():
                self.events.outcome(**result)  # type: ignore[arg-type]
            self.result = result
            self.finished.set()

    # ---------------------------------------------------------- network
    def _boot(self) -> None:
        """Boot the VM; with --network bridge, on its own eth0 and with the ports bound."""
        if self.network != "bridge":
            self.vm.boot()
            return
        from ember.net import bridge
        from ember.net.proxy import TCPProxy, parse_publish

        # Bind first: a port in use must fail before anything else is made.
        for p in self.publish:
            self.proxies.append(TCPProxy(parse_publish(p)))
        ip, netns = bridge.connect(
            self.cfg, self.id, lambda ip, ns: self.store.update(self.id, ip_address=ip, netns=ns))
        self.vm.boot(netns=netns)
        for proxy in self.proxies:
            proxy.start(ip)

    def _release_network(self) -> None:
        for proxy in self.proxies:
            proxy.close()
        self.proxies = []
        if self.network == "bridge":
            from ember.net import bridge

            try:
                bridge.disconnect(self.cfg, self.id)
            except EmberError:
                pass  # `ember rm` tries again from state.json

    def run(self, ready_fd: int | None) -> int:
        def report(msg: str) -> None:
            if ready_fd is not None:
                try:
                    os.write(ready_fd, msg.encode() + b"\n")
                    os.close(ready_fd)
                except OSError:
                    pass
        trace.mark("monitor start", trace.process_start())  # interpreter, imports, config
        prepare_launch(self.cfg)  # while we have one thread: the jailer then needs no exec
        self._watch_creator()
        try:
            from ember.sandbox.state import process_started

            # With its start time: `ember ps` tells this process from a reused pid.
            self.store.update(self.id, monitor_pid=os.getpid(),
                              monitor_started=process_started(os.getpid()))
            self.events.container("create")
            began = time.monotonic()
            try:
                self._boot()
            finally:
                if self.cfg.jailer.enabled:
                    launch.discard()  # unused if the boot failed early
            events.vm_booted(self.events, self.vm, time.monotonic() - began)
            assert self.vm.vmm is not None
            self.store.update(self.id, vmm_pid=self.vm.vmm.pid,
                              restored_from_snapshot=self.vm.restored,
                              jail=self.vm.jail_record())
            with self._phase:
                if self.abandoned:
                    raise EmberError(f"start abandoned: {self.abandoned}")
                self.serving = True
        except Exception as exc:  # noqa: BLE001 - report any boot failure to the waiting CLI
            self.booted.set()
            if not self.abandoned:
                events.vm_boot_failed(self.events, self.vm, str(exc))
            self.vm.kill()
            self._release_network()
            if isinstance(exc, EmberError):
                report(f"ERR {exc.exit_code} {exc.message}")
            else:
                report(f"ERR 125 sandbox monitor failed: {exc!r}")
            # The creator removes a failed start (and SIGTERMs us meanwhile); if it
            # ends before that, nobody else will.
            if self.released.wait(60):
                self._remove_sandbox()
            return 1
        self.booted.set()
        self.register()
        threading.Thread(target=self._watch_vmm, daemon=True).start()
        StopSignals([signal.SIGTERM]).on_signal(lambda _sig: self.stop(Status.EXITED))
        ready = threading.Event()
        t = threading.Thread(target=self.server.serve_unix, args=(str(self.dir / "api.sock"), ready),
                             daemon=True)
        t.start()
        ready.wait(10)
        report("OK")
        self.finished.wait()
        if self.started.is_set():
            remove = self.auto_remove
            if remove:  # --rm: the creator may still be reading the output and the code
                self.released.wait()
        else:  # the start never completed: its creator removes it, or we do once it is gone
            self.released.wait(60)
            remove = self.released.is_set()
        remove = remove and not self.removing  # `ember rm` (Shutdown) removes it itself
        self._drain_waits(2.0)  # every waiter has its answer before anything goes
        self.server.shutdown()
        t.join(5)
        if remove:
            with trace.span("teardown: remove"):
                self._remove_sandbox()
        return 0

    def _remove_sandbox(self) -> None:
        """Tear the sandbox down completely: the code path of `ember rm -f`."""
        from ember.sandbox.cleanup import destroy

        try:
            # Not "ours" any more: removal must not wait for (or kill) this process.
            st = self.store.update(self.id, monitor_pid=None, monitor_started=None,
                                   vmm_pid=None)
        except NotFoundError:
            return  # removed already
        except EmberError:
            st = self.store.unknown(self.id, "")
        try:
            destroy(self.cfg, st)
        except Exception as exc:  # noqa: BLE001 - say it in monitor.log; `ember rm -f` finishes
            self._complain("remove", f"removing the sandbox failed: {exc!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember-monitor")
    parser.add_argument("--id", required=True)
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--creator-pid", type=int,
                        help="the process creating the sandbox: if it ends before the "
                             "container starts, the sandbox is torn down")
    args = parser.parse_args(argv)
    return Monitor(args.id, args.creator_pid).run(args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
