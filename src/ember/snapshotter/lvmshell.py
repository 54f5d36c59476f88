"""Running lvm commands: one process per command, or one long-lived ``lvm`` shell.

Every ``lvm`` process starts by loading its libraries and configuration and
scanning devices: about 0.35 s for an ``lvs`` under TCG, and an ``lvcreate``
0.8 s, most of which is that start-up. The snapshotter runs two or three lvm
commands per layer, so a 128-layer image paid minutes of it. An ``lvm`` shell
(``lvm`` with commands on its stdin) pays it once: the same ``lvs`` costs
0.07 s, an ``lvcreate`` 0.4 s.

The shell is driven the way LVM's own D-Bus service (lvmdbusd) drives it,
through the ``lvmdbusd`` command profile that lvm2 ships: every command writes
one JSON document to the file descriptor named by ``LVM_REPORT_FD``, holding
its report (for ``lvs``) and a log whose ``shell`` status entry says whether it
succeeded; ``lastlog`` then gives a failure's error lines. Nothing is parsed
from the human output. Where that profile is missing the snapshotter runs one
process per command as before (:class:`OneShot`), with the same JSON reports.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import threading
from pathlib import Path
from typing import Any, Protocol

from ember.errors import EmberError

log = logging.getLogger(__name__)

# Quiet about inherited descriptors; the C locale for stable messages.
_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
PROFILE = "lvmdbusd"
# An idle shell ends at end-of-file in well under a second, even under TCG; one
# that does not is killed rather than holding up the snapshotter's stop.
CLOSE_WAIT_S = 5
# What the shell splits on or treats specially; our arguments never hold it
# (names are checked against LVM's rules, tags are ember.key=number).
_UNSAFE = re.compile(r"[\s\"'\\#]")


class LvmError(EmberError):
    """An lvm command failed; the message carries lvm's own line."""


def _lvm_line(stderr: str, returncode: int) -> str:
    """lvm's own words for what went wrong, as one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines
              if not ln.startswith(("WARNING", "Run `", "File descriptor"))]
    # lvm often says what and then that it gave up ('Volume group "x" not
    # found', 'Cannot process volume group x'): keep both, on one line.
    return "; ".join((errors or lines or [f"exit status {returncode}"])[-2:])


def lvm(*args: str, what: str) -> str:
    """Run ``lvm ARGS`` as its own process; a failure is one line: what we did,
    then lvm's message."""
    try:
        proc = subprocess.run(["lvm", *args], capture_output=True, text=True, check=False,
                              env={**os.environ, **_ENV}, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise LvmError(f"{what}: lvm is not installed (apt install lvm2)") from None
    if proc.returncode != 0:
        raise LvmError(f"{what}: {_lvm_line(proc.stderr, proc.returncode)}")
    return proc.stdout


class Runner(Protocol):
    def run(self, *args: str, what: str) -> dict[str, Any]: ...

    def close(self) -> None: ...


def lv_rows(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The rows of an ``lvs --reportformat json`` report."""
    return [row for part in doc.get("report", []) for row in part.get("lv", [])]


class OneShot:
    """One ``lvm`` process per command (where the shell's profile is missing)."""

    def run(self, *args: str, what: str) -> dict[str, Any]:
        out = lvm(*args, what=what)
        try:
            return json.loads(out) if out.strip().startswith("{") else {}
        except ValueError:
            raise LvmError(f"{what}: lvm printed a report that is not JSON") from None

    def close(self) -> None:
        pass


class LvmShell:
    """One ``lvm`` shell process for all of a snapshotter's commands.

    Calls are serialised (the shell runs one command at a time). If the shell
    dies, the call fails with a one-line error and the next call starts a new
    shell. Closing stdin ends it; so does the snapshotter's exit, however it
    exits (the shell reads end-of-file).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._report = -1
        self._buf = ""

    def _start(self, what: str) -> subprocess.Popen[bytes]:
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                ["lvm"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=(w,), cwd="/",
                env={**os.environ, **_ENV, "LVM_REPORT_FD": str(w),
                     "LVM_COMMAND_PROFILE": PROFILE})
        except FileNotFoundError:
            os.close(r)
            raise LvmError(f"{what}: lvm is not installed (apt install lvm2)") from None
        finally:
            os.close(w)
        self._proc, self._report, self._buf = proc, r, ""
        return proc

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin:
                proc.stdin.close()
            proc.wait(timeout=CLOSE_WAIT_S)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        os.close(self._report)
        self._report = -1

    def run(self, *args: str, what: str) -> dict[str, Any]:
        bad = [a for a in args if not a or _UNSAFE.search(a)]
        if bad:
            raise ValueError(f"lvm shell argument {bad[0]!r} would be split or quoted")
        with self._lock:
            doc = self._call(" ".join(args), what)
            status = [e for e in doc.get("log", [])
                      if e.get("log_context") == "shell" and e.get("log_type") == "status"]
            if status and status[-1].get("log_ret_code") == "1":
                return doc
            code = status[-1].get("log_ret_code", "?") if status else "?"
            errors = [e.get("log_message", "") for e in
                      self._call("lastlog", what).get("log", []) if e.get("log_type") == "error"]
            raise LvmError(f"{what}: " + ("; ".join(errors[-2:]) or f"lvm status {code}"))

    def _call(self, line: str, what: str) -> dict[str, Any]:
        proc = self._proc if self._proc and self._proc.poll() is None else None
        if proc is None:
            self._stop()
            proc = self._start(what)
        try:
            assert proc.stdin is not None
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
            return self._read_doc()
        except (OSError, EOFError) as exc:
            self._stop()
            raise LvmError(f"{what}: the lvm shell ended ({exc or 'end of report'}); "
                           "it is restarted on the next call") from None

    def _read_doc(self) -> dict[str, Any]:
        """Read the report pipe up to the end of one JSON document."""
        decoder = json.JSONDecoder()
        while True:
            text = self._buf.lstrip()
            if text:
                try:
                    doc, end = decoder.raw_decode(text)
                except ValueError:
                    pass
                else:
                    self._buf = text[end:]
                    return doc if isinstance(doc, dict) else {}
            select.select([self._report], [], [])
            chunk = os.read(self._report, 1 << 16)
            if not chunk:
                raise EOFError
            self._buf += chunk.decode(errors="replace")


def open_runner() -> Runner:
    """The shell where lvm2's ``lvmdbusd`` profile is installed, else one process
    per command."""
    try:
        out = lvm("config", "--typeconfig", "full", "config/profile_dir",
                  what="reading lvm's profile_dir")
    except LvmError as exc:
        log.warning("%s; running one lvm process per command", exc.message)
        return OneShot()
    found = re.search(r'profile_dir\s*=\s*"([^"]*)"', out)
    folder = Path(found.group(1) if found else "/etc/lvm/profile")
    if not (folder / f"{PROFILE}.profile").is_file():
        log.warning("lvm profile %s is not in %s; running one lvm process per command",
                    PROFILE, folder)
        return OneShot()
    return LvmShell()
