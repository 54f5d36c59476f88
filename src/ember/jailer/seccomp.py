"""Build and load the seccomp allow-list filter, through libseccomp (pyseccomp).

The filter is compiled by the jailer before it forks (so a bad syscall name is
an argument error with nothing created) and loaded by the jailed child as the
very last step before execve: the Python jailer itself runs unconfined while it
sets the jail up, and the VMM starts already confined.
"""

from __future__ import annotations

import ctypes.util

from ember.errors import EmberError
from ember.jailer import profiles


def _import_pyseccomp():
    """Import pyseccomp without its two ``ldconfig -p`` runs.

    pyseccomp locates libc and libseccomp with ctypes.util.find_library, which
    forks ldconfig each time — tens of milliseconds on every VM start. The
    sonames are fixed by the Debian packages, so answer those two directly.
    """
    real = ctypes.util.find_library
    known = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
    ctypes.util.find_library = lambda name: known.get(name) or real(name)
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    return pyseccomp


pyseccomp = _import_pyseccomp()

MODES = ("kill", "log", "off")


def build_filter(mode: str, syscalls: list[str]):
    """An allow-list filter: listed syscalls pass; anything else is killed or logged.

    "kill" kills the whole process (SECCOMP_RET_KILL_PROCESS, seen as SIGSYS);
    "log" lets the call through and records it in the kernel audit log, for
    tuning a list; "off" installs nothing. Listed calls that have an entry in
    ``profiles.ARG_RULES`` pass only with the arguments given there (other
    arguments meet the default action), and ``profiles.ERRNO_RULES`` (io_uring,
    clone3) fail with their errno in every mode, listed or not.
    """
    if mode == "off":
        return None
    if mode not in MODES:
        raise EmberError(f"--seccomp-level: must be one of {', '.join(MODES)}, not {mode!r}")
    default = pyseccomp.KILL_PROCESS if mode == "kill" else pyseccomp.LOG
    filt = pyseccomp.SyscallFilter(default)
    try:
        # A binary search over ~140 syscalls instead of a linear scan: QEMU makes
        # tens of thousands of ppoll/futex calls per second.
        filt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)
    except OSError:
        pass  # libseccomp < 2.5: the linear filter is still correct
    for name in syscalls:
        if name in profiles.ERRNO_RULES:
            continue
        try:
            if name in profiles.ARG_RULES:
                index, pairs = profiles.ARG_RULES[name]
                for mask, value in pairs:
                    filt.add_rule(pyseccomp.ALLOW, name,
                                  pyseccomp.Arg(index, pyseccomp.MASKED_EQ, mask, value))
            else:
                filt.add_rule(pyseccomp.ALLOW, name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise EmberError(f"seccomp: unknown syscall {name!r} ({exc})") from None
    for name, err in profiles.ERRNO_RULES.items():
        filt.add_rule(pyseccomp.ERRNO(err), name)
    return filt


def load(filt) -> None:
    """Install the filter on the calling thread (libseccomp also sets no_new_privs)."""
    if filt is not None:
        filt.load()
