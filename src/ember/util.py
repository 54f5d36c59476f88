"""Small helpers shared by host-side modules: atomic writes, ids, sizes, tools."""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ember.errors import EmberError


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> None:
    """Write a file via temp-file-then-rename so readers never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def private_dir(path: str | os.PathLike) -> Path:
    """Create a root-only (0700) folder, and make an older, looser one 0700 too.

    Images, disks, templates, logs and records can hold what a workload or an
    image baked in (keys, tokens): no other user needs to traverse them, and a
    jailed VMM gets what it must open by descriptor or through its jail.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def place_fds(pairs: list[tuple[int, int]]) -> None:
    """Put each descriptor ``fd`` of ``(fd, number)`` at ``number``, inheritable,
    and close the originals: what a child does before it runs a new program.

    Every one is first copied above all the numbers, so that placing one cannot
    close another; not above a fixed number, which the resource limit on open
    files may forbid.
    """
    above = max([2, *(n for _, n in pairs)]) + 1
    high = [(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above), n) for fd, n in pairs]
    for fd in {fd for fd, _ in pairs}:
        os.close(fd)
    for fd, number in high:
        os.dup2(fd, number, inheritable=True)
        os.close(fd)


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive flock on ``path`` (created, with its folder) for the block:
    shared by every process on the host that names the same file."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_tool(cmd: list[str], what: str, *, stdin: str | None = None,
             error: type[EmberError] = EmberError, missing: str = "is not installed") -> str:
    """Run a system tool to completion; its stdout.

    A failure becomes one line: ``what``, then the tool's last line of error
    (where mkfs, lvm and iproute2 say what went wrong), or that it is missing.
    """
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise error(f"{what}: {cmd[0]} {missing}") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise error(f"{what}: {detail[-1] if detail else f'exit {proc.returncode}'}")
    return proc.stdout


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def new_id() -> str:
    """A 64-hex-digit id, like Docker's container ids."""
    return secrets.token_hex(32)


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """Parse "512m", "1g", "1.5GiB" or a byte count into bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise EmberError(f"invalid size {text!r} (use e.g. 512m or 2g)")
    number, unit = float(m.group(1)), m.group(2).lower()
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(number * mult)


def pause_for_test(stage: str) -> None:
    """A test hook, off unless ``EMBER_TEST_PAUSE`` (comma-separated) names ``stage``.

    Then this process says so on stderr (``ember: test pause at STAGE (pid N)``)
    and waits, so a test can SIGKILL it at exactly that point (tests/chaos):
    for ``EMBER_TEST_PAUSE_S`` seconds (default 600), or until the file that
    ``EMBER_TEST_RESUME`` names exists. Stages: ``recorded`` (Sandbox.create:
    the record exists, no monitor yet), ``vmm-started`` (SandboxVM.boot:
    the VMM runs, the agent is not connected, nothing of the VMM is recorded
    yet), ``template-started`` (the same in the boot of a VM template build);
    ``rm-killed``, ``rm-cleaned`` and ``rm-renamed`` (sandbox.cleanup.destroy:
    its processes are gone; its jail, network and disks too; its folder is
    renamed away but not yet deleted).
    """
    stages = os.environ.get("EMBER_TEST_PAUSE")
    if not stages or stage not in stages.split(","):
        return
    import sys
    import time

    print(f"ember: test pause at {stage} (pid {os.getpid()})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + float(os.environ.get("EMBER_TEST_PAUSE_S", "600"))
    resume = os.environ.get("EMBER_TEST_RESUME")
    while time.monotonic() < deadline and not (resume and os.path.exists(resume)):
        time.sleep(0.05)


def as_dict(value: object) -> dict:
    """``value`` if it is a dict, else an empty one: for reading optional objects
    of JSON documents from others (pod specs, OCI specs) that may be anything."""
    return value if isinstance(value, dict) else {}
