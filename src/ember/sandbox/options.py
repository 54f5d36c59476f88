"""`ember run` options that shape the container beyond its process: Docker's
``--cap-add/--cap-drop``, ``--read-only``, ``--hostname``, ``--add-host``,
``--dns``, ``--init``, ``--restart``, ``--stop-signal``, ``--stop-timeout``,
``--health-*`` and ``--pull``.

Everything is checked by :meth:`RunOptions.check` before anything exists, so
a bad value is one line and leaves nothing behind. The options then act in
three places, none of them new guest code:

* the OCI spec (:func:`apply_to_spec`): capabilities, a read-only root,
  the UTS hostname, ``--init`` as the container's PID 1;
* files the container sees at ``/etc/hosts``, ``/etc/hostname`` and
  ``/etc/resolv.conf`` (:func:`guest_files`): written into the guest with the
  agent's ``CopyFile`` and bind-mounted by crun, so they work on a read-only
  root and never change the image's disk;
* the sandbox monitor: restarts (:mod:`ember.sandbox.restart`) and health
  checks (:mod:`ember.sandbox.health`), from the record.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
from dataclasses import asdict, dataclass, field

from ember.errors import EmberError
from ember.sandbox.spec import ALL_CAPS

RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")
PULL_POLICIES = ("missing", "always", "never")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
# Guest paths of the files made for the container (the agent's tmpfs, never its disk).
GUEST_ETC = "/run/ember-etc"
# The init that --init runs as PID 1: the guest's static tini, bind-mounted in.
GUEST_INIT = "/usr/bin/tini-static"
CONTAINER_INIT = "/sbin/docker-init"


@dataclass
class RunOptions:
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    read_only: bool = False
    hostname: str | None = None
    add_hosts: list[str] = field(default_factory=list)  # "NAME:IP"
    dns: list[str] = field(default_factory=list)
    init: bool = False
    restart: str = "no"  # no | on-failure[:N] | always | unless-stopped
    stop_signal: str | None = None
    stop_timeout: int | None = None
    health_cmd: str | None = None
    health_interval: float = 30.0
    health_timeout: float = 30.0
    health_retries: int = 3
    health_start_period: float = 0.0
    pull: str = "missing"

    def check(self, auto_remove: bool = False) -> RunOptions:
        """Validate (one-line errors) and normalise; returns self."""
        if auto_remove and parse_restart(self.restart)[0] != "no":
            raise EmberError(f"conflicting options: --restart {self.restart} and --rm "
                             "(a removed sandbox cannot be restarted)")
        self.cap_add = [cap_name(c) for c in self.cap_add]
        self.cap_drop = [cap_name(c) for c in self.cap_drop]
        if self.hostname is not None and (len(self.hostname) > 63
                                          or not HOSTNAME_RE.match(self.hostname)):
            raise EmberError(f"invalid --hostname {self.hostname!r}: use letters, digits, '-' "
                             "and '.', at most 63 characters")
        for entry in self.add_hosts:
            parse_add_host(entry)
        for server in self.dns:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise EmberError(f"invalid --dns {server!r}: not an IP address") from None
        parse_restart(self.restart)
        if self.stop_signal is not None:
            signal_number(self.stop_signal, "--stop-signal")
        if self.stop_timeout is not None and self.stop_timeout < -1:
            raise EmberError(f"invalid --stop-timeout {self.stop_timeout}: seconds, or -1 "
                             "for no limit")
        if self.pull not in PULL_POLICIES:
            raise EmberError(f"invalid --pull {self.pull!r}: expected missing, always or never")
        if self.health_cmd is not None and not self.health_cmd.strip():
            raise EmberError("invalid --health-cmd: empty command")
        for name in ("health_interval", "health_timeout"):
            if getattr(self, name) <= 0:
                raise EmberError(f"invalid --{name.replace('_', '-')} "
                                 f"{getattr(self, name)}: must be more than 0 seconds")
        if self.health_start_period < 0:
            raise EmberError(f"invalid --health-start-period {self.health_start_period}: "
                             "must not be negative")
        if self.health_retries < 1:
            raise EmberError(f"invalid --health-retries {self.health_retries}: must be at "
                             "least 1")
        return self

    def record(self) -> dict:
        """What the sandbox record keeps (the monitor and `ember stop` read it)."""
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict | None) -> RunOptions:
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in (data or {}).items() if k in known})


def cap_name(text: str) -> str:
    """``net_admin``, ``NET_ADMIN`` or ``CAP_NET_ADMIN`` → ``CAP_NET_ADMIN``; ``ALL``."""
    name = text.strip().upper()
    if name == "ALL":
        return name
    if not name.startswith("CAP_"):
        name = "CAP_" + name
    if name not in ALL_CAPS:
        raise EmberError(f"invalid capability {text!r}: not a Linux capability "
                         "(e.g. NET_ADMIN, SYS_TIME, ALL)")
    return name


def capabilities(default: list[str], add: list[str], drop: list[str]) -> list[str]:
    """Docker's rule: start from the defaults (or nothing when ALL is dropped, or
    everything when ALL is added), drop, then add; adds win over drops."""
    caps = list(ALL_CAPS) if "ALL" in add else ([] if "ALL" in drop else list(default))
    caps = [c for c in caps if c not in drop or c in add]
    for c in add:
        if c != "ALL" and c not in caps:
            caps.append(c)
    return caps


def parse_add_host(entry: str) -> tuple[str, str]:
    """``NAME:IP`` (Docker also takes ``NAME=IP``; IPv6 addresses have colons)."""
    sep = "=" if "=" in entry else ":"
    name, _, ip = entry.partition(sep)
    ip = ip.strip("[]")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise EmberError(f"invalid --add-host {entry!r}: use NAME:IP") from None
    if not name or not HOSTNAME_RE.match(name):
        raise EmberError(f"invalid --add-host {entry!r}: {name!r} is not a host name")
    return name, ip


def parse_restart(text: str) -> tuple[str, int]:
    """(policy, maximum retries; 0 is no maximum)."""
    policy, sep, count = text.partition(":")
    if policy not in RESTART_POLICIES:
        raise EmberError(f"invalid --restart {text!r}: expected no, on-failure[:N], always "
                         "or unless-stopped")
    if not sep:
        return policy, 0
    if policy != "on-failure":
        raise EmberError(f"invalid --restart {text!r}: only on-failure takes a retry count")
    if not count.isdigit():
        raise EmberError(f"invalid --restart {text!r}: the retry count must be a number")
    return policy, int(count)


def signal_number(sig: int | str, what: str = "signal") -> int:
    """A signal by number, name or SIG-less name (KILL, SIGTERM, 15)."""
    if isinstance(sig, int):
        number = sig
    else:
        text = str(sig).strip().upper()
        if text.isdigit():
            number = int(text)
        else:
            try:
                number = int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])
            except KeyError:
                raise EmberError(f"invalid {what} {sig!r}") from None
    if not 0 < number < signal.NSIG:
        raise EmberError(f"invalid {what} {sig!r}")
    return number


def read_env_file(path: str) -> list[str]:
    """Docker's --env-file: KEY=VALUE lines, ``#`` comments and blank lines skipped; a
    bare KEY takes the caller's value, or is left out when the caller has none."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise EmberError(f"--env-file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise EmberError(f"--env-file {path}: not UTF-8 text") from None
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not key or any(c.isspace() for c in key):
            raise EmberError(f"--env-file {path}, line {n}: invalid variable name {key!r}")
        if eq:
            out.append(f"{key}={value}")
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def apply_to_spec(spec: dict, opts: RunOptions, sandbox_id: str) -> None:
    """Capabilities, read-only root, hostname, /etc files and --init in the OCI spec."""
    process = spec["process"]
    caps = process["capabilities"]
    chosen = capabilities(caps["bounding"], opts.cap_add, opts.cap_drop)
    for kind in ("bounding", "effective", "permitted"):
        caps[kind] = list(chosen)
    spec["root"]["readonly"] = bool(opts.read_only)
    if opts.hostname:
        spec["hostname"] = opts.hostname
    for name in etc_files(opts):
        spec["mounts"].append({"destination": f"/etc/{name}", "type": "bind",
                               "source": f"{GUEST_ETC}/{sandbox_id}/{name}",
                               "options": ["rbind", "rprivate"]})
    if opts.init:
        spec["mounts"].append({"destination": CONTAINER_INIT, "type": "bind",
                               "source": GUEST_INIT, "options": ["rbind", "ro"]})
        process["args"] = [CONTAINER_INIT, "--", *process["args"]]


