from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportCampaignRequest(_message.Message):
    __slots__ = ("name", "keep_duplicates")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEEP_DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    name: str
    keep_duplicates: bool
    def __init__(self, name: _Optional[str] = ..., keep_duplicates: _Optional[bool] = ...) -> None: ...

class ExportChunk(_message.Message):
    __slots__ = ("data", "summary")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    summary: ExportSummary
    def __init__(self, data: _Optional[bytes] = ..., summary: _Optional[_Union[ExportSummary, _Mapping]] = ...) -> None: ...

class ExportSummary(_message.Message):
    __slots__ = ("campaign", "round_annotations", "images", "annotations", "categories", "duplicates_dropped", "skipped_late", "bytes", "sha256")
    class RoundAnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    ROUND_ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_LATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    round_annotations: _containers.ScalarMap[int, int]
    images: int
    annotations: int
    categories: int
    duplicates_dropped: int
    skipped_late: int
    bytes: int
    sha256: str
    def __init__(self, campaign: _Optional[str] = ..., round_annotations: _Optional[_Mapping[int, int]] = ..., images: _Optional[int] = ..., annotations: _Optional[int] = ..., categories: _Optional[int] = ..., duplicates_dropped: _Optional[int] = ..., skipped_late: _Optional[int] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...
