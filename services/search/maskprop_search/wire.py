"""Search's wire mapping: library values <-> protobuf messages.

Question ids, the questions handed out, the ``LabelsPropagated`` label events of decisions and
the progress response; every read of a class's mask table (mask ids, RLEs, scores, images)
happens here.  No Redis, no locks: :mod:`maskprop_search.store` and :mod:`maskprop_search.core`
call these functions with what they loaded.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from pathlib import Path

import numpy as np

from maskprop.data.masks import MaskTable
from maskprop.session import AnnotationSession, Decision, LabelSource, Question
from maskprop.tree import Tree
from maskprop_runtime import pbcols, topics
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.treestore import TreeStore, check_name

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """A caller error, mapped to INVALID_ARGUMENT by the gRPC layer."""


@dataclass(frozen=True)
class ClassMasks:
    """What a class's questions and label events say about its masks: the mask table in tree
    leaf order and the class name.  Images (id, width, height, file name) are read from the
    table's own image columns (:attr:`image_columns`); ``given_images`` (image id -> (width,
    height, file name)) stands in for them where a table has none (tests)."""

    table: MaskTable
    class_name: str
    given_images: dict[str, tuple[int, int, str]] | None = None

    @classmethod
    def of(cls, table: MaskTable, class_name: str) -> ClassMasks:
        return cls(table, class_name)

    @cached_property
    def images(self) -> dict[str, tuple[int, int, str]]:
        """Image id -> (width, height, file name) as plain Python values (readers that want
        a dict; the encoders use :attr:`image_columns`).  Built on first use: a class load
        no longer pays for it (~0.4 ms a small class; a relay or search loads hundreds)."""
        if self.given_images is not None:
            return self.given_images
        t = self.table
        return {
            str(i): (w, h, str(f))
            for i, w, h, f in zip(
                t.img_ids.tolist(),
                t.img_w.tolist(),
                t.img_h.tolist(),
                t.img_files.tolist(),
                strict=True,
            )
        }

    @cached_property
    def image_columns(self) -> tuple[np.ndarray, ...]:
        """The images as columns (ids, the order that sorts them, widths, heights, file
        names): the encoders look up a call's distinct images with one ``searchsorted``.  A
        class file's table has them already (memory-mapped): only the order is new (8 bytes
        an image); a table without image columns (tests) gets them from ``given_images``."""
        t = self.table
        if self.given_images is None:
            ids = np.asarray(t.img_ids)
            return ids, np.argsort(ids, kind="stable"), t.img_w, t.img_h, t.img_files
        ids = np.array(list(self.given_images), dtype=str)
        rows = list(self.given_images.values())
        return (
            ids,
            np.argsort(ids, kind="stable"),
            np.array([r[0] for r in rows], np.uint64),
            np.array([r[1] for r in rows], np.uint64),
            np.array([r[2] for r in rows], dtype=str),
        )

    def image_rows(self, image_ids: np.ndarray) -> np.ndarray:
        """Rows of :attr:`image_columns` holding ``image_ids``; ``KeyError`` naming the
        ids the class's image table lacks."""
        ids, order = self.image_columns[:2]
        if ids.shape[0] == 0:
            if image_ids.shape[0]:
                raise KeyError(f"images not in the class's image table: {image_ids[:3].tolist()}")
            return np.zeros(0, np.int64)
        at = np.minimum(np.searchsorted(ids, image_ids, sorter=order), ids.shape[0] - 1)
        rows = order[at]
        missing = ids[rows] != image_ids
        if missing.any():
            raise KeyError(
                f"images not in the class's image table: {image_ids[missing][:3].tolist()}"
            )
        return rows


def load_class(path: Path) -> tuple[Tree, ClassMasks]:
    """A class's tree and masks from the clusterer's tree file (``OSError`` if unreadable)."""
    tree, table, class_name = TreeStore.load_tree(path)
    return tree, ClassMasks.of(table, class_name)


def load_masks(path: Path) -> ClassMasks:
    """A class's masks alone from its tree file (the label relay's read: no tree)."""
    table, class_name = TreeStore.load_masks(path)
    return ClassMasks.of(table, class_name)


def question_id(campaign: str, q: Question) -> str:
    """``campaign:class_id:node:mask``: all a submitted answer needs to find its question."""
    return f"{campaign}:{q.class_id}:{q.node}:{q.mask}"


