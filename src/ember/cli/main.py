"""The `ember` command line: Docker's verbs, one micro-VM per container.

Every command is a thin wrapper over :mod:`ember.api` (sandboxes) and
:mod:`ember.image` (images). Errors print one line, ``ember: error: ...``,
and exit 125 (Ember failed), 126 (command cannot run) or 127 (command not
found), like Docker; `ember run` otherwise exits with the container's code.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from ember.cli.common import handle_errors
from ember.cli.runopts import run_options
from ember.cli.volume import mount_options
from ember.errors import EmberError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ember")
@click.option("--debug", is_flag=True,
              help="Print the time of each start-up phase on stderr (as EMBER_TRACE=1).")
def main(debug: bool) -> None:
    """Ember: run containers, each inside its own micro-VM."""
    from ember import trace

    if debug:
        os.environ[trace.ENV] = "1"
    trace.begin()


# ------------------------------------------------------------------- run
@main.command(context_settings={"ignore_unknown_options": False,
                                "allow_interspersed_args": False})
@click.option("-d", "--detach", is_flag=True, help="Run in the background, print the id.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin open.")
@click.option("-t", "--tty", is_flag=True, help="Allocate a terminal.")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the sandbox when it exits.")
@click.option("--privileged", is_flag=True,
              help="All capabilities and devices of the guest (never of the host).")
@click.option("--name", help="Name the sandbox.")
@click.option("-e", "--env", multiple=True, help="Set KEY=VALUE in the environment.")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-u", "--user", help="UID[:GID] to run as.")
@click.option("--entrypoint", help="Override the image's entrypoint.")
@click.option("--cpus", type=float, help="Number of CPUs.")
@click.option("-m", "--memory", help="Memory limit, e.g. 256m or 1g.")
@click.option("--ulimit", multiple=True, help="NAME=SOFT[:HARD], e.g. nofile=1024:2048.")
@click.option("-l", "--label", multiple=True, help="KEY=VALUE label.")
@click.option("--network", default="none", show_default=True,
              help="none (loopback only) or bridge (ember0, 10.88.0.0/16).")
@click.option("-p", "--publish", multiple=True,
              help="[IP:]HOSTPORT:CONTAINERPORT[/tcp]; needs --network bridge.")
@run_options
@mount_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def run(detach, interactive, tty, auto_remove, privileged, name, env, workdir, user, entrypoint,
        cpus, memory, ulimit, label, network, publish, image, command, **more) -> None:
    """Run a command in a new container, inside a new micro-VM."""
    from ember import trace
    from ember.api import Sandbox
    from ember.cli.attach import caller_winsize
    from ember.cli.runopts import collect

    options, file_env = collect(more)  # --env-file first: -e overrides it

    trace.mark("cli", trace.process_start())  # interpreter, imports, options

    labels = dict(item.partition("=")[::2] for item in label)
    sb = Sandbox.create(
        image, list(command) or None, name=name, env=[*file_env, *env], workdir=workdir,
        user=user,
        entrypoint=[entrypoint] if entrypoint is not None else None, cpus=cpus, memory=memory,
        tty=tty, stdin=interactive, auto_remove=auto_remove, ulimits=list(ulimit),
        labels=labels, network=network, publish=list(publish),
        console_size=caller_winsize() if tty else None, privileged=privileged,
        options=options, volumes=list(more.pop("volume", ())),
        mounts=list(more.pop("mount", ())), tmpfs=list(more.pop("tmpfs", ())),
    )
    if detach:  # with --rm, the sandbox monitor removes the sandbox when it exits
        click.echo(sb.id)
        return
    from ember.cli.attach import attach_main

    try:
        code = attach_main(sb, stdin=interactive, tty=tty)  # wait(): --rm removal done
    finally:
        if auto_remove:
            sb.release()  # on an error too (the monitor or VM died): nothing is left
    sys.exit(code)


# ------------------------------------------------------------- lifecycle
@main.command()
@click.option("-a", "--all", "show_all", is_flag=True,
              help="Show exited and dead sandboxes too.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option("-s", "--size", is_flag=True, help="Show what each container wrote to its disk.")
@handle_errors
def ps(show_all, quiet, as_json, size) -> None:
    """List sandboxes."""
    from ember.api import Sandbox
    from ember.cli.sandboxes import ports_text, size_text, status_text

    boxes = Sandbox.list(all=show_all)
    if as_json:
        click.echo(json.dumps([b.inspect() for b in boxes], indent=2))
        return
    if quiet:
        for b in boxes:
            click.echo(b.id[:12])
        return
    rows = [("SANDBOX ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAME",
             *(("SIZE",) if size else ()))]
    for b in boxes:
        st = b.state
        cmd = " ".join(st.command)
        rows.append((st.short_id, st.image, (cmd[:27] + "...") if len(cmd) > 30 else cmd,
                     _ago(st.created), status_text(st), ports_text(st), st.name,
                     *((size_text(st),) if size else ())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _ago(ts: float) -> str:
    secs = int(time.time() - ts)
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= n:
            k = secs // n
            return f"{k} {unit}{'s' if k > 1 else ''} ago"
    return f"{secs} seconds ago"


@main.command(name="exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True)
@click.option("-t", "--tty", is_flag=True)
@click.option("-e", "--env", multiple=True)
@click.option("-w", "--workdir")
@click.option("-u", "--user")
@click.argument("sandbox")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@handle_errors
def exec_(interactive, tty, env, workdir, user, sandbox, command) -> None:
    """Run a command in a running container."""
    from ember.api import Sandbox
    from ember.cli.attach import attach_exec, caller_winsize

    sb = Sandbox.get(sandbox)
    exec_id = sb.start_exec(list(command), env=list(env), workdir=workdir, user=user, tty=tty,
                            stdin=interactive, console_size=caller_winsize() if tty else None)
    sys.exit(attach_exec(sb, exec_id, stdin=interactive, tty=tty))


@main.command()
@click.option("-f", "--follow", is_flag=True)
@click.argument("sandbox")
@handle_errors
def logs(follow, sandbox) -> None:
    """Print a container's output."""
    from ember.api import Sandbox

    sb = Sandbox.get(sandbox)
    for stream, data in sb.logs(follow=follow):
        out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
        out.write(data)
        out.flush()
    died = sb.death_error() if follow else None
    if died:  # the monitor or the VM died: the output ends here, not with an exit
        raise died


