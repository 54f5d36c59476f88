"""ttrpc errors: gRPC status codes carried in a Response, and a closed peer."""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """gRPC status codes (the numbers are the wire contract)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TTRPCError(Exception):
    """A non-OK status: raised by handlers, and by the client when it gets one."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = int(code)
        self.message = message

    def __str__(self) -> str:
        try:
            name = Code(self.code).name
        except ValueError:
            name = str(self.code)
        return f"{name}: {self.message}"


class FrameTooLarge(TTRPCError):
    """A frame over the 4 MiB limit; the stream id lets a server answer it."""

    def __init__(self, code: int, message: str, stream_id: int = 0, frame_type: int = 0) -> None:
        super().__init__(code, message)
        self.stream_id = stream_id
        self.frame_type = frame_type


class ConnectionClosed(ConnectionError):
    """The peer went away; every call pending on that connection fails with it."""

    def __init__(self, message: str = "ttrpc connection closed", mid_frame: bool = False) -> None:
        super().__init__(message)
        self.mid_frame = mid_frame
