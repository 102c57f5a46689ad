from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class RleMask(_message.Message):
    __slots__ = ("height", "width", "counts")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    counts: bytes
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., counts: _Optional[bytes] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("image_id", "width", "height", "file_name")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FILE_NAME_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    width: int
    height: int
    file_name: str
    def __init__(self, image_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., file_name: _Optional[str] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("service", "source_topic", "partition", "offset", "key", "payload", "reason")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_TOPIC_FIELD_NUMBER: _ClassVar[int]
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    service: str
    source_topic: str
    partition: int
    offset: int
    key: bytes
    payload: bytes
    reason: str
    def __init__(self, service: _Optional[str] = ..., source_topic: _Optional[str] = ..., partition: _Optional[int] = ..., offset: _Optional[int] = ..., key: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., reason: _Optional[str] = ...) -> None: ...
