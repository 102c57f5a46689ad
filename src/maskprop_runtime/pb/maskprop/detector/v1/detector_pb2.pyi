from maskprop_runtime.pb.maskprop.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetectedMask(_message.Message):
    __slots__ = ("mask_id", "image_id", "rle", "score", "feature_f16")
    MASK_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_F16_FIELD_NUMBER: _ClassVar[int]
    mask_id: str
    image_id: str
    rle: _common_pb2.RleMask
    score: float
    feature_f16: bytes
    def __init__(self, mask_id: _Optional[str] = ..., image_id: _Optional[str] = ..., rle: _Optional[_Union[_common_pb2.RleMask, _Mapping]] = ..., score: _Optional[float] = ..., feature_f16: _Optional[bytes] = ...) -> None: ...

class MasksDetected(_message.Message):
    __slots__ = ("campaign", "class_id", "class_name", "feature_dim", "masks", "images")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DIM_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    class_id: int
    class_name: str
    feature_dim: int
    masks: _containers.RepeatedCompositeFieldContainer[DetectedMask]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInfo]
    def __init__(self, campaign: _Optional[str] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., feature_dim: _Optional[int] = ..., masks: _Optional[_Iterable[_Union[DetectedMask, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.ImageInfo, _Mapping]]] = ...) -> None: ...

class ClassBatchClosed(_message.Message):
    __slots__ = ("campaign", "class_id", "class_name", "expected_masks")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MASKS_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    class_id: int
    class_name: str
    expected_masks: int
    def __init__(self, campaign: _Optional[str] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., expected_masks: _Optional[int] = ...) -> None: ...

class MaskStreamEvent(_message.Message):
    __slots__ = ("event_id", "masks", "closed")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    masks: MasksDetected
    closed: ClassBatchClosed
    def __init__(self, event_id: _Optional[str] = ..., masks: _Optional[_Union[MasksDetected, _Mapping]] = ..., closed: _Optional[_Union[ClassBatchClosed, _Mapping]] = ...) -> None: ...

class ImageRef(_message.Message):
    __slots__ = ("image_id", "uri")
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    image_id: str
    uri: str
    def __init__(self, image_id: _Optional[str] = ..., uri: _Optional[str] = ...) -> None: ...

class ImageBatch(_message.Message):
    __slots__ = ("event_id", "campaign", "images", "batch_index", "batch_count", "class_names", "weights")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    BATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    campaign: str
    images: _containers.RepeatedCompositeFieldContainer[ImageRef]
    batch_index: int
    batch_count: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    weights: str
    def __init__(self, event_id: _Optional[str] = ..., campaign: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageRef, _Mapping]]] = ..., batch_index: _Optional[int] = ..., batch_count: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., weights: _Optional[str] = ...) -> None: ...
