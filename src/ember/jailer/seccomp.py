"""Build and load the seccomp allow-list filter, through libseccomp (pyseccomp).

The filter is compiled by the jailer before it forks (so a bad syscall name is
an argument error with nothing created) and loaded by the jailed child as the
very last step before execve: the Python jailer itself runs unconfined while it
sets the jail up, and the VMM starts already confined.
"""

from __future__ import annotations

import pyseccomp

from ember.errors import EmberError

MODES = ("kill", "log", "off")


def build_filter(mode: str, syscalls: list[str]) -> pyseccomp.SyscallFilter | None:
    """An allow-list filter: listed syscalls pass; anything else is killed or logged.

    "kill" kills the whole process (SECCOMP_RET_KILL_PROCESS, seen as SIGSYS);
    "log" lets the call through and records it in the kernel audit log, for
    tuning a list; "off" installs nothing.
    """
    if mode == "off":
        return None
    if mode not in MODES:
        raise EmberError(f"--seccomp-level: must be one of {', '.join(MODES)}, not {mode!r}")
    default = pyseccomp.KILL_PROCESS if mode == "kill" else pyseccomp.LOG
    filt = pyseccomp.SyscallFilter(default)
    for name in syscalls:
        try:
            filt.add_rule(pyseccomp.ALLOW, name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EmberError(f"seccomp: unknown syscall {name!r} ({exc})") from None
    return filt


def load(filt: pyseccomp.SyscallFilter | None) -> None:
    """Install the filter on the calling thread (libseccomp also sets no_new_privs)."""
    if filt is not None:
        filt.load()
