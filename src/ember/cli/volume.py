"""`ember volume create|ls|inspect|rm|prune` and the run flags -v, --mount, --tmpfs.

Volumes are sparse ext4 images (:mod:`ember.storage.volumes`); who uses one
comes from the sandbox records, under the same lock as every `ember run`.
"""

from __future__ import annotations

import json

import click

from ember.cli.common import handle_errors, human_size
from ember.errors import EmberError


def mount_options(fn):
    """The run flags of this module: -v/--volume, --mount, --tmpfs (repeatable)."""
    fn = click.option("--tmpfs", multiple=True,
                      help="/path[:size=64m,mode=1777,exec]: a tmpfs in the guest.")(fn)
    fn = click.option("--mount", "mount", multiple=True,
                      help="type=volume|bind|tmpfs,src=...,dst=...[,readonly], as Docker.")(fn)
    fn = click.option("-v", "--volume", "volume", multiple=True,
                      help="NAME:/path[:ro] (a named volume, made on first use), "
                           "/host/dir:/path:ro (copied in, read-only) or "
                           "/host/path:/path:copy (copied in, writes stay in the sandbox).")(fn)
    return fn


@click.group(name="volume")
def volume_group() -> None:
    """Named volumes: disks that outlive sandboxes (-v NAME:/path)."""


def _store():
    from ember.config import load_config
    from ember.storage.volumes import VolumeStore

    return VolumeStore(load_config())


def _states():
    from ember.config import load_config
    from ember.sandbox.state import StateStore

    return StateStore(load_config())


@volume_group.command(name="create")
@click.option("--size", default="10g", show_default=True,
              help="Most the volume can hold (sparse: costs only what is written).")
@click.argument("name")
@handle_errors
def create_cmd(size: str, name: str) -> None:
    """Create a volume (an existing one is left as it is, as Docker does)."""
    _store().create(name, size)
    click.echo(name)


@volume_group.command(name="ls")
@click.option("-q", "--quiet", is_flag=True, help="Only names.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@handle_errors
def ls_cmd(quiet: bool, as_json: bool) -> None:
    """List volumes."""
    from ember.sandbox.volumes import users

    vols = _store().list()
    if quiet:
        for v in vols:
            click.echo(v.name)
        return
    states = _states().all()
    if as_json:
        click.echo(json.dumps([_describe(v, states) for v in vols], indent=2))
        return
    rows = [("VOLUME NAME", "SIZE", "USED", "IN USE BY")]
    for v in vols:
        by = ", ".join(f"{st.name}{' (ro)' if ro else ''}" for st, ro in users(states, v.name))
        rows.append((v.name, human_size(v.size), human_size(v.used), by))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _describe(v, states) -> dict:
    from ember.sandbox.volumes import referenced, users

    out = v.as_dict()
    out["in_use_by"] = [{"sandbox": st.name, "id": st.id, "readonly": ro}
                        for st, ro in users(states, v.name)]
    out["referenced_by"] = [st.name or st.short_id for st in referenced(states, v.name)]
    return out


@volume_group.command(name="inspect")
@click.argument("names", nargs=-1, required=True)
@handle_errors
def inspect_cmd(names: tuple[str, ...]) -> None:
    """Show volumes as JSON."""
    store, states = _store(), _states().all()
    click.echo(json.dumps([_describe(store.get(n), states) for n in names], indent=2))


@volume_group.command(name="rm")
@click.argument("names", nargs=-1, required=True)
@handle_errors
def rm_cmd(names: tuple[str, ...]) -> None:
    """Remove volumes and their data; refused while any sandbox (even stopped) names one."""
    failed = None
    for name in names:
        try:
            _remove(name)
            click.echo(name)
        except EmberError as exc:
            click.echo(f"ember: error: {exc.message}", err=True)
            failed = exc
    if failed:
        raise SystemExit(failed.exit_code)


def _remove(name: str) -> None:
    from ember.config import load_config
    from ember.sandbox.volumes import remove_unused

    remove_unused(load_config(), name)


@volume_group.command(name="prune")
@click.option("-f", "--force", is_flag=True, help="Do not ask.")
@handle_errors
def prune_cmd(force: bool) -> None:
    """Remove every volume no sandbox names (stopped ones included)."""
    from ember.config import load_config
    from ember.sandbox.volumes import prune

    if not force and not click.confirm("Remove every volume that no sandbox uses?"):
        return
    gone = prune(load_config())
    for v in gone:
        click.echo(f"Deleted: {v.name}")
    click.echo(f"Reclaimed space: {human_size(sum(v.used for v in gone))}")
