"""What every `ember` subcommand module shares: the one-line error handling and
size formatting. Its own module, below cli/main.py, so that subcommand modules
never import the module that imports them."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps

import click

from ember.errors import EmberError


def handle_errors(fn: Callable) -> Callable:
    """Turn an EmberError into ``ember: error: MESSAGE`` and its exit code
    (125 unless the error says otherwise), Ctrl-C into exit 130."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EmberError as exc:
            click.echo(f"ember: error: {exc.message}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("ember: interrupted", err=True)
            sys.exit(130)
    return wrapper


def human_size(n: int) -> str:
    """Decimal units with three significant digits, as `docker images` prints."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.3g}{unit}"
        size /= 1000
    return f"{size:.3g}TB"
