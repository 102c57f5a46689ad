"""The sink's durable output: propagated labels as append-only JSONL shards, one directory per
campaign, each label written exactly once although events arrive at least once.

Layout under ``root``::

    <campaign>/labels/accepted/part-<partition>-<seq:05d>.jsonl  accepted labels (with RLE)
    <campaign>/labels/rejected/part-<partition>-<seq:05d>.jsonl  rejected, auto-rejected, skipped
    <campaign>/images.jsonl                             image_id, width, height, file_name
    <campaign>/categories.json                          {"<class_id>": "<class_name>"}
    <campaign>/ledger.ckpt                              checkpoint of the ledger (below)
    .writer.lock                                        flock of the one live DatasetWriter

Accepted and rejected labels live in separate shards (SHARD_LINES lines each) so that the COCO
export reads accepted masks only; categories.json is rewritten atomically (temp + rename).

The ledger.  A label's key is ``(campaign, class_id, mask_index)``: the mask's leaf index in its
class's tree, below the event's ``class_masks``.  The ledger is one bitmap per class
(``ceil(class_masks / 8)`` bytes: 1.25 MB for a 10M-mask class), so memory is bounded by the
classes' sizes, not by the labels written.  It is checkpointed atomically beside the shards
(``ledger.ckpt``: the bitmaps, class names, and each shard's sequence number and byte size at
that moment) every ``checkpoint_labels`` labels and on :meth:`DatasetWriter.close`; a writer
starts from the checkpoint and reads only what the shards gained after it (the tail), so its
start-up does not depend on the history.  A missing or unreadable checkpoint means a full
scan, which is what the checkpoint is checked against.

Write order makes every prefix of the files consistent: images and categories are durable
before the labels that refer to them, a label enters the ledger only after its line is
fsynced, and a checkpoint only ever describes fsynced bytes.  A crash can therefore leave at
most one torn line at the end of a file; the next writer truncates it and the redelivered event
rewrites what was lost.  Whatever the crash point (between the shard append, the checkpoint
and the consumer's offset commit), the restart's ledger holds exactly the lines in the shards,
so a redelivered label is skipped and a lost one rewritten.

Images are not part of the exactly-once ledger: each event describes the images of its labels
(search's events always do), images.jsonl is appended for images not among the last
``IMAGE_CACHE`` written, and readers keep the first description of each image.  A restart may
therefore list an image twice, never lose one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from maskprop.files import atomic_file
from maskprop_runtime import codec
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.treestore import check_name

log = logging.getLogger(__name__)

SHARD_LINES = 100_000
LOCK_FILE = ".writer.lock"
IMAGES_FILE = "images.jsonl"
CATEGORIES_FILE = "categories.json"
CHECKPOINT_FILE = "ledger.ckpt"
LABELS_DIR = "labels"
KINDS = ("accepted", "rejected")
#: Labels appended between two checkpoints: bounds the tail a restart reads.
CHECKPOINT_LABELS = 100_000
#: Image ids remembered as already listed in images.jsonl (a bounded cache, not a ledger).
IMAGE_CACHE = 100_000
#: Masks a class may declare (``class_masks``): its bitmap is at most 128 MiB.
MAX_CLASS_MASKS = 1 << 30

_CKPT_MAGIC = b"MPL1"

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


def read_records(path: Path, *, repair: bool = False, start: int = 0) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of a JSONL file, one per line, from byte ``start`` (a line
    boundary: a checkpointed size).

    The last line may be torn (no final newline, or not valid JSON) by a crash or by a writer
    appending right now: it is skipped, and with ``repair=True`` truncated away (only the
    single writer may repair).  An invalid line anywhere else raises :class:`DatasetCorrupt`.
    """
    tail_start = -1
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
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


