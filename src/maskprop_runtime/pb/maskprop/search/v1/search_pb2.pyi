from maskprop_runtime.pb.maskprop.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LabelSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LABEL_SOURCE_UNSPECIFIED: _ClassVar[LabelSource]
    LABEL_SOURCE_PROPAGATED: _ClassVar[LabelSource]
    LABEL_SOURCE_VERIFIED: _ClassVar[LabelSource]
LABEL_SOURCE_UNSPECIFIED: LabelSource
LABEL_SOURCE_PROPAGATED: LabelSource
LABEL_SOURCE_VERIFIED: LabelSource

class Question(_message.Message):
    __slots__ = ("question_id", "campaign", "class_id", "class_name", "mask_id", "image_id", "rle", "lease_expires_unix", "image_file")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    MASK_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FILE_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    campaign: str
    class_id: int
    class_name: str
    mask_id: str
    image_id: str
    rle: _common_pb2.RleMask
    lease_expires_unix: float
    image_file: str
    def __init__(self, question_id: _Optional[str] = ..., campaign: _Optional[str] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., mask_id: _Optional[str] = ..., image_id: _Optional[str] = ..., rle: _Optional[_Union[_common_pb2.RleMask, _Mapping]] = ..., lease_expires_unix: _Optional[float] = ..., image_file: _Optional[str] = ...) -> None: ...

class LeaseQuestionsRequest(_message.Message):
    __slots__ = ("campaign", "max_questions", "lease_owner")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    MAX_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    LEASE_OWNER_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    max_questions: int
    lease_owner: str
    def __init__(self, campaign: _Optional[str] = ..., max_questions: _Optional[int] = ..., lease_owner: _Optional[str] = ...) -> None: ...

class LeaseQuestionsResponse(_message.Message):
    __slots__ = ("questions", "campaign_done")
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_DONE_FIELD_NUMBER: _ClassVar[int]
    questions: _containers.RepeatedCompositeFieldContainer[Question]
    campaign_done: bool
    def __init__(self, questions: _Optional[_Iterable[_Union[Question, _Mapping]]] = ..., campaign_done: _Optional[bool] = ...) -> None: ...

class AnswerItem(_message.Message):
    __slots__ = ("question_id", "is_correct")
    QUESTION_ID_FIELD_NUMBER: _ClassVar[int]
    IS_CORRECT_FIELD_NUMBER: _ClassVar[int]
    question_id: str
    is_correct: bool
    def __init__(self, question_id: _Optional[str] = ..., is_correct: _Optional[bool] = ...) -> None: ...

class TopUp(_message.Message):
    __slots__ = ("campaign", "max_questions")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    MAX_QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    max_questions: int
    def __init__(self, campaign: _Optional[str] = ..., max_questions: _Optional[int] = ...) -> None: ...

class SubmitAnswersRequest(_message.Message):
    __slots__ = ("answers", "top_ups", "lease_owner")
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    TOP_UPS_FIELD_NUMBER: _ClassVar[int]
    LEASE_OWNER_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[AnswerItem]
    top_ups: _containers.RepeatedCompositeFieldContainer[TopUp]
    lease_owner: str
    def __init__(self, answers: _Optional[_Iterable[_Union[AnswerItem, _Mapping]]] = ..., top_ups: _Optional[_Iterable[_Union[TopUp, _Mapping]]] = ..., lease_owner: _Optional[str] = ...) -> None: ...

class SubmitAnswersResponse(_message.Message):
    __slots__ = ("applied", "duplicates", "stale", "questions")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    applied: int
    duplicates: int
    stale: int
    questions: _containers.RepeatedCompositeFieldContainer[Question]
    def __init__(self, applied: _Optional[int] = ..., duplicates: _Optional[int] = ..., stale: _Optional[int] = ..., questions: _Optional[_Iterable[_Union[Question, _Mapping]]] = ...) -> None: ...

class GetProgressRequest(_message.Message):
    __slots__ = ("campaign",)
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    def __init__(self, campaign: _Optional[str] = ...) -> None: ...

class ClassProgress(_message.Message):
    __slots__ = ("class_id", "class_name", "masks", "accepted_masks", "rejected_masks", "undecided_masks", "open_clusters", "questions", "clusters_accepted", "clusters_rejected")
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_MASKS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_MASKS_FIELD_NUMBER: _ClassVar[int]
    UNDECIDED_MASKS_FIELD_NUMBER: _ClassVar[int]
    OPEN_CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    CLUSTERS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    class_id: int
    class_name: str
    masks: int
    accepted_masks: int
    rejected_masks: int
    undecided_masks: int
    open_clusters: int
    questions: int
    clusters_accepted: int
    clusters_rejected: int
    def __init__(self, class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., masks: _Optional[int] = ..., accepted_masks: _Optional[int] = ..., rejected_masks: _Optional[int] = ..., undecided_masks: _Optional[int] = ..., open_clusters: _Optional[int] = ..., questions: _Optional[int] = ..., clusters_accepted: _Optional[int] = ..., clusters_rejected: _Optional[int] = ...) -> None: ...

class GetProgressResponse(_message.Message):
    __slots__ = ("classes", "questions", "done")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedCompositeFieldContainer[ClassProgress]
    questions: int
    done: bool
    def __init__(self, classes: _Optional[_Iterable[_Union[ClassProgress, _Mapping]]] = ..., questions: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class PropagatedLabel(_message.Message):
    __slots__ = ("mask_id", "image_id", "accepted", "source", "rle", "score", "node", "outcome", "yes", "answered", "mask_index", "omitted_rle_bytes")
    MASK_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    RLE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    YES_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    MASK_INDEX_FIELD_NUMBER: _ClassVar[int]
    OMITTED_RLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    mask_id: str
    image_id: str
    accepted: bool
    source: LabelSource
    rle: _common_pb2.RleMask
    score: float
    node: int
    outcome: str
    yes: int
    answered: int
    mask_index: int
    omitted_rle_bytes: int
    def __init__(self, mask_id: _Optional[str] = ..., image_id: _Optional[str] = ..., accepted: _Optional[bool] = ..., source: _Optional[_Union[LabelSource, str]] = ..., rle: _Optional[_Union[_common_pb2.RleMask, _Mapping]] = ..., score: _Optional[float] = ..., node: _Optional[int] = ..., outcome: _Optional[str] = ..., yes: _Optional[int] = ..., answered: _Optional[int] = ..., mask_index: _Optional[int] = ..., omitted_rle_bytes: _Optional[int] = ...) -> None: ...

class LabelsPropagated(_message.Message):
    __slots__ = ("event_id", "campaign", "class_id", "class_name", "labels", "images", "class_masks")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    CLASS_ID_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CLASS_MASKS_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    campaign: str
    class_id: int
    class_name: str
    labels: _containers.RepeatedCompositeFieldContainer[PropagatedLabel]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.ImageInfo]
    class_masks: int
    def __init__(self, event_id: _Optional[str] = ..., campaign: _Optional[str] = ..., class_id: _Optional[int] = ..., class_name: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[PropagatedLabel, _Mapping]]] = ..., images: _Optional[_Iterable[_Union[_common_pb2.ImageInfo, _Mapping]]] = ..., class_masks: _Optional[int] = ...) -> None: ...
