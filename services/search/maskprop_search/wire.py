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
from pathlib import Path

import numpy as np

from maskprop.data.masks import MaskTable
from maskprop.session import AnnotationSession, Decision, LabelSource, Question
from maskprop.tree import Tree
from maskprop_runtime import topics
from maskprop_runtime.pb.maskprop.common.v1 import common_pb2
from maskprop_runtime.pb.maskprop.search.v1 import search_pb2
from maskprop_runtime.treestore import TreeStore, check_name

log = logging.getLogger(__name__)

#: Upper bounds of the serialized bytes (protobuf tags and varints at their widest) of a
#: ``PropagatedLabel`` without its strings and RLE counts, of an ``ImageInfo`` without its
#: strings, and of a ``LabelsPropagated`` header without its strings: an event's size is
#: bounded from string lengths alone, without serializing anything twice.
LABEL_BYTES = 96
IMAGE_BYTES = 32
HEADER_BYTES = 96


class BadRequest(ValueError):
    """A caller error, mapped to INVALID_ARGUMENT by the gRPC layer."""


@dataclass(frozen=True)
class ClassMasks:
    """What a class's questions and label events say about its masks: the mask table in tree
    leaf order, the class name, and ``images``: image id -> (width, height, file name) as plain
    Python values (questions and label events read them per mask; numpy scalar indexing cost
    ~2 us an image)."""

    table: MaskTable
    class_name: str
    images: dict[str, tuple[int, int, str]]

    @classmethod
    def of(cls, table: MaskTable, class_name: str) -> ClassMasks:
        images = {
            str(i): (w, h, str(f))
            for i, w, h, f in zip(
                table.img_ids.tolist(),
                table.img_w.tolist(),
                table.img_h.tolist(),
                table.img_files.tolist(),
                strict=True,
            )
        }
        return cls(table, class_name, images)


