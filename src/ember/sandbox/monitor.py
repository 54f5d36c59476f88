"""The sandbox monitor: one small host process per ``ember run`` sandbox.

Like a containerd shim, it outlives the CLI that started it. It owns the VM
(QEMU is its child), holds the single agent connection, and serves a ttrpc
socket (``api.sock``) in the sandbox folder that any number of CLI processes
may use at once:

* ``ember.agent.v1.Agent``: every agent method, forwarded byte-for-byte;
* ``ember.sandbox.v1.Monitor``: host-side operations (JSON payloads): attach
  and detach disks, watch the main container, pause/resume, shut down.

While a container is watched, its output is copied into ``container.log``
(JSON lines, like Docker's json-file driver, rotated past ``[logs] max_size``:
see :mod:`ember.sandbox.logfile`) so ``ember logs`` works after the VM is gone,
and its exit status is recorded in ``state.json``. The guest console log is
kept under ``[logs] console_max_size``. When the main container exits, the
monitor stops the VM and exits.

Run as ``python -m ember.sandbox.monitor --id ID --ready-fd N``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from ember.agent.proto import agent_pb2
from ember.config import load_config
from ember.errors import EmberError
from ember.sandbox.logfile import LOG_NAME, RotatingLog
from ember.sandbox.state import StateStore
from ember.sandbox.vm import SandboxVM
from ember.ttrpc import Server, TTRPCError

AGENT_SERVICE = "ember.agent.v1.Agent"
MONITOR_SERVICE = "ember.sandbox.v1.Monitor"


class Monitor:
    def __init__(self, sandbox_id: str) -> None:
        self.cfg = load_config()
        self.store = StateStore(self.cfg)
        self.id = sandbox_id
        self.dir = self.store.dir(sandbox_id)
        st = self.store.load(sandbox_id)
        self.network = st.network
        self.publish = list(st.publish)
        self.proxies: list = []  # ember.net.proxy.TCPProxy, one per published port
        self.vm = SandboxVM(self.cfg, sandbox_id, self.dir, st.vcpus, st.memory_mib,
                            nic=st.network == "bridge", cpus=st.cpus)
        self.server = Server()
        self.done = threading.Event()
        self._stopping = threading.Lock()
        self._log: RotatingLog | None = None
        self._complained: set[str] = set()

    # ------------------------------------------------------------- serving
    def register(self) -> None:
        service = agent_pb2.DESCRIPTOR.services_by_name["Agent"]
        for method in service.methods:
            self.server.register(AGENT_SERVICE, method.name, self._forwarder(method.name))
        for name in ("Status", "AttachDisk", "DetachDisk", "Watch", "Pause", "Resume",
                     "Shutdown"):
            self.server.register(MONITOR_SERVICE, name, self._json_handler(getattr(self, name)))

    def _forwarder(self, method: str):
        def forward(payload: bytes, ctx) -> bytes:
            if self.vm.rpc is None:
                raise TTRPCError(14, "sandbox VM is not running")
            return self.vm.rpc.call(AGENT_SERVICE, method, payload, timeout=ctx.time_left())
        return forward

    @staticmethod
    def _json_handler(fn):
        def handle(payload: bytes, ctx) -> bytes:
            try:
                args = json.loads(payload or b"{}")
                return json.dumps(fn(**args) or {}).encode()
            except EmberError as exc:
                raise TTRPCError(9, exc.message) from None
            except (TypeError, ValueError) as exc:
                raise TTRPCError(3, f"bad request: {exc}") from None
        return handle

    # ------------------------------------------------------------ methods
    def Status(self) -> dict:
        vmm = self.vm.vmm
        return {"vmm_pid": vmm.pid if vmm else None, "restored": self.vm.restored}

    def AttachDisk(self, path: str, format: str = "raw", readonly: bool = False,
                   drive_id: str | None = None) -> dict:
        drive_id, dev = self.vm.attach_disk(Path(path), format, readonly, drive_id)
        return {"drive_id": drive_id, "kind": dev.kind, "address": dev.address}

    def DetachDisk(self, drive_id: str) -> dict:
        self.vm.detach_disk(drive_id)
        return {}

    def Pause(self) -> dict:
        assert self.vm.vmm is not None
        self.vm.vmm.pause()
        self.store.update(self.id, status="paused")
        return {}

    def Resume(self) -> dict:
        assert self.vm.vmm is not None
        self.vm.vmm.resume()
        self.store.update(self.id, status="running")
        return {}

    def Watch(self, container_id: str, auto_stop: bool = True) -> dict:
        if self._log is None:
            self._log = RotatingLog(self.dir / LOG_NAME, self.cfg.logs.max_bytes,
                                    self.cfg.logs.max_files)
        log = self._log
        streams = [threading.Thread(target=self._pump, args=(container_id, s, log), daemon=True)
                   for s in ("stdout", "stderr")]
        for t in streams:
            t.start()
        threading.Thread(target=self._wait_main, args=(container_id, streams, auto_stop),
                         daemon=True).start()
        return {}

    def Shutdown(self) -> dict:
        threading.Thread(target=self.stop, args=("removed",), daemon=True).start()
        return {}

    # ---------------------------------------------------------- watching
    def _pump(self, cid: str, stream: str, log: RotatingLog) -> None:
        method = "ReadStdout" if stream == "stdout" else "ReadStderr"
        offset = 0
        while not self.done.is_set() and self.vm.rpc is not None:
            req = agent_pb2.ReadStreamRequest(container_id=cid, offset=offset, wait_ms=1000)
            try:
                resp = self.vm.rpc.call(AGENT_SERVICE, method, req,
                                        agent_pb2.ReadStreamResponse, timeout=30)
            except (TTRPCError, OSError):
                return
            if resp.data:
                try:
                    log.write(stream, resp.data)
                except (OSError, EmberError) as exc:
                    # Keep draining, so the container never blocks on a full pipe.
                    self._complain("log", f"container output dropped: {exc}")
                offset = resp.offset + len(resp.data)
            if resp.eof:
                return

    def _complain(self, what: str, message: str) -> None:
        """One line in monitor.log per kind of trouble, not one per record."""
        if what not in self._complained:
            self._complained.add(what)
            print(f"ember-monitor {self.id[:12]}: {message}", file=sys.stderr, flush=True)

    def _wait_main(self, cid: str, streams: list[threading.Thread], auto_stop: bool) -> None:
        req = agent_pb2.ProcessRequest(container_id=cid)
        try:
            resp = self.vm.rpc.call(AGENT_SERVICE, "WaitProcess", req,
                                    agent_pb2.WaitProcessResponse)
        except (TTRPCError, OSError, AttributeError):
            return  # the VM went away: stop() records why
        for t in streams:
            t.join(timeout=5)
        result = {"status": "exited", "exit_code": resp.exit_status, "finished": time.time(),
                  "oom_killed": resp.oom_killed}
        if auto_stop:
            # Stop the VM before saying "exited": whoever waits on the status may
            # then count on the VM being gone.
            self.stop(None, final=result)
        else:
            self.store.update(self.id, **result)

    def _watch_vmm(self) -> None:
        """Record a VMM that dies on its own (crash, kill -9) and stop serving."""
        assert self.vm.vmm is not None
        code = self.vm.vmm.wait()
        if not self.done.is_set():
            tail = self.vm.vmm.console_tail(3).replace("\n", " | ")
            self.stop("dead", error=f"VMM exited unexpectedly (code {code}); console: {tail}")

    # ----------------------------------------------------------- lifecycle
    def stop(self, status: str | None, error: str = "", final: dict | None = None) -> None:
        with self._stopping:
            if self.done.is_set():
                return
            self.done.set()
        try:
            self.vm.shutdown(timeout=5)
        finally:
            if self._log is not None:
                self._log.close()
            self._release_network()
            changes: dict[str, object] = {"vmm_pid": None, "monitor_pid": None, **(final or {})}
            if self.network == "bridge":
                changes.update(ip_address="", netns="")  # released, as Docker does on stop
            try:
                st = self.store.load(self.id)
                if status == "dead" or (status and st.status not in ("exited",)):
                    changes["status"] = "exited" if status == "removed" else status
                if error:
                    changes["error"] = error
                self.store.update(self.id, **changes)
            except EmberError:
                pass  # the folder is already being removed
            self.server.shutdown()

    # ---------------------------------------------------------- network
    def _boot(self) -> None:
        """Boot the VM; with --network bridge, on its own eth0 and with the ports bound."""
        if self.network != "bridge":
            self.vm.boot()
            return
        from ember.net import bridge, podnet
        from ember.net.proxy import TCPProxy, parse_publish

        # Bind first: a port in use must fail before anything else is made.
        for p in self.publish:
            self.proxies.append(TCPProxy(parse_publish(p)))
        ip, netns = bridge.connect(
            self.cfg, self.id, lambda ip, ns: self.store.update(self.id, ip_address=ip, netns=ns))
        net_fd, nic = podnet.setup(netns)
        try:
            self.vm.boot(net_fd=net_fd, nic_mac=nic.mac)
        finally:
            os.close(net_fd)  # QEMU has its own copy
        self.vm.agent.update_interface(nic.name, nic.mac, nic.mtu, nic.addresses, nic.routes)
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
        try:
            from ember.sandbox.state import process_started

            # With its start time: `ember ps` tells this process from a reused pid.
            self.store.update(self.id, monitor_pid=os.getpid(),
                              monitor_started=process_started(os.getpid()))
            self._boot()
            assert self.vm.vmm is not None
            self.store.update(self.id, vmm_pid=self.vm.vmm.pid,
                              restored_from_snapshot=self.vm.restored,
                              jail=self.vm.jail_record())
        except EmberError as exc:
            self.vm.kill()
            self._release_network()
            report(f"ERR {exc.exit_code} {exc.message}")
            return 1
        except Exception as exc:  # noqa: BLE001 - report any boot failure to the waiting CLI
            self.vm.kill()
            self._release_network()
            report(f"ERR 125 sandbox monitor failed: {exc!r}")
            return 1
        self.register()
        threading.Thread(target=self._watch_vmm, daemon=True).start()
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(
            target=self.stop, args=("exited",), daemon=True).start())
        ready = threading.Event()
        t = threading.Thread(target=self.server.serve_unix, args=(str(self.dir / "api.sock"), ready),
                             daemon=True)
        t.start()
        ready.wait(10)
        report("OK")
        t.join()
        self.done.wait()
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ember-monitor")
    parser.add_argument("--id", required=True)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    return Monitor(args.id).run(args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
