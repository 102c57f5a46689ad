"""The sink's durable output: propagated labels as append-only JSONL shards, one directory per
campaign, each label written exactly once although events arrive at least once.

Layout under ``root``::

    <campaign>/labels/part-<partition>-<seq:05d>.jsonl  one label a line, SHARD_LINES a shard
    <campaign>/images.jsonl                             image_id, width, height, file_name
    <campaign>/categories.json                          {"<class_id>": "<class_name>"}
    .writer.lock                                        flock of the one live DatasetWriter

images.jsonl holds each image once; categories.json is rewritten atomically (temp + rename).

The files are the only source of truth.  The ledger of written label keys
``(campaign, class_id, mask_id)`` and image ids is kept in memory and rebuilt from the files when
a writer starts, so there is no second database that could disagree with them after a crash.

Write order makes every prefix of the files consistent: images and categories are durable
before the labels that refer to them, and a label key enters the ledger only after its line is
fsynced.  A crash can therefore leave at most one torn line at the end of a file; the next
writer truncates it and the redelivered event rewrites what was lost.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from maskprop.files import atomic_file
from maskprop_runtime import codec
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.treestore import check_name

log = logging.getLogger(__name__)

SHARD_LINES = 100_000
LOCK_FILE = ".writer.lock"
IMAGES_FILE = "images.jsonl"
CATEGORIES_FILE = "categories.json"
LABELS_DIR = "labels"

SOURCES = {
    search_pb2.LABEL_SOURCE_PROPAGATED: "propagated",
    search_pb2.LABEL_SOURCE_VERIFIED: "verified",
}

_SHARD = re.compile(r"^part-(\d+)-(\d{5,})\.jsonl$")


class DatasetCorrupt(RuntimeError):
    """A line other than the last of a file is not a JSON object: not a crash artefact, so it
    is reported instead of repaired (an operator must look)."""


class UnwritableEvent(ValueError):
    """The event cannot be written as it is (raised before any file is touched)."""


class DatasetLocked(RuntimeError):
    """Another DatasetWriter holds the dataset directory."""


# --------------------------------------------------------------------------- file helpers
def _fsync_dir(path: Path) -> None:
    # A new file's directory entry is only durable once the directory itself is synced.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` and make it durable before returning."""
    new = not path.exists()
    with open(path, "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if new:
        _fsync_dir(path.parent)


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def _json_line(obj: dict[str, Any]) -> bytes:
    # allow_nan=False: the shards stay strict JSON that any reader accepts.
    return (json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def read_records(path: Path, *, repair: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, one per line.

    The last line may be torn (no final newline, or not valid JSON) by a crash or by a writer
    appending right now: it is skipped, and with ``repair=True`` truncated away (only the
    single writer may repair).  An invalid line anywhere else raises :class:`DatasetCorrupt`.
    """
    tail_start = -1
    with open(path, "rb") as f:
        offset = 0
        prev: tuple[int, bytes] | None = None
        for raw in f:
            if prev is not None:
                rec = _parse(prev[1])
                if rec is None:
                    raise DatasetCorrupt(f"{path}: line at byte {prev[0]} is not a JSON object")
                yield rec
            prev = (offset, raw)
            offset += len(raw)
        if prev is not None:
            rec = _parse(prev[1]) if prev[1].endswith(b"\n") else None
            if rec is not None:
                yield rec
            else:
                tail_start = prev[0]
    if tail_start >= 0 and repair:
        with open(path, "r+b") as f:
            f.truncate(tail_start)
            f.flush()
            os.fsync(f.fileno())
        log.warning(
            "truncated a torn trailing line left by a crash",
            extra={"file": str(path), "size": tail_start},
        )


def shard_paths(campaign_dir: Path) -> list[tuple[int, int, Path]]:
    """``(partition, seq, path)`` of a campaign's label shards, sorted."""
    folder = campaign_dir / LABELS_DIR
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        m = _SHARD.match(p.name)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(out)


def shard_name(partition: int, seq: int) -> str:
    return f"part-{partition}-{seq:05d}.jsonl"


def _read_categories(campaign_dir: Path) -> dict[int, str]:
    path = campaign_dir / CATEGORIES_FILE
    if not path.exists():
        return {}
    return {int(k): str(v) for k, v in json.loads(path.read_bytes()).items()}


# --------------------------------------------------------------------------- writer
@dataclass
class _CampaignState:
    dir: Path
    keys: set[tuple[int, str]] = field(default_factory=set)  # (class_id, mask_id) written
    images: set[str] = field(default_factory=set)
    categories: dict[int, str] = field(default_factory=dict)
    shards: dict[int, tuple[int, int]] = field(default_factory=dict)  # partition -> (seq, lines)


class DatasetWriter:
    """Append propagated labels to ``root`` exactly once per ``(campaign, class_id, mask_id)``.

    Parameters
    ----------
    root : the dataset directory (created if missing).
    shard_lines : lines per label shard before the next one is started.
    lock_timeout_s : how long to wait for a previous writer (a pod still shutting down) to
        release the directory before raising :class:`DatasetLocked`.

    One writer per directory, enforced with ``flock``: the start-up repair truncates torn
    lines, which would destroy a line another live writer is appending, and each writer's
    ledger only knows its own appends.  Call :meth:`close` (or use ``with``) to release it.

    Examples
    --------
    >>> with DatasetWriter(tmp_path / "dataset") as w:  # doctest: +SKIP
    ...     w.write(event, partition=0)   # n new labels
    ...     w.write(event, partition=0)   # 0: every key is already in the ledger
    """

    def __init__(
        self, root: Path, *, shard_lines: int = SHARD_LINES, lock_timeout_s: float = 0.0
    ) -> None:
        if shard_lines < 1:
            raise ValueError("shard_lines must be at least 1")
        self.root = Path(root)
        self.shard_lines = shard_lines
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock: IO[bytes] | None = _lock(self.root / LOCK_FILE, lock_timeout_s)
        self._campaigns: dict[str, _CampaignState] = {}
        try:
            for d in sorted(self.root.iterdir()):
                if d.is_dir() and _is_campaign_name(d.name):
                    self._campaigns[d.name] = self._load(d.name)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the directory lock; the writer must not be used afterwards."""
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- ledger
    def _load(self, campaign: str) -> _CampaignState:
        """Rebuild a campaign's ledger from its files, repairing torn trailing lines."""
        state = _CampaignState(self.root / campaign)
        state.categories = _read_categories(state.dir)
        images = state.dir / IMAGES_FILE
        if images.exists():
            state.images = {str(r["image_id"]) for r in read_records(images, repair=True)}
        categories_changed = False
        for partition, seq, path in shard_paths(state.dir):
            lines = 0
            for rec in read_records(path, repair=True):
                class_id = int(rec["class_id"])
                state.keys.add((class_id, str(rec["mask_id"])))
                name = str(rec.get("class_name", ""))
                if class_id not in state.categories or (name and not state.categories[class_id]):
                    state.categories[class_id] = name
                    categories_changed = True
                lines += 1
            state.shards[partition] = (seq, lines)  # sorted by seq: the newest shard wins
        if categories_changed:
            # categories.json was lost or stale: the label lines carry the names, rewrite it.
            self._write_categories(state)
        return state

    def known(self, campaign: str, class_id: int, mask_id: str) -> bool:
        """Whether the label ``(campaign, class_id, mask_id)`` is already written."""
        state = self._campaigns.get(campaign)
        return state is not None and (int(class_id), mask_id) in state.keys

    def knows_image(self, campaign: str, image_id: str) -> bool:
        state = self._campaigns.get(campaign)
        return state is not None and image_id in state.images

    # ---- writing
    def write(self, event: search_pb2.LabelsPropagated, partition: int) -> int:
        """Append the labels of ``event`` not yet written; returns how many lines were written.

        Labels whose key is in the ledger (a redelivered event, or the search service
        republishing its outbox) are skipped, as are repeats within the event.  Raises
        :class:`UnwritableEvent` before touching any file when the event cannot be written (bad
        campaign name, a label with an unspecified source, or one whose image is described
        neither in the event nor earlier); ``OSError`` when the disk fails, after which the
        campaign is rescanned on its next write, exactly as after a crash.
        """
        try:
            campaign = check_name("campaign", event.campaign)
        except ValueError as exc:
            raise UnwritableEvent(str(exc)) from None
        if partition < 0:
            raise UnwritableEvent(f"partition must be >= 0, got {partition}")
        state = self._campaigns.get(campaign)
        if state is None:
            state = self._load(campaign)
            self._campaigns[campaign] = state

        image_lines, image_ids = self._new_images(state, event)
        label_lines, keys = self._new_labels(state, event, image_ids)
        class_id = int(event.class_id)
        named = state.categories.get(class_id)
        # A class is (re)written when first seen, or when a name arrives for an unnamed one.
        new_category = bool(label_lines) and (named is None or (not named and event.class_name))
        try:
            if image_lines:
                self._create_dirs(state)
                _append(state.dir / IMAGES_FILE, b"".join(image_lines))
                state.images |= image_ids
            if new_category:
                self._create_dirs(state)
                state.categories[class_id] = event.class_name
                self._write_categories(state)
            if label_lines:
                self._create_dirs(state)
                self._append_labels(state, partition, label_lines)
        except BaseException:
            # A failed append may have left a torn line: forget this campaign so that its
            # next write rebuilds the ledger and repairs the file, as a restart would.
            self._campaigns.pop(campaign, None)
            raise
        state.keys |= keys
        return len(label_lines)

    def _new_images(
        self, state: _CampaignState, event: search_pb2.LabelsPropagated
    ) -> tuple[list[bytes], set[str]]:
        lines: list[bytes] = []
        ids: set[str] = set()
        for im in event.images:
            if not im.image_id or im.image_id in state.images or im.image_id in ids:
                continue
            ids.add(im.image_id)
            lines.append(
                _json_line(
                    {
                        "image_id": im.image_id,
                        "width": im.width,
                        "height": im.height,
                        "file_name": im.file_name,
                    }
                )
            )
        return lines, ids

    def _new_labels(
        self, state: _CampaignState, event: search_pb2.LabelsPropagated, new_images: set[str]
    ) -> tuple[list[bytes], set[tuple[int, str]]]:
        class_id = int(event.class_id)
        lines: list[bytes] = []
        keys: set[tuple[int, str]] = set()
        for lab in event.labels:
            key = (class_id, lab.mask_id)
            if key in state.keys or key in keys:
                continue
            if lab.image_id not in state.images and lab.image_id not in new_images:
                raise UnwritableEvent(
                    f"label {lab.mask_id!r} refers to image {lab.image_id!r}, described neither "
                    "in the event nor earlier"
                )
            source = SOURCES.get(lab.source)
            if source is None:
                raise UnwritableEvent(f"label {lab.mask_id!r} has no label source")
            if not math.isfinite(lab.score):
                raise UnwritableEvent(f"label {lab.mask_id!r} has a non-finite score")
            try:
                segmentation = codec.rle_to_coco(lab.rle)
            except UnicodeDecodeError:
                raise UnwritableEvent(f"label {lab.mask_id!r}: RLE counts are not ASCII") from None
            keys.add(key)
            lines.append(
                _json_line(
                    {
                        "campaign": event.campaign,
                        "class_id": class_id,
                        "class_name": event.class_name,
                        "mask_id": lab.mask_id,
                        "image_id": lab.image_id,
                        "accepted": lab.accepted,
                        "source": source,
                        "node": lab.node,
                        "outcome": lab.outcome,
                        "yes": lab.yes,
                        "answered": lab.answered,
                        "score": lab.score,
                        "segmentation": segmentation,
                        "event_id": event.event_id,
                    }
                )
            )
        return lines, keys

    def _append_labels(self, state: _CampaignState, partition: int, lines: list[bytes]) -> None:
        seq, count = state.shards.get(partition, (0, 0))
        i = 0
        while i < len(lines):
            if count >= self.shard_lines:
                seq, count = seq + 1, 0
            chunk = lines[i : i + self.shard_lines - count]
            _append(state.dir / LABELS_DIR / shard_name(partition, seq), b"".join(chunk))
            count += len(chunk)
            i += len(chunk)
            state.shards[partition] = (seq, count)

    def _create_dirs(self, state: _CampaignState) -> None:
        labels = state.dir / LABELS_DIR
        if labels.is_dir():
            return
        labels.mkdir(parents=True, exist_ok=True)
        _fsync_dir(self.root)
        _fsync_dir(state.dir)

    @staticmethod
    def _write_categories(state: _CampaignState) -> None:
        body = {str(k): state.categories[k] for k in sorted(state.categories)}
        _atomic_write(state.dir / CATEGORIES_FILE, json.dumps(body, indent=1).encode())


def _is_campaign_name(name: str) -> bool:
    # The root may hold foreign directories (lost+found on a mounted volume): skip them.
    try:
        check_name("campaign", name)
    except ValueError:
        return False
    return True


def _lock(path: Path, timeout_s: float) -> IO[bytes]:
    f = open(path, "a+b")  # held open (and locked) for the writer's lifetime
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() >= deadline:
                f.close()
                raise DatasetLocked(
                    f"{path.parent} is held by another dataset writer (one sink per directory)"
                ) from None
            time.sleep(0.2)


# --------------------------------------------------------------------------- reader
class DatasetReader:
    """Read what :class:`DatasetWriter` wrote; safe while a writer appends (a torn last line
    is skipped, never repaired)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def campaigns(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and _is_campaign_name(d.name)
        )

    def _dir(self, campaign: str) -> Path:
        # A campaign the sink has not written to yet reads as empty: callers poll for labels.
        return self.root / check_name("campaign", campaign)

    def shards(self, campaign: str) -> list[Path]:
        """Label shards in (partition, seq) order."""
        return [p for _, _, p in shard_paths(self._dir(campaign))]

    def labels(self, campaign: str, *, accepted_only: bool = False) -> Iterator[dict[str, Any]]:
        """Label records (the JSON objects of the shards), streamed shard by shard."""
        for path in self.shards(campaign):
            for rec in read_records(path):
                if rec["accepted"] or not accepted_only:
                    yield rec

    def images(self, campaign: str) -> Iterator[dict[str, Any]]:
        """Image records in first-seen order (image_id, width, height, file_name)."""
        path = self._dir(campaign) / IMAGES_FILE
        if not path.exists():
            return
        seen: set[str] = set()
        for rec in read_records(path):
            if rec["image_id"] not in seen:
                seen.add(rec["image_id"])
                yield rec

    def categories(self, campaign: str) -> dict[int, str]:
        """class_id -> class_name."""
        return _read_categories(self._dir(campaign))

    def ledger_stats(self, campaign: str) -> dict[str, int]:
        """Counts over the shards: ``labels`` (lines), ``accepted``, ``unique_masks`` (distinct
        ``(class_id, mask_id)`` keys) and ``duplicate_keys`` (``labels - unique_masks``; 0
        unless exactly-once was broken)."""
        labels = accepted = 0
        keys: set[tuple[int, str]] = set()
        for rec in self.labels(campaign):
            labels += 1
            accepted += bool(rec["accepted"])
            keys.add((int(rec["class_id"]), str(rec["mask_id"])))
        return {
            "labels": labels,
            "accepted": accepted,
            "unique_masks": len(keys),
            "duplicate_keys": labels - len(keys),
        }