def etc_files(opts: RunOptions) -> list[str]:
    """Which /etc files the container gets from Ember rather than from its image:
    as in Docker, only what an option speaks for (so an image's own files stay)."""
    names = []
    if opts.hostname or opts.add_hosts:
        names += ["hosts", "hostname"]
    if opts.dns:
        names.append("resolv.conf")
    return names


def guest_files(opts: RunOptions, sandbox_id: str, hostname: str, ip: str) -> dict[str, bytes]:
    """Guest path → content of the files :func:`apply_to_spec` mounts."""
    out: dict[str, bytes] = {}
    names = etc_files(opts)
    base = f"{GUEST_ETC}/{sandbox_id}"
    if "hosts" in names:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines.append(f"{ip or '127.0.1.1'}\t{hostname}")
        lines += [f"{addr}\t{name}" for name, addr in map(parse_add_host, opts.add_hosts)]
        out[f"{base}/hosts"] = ("\n".join(lines) + "\n").encode()
        out[f"{base}/hostname"] = f"{hostname}\n".encode()
    if "resolv.conf" in names:
        out[f"{base}/resolv.conf"] = "".join(f"nameserver {s}\n" for s in opts.dns).encode()
    return out


def resolve_image(images, ref: str, pull: str):
    """The image for ``ref`` under Docker's ``--pull`` policy: ``missing`` pulls only
    what is not here, ``always`` pulls first, ``never`` uses what is here."""
    from ember.errors import ImageError

    if pull == "always":
        return images.pull(ref)
    try:
        return images.resolve(ref)
    except ImageError as exc:
        if pull == "never":
            raise ImageError(f"{exc.message} (--pull never: not pulled)") from None
        if not exc.message.startswith("image not found"):
            raise
        missing = exc.message
    try:
        return images.pull(ref)
    except ImageError as exc:  # say both: not here, and why the pull failed
        raise ImageError(f"{missing} (not here, and the pull failed: {exc.message})") from None


