"""The node's lifecycle event log: what ``ember events`` streams and the metrics read.

The sandbox monitor (``ember run``), ``ember rm`` and the containerd shim
append one JSON record per event (container create, start, oom, die with its
exit code, destroy, pause, unpause; VM boot with its duration, boot and
restore failures, VMM crashes) to ``<state_dir>/events/events.log``:

* node-wide and append-only: each record is one line written with a single
  ``write()`` on an ``O_APPEND`` descriptor, kept under ``PIPE_BUF`` bytes,
  while holding an ``flock`` on ``.lock`` in the same folder, so writers in
  any number of processes never interleave and the size check and rotation
  are one step with the write;
* bounded: past ``MAX_BYTES`` the log is rotated to ``events.log.1`` ..
  ``.KEEP`` (the oldest dropped), whole records only;
* root-only: the folder is 0700 and the files 0600, opened with
  ``O_NOFOLLOW`` and used only when they are regular files of ours. The
  folder is outside every jail and every sandbox folder: no VMM can write,
  link or replace anything in it.

Publishing never fails the lifecycle step it reports: a full disk loses the
event (one line on stderr), not the container. Records look like Docker's
(``Type``, ``Action``, ``Actor.ID``, ``Actor.Attributes``, ``time``,
``timeNano``), so tools that read ``docker events --format json`` read ours.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ember.errors import EmberError
from ember.sandbox.status import Status

if TYPE_CHECKING:
    from ember.sandbox.vm import SandboxVM
    from ember.stopsignal import StopSignals

DIR_NAME = "events"
LOG_NAME = "events.log"
LOCK_NAME = ".lock"
MAX_BYTES = 1 << 20  # per file; with KEEP older files, at most ~4 MiB of events
KEEP = 3
MAX_RECORD = 4000  # one write() below PIPE_BUF (4096): never split, never interleaved
FOLLOW_POLL_S = 0.2


def events_dir(state_dir: Path) -> Path:
    return Path(state_dir) / DIR_NAME


def _own_regular(fd: int, what: Path) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        raise OSError(errno.EPERM, f"{what} is not a regular file of ours")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return st


def _open_private(path: Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _own_regular(fd, path)
    except OSError:
        os.close(fd)
        raise
    return fd


# ----------------------------------------------------------------- records
def make_record(type_: str, action: str, actor_id: str, attributes: dict[str, object],
                t_ns: int | None = None) -> dict:
    """One event as Docker's API spells it (attributes are strings)."""
    t_ns = time.time_ns() if t_ns is None else t_ns
    attrs = {str(k): "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
             for k, v in attributes.items()}
    return {"status": action, "id": actor_id, "from": attrs.get("image", ""), "Type": type_,
            "Action": action, "Actor": {"ID": actor_id, "Attributes": attrs},
            "scope": "local", "time": t_ns // 1_000_000_000, "timeNano": t_ns}


def _encode(record: dict) -> bytes:
    line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    if len(line) <= MAX_RECORD:
        return line
    attrs = record["Actor"]["Attributes"]
    for key in sorted(attrs, key=lambda k: -len(attrs[k])):  # shorten the longest first
        attrs[key] = attrs[key][:200] + "..."
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        if len(line) <= MAX_RECORD:
            return line
    record["Actor"]["Attributes"] = {"truncated": "true"}
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"


# ------------------------------------------------------------------- writer
class EventLog:
    """The node's event log under ``state_dir``."""

    def __init__(self, state_dir: Path, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.dir = events_dir(state_dir)
        self.path = self.dir / LOG_NAME
        self.max_bytes = max_bytes
        self.keep = keep

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        return [*(self.dir / f"{LOG_NAME}.{n}" for n in range(self.keep, 0, -1)), self.path]

    def append(self, record: dict) -> None:
        """Append one record (EmberError/OSError when it cannot be written)."""
        from ember.util import private_dir

        line = _encode(record)
        private_dir(self.dir)
        lock = _open_private(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd = _open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                size = os.fstat(fd).st_size
                if size and size + len(line) > self.max_bytes:
                    os.close(fd)
                    fd = -1
                    self._rotate()
                    fd = _open_private(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, line)
            finally:
                if fd >= 0:
                    os.close(fd)
        finally:
            os.close(lock)  # releases the flock

    def _rotate(self) -> None:
        """events.log -> .1 -> .2 ... (under the lock); the oldest goes."""
        files = self.files()  # oldest first: .KEEP ... .1, current
        files[0].unlink(missing_ok=True)
        for older, newer in zip(files, files[1:], strict=False):
            try:
                os.rename(newer, older)
            except FileNotFoundError:
                pass

    def publish(self, type_: str, action: str, actor_id: str, **attributes: object) -> dict:
        """Append an event; never raises (the lifecycle step it reports goes on)."""
        record = make_record(type_, action, actor_id, attributes)
        try:
            self.append(record)
        except (OSError, EmberError) as exc:
            print(f"ember: event {type_} {action} {actor_id[:12]} lost: {exc}",
                  file=sys.stderr, flush=True)
        return record

    # --------------------------------------------------------------- reading
    def read(self) -> Iterator[dict]:
        """Every stored record, oldest first."""
        tail = Tail(self, from_start=True)
        try:
            yield from tail.poll()
        finally:
            tail.close()


class Tail:
    """Reads records as they are appended, across rotations (no record twice).

    Holds the current file open: after a rotation it reads what is left of
    that file, then the files rotated after it, then the new current one.
    """

    def __init__(self, log: EventLog, from_start: bool = False) -> None:
        self.log = log
        self._fd: int | None = None
        self._ino: tuple[int, int] | None = None
        self._buf = b""
        self._first = from_start  # read rotated files too on the first poll
        if not from_start:
            self._open(self.log.path, at_end=True)

    def _open(self, path: Path, at_end: bool = False) -> bool:
        try:
            fd = _open_private(path, os.O_RDONLY)
        except OSError:
            return False
        if self._fd is not None:
            os.close(self._fd)
        st = os.fstat(fd)
        self._fd, self._ino, self._buf = fd, (st.st_dev, st.st_ino), b""
        if at_end:
            os.lseek(fd, 0, os.SEEK_END)
        return True

    def _drain(self) -> Iterator[dict]:
        if self._fd is None:
            return
        while True:
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # not ours to judge: skip a damaged line
            if isinstance(rec, dict) and isinstance(rec.get("timeNano"), int):
                yield rec

    def _identity(self, path: Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path, follow_symlinks=False)
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None

    def poll(self) -> Iterator[dict]:
        """Records appended since the last poll, oldest first."""
        files = self.log.files()
        if self._first:
            self._first = False
            for path in files:
                if self._open(path):
                    yield from self._drain()
            return
        yield from self._drain()
        if self._ino is not None and self._identity(self.log.path) == self._ino:
            return
        # Rotated (or made): what was appended to ours before it was renamed (no
        # writer touches it after that), the files after ours, the current one.
        yield from self._drain()
        ids = [self._identity(p) for p in files]
        start = ids.index(self._ino) + 1 if self._ino is not None and self._ino in ids else 0
        for path in files[start:]:
            if self._open(path):
                yield from self._drain()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --------------------------------------------------------------- selecting
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_time(value: str, option: str, now: float | None = None) -> int:
    """Docker's --since/--until: a Unix timestamp, an RFC 3339 date, or a duration
    back from now (10m, 1h30m); nanoseconds since the epoch. EmberError if bad."""
    text = value.strip()
    now = time.time() if now is None else now
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return int(float(text) * 1e9)
    if text and _DURATION.sub("", text) == "":
        secs = sum(float(n) * _UNIT_S[u] for n, u in _DURATION.findall(text))
        return int((now - secs) * 1e9)
    try:
        when = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise EmberError(f"{option} {value!r}: expected a Unix time, an RFC 3339 date "
                         "(2026-01-02T15:04:05Z) or a duration such as 10m") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1e9)


FILTER_KEYS = ("type", "event", "container", "id", "name", "image", "pod", "namespace",
               "exitcode")


@dataclass
class Filters:
    """Docker's --filter: values of one key are alternatives, different keys all apply."""

    wanted: dict[str, set[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, items: Iterable[str]) -> Filters:
        out = cls()
        for item in items:
            key, sep, val = item.partition("=")
            key = key.strip().lower()
            if not sep or not key or not val:
                raise EmberError(f"--filter {item!r}: expected KEY=VALUE, e.g. event=die")
            if key not in FILTER_KEYS:
                raise EmberError(f"--filter {item!r}: unknown key {key!r} (one of "
                                 f"{', '.join(FILTER_KEYS)})")
            out.wanted.setdefault(key, set()).add(val)
        return out

    @staticmethod
    def _values(rec: dict, key: str) -> set[str]:
        attrs = rec.get("Actor", {}).get("Attributes", {})
        actor = str(rec.get("Actor", {}).get("ID", ""))
        if key == "type":
            return {str(rec.get("Type", ""))}
        if key == "event":
            return {str(rec.get("Action", ""))}
        if key in ("container", "id"):
            return {actor, attrs.get("name", ""), attrs.get("sandbox", ""), actor[:12]}
        if key == "namespace":
            return {attrs.get("k8s_namespace", "")}
        if key == "exitcode":
            return {attrs.get("exitCode", "")}
        return {attrs.get(key, "")}

    def match(self, rec: dict) -> bool:
        for key, vals in self.wanted.items():
            have = self._values(rec, key) - {""}
            if key in ("container", "id"):
                actor = str(rec.get("Actor", {}).get("ID", ""))
                if not any(v in have or (len(v) >= 4 and actor.startswith(v)) for v in vals):
                    return False
            elif not have & vals:
                return False
        return True


def stream(log: EventLog, since_ns: int | None, until_ns: int | None, filters: Filters,
           stop: threading.Event | StopSignals | None = None) -> Iterator[dict]:
    """Stored events from ``since_ns`` (none without it), then new ones as they come,
    until ``until_ns`` (for ever without it, or until ``stop`` is set or signalled)."""
    stop = stop or threading.Event()
    tail = Tail(log, from_start=since_ns is not None)
    try:
        while True:
            for rec in tail.poll():
                t = rec["timeNano"]
                if since_ns is not None and t < since_ns:
                    continue
                if until_ns is not None and t > until_ns:
                    continue
                if filters.match(rec):
                    yield rec
            if until_ns is not None and time.time_ns() > until_ns:
                return
            wait = FOLLOW_POLL_S
            if until_ns is not None:
                wait = min(wait, max(0.0, (until_ns - time.time_ns()) / 1e9) + 0.01)
            if stop.wait(wait):
                return
    finally:
        tail.close()


def format_line(rec: dict) -> str:
    """Docker's text form: TIME TYPE ACTION ID (key=value, ...)."""
    t = rec["timeNano"]
    when = datetime.fromtimestamp(t // 1_000_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    attrs = rec.get("Actor", {}).get("Attributes", {})
    inner = ", ".join(f"{k}={v}" for k, v in sorted(attrs.items()))
    return (f"{when}.{t % 1_000_000_000:09d}Z {rec.get('Type')} {rec.get('Action')} "
            f"{rec.get('Actor', {}).get('ID', '')}" + (f" ({inner})" if inner else ""))


# -------------------------------------------------------------- publishers
class SandboxEvents:
    """Events of one ``ember run`` sandbox (the container is the sandbox)."""

    def __init__(self, state_dir: Path, sandbox_id: str, name: str = "", image: str = "",
                 hypervisor: str = "") -> None:
        self.log = EventLog(state_dir)
        self.id = sandbox_id
        self.base = {"name": name, "image": image, "kind": "sandbox", "hypervisor": hypervisor}

    def container(self, action: str, **attrs: object) -> dict:
        return self.log.publish("container", action, self.id, **self.base, **attrs)

    def vm(self, action: str, **attrs: object) -> dict:
        return self.log.publish("vm", action, self.id, **self.base, **attrs)

    def outcome(self, status: Status, exit_code: int | None, oom_killed: bool,
                error: str = "") -> None:
        """The container's end: oom (when it was), then die (Docker's order)."""
        if oom_killed:
            self.container("oom")
        attrs: dict[str, object] = {"exitCode": "" if exit_code is None else exit_code}
        if status == Status.DEAD:
            attrs["error"] = error
        self.container("die", **attrs)


def vm_booted(events, vm: SandboxVM, seconds: float) -> None:
    """A VM is up: how long it took, and whether it came from a template.

    ``events`` has a ``vm(action, **attrs)`` method (:class:`SandboxEvents`, the
    shim's :class:`PodEvents`); ``vm`` is a booted ``SandboxVM``.
    """
    from ember.sandbox.template import last_use

    use = last_use(vm.vm_id) if vm.use_template else ""
    events.vm("boot", seconds=f"{seconds:.3f}", mode="template" if vm.restored else "cold",
              template=use or "off")


def vm_boot_failed(events, vm: SandboxVM, error: str) -> None:
    """Restoring a template failed, or a cold boot did."""
    restoring = vm.vmm is not None and vm.vmm.spec.restore_from is not None
    events.vm("restore_failed" if restoring else "boot_failed", error=error)


class PodEvents:
    """Events of one containerd pod, from the shim: containerd's task events as
    container events, and the pod VM's boot and crash."""

    def __init__(self, state_dir: Path, pod_id: str, hypervisor: str = "") -> None:
        self.log = EventLog(state_dir)
        self.pod = pod_id
        self.hypervisor = hypervisor
        self.pod_attrs: dict[str, str] = {}
        self._containers: dict[str, dict[str, str]] = {}

    def _bundle(self, cid: str, bundle: str) -> None:
        try:
            spec = json.loads((Path(bundle) / "config.json").read_text())
            ann = spec.get("annotations") or {}
        except (OSError, ValueError, AttributeError):
            ann = {}
        self.annotate(cid, ann if isinstance(ann, dict) else {})

    def annotate(self, cid: str, ann: dict) -> None:
        """Learn a container's names (and the pod's) from its CRI annotations."""
        from ember.cri.annotations import (
            ANN_CONTAINER_NAME,
            ANN_POD_NAME,
            ANN_POD_NAMESPACE,
            CRIO_CONTAINER_NAME,
            CRIO_POD_NAME,
            CRIO_POD_NAMESPACE,
        )

        image = str(ann.get("io.kubernetes.cri.image-name", ""))
        name = str(ann.get(ANN_CONTAINER_NAME) or ann.get(CRIO_CONTAINER_NAME) or "")
        k8s = {"k8s_namespace": str(ann.get(ANN_POD_NAMESPACE)
                                    or ann.get(CRIO_POD_NAMESPACE) or ""),
               "k8s_pod": str(ann.get(ANN_POD_NAME) or ann.get(CRIO_POD_NAME) or "")}
        if cid == self.pod or not self.pod_attrs:
            self.pod_attrs = {k: v for k, v in k8s.items() if v}
        self._containers[cid] = {"name": name or ("POD" if cid == self.pod else cid[:12]),
                                 "image": image}

    def _attrs(self, cid: str) -> dict[str, object]:
        return {**self._containers.get(cid, {"name": cid[:12]}), "kind": "pod", "pod": self.pod,
                **self.pod_attrs, "hypervisor": self.hypervisor}

    def task(self, topic: str, cid: str, exec_id: str = "", bundle: str = "",
             exit_status: int | None = None) -> None:
        """One of containerd's /tasks/* events the shim publishes."""
        if topic == "/tasks/create" and bundle:
            self._bundle(cid, bundle)
        action = {"/tasks/create": "create", "/tasks/start": "start", "/tasks/oom": "oom",
                  "/tasks/exit": "die", "/tasks/delete": "destroy", "/tasks/paused": "pause",
                  "/tasks/resumed": "unpause", "/tasks/exec-added": "exec_create",
                  "/tasks/exec-started": "exec_start"}.get(topic)
        if action is None:
            return
        attrs = self._attrs(cid)
        if exec_id and exec_id != cid:
            if action == "die":
                action = "exec_die"
            elif action == "destroy":
                return  # an exec's delete: not the container's
            attrs["execID"] = exec_id
        if action in ("die", "exec_die") and exit_status is not None:
            attrs["exitCode"] = exit_status
        self.log.publish("container", action, cid, **attrs)
        if action == "destroy":
            self._containers.pop(cid, None)

    def vm(self, action: str, **attrs: object) -> dict:
        return self.log.publish("vm", action, self.pod, name=self.pod_attrs.get("k8s_pod", ""),
                                kind="pod", pod=self.pod, **self.pod_attrs,
                                hypervisor=self.hypervisor, **attrs)


def watch_vmm(events: PodEvents, vm: SandboxVM, wanted) -> None:
    """Publish a VM crash when ``vm``'s VMM exits while ``wanted()`` still says it
    should run (nobody stopped it). For pods, in a thread of its own; the sandbox
    monitor has its own watcher, which also records the death.
    """
    vmm = vm.vmm
    if vmm is None:
        return
    vmm.wait()
    if not wanted():
        return
    error = f"VMM exited unexpectedly ({vmm.label} {vmm.exit_description()})"
    print(f"ember: pod {events.pod}: {error}", file=sys.stderr, flush=True)
    events.vm("crash", error=error)
