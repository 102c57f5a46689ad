"""One process, the whole pipeline: the simulated detector, the clusterer, the search service,
a simulated crowd and the sink, wired with the same service code as on Kubernetes.

The bus and the store come from settings: with no ``MASKPROP_KAFKA_BOOTSTRAP`` /
``MASKPROP_REDIS_URL`` they are in memory (embedded mode); with them, the same wiring runs on a
real broker and a real Redis.  :func:`reference_labels` computes what the library alone decides
for the same pool and seed, so a run can prove the services changed nothing.
"""

from __future__ import annotations

import json
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf.message import Message
from maskprop_clusterer.service import ClustererSettings, build_clusterer
from maskprop_detector.simulated import pool_events, wire_pool
from maskprop_search.service import SearchSettings, build_search
from maskprop_sink.coco import export_coco
from maskprop_sink.dataset import DatasetReader
from maskprop_sink.service import SinkSettings, build_sink
from numpy.typing import NDArray
from pydantic import ValidationError

from maskprop.errors import MaskpropError
from maskprop.metrics import (
    human_hours,
    human_seconds,
    segmentation_quality,
    speedup_vs_manual,
)
from maskprop.params import AnnotationParams
from maskprop.progress import Progress, no_progress
from maskprop.session import AnnotationSession, Answer
from maskprop.simulate.annotator import SimulatedAnnotator
from maskprop.simulate.generator import ade_like_pool
from maskprop.simulate.pool import MaskPool
from maskprop.simulate.scenes import mask_id, pool_index
from maskprop.tree import build_tree
from maskprop_runtime import topics
from maskprop_runtime.bus import make_bus
from maskprop_runtime.campaigns import SessionParams
from maskprop_runtime.loop import EventLoop
from maskprop_runtime.settings import RuntimeSettings
from maskprop_runtime.store import make_redis
from maskprop_runtime.treestore import check_name