def parse_question_id(qid: str, known: set[str] | None = None) -> tuple[str, Question]:
    """The campaign and question of a :func:`question_id`; :class:`BadRequest` if malformed.
    ``known``: campaign names already checked (a call's answers share one or two)."""
    parts = qid.split(":")
    if len(parts) != 4:
        raise BadRequest(f"malformed question_id {qid[:80]!r}")
    campaign = parts[0]
    try:
        if known is None or campaign not in known:
            check_name("campaign", campaign)
            if known is not None:
                known.add(campaign)
        class_id, node, mask = int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        raise BadRequest(f"malformed question_id {qid[:80]!r}") from None
    if class_id < 0 or node < 0 or mask < 0:
        raise BadRequest(f"malformed question_id {qid[:80]!r}")
    return campaign, Question(class_id, node, mask)


def questions(
    campaign: str, masks: ClassMasks, qs: list[Question], deadline: float
) -> list[search_pb2.Question]:
    """The wire form of ``qs`` (one class), leased until ``deadline`` (unix seconds); built
    column-wise like the label events."""
    t = masks.table
    rows = np.fromiter((q.mask for q in qs), np.int64, len(qs))
    image_ids = np.asarray(t.image_ids[rows])
    files = np.asarray(masks.image_columns[4])[masks.image_rows(image_ids)].tolist()
    out = []
    for q, mask_id, image_id, image_file, h, w, lo, hi in zip(
        qs,
        t.mask_ids[rows].tolist(),
        image_ids.tolist(),
        files,
        t.rle_h[rows].tolist(),
        t.rle_w[rows].tolist(),
        t.rle_offsets[rows].tolist(),
        t.rle_offsets[rows + 1].tolist(),
        strict=True,
    ):
        out.append(
            search_pb2.Question(
                question_id=question_id(campaign, q),
                campaign=campaign,
                class_id=q.class_id,
                class_name=masks.class_name,
                mask_id=mask_id,
                image_id=image_id,
                rle=common_pb2.RleMask(height=h, width=w, counts=t.rle_blob[lo:hi]),
                lease_expires_unix=deadline,
                image_file=image_file,
            )
        )
    return out


def label_events(
    campaign: str,
    class_id: int,
    masks: ClassMasks,
    session: AnnotationSession,
    decisions: list[Decision],
    *,
    max_bytes: int = topics.record_limit(),
) -> list[search_pb2.LabelsPropagated]:
    """:func:`label_entries` parsed back into messages (for readers and tests; the relay
    publishes the bytes)."""
    return [
        search_pb2.LabelsPropagated.FromString(v)
        for _k, v in label_entries(
            campaign, class_id, masks, session, decisions, max_bytes=max_bytes
        )
    ]


def label_entries(
    campaign: str,
    class_id: int,
    masks: ClassMasks,
    session: AnnotationSession,
    decisions: list[Decision],
    *,
    max_bytes: int = topics.record_limit(),
) -> list[tuple[bytes, bytes]]:
    """The labels of ``decisions`` (terminal ones, of class ``class_id``) as outbox entries:
    (Kafka key of the class, serialized ``LabelsPropagated``), each event at most
    ``max_bytes`` serialized bytes (:func:`maskprop_runtime.topics.record_limit` of the labels
    topic's ``max.message.bytes``).  Event ids derive from the first decision's node and the
    chunk number, so the same decisions always make the same events (consumers dedupe by id;
    the sink's ledger by ``mask_index``).

    Only accepted labels carry their RLE: rejected, auto-rejected and skipped masks are
    negatives the dataset keeps for provenance only (a 1M-mask class rejected at its root was
    ~350 MB of RLEs nobody exports).  An accepted label whose RLE alone would not fit is put
    alone in an event without its RLE and with ``omitted_rle_bytes`` set: the sink dead-letters
    that event with the reason, and nothing else waits behind it."""
    if not decisions:
        return []
    rows, values, verified_or_not, which = session.decisions_labels(decisions)
    table, outcomes = _decision_table(decisions)
    item = _Decided(
        campaign, class_id, masks, table, outcomes, rows, values, verified_or_not, which
    )
    events = _label_bytes([item], max_bytes)[0]
    key = topics.class_key(campaign, class_id)
    return [(key, ev) for ev in events]


