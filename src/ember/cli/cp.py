"""`ember cp`: copy files and folders between the host and a running sandbox.

``ember cp SRC NAME:DEST`` and ``ember cp NAME:SRC DEST``, with ``docker cp``'s
rules: into DEST if it is a folder, else as DEST (whose folder must exist);
``SRC/.`` copies a folder's contents; ``-`` is a tar stream on stdin or
stdout. Modes, numeric ownership, symlinks and hard links are kept (on the
host, a guest's setuid/setgid bits and device nodes are not). Paths are taken
inside the container's root: ``..`` and symlinks cannot leave it. The work is
done by :mod:`ember.sandbox.files`.
"""

from __future__ import annotations

import sys

import click

from ember.cli.common import handle_errors
from ember.errors import EmberError
from ember.sandbox.status import Status


def split_ref(arg: str) -> tuple[str | None, str]:
    """("NAME", "PATH") for NAME:PATH, (None, arg) for a host path (one that starts
    with / or . has no sandbox part, as with docker cp)."""
    if arg.startswith(("/", ".")) or ":" not in arg or "/" in arg.partition(":")[0]:
        return None, arg
    name, _, path = arg.partition(":")
    if not name:
        raise EmberError(f"invalid copy argument {arg!r}: no sandbox name before ':'")
    return name, path or "/"


def _running(ref: str):
    from ember.api import Sandbox

    sb = Sandbox.get(ref)
    status = sb.status
    if status == Status.PAUSED:
        raise EmberError(f"sandbox {ref} is paused: unpause it to copy files")
    if status != Status.RUNNING:
        raise EmberError(f"sandbox {ref} is not running (status {status}): ember cp needs a "
                         "running sandbox (a stopped one's disk is not read without its VM)")
    return sb


@click.command(name="cp")
@click.argument("src")
@click.argument("dest")
@handle_errors
def cp_cmd(src: str, dest: str) -> None:
    """Copy files between a sandbox and the host: SRC NAME:DEST or NAME:SRC DEST."""
    src_box, src_path = split_ref(src)
    dest_box, dest_path = split_ref(dest)
    if (src_box is None) == (dest_box is None):
        raise EmberError("ember cp copies between the host and a sandbox: name exactly one "
                         "side as NAME:PATH")
    for path in (src_path, dest_path):
        if not path:
            raise EmberError("ember cp: empty path")
    if dest_box is not None:
        files = _running(dest_box).files
        if not dest_path.startswith("/"):
            dest_path = "/" + dest_path  # relative to the container's root, as docker cp
        if src_path == "-":  # a tar on stdin, unpacked into the folder DEST
            stdin = sys.stdin.buffer
            files.put("put-into", dest_path, lambda out: _copy(stdin, out))
        else:
            files.copy_in(src_path, dest_path)
        return
    assert src_box is not None
    files = _running(src_box).files
    if not src_path.startswith("/"):
        src_path = "/" + src_path
    if dest_path == "-":
        stdout = sys.stdout.buffer
        files.get(src_path, lambda s: _copy(s, stdout))
        stdout.flush()
        return
    skipped = files.copy_out(src_path, dest_path)
    if skipped:
        click.echo(f"ember: not copied (device nodes): {', '.join(skipped[:5])}"
                   f"{' ...' if len(skipped) > 5 else ''}", err=True)


def _copy(src, dst) -> None:
    while chunk := src.read(1 << 20):
        dst.write(chunk)