@main.command()
@click.option("-t", "--time", "timeout", type=float,
              help="Seconds before SIGKILL (default: --stop-timeout, else 10).")
@click.argument("sandboxes", nargs=-1, required=True)
@handle_errors
def stop(timeout, sandboxes) -> None:
    """Stop containers (SIGTERM, then SIGKILL)."""
    from ember.api import Sandbox

    for ref in sandboxes:
        Sandbox.get(ref).stop(timeout)
        click.echo(ref)


@main.command()
@click.option("-s", "--signal", "sig", default="KILL", help="Signal to send.")
@click.argument("sandboxes", nargs=-1, required=True)
@handle_errors
def kill(sig, sandboxes) -> None:
    """Send a signal to containers."""
    from ember.api import Sandbox

    for ref in sandboxes:
        Sandbox.get(ref).kill(sig)
        click.echo(ref)


@main.command()
@click.option("-f", "--force", is_flag=True, help="Stop and remove running sandboxes.")
@click.argument("sandboxes", nargs=-1, required=True)
@handle_errors
def rm(force, sandboxes) -> None:
    """Remove sandboxes."""
    from ember.api import Sandbox

    failed = None
    for ref in sandboxes:
        try:
            Sandbox.get(ref).remove(force=force)
            click.echo(ref)
        except EmberError as exc:
            click.echo(f"ember: error: {exc.message}", err=True)
            failed = exc
    if failed:
        sys.exit(failed.exit_code)


@main.command()
@click.argument("sandboxes", nargs=-1, required=True)
@handle_errors
def pause(sandboxes) -> None:
    """Pause sandboxes' VMs."""
    from ember.api import Sandbox

    for ref in sandboxes:
        Sandbox.get(ref).pause()
        click.echo(ref)


@main.command()
@click.argument("sandboxes", nargs=-1, required=True)
@handle_errors
def unpause(sandboxes) -> None:
    """Resume paused sandboxes."""
    from ember.api import Sandbox

    for ref in sandboxes:
        Sandbox.get(ref).resume()
        click.echo(ref)


@main.command()
@click.option("--json", "as_json", is_flag=True, default=True, help="JSON output (default).")
@click.argument("refs", nargs=-1, required=True)
@handle_errors
def inspect(as_json, refs) -> None:
    """Show sandboxes (or images) in detail, as JSON."""
    from ember.api import Sandbox
    from ember.errors import NotFoundError

    out = []
    for ref in refs:
        try:
            out.append(Sandbox.get(ref).inspect())
        except NotFoundError:
            from ember.config import load_config
            from ember.image.store import ImageStore

            try:
                out.append(ImageStore(load_config()).inspect(ref))
            except EmberError:
                raise NotFoundError(f"no such sandbox or image: {ref}") from None
    click.echo(json.dumps(out, indent=2))


from ember.cli.images import guest, image, images, pull  # noqa: E402

main.add_command(image)
main.add_command(images)
main.add_command(pull)
main.add_command(guest)

from ember.cli.check import check_cmd  # noqa: E402
from ember.cli.config import config_group  # noqa: E402
from ember.cli.cp import cp_cmd  # noqa: E402
from ember.cli.events import events_cmd  # noqa: E402
from ember.cli.info import info_cmd  # noqa: E402
from ember.cli.metrics import metrics_group  # noqa: E402
from ember.cli.sandboxes import COMMANDS as SANDBOX_COMMANDS  # noqa: E402
from ember.cli.stats import stats_cmd  # noqa: E402
from ember.cli.volume import volume_group  # noqa: E402

main.add_command(check_cmd)
main.add_command(config_group)
main.add_command(cp_cmd)
main.add_command(volume_group)
main.add_command(events_cmd)
main.add_command(info_cmd)
main.add_command(metrics_group)
main.add_command(stats_cmd)
for _cmd in SANDBOX_COMMANDS:  # wait, rename, port, top
    main.add_command(_cmd)

try:  # the Kubernetes commands are optional at import time
    from ember.k8s.cli import k8s_group  # noqa: E402

    main.add_command(k8s_group)
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    main()
