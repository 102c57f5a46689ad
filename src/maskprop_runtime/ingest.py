"""``add-images``: a campaign's images checked, recorded and published as ``ImageBatch`` events
for the detector (issue #16 item 3).

Three steps, so a refused image is never half-ingested and a crash loses nothing:

1. :func:`check_images` walks the campaign's folder (or reads its manifest of paths under it)
   and checks every file: confined under the folder (:func:`maskprop_runtime.files.resolve_under`,
   symlinks out refused), at most ``max_image_bytes``, readable by PIL (decoded whole: a
   truncated file is refused here, not in the detector), at most ``max_image_pixels`` (checked
   from the header before decoding, against decompression bombs), and not a duplicate by
   sha256 of its bytes (within the call and of images the campaign already has).  Nothing is
   written.
2. :func:`record_plan` stores the accepted images and the batch plan in one MULTI (key schema
   in :mod:`maskprop_runtime.campaigns`) and marks the campaign running.
3. :func:`publish_plan` sends the plan's batches to ``maskprop.images`` at most
   ``batches_per_s`` a second, flushing each (the broker's ack) before counting it published.
   A crash mid-way resumes at the first unacknowledged batch; event ids derive from the
   campaign and batch index, so a re-sent batch is dropped by the detector's dedup.

Image references are paths relative to the detector's image root (``MASKPROP_IMAGE_ROOT``, by
default the campaign's folder), never pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import Field

from maskprop.campaign_spec import CampaignSpec
from maskprop.metrics import cost_usd
from maskprop.progress import Progress
from maskprop_runtime import topics
from maskprop_runtime.bus import Producer
from maskprop_runtime.campaigns import (
    CampaignConflict,
    CampaignError,
    CampaignRegistry,
    campaign_key,
    images_key,
    ingest_key,
    leased_key,
    plan_key,
    round_campaign,
    spec_from_proto,
)
from maskprop_runtime.files import resolve_under
from maskprop_runtime.pb.maskprop.campaign.v1 import campaign_pb2
from maskprop_runtime.pb.maskprop.detector.v1 import detector_pb2
from maskprop_runtime.settings import RuntimeSettings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
MAX_MANIFEST_LINES = 10_000_000
ROUND = 1  # add-images plans and publishes round 1; `campaign next-round` publishes round r > 1

# Reasons an image is refused (the keys of IngestReport.refused)
OUTSIDE = "outside the images folder"
MISSING = "not a readable file"
TOO_LARGE = "file too large"
TOO_MANY_PIXELS = "too many pixels"
UNREADABLE = "not a readable image"
DUPLICATE = "duplicate content"


class IngestSettings(RuntimeSettings):
    """``add-images`` limits and pace (``MASKPROP_INGEST_*``, ``MASKPROP_IMAGE_ROOT``)."""

    # The detector's image root, if it is not the campaign's folder: image refs are relative
    # to it, and the campaign's folder must lie under it.
    image_root: Path | None = None
    # Images per ImageBatch: the detector accepts 1-1024 (maskprop_detector MAX_IMAGES_PER_BATCH).
    ingest_batch_size: int = Field(default=64, ge=1, le=1024)
    # Batches sent per second at most: the detector fleet scales on lag, not on a flood.
    ingest_batches_per_s: float = Field(default=20.0, gt=0)
    ingest_max_image_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    ingest_max_image_pixels: int = Field(default=40_000_000, ge=1)


@dataclass(frozen=True)
class Accepted:
    image_id: str  # "<sha256 prefix>": stable across calls, unique after de-duplication
    path: str  # relative to the detector's image root
    sha256: str


@dataclass
class IngestReport:
    """What a call accepted and refused (reason -> count, and the first few paths each)."""

    accepted: list[Accepted] = field(default_factory=list)
    refused: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def refuse(self, reason: str, path: str) -> None:
        self.refused[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(path)


def _candidates(root: Path, manifest: Path | None) -> Iterator[str]:
    """Paths (relative to ``root``, as given) to check: the manifest's lines, or every file
    with an image suffix under ``root`` (sorted, hidden folders skipped, symlinks listed so the
    containment check refuses those that leave)."""
    if manifest is not None:
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f):
                if n >= MAX_MANIFEST_LINES:
                    raise CampaignError(f"manifest {manifest} has over {MAX_MANIFEST_LINES} lines")
                text = line.strip()
                if text and not text.startswith("#"):
                    yield text
        return
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield os.path.relpath(os.path.join(folder, name), root)


def _check_one(path: Path, settings: IngestSettings) -> tuple[str | None, str]:
    """(refusal reason or None, sha256 hex) of one confined file."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            return MISSING, ""
    except OSError:
        return MISSING, ""
    if size > settings.ingest_max_image_bytes:
        return TOO_LARGE, ""
    try:
        data = path.read_bytes()
    except OSError:
        return MISSING, ""
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > settings.ingest_max_image_pixels:
                    return TOO_MANY_PIXELS, digest
                im.load()  # decodes: truncated or corrupt files fail here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return TOO_MANY_PIXELS, digest
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return UNREADABLE, digest
    return None, digest


