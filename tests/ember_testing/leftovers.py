"""What a sandbox left on the host: the check behind Ember's chaos suite.

:func:`leftovers` looks for everything an ``ember run`` sandbox can make,
from its id and the configuration alone, in the kernel's and the file
system's own tables (never in Ember's records, which may be what broke):

* processes: its monitor (``--id ID``), QEMU (``-name ember-SHORT``), the
  jailer and its waiter (naming the jail folder), anything else whose
  command line holds the full id; descriptors any process still holds on
  one of its files (deleted or not);
* the jail folder ``<chroot_base_dir>/<vmm>/<id>`` and its cgroups
  (``<mount>/<parent>/<id>`` in every hierarchy), and those of a VM template
  build made on the sandbox's behalf (``tpl-<id>``), with its work folder;
* the network namespace ``ember-SHORT`` and the veth ``vethID11``;
* mounts and loop devices naming the id or backed by its files;
* files: the sandbox folder (and its ``.new-``/``.rm-`` forms) under the
  state directory, ``<data_dir>/sandboxes/<id>`` and address records.

It returns one line per leftover, so a test can ``assert leftovers(sid) == []``
and read what was found in the failure message. :func:`host_snapshot` counts
the same kinds of things for a set of ids, for soak tests.
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import psutil

from ember.config import Config, load_config


def _jail_ids(sandbox_id: str) -> list[str]:
    from ember.sandbox.state import template_vm_id

    return [sandbox_id[:64], template_vm_id(sandbox_id)]  # its VM's, a template build's


def _jail_dirs(cfg: Config, sandbox_id: str) -> list[Path]:
    from ember.sandbox.vm import vmm_binaries

    return [Path(cfg.jailer.chroot_base_dir) / os.path.basename(b) / jail_id
            for b in vmm_binaries(cfg) for jail_id in _jail_ids(sandbox_id)]


def _cgroup_dirs(cfg: Config, sandbox_id: str) -> list[Path]:
    from ember.jailer.cgroups import jail_cgroup_dirs
    from ember.sandbox.vm import vmm_binaries

    parents = {cfg.jailer.parent_cgroup} if cfg.jailer.parent_cgroup else \
        {os.path.basename(b) for b in vmm_binaries(cfg)}
    return [d for p in sorted(parents) for jail_id in _jail_ids(sandbox_id)
            for d in jail_cgroup_dirs(p, jail_id)]


def processes(sandbox_id: str, cfg: Config | None = None) -> list[str]:
    """Live processes that belong to the sandbox, as "pid: command line"."""
    cfg = cfg or load_config()
    short = sandbox_id[:12]
    jails = [str(d) for d in _jail_dirs(cfg, sandbox_id)]
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            argv = proc.info["cmdline"] or []
            if proc.pid == me or not argv or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        line = " ".join(argv)
        pairs = set(zip(argv, argv[1:], strict=False))
        if (sandbox_id in line or ("-name", f"ember-{short}") in pairs
                or any(j in line for j in jails) or any(("--id", i) in pairs
                                                        for i in _jail_ids(sandbox_id))):
            found.append(f"process {proc.pid}: {line[:200]}")
    return found


def open_files(sandbox_id: str) -> list[str]:
    """Descriptors any process holds on a file of the sandbox (deleted ones too:
    a removed log still held open keeps its space), as "pid fd: path"."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if sandbox_id in target:
                found.append(f"open file {pid} fd {fd}: {target}")
    return found


def leftovers(sandbox_id: str, cfg: Config | None = None) -> list[str]:
    """Everything of sandbox ``sandbox_id`` still on the host; [] when nothing is."""
    from ember.net import bridge, ipam

    cfg = cfg or load_config()
    short = sandbox_id[:12]
    out = processes(sandbox_id, cfg) + open_files(sandbox_id)
    out += [f"jail folder {d}" for d in _jail_dirs(cfg, sandbox_id) if os.path.lexists(d)]
    out += [f"cgroup {d}" for d in _cgroup_dirs(cfg, sandbox_id)]
    ns = bridge.netns_name(sandbox_id)
    if os.path.lexists(bridge.netns_path(sandbox_id)):
        out.append(f"netns file {bridge.netns_path(sandbox_id)}")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            check=False).stdout.split()
    if ns in listed:
        out.append(f"netns {ns}")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                           check=False).stdout
    for line in links.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if line.count(":") >= 2 else ""
        if name in (bridge.veth_name(sandbox_id), ns) or short in name:
            out.append(f"link {name}")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if short in fields[4] or sandbox_id in line:
                out.append(f"mount {fields[4]}")
    files = [cfg.sandboxes_dir / sandbox_id, cfg.sandboxes_dir / f".new-{sandbox_id}",
             cfg.sandboxes_dir / f".rm-{sandbox_id}", cfg.disks_dir / sandbox_id]
    out += [f"file {p}" for p in files if os.path.lexists(p)]
    from ember.sandbox.template import build_prefix

    out += [f"template build folder {p}" for p in cfg.state_dir.glob(build_prefix(sandbox_id) + "*")]
    for bf in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            backing = Path(bf).read_text().strip()
        except OSError:
            continue
        if sandbox_id in backing:
            out.append(f"loop device /dev/{bf.split('/')[3]} on {backing}")
    out += [f"address {ip} held" for ip in ipam.held_by(cfg, sandbox_id)]
    return out


def host_snapshot(sandbox_ids: list[str] | set[str], cfg: Config | None = None) -> dict:
    """What a soak test compares between rounds: the leftovers of the given
    (removed) sandboxes, the files under the state directory, and this
    process's own descriptors, threads and child processes."""
    cfg = cfg or load_config()
    me = psutil.Process()
    return {
        "leftovers": [line for sid in sandbox_ids for line in leftovers(sid, cfg)],
        "files under the state dir": sorted(
            os.path.relpath(os.path.join(root, name), cfg.state_dir)
            for root, dirs, files in os.walk(cfg.state_dir) for name in dirs + files),
        "own fds": len(os.listdir("/proc/self/fd")),
        "own threads": me.num_threads(),
        "own children": [c.pid for c in me.children(recursive=True)
                         if c.status() != psutil.STATUS_ZOMBIE],
    }
