"""The gateway's typed settings (``MASKPROP_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from maskprop_runtime.settings import RuntimeSettings

DEV_PEPPER = "dev-only-pepper-change-me"


class GatewaySettings(RuntimeSettings):
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=1, le=65535)
    search_target: str = "127.0.0.1:50051"
    # Secret mixed into every stored key hash and signed worker token; required outside dev.
    key_pepper: SecretStr = SecretStr(DEV_PEPPER)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    # Threads running the routes that call search or do heavier work (progress, images,
    # overlays); the hot routes run on the event loop (see app.py).  Every route is Python
    # holding the GIL between short waits, so more threads mostly add switching (anyio's
    # default is 40); scale out with more gateway processes instead.
    http_threads: int = Field(default=8, ge=1, le=256)
    # Decided labels wait this long to go to search together (a forwarder thread); 0 sends
    # each request's labels before it answers (tests, embedded).  Search saves every class a
    # call touches, so fewer, larger calls cost it less.
    forward_linger_s: float = Field(default=0.05, ge=0, le=5)
    # Answers are applied off the request path by a settler thread (settler.py), woken by
    # each answer request and lingering this long for more.
    settle_linger_s: float = Field(default=0.01, ge=0, le=5)
    # Where the settler and the forwarder run: "thread" (threads of the HTTP process: tests,
    # embedded) or "process" (a child process, background.py, at background_nice: the
    # requests get the CPU first; deployed; needs MASKPROP_REDIS_URL).
    background: Literal["thread", "process"] = "thread"
    # With "process": the child's nice value (above 0 it yields the CPU to the requests),
    # and the port its metrics (the settler's backlog, lag and delays) are served on.
    background_nice: int = Field(default=0, ge=0, le=19)
    background_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # An answer request whose gateway died before applying it is taken over by another
    # replica's settler after this long.
    settle_reclaim_s: float = Field(default=30.0, ge=0, le=3600)
    # Questions asked of search per top-up of the gateway's pool (one call at a time per
    # campaign; a top-up starts once fewer are ready).  Search pays per call for every class
    # it touches, so a few large calls cost it less than many small ones.
    refill_questions: int = Field(default=500, ge=1, le=1000)
    # A lease that finds no question while answers are on their way to search waits up to
    # this long for the clusters they open (0: answer at once, possibly empty).
    lease_wait_s: float = Field(default=1.0, ge=0, le=30)
    rate_per_s: float = Field(default=100.0, gt=0)  # sustained requests per vendor
    rate_burst: int = Field(default=200, ge=1)
    lease_ttl_s: float = Field(default=600.0, gt=0)
    # How long a lease's record (its questions' refs, which were answered) outlives its
    # deadline: status queries and late answers (410) until then, 404 after.  At 5,000
    # answers/s each hour of it holds ~2 GB of Redis (it was a day: ~50 GB).  The questions'
    # views are only kept for the lease's own life.
    lease_retention_s: float = Field(default=3600.0, ge=0)
    # Questions a lease carries at most, whatever a vendor asks for (hidden gold included).
    max_lease_questions: int = Field(default=100, ge=1, le=1000)
    worker_token_ttl_s: float = Field(default=4 * 3600.0, gt=0)
    image_root: Path = Path("data/images")
    hourly_wage: float = Field(default=12.0, ge=0)
    seconds_per_question: float = Field(default=2.0, gt=0)
    # worker quality control (see quality.QualityPolicy)
    redundancy: int = Field(default=1, ge=1, le=9)
    # answers asked for when the first ``redundancy`` disagree (default 2 x redundancy - 1)
    max_redundancy: int | None = Field(default=None, ge=1, le=17)
    gold_share: float = Field(default=0.05, ge=0, le=0.5)
    # workers a hidden gold item is shown to at most (default: as many as a real question,
    # so gold cannot be told by how often it repeats; raise it to stretch a small gold pool,
    # knowing colluding workers who compare items could then spot repeated ones)
    gold_exposure: int | None = Field(default=None, ge=1, le=1000)
    qualification_size: int = Field(default=10, ge=1)
    qualification_pass: float = Field(default=0.8, gt=0, le=1)
    min_accuracy: float = Field(default=0.7, ge=0, le=1)

    @model_validator(mode="after")
    def _pepper_outside_dev(self) -> GatewaySettings:
        if self.env == "prod" and self.key_pepper.get_secret_value() == DEV_PEPPER:
            raise ValueError("MASKPROP_KEY_PEPPER must be set to a secret in prod")
        if len(self.key_pepper.get_secret_value()) < 16:
            raise ValueError("MASKPROP_KEY_PEPPER must be at least 16 characters")
        if self.background == "process" and self.redis_url is None:
            raise ValueError(
                "MASKPROP_BACKGROUND=process needs MASKPROP_REDIS_URL (a Redis server)"
            )
        return self
