"""``ember config``: the configuration file.

``ember config default`` prints the default file (every key, commented out,
at its default value), generated from :mod:`ember.config` so it cannot drift
from what the loader accepts; ``--write PATH`` installs it where nothing is
yet, which is how ``scripts/setup.sh`` makes ``/etc/ember/config.toml``.
"""

from __future__ import annotations

from pathlib import Path

import click

from ember.cli.common import handle_errors


@click.group("config")
def config_group() -> None:
    """Ember's configuration file."""


@config_group.command("default")
@click.option("--write", "path", type=click.Path(dir_okay=False, path_type=Path),
              help="Install it at PATH if nothing is there (never overwrites).")
@handle_errors
def config_default(path: Path | None) -> None:
    """Print (or install) the default configuration file."""
    from ember.config import default_config_text, write_default_config

    if path is None:
        click.echo(default_config_text(), nl=False)
    elif write_default_config(path):
        click.echo(f"wrote {path} (every key at its default, commented out)")
    else:
        click.echo(f"{path} exists: left unchanged")
