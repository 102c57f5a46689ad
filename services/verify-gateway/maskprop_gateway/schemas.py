"""Request and response bodies of the vendor API (strict: unknown fields are refused)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

WORKER = r"^[A-Za-z0-9_.@-]{1,64}$"
CAMPAIGN = r"^[A-Za-z0-9_.-]{1,64}$"
QUESTION = r"^q_[A-Za-z0-9_-]{1,32}$"
LEASE = r"^l_[A-Za-z0-9_-]{1,32}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LeaseRequest(Strict):
    worker_id: str = Field(pattern=WORKER, description="The vendor's id for the worker.")
    campaign: str = Field(pattern=CAMPAIGN)
    max_questions: int = Field(default=20, ge=1, le=1000)


class Mask(Strict):
    size: list[int] = Field(description="[height, width]")
    counts: str = Field(description="COCO compressed RLE counts")


class QuestionOut(Strict):
    question_id: str
    class_name: str
    image_url: str
    overlay_url: str
    mask: Mask


class LeaseOut(Strict):
    lease_id: str
    kind: Literal["qualification", "work"]
    campaign: str
    worker_id: str
    expires_at: float
    questions: list[QuestionOut]
    worker_token: str | None = Field(
        default=None, description="Opens the annotator page: /annotate#token=<worker_token>"
    )


class LeaseStatus(Strict):
    lease_id: str
    kind: str
    campaign: str
    worker_id: str
    expires_at: float
    questions: int
    answered: int


class AnswerIn(Strict):
    question_id: str = Field(pattern=QUESTION)
    answer: bool = Field(description="Does the mask correctly outline the object?")
    elapsed_ms: int = Field(ge=0, le=3_600_000, description="Time the worker took")


class AnswersRequest(Strict):
    lease_id: str = Field(pattern=LEASE)
    worker_id: str = Field(pattern=WORKER)
    answers: list[AnswerIn] = Field(min_length=1, max_length=1000)


class AnswersOut(Strict):
    lease_id: str
    accepted: int
    duplicates: int
    forwarded_to_search: int = Field(
        description="Labels this request decided, sent to search (by the gateway's forwarder "
        "within MASKPROP_FORWARD_LINGER_S, default 50 ms; retried until search has them)"
    )
    worker_status: str


class ClassProgressOut(Strict):
    class_id: int
    class_name: str
    clusters_accepted: int
    clusters_rejected: int
    clusters_open: int
    masks: int
    masks_obtained: int
    masks_undecided: int
    questions_answered: int
    estimated_hours: float
    estimated_cost_usd: float


class ProgressOut(Strict):
    campaign: str
    done: bool
    classes: list[ClassProgressOut]
    worker_answers: int
    gold_answers: int
    worker_hours: float
    worker_cost_usd: float


class ErrorOut(BaseModel):
    detail: str
