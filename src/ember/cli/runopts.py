"""The `ember run` flags of :class:`ember.sandbox.options.RunOptions`, as Docker spells them.

:func:`run_options` adds them to the command; :func:`collect` turns what click
parsed into a RunOptions and the ``--env-file`` entries (which come before
``-e``: a later ``-e`` wins, as in Docker).
"""

from __future__ import annotations

from collections.abc import Callable

import click

from ember.sandbox.options import RunOptions, read_env_file

_OPTIONS = [
    click.option("--cap-add", multiple=True, help="Add a Linux capability (NET_ADMIN, ALL, ...)."),
    click.option("--cap-drop", multiple=True, help="Drop a Linux capability (ALL for every one)."),
    click.option("--read-only", is_flag=True, help="Mount the container's root read-only."),
    click.option("--hostname", help="Container host name (default: the short sandbox id)."),
    click.option("--env-file", multiple=True, help="Read KEY=VALUE lines from a file."),
    click.option("--init", is_flag=True, help="Run an init (tini) as PID 1: it reaps zombies "
                 "and forwards signals."),
    click.option("--add-host", multiple=True, help="NAME:IP line for /etc/hosts."),
    click.option("--dns", multiple=True, help="DNS server for /etc/resolv.conf."),
    click.option("--restart", default="no", show_default=True,
                 help="no, on-failure[:N], always or unless-stopped: restart the container "
                      "(inside the same VM) when it exits."),
    click.option("--stop-signal", help="Signal `ember stop` sends (default: the image's, "
                 "else SIGTERM)."),
    click.option("--stop-timeout", type=int, help="Seconds `ember stop` waits before SIGKILL "
                 "(default 10; -1: no limit)."),
    click.option("--health-cmd", help="Command (run with /bin/sh -c) that checks health."),
    click.option("--health-interval", type=float, default=30.0, show_default=True,
                 help="Seconds between health checks."),
    click.option("--health-timeout", type=float, default=30.0, show_default=True,
                 help="Seconds one check may take."),
    click.option("--health-retries", type=int, default=3, show_default=True,
                 help="Failures in a row that make it unhealthy."),
    click.option("--health-start-period", type=float, default=0.0, show_default=True,
                 help="Seconds after start when failures do not count."),
    click.option("--pull", default="missing", show_default=True,
                 help="missing, always or never: pull the image from its registry."),
]


def run_options(fn: Callable) -> Callable:
    for option in reversed(_OPTIONS):
        fn = option(fn)
    return fn


def collect(kw: dict) -> tuple[RunOptions, list[str]]:
    """(RunOptions, environment from --env-file) from click's parsed values."""
    env: list[str] = []
    for path in kw.pop("env_file", ()):
        env += read_env_file(path)
    opts = RunOptions(
        cap_add=list(kw.pop("cap_add", ())), cap_drop=list(kw.pop("cap_drop", ())),
        read_only=kw.pop("read_only", False), hostname=kw.pop("hostname", None),
        add_hosts=list(kw.pop("add_host", ())), dns=list(kw.pop("dns", ())),
        init=kw.pop("init", False), restart=kw.pop("restart", "no"),
        stop_signal=kw.pop("stop_signal", None), stop_timeout=kw.pop("stop_timeout", None),
        health_cmd=kw.pop("health_cmd", None), health_interval=kw.pop("health_interval", 30.0),
        health_timeout=kw.pop("health_timeout", 30.0),
        health_retries=kw.pop("health_retries", 3),
        health_start_period=kw.pop("health_start_period", 0.0), pull=kw.pop("pull", "missing"),
    )
    return opts, env