@dataclass(frozen=True)
class _Decided:
    """One class's decided labels to encode (what a decisions record holds): the decisions
    as :func:`_decision_table` puts them, and per label its row in the mask table, value,
    source and decision (:meth:`AnnotationSession.decisions_labels`)."""

    campaign: str
    class_id: int
    masks: ClassMasks
    decided: np.ndarray
    outcomes: list[str]
    rows: np.ndarray
    values: np.ndarray
    sources: np.ndarray
    which: np.ndarray


def _label_bytes(batch: list[_Decided], max_bytes: int) -> list[list[bytes]]:
    """The serialized ``LabelsPropagated`` events of each item of ``batch``, encoded
    column-wise over the whole batch at once (:mod:`maskprop_runtime.pbcols`): built as upb
    messages a label at a time they cost ~4.5 us a label; here a call costs ~1 ms and a label
    ~1-2 us, so a relay's batch of records is one call.

    Each item is cut in label order: everything in one event when it fits (the common case:
    a save's decisions of one class); otherwise greedy runs bounded by each label's bytes
    plus its image's, an image counted once for every label on it (a run may hold an
    image's ``ImageInfo`` once and still be counted more: smaller events, never larger)."""
    order = sorted(
        (i for i, b in enumerate(batch) if b.rows.shape[0]), key=lambda i: id(batch[i].masks)
    )  # items of one class table next to each other: one fancy index a column a table
    if not order:
        return [[] for _ in batch]
    items = [batch[i] for i in order]
    sizes = np.array([b.rows.shape[0] for b in items])
    first_row = np.concatenate([[0], np.cumsum(sizes)])
    m = int(first_row[-1])
    runs: list[tuple[ClassMasks, int, int]] = []  # (masks, first item, end item)
    for j, b in enumerate(items):
        if runs and runs[-1][0] is b.masks:
            runs[-1] = (b.masks, runs[-1][1], j + 1)
        else:
            runs.append((b.masks, j, j + 1))
    cols: dict[str, list[np.ndarray]] = {}
    blobs: list[np.ndarray] = []
    info: list[list[np.ndarray]] = [[], [], [], []]  # distinct images (id, w, h, file) by run
    n_images = 0
    for masks, j0, j1 in runs:
        t = masks.table
        rows = np.concatenate([items[j].rows for j in range(j0, j1)])
        u, inv = np.unique(np.asarray(t.image_ids[rows]), return_inverse=True)
        for name, values in (
            ("row", rows),
            ("mask_id", np.asarray(t.mask_ids[rows])),
            ("image_id", np.asarray(t.image_ids[rows])),
            ("image", inv + n_images),
            ("score", np.asarray(t.scores[rows], np.float32)),
            ("h", np.asarray(t.rle_h[rows], np.uint64)),
            ("w", np.asarray(t.rle_w[rows], np.uint64)),
            ("rle_start", np.asarray(t.rle_offsets[rows], np.int64)),
            ("rle_end", np.asarray(t.rle_offsets[rows + 1], np.int64)),
        ):
            cols.setdefault(name, []).append(values)
        blobs.append(np.frombuffer(t.rle_blob, np.uint8))
        at = masks.image_rows(u)
        image_cols = masks.image_columns[2:]
        for column, values in zip(info, (u, *(np.asarray(c)[at] for c in image_cols)), strict=True):
            column.append(values)
        n_images += u.shape[0]
    col = {name: np.concatenate(parts) for name, parts in cols.items()}
    rle_start, image_row = col["rle_start"], col["image"]
    rle_len = col["rle_end"] - rle_start
    accepted = np.concatenate([b.values for b in items]) == 1
    mask_ids = pbcols.string_field(1, col["mask_id"])
    image_ids = pbcols.string_field(2, col["image_id"])
    source = np.where(
        np.concatenate([b.sources for b in items]) == LabelSource.VERIFIED,
        search_pb2.LABEL_SOURCE_VERIFIED,
        search_pb2.LABEL_SOURCE_PROPAGATED,
    )
    flags = [pbcols.bool_field(3, accepted), pbcols.uint_field(4, source)]
    score = pbcols.float_field(6, col["score"])
    index = pbcols.uint_field(11, col["row"])

    # Fields 7-10 (node, outcome, yes, answered) once a decision, copied to each of its labels.
    outcomes = sorted({o for b in items for o in b.outcomes})
    code = {o: i for i, o in enumerate(outcomes)}
    remap = np.array([code[o] for b in items for o in b.outcomes], np.int64)
    n_dec = np.array([b.decided.shape[0] for b in items])
    decided = np.concatenate([b.decided for b in items])
    outcome_at = np.cumsum([0] + [len(b.outcomes) for b in items[:-1]])
    outcome = remap[np.repeat(outcome_at, n_dec) + decided[:, 3]]
    which = np.concatenate([b.which for b in items]) + np.repeat(np.cumsum(n_dec) - n_dec, sizes)
    names, name_lens = pbcols.strings(outcomes)
    outcome_lens = name_lens[outcome]
    d_data, d_lens = pbcols.assemble(
        [
            pbcols.uint_field(7, decided[:, 0]),
            pbcols.length_head(8, outcome_lens),
            pbcols.gather(names, (np.cumsum(name_lens) - name_lens)[outcome], outcome_lens),
            pbcols.uint_field(9, decided[:, 1]),
            pbcols.uint_field(10, decided[:, 2]),
        ]
    )
    d_starts = np.cumsum(d_lens) - d_lens
    provenance = pbcols.gather(d_data, d_starts[which], d_lens[which])
    run_rows = [(int(first_row[j0]), int(first_row[j1])) for _masks, j0, j1 in runs]

    def labels(oversized: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bytes, bytes a label, where each label starts) of every label of the batch."""
        with_rle = accepted & ~oversized
        counts_len = np.where(with_rle, rle_len, 0)
        counts = [
            pbcols.gather(blob, rle_start[lo:hi], counts_len[lo:hi])[0]
            for blob, (lo, hi) in zip(blobs, run_rows, strict=True)
        ]
        rle_body = [
            pbcols.uint_field(1, np.where(with_rle, col["h"], 0)),
            pbcols.uint_field(2, np.where(with_rle, col["w"], 0)),
            pbcols.length_head(3, counts_len),
            (np.concatenate(counts), counts_len),
        ]
        body = [
            *mask_ids,
            *image_ids,
            *flags,
            pbcols.length_head(5, pbcols.row_lens(rle_body), present=with_rle),
            *rle_body,
            score,
            provenance,
            index,
            pbcols.uint_field(12, np.where(oversized, rle_len, 0)),
        ]
        head = pbcols.length_head(9, pbcols.row_lens(body), present=np.ones(m, bool))
        data, lens = pbcols.assemble([head, *body])
        return data, lens, np.cumsum(lens) - lens

    # The distinct images as repeated ImageInfo (field 10) with key and length.
    img_id, img_w, img_h, img_file = (np.concatenate(c) for c in info)
    img_body = [
        *pbcols.string_field(1, img_id),
        pbcols.uint_field(2, img_w),
        pbcols.uint_field(3, img_h),
        *pbcols.string_field(4, img_file),
    ]
    img_head = pbcols.length_head(10, pbcols.row_lens(img_body), present=np.ones(n_images, bool))
    img_data, img_lens = pbcols.assemble([img_head, *img_body])
    img_starts = np.cumsum(img_lens) - img_lens

    # Each item's images in first-appearance order, all items at once: the first label of
    # each (item, image), in label order, is grouped by item.
    item_of = np.repeat(np.arange(len(items)), sizes)
    _, first = np.unique(item_of * n_images + image_row, return_index=True)
    first.sort()
    seq = image_row[first]
    seq_data, seq_lens = pbcols.gather(img_data, img_starts[seq], img_lens[seq])
    seq_at = np.concatenate([[0], np.cumsum(seq_lens)])
    bound = np.searchsorted(item_of[first], np.arange(len(items) + 1))

    def header(b: _Decided, chunk: int) -> bytes:
        event_id = f"labels.{b.campaign}.{b.class_id}.{int(b.decided[0, 0])}.{chunk}"
        return (
            pbcols.scalar_bytes(1, event_id.encode())
            + pbcols.scalar_bytes(2, b.campaign.encode())
            + pbcols.scalar_uint(3, b.class_id)
            + pbcols.scalar_bytes(4, b.masks.class_name.encode())
        )

    def trailer(b: _Decided) -> bytes:
        return pbcols.scalar_uint(11, int(b.masks.table.mask_ids.shape[0]))

    data, lens, starts = labels(np.zeros(m, bool))
    events: list[list[bytes]] = [[] for _ in items]
    split: list[int] = []  # items that do not fit in one event
    label_at = np.concatenate([starts, [data.shape[0]]])
    for j, b in enumerate(items):
        lo, hi = int(label_at[first_row[j]]), int(label_at[first_row[j + 1]])
        ilo, ihi = int(seq_at[bound[j]]), int(seq_at[bound[j + 1]])
        head, tail = header(b, 0), trailer(b)
        if len(head) + (hi - lo) + (ihi - ilo) + len(tail) <= max_bytes:
            events[j].append(
                b"".join((head, data[lo:hi].tobytes(), seq_data[ilo:ihi].tobytes(), tail))
            )
        else:
            split.append(j)
    if split:
        budget = np.zeros(m, np.int64)
        for j in split:
            budget[first_row[j] : first_row[j + 1]] = (
                max_bytes - len(header(items[j], 10**12)) - len(trailer(items[j]))
            )
        oversized = (budget > 0) & (lens + img_lens[image_row] > budget)
        if oversized.any():
            for i in np.flatnonzero(oversized).tolist():
                j = int(item_of[i])
                log.error(
                    "an accepted mask's RLE cannot fit in a label event; sent without it",
                    extra={
                        "campaign": items[j].campaign,
                        "class_id": items[j].class_id,
                        "mask_id": str(col["mask_id"][i]),
                        "rle_bytes": int(rle_len[i]),
                        "max_bytes": max_bytes,
                    },
                )
            data, lens, starts = labels(oversized)
        label_at = np.concatenate([starts, [data.shape[0]]])
        cost = lens + img_lens[image_row]
        alone = np.flatnonzero(oversized)
        for j in split:
            b = items[j]
            r0, r1 = int(first_row[j]), int(first_row[j + 1])
            cum = np.cumsum(cost[r0:r1])  # cum[k]: labels r0..r0+k
            lo = r0
            while lo < r1:
                hi = lo + 1
                if not oversized[lo]:
                    base = int(cum[lo - r0 - 1]) if lo > r0 else 0
                    hi = max(hi, r0 + int(np.searchsorted(cum, base + budget[lo], "right")))
                    nxt = np.searchsorted(alone, lo)
                    if nxt < alone.shape[0]:
                        hi = min(hi, int(alone[nxt]))
                seen, at = np.unique(image_row[lo:hi], return_index=True)
                on = seen[np.argsort(at)]  # first-appearance order
                images, _ = pbcols.gather(img_data, img_starts[on], img_lens[on])
                body = data[label_at[lo] : label_at[hi]].tobytes()
                chunk = len(events[j])
                events[j].append(b"".join((header(b, chunk), body, images.tobytes(), trailer(b))))
                lo = hi
    out: list[list[bytes]] = [[] for _ in batch]
    for i, evs in zip(order, events, strict=True):
        out[i] = evs
    return out


#: What an outbox record of decisions starts with (:func:`pack_decisions`); anything else in
#: an outbox is a serialized ``LabelsPropagated`` event (written before issue #15's change).
#: ``MPD1`` records (int64 decision columns, before the eighteenth session) are still read.
DECISIONS_MAGIC = b"MPD2"
_DECISIONS_V1 = b"MPD1"
_HEAD = struct.Struct("<4sI")  # magic, JSON header length
#: A decision's columns in a record, in order: node, yes, answered, outcome code, masks.
_COLUMNS = ("node", "yes", "answered", "outcome", "count")


def _narrowest(values: np.ndarray) -> np.dtype:
    """The smallest unsigned little-endian type holding every one of ``values`` (>= 0)."""
    top = int(values.max()) if values.shape[0] else 0
    for dtype in ("u1", "<u2", "<u4"):
        if top <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype("<u8")


def pack_decisions(
    campaign: str, class_id: int, session: AnnotationSession, decisions: list[Decision]
) -> tuple[bytes, int, int]:
    """The terminal ``decisions`` of one class as one compact outbox record, and the masks
    they labelled accepted and rejected; ``b""`` when they labelled none.

    What a save writes under the class lock instead of the label events themselves (issue
    #15: a 1M-mask class decided ~500k masks in one call, ~1.5-2.7 us a label to build and
    serialize and ~50 bytes a label into Redis, all under the class lock): per decision its
    node, yes, answered, outcome and mask count, each column in the narrowest unsigned type
    its values fit (a sweep's one-mask decisions: 8 bytes, against 36 in int64 columns),
    per mask its row (int32) and label and source (one byte), numpy only.  The relay expands
    it (:func:`expand_decisions`) into the very events :func:`label_events` would have made
    (same event ids), off the calls' path."""
    rows, values, sources, which = session.decisions_labels(decisions)
    m = int(rows.shape[0])
    accepted = int((values == 1).sum())
    if not m:
        return b"", 0, 0
    table, outcomes = _decision_table(decisions)
    n = len(decisions)
    columns = [*table.T, np.bincount(which, minlength=n)]
    dtypes = [_narrowest(c) for c in columns]
    head = json.dumps(
        {
            "campaign": campaign,
            "class_id": class_id,
            "outcomes": outcomes,
            "n": n,
            "m": m,
            "dtypes": [d.str for d in dtypes],
        }
    ).encode()
    packed = (values.astype(np.uint8) & 1) | (sources.astype(np.uint8) << 1)
    record = b"".join(
        (
            _HEAD.pack(DECISIONS_MAGIC, len(head)),
            head,
            *(c.astype(d).tobytes() for c, d in zip(columns, dtypes, strict=True)),
            rows.astype("<i4").tobytes(),
            packed.tobytes(),
        )
    )
    return record, accepted, m - accepted


def _decision_table(decisions: list[Decision]) -> tuple[np.ndarray, list[str]]:
    """Decisions as rows (node, yes, answered, outcome code) int64, and the outcome names the
    codes index."""
    n = len(decisions)
    names = list(map(itemgetter(2), decisions))
    outcomes = sorted(set(names))
    code = {o: i for i, o in enumerate(outcomes)}
    # Column by column through C iterators: a list of tuples per decision cost ~0.4 us a
    # decision, 0.2 s for the ~470k a 1M-mask class's first sweep decides.
    table = np.empty((n, 4), "<i8")
    for j, values in enumerate(
        (
            map(itemgetter(1), decisions),
            map(itemgetter(3), decisions),
            map(itemgetter(4), decisions),
            map(code.__getitem__, names),
        )
    ):
        table[:, j] = np.fromiter(values, np.int64, n)
    return table, outcomes


def is_decisions(value: bytes) -> bool:
    """Whether an outbox value is a :func:`pack_decisions` record (of either format)."""
    return value[:4] in (DECISIONS_MAGIC, _DECISIONS_V1)


def unpack_decisions(
    record: bytes,
) -> tuple[str, int, tuple[np.ndarray, list[str]], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(campaign, class id, the decisions as :func:`_decision_table` gives them, rows,
    labels, sources, index of each mask's decision) of a :func:`pack_decisions` record;
    ``ValueError`` if it is not one."""
    if len(record) < _HEAD.size:
        raise ValueError("not a decisions record")
    magic, hlen = _HEAD.unpack_from(record)
    if magic not in (DECISIONS_MAGIC, _DECISIONS_V1):
        raise ValueError("not a decisions record")
    at = _HEAD.size
    try:
        head = json.loads(record[at : at + hlen])
        n, m, c = int(head["n"]), int(head["m"]), int(head["class_id"])
        if magic == _DECISIONS_V1:
            dtypes = [np.dtype("<i8")] * 4 + [np.dtype("<i4")]
        else:
            dtypes = [np.dtype(d) for d in head["dtypes"]]
    except (ValueError, KeyError, TypeError):
        raise ValueError("decisions record with a bad header") from None
    if len(dtypes) != len(_COLUMNS) or any(d.kind not in "iu" for d in dtypes):
        raise ValueError("decisions record with bad column types")
    at += hlen
    if n < 0 or m < 0 or at + sum(d.itemsize for d in dtypes) * n + 5 * m != len(record):
        raise ValueError("decisions record of the wrong length")
    if magic == _DECISIONS_V1:  # the table row by row, then the counts
        table = np.frombuffer(record, "<i8", 4 * n, at).reshape(n, 4).astype(np.int64)
        counts = np.frombuffer(record, "<i4", n, at + 32 * n).astype(np.int64)
        at += 36 * n
    else:  # column by column
        columns = []
        for d in dtypes:
            columns.append(np.frombuffer(record, d, n, at).astype(np.int64))
            at += d.itemsize * n
        table = np.stack(columns[:4], axis=1) if n else np.zeros((0, 4), np.int64)
        counts = columns[4]
    rows = np.frombuffer(record, "<i4", m, at).astype(np.int64)
    at += 4 * m
    packed = np.frombuffer(record, np.uint8, m, at)
    outcomes = [str(o) for o in head["outcomes"]]
    if n and not 0 <= int(table[:, 3].min()) <= int(table[:, 3].max()) < len(outcomes):
        raise ValueError("decisions record with an unknown outcome")
    if int(counts.sum()) != m or (n and int(counts.min()) < 0):
        raise ValueError("decisions record whose counts do not add up to its masks")
    which = np.repeat(np.arange(n), counts)
    values = (packed & 1).astype(np.int8)
    sources = (packed >> 1).astype(np.int8)
    return str(head["campaign"]), c, (table, outcomes), rows, values, sources, which


def expand_decisions(
    record: bytes,
    masks_of: Callable[[str, int], ClassMasks],
    *,
    max_bytes: int = topics.record_limit(),
) -> list[tuple[bytes, bytes]]:
    """The outbox entries (Kafka key, serialized ``LabelsPropagated``) of a
    :func:`pack_decisions` record: the same events, byte for byte, as :func:`label_entries` of
    its decisions.  ``masks_of(campaign, class_id)``: the class's mask table."""
    return expand_many([record], masks_of, max_bytes=max_bytes)[0]


#: Labels a call of the encoder takes at most (a relay's batch is cut in groups of records
#: below it): its working memory is a few copies of ~100 bytes a label.
EXPAND_GROUP_LABELS = 1 << 18


def expand_many(
    records: list[bytes],
    masks_of: Callable[[str, int], ClassMasks],
    *,
    max_bytes: int = topics.record_limit(),
) -> list[list[tuple[bytes, bytes]]]:
    """:func:`expand_decisions` of each of ``records``, encoded together (the encoder's cost
    a call is ~1 ms however many labels it takes; a save's record holds tens to
    hundreds of labels)."""
    out: list[list[tuple[bytes, bytes]]] = []
    group: list[_Decided] = []
    labels = 0

    def flush() -> None:
        for b, events in zip(group, _label_bytes(group, max_bytes), strict=True):
            key = topics.class_key(b.campaign, b.class_id)
            out.append([(key, ev) for ev in events])
        group.clear()

    for record in records:
        campaign, k, (decided, outcomes), rows, values, sources, which = unpack_decisions(record)
        masks = masks_of(campaign, k)
        group.append(_Decided(campaign, k, masks, decided, outcomes, rows, values, sources, which))
        labels += int(rows.shape[0])
        if labels >= EXPAND_GROUP_LABELS:
            flush()
            labels = 0
    flush()
    return out


def class_progress(
    class_id: int, session: AnnotationSession, masks: ClassMasks
) -> tuple[search_pb2.ClassProgress, bool]:
    """The progress of one class, and whether its session is done."""
    s = session
    p = s.progress()[class_id]
    msg = search_pb2.ClassProgress(
        class_id=class_id,
        class_name=masks.class_name,
        masks=p["masks"],
        accepted_masks=p["accepted_masks"],
        rejected_masks=p["rejected_masks"],
        undecided_masks=p["undecided_masks"],
        open_clusters=p["open_clusters"],
        questions=s.questions,
        clusters_accepted=s.outcomes.get("accept", 0),
        clusters_rejected=s.outcomes.get("reject", 0) + s.outcomes.get("auto_reject", 0),
    )
    return msg, s.done


def progress_response(
    classes: Mapping[int, tuple[search_pb2.ClassProgress, bool]],
) -> search_pb2.GetProgressResponse:
    """A campaign's progress from its classes' :func:`class_progress` (class id -> (progress,
    done)), in class order; ``done`` only when it has classes and every one is done."""
    resp = search_pb2.GetProgressResponse()
    for k in sorted(classes):
        resp.classes.append(classes[k][0])
    resp.questions = sum(c.questions for c in resp.classes)
    resp.done = bool(classes) and all(done for _, done in classes.values())
    return resp
