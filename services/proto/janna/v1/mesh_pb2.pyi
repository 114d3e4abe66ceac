from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MeshHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceState(_message.Message):
    __slots__ = ("service", "state", "detail")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    service: str
    state: str
    detail: str
    def __init__(self, service: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class MeshHealthReport(_message.Message):
    __slots__ = ("status", "services", "down")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    DOWN_FIELD_NUMBER: _ClassVar[int]
    status: str
    services: _containers.RepeatedCompositeFieldContainer[ServiceState]
    down: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, status: _Optional[str] = ..., services: _Optional[_Iterable[_Union[ServiceState, _Mapping]]] = ..., down: _Optional[_Iterable[str]] = ...) -> None: ...