def load_class(path: Path) -> tuple[Tree, ClassMasks]:
    """A class's tree and masks from the clusterer's tree file (``OSError`` if unreadable)."""
    tree, table, class_name = TreeStore.load_tree(path)
    return tree, ClassMasks.of(table, class_name)


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
    image_ids = t.image_ids[rows].tolist()
    out = []
    for q, mask_id, image_id, h, w, lo, hi in zip(
        qs,
        t.mask_ids[rows].tolist(),
        image_ids,
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
                image_file=masks.images[image_id][2],
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
    """The labels of ``decisions`` (terminal ones, of class ``class_id``) in events of at most
    ``max_bytes`` serialized bytes (:func:`maskprop_runtime.topics.record_limit` of the
    labels topic's ``max.message.bytes``).  Event ids derive from the first decision's node
    and the chunk number, so the same decisions always make the same events (consumers
    dedupe by id; the sink's ledger by ``mask_index``).

    Only accepted labels carry their RLE: rejected, auto-rejected and skipped masks are
    negatives the dataset keeps for provenance only (a 1M-mask class rejected at its root was
    ~350 MB of RLEs nobody exports).  An accepted label whose RLE alone would not fit is put
    alone in an event without its RLE and with ``omitted_rle_bytes`` set: the sink dead-letters
    that event with the reason, and nothing else waits behind it.

    Sizes are upper bounds from string lengths (``LABEL_BYTES`` and co.), chunked greedily in
    label order; built column-wise (numpy ``tolist`` per column, then ``labels.add`` with plain
    Python values): a sweep labels thousands of masks a call, and a message built from numpy
    scalars and nested constructors cost ~13 us a label, this ~1.5 us."""
    rows, values, verified_or_not, which_a = session.decisions_labels(decisions)
    return _label_events(
        campaign, class_id, masks, decisions, rows, values, verified_or_not, which_a, max_bytes
    )


def _label_events(
    campaign: str,
    class_id: int,
    masks: ClassMasks,
    decisions: list[Decision],
    rows: np.ndarray,
    values: np.ndarray,
    verified_or_not: np.ndarray,
    which_a: np.ndarray,
    max_bytes: int,
) -> list[search_pb2.LabelsPropagated]:
    """:func:`label_events` of the labels :meth:`AnnotationSession.decisions_labels` gave."""
    table = masks.table
    if not rows.shape[0]:
        return []
    accepted = (values == 1).tolist()
    sources = np.where(
        verified_or_not == LabelSource.VERIFIED,
        search_pb2.LABEL_SOURCE_VERIFIED,
        search_pb2.LABEL_SOURCE_PROPAGATED,
    ).tolist()
    which = which_a.tolist()
    index = rows.tolist()
    mask_ids = table.mask_ids[rows].tolist()
    image_ids = table.image_ids[rows].tolist()
    heights = table.rle_h[rows].tolist()
    widths = table.rle_w[rows].tolist()
    scores = table.scores[rows].tolist()
    starts = table.rle_offsets[rows].tolist()
    ends = table.rle_offsets[rows + 1].tolist()
    blob = table.rle_blob
    n_masks = int(table.mask_ids.shape[0])
    first = decisions[0].node
    header = HEADER_BYTES + 2 * len(campaign) + len(masks.class_name.encode())
    chunks = _chunks(
        header,
        max_bytes,
        [
            LABEL_BYTES
            + len(m.encode())
            + len(im.encode())
            + len(decisions[w].outcome)
            + ((hi - lo) if a else 0)
            for m, im, w, a, lo, hi in zip(
                mask_ids, image_ids, which, accepted, starts, ends, strict=True
            )
        ],
        image_ids,
        {  # once an image, not once a label (it was 15 % of search's time at a 1M class)
            im: IMAGE_BYTES + len(im.encode()) + len(masks.images[im][2].encode())
            for im in dict.fromkeys(image_ids)
        },
    )
    # What labels of one decision share (its provenance, accepted, source) is set once, in a
    # template each label copies: one C call instead of ten keyword arguments parsed a label
    # (label_entries 1.67 -> 1.25 us a label; the serialized bytes are the same).
    templates: dict[tuple[int, bool, int], search_pb2.PropagatedLabel] = {}
    out = []
    for chunk, (lo, hi, oversized) in enumerate(chunks):
        ev = search_pb2.LabelsPropagated(
            event_id=f"labels.{campaign}.{class_id}.{first}.{chunk}",
            campaign=campaign,
            class_id=class_id,
            class_name=masks.class_name,
            class_masks=n_masks,
        )
        add = ev.labels.add
        for i in range(lo, hi):
            shared = (which[i], accepted[i], sources[i])
            template = templates.get(shared)
            if template is None:
                d = decisions[which[i]]
                template = templates[shared] = search_pb2.PropagatedLabel(
                    accepted=accepted[i],
                    source=sources[i],
                    node=d.node,
                    outcome=d.outcome,
                    yes=d.yes,
                    answered=d.answered,
                )
            lab = add()
            lab.CopyFrom(template)
            lab.mask_id = mask_ids[i]
            lab.image_id = image_ids[i]
            lab.score = scores[i]
            lab.mask_index = index[i]
            if oversized:
                lab.omitted_rle_bytes = ends[i] - starts[i]
                log.error(
                    "an accepted mask's RLE cannot fit in a label event; sent without it",
                    extra={
                        "campaign": campaign,
                        "class_id": class_id,
                        "mask_id": mask_ids[i],
                        "rle_bytes": ends[i] - starts[i],
                        "max_bytes": max_bytes,
                    },
                )
            elif accepted[i]:
                rle = lab.rle
                rle.height = heights[i]
                rle.width = widths[i]
                rle.counts = blob[starts[i] : ends[i]]
        for image_id in dict.fromkeys(image_ids[lo:hi]):  # first appearance order
            width, height, file_name = masks.images[image_id]
            ev.images.add(image_id=image_id, width=width, height=height, file_name=file_name)
        out.append(ev)
    return out


def _chunks(
    header: int,
    max_bytes: int,
    label_bytes: list[int],
    image_ids: list[str],
    image_bytes: Mapping[str, int],
) -> list[tuple[int, int, bool]]:
    """Greedy cut of labels ``0..n-1`` (in order) into ``(lo, hi, oversized)`` runs whose
    bound ``header + sum(label_bytes) + image_bytes of each distinct image`` stays within
    ``max_bytes``.  A label that does not fit even alone is a run of its own with
    ``oversized=True`` (it must travel without its RLE)."""
    out: list[tuple[int, int, bool]] = []
    lo, size = 0, header
    seen: set[str] = set()
    for i, (b, im) in enumerate(zip(label_bytes, image_ids, strict=True)):
        add = b + (0 if im in seen else image_bytes[im])
        if size + add > max_bytes and i > lo:
            out.append((lo, i, False))
            lo, size, seen = i, header, set()
            add = b + image_bytes[im]
        if size + add > max_bytes:  # alone and still too large
            out.append((i, i + 1, True))
            lo, size, seen = i + 1, header, set()
            continue
        size += add
        seen.add(im)
    if lo < len(label_bytes):
        out.append((lo, len(label_bytes), False))
    return out


def label_entries(
    campaign: str,
    class_id: int,
    masks: ClassMasks,
    session: AnnotationSession,
    decisions: list[Decision],
    *,
    max_bytes: int = topics.record_limit(),
) -> list[tuple[bytes, bytes]]:
    """:func:`label_events` as outbox entries: (Kafka key of the class, serialized event)."""
    if not decisions:
        return []
    key = topics.class_key(campaign, class_id)
    return [
        (key, ev.SerializeToString())
        for ev in label_events(campaign, class_id, masks, session, decisions, max_bytes=max_bytes)
    ]


#: What an outbox record of decisions starts with (:func:`pack_decisions`); anything else in
#: an outbox is a serialized ``LabelsPropagated`` event (written before issue #15's change).
DECISIONS_MAGIC = b"MPD1"
_HEAD = struct.Struct("<4sI")  # magic, JSON header length


def pack_decisions(
    campaign: str, class_id: int, session: AnnotationSession, decisions: list[Decision]
) -> tuple[bytes, int, int]:
    """The terminal ``decisions`` of one class as one compact outbox record, and the masks
    they labelled accepted and rejected; ``b""`` when they labelled none.

    What a save writes under the class lock instead of the label events themselves (issue
    #15: a 1M-mask class decided ~500k masks in one call, ~1.5-2.7 us a label to build and
    serialize and ~50 bytes a label into Redis, all under the class lock): per decision its
    node, outcome, yes, answered and mask count, per mask its row (int32) and label and source
    (one byte): ~5 bytes a mask, numpy only.  The relay expands it (:func:`expand_decisions`)
    into the very events :func:`label_events` would have made (same event ids), off the
    calls' path."""
    rows, values, sources, which = session.decisions_labels(decisions)
    m = int(rows.shape[0])
    accepted = int((values == 1).sum())
    if not m:
        return b"", 0, 0
    outcomes = sorted({d.outcome for d in decisions})
    code = {o: i for i, o in enumerate(outcomes)}
    n = len(decisions)
    head = json.dumps(
        {"campaign": campaign, "class_id": class_id, "outcomes": outcomes, "n": n, "m": m}
    ).encode()
    table = np.array(
        [(d.node, d.yes, d.answered, code[d.outcome]) for d in decisions], dtype="<i8"
    ).reshape(n, 4)
    counts = np.bincount(which, minlength=n).astype("<i4")
    packed = (values.astype(np.uint8) & 1) | (sources.astype(np.uint8) << 1)
    record = b"".join(
        (
            _HEAD.pack(DECISIONS_MAGIC, len(head)),
            head,
            table.tobytes(),
            counts.tobytes(),
            rows.astype("<i4").tobytes(),
            packed.tobytes(),
        )
    )
    return record, accepted, m - accepted


def is_decisions(value: bytes) -> bool:
    """Whether an outbox value is a :func:`pack_decisions` record."""
    return value[:4] == DECISIONS_MAGIC


def unpack_decisions(
    record: bytes,
) -> tuple[str, int, list[Decision], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(campaign, class id, decisions, rows, labels, sources, index of each mask's decision)
    of a :func:`pack_decisions` record (``new_answers`` of the decisions is not kept: 0)."""
    magic, hlen = _HEAD.unpack_from(record)
    if magic != DECISIONS_MAGIC:
        raise ValueError("not a decisions record")
    at = _HEAD.size
    head = json.loads(record[at : at + hlen])
    at += hlen
    n, m, c = int(head["n"]), int(head["m"]), int(head["class_id"])
    table = np.frombuffer(record, "<i8", 4 * n, at).reshape(n, 4)
    at += 32 * n
    counts = np.frombuffer(record, "<i4", n, at)
    at += 4 * n
    rows = np.frombuffer(record, "<i4", m, at).astype(np.int64)
    at += 4 * m
    packed = np.frombuffer(record, np.uint8, m, at)
    if at + m != len(record):
        raise ValueError("decisions record of the wrong length")
    outcomes = head["outcomes"]
    decisions = [
        Decision(c, node, outcomes[o], yes, answered, 0)
        for node, yes, answered, o in table.tolist()
    ]
    which = np.repeat(np.arange(n), counts)
    values = (packed & 1).astype(np.int8)
    sources = (packed >> 1).astype(np.int8)
    return str(head["campaign"]), c, decisions, rows, values, sources, which


def expand_decisions(
    record: bytes,
    masks_of: Callable[[str, int], ClassMasks],
    *,
    max_bytes: int = topics.record_limit(),
) -> list[tuple[bytes, bytes]]:
    """The outbox entries (Kafka key, serialized ``LabelsPropagated``) of a
    :func:`pack_decisions` record: the same events, byte for byte, as :func:`label_entries` of
    its decisions.  ``masks_of(campaign, class_id)``: the class's mask table."""
    campaign, k, decisions, rows, values, sources, which = unpack_decisions(record)
    events = _label_events(
        campaign, k, masks_of(campaign, k), decisions, rows, values, sources, which, max_bytes
    )
    key = topics.class_key(campaign, k)
    return [(key, ev.SerializeToString()) for ev in events]


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
