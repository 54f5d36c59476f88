"""The shim's ``start`` and ``delete`` subcommands, as containerd 1.6 runs them.

``start`` (cwd = the bundle, runtime options on stdin) must print the shim's
ttrpc address and exit; containerd reads start's combined output until it
closes, so the long-lived server is a separate, detached process (new
session, stdio on /dev/null) that inherits the already-listening socket. The
address is ``unix:///abs/path`` — without the scheme containerd would dial an
abstract socket — and the path is kept short (≤ 106 bytes). Containers of a
CRI pod (``io.kubernetes.cri.sandbox-id``) get the address of the pod's shim.

``delete`` runs when containerd loses a shim (crash, SIGKILL) and after every
normal shutdown. It prints a DeleteResponse and must be fast and idempotent:
with the shim alive it changes nothing; with the shim dead it kills the VMM,
unmounts anything left below the pod folder, removes the cgroups the pod made,
the tc redirect in the pod's network namespace, and the pod folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ember.config import Config, load_config
from ember.errors import EmberError
from ember.shim.layout import MAX_SOCKET_PATH, POINTER, pod_dir, pod_identity, socket_path
from ember.util import atomic_write, atomic_write_json, private_dir

if TYPE_CHECKING:
    from ember.sandbox.record import PodRecord

# Everything else (the fork server, the VM clean-up, the task protos) is imported
# where it is used: containerd waits for `start` once per container of a pod,
# and for a pod's second container `start` only finds the running shim's socket.

log = logging.getLogger("ember.shim")


@dataclass
class ShimArgs:
    namespace: str
    address: str
    publish_binary: str
    id: str
    bundle: str = ""
    debug: bool = False


def config_path_from_options(data: bytes) -> str:
    """ConfigPath from the runtime options containerd writes to start's stdin (an Any)."""
    if not data:
        return ""
    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    from ember.shim.proto import options_pb2

    try:
        anymsg = any_pb2.Any.FromString(data)
        opts = options_pb2.Options.FromString(anymsg.value)
    except DecodeError:
        return ""
    return opts.config_path


def _annotations(bundle: Path) -> dict:
    try:
        spec = json.loads((bundle / "config.json").read_text())
        ann = spec.get("annotations") if isinstance(spec, dict) else None
        return ann if isinstance(ann, dict) else {}
    except (OSError, ValueError):
        return {}  # Create reports a broken config.json with a proper error code


