"""`ember stats`: live CPU, memory, network, block I/O and pids per sandbox.

Numbers come from :mod:`ember.metrics.stats` (the container's guest cgroup
and the VMM on the host). Sizes are written as Docker writes them: memory in
binary units (MiB), network and block I/O in decimal ones (kB, MB).
"""

from __future__ import annotations

import json
import sys
import time

import click

from ember.errors import EmberError
from ember.sandbox.status import Status

INTERVAL_S = 1.0  # between two samples: the window of the CPU percentages
HEADER = ("SANDBOX ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O",
          "BLOCK I/O", "PIDS", "VMM CPU %", "VMM RSS")


def _units(n: float, base: int, names: tuple[str, ...]) -> str:
    for unit in names[:-1]:
        if abs(n) < base:
            return f"{n:.4g}{unit}" if unit != names[0] else f"{int(n)}{unit}"
        n /= base
    return f"{n:.4g}{names[-1]}"


def binary(n: float) -> str:
    return _units(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB"))


def decimal(n: float) -> str:
    return _units(n, 1000, ("B", "kB", "MB", "GB", "TB"))


def _cells(row) -> tuple[str, ...]:
    return (row.id[:12], row.name, f"{row.cpu_percent:.2f}%",
            f"{binary(row.mem_usage)} / {binary(row.mem_limit)}", f"{row.mem_percent:.2f}%",
            f"{decimal(row.net_rx)} / {decimal(row.net_tx)}",
            f"{decimal(row.blk_read)} / {decimal(row.blk_write)}", str(row.pids),
            f"{row.vmm_cpu_percent:.2f}%", binary(row.vmm_rss))


def table(rows: list) -> str:
    lines = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)


def _states(cfg, refs: tuple[str, ...]):
    """The sandboxes to show: the named ones (each must be running), or every running one."""
    from ember.sandbox.state import StateStore

    store = StateStore(cfg)
    if refs:
        return [store.find(r) for r in refs]
    return [st for st in store.all() if st.status == Status.RUNNING]


@click.command(name="stats")
@click.option("--no-stream", is_flag=True, help="Print one sample and exit.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="json: one object per sandbox and sample, a line each.")
@click.argument("refs", nargs=-1)
def stats_cmd(no_stream: bool, fmt: str, refs: tuple[str, ...]) -> None:
    """Live resource usage of sandboxes (all running ones without names)."""
    from ember.cli.common import handle_errors

    handle_errors(_stats)(no_stream, fmt, refs)


def _stats(no_stream: bool, fmt: str, refs: tuple[str, ...]) -> None:
    from ember.config import load_config
    from ember.metrics.collector import CgroupMounts
    from ember.metrics.stats import rates, sample

    cfg = load_config()
    mounts = CgroupMounts()
    # Named sandboxes must all answer the first time (a dead one is an error);
    # later, one that stops simply leaves the table.
    states = _states(cfg, refs)
    before = {st.id: sample(cfg, st, mounts) for st in states}
    while True:
        time.sleep(INTERVAL_S)
        rows = []
        for st in _states_quiet(cfg, states):
            try:
                now = sample(cfg, st, mounts)
            except EmberError:
                before.pop(st.id, None)
                continue
            if st.id in before:
                rows.append(rates(before[st.id], now))
            before[st.id] = now
        if fmt == "json":
            for r in rows:
                click.echo(json.dumps(r.as_dict()))
        else:
            if not no_stream:
                click.echo("\033[2J\033[H", nl=False)  # clear the terminal, as docker stats
            click.echo(table(rows))
        sys.stdout.flush()
        if no_stream:
            return
        if refs and not before:
            raise EmberError("no sandbox left running")
        if not refs:
            states = _states(cfg, ())


def _states_quiet(cfg, states):
    """``states`` refreshed; those gone meanwhile are dropped."""
    from ember.errors import NotFoundError
    from ember.sandbox.state import StateStore

    store = StateStore(cfg)
    out = []
    for st in states:
        try:
            out.append(store.read(st.id))
        except NotFoundError:
            continue
    return out
