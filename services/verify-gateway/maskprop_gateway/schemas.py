"""Request and response bodies of the vendor API (strict: unknown fields are refused)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from maskprop_runtime.treestore import NAME_PATTERN

WORKER = r"^[A-Za-z0-9_.@-]{1,64}$"
#: campaign names: the same rule as search and the tree store (one definition)
CAMPAIGN = NAME_PATTERN
QUESTION = r"^q_[A-Za-z0-9_-]{1,32}$"
LEASE = r"^l_[A-Za-z0-9_-]{1,32}$"


class Strict(BaseModel):
    """Unknown fields are refused; request models also mark their ints and bools strict
    (``true`` is no integer, ``1`` or ``"yes"`` no answer)."""

    model_config = ConfigDict(extra="forbid")


class LeaseRequest(Strict):
    worker_id: str = Field(pattern=WORKER, description="The vendor's id for the worker.")
    campaign: str = Field(pattern=CAMPAIGN)
    max_questions: int = Field(default=20, ge=1, le=1000, strict=True)


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
    answer: bool = Field(strict=True, description="Does the mask correctly outline the object?")
    elapsed_ms: int = Field(ge=0, le=3_600_000, strict=True, description="Time the worker took")


class AnswersRequest(Strict):
    lease_id: str = Field(pattern=LEASE)
    worker_id: str = Field(pattern=WORKER)
    answers: list[AnswerIn] = Field(min_length=1, max_length=1000)


class AnswersOut(Strict):
    lease_id: str
    accepted: int
    duplicates: int
    forwarded_to_search: Literal[0] = Field(
        default=0,
        deprecated=True,
        description="Deprecated, always 0.  It counted the labels this request decided and "
        "so told hidden gold (never decides a label) from real questions (issue #18).  "
        "Decided labels reach search by the gateway's forwarder; GET /v1/progress shows them.",
    )
    worker_status: str


#: What :meth:`Gateway.submit` returns that a vendor may see: every member is the same for a
#: hidden gold question and a real one (its labels sent to search are not).
VENDOR_ANSWER_FIELDS = ("lease_id", "accepted", "duplicates", "worker_status")


def answers_out(result: dict[str, Any]) -> dict[str, Any]:
    """The vendor's view of an answer request's result (see :data:`VENDOR_ANSWER_FIELDS`)."""
    return {**{k: result[k] for k in VENDOR_ANSWER_FIELDS}, "forwarded_to_search": 0}


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
    gold_answers: Literal[0] = Field(
        default=0,
        deprecated=True,
        description="Deprecated, always 0.  It counted the campaign's hidden-gold answers, so a "
        "vendor answering one question and reading it again could tell gold from a real "
        "question (issue #18).  ``worker_answers`` counts every answer, gold included.",
    )
    worker_hours: float
    worker_cost_usd: float


class ErrorOut(BaseModel):
    detail: str
