import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maskprop.errors import MaskpropError
from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer, LabelSource, Question
from maskprop.tree import build_tree


def make_trees(sizes, seed):
    rng = np.random.default_rng(seed)
    trees, ious = {}, {}
    for c, n in enumerate(sizes):
        iou = rng.uniform(size=n)
        score = np.clip(iou + rng.normal(0, 0.2, n), 0, 1)
        trees[c] = build_tree(rng.normal(size=(n, 4)) + iou[:, None], score)
        ious[c] = iou
    return trees, ious


def answer(qs, ious):
    return [Answer(q.class_id, q.node, q.mask, bool(ious[q.class_id][q.mask] >= 0.75)) for q in qs]


def drive(session, ious, batch, steps=None):
    step = 0
    while not session.done and (steps is None or step < steps):
        session.submit(answer(session.lease(batch), ious))
        step += 1
    return session


PARAMS = [
    AnnotationParams(reuse_answers=False),
    AnnotationParams(reuse_answers=True),
    AnnotationParams(sequential="curtail", sequential_batch=2),
    AnnotationParams(sequential="beta", reuse_answers=True, reject_action="split"),
]


@pytest.mark.parametrize("params", PARAMS)
def test_propagation_labels_every_mask_exactly_once(params):
    trees, ious = make_trees([300, 120, 1], seed=1)
    session = AnnotationSession(trees, params, Selection(0.2, 0.55), seed=3)
    seen = {c: np.zeros(t.n_leaves, np.int64) for c, t in trees.items()}
    while not session.done:
        session.submit(answer(session.lease(7), ious))
        for d in session.pop_decisions():
            masks, _labels, _ = session.decision_labels(d)
            seen[d.class_id][masks] += 1
    for c in trees:
        np.testing.assert_array_equal(seen[c], 1)  # none missing, none twice
        assert (session.labels(c) >= 0).all()


def test_decisions_labels_is_decision_labels_of_each_concatenated():
    trees, ious = make_trees([300], seed=12)
    session = AnnotationSession(trees, AnnotationParams(), Selection(0.2, 0.55), seed=3)
    checked = 0
    while not session.done:
        session.submit(answer(session.lease(11), ious))
        decisions = session.pop_decisions()  # splits included: they label nothing
        masks, labels, sources, which = session.decisions_labels(decisions)
        parts = [session.decision_labels(d) for d in decisions]
        for got, i in zip((masks, labels, sources), range(3), strict=True):
            want = np.concatenate([p[i] for p in parts]) if parts else got[:0]
            np.testing.assert_array_equal(got, want)
        want_which = [i for i, p in enumerate(parts) for _ in range(p[0].shape[0])]
        np.testing.assert_array_equal(which, want_which)
        checked += masks.shape[0]
    assert checked == 300


def test_label_reuse_never_asks_a_mask_twice_and_own_answers_win():
    trees, ious = make_trees([400], seed=2)
    session = AnnotationSession(
        trees, AnnotationParams(reuse_answers=True), Selection(0.0, 0.0), seed=0
    )
    asked = []
    while not session.done:
        qs = session.lease(15)
        asked += [q.mask for q in qs]
        session.submit(answer(qs, ious))
    assert len(asked) == len(set(asked))
    _, source = session.label_provenance(0)
    verified = source == LabelSource.VERIFIED
    np.testing.assert_array_equal(session.labels(0)[verified], ious[0][verified] >= 0.75)
    assert verified.sum() == len(asked)


def test_reuse_saves_questions_at_the_same_decisions_on_small_trees():
    trees, ious = make_trees([500], seed=5)
    sel = Selection(0.0, 0.0)
    plain = drive(
        AnnotationSession(trees, AnnotationParams(reuse_answers=False), sel, seed=0), ious, 15
    )
    reuse = drive(
        AnnotationSession(trees, AnnotationParams(reuse_answers=True), sel, seed=0), ious, 15
    )
    assert reuse.questions < 0.6 * plain.questions


