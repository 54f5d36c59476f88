"""The one removal of an `ember run` sandbox: `ember rm -f`, a failed start,
and the monitor's own `--rm` all come here.

Everything is derived from the sandbox id and the configuration (never from
what a record says, which a compromised VMM or a crash may have spoiled), and
the steps go in an order that a removal killed at any point can simply run
again: the processes, then the network, the jail (folder and cgroups) and the
disks, and the sandbox folder last, so the sandbox is listed (and its name
taken) until nothing else of it is left.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ember.config import Config
from ember.errors import EmberError
from ember.sandbox.record import VMRecord
from ember.sandbox.state import (
    SandboxState,
    StateStore,
    kill_pid,
    monitor_alive,
    pid_alive,
    sandbox_processes,
    template_vm_id,
    vmm_alive,
)
from ember.util import pause_for_test


def destroy(cfg: Config, st: SandboxState,
            ask_shutdown: Callable[[], bool] | None = None) -> None:
    """Remove sandbox ``st.id`` and everything it made; idempotent.

    ``st``: its record if it could be read (else a stand-in with the id), for
    the pids it names and the name the destroy event carries. ``ask_shutdown``
    asks a live monitor to power the VM off and exit (False if it does not
    answer); without it, or when it fails, the monitor gets SIGTERM.
    """
    from ember.net import bridge
    from ember.sandbox.template import build_prefix

    store = StateStore(cfg)
    label = st.name or st.id[:12]
    stop_processes(cfg, st, ask_shutdown)
    pause_for_test("rm-killed")
    bridge.disconnect(cfg, st.id)  # from the id; a no-op without a netns
    try:
        # The VM's release from the id alone, never from the record: the processes
        # are gone (found by command line above) and the netns went with the bridge.
        release_vm(cfg, st.id, VMRecord())
    except OSError as exc:  # a cgroup that will not empty: the folder stays, try again
        raise EmberError(f"sandbox {label}: cannot remove its jail: {exc}") from None
    shutil.rmtree(store.disk_dir(st.id), ignore_errors=True)
    for work in cfg.state_dir.glob(build_prefix(st.id) + "*"):  # a killed template build's
        shutil.rmtree(work, ignore_errors=True)
    pause_for_test("rm-cleaned")
    with store.lock():
        existed = store.dir(st.id).is_dir()
        store.remove(st.id)
    if existed:  # once, however often a removal is run again
        from ember.sandbox.events import SandboxEvents

        SandboxEvents(cfg.state_dir, st.id, st.name, st.image, st.vmm_kind).container("destroy")


def stop_processes(cfg: Config, st: SandboxState,
                   ask_shutdown: Callable[[], bool] | None = None) -> None:
    """Stop the monitor (gracefully if it answers), then SIGKILL whatever still
    runs under this id (monitor, jailer, waiter, VMM) until nothing does.

    Processes are found by command line as well as from the record: the
    record can be unreadable or older than the processes, and a jailer that
    was starting forks the VMM's process after any first look. The calling
    process (a monitor removing its own sandbox) is never one of them.
    """
    from ember.vmm import vmm_binaries

    sid = st.id
    jail_dirs = [str(Path(cfg.jailer.chroot_base_dir) / os.path.basename(b) / i)
                 for b in vmm_binaries(cfg) for i in (sid, template_vm_id(sid))]
    me, short = os.getpid(), sid[:12]
    monitors = set(sandbox_processes(sid, jail_dirs)[0])
    if monitor_alive(st):
        monitors.add(st.monitor_pid)  # type: ignore[arg-type]
    monitors.discard(me)
    if monitors:
        if ask_shutdown is None or not ask_shutdown():
            for pid in monitors:
                kill_pid(pid, sid, signal.SIGTERM)
        wait_gone(monitors, sid, 15)
    known = set(monitors)
    if vmm_alive(st):
        known.add(st.vmm_pid)  # type: ignore[arg-type]
    left: set[int] = set()
    for _ in range(10):
        found: set[int] = set().union(*sandbox_processes(sid, jail_dirs))
        left = {p for p in found | known if pid_alive(p, short)} - {me}
        if not left:
            return
        for pid in left:
            kill_pid(pid, short)
        wait_gone(left, short, 5)
    raise EmberError(f"sandbox {st.name or short}: processes {sorted(left)} survive SIGKILL")


def wait_gone(pids: set[int], marker: str, timeout: float) -> None:
    """Until none of ``pids`` is a live process mentioning ``marker``, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(pid_alive(p, marker) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)


def cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def release_vm(cfg: Config, vm_id: str, rec: VMRecord) -> None:
    """Remove what VM ``vm_id`` left on the host: its VMM, jail, cgroups, network.

    The one VM-level cleanup, run by ``ember rm`` and by the shim's ``delete``;
    idempotent. The jail is found from the id and the configuration, never
    from the record (a compromised VMM must not steer what root removes); an
    unjailed VMM is killed only if its command line still names the VM's
    folder (no pid-reuse victim).
    """
    from ember.sandbox.podcgroup import remove
    from ember.sandbox.vm import cleanup_jail, release_network

    cleanup_jail(cfg, vm_id, rec.cgroup or None)
    pid = rec.vmm_pid
    if not rec.jail and pid and rec.vm_dir and rec.vm_dir in cmdline(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while rec.vm_dir in cmdline(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    remove(rec.cgroups_created)
    release_network(rec.netns)
