"""``ember events``: the node's lifecycle events, as ``docker events`` shows them."""

from __future__ import annotations

import json
import signal
import sys

import click

from ember.errors import EmberError
from ember.stopsignal import StopSignals


@click.command(name="events")
@click.option("--since", help="Show stored events from this time on: a Unix time, an RFC 3339 "
                              "date or a duration back from now (10m, 1h30m).")
@click.option("--until", help="Stop at this time (same forms); without it, follow until Ctrl-C.")
@click.option("-f", "--filter", "filters", multiple=True,
              help="KEY=VALUE: type, event, container (id or name), id, name, image, pod, "
                   "namespace, exitcode. The same key twice: either; different keys: both.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one JSON object per line.")
def events_cmd(since: str | None, until: str | None, filters: tuple[str, ...], fmt: str) -> None:
    """Stream lifecycle events of sandboxes, pods and their VMs."""
    from ember.config import load_config
    from ember.sandbox.events import EventLog, Filters, format_line, parse_time, stream

    try:
        cfg = load_config()
        since_ns = parse_time(since, "--since") if since is not None else None
        until_ns = parse_time(until, "--until") if until is not None else None
        wanted = Filters.parse(filters)
        if since_ns is not None and until_ns is not None and until_ns < since_ns:
            raise EmberError(f"--until {until!r} is before --since {since!r}")
    except EmberError as exc:
        click.echo(f"ember: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    stop = StopSignals([signal.SIGTERM])
    try:
        for rec in stream(EventLog(cfg.state_dir), since_ns, until_ns, wanted, stop):
            line = json.dumps(rec, separators=(",", ":")) if fmt == "json" else format_line(rec)
            click.echo(line)
            sys.stdout.flush()
    except KeyboardInterrupt:  # Ctrl-C is how a followed stream ends
        pass
    except BrokenPipeError:  # `ember events | head`
        sys.stderr.close()