@dataclass
class RunConfig:
    """``maskprop run --config FILE`` (TOML).  Sections: campaign, pool, annotator, search."""

    campaign: str = "demo"
    masks: int = 20_000
    classes: int = 10
    seed: int = 0
    dim: int = 32
    annotator_error: float = 0.0
    annotator_batch: int = 64
    search: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MaskpropError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise MaskpropError(f"cannot read config file {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise MaskpropError(f"config file {path} is not valid TOML: {exc}") from None
        known = {"campaign", "pool", "annotator", "search"}
        unknown = set(raw) - known
        if unknown:
            raise MaskpropError(f"config file {path}: unknown sections {sorted(unknown)}")
        pool = raw.get("pool", {})
        ann = raw.get("annotator", {})
        try:
            cfg = cls(
                campaign=str(raw.get("campaign", {}).get("name", "demo")),
                masks=int(pool.get("masks", 20_000)),
                classes=int(pool.get("classes", 10)),
                seed=int(pool.get("seed", 0)),
                dim=int(pool.get("dim", 32)),
                annotator_error=float(ann.get("error_rate", 0.0)),
                annotator_batch=int(ann.get("batch", 64)),
                search=dict(raw.get("search", {})),
            )
        except (TypeError, ValueError) as exc:
            raise MaskpropError(f"config file {path}: {exc}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        try:
            check_name("campaign name", self.campaign)
        except ValueError as exc:
            raise MaskpropError(str(exc)) from None
        if self.masks < 1 or self.classes < 1 or self.dim < 1:
            raise MaskpropError("pool masks, classes and dim must be positive")
        if not 0.0 <= self.annotator_error <= 0.5:
            raise MaskpropError("annotator error_rate must be in [0, 0.5]")
        if not 1 <= self.annotator_batch <= 1000:
            raise MaskpropError("annotator batch must be 1..1000")
        try:
            SearchSettings(**self.search)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise MaskpropError(f"[search] {where}: {first['msg']}") from None


def reference_labels(pool: MaskPool, search: SearchSettings) -> dict[str, int]:
    """mask id -> label (1 accepted, 0 rejected) computed by the library alone.

    ``pool`` must be the wire pool (:func:`wire_pool`); the answers come from the same
    simulated annotator the pipeline uses (error-free here; see ``RunConfig``)."""
    trees, index = {}, {}
    for c in range(len(pool.class_names)):
        idx = pool.class_indices(c)
        if idx.size:
            trees[c] = build_tree(pool.features[idx], pool.scores[idx])
            index[c] = idx
    session = AnnotationSession(
        trees, search.params(), search.selection(), strategy=search.strategy, seed=search.seed
    )
    truth = pool.ious >= search.iou_threshold
    while not session.done:
        qs = session.lease(1000)
        session.submit(
            Answer(q.class_id, q.node, q.mask, bool(truth[index[q.class_id][q.mask]])) for q in qs
        )
    out: dict[str, int] = {}
    for c, idx in index.items():
        for i, lab in zip(idx.tolist(), session.labels(c).tolist(), strict=True):
            out[mask_id(i)] = int(lab)
    return out


def _settle(loops: list[EventLoop], distributed: bool, until: Callable[[], bool]) -> None:
    """Step the loops until ``until()`` holds (and, embedded, until nothing is left)."""
    deadline = time.monotonic() + (600 if distributed else 1e9)
    while True:
        n = sum(loop.step(0.5 if distributed else 0.0) for loop in loops)
        if until() and (distributed or n == 0):
            return
        if not distributed and n == 0 and not until():
            raise RuntimeError("pipeline stalled: no events in flight but work is unfinished")
        if time.monotonic() > deadline:
            raise RuntimeError("pipeline did not settle within 10 minutes")


@dataclass
class CampaignResult:
    """What one campaign through the services produced (indices are pool indices)."""

    accepted: NDArray[np.int64]
    sink_labels: dict[str, int]
    questions: int
    labels_in_sink: int
    duplicate_labels: int
    missing_labels: int
    classes: int
    coco: dict[str, Any]
    search: SearchSettings


def run_campaign(
    pool: MaskPool,
    events: Iterable[tuple[bytes, Message]],
    *,
    campaign: str,
    out: Path,
    runtime: RuntimeSettings,
    search: dict[str, Any],
    annotator_error: float,
    seed: int,
    annotator_batch: int = 64,
    progress: Progress = no_progress,
    params_for: Callable[[str], SessionParams | None] | None = None,
    question_budget: int | None = None,
    mask_index: Mapping[str, int] | None = None,
    redundancy: int = 1,
) -> CampaignResult:
    """Publish ``events`` (the detector's output for ``pool``; mask ids ``mask_id(i)``), let the
    clusterer and search services build and search the trees, answer their questions with a
    simulated annotator thresholding the pool's true IoU (``annotator_error`` flips answers),
    and collect the sink's labels.  Writes ``out/dataset``, ``out/state`` and
    ``out/annotations.json`` (the sink's COCO export).

    ``params_for``: the parameters search opens a campaign's sessions with (a campaign
    registry's ``session_params``, as in the distributed services); default: the registry in
    this run's Redis, then ``search``.  ``question_budget``: no question is leased beyond it;
    masks still undecided then get no label (``missing_labels``).  ``mask_index``: mask id ->
    pool index when the events' mask ids are not ``mask_id(i)`` (a campaign's ids are the
    detector's ``<image id>.<k>``, which order the trees as the distributed detector's do).
    ``redundancy``: each question is answered by that many simulated workers (independent
    mistakes at ``annotator_error``), the majority's answer goes to search (a tie: the first
    worker's)."""
    if redundancy < 1:
        raise MaskpropError("redundancy must be at least 1")
    index_of = mask_index.__getitem__ if mask_index is not None else pool_index
    if (out / "dataset" / campaign).exists():
        raise MaskpropError(
            f"{out} already holds a dataset for campaign {campaign!r}; "
            "choose another --out or remove it"
        )
    out.mkdir(parents=True, exist_ok=True)
    redis_url = runtime.redis_url.get_secret_value() if runtime.redis_url else None
    redis = make_redis(redis_url, connect_timeout_s=runtime.connect_timeout_s)
    bus = make_bus(runtime.kafka_bootstrap, **runtime.bus_options())
    common = runtime.model_dump(exclude={"data_dir"})
    search_settings = SearchSettings(**common, data_dir=out / "state", **search)
    core, search_loop = build_search(search_settings, bus, redis)
    if params_for is not None:
        core.params_for = params_for
    if core.campaign_exists(campaign):
        search_loop.close()
        raise MaskpropError(
            f"campaign {campaign!r} already exists in this Redis; choose a new [campaign] name"
        )
    clusterer = build_clusterer(ClustererSettings(**common, data_dir=out / "state"), bus, redis)
    sink = build_sink(SinkSettings(**common, dataset_dir=out / "dataset"), bus)
    reader = DatasetReader(out / "dataset")
    try:
        producer = bus.producer()
        batch = list(events)
        for i, (key, ev) in enumerate(batch):
            producer.send(topics.MASKS, key, ev.SerializeToString())
            progress("detected", i + 1, len(batch))
        producer.flush()

        n_classes = len({int(c) for c in pool.class_ids})
        _settle(
            [clusterer, search_loop],
            runtime.distributed,
            lambda: len(core.classes(campaign)) == n_classes,
        )
        annotators = [
            SimulatedAnnotator(
                pool.ious, search_settings.iou_threshold, error_rate=annotator_error,
                seed=seed + 1_000_003 * j,
            )
            for j in range(redundancy)
        ]  # fmt: skip
        leased = 0
        while len(pool):
            room = annotator_batch
            if question_budget is not None:
                room = min(room, question_budget - leased)
                if room <= 0:  # the budget is spent: nothing more is asked, but what needs
                    core.decide_without_asking(campaign)  # no question is still decided
                    break
            qs, done = core.lease(campaign, room, owner="simulated-crowd")
            leased += len(qs)
            if done:
                break
            if not qs:
                raise RuntimeError("search has no questions but the campaign is not done")
            ids = np.array([index_of(q.mask_id) for q in qs], dtype=np.int64)
            votes = np.stack([a.answer(ids) for a in annotators]).astype(np.int64)
            yes = votes.sum(axis=0)
            labels = np.where(2 * yes == redundancy, votes[0] == 1, 2 * yes > redundancy)
            core.submit((q.question_id, bool(v)) for q, v in zip(qs, labels, strict=True))
            sink.step(0.0)
            decided = sum(
                p.accepted_masks + p.rejected_masks for p in core.progress(campaign).classes
            )
            progress("annotated", int(decided), len(pool))
        labelled = len(pool)
        if question_budget is not None:  # stopped by the budget: the masks search decided
            labelled = sum(
                p.accepted_masks + p.rejected_masks for p in core.progress(campaign).classes
            )
        _settle(
            [sink],
            runtime.distributed,
            lambda: reader.ledger_stats(campaign)["unique_masks"] >= labelled,
        )
        progress("annotated", len(pool), len(pool))
        if not len(pool):  # nothing detected: no trees, no questions, no labels
            return CampaignResult(
                np.zeros(0, np.int64), {}, 0, 0, 0, 0, 0, {"annotations": 0}, search_settings
            )
        if not labelled:  # the budget ran out before any mask was decided: no labels
            asked = int(core.progress(campaign).questions)
            return CampaignResult(
                np.zeros(0, np.int64), {}, asked, 0, 0, len(pool), n_classes,
                {"annotations": 0}, search_settings,
            )  # fmt: skip
        coco = export_coco(out / "dataset", campaign, out / "annotations.json")
        stats = reader.ledger_stats(campaign)
        accepted = np.array(
            [index_of(r["mask_id"]) for r in reader.labels(campaign, accepted_only=True)],
            dtype=np.int64,
        )
        return CampaignResult(
            accepted=accepted,
            sink_labels={r["mask_id"]: int(r["accepted"]) for r in reader.labels(campaign)},
            questions=int(core.progress(campaign).questions) if len(pool) else 0,
            labels_in_sink=stats["labels"],
            duplicate_labels=stats["duplicate_keys"],
            missing_labels=len(pool) - stats["unique_masks"],
            classes=n_classes,
            coco=coco,
            search=search_settings,
        )
    finally:
        for loop in (clusterer, search_loop, sink):
            loop.close()


def campaign_metrics(
    pool: MaskPool, result: CampaignResult, params: AnnotationParams, redundancy: int = 1
) -> dict[str, Any]:
    """masks, sq, precision, questions, hours, speedup_vs_manual of a campaign's accepted masks
    against the pool's true IoUs (the paper's Sec. 5.2 measures); a question costs
    ``redundancy`` answers."""
    ious = pool.ious[result.accepted].astype(np.float64)
    answers = result.questions * redundancy
    seconds = human_seconds(answers, params.seconds_per_question)
    return {
        "masks": len(result.accepted),
        "sq": segmentation_quality(ious),
        "precision": float((ious >= params.iou_threshold).mean()) if ious.size else None,
        "questions": result.questions,
        "answers": answers,
        "hours": human_hours(answers, params.seconds_per_question),
        "speedup_vs_manual": speedup_vs_manual(
            len(result.accepted), seconds, params.seconds_per_polygon
        ),
    }


def run_pipeline(
    cfg: RunConfig, out: Path, runtime: RuntimeSettings, progress: Progress = no_progress
) -> dict[str, Any]:
    """Run the whole pipeline once on a simulated pool; writes ``out/dataset``,
    ``out/annotations.json`` and ``out/run_report.json`` and returns the report."""
    started = time.perf_counter()
    pool = ade_like_pool(cfg.masks, cfg.classes, seed=cfg.seed, dim=cfg.dim)
    result = run_campaign(
        pool,
        pool_events(pool, cfg.campaign),
        campaign=cfg.campaign,
        out=out,
        runtime=runtime,
        search=cfg.search,
        annotator_error=cfg.annotator_error,
        seed=cfg.seed,
        annotator_batch=cfg.annotator_batch,
        progress=progress,
    )
    if cfg.annotator_error == 0.0:
        reference = reference_labels(wire_pool(pool), result.search)
        matches: bool | None = result.sink_labels == reference
    else:
        matches = None  # the reference uses error-free answers
    report = {
        "campaign": cfg.campaign,
        "mode": "distributed" if runtime.distributed else "embedded",
        "masks": len(pool),
        "classes": result.classes,
        "labels_in_sink": result.labels_in_sink,
        "accepted": len(result.accepted),
        "duplicate_labels": result.duplicate_labels,
        "missing_labels": result.missing_labels,
        **{
            k: v
            for k, v in campaign_metrics(pool, result, result.search.params()).items()
            if k != "masks"
        },
        "matches_in_process_library": matches,
        "coco": result.coco,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "run_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
