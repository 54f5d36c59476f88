"""Attach the terminal to a running container: output, stdin, signals, tty.

Output comes from the sandbox's log, which the monitor fills as the container
writes, so an attached `ember run` and a later `ember logs` see the same bytes.
Stdin goes to the agent; SIGINT/SIGTERM (and friends) are forwarded to the
container the way `docker run` does; with a terminal the local tty goes raw
and window-size changes follow. When the sandbox's monitor or VM dies, both
end with a one-line error (exit 125) instead of an exit code.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys
import termios
import threading
import tty as ttymod

from ember.api import Sandbox
from ember.errors import EmberError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
             signal.SIGUSR1, signal.SIGUSR2)


def winsize(fd: int) -> tuple[int, int] | None:
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def caller_winsize() -> tuple[int, int] | None:
    """(rows, cols) of the caller's terminal (stdin's, else stdout's), if it has one."""
    return winsize(sys.stdin.fileno()) or winsize(sys.stdout.fileno())


def pump_stdin(sb: Sandbox, exec_id: str) -> None:
    agent = sb.agent()
    fd = sys.stdin.fileno()
    try:
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            agent.write_stdin(sb.id, exec_id, data)
    except (OSError, EmberError):
        return
    try:
        agent.close_stdin(sb.id, exec_id)
    except (OSError, EmberError):
        pass


def _write(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.flush()
    except BrokenPipeError:
        pass


def attach_main(sb: Sandbox, stdin: bool, tty: bool) -> int:
    """Stream a sandbox's main process until it exits; its exit code."""
    restore = _enter_raw(tty)
    old_handlers = {}
    try:
        if tty:
            _resize(sb, "")
            old_handlers[signal.SIGWINCH] = signal.signal(
                signal.SIGWINCH, lambda *_: _resize(sb, ""))
        else:
            for sig in FORWARDED:
                old_handlers[sig] = signal.signal(sig, lambda s, _f: _forward(sb, "", s))
        if stdin:
            threading.Thread(target=pump_stdin, args=(sb, ""), daemon=True).start()
        for stream, data in sb.logs(follow=True, poll=0.02):
            _write(sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer, data)
        died = sb.death_error()
        if died:  # the monitor or the VM died: no exit code to pass on
            raise died
        return sb.wait()
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        restore()


def attach_exec(sb: Sandbox, exec_id: str, stdin: bool, tty: bool) -> int:
    """Stream an exec'd process until it exits; its exit code."""
    agent = sb.agent()
    restore = _enter_raw(tty)
    old_handlers = {}
    try:
        if tty:
            _resize(sb, exec_id)
            old_handlers[signal.SIGWINCH] = signal.signal(
                signal.SIGWINCH, lambda *_: _resize(sb, exec_id))
        else:
            for sig in FORWARDED:
                old_handlers[sig] = signal.signal(sig, lambda s, _f: _forward(sb, exec_id, s))
        if stdin:
            threading.Thread(target=pump_stdin, args=(sb, exec_id), daemon=True).start()
        threads = [threading.Thread(target=_pump_out, args=(agent, sb.id, exec_id, s), daemon=True)
                   for s in ("stdout", "stderr")]
        for t in threads:
            t.start()
        try:
            code = agent.wait_process(sb.id, exec_id).exit_status
        except EmberError as exc:  # the connection went: say so if the sandbox died
            raise sb.death_error(wait=6) or exc from None
        for t in threads:
            t.join(timeout=10)
        return code
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        restore()


def _pump_out(agent, cid: str, exec_id: str, stream: str) -> None:
    """Copy one stream to the terminal; an error only ends the copy (WaitProcess,
    in attach_exec, is what reports a sandbox that went away)."""
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer
    try:
        for data in agent.iter_output(cid, exec_id, stream, wait_ms=1000):
            _write(out, data)
    except (OSError, EmberError):
        return


def _forward(sb: Sandbox, exec_id: str, sig: int) -> None:
    def send() -> None:
        try:
            sb.agent().signal_process(sb.id, exec_id, int(sig), all=False)
        except (OSError, EmberError):
            pass
    threading.Thread(target=send, daemon=True).start()


def _resize(sb: Sandbox, exec_id: str) -> None:
    size = caller_winsize()
    if size:
        try:
            sb.agent().tty_resize(sb.id, exec_id, size[0], size[1])
        except (OSError, EmberError):
            pass


def _enter_raw(tty: bool):
    fd = sys.stdin.fileno()
    if not tty or not os.isatty(fd):
        return lambda: None
    saved = termios.tcgetattr(fd)
    ttymod.setraw(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)
