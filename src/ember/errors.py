"""Errors that Ember reports to users.

Every failure a user can cause or meet is an :class:`EmberError` carrying a
one-line message and the exit code the CLI should use (Docker's convention:
125 when Ember itself fails, 126 when the command cannot be run, 127 when it
cannot be found).
"""

from __future__ import annotations


class EmberError(Exception):
    """A failure with a one-line, user-facing message."""

    exit_code = 125

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ImageError(EmberError):
    """An image cannot be found, parsed, verified or unpacked."""


class GuestError(EmberError):
    """Guest assets are missing or cannot be built."""


class VMError(EmberError):
    """The hypervisor failed, or the VM did not boot."""


class AgentError(EmberError):
    """The guest agent did not answer or returned an error."""


class NotFoundError(EmberError):
    """A named sandbox, container or image does not exist."""


class CommandNotRunnable(EmberError):
    exit_code = 126


class CommandNotFound(EmberError):
    exit_code = 127