@given(
    params=st.sampled_from(PARAMS),
    stop_after=st.integers(min_value=0, max_value=60),
    batch=st.integers(min_value=1, max_value=20),
)
@settings(max_examples=30, deadline=None)
def test_snapshot_restore_round_trips_and_continues_identically(params, stop_after, batch):
    trees, ious = make_trees([150, 60], seed=7)
    sel = Selection(0.15, 0.5)
    straight = drive(AnnotationSession(trees, params, sel, seed=11), ious, batch)

    half = drive(AnnotationSession(trees, params, sel, seed=11), ious, batch, steps=stop_after)
    # A question leased but unanswered when the service died must survive the restart too.
    pending = half.lease(batch) if not half.done else []
    blob = half.snapshot()
    restored = AnnotationSession.restore(blob, trees)
    assert restored.snapshot() == blob  # byte-identical
    restored.submit(answer(pending, ious))
    drive(restored, ious, batch)
    assert restored.questions == straight.questions
    for c in trees:
        np.testing.assert_array_equal(restored.labels(c), straight.labels(c))


def test_expired_questions_are_leased_again():
    trees, _ious = make_trees([100], seed=8)
    s = AnnotationSession(trees, AnnotationParams(), Selection(0.0, 0.0), seed=0)
    first = s.lease(5)
    s.expire(first[:2])
    again = s.lease(5)
    assert {q.mask for q in first[:2]} <= {q.mask for q in again}


def test_bad_answers_and_snapshots_are_clear_errors():
    trees, ious = make_trees([50], seed=9)
    s = AnnotationSession(trees, AnnotationParams(), Selection(0.0, 0.0), seed=0)
    with pytest.raises(MaskpropError, match="no open question"):
        s.submit([Answer(0, 0, 0, True)])
    qs = s.lease(3)
    s.submit(answer(qs, ious))
    s.submit(answer(qs, ious))  # a replayed answer has no second effect
    assert s.questions == 3
    with pytest.raises(MaskpropError):
        AnnotationSession.restore(b"garbage", trees)
    other, _ = make_trees([50], seed=10)
    with pytest.raises(MaskpropError, match="tree differs"):
        AnnotationSession.restore(s.snapshot(), other)
    assert isinstance(qs[0], Question)


def test_a_snapshot_of_another_format_is_refused_naming_the_format():
    """Only the current format restores; format 2 (``b"MPS1"`` + zlib(JSON)) no longer does."""
    import json
    import zlib

    trees, _ious = make_trees([50], seed=9)
    old = b"MPS1" + zlib.compress(json.dumps({"version": 2}).encode())
    with pytest.raises(MaskpropError, match=r"unsupported session snapshot format b'MPS1'"):
        AnnotationSession.restore(old, trees)
    with pytest.raises(MaskpropError, match=r"format b'garb'.*b'MPS3'"):
        AnnotationSession.restore(b"garbage", trees)


def test_a_corrupt_snapshot_is_a_clear_error():
    trees, ious = make_trees([50], seed=9)
    s = AnnotationSession(trees, AnnotationParams(), Selection(0.0, 0.0), seed=0)
    s.submit(answer(s.lease(4), ious))
    blob = s.snapshot()
    for bad in (blob[:-3], blob[:6], blob + b"\x00", blob[:9] + b"\xff" + blob[10:]):
        with pytest.raises(MaskpropError, match="corrupt"):
            AnnotationSession.restore(bad, trees)


@pytest.mark.parametrize("params", PARAMS)
def test_has_questions_false_means_lease_would_do_nothing(params):
    """A service skips a class without locking it when ``has_questions()`` is False."""
    trees, ious = make_trees([120, 40], seed=4)
    session = AnnotationSession(trees, params, Selection(0.2, 0.55), seed=5)
    rng = np.random.default_rng(0)
    held: list[Question] = []
    checked = 0
    while not session.done:
        if not session.has_questions():
            before = session.snapshot()
            assert session.lease(5) == []
            assert session.snapshot() == before
            checked += 1
        else:
            held += session.lease(int(rng.integers(1, 9)))
        # Answer some of the questions out, keeping others leased for a while.
        rng.shuffle(held)
        k = int(rng.integers(0, len(held) + 1))
        session.submit(answer(held[:k], ious))
        held = held[k:]
    assert checked
