"""``Sandbox.exec(..., stream=True)``: an exec's output as the process writes it.

A program driving a sandbox (an agent running generated code, a build) wants
to show output while a long command runs, not after. The agent keeps each
stream with absolute offsets, so two reader threads (stdout, stderr) each
block on the agent for new bytes and hand every chunk to one queue the
caller iterates; the exit code is read once both streams have ended.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

from ember.errors import EmberError
from ember.sandbox.output import End

_END = object()


class ExecStream:
    """Iterate for ``(stream, data)``: ``stream`` is ``"stdout"`` or ``"stderr"``,
    in the order the chunks arrived; then ``exit_code`` (or :meth:`wait`)."""

    def __init__(self, sandbox, exec_id: str, stdin: bytes | None = None) -> None:
        self.sandbox = sandbox
        self.exec_id = exec_id
        self._agent = sandbox.agent()
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._exit_code: int | None = None
        self._ended = 0  # readers that have finished
        if stdin is not None:
            if stdin:
                self._agent.write_stdin(sandbox.id, exec_id, stdin)
            self._agent.close_stdin(sandbox.id, exec_id)
        self._readers = [threading.Thread(target=self._read, args=(name,), daemon=True,
                                          name=f"exec-{name}")
                         for name in ("stdout", "stderr")]
        for t in self._readers:
            t.start()

    def _read(self, name: str) -> None:
        reader = self._agent.iter_output(self.sandbox.id, self.exec_id, name, wait_ms=1000)
        try:
            for data in reader:
                self._queue.put((name, data))
            if reader.ended is not End.EOF:  # gone or closed before the end: say so
                self._error = reader.cause
        except (EmberError, OSError) as exc:
            self._error = exc
        finally:
            self._queue.put(_END)

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        while self._ended < len(self._readers):
            item = self._queue.get()
            if item is _END:
                self._ended += 1
                continue
            yield item
        if self._error is not None:
            raise self.sandbox.death_error(wait=6) or self._error

    def wait(self) -> int:
        """The exit code (draining what was not read yet)."""
        if self._exit_code is None:
            for _ in self:
                pass
            self._exit_code = self._agent.wait_process(self.sandbox.id, self.exec_id).exit_status
        return self._exit_code

    @property
    def exit_code(self) -> int:
        return self.wait()