def check_images(
    spec: CampaignSpec,
    redis: Any,
    settings: IngestSettings,
    *,
    manifest: Path | None = None,
    progress: Progress | None = None,
) -> IngestReport:
    """Check every candidate image of the campaign (module docstring, step 1); writes nothing.

    ``manifest`` overrides the spec's.  Raises :class:`CampaignError` when the folder is gone
    or lies outside ``settings.image_root``."""
    root = spec.images_root
    if not root.is_dir():
        raise CampaignError(f"images folder {root} does not exist")
    image_root = (settings.image_root or root).resolve()
    if not root.resolve().is_relative_to(image_root):
        raise CampaignError(
            f"images folder {root} is not under MASKPROP_IMAGE_ROOT {image_root}: the "
            "detector could not read them"
        )
    manifest = manifest if manifest is not None else spec.manifest
    if manifest is not None and not manifest.is_file():
        raise CampaignError(f"manifest {manifest} does not exist")
    seen = {k.decode() if isinstance(k, bytes) else k for k in redis.hkeys(images_key(spec.name))}
    report = IngestReport()
    paths = list(_candidates(root, manifest))
    for n, given in enumerate(paths):
        resolved = resolve_under(root, given)
        if resolved is None:
            report.refuse(OUTSIDE, given)
        else:
            reason, digest = _check_one(resolved, settings)
            if reason is None and digest in seen:
                reason = DUPLICATE
            if reason is not None:
                report.refuse(reason, given)
            else:
                seen.add(digest)
                rel = resolved.relative_to(image_root).as_posix()
                report.accepted.append(Accepted(digest[:24], rel, digest))
        if progress is not None:
            progress("images checked", n + 1, len(paths))
    return report


@dataclass(frozen=True)
class Plan:
    """The batches of a campaign's round: ``batch_count`` batches of ``batch_size`` images,
    ``published`` of them acknowledged by the broker."""

    images: int
    batch_size: int
    batch_count: int
    published: int

    @property
    def done(self) -> bool:
        return self.published >= self.batch_count


def published_field(round_: int) -> str:
    """The ingest hash's field counting round ``round_``'s published batches."""
    return "published" if round_ == 1 else f"published:r{round_}"


def read_plan(redis: Any, name: str, round_: int = 1) -> Plan | None:
    """The campaign's batch plan with round ``round_``'s published count (every round
    publishes the same images in the same batches)."""
    raw = redis.hgetall(ingest_key(name))
    fields = {
        (k.decode() if isinstance(k, bytes) else k): int(v)
        for k, v in raw.items()
        if not (k.decode() if isinstance(k, bytes) else k).startswith("refused:")
    }
    if "batch_count" not in fields:
        return None
    return Plan(
        images=fields.get("accepted", 0),
        batch_size=fields["batch_size"],
        batch_count=fields["batch_count"],
        published=fields.get(published_field(round_), 0),
    )


