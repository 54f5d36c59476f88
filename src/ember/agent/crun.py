"""Driving crun, and turning its failures into statuses the host understands.

crun writes its errors to a log file (``--log-format=json``), never to the
container's stdio, so each invocation gets its own log to read back. A
command that cannot be found or run is reported by ``crun create`` (crun
checks the executable before the container waits for ``start``) or by
``crun exec``; at ``start`` only a late exec failure can show up. Both are
mapped to NOT_FOUND / PERMISSION_DENIED with Docker's wording, which the host
turns into exit codes 127 / 126.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
from collections.abc import Sequence

from ember.agent.reaper import Exit, Reaper
from ember.ttrpc import Code, TTRPCError

_counter = itertools.count()
LOADER = "/lib64/ld-linux-x86-64.so.2"


def warm(reaper: Reaper, binary: str = "crun") -> int:
    """Read crun and every library it loads into the page cache; the bytes read.

    The agent does this once, before it first answers: a VM template is saved
    after that, so every sandbox restored from it finds them cached, in pages
    of the template's RAM that all sandboxes share. Otherwise the first
    container of each sandbox read them from the root disk, which under TCG
    took ~0.6 s of its start (crun + libsystemd and its dependencies).
    """
    path = shutil.which(binary) or binary
    try:
        rc, out = reaper.run_command([LOADER, "--list", path], timeout=30)
    except OSError:
        rc, out = 1, b""
    if rc != 0:  # its words are an error, not a list
        out = b""
    files = [path]
    for line in out.decode(errors="replace").splitlines():  # "libx.so => /path (0x..)"
        files += [t for t in line.split() if t.startswith("/")][:1]
    total = 0
    for name in dict.fromkeys(files):
        try:
            with open(name, "rb", buffering=0) as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
        except OSError:
            continue
    return total

_NOT_FOUND = re.compile(r"executable file `(?P<name>[^`]*)` not found")


def exec_error(message: str, argv0: str) -> TTRPCError | None:
    """The status for a crun error that means "cannot run this command", if it is one."""
    m = _NOT_FOUND.search(message)
    if m:
        return TTRPCError(Code.NOT_FOUND,
                          f'exec: "{m.group("name")}": executable file not found in $PATH')
    low = message.lower()
    if "executable" in low or low.startswith("exec"):
        if "no such file or directory" in low:
            return TTRPCError(Code.NOT_FOUND, f'exec: "{argv0}": no such file or directory')
        if "permission denied" in low or "operation not permitted" in low:
            return TTRPCError(Code.PERMISSION_DENIED, f'exec: "{argv0}": permission denied')
    return None


class CrunFailed(TTRPCError):
    """crun exited non-zero; message holds what crun logged."""


class Crun:
    """crun with its own state root and per-call error logs."""

    def __init__(self, reaper: Reaper, root: str, log_dir: str, binary: str = "crun",
                 cgroup_manager: str = "") -> None:
        self.reaper = reaper
        self.root = root
        self.log_dir = log_dir
        self.binary = binary
        self.cgroup_manager = cgroup_manager
        os.makedirs(log_dir, exist_ok=True)

    def _argv(self, args: Sequence[str], log: str) -> list[str]:
        argv = [self.binary, "--root", self.root, f"--log=file:{log}", "--log-format=json"]
        if self.cgroup_manager:
            argv.append(f"--cgroup-manager={self.cgroup_manager}")
        return argv + list(args)

    def new_log(self) -> str:
        return os.path.join(self.log_dir, f"crun-{os.getpid()}-{next(_counter)}.log")

    def spawn(self, args: Sequence[str], log: str, stdin: int | None = None,
              stdout: int | None = None, stderr: int | None = None) -> Exit:
        return self.reaper.spawn(self._argv(args, log), stdin, stdout, stderr)

    def run(self, args: Sequence[str], timeout: float = 60.0, argv0: str = "") -> bytes:
        """Run a crun subcommand; raise its mapped error if it fails."""
        log = self.new_log()
        try:
            rc, out = self.reaper.run_command(self._argv(args, log), timeout)
            if rc != 0:
                raise self.failure(args[0], log, out, argv0)
            return out
        finally:
            _unlink(log)

    def failure(self, op: str, log: str, output: bytes = b"", argv0: str = "") -> TTRPCError:
        """The error for a failed crun op: an exec mapping, or crun's own words."""
        msgs = read_log(log)
        if not msgs and output:
            msgs = [output.decode(errors="replace").strip()]
        text = "; ".join(m for m in msgs if m) or "no error message"
        if argv0:
            mapped = exec_error(text, argv0)
            if mapped is not None:
                return mapped
        if "does not exist" in text or ("No such file or directory" in text and "status" in text):
            return TTRPCError(Code.NOT_FOUND, f"crun {op}: {text}")
        return CrunFailed(Code.UNKNOWN, f"crun {op}: {text}")

    def version(self) -> str:
        rc, out = self.reaper.run_command([self.binary, "--version"], 10)
        line = out.decode(errors="replace").splitlines()[0] if out else ""
        return line.strip() if rc == 0 else ""


def read_log(path: str) -> list[str]:
    """Error messages from a crun JSON log (plain lines are kept as they are)."""
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    msgs = []
    for line in lines:
        try:
            rec = json.loads(line)
            if isinstance(rec, dict) and rec.get("level", "error") in ("error", "fatal"):
                msgs.append(str(rec.get("msg", "")).strip())
        except ValueError:
            if line.strip():
                msgs.append(line.strip())
    return msgs


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
