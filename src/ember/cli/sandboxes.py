"""Docker's smaller sandbox verbs: `ember wait`, `rename`, `port`, `top`, and what
`ember ps` says beyond the record's status (health, restarts, ports, sizes)."""

from __future__ import annotations

import click

from ember.cli.common import handle_errors, human_size
from ember.errors import EmberError
from ember.sandbox.status import UP, Status


# ---------------------------------------------------------------- ps helpers
def status_text(st) -> str:
    """``running (healthy), 2 restarts``, ``exited (3)``, ``unknown (why)``."""
    status = st.status
    if st.status == Status.EXITED:
        status = f"exited ({st.exit_code}{', OOM killed' if st.oom_killed else ''})"
    elif st.status == Status.UNKNOWN:
        status = f"unknown ({st.error})"
    elif st.status == Status.RUNNING and st.health:
        status = f"running ({st.health})"
    if st.restart_count:
        status += f", {st.restart_count} restart{'s' if st.restart_count > 1 else ''}"
    return status


def port_lines(st) -> list[tuple[str, str]]:
    """(``80/tcp``, ``0.0.0.0:8080``) for each published port, from the record."""
    out = []
    for entry in st.publish:  # IP:HOSTPORT:PORT/tcp (ember.net.proxy.PortMapping)
        rest, _, proto = entry.rpartition("/")
        addr, _, port = rest.rpartition(":")
        out.append((f"{port}/{proto or 'tcp'}", addr))
    return out


def ports_text(st) -> str:
    """Published ports while the sandbox runs (a stopped one has released them)."""
    if st.status not in UP:
        return ""
    return ", ".join(f"{host}->{port}" for port, host in port_lines(st))


def size_text(st) -> str:
    """``WRITTEN (virtual IMAGE)``: what the container wrote to its disk, and that
    plus its image, as `docker ps -s`."""
    from ember.sandbox.disksize import written_bytes

    written, image = written_bytes(st)
    if written is None:
        return "-"
    return f"{human_size(written)} (virtual {human_size(written + image)})"


# -------------------------------------------------------------------- verbs
@click.command(name="wait")
@click.argument("sandboxes", nargs=-1, required=True)
@handle_errors
def wait_cmd(sandboxes) -> None:
    """Block until sandboxes stop, then print their exit codes."""
    from ember.api import Sandbox

    for ref in sandboxes:
        click.echo(Sandbox.get(ref).wait())


@click.command(name="rename")
@click.argument("old")
@click.argument("new")
@handle_errors
def rename_cmd(old, new) -> None:
    """Rename a sandbox."""
    from ember.api import Sandbox

    Sandbox.get(old).rename(new)


@click.command(name="port")
@click.argument("sandbox")
@click.argument("private_port", required=False)
@handle_errors
def port_cmd(sandbox, private_port) -> None:
    """List a sandbox's published ports (or where one container port is published)."""
    from ember.api import Sandbox

    st = Sandbox.get(sandbox).state
    lines = port_lines(st)
    if private_port:
        want = private_port if "/" in private_port else f"{private_port}/tcp"
        lines = [(p, h) for p, h in lines if p == want]
        if not lines:
            raise EmberError(f"no public port '{want}' published for {st.name}")
        for _, host in lines:
            click.echo(host)
        return
    for port, host in lines:
        click.echo(f"{port} -> {host}")


@click.command(name="top", context_settings={"ignore_unknown_options": True})
@click.argument("sandbox")
@click.argument("ps_args", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def top_cmd(sandbox, ps_args) -> None:
    """The processes of a running container (`ps` inside it; ps options may follow)."""
    import sys

    from ember.api import Sandbox
    from ember.errors import CommandNotFound

    sb = Sandbox.get(sandbox)
    try:
        res = sb.exec(["ps", *ps_args], env=["COLUMNS=1000"])
    except CommandNotFound:
        raise EmberError(f"sandbox {sb.name}: its image has no ps command "
                         "(`ember top` runs ps inside the container)") from None
    if res.exit_code != 0:
        err = res.stderr.decode(errors="replace").strip().splitlines()
        raise EmberError(f"ps {' '.join(ps_args)} failed in {sb.name}: "
                         f"{err[-1] if err else f'exit code {res.exit_code}'}")
    sys.stdout.buffer.write(res.stdout)


COMMANDS = (wait_cmd, rename_cmd, port_cmd, top_cmd)