def _repair_tail(path: Path, window: int = 1 << 16) -> None:
    """Truncate a torn last line of ``path`` (no final newline, or not a JSON object),
    reading only its last ``window`` bytes (the whole file through :func:`read_records` when
    the last line is longer): start-up cost independent of the file's length."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - window))
        tail = f.read()
    if not tail:
        return
    body = tail[:-1] if tail.endswith(b"\n") else tail
    cut = body.rfind(b"\n")
    if cut < 0 and size > len(tail):
        for _ in read_records(path, repair=True):
            pass
        return
    last = tail[cut + 1 :]
    if last.endswith(b"\n") and _parse(last) is not None:
        return
    keep = size - len(last)
    with open(path, "r+b") as f:
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    log.warning(
        "truncated a torn trailing line left by a crash", extra={"file": str(path), "size": keep}
    )


def shard_paths(campaign_dir: Path, kind: str | None = None) -> list[tuple[str, int, int, Path]]:
    """``(kind, partition, seq, path)`` of a campaign's label shards (``kind``: "accepted",
    "rejected" or None for both), accepted ones first, each kind in (partition, seq) order."""
    out = []
    for k in KINDS if kind is None else (kind,):
        folder = campaign_dir / LABELS_DIR / k
        if not folder.is_dir():
            continue
        found = []
        for p in folder.iterdir():
            m = _SHARD.match(p.name)
            if m:
                found.append((k, int(m.group(1)), int(m.group(2)), p))
        out += sorted(found)
    return out


def shard_name(partition: int, seq: int) -> str:
    return f"part-{partition}-{seq:05d}.jsonl"


def _read_categories(campaign_dir: Path) -> dict[int, str]:
    path = campaign_dir / CATEGORIES_FILE
    if not path.exists():
        return {}
    return {int(k): str(v) for k, v in json.loads(path.read_bytes()).items()}


# --------------------------------------------------------------------------- the ledger
@dataclass
class _ClassLedger:
    """Written mask indices of one class: bit ``i`` of ``bits`` (little bit order)."""

    masks: int
    bits: np.ndarray  # uint8[ceil(masks / 8)]

    @classmethod
    def empty(cls, masks: int) -> _ClassLedger:
        return cls(masks, np.zeros((masks + 7) // 8, np.uint8))

    def has(self, i: int) -> bool:
        return bool(self.bits[i >> 3] & (1 << (i & 7)))

    def add(self, i: int) -> None:
        self.bits[i >> 3] |= 1 << (i & 7)

    def count(self) -> int:
        return int(np.unpackbits(self.bits, bitorder="little").sum())


@dataclass
class _CampaignState:
    dir: Path
    ledger: dict[int, _ClassLedger] = field(default_factory=dict)
    images: OrderedDict[str, None] = field(default_factory=OrderedDict)  # recently listed
    categories: dict[int, str] = field(default_factory=dict)
    # (kind, partition) -> (seq, lines, bytes) of the shard being appended to
    shards: dict[tuple[str, int], tuple[int, int, int]] = field(default_factory=dict)
    since_checkpoint: int = 0


def _write_checkpoint(state: _CampaignState) -> None:
    """``ledger.ckpt``: ``MPL1`` + uint32 header length + JSON header + the bitmaps in the
    header's class order.  The header names each shard's (seq, lines, bytes), each class's
    name and mask count, and the bitmaps' sha256 (a damaged file is never trusted)."""
    classes = sorted(state.ledger)
    body = b"".join(state.ledger[k].bits.tobytes() for k in classes)
    header = {
        "format": "maskprop-ledger-1",
        "shards": [[k, p, *v] for (k, p), v in sorted(state.shards.items())],
        "classes": [[k, state.ledger[k].masks] for k in classes],
        "categories": {str(k): v for k, v in sorted(state.categories.items())},
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    _atomic_write(
        state.dir / CHECKPOINT_FILE, _CKPT_MAGIC + struct.pack("<I", len(raw)) + raw + body
    )
    state.since_checkpoint = 0


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[int, _ClassLedger]] | None:
    """The checkpoint's header and bitmaps, or None (logged) when missing or not intact."""
    if not path.exists():
        return None
    try:
        raw = path.read_bytes()
        if raw[:4] != _CKPT_MAGIC:
            raise ValueError("not a ledger checkpoint")
        (n,) = struct.unpack("<I", raw[4:8])
        header = json.loads(raw[8 : 8 + n])
        body = raw[8 + n :]
        if header.get("format") != "maskprop-ledger-1":
            raise ValueError(f"format {header.get('format')!r}")
        if hashlib.sha256(body).hexdigest() != header["sha256"]:
            raise ValueError("bitmaps do not match their checksum")
        ledger: dict[int, _ClassLedger] = {}
        at = 0
        for k, masks in header["classes"]:
            if not 0 < int(masks) <= MAX_CLASS_MASKS:
                raise ValueError(f"class {k} has {masks} masks")
            size = (int(masks) + 7) // 8
            bits = np.frombuffer(body, np.uint8, size, at).copy()
            ledger[int(k)] = _ClassLedger(int(masks), bits)
            at += size
        if at != len(body):
            raise ValueError("bitmaps and header disagree on sizes")
        return header, ledger
    except (ValueError, KeyError, TypeError, struct.error) as exc:
        log.warning(
            "ledger checkpoint unusable; rebuilding from every shard",
            extra={"file": str(path), "error": str(exc)},
        )
        return None


