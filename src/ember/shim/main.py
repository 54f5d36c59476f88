"""``containerd-shim-ember-v2``: Ember's containerd runtime v2 shim (``io.containerd.ember.v2``).

containerd runs it as::

    containerd-shim-ember-v2 -namespace NS -address ADDR -publish-binary BIN -id ID [-debug] start
    containerd-shim-ember-v2 -namespace NS -address ADDR -publish-binary BIN -id ID -bundle B delete

(Go-style single-dash flags). ``start`` prints the ttrpc address of the pod's
shim server, ``delete`` prints a protobuf DeleteResponse. ``serve`` is the
internal entry of the detached server that ``start`` launches.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from ember import __version__
from ember.errors import EmberError
from ember.shim.manager import ShimArgs, delete, start
from ember.stopsignal import StopSignals


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="containerd-shim-ember-v2", allow_abbrev=False,
                                description="Ember's containerd runtime v2 shim")
    for flag in ("namespace", "address", "publish-binary", "id", "bundle", "socket"):
        p.add_argument(f"-{flag}", f"--{flag}", default="")
    p.add_argument("-debug", "--debug", action="store_true")
    p.add_argument("-v", "--version", action="store_true")
    p.add_argument("action", nargs="?", choices=["start", "delete", "serve"])
    p.add_argument("--listen-fd", type=int)
    p.add_argument("--group", default="")
    p.add_argument("--pod-dir", default="")
    return p


def _setup_logging(pod_dir: Path, bundle: str, debug: bool) -> None:
    logging.raiseExceptions = False  # a full log FIFO must never break a request
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)  # pod_dir/shim.log
    handler.setFormatter(fmt)
    root.addHandler(handler)
    fifo = Path(bundle) / "log"
    if bundle and fifo.exists():
        # containerd copies this FIFO into its own log.
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            h = logging.StreamHandler(os.fdopen(fd, "w", buffering=1))
            h.setFormatter(fmt)
            h.setLevel(logging.WARNING)
            root.addHandler(h)
        except OSError:
            pass


def serve(args: argparse.Namespace) -> int:
    from ember.config import load_config
    from ember.shim.events import Publisher
    from ember.shim.service import TaskService
    from ember.ttrpc import Server

    pod_dir = Path(args.pod_dir)
    _setup_logging(pod_dir, args.bundle, args.debug)
    log = logging.getLogger("ember.shim")
    listener = socket.socket(fileno=args.listen_fd)
    done = threading.Event()
    try:
        cfg = load_config()
    except EmberError as exc:
        log.error("config: %s", exc.message)
        return 1
    from ember.sandbox.vm import prepare_launch

    prepare_launch(cfg)  # while we have one thread, as a monitor does
    publisher = Publisher(args.namespace, os.environ.get("TTRPC_ADDRESS", ""), args.address,
                          args.publish_binary)
    server = Server()
    svc = TaskService(cfg, pod_dir, args.group, args.namespace, publisher, on_exit=done.set)
    svc.register(server)
    StopSignals([signal.SIGTERM]).on_signal(lambda _sig: svc.teardown())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=server.serve_listener, args=(listener,), daemon=True,
                     name="ttrpc-accept").start()
    log.info("shim %s serving pod %s (pid %d)", __version__, args.group[:12], os.getpid())
    done.wait()
    server.shutdown()
    publisher.close()
    import shutil

    shutil.rmtree(pod_dir, ignore_errors=True)
    logging.shutdown()
    os._exit(0)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(f"containerd-shim-ember-v2 {__version__}")
        return 0
    if args.action is None:
        _parser().error("an action is required: start or delete")
    if args.action == "serve":
        return serve(args)
    if not args.id:
        print("containerd-shim-ember-v2: -id is required", file=sys.stderr)
        return 2
    shim = ShimArgs(args.namespace, args.address, getattr(args, "publish_binary", ""), args.id,
                    args.bundle, args.debug)
    try:
        if args.action == "start":
            options = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
            sys.stdout.write(start(shim, options))
            sys.stdout.flush()
            return 0
        out = delete(shim)
        sys.stdout.buffer.write(out)
        sys.stdout.buffer.flush()
        return 0
    except EmberError as exc:
        print(f"containerd-shim-ember-v2 {args.action}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
