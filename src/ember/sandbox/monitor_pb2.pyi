from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("vmm_pid", "restored")
    VMM_PID_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    vmm_pid: int
    restored: bool
    def __init__(self, vmm_pid: _Optional[int] = ..., restored: _Optional[bool] = ...) -> None: ...

class AttachDiskRequest(_message.Message):
    __slots__ = ("path", "format", "readonly", "drive_id")
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    READONLY_FIELD_NUMBER: _ClassVar[int]
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    path: str
    format: str
    readonly: bool
    drive_id: str
    def __init__(self, path: _Optional[str] = ..., format: _Optional[str] = ..., readonly: _Optional[bool] = ..., drive_id: _Optional[str] = ...) -> None: ...

class AttachDiskResponse(_message.Message):
    __slots__ = ("drive_id", "kind", "address")
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    drive_id: str
    kind: str
    address: str
    def __init__(self, drive_id: _Optional[str] = ..., kind: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class DetachDiskRequest(_message.Message):
    __slots__ = ("drive_id",)
    DRIVE_ID_FIELD_NUMBER: _ClassVar[int]
    drive_id: str
    def __init__(self, drive_id: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("container_id", "auto_stop")
    CONTAINER_ID_FIELD_NUMBER: _ClassVar[int]
    AUTO_STOP_FIELD_NUMBER: _ClassVar[int]
    container_id: str
    auto_stop: bool
    def __init__(self, container_id: _Optional[str] = ..., auto_stop: _Optional[bool] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class WaitResponse(_message.Message):
    __slots__ = ("exited", "status", "exit_code", "oom_killed", "error")
    EXITED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    OOM_KILLED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    exited: bool
    status: str
    exit_code: int
    oom_killed: bool
    error: str
    def __init__(self, exited: _Optional[bool] = ..., status: _Optional[str] = ..., exit_code: _Optional[int] = ..., oom_killed: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