def refused_counts(redis: Any, name: str) -> dict[str, int]:
    """Reason -> images refused over the campaign's ``add-images`` calls."""
    out = {}
    for k, v in redis.hgetall(ingest_key(name)).items():
        key = k.decode() if isinstance(k, bytes) else k
        if key.startswith("refused:"):
            out[key.removeprefix("refused:")] = int(v)
    return out


def record_plan(
    registry: CampaignRegistry, name: str, report: IngestReport, batch_size: int
) -> Plan:
    """Store the accepted images and their batch plan in one MULTI and mark the campaign
    running (module docstring, step 2).  The campaign's state and plan are WATCHed: a pause,
    a stop or another ``add-images`` in between refuses this one whole.  A campaign whose
    round is already planned is refused: adding images to a round in flight needs retraining
    rounds (#16 item 5)."""
    from redis.exceptions import WatchError

    redis = registry.redis
    registry.get(name)  # CampaignNotFound before anything else
    if not report.accepted:
        raise CampaignError("no image was accepted: nothing to add")
    n = len(report.accepted)
    batch_count = -(-n // batch_size)
    with redis.pipeline(transaction=True) as pipe:
        pipe.watch(campaign_key(name), ingest_key(name))
        raw_state = pipe.hget(campaign_key(name), "state")
        state = raw_state.decode() if isinstance(raw_state, bytes) else str(raw_state)
        if state in ("paused", "stopped"):
            raise CampaignError(f"campaign {name!r} is {state}: resume it before adding images")
        if pipe.hexists(ingest_key(name), "batch_count"):
            raise CampaignError(
                f"campaign {name!r} already has its images for round {ROUND}; adding images "
                "to a round in flight is not supported yet"
            )
        pipe.multi()
        for start in range(0, n, 10_000):
            chunk = report.accepted[start : start + 10_000]
            pipe.hset(
                images_key(name),
                mapping={a.sha256: json.dumps([a.image_id, a.path]) for a in chunk},
            )
            pipe.rpush(plan_key(name), *(f"{a.image_id}\t{a.path}" for a in chunk))
        counts = {f"refused:{reason}": c for reason, c in report.refused.items()}
        pipe.hset(
            ingest_key(name),
            mapping={"accepted": n, "batch_size": batch_size, "batch_count": batch_count,
                     "published": 0, **counts},
        )  # fmt: skip
        pipe.hset(campaign_key(name), "state", "running")
        try:
            pipe.execute()
        except WatchError:
            raise CampaignConflict(
                f"campaign {name!r} changed while its images were being added (paused, "
                "stopped or another add-images): nothing was added; run it again"
            ) from None
    return Plan(images=n, batch_size=batch_size, batch_count=batch_count, published=0)


def publish_plan(
    registry: CampaignRegistry,
    name: str,
    producer: Producer,
    *,
    batches_per_s: float,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    round_: int = 1,
    weights: str = "",
) -> Plan:
    """Send the plan's unpublished batches (module docstring, step 3); returns the plan as
    published.  Stops early, published count saved, when the campaign is paused or stopped.

    ``round_`` > 1 publishes the same batches again as campaign ``<name>.r<round>``
    (:func:`~maskprop_runtime.campaigns.round_campaign`: the clusterer and search open new trees
    for it, the sink keeps its labels apart) with ``weights``, the retrained checkpoint the
    detector loads (a path under its models root), counted in ``published:r<round>``."""
    redis = registry.redis
    plan = read_plan(redis, name, round_)
    if plan is None:
        raise CampaignError(f"campaign {name!r} has no images to publish: run add-images")
    classes = list(registry.spec(name).classes)
    travels_as = round_campaign(name, round_)
    if round_ > 1 and not weights:
        raise CampaignError(f"round {round_} of {name!r} needs its retrained weights")
    started = clock()
    sent = 0
    published = plan.published
    for b in range(plan.published, plan.batch_count):
        if registry.state(name) != "running":
            break
        due = started + sent / batches_per_s
        if (wait := due - clock()) > 0:
            sleep(wait)
        rows = redis.lrange(plan_key(name), b * plan.batch_size, (b + 1) * plan.batch_size - 1)
        refs = []
        for row in rows:
            image_id, path = (row.decode() if isinstance(row, bytes) else row).split("\t", 1)
            refs.append(detector_pb2.ImageRef(image_id=image_id, uri=path))
        event = detector_pb2.ImageBatch(
            event_id=f"images.{name}.r{round_}.{b}",
            campaign=travels_as,
            images=refs,
            batch_index=b,
            batch_count=plan.batch_count,
            class_names=classes,
            weights=weights,
        )
        producer.send(topics.IMAGES, travels_as.encode(), event.SerializeToString())
        producer.flush()  # the broker's ack before the batch counts as published
        published = b + 1
        redis.hset(ingest_key(name), published_field(round_), published)
        sent += 1
        if progress is not None:
            progress("batches sent", published, plan.batch_count)
    return Plan(plan.images, plan.batch_size, plan.batch_count, published)


# Keys other services own, read here for status only (their schemas: maskprop_detector.service
# and maskprop_search.store); the runtime cannot import a service.
def _detector_counts_key(name: str) -> str:
    return f"maskprop:detector:{name}:counts"


def _search_classes_key(name: str) -> str:
    return f"maskprop:search:{name}:classes"


def _search_state_key(name: str, class_id: str) -> str:
    return f"maskprop:search:{name}:{class_id}:state"


def _detected(redis: Any, travels_as: str) -> tuple[int, Counter[int]]:
    """(batches the detector counted, masks per class) of a round."""
    found = redis.hvals(_detector_counts_key(travels_as))
    per_class: Counter[int] = Counter()
    for raw in found:
        for c, n in json.loads(raw).items():
            per_class[int(c)] += int(n)
    return len(found), per_class


def _searched(redis: Any, rounds: list[str]) -> tuple[int, int, int, int]:
    """(classes, masks, accepted, rejected) search holds for the rounds (campaign names as
    they travel), from its per-class counters: one pipeline."""
    pipe = redis.pipeline(transaction=False)
    classes = 0
    for travels_as in rounds:
        for raw in redis.hkeys(_search_classes_key(travels_as)):
            k = raw.decode() if isinstance(raw, bytes) else str(raw)
            pipe.hmget(_search_state_key(travels_as, k), "masks", "accepted", "rejected")
            classes += 1
    masks = accepted = rejected = 0
    for row in pipe.execute() if classes else []:
        m, a, r = (int(v or 0) for v in row)
        masks, accepted, rejected = masks + m, accepted + a, rejected + r
    return classes, masks, accepted, rejected


def budget_status(
    registry: CampaignRegistry, name: str, spec: CampaignSpec | None = None
) -> campaign_pb2.BudgetStatus:
    """Spent vs budget, and the masks expected at the budget.

    The forecast is the campaign's yield so far carried to the budget: masks accepted per
    question handed out, times the questions left, plus the masks accepted already; never
    more than every undecided mask accepted.  0 before any question (nothing to carry).  It
    assumes the questions left are as productive as those asked (search asks the likeliest
    clusters first, so it tends to over-estimate late in a campaign)."""
    redis = registry.redis
    spec = spec if spec is not None else registry.spec(name)
    cap = spec.question_cap()
    leased = int(redis.get(leased_key(name)) or 0)  # every round's (one budget)
    # every round's trees (campaign <name>.r<r>)
    rounds = [round_campaign(name, r) for r in range(1, spec.budget.rounds + 1)]
    _, masks, accepted, rejected = _searched(redis, rounds)
    forecast = 0.0
    if leased:
        left = max(cap - leased, 0)
        forecast = min(accepted + accepted / leased * left, float(masks - rejected))
    hours = spec.hours(leased)
    return campaign_pb2.BudgetStatus(
        question_cap=cap,
        questions_leased=leased,
        hours_spent=hours,
        dollars_spent=cost_usd(hours, spec.budget.hourly_wage),
        masks_accepted=accepted,
        masks_decided=accepted + rejected,
        masks=masks,
        forecast_masks_at_budget=forecast,
    )


@dataclass(frozen=True)
class RoundProgress:
    """Where round ``round`` of a campaign stands, from the registry's Redis: its batches
    (``batches`` planned, ``published`` by ingest, ``detected`` by the detector), the classes
    with masks (``classes``, each a tree) and those search holds (``in_search``), the masks
    detected and those search decided."""

    round: int
    batches: int
    published: int
    detected: int
    classes: int
    in_search: int
    masks: int
    decided: int

    @property
    def stage(self) -> str:
        """``unpublished``, ``publishing``, ``detecting``, ``clustering``, ``annotating`` or
        ``decided`` (every mask of the round has its label in search)."""
        if self.published == 0:
            return "unpublished"
        if self.published < self.batches:
            return "publishing"
        if self.detected < self.batches:
            return "detecting"
        if self.in_search < self.classes:
            return "clustering"
        return "annotating" if self.decided < self.masks else "decided"


def round_progress(registry: CampaignRegistry, name: str, round_: int) -> RoundProgress:
    """:class:`RoundProgress` of round ``round_`` of campaign ``name``."""
    redis = registry.redis
    plan = read_plan(redis, name, round_)
    travels_as = round_campaign(name, round_)
    detected, per_class = _detected(redis, travels_as)
    in_search, _, accepted, rejected = _searched(redis, [travels_as])
    return RoundProgress(
        round=round_,
        batches=plan.batch_count if plan else 0,
        published=plan.published if plan else 0,
        detected=detected,
        classes=sum(1 for n in per_class.values() if n),
        in_search=in_search,
        masks=sum(per_class.values()),
        decided=accepted + rejected,
    )


def campaign_status(registry: CampaignRegistry, name: str) -> campaign_pb2.CampaignStatus:
    """The campaign with each stage's progress: images accepted, batches published (broker
    ack), batches detected and masks found (the detector's counts), classes whose trees
    reached search, each again as ``round r ...`` for rounds r > 1; and the refused images by
    reason.  The budget counts every round."""
    redis = registry.redis
    campaign = registry.get(name)
    plan = read_plan(redis, name)
    batches = plan.batch_count if plan else 0
    detected, per_class = _detected(redis, name)
    masks = sum(per_class.values())
    accepted = plan.images if plan else 0
    stages = [
        campaign_pb2.StageCount(stage="images accepted", done=accepted, total=accepted),
        campaign_pb2.StageCount(
            stage="batches published", done=plan.published if plan else 0, total=batches
        ),
        campaign_pb2.StageCount(stage="batches detected", done=detected, total=batches),
        campaign_pb2.StageCount(stage="masks detected", done=masks, total=0),
        campaign_pb2.StageCount(
            stage="classes in search",
            done=int(redis.hlen(_search_classes_key(name))),
            total=len(campaign.spec.classes),
        ),
    ]
    for r in range(2, campaign.spec.budget.rounds + 1):  # `campaign next-round`'s rounds
        travels_as = round_campaign(name, r)
        published = read_plan(redis, name, r)
        found, found_per_class = _detected(redis, travels_as)
        stages += [
            campaign_pb2.StageCount(
                stage=f"round {r} batches published",
                done=published.published if published else 0,
                total=batches,
            ),
            campaign_pb2.StageCount(stage=f"round {r} batches detected", done=found, total=batches),
            campaign_pb2.StageCount(
                stage=f"round {r} masks detected", done=sum(found_per_class.values()), total=0
            ),
            campaign_pb2.StageCount(
                stage=f"round {r} classes in search",
                done=int(redis.hlen(_search_classes_key(travels_as))),
                total=len(campaign.spec.classes),
            ),
        ]
    return campaign_pb2.CampaignStatus(
        campaign=campaign,
        stages=stages,
        refused=refused_counts(redis, name),
        budget=budget_status(registry, name, spec_from_proto(campaign.spec)),
    )
