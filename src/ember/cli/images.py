"""`ember image ...`, `ember images`, `ember pull` and `ember guest ...`."""

from __future__ import annotations

import json
import time

import click

from ember.cli.common import handle_errors, human_size


def _store():
    from ember.config import load_config
    from ember.image.store import ImageStore

    return ImageStore(load_config())


@click.group()
def image() -> None:
    """Manage images."""


@image.command("import")
@click.argument("path", type=click.Path())
@handle_errors
def image_import(path) -> None:
    """Import an OCI image layout (dir or tar) or a `docker save` archive."""
    for img in _store().import_archive(path):
        click.echo(f"Loaded image: {', '.join(img.names) or img.id}")


@image.command("import-rootfs")
@click.argument("path", type=click.Path())
@click.option("--name", required=True, help="NAME[:TAG] for the new image.")
@click.option("--cmd", help="Default command (a shell-style string).")
@handle_errors
def image_import_rootfs(path, name, cmd) -> None:
    """Make an image from a root filesystem directory or tar, like `docker import`."""
    import shlex

    img = _store().import_rootfs(path, name, cmd=shlex.split(cmd) if cmd else None)
    click.echo(img.id)


def _list(quiet: bool) -> None:
    imgs = _store().list()
    if quiet:
        for img in imgs:
            click.echo(img.id.split(":")[-1][:12])
        return
    rows = [("REPOSITORY", "TAG", "IMAGE ID", "SIZE")]
    for img in imgs:
        names = img.names or ["<none>:<none>"]
        for n in names:
            repo, _, tag = n.rpartition(":")
            rows.append((repo, tag, img.id.split(":")[-1][:12], human_size(img.size)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@image.command("ls")
@click.option("-q", "--quiet", is_flag=True)
@handle_errors
def image_ls(quiet) -> None:
    """List images."""
    _list(quiet)


@click.command()
@click.option("-q", "--quiet", is_flag=True)
@handle_errors
def images(quiet) -> None:
    """List images."""
    _list(quiet)


@image.command("rm")
@click.argument("refs", nargs=-1, required=True)
@handle_errors
def image_rm(refs) -> None:
    """Remove images (and their blobs and cached block images once unused)."""
    from ember.config import load_config
    from ember.errors import EmberError
    from ember.sandbox.state import StateStore

    store = _store()
    sandboxes = StateStore(load_config()).all()
    for ref in refs:
        img = store.resolve(ref)
        users = [st.name for st in sandboxes if st.image_id == img.id]
        if users:
            # Its cached block image backs those sandboxes' disks.
            raise EmberError(f"image {ref} is in use by sandbox {users[0]}: remove it first")
        for line in store.remove(ref) or [ref]:
            click.echo(f"Untagged: {line}")


@image.command("inspect")
@click.argument("refs", nargs=-1, required=True)
@handle_errors
def image_inspect(refs) -> None:
    """Show images as JSON."""
    store = _store()
    click.echo(json.dumps([store.inspect(r) for r in refs], indent=2))


@click.command()
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.argument("ref")
@handle_errors
def pull(quiet, ref) -> None:
    """Pull an image from a registry."""
    img = _store().pull(ref, progress=not quiet)
    click.echo(f"Pulled {ref}: {img.id}")


@click.group()
def guest() -> None:
    """Build and show the guest kernel, initrd and rootfs."""


@guest.command("build")
@click.option("--force", is_flag=True, help="Rebuild even if cached.")
@click.option("--no-template", is_flag=True, help="Do not prepare the VM snapshot template.")
@handle_errors
def guest_build(force, no_template) -> None:
    """Build (or reuse) the guest assets, and the default VM template."""
    from ember.config import load_config
    from ember.guest.build import build_guest

    cfg = load_config()
    assets = build_guest(cfg, progress=True, force=force)
    click.echo(f"guest assets: kernel {assets.kernel_release}, key {assets.key}")
    if cfg.vm.snapshot and not no_template:
        from ember.sandbox.vm import SandboxVM

        started = time.monotonic()
        vm = SandboxVM(cfg, "template-probe", cfg.state_dir, cfg.vm.vcpus, cfg.vm.memory_mib)
        path = vm.template_for(vm.base_spec(), wait=True)
        if path is None:
            click.echo("warning: could not build the VM template; sandboxes will cold-boot",
                       err=True)
        else:
            click.echo(f"VM template: {path} ({time.monotonic() - started:.1f}s)")


@guest.command("info")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def guest_info(as_json) -> None:
    """Show the guest assets in use."""
    from ember.config import load_config
    from ember.guest.build import guest_info as info

    data = info(load_config())
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        for k, v in data.items():
            click.echo(f"{k}: {v}")