# --------------------------------------------------------------------------- writer
class DatasetWriter:
    """Append propagated labels to ``root`` exactly once per ``(campaign, class_id,
    mask_index)``.

    Parameters
    ----------
    root : the dataset directory (created if missing).
    shard_lines : lines per label shard before the next one is started.
    lock_timeout_s : how long to wait for a previous writer (a pod still shutting down) to
        release the directory before raising :class:`DatasetLocked`.
    checkpoint_labels : labels appended to a campaign between two ledger checkpoints (the
        most a restart re-reads); :meth:`checkpoint` and :meth:`close` write one too.

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
        self,
        root: Path,
        *,
        shard_lines: int = SHARD_LINES,
        lock_timeout_s: float = 0.0,
        checkpoint_labels: int = CHECKPOINT_LABELS,
    ) -> None:
        if shard_lines < 1:
            raise ValueError("shard_lines must be at least 1")
        if checkpoint_labels < 1:
            raise ValueError("checkpoint_labels must be at least 1")
        self.root = Path(root)
        self.shard_lines = shard_lines
        self.checkpoint_labels = checkpoint_labels
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

    def checkpoint(self) -> None:
        """Checkpoint every campaign's ledger that changed since its last checkpoint."""
        for state in self._campaigns.values():
            if state.since_checkpoint:
                _write_checkpoint(state)

    def close(self) -> None:
        """Checkpoint, then release the directory lock; the writer must not be used after."""
        if self._lock is not None:
            try:
                self.checkpoint()
            finally:
                self._lock.close()  # closing the descriptor drops the flock
                self._lock = None

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- ledger
    def _load(self, campaign: str) -> _CampaignState:
        """A campaign's ledger: its checkpoint plus the shard bytes written after it (all of
        them without a usable checkpoint), repairing torn trailing lines."""
        state = _CampaignState(self.root / campaign)
        state.categories = _read_categories(state.dir)
        images = state.dir / IMAGES_FILE
        if images.exists():
            _repair_tail(images)  # images are no ledger: only a torn last line matters
        covered: dict[tuple[str, int], tuple[int, int, int]] = {}
        ckpt = _read_checkpoint(state.dir / CHECKPOINT_FILE)
        if ckpt is not None:
            header, state.ledger = ckpt
            covered = {
                (str(k), int(p)): (int(s), int(n), int(b)) for k, p, s, n, b in header["shards"]
            }
            names = {int(k): str(v) for k, v in header["categories"].items()}
        else:
            names = {}
        paths = shard_paths(state.dir)
        if ckpt is not None and not self._tails_exist(paths, covered):
            state.ledger, covered, names = {}, {}, {}  # shards shorter than checkpointed
        categories_changed = False
        for k, v in names.items():
            if k not in state.categories or (v and not state.categories[k]):
                state.categories[k] = v
                categories_changed = True
        for kind, partition, seq, path in paths:
            at = covered.get((kind, partition))
            start, lines = 0, 0
            if at is not None and seq < at[0]:
                continue  # wholly covered by the checkpoint
            if at is not None and seq == at[0]:
                start, lines = at[2], at[1]
            for rec in read_records(path, repair=True, start=start):
                class_id = int(rec["class_id"])
                self._ledger(state, class_id, int(rec["class_masks"])).add(int(rec["mask_index"]))
                name = str(rec.get("class_name", ""))
                if class_id not in state.categories or (name and not state.categories[class_id]):
                    state.categories[class_id] = name
                    categories_changed = True
                lines += 1
                state.since_checkpoint += 1
            state.shards[(kind, partition)] = (seq, lines, path.stat().st_size)
        for key, value in covered.items():
            state.shards.setdefault(key, value)  # a shard file lost after the checkpoint
        if categories_changed:
            # categories.json was lost or stale: the label lines carry the names, rewrite it.
            self._write_categories(state)
        return state

    @staticmethod
    def _tails_exist(
        paths: list[tuple[str, int, int, Path]],
        covered: dict[tuple[str, int], tuple[int, int, int]],
    ) -> bool:
        """Whether every shard the checkpoint describes is still at least as long: a
        checkpoint only describes fsynced bytes, so anything else was changed by hand."""
        sizes = {(k, p, s): path.stat().st_size for k, p, s, path in paths}
        return all(sizes.get((k, p, s), -1) >= b for (k, p), (s, _n, b) in covered.items())

    @staticmethod
    def _ledger(state: _CampaignState, class_id: int, masks: int) -> _ClassLedger:
        led = state.ledger.get(class_id)
        if led is None:
            if not 0 < masks <= MAX_CLASS_MASKS:
                raise UnwritableEvent(f"class {class_id}: class_masks must be 1-{MAX_CLASS_MASKS}")
            led = state.ledger[class_id] = _ClassLedger.empty(masks)
        elif led.masks != masks:
            raise UnwritableEvent(
                f"class {class_id} has {led.masks} masks in the ledger, the event says {masks}"
            )
        return led

    def known(self, campaign: str, class_id: int, mask_index: int) -> bool:
        """Whether the label ``(campaign, class_id, mask_index)`` is already written."""
        state = self._campaigns.get(campaign)
        led = state.ledger.get(int(class_id)) if state is not None else None
        return led is not None and 0 <= mask_index < led.masks and led.has(mask_index)

    # ---- writing
    def write(self, event: search_pb2.LabelsPropagated, partition: int) -> int:
        """Append the labels of ``event`` not yet written; returns how many lines were written.

        Labels whose key is in the ledger (a redelivered event, or the search service
        republishing its outbox) are skipped, as are repeats within the event.  Raises
        :class:`UnwritableEvent` before touching any file when the event cannot be written (bad
        campaign name, ``class_masks`` missing or unlike the ledger's, a ``mask_index`` out of
        range, a label with an unspecified source, or one whose image the event does not
        describe); ``OSError`` when the disk fails, after which the campaign is reloaded on its
        next write, exactly as after a crash.
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

        class_id = int(event.class_id)
        masks = int(event.class_masks)
        if not 0 < masks <= MAX_CLASS_MASKS:
            raise UnwritableEvent(
                f"event {event.event_id!r}: class_masks must be 1-{MAX_CLASS_MASKS}, got {masks}"
            )
        led = state.ledger.get(class_id)
        if led is not None and led.masks != masks:
            raise UnwritableEvent(
                f"class {class_id} has {led.masks} masks in the ledger, the event says {masks}"
            )
        described = {im.image_id: im for im in event.images if im.image_id}
        lines, indices = self._new_labels(state, event, described)
        image_lines = self._new_images(state, described, lines)
        named = state.categories.get(class_id)
        # A class is (re)written when first seen, or when a name arrives for an unnamed one.
        new_category = bool(indices) and (named is None or (not named and event.class_name))
        try:
            if image_lines:
                self._create_dirs(state)
                _append(state.dir / IMAGES_FILE, b"".join(image_lines.values()))
                for image_id in image_lines:
                    self._remember_image(state, image_id)
            if new_category:
                self._create_dirs(state)
                state.categories[class_id] = event.class_name
                self._write_categories(state)
            for kind in KINDS:
                if lines[kind]:
                    self._create_dirs(state)
                    self._append_labels(state, kind, partition, lines[kind])
        except BaseException:
            # A failed append may have left a torn line: forget this campaign so that its
            # next write reloads the ledger and repairs the file, as a restart would.
            self._campaigns.pop(campaign, None)
            raise
        if indices:
            led = self._ledger(state, class_id, masks)
            for i in indices:
                led.add(i)
            state.since_checkpoint += len(indices)
            if state.since_checkpoint >= self.checkpoint_labels:
                _write_checkpoint(state)
        return len(indices)

    def _remember_image(self, state: _CampaignState, image_id: str) -> None:
        state.images[image_id] = None
        state.images.move_to_end(image_id)
        if len(state.images) > IMAGE_CACHE:
            state.images.popitem(last=False)

    def _new_images(
        self,
        state: _CampaignState,
        described: dict[str, Any],
        lines: dict[str, list[bytes]],
    ) -> dict[str, bytes]:
        """images.jsonl lines for the described images of labels written now and not among
        the recently listed ones (image id -> line, in the event's order)."""
        if not any(lines.values()):
            return {}
        out: dict[str, bytes] = {}
        for image_id, im in described.items():
            if image_id in state.images:
                state.images.move_to_end(image_id)
                continue
            out[image_id] = _json_line(
                {
                    "image_id": im.image_id,
                    "width": im.width,
                    "height": im.height,
                    "file_name": im.file_name,
                }
            )
        return out

    def _new_labels(
        self,
        state: _CampaignState,
        event: search_pb2.LabelsPropagated,
        described: dict[str, Any],
    ) -> tuple[dict[str, list[bytes]], list[int]]:
        class_id = int(event.class_id)
        masks = int(event.class_masks)
        led = state.ledger.get(class_id)
        lines: dict[str, list[bytes]] = {kind: [] for kind in KINDS}
        indices: list[int] = []
        seen: set[int] = set()
        for lab in event.labels:
            i = int(lab.mask_index)
            if i >= masks:
                raise UnwritableEvent(
                    f"label {lab.mask_id!r}: mask_index {i} is not below class_masks {masks}"
                )
            if (led is not None and led.has(i)) or i in seen:
                continue
            if lab.image_id not in described:
                raise UnwritableEvent(
                    f"label {lab.mask_id!r} refers to image {lab.image_id!r}, not described "
                    "in the event (an event describes the images of its labels)"
                )
            source = SOURCES.get(lab.source)
            if source is None:
                raise UnwritableEvent(f"label {lab.mask_id!r} has no label source")
            if not math.isfinite(lab.score):
                raise UnwritableEvent(f"label {lab.mask_id!r} has a non-finite score")
            segmentation = None
            if lab.HasField("rle"):
                try:
                    segmentation = codec.rle_to_coco(lab.rle)
                except UnicodeDecodeError:
                    raise UnwritableEvent(
                        f"label {lab.mask_id!r}: RLE counts are not ASCII"
                    ) from None
            elif lab.accepted:
                raise UnwritableEvent(f"label {lab.mask_id!r} is accepted but has no RLE")
            seen.add(i)
            indices.append(i)
            lines["accepted" if lab.accepted else "rejected"].append(
                _json_line(
                    {
                        "campaign": event.campaign,
                        "class_id": class_id,
                        "class_name": event.class_name,
                        "mask_id": lab.mask_id,
                        "mask_index": i,
                        "class_masks": masks,
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
        return lines, indices

    def _append_labels(
        self, state: _CampaignState, kind: str, partition: int, lines: list[bytes]
    ) -> None:
        seq, count, size = state.shards.get((kind, partition), (0, 0, 0))
        i = 0
        while i < len(lines):
            if count >= self.shard_lines:
                seq, count, size = seq + 1, 0, 0
            chunk = b"".join(lines[i : i + self.shard_lines - count])
            n = min(len(lines) - i, self.shard_lines - count)
            _append(state.dir / LABELS_DIR / kind / shard_name(partition, seq), chunk)
            count += n
            size += len(chunk)
            i += n
            state.shards[(kind, partition)] = (seq, count, size)

    def _create_dirs(self, state: _CampaignState) -> None:
        labels = state.dir / LABELS_DIR
        if all((labels / kind).is_dir() for kind in KINDS):
            return
        for kind in KINDS:
            (labels / kind).mkdir(parents=True, exist_ok=True)
        _fsync_dir(self.root)
        _fsync_dir(state.dir)
        _fsync_dir(labels)

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

    def shards(self, campaign: str, kind: str | None = None) -> list[Path]:
        """Label shards (``kind``: "accepted", "rejected" or None for both, accepted first),
        each kind in (partition, seq) order."""
        return [p for _, _, _, p in shard_paths(self._dir(campaign), kind)]

    def labels(self, campaign: str, *, accepted_only: bool = False) -> Iterator[dict[str, Any]]:
        """Label records (the JSON objects of the shards), streamed shard by shard: accepted
        ones, then (unless ``accepted_only``, which never opens them) rejected ones."""
        for path in self.shards(campaign, "accepted" if accepted_only else None):
            yield from read_records(path)

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
