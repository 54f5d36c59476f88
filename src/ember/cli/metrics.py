"""``ember metrics serve``: a Prometheus endpoint for this node's sandboxes and pods."""

from __future__ import annotations

import logging
import sys

import click

from ember.errors import EmberError
from ember.metrics import DEFAULT_LISTEN, DEFAULT_TIMEOUT
from ember.stopsignal import StopSignals


@click.group(name="metrics")
def metrics_group() -> None:
    """Prometheus metrics of this node's sandboxes and pods."""


@metrics_group.command(name="serve")
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True,
              help="HOST:PORT to serve /metrics on ([::1]:PORT for IPv6, :PORT for all).")
@click.option("--timeout", type=click.FloatRange(0.05, 10.0), default=DEFAULT_TIMEOUT,
              show_default=True, help="Seconds one sandbox's guest may take to answer a scrape.")
def serve_cmd(listen: str, timeout: float) -> None:
    """Serve Prometheus metrics over HTTP until stopped (SIGTERM, Ctrl-C)."""
    from ember.config import load_config
    from ember.metrics.server import MetricsServer

    try:
        server = MetricsServer(load_config(), listen, timeout=timeout)
    except EmberError as exc:
        click.echo(f"ember: error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="ember-metrics: %(levelname)s %(message)s")
    host, port = server.address
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"ember metrics: serving http://{shown}:{port}/metrics", err=True)

    StopSignals().on_signal(lambda _sig: server.shutdown())
    server.serve_forever()
