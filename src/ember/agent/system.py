"""Guest-wide operations: details, clock and entropy sync, file copy, power off."""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
import tempfile
import time

from ember.ttrpc import Code, TTRPCError

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RB_POWER_OFF = 0x4321FEDC


def mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def uptime_s() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes, by field name."""
    out = {}
    for line in _read("/proc/meminfo").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return out


def loadavg() -> tuple[float, float, float]:
    try:
        one, five, fifteen = (float(x) for x in _read("/proc/loadavg").split()[:3])
        return one, five, fifteen
    except ValueError:
        return 0.0, 0.0, 0.0


def cpu_times_ns() -> tuple[int, int, int]:
    """(user, system, idle) of all CPUs in ns, from /proc/stat's first line:
    user + nice, system + irq + softirq, idle + iowait."""
    for line in _read("/proc/stat").splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            ticks = [int(x) for x in parts[1:8] if x.isdigit()] + [0] * 7
            user, nice, system, idle, iowait, irq, softirq = ticks[:7]
            tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
            return ((user + nice) * tick_ns, (system + irq + softirq) * tick_ns,
                    (idle + iowait) * tick_ns)
    return 0, 0, 0


def oom_kills() -> int:
    """How many processes the guest kernel's OOM killer has killed since boot."""
    for line in _read("/proc/vmstat").splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return 0


def set_clock(time_ns: int) -> None:
    """Step the wall clock to the host's (after a restore it is stale)."""
    try:
        time.clock_settime_ns(time.CLOCK_REALTIME, time_ns)
    except OSError as e:
        raise TTRPCError(Code.PERMISSION_DENIED, f"cannot set the guest clock: {e}") from e


def add_entropy(data: bytes) -> bool:
    """Mix data into the RNG; credit it too when allowed. Returns whether credited.

    A VM restored from a snapshot shares its RNG state with every other
    restore of that snapshot, so fresh host entropy must go in before use.
    """
    if not data:
        return False
    with open("/dev/urandom", "wb", buffering=0) as f:
        f.write(data)
        info = struct.pack("ii", len(data) * 8, len(data)) + data
        try:
            fcntl.ioctl(f.fileno(), RNDADDENTROPY, info)
            return True
        except OSError:
            return False


def copy_file(path: str, data: bytes, mode: int, uid: int, gid: int, append: bool,
              make_dirs: bool) -> None:
    """Write a file atomically (or append to it) with the given owner and mode."""
    if not os.path.isabs(path) or path.endswith("/"):
        raise TTRPCError(Code.INVALID_ARGUMENT, f"copy target {path!r} must be an absolute file path")
    parent = os.path.dirname(path)
    if make_dirs:
        os.makedirs(parent, exist_ok=True)
    elif not os.path.isdir(parent):
        raise TTRPCError(Code.NOT_FOUND, f"directory {parent} does not exist")
    mode = mode & 0o7777 or 0o644
    try:
        if append:
            # Appending keeps an existing file's owner and mode.
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                             | os.O_CLOEXEC, mode)
                os.fchmod(fd, mode)
                os.fchown(fd, uid, gid)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            return
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".ember-copy-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                os.fchmod(f.fileno(), mode)
                os.fchown(f.fileno(), uid, gid)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    except IsADirectoryError as e:
        raise TTRPCError(Code.INVALID_ARGUMENT, f"copy target {path} is a directory") from e
    except PermissionError as e:
        raise TTRPCError(Code.PERMISSION_DENIED, f"cannot write {path}: {e.strerror}") from e


RB_AUTOBOOT = 0x01234567


def power_off() -> None:
    """Stop the VM (PID 1 only): sync, then reboot(RB_AUTOBOOT).

    A reset, not a power-off: Firecracker on x86 exits only when the guest
    resets, and QEMU runs with -no-reboot, so a reset ends both. RB_POWER_OFF
    is the fallback should the reset be refused.
    """
    os.sync()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.reboot(RB_AUTOBOOT)
    libc.reboot(RB_POWER_OFF)