def image_stop_signal(opts: RunOptions, image_config: dict) -> None:
    """As Docker: without --stop-signal, the image's StopSignal (else SIGTERM)."""
    cfg = image_config.get("config") or image_config.get("Config") or {}
    if opts.stop_signal is None and cfg.get("StopSignal"):
        try:
            signal_number(cfg["StopSignal"])
            opts.stop_signal = str(cfg["StopSignal"])
        except EmberError:
            pass  # an image's bad StopSignal: SIGTERM, as if it had none


def prepare_guest(agent, sandbox_dir, st, spec: dict) -> None:
    """Before the container is created: the /etc files it mounts go into the guest,
    and its spec is kept in the sandbox folder (the monitor restarts the container
    and runs health checks from it)."""
    from ember.util import atomic_write_json

    opts = RunOptions.from_record(st.options)
    hostname = spec.get("hostname") or st.short_id
    for path, data in guest_files(opts, st.id, hostname, st.ip_address).items():
        agent.copy_file(path, data, mode=0o644, make_dirs=True)
    atomic_write_json(sandbox_dir / SPEC_NAME, spec)


SPEC_NAME = "spec.json"


def check_network(network: str, publish: list[str]) -> list[str]:
    """Validate --network/--publish before anything exists; the normalised port list."""
    if network not in ("none", "bridge"):
        raise EmberError(f"invalid --network {network!r}: expected none or bridge")
    if publish and network != "bridge":
        raise EmberError("--publish needs --network bridge")
    from ember.net.proxy import parse_publish

    ports = [parse_publish(p) for p in publish]
    seen = [(p.host_ip, p.host_port) for p in ports]
    if len(set(seen)) != len(seen):
        raise EmberError("--publish names the same host port twice")
    return [str(p) for p in ports]
