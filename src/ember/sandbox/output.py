"""One reader for a guest process's output: the chunks of one stream until it ends.

The agent keeps each process's stdout and stderr in the guest with absolute
offsets; a reader asks for the bytes past its offset with ReadStdout /
ReadStderr, each call a long poll (the agent answers at once on output or
EOF, else after ``wait_ms``). Everything on the host that shows a process's
output reads it this way — the monitor's log pump, ``Sandbox.exec``, ``ember
exec``'s terminal, the shim's stdio FIFOs, the copy helper's tar stream — so
the loop and the decision when it is over live here, once; each caller keeps
only where the bytes go.

The error policy (:meth:`OutputReader.__iter__`):

* the stream **ends quietly** on EOF (everything the process wrote is read),
  when the process or its container is gone from the guest (NotFound: it was
  removed, so nothing more will come), when the agent connection has closed
  (the VM stopped — after the container exited, or because it died: the
  reader cannot tell, the caller's WaitProcess or death check can), and when
  the caller's ``stop()`` says so between two calls. :attr:`OutputReader.ended`
  says which, :attr:`OutputReader.cause` holds the error behind GONE/CLOSED;
* **any other error is raised** (a call that timed out, an agent status,
  a transport error on a connection still open), unless the caller's
  ``retry(error)`` answers True: then the reader waits ``retry_delay`` and
  asks again from the same offset (the shim does this for a paused VM, which
  answers nothing until it is resumed).

It serves both kinds of caller: ``read`` is any callable that does one
ReadStream call, so the typed :class:`~ember.sandbox.agent_client.AgentClient`
(``AgentClient.iter_output``) and the monitor's raw ttrpc client both fit; the
errors of either (ember's NotFoundError / a ttrpc NOT_FOUND status, a closed
ttrpc connection) mean the same here.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator

from ember.agent.proto import agent_pb2
from ember.errors import EmberError, NotFoundError
from ember.ttrpc import Code, ConnectionClosed, TTRPCError

# One ReadStdout/ReadStderr call: (offset, wait_ms) -> the agent's answer.
ReadOnce = Callable[[int, int], agent_pb2.ReadStreamResponse]

METHODS = {"stdout": "ReadStdout", "stderr": "ReadStderr"}


def read_method(stream: str) -> str:
    """The agent method that reads ``stream`` ("stdout" or "stderr")."""
    try:
        return METHODS[stream]
    except KeyError:
        raise ValueError(f"unknown output stream {stream!r}: use stdout or stderr") from None


class End(enum.Enum):
    """Why a reader stopped (see the module docstring)."""

    EOF = "eof"
    GONE = "gone"
    CLOSED = "closed"
    STOPPED = "stopped"


def _never() -> bool:
    return False


class OutputReader:
    """Iterate for the chunks (non-empty bytes) of one stream, in order, once.

    ``wait_ms`` is each call's long poll; ``closed()`` tells whether the agent
    connection under ``read`` is closed (an error on a closed connection ends
    the stream, whatever its type); ``stop()`` is asked before every call.
    """

    def __init__(self, read: ReadOnce, *, wait_ms: int, offset: int = 0,
                 closed: Callable[[], bool] | None = None,
                 stop: Callable[[], bool] | None = None,
                 retry: Callable[[Exception], bool] | None = None,
                 retry_delay: float = 0.2) -> None:
        self._read = read
        self.wait_ms = wait_ms
        self.offset = offset  # of the next byte to read
        self._closed = closed or _never
        self._stop = stop or _never
        self._retry = retry
        self.retry_delay = retry_delay
        self.ended: End | None = None
        self.cause: Exception | None = None

    def __iter__(self) -> Iterator[bytes]:
        while not self._end_if(self._stop(), End.STOPPED):
            try:
                resp = self._read(self.offset, self.wait_ms)
            except (EmberError, TTRPCError, OSError) as exc:
                if self._quiet_end(exc):
                    return
                if self._retry is not None and self._retry(exc):
                    time.sleep(self.retry_delay)
                    continue
                raise
            self.offset = resp.offset + len(resp.data)
            if resp.data:
                yield bytes(resp.data)
            if self._end_if(resp.eof, End.EOF):
                return

    def _end_if(self, condition: bool, why: End) -> bool:
        if condition:
            self.ended = why
        return condition

    def _quiet_end(self, exc: Exception) -> bool:
        """The policy: NotFound means the process is gone, a closed connection closed."""
        if isinstance(exc, NotFoundError) or (
                isinstance(exc, TTRPCError) and exc.code == Code.NOT_FOUND):
            self.ended = End.GONE
        elif isinstance(exc, ConnectionClosed) or self._closed():
            self.ended = End.CLOSED
        else:
            return False
        self.cause = exc
        return True
