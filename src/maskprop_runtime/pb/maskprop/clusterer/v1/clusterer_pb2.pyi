from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class TreeBuilt(_message.Message):
    __slots__ = ("event_id", "campaign", "class_id", "class_name", "n_masks", "tree_uri", "checksum")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    N_MASKS_FIELD_NUMBER: _ClassVar[int]
    TREE_URI_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    campaign: str
    class_id: int
    class_name: str
    n_masks: int
    tree_uri: str
    checksum: str
    def __init__(self, event_id: _Optional[str] = ..., campaign: _Optional[str] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., n_masks: _Optional[int] = ..., tree_uri: _Optional[str] = ..., checksum: _Optional[str] = ...) -> None: ...