def _connectable(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def start(args: ShimArgs, options: bytes) -> str:
    """Start (or find) the pod's shim server; returns the address to print."""
    config_path = config_path_from_options(options)
    cfg = load_config(config_path or None)
    bundle = Path.cwd()
    joining, sandbox = pod_identity(_annotations(bundle))
    group = sandbox if joining else args.id
    pdir = pod_dir(cfg, args.address, args.namespace, group)
    sock = socket_path(pdir)
    if len(str(sock)) > MAX_SOCKET_PATH:
        raise EmberError(f"shim socket path {sock} is longer than {MAX_SOCKET_PATH} bytes; "
                         "use a shorter state_dir")
    address = f"unix://{sock}"
    atomic_write_json(bundle / POINTER, {"pod_dir": str(pdir), "group": group,
                                         "config": config_path or cfg.source})
    if _connectable(sock):
        atomic_write(bundle / "address", address)
        return address
    if joining:
        raise EmberError(f"the shim of sandbox {group} is not running")
    from ember.ttrpc import bind_unix

    private_dir(pdir.parent)
    private_dir(pdir)
    listener = bind_unix(str(sock))
    try:
        _spawn_server(args, listener, group, pdir, config_path, cfg.state_dir)
    except BaseException:
        listener.close()
        with contextlib.suppress(OSError):
            sock.unlink()
        raise
    listener.close()
    atomic_write(bundle / "address", address)
    return address


def _spawn_server(args: ShimArgs, listener: socket.socket, group: str, pdir: Path,
                  config_path: str, state_dir: Path) -> None:
    from ember.sandbox import forkserver
    from ember.sandbox.record import PodRecord

    env = dict(os.environ)
    if config_path:
        env["EMBER_CONFIG"] = config_path
    fd = listener.fileno()
    argv = [sys.executable, "-P", "-m", "ember.shim.main", "-namespace", args.namespace,
            "-address", args.address, "-publish-binary", args.publish_binary, "-id", args.id,
            *(["-debug"] if args.debug else []), "serve", "--listen-fd", str(fd),
            "--group", group, "--pod-dir", str(pdir), "--bundle", str(Path.cwd())]
    with open(pdir / "shim.log", "ab") as logf:
        # Forked by the fork server where it can (shared memory, no imports), else exec'd.
        forked = forkserver.spawn(state_dir, argv, env, logf.fileno(), (fd,), cwd=str(pdir))
        if forked is not None:
            forked.close()  # we do not wait for it: containerd talks to its socket
        pid = forked.pid if forked is not None else subprocess.Popen(
            argv, pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
            cwd=str(pdir), env=env, start_new_session=True, close_fds=True).pid
    PodRecord(shim_pid=pid, group=group).write(pdir)


# -------------------------------------------------------------------- delete
def _mounts_below(base: Path) -> list[str]:
    prefix = str(base).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(prefix):
                found.append(mp)
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def cleanup_dead_pod(pdir: Path, cfg: Config | None = None) -> None:
    """Everything a dead shim's pod leaves: VM (VMM, jail, cgroups, netns), mounts, files.

    ``cfg``: the configuration the pod started with (its jail folder is there)."""
    from ember.sandbox.cleanup import release_vm
    from ember.shim.pod import read_record

    cfg = cfg or load_config()
    rec = read_record(pdir)
    rec.vm_dir = rec.vm_dir or str(pdir / "vm")
    if rec.group:
        release_vm(cfg, rec.group, rec)
    for mp in _mounts_below(pdir):
        if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", mp], capture_output=True)
    shutil.rmtree(cfg.data_dir / "shim-volumes" / pdir.name, ignore_errors=True)  # pod volumes
    shutil.rmtree(pdir, ignore_errors=True)


def shim_alive(rec: PodRecord) -> bool:
    from ember.sandbox.cleanup import cmdline

    pid = rec.shim_pid
    if not pid:
        return False
    return "ember.shim" in cmdline(pid)


def delete(args: ShimArgs) -> bytes:
    """Clean up after a container whose shim is gone; the serialized DeleteResponse."""
    from ember.shim.events import timestamp
    from ember.shim.pod import read_record
    from ember.shim.proto import task_pb2 as pb

    bundle = Path(args.bundle or os.getcwd())
    cfg = None
    try:
        pointer = json.loads((bundle / POINTER).read_text())
        pdir = Path(pointer["pod_dir"])
        # containerd gives `delete` no runtime options: the pod's configuration (its
        # ConfigPath, with the jail folder) is the one `start` wrote down here.
        with contextlib.suppress(EmberError):
            cfg = load_config(pointer.get("config") or None)
    except (OSError, ValueError, KeyError, TypeError):
        pdir = None
        with contextlib.suppress(EmberError):
            group = pod_identity(_annotations(bundle))[1] or args.id
            pdir = pod_dir(load_config(), args.address, args.namespace, group)
    pid, status, at_ns = 0, 128 + signal.SIGKILL, time.time_ns()
    if pdir is not None and pdir.is_dir():
        try:
            crec = json.loads((pdir / "containers" / f"{args.id}.json").read_text())
        except (OSError, ValueError):
            crec = {}
        pid = int(crec.get("pid") or 0)
        if crec.get("status") == int(pb.STOPPED):
            status, at_ns = int(crec.get("exit_status", status)), int(crec.get("exited_at_ns") or at_ns)
        if not shim_alive(read_record(pdir)):
            cleanup_dead_pod(pdir, cfg)
    rootfs = bundle / "rootfs"
    if os.path.ismount(rootfs):
        subprocess.run(["umount", "-l", str(rootfs)], capture_output=True)
    return pb.DeleteResponse(pid=pid, exit_status=status, exited_at=timestamp(at_ns)).SerializeToString()
