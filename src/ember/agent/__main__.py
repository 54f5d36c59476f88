"""Entry point: ``python3 -m ember.agent`` (PID 1 in the guest).

Only the stdlib, google.protobuf, ember.errors, ember.ttrpc and ember.agent
exist in the guest, so nothing else may be imported here.

As PID 1 the agent must never exit (the kernel panics if init dies): any
failure of the serving loop is logged and the loop restarts.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

from ember.agent import crun
from ember.agent.channel import serve
from ember.agent.reaper import Reaper, set_subreaper
from ember.agent.service import AgentService
from ember.ttrpc import Server

log = logging.getLogger("ember.agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ember-agent", description="Ember guest agent")
    p.add_argument("--channel", default="auto",
                   help="auto | /dev/PATH (virtio-serial port) | vsock:PORT")
    p.add_argument("--listen-unix", metavar="PATH", help="serve on a Unix socket (host tests)")
    p.add_argument("--base-dir", default="/run/ember-agent",
                   help="where bundles, mounts and crun state live")
    p.add_argument("--crun", default="crun", help="crun binary")
    p.add_argument("--cgroup-manager", default="", help="passed to crun (cgroupfs, disabled)")
    p.add_argument("--disk-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for a (hot-plugged) disk to appear")
    p.add_argument("--debug", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s.%(msecs)03d ember-agent %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S")
    pid1 = os.getpid() == 1
    if pid1:
        # Init must not die of a stray ^C on the console (the kernel would panic).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        set_subreaper()
    reaper = Reaper()
    reaper.start()
    server = Server()
    service = AgentService(args.base_dir, reaper, args.crun, args.cgroup_manager, pid1,
                           on_destroy=server.shutdown, disk_timeout=args.disk_timeout)
    service.register(server)
    log.info("agent %s starting (pid %d)", __import__("ember").__version__, os.getpid())
    if pid1:  # before the first answer, so that a VM template holds them (see warm)
        began = time.monotonic()
        size = crun.warm(reaper, args.crun)
        log.info("crun and its libraries cached: %d KiB in %.0f ms", size >> 10,
                 (time.monotonic() - began) * 1e3)
    while True:
        try:
            serve(server, args.channel, args.listen_unix)
        except Exception:
            log.exception("serving failed")
            if not pid1:
                return 1
            time.sleep(1)
            continue
        if server.stopped and not pid1:
            return 0
        if pid1:
            time.sleep(1)  # powering off, or the channel went away: never exit


if __name__ == "__main__":
    sys.exit(main())
