from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CampaignState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CAMPAIGN_STATE_UNSPECIFIED: _ClassVar[CampaignState]
    CAMPAIGN_STATE_CREATED: _ClassVar[CampaignState]
    CAMPAIGN_STATE_RUNNING: _ClassVar[CampaignState]
    CAMPAIGN_STATE_PAUSED: _ClassVar[CampaignState]
    CAMPAIGN_STATE_STOPPED: _ClassVar[CampaignState]
CAMPAIGN_STATE_UNSPECIFIED: CampaignState
CAMPAIGN_STATE_CREATED: CampaignState
CAMPAIGN_STATE_RUNNING: CampaignState
CAMPAIGN_STATE_PAUSED: CampaignState
CAMPAIGN_STATE_STOPPED: CampaignState

class AnnotationSpec(_message.Message):
    __slots__ = ("samples_per_cluster", "accept_threshold", "iou_threshold", "prior_accept_threshold", "prior_reject_threshold", "reject_action", "reuse_answers", "sequential", "sequential_batch", "sequential_confidence", "seconds_per_question", "seconds_per_polygon", "redundancy", "strategy", "seed")
    SAMPLES_PER_CLUSTER_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    IOU_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRIOR_ACCEPT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    PRIOR_REJECT_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REJECT_ACTION_FIELD_NUMBER: _ClassVar[int]
    REUSE_ANSWERS_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_BATCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENTIAL_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_QUESTION_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_POLYGON_FIELD_NUMBER: _ClassVar[int]
    REDUNDANCY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    samples_per_cluster: int
    accept_threshold: float
    iou_threshold: float
    prior_accept_threshold: float
    prior_reject_threshold: float
    reject_action: str
    reuse_answers: bool
    sequential: str
    sequential_batch: int
    sequential_confidence: float
    seconds_per_question: float
    seconds_per_polygon: float
    redundancy: int
    strategy: str
    seed: int
    def __init__(self, samples_per_cluster: _Optional[int] = ..., accept_threshold: _Optional[float] = ..., iou_threshold: _Optional[float] = ..., prior_accept_threshold: _Optional[float] = ..., prior_reject_threshold: _Optional[float] = ..., reject_action: _Optional[str] = ..., reuse_answers: _Optional[bool] = ..., sequential: _Optional[str] = ..., sequential_batch: _Optional[int] = ..., sequential_confidence: _Optional[float] = ..., seconds_per_question: _Optional[float] = ..., seconds_per_polygon: _Optional[float] = ..., redundancy: _Optional[int] = ..., strategy: _Optional[str] = ..., seed: _Optional[int] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("questions", "hours", "dollars", "hourly_wage", "rounds")
    QUESTIONS_FIELD_NUMBER: _ClassVar[int]
    HOURS_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_FIELD_NUMBER: _ClassVar[int]
    HOURLY_WAGE_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    questions: int
    hours: float
    dollars: float
    hourly_wage: float
    rounds: int
    def __init__(self, questions: _Optional[int] = ..., hours: _Optional[float] = ..., dollars: _Optional[float] = ..., hourly_wage: _Optional[float] = ..., rounds: _Optional[int] = ...) -> None: ...

class CampaignSpec(_message.Message):
    __slots__ = ("name", "classes", "images_root", "manifest", "detector_weights", "annotation", "budget", "version", "labelled", "labelled_images")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGES_ROOT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DETECTOR_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    LABELLED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    images_root: str
    manifest: str
    detector_weights: str
    annotation: AnnotationSpec
    budget: Budget
    version: int
    labelled: str
    labelled_images: str
    def __init__(self, name: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., images_root: _Optional[str] = ..., manifest: _Optional[str] = ..., detector_weights: _Optional[str] = ..., annotation: _Optional[_Union[AnnotationSpec, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., version: _Optional[int] = ..., labelled: _Optional[str] = ..., labelled_images: _Optional[str] = ...) -> None: ...

class Campaign(_message.Message):
    __slots__ = ("spec", "state", "created_unix", "updated_unix")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    UPDATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    spec: CampaignSpec
    state: CampaignState
    created_unix: float
    updated_unix: float
    def __init__(self, spec: _Optional[_Union[CampaignSpec, _Mapping]] = ..., state: _Optional[_Union[CampaignState, str]] = ..., created_unix: _Optional[float] = ..., updated_unix: _Optional[float] = ...) -> None: ...

class StageCount(_message.Message):
    __slots__ = ("stage", "done", "total")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class CampaignStatus(_message.Message):
    __slots__ = ("campaign", "stages", "refused", "budget")
    class RefusedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    campaign: Campaign
    stages: _containers.RepeatedCompositeFieldContainer[StageCount]
    refused: _containers.ScalarMap[str, int]
    budget: BudgetStatus
    def __init__(self, campaign: _Optional[_Union[Campaign, _Mapping]] = ..., stages: _Optional[_Iterable[_Union[StageCount, _Mapping]]] = ..., refused: _Optional[_Mapping[str, int]] = ..., budget: _Optional[_Union[BudgetStatus, _Mapping]] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("question_cap", "questions_leased", "hours_spent", "dollars_spent", "masks_accepted", "masks_decided", "masks", "forecast_masks_at_budget")
    QUESTION_CAP_FIELD_NUMBER: _ClassVar[int]
    QUESTIONS_LEASED_FIELD_NUMBER: _ClassVar[int]
    HOURS_SPENT_FIELD_NUMBER: _ClassVar[int]
    DOLLARS_SPENT_FIELD_NUMBER: _ClassVar[int]
    MASKS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MASKS_DECIDED_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    FORECAST_MASKS_AT_BUDGET_FIELD_NUMBER: _ClassVar[int]
    question_cap: int
    questions_leased: int
    hours_spent: float
    dollars_spent: float
    masks_accepted: int
    masks_decided: int
    masks: int
    forecast_masks_at_budget: float
    def __init__(self, question_cap: _Optional[int] = ..., questions_leased: _Optional[int] = ..., hours_spent: _Optional[float] = ..., dollars_spent: _Optional[float] = ..., masks_accepted: _Optional[int] = ..., masks_decided: _Optional[int] = ..., masks: _Optional[int] = ..., forecast_masks_at_budget: _Optional[float] = ...) -> None: ...

class CreateCampaignRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: CampaignSpec
    def __init__(self, spec: _Optional[_Union[CampaignSpec, _Mapping]] = ...) -> None: ...

class ReviseCampaignRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: CampaignSpec
    def __init__(self, spec: _Optional[_Union[CampaignSpec, _Mapping]] = ...) -> None: ...

class ListCampaignsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCampaignsResponse(_message.Message):
    __slots__ = ("campaigns",)
    CAMPAIGNS_FIELD_NUMBER: _ClassVar[int]
    campaigns: _containers.RepeatedCompositeFieldContainer[Campaign]
    def __init__(self, campaigns: _Optional[_Iterable[_Union[Campaign, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SetStateRequest(_message.Message):
    __slots__ = ("name", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: CampaignState
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[CampaignState, str]] = ...) -> None: ...

class NextRoundRequest(_message.Message):
    __slots__ = ("name", "round", "weights")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    round: int
    weights: str
    def __init__(self, name: _Optional[str] = ..., round: _Optional[int] = ..., weights: _Optional[str] = ...) -> None: ...

class NextRoundResponse(_message.Message):
    __slots__ = ("campaign", "round", "travels_as", "weights", "batches", "published", "done")
    CAMPAIGN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TRAVELS_AS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    campaign: str
    round: int
    travels_as: str
    weights: str
    batches: int
    published: int
    done: bool
    def __init__(self, campaign: _Optional[str] = ..., round: _Optional[int] = ..., travels_as: _Optional[str] = ..., weights: _Optional[str] = ..., batches: _Optional[int] = ..., published: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...
