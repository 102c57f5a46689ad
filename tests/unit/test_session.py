import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import maskprop.session as session_module
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


def test_reuse_saves_questions_on_small_trees():
    """Summed over 12 trees (one tree whose root is decided at once saves nothing, another
    saves 85 %), reusing ancestors' answers asks about a third of the questions."""
    sel = Selection(0.0, 0.0)
    questions = {False: 0, True: 0}  # by reuse_answers
    for tree_seed in range(3, 9):
        trees, ious = make_trees([500], seed=tree_seed)
        for seed in (0, 1):
            for reuse in questions:
                params = AnnotationParams(reuse_answers=reuse)
                session = drive(AnnotationSession(trees, params, sel, seed=seed), ious, 15)
                questions[reuse] += session.questions
    assert questions[True] < 0.6 * questions[False]


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


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("strategy", ["heuristic", "bfs", "dfs", "dfs_heuristic"])
def test_deciding_terminal_children_with_their_split_changes_only_the_outbox_order(
    params, strategy, monkeypatch
):
    """A split's children that need neither a question nor a pop are decided with it; a
    session that pushes and pops them (as before) asks the same questions in the same order
    and ends with the same labels and outcome counts, only its outbox order differs."""
    trees, ious = make_trees([300, 120, 1], seed=6)

    def run(session):
        return (*_run_to_end(session, ious, 7), session)

    now = run(AnnotationSession(trees, params, Selection(0.2, 0.55), strategy=strategy, seed=3))

    def push_both(self, c, node):  # the old way: every child through the frontier
        kids = [(c, int(self._left[c][node])), (c, int(self._right[c][node]))]
        self._frontier.push_children((c, node), kids)

    monkeypatch.setattr(AnnotationSession, "_expand", push_both)
    old = run(AnnotationSession(trees, params, Selection(0.2, 0.55), strategy=strategy, seed=3))
    assert now[0] == old[0] and len(now[0]) > 0  # the same questions in the same order
    assert sorted(now[1]) == sorted(old[1]) and now[2].outcomes == old[2].outcomes
    assert now[2].outcomes.get("skip", 0) > 0  # some children were decided with their split
    for c in trees:
        np.testing.assert_array_equal(now[2].labels(c), old[2].labels(c))


def _run_to_end(session, ious, batch):
    asked, decided = [], []
    while not session.done:
        qs = session.lease(batch)
        asked += qs
        session.submit(answer(qs, ious))
        decided += session.pop_decisions()
    return asked, decided


@given(
    params=st.sampled_from(PARAMS),
    strategy=st.sampled_from(["heuristic", "bfs", "dfs", "dfs_heuristic"]),
    seed=st.integers(0, 10_000),
    thresholds=st.sampled_from([(0.0, 0.7), (0.2, 0.55), (0.3, 0.8), (0.5, 0.6)]),
    batch=st.sampled_from([1, 7, 64]),
)
@settings(max_examples=40, deadline=None)
def test_quiet_subtrees_decided_at_once_equal_visiting_them_node_by_node(
    params, strategy, seed, thresholds, batch
):
    """Subtrees that need no question are decided in one numpy pass: the same questions in
    the same order, the same decisions (only their outbox order differs), labels,
    provenance and counts as visiting every node through the frontier."""
    import maskprop.session as session_module

    trees, ious = make_trees([400, 90, 1], seed=seed)

    def run(min_leaves):
        old = session_module.QUIET_SWEEP_MIN_LEAVES
        session_module.QUIET_SWEEP_MIN_LEAVES = min_leaves
        try:
            s = AnnotationSession(
                trees, params, Selection(*thresholds), strategy=strategy, seed=seed
            )
        finally:
            session_module.QUIET_SWEEP_MIN_LEAVES = old
        swept = sum(int(q.sum()) for q in s._quiet.values())
        return (*_run_to_end(s, ious, batch), s, swept)

    fast, slow = run(2), run(10**9)
    assert slow[3] == 0 and fast[3] > 0  # quiet subtrees exist; the slow run visits them
    assert fast[0] == slow[0]  # the same questions in the same order
    assert sorted(fast[1]) == sorted(slow[1])
    assert fast[2].outcomes == slow[2].outcomes and fast[2].questions == slow[2].questions
    for c in trees:
        np.testing.assert_array_equal(fast[2].labels(c), slow[2].labels(c))
        for a, b in zip(fast[2].label_provenance(c), slow[2].label_provenance(c), strict=True):
            np.testing.assert_array_equal(a, b)


class _CountingMemo(dict):
    def __init__(self):
        super().__init__()
        self.hits = 0

    def get(self, key, default=None):
        if key in self:
            self.hits += 1
        return super().get(key, default)


@pytest.mark.parametrize("strategy", ["heuristic", "bfs"])
def test_sessions_sharing_a_sample_memo_ask_and_label_as_sessions_without_one(strategy):
    """The simulator's runs of one class share the samples they draw: every run (each rule,
    reuse on and off) asks the same questions in the same order and labels the same masks
    as it does on its own, and later runs take samples from the memo."""
    trees, ious = make_trees([600, 90, 1], seed=3)
    selection = Selection(0.2, 0.55)
    memo = _CountingMemo()
    for params in [*PARAMS, AnnotationParams(samples_per_cluster=5)]:  # N_s 15, then 5
        alone = AnnotationSession(trees, params, selection, strategy=strategy, seed=5)
        shared = AnnotationSession(
            trees, params, selection, strategy=strategy, seed=5, samples=memo
        )
        a, b = _run_to_end(alone, ious, 7), _run_to_end(shared, ious, 7)
        assert a == b and alone.outcomes == shared.outcomes
        for c in trees:
            np.testing.assert_array_equal(alone.labels(c), shared.labels(c))
    assert memo.hits > 100 and len(memo) > 100  # later runs took samples the first ones drew


def test_the_simulators_sample_memo_keeps_at_most_its_limit():
    from maskprop.simulate.classwise import _SampleMemo

    memo = _SampleMemo(limit=2)
    for node in range(5):
        memo[(0, 0, node, 3)] = np.arange(3, dtype=np.int32)
    assert sorted(memo) == [(0, 0, 0, 3), (0, 0, 1, 3)]


def test_a_quiet_subtree_holding_a_cluster_to_ask_is_visited_node_by_node(monkeypatch):
    """The leaf test that marks a subtree quiet is exact up to rounding (a mean of scores
    may round above K_pa); a subtree where some cluster is to be asked is not swept: that
    cluster is asked about, as when every node is visited."""
    import maskprop.session as session_module

    trees, ious = make_trees([400], seed=5)
    tree = trees[0]
    sel = Selection(0.0, 0.7)
    monkeypatch.setattr(session_module, "QUIET_SWEEP_MIN_LEAVES", 2)
    quiet = np.flatnonzero(
        session_module._quiet_subtrees(tree, sel.decide_many(tree.cluster_scores()))
    )
    top = int(quiet[np.argmax(tree.size[quiet])])
    inner = int(tree.left[top]) if tree.left[tree.left[top]] >= 0 else int(tree.right[top])

    def run(min_leaves):
        monkeypatch.setattr(session_module, "QUIET_SWEEP_MIN_LEAVES", min_leaves)
        s = AnnotationSession(trees, AnnotationParams(), sel, seed=1)
        s._priors[0][inner] = 2  # PRIOR_ASK: its score "rounded" above K_pa
        return (*_run_to_end(s, ious, 7), s)

    (asked, decided, s), (asked_slow, decided_slow, s_slow) = run(2), run(10**9)
    assert tree.left[inner] >= 0 and tree.size[top] >= 4
    assert any(q.node == inner for q in asked)  # asked about, not swept
    assert asked == asked_slow and sorted(decided) == sorted(decided_slow)
    np.testing.assert_array_equal(s.labels(0), s_slow.labels(0))


def _version(snapshot):
    import json
    import struct

    (n,) = struct.unpack_from("<I", snapshot, 4)
    return json.loads(snapshot[8 : 8 + n])["version"]


@pytest.mark.parametrize("version", [3, 4])
def test_an_older_snapshot_goes_on_as_its_writer_did(version):
    """Snapshots written before the quiet sweep (version 3) or before ``sample_order``
    (version 4) restore into a session that visits quiet subtrees node by node (3) and draws
    samples with a seeded numpy generator (3, 4), as the process that wrote them did: a
    replica catching up on an older replica's log reaches the same state, byte for byte."""
    trees, ious = make_trees([400, 90], seed=8)
    sel, params = Selection(0.0, 0.7), AnnotationParams()
    before = AnnotationSession(trees, params, sel, seed=2, _version=version)
    base = before.rebase()
    assert _version(base) == version
    drive(before, ious, 7, steps=3)
    restored = AnnotationSession.restore(base, trees, log=[before.take_log()])
    assert restored.snapshot() == before.snapshot() and restored._version == version
    assert _run_to_end(restored, ious, 7) == _run_to_end(before, ious, 7)
    assert restored.snapshot() == before.snapshot()

    now = AnnotationSession(trees, params, sel, seed=2)
    assert _version(now.snapshot()) == session_module.SNAPSHOT_VERSION == 5
    assert AnnotationSession.restore(now.snapshot(), trees)._version == 5


def test_version_4_and_5_sessions_differ_only_in_which_masks_they_sample():
    """The sampler is the only difference between versions 4 and 5: with every answer "yes"
    (so any sample gives the same verdict) they ask about the same clusters and label every
    mask alike; the masks asked differ."""
    trees, _ = make_trees([300, 120], seed=4)
    sel, params = Selection(0.0, 0.7), AnnotationParams()
    yes = {c: np.ones(t.n_leaves) for c, t in trees.items()}
    runs = {}
    for version in (4, 5):
        s = AnnotationSession(trees, params, sel, seed=3, _version=version)
        asked, _ = _run_to_end(s, yes, 7)
        runs[version] = (asked, s)
    (q4, s4), (q5, s5) = runs[4], runs[5]
    assert [(q.class_id, q.node) for q in q4] == [(q.class_id, q.node) for q in q5]
    assert [q.mask for q in q4] != [q.mask for q in q5]
    for c in trees:
        np.testing.assert_array_equal(s4.labels(c), s5.labels(c))


def leased_and_answered(session, ious, batch, cap=None):
    """Lease and answer ``batch`` at a time until done or ``cap`` questions were handed out
    (a budget); returns the questions handed out."""
    leased = 0
    while not session.done and (cap is None or leased < cap):
        qs = session.lease(batch if cap is None else min(batch, cap - leased))
        if not qs:
            break
        leased += len(qs)
        session.submit(answer(qs, ious))
    return leased


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_a_budget_of_exactly_the_questions_needed_labels_what_a_free_run_labels(params, batch):
    """Asking ends at the budget; what needs no question is still decided, so the spent
    budget leaves no mask undecided that a run with budget to spare decides."""
    trees, ious = make_trees([300, 120, 1], seed=2)
    free = AnnotationSession(trees, params, Selection(0.2, 0.55), seed=3)
    need = leased_and_answered(free, ious, batch)
    assert free.done and need > 0
    capped = AnnotationSession(trees, params, Selection(0.2, 0.55), seed=3)
    assert leased_and_answered(capped, ious, batch, cap=need) == need
    capped.decide_without_asking()
    for c in trees:
        np.testing.assert_array_equal(capped.labels(c), free.labels(c))
    assert capped.done
    assert capped.decide_without_asking() == 0  # nothing left: nothing done, nothing logged


def test_decide_without_asking_opens_what_needs_questions_and_asks_nothing():
    """With questions still needed, it hands none out: those clusters wait, open, and a
    later lease (a budget revised upwards) serves them."""
    trees, ious = make_trees([300], seed=5)
    params = AnnotationParams()
    session = AnnotationSession(trees, params, Selection(0.2, 0.55), seed=3)
    session.submit(answer(session.lease(10), ious))
    before = session.snapshot()
    assert session.decide_without_asking() > 0
    assert session.snapshot() != before
    assert not session.done and (session.labels(0) < 0).any()
    drive(session, ious, 7)  # a revised budget: the rest is asked and decided
    assert session.done and (session.labels(0) >= 0).all()


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("questions", [1, 30, 1000])
def test_prepare_asks_nothing_and_changes_no_label(params, questions):
    """A session that opened clusters ahead of its first lease (a service, as a tree
    arrives) hands out the same first questions as one that did not, and ends with the
    same labels, whatever the lease sizes after."""
    trees, ious = make_trees([300, 120, 1], seed=4)
    plain = AnnotationSession(trees, params, Selection(0.2, 0.55), seed=3)
    ready = AnnotationSession(trees, params, Selection(0.2, 0.55), seed=3)
    assert ready.prepare(questions) > 0
    assert ready.questions == 0 and ready.prepare(0) == 0  # asked nothing; 0: nothing to do
    first = ready.lease(questions)
    assert first == plain.lease(questions)
    ready.submit(answer(first, ious))
    plain.submit(answer(first, ious))
    drive(plain, ious, 7)
    drive(ready, ious, 5)
    for c in trees:
        np.testing.assert_array_equal(ready.labels(c), plain.labels(c))
    assert ready.questions == plain.questions
    with pytest.raises(MaskpropError):
        ready.prepare(-1)


def drive_mixed(session, ious, rng, steps):
    """Lease, answer some, expire some, pop decisions: every call the log records."""
    held: list[Question] = []
    for _ in range(steps):
        if session.done:
            break
        held += session.lease(int(rng.integers(1, 9)), max_new_clusters=int(rng.integers(0, 3)))
        rng.shuffle(held)
        k = int(rng.integers(0, len(held) + 1))
        session.submit(answer(held[:k], ious))
        held = held[k:]
        if held and rng.random() < 0.2:
            session.expire(held[:1])
            held = held[1:]
        if rng.random() < 0.5:
            session.pop_decisions()
        if rng.random() < 0.1:  # asking ended for a while (a spent budget, then revised)
            session.decide_without_asking()
        if rng.random() < 0.1:  # a service opening clusters ahead of its leases
            session.prepare(int(rng.integers(0, 20)))
    return held


@given(
    params=st.sampled_from(PARAMS),
    before_base=st.integers(min_value=0, max_value=30),
    cuts=st.lists(st.integers(min_value=0, max_value=15), min_size=0, max_size=6),
    seed=st.integers(min_value=0, max_value=1000),
)
@settings(max_examples=40, deadline=None)
def test_restore_of_base_and_log_equals_the_live_session(params, before_base, cuts, seed):
    trees, ious = make_trees([150, 60], seed=7)
    rng = np.random.default_rng(seed)
    live = AnnotationSession(trees, params, Selection(0.15, 0.5), seed=11)
    held = drive_mixed(live, ious, rng, before_base)
    base = live.rebase()
    chunks = []
    for steps in cuts:  # a save after every stretch of calls, at any point
        live.submit(answer(held, ious))
        held = drive_mixed(live, ious, rng, steps)
        chunks.append(live.take_log())
        restored = AnnotationSession.restore(base, trees, log=chunks)
        assert restored.snapshot() == live.snapshot()  # the whole state, byte for byte
        assert restored.pop_decisions() == live.pop_decisions()
        # Both continue identically (the unanswered leases included) ...
        restored.submit(answer(held, ious))
        live.submit(answer(held, ious))
        chunks.append(live.take_log())
        assert restored.take_log() == chunks[-1]  # ... and log the same chunk
        held = []
    live.submit(answer(held, ious))
    drive(live, ious, 5)
    chunks.append(live.take_log())
    assert AnnotationSession.restore(base, trees, log=chunks).snapshot() == live.snapshot()


def test_log_bytes_grow_with_answers_and_rebase_compacts():
    trees, ious = make_trees([400], seed=3)
    s = AnnotationSession(trees, AnnotationParams(), Selection(0.0, 0.0), seed=0)
    assert s.needs_rebase()  # no base yet
    with pytest.raises(MaskpropError, match="no base"):
        s.take_log()
    base = s.rebase()
    assert s.take_log() == b""  # nothing changed: nothing to write
    qs = s.lease(10)
    s.submit(answer(qs, ious))
    chunk = s.take_log()
    # A 20-byte chunk head, one lease (9 bytes), one batch of answers (5 + 13 a answer).
    assert len(chunk) == 16 + 9 + 5 + 13 * len(qs)
    assert s.log_bytes == len(chunk)
    assert not s.needs_rebase()
    assert s.needs_rebase(ratio=len(chunk) / len(base) / 2) == (len(chunk) >= 64 * 1024)
    again = s.rebase()
    assert s.log_bytes == 0
    assert AnnotationSession.restore(again, trees).snapshot() == again
    assert AnnotationSession.restore(again, trees).needs_rebase()  # no log given: no base
    with pytest.raises(MaskpropError, match="another base"):
        AnnotationSession.restore(base, trees, log=[_one_more_chunk(s, ious)])


def _one_more_chunk(session, ious):
    session.submit(answer(session.lease(3), ious))
    return session.take_log()


def test_a_bad_log_is_a_clear_error():
    trees, ious = make_trees([120], seed=4)
    s = AnnotationSession(trees, AnnotationParams(), Selection(0.0, 0.0), seed=0)
    base = s.rebase()
    first = _one_more_chunk(s, ious)
    second = _one_more_chunk(s, ious)
    with pytest.raises(MaskpropError, match="out of order"):
        AnnotationSession.restore(base, trees, log=[second])
    with pytest.raises(MaskpropError, match="corrupt"):
        AnnotationSession.restore(base, trees, log=[first[:-3]])
    with pytest.raises(MaskpropError, match="corrupt"):
        AnnotationSession.restore(base, trees, log=[first + b"Z"])
    with pytest.raises(MaskpropError, match=r"log format b'MPS3'"):
        AnnotationSession.restore(base, trees, log=[base])
    # Empty chunks (saves with nothing to write) are skipped.
    restored = AnnotationSession.restore(base, trees, log=[first, b"", second])
    assert restored.snapshot() == s.snapshot()


def test_a_partly_applied_batch_logs_only_what_was_applied():
    trees, ious = make_trees([120], seed=4)
    s = AnnotationSession(trees, AnnotationParams(), Selection(0.0, 0.0), seed=0)
    base = s.rebase()
    qs = s.lease(4)
    bad = Answer(0, qs[0].node, 10**6, True)
    with pytest.raises(MaskpropError, match="no open question"):
        s.submit([*answer(qs[:2], ious), bad, *answer(qs[2:], ious)])
    restored = AnnotationSession.restore(base, trees, log=[s.take_log()])
    assert restored.questions == s.questions == 2
    assert restored.snapshot() == s.snapshot()


def test_answer_lookup_by_block_matches_a_plain_scan():
    """Inherited answers of every cluster (big ones through the block index, small ones as
    Python lists) equal a scan of the cluster."""
    trees, ious = make_trees([6000], seed=13)
    s = AnnotationSession(trees, AnnotationParams(reuse_answers=True), Selection(0.0, 0.0), seed=1)
    drive(s, ious, 20, steps=150)
    tree = trees[0]
    codes = s._answer_codes[0]
    for node in range(tree.n_nodes):
        masks = tree.leaves(node)
        want = {int(m): bool(codes[m] == 1) for m in masks if codes[m] >= 0}
        got = s._inherited(0, node)
        assert got == want
        assert list(got) == [int(m) for m in masks if codes[m] >= 0]  # depth-first order


def test_a_cached_session_catches_up_with_another_process_log():
    """Two replicas over one base: the one that did not write the chunks applies them."""
    trees, ious = make_trees([200, 80], seed=6)
    writer = AnnotationSession(trees, AnnotationParams(), Selection(0.1, 0.5), seed=2)
    base = writer.rebase()
    cached = AnnotationSession.restore(base, trees, log=[])
    chunks = [_one_more_chunk(writer, ious) for _ in range(4)]
    cached.apply_log(chunks[:2])
    assert cached.log_seq == 2
    cached.apply_log(chunks[2:])
    assert cached.snapshot() == writer.snapshot()
    with pytest.raises(MaskpropError, match="out of order"):
        cached.apply_log(chunks[3:])
    cached.submit(answer(cached.lease(2), ious))
    with pytest.raises(MaskpropError, match="not yet saved"):
        cached.apply_log([_one_more_chunk(writer, ious)])
    assert writer.needs_rebase(max_log_bytes=writer.log_bytes)


def test_a_lease_beyond_int32_is_logged_exactly():
    """The log packs lease bounds as int32: a huge bound must neither raise after changing the
    state nor let restore(base + log) drift from the live session."""
    rng = np.random.default_rng(3)
    f = rng.normal(size=(60, 4))
    tree = build_tree(f, rng.uniform(size=60))
    s = AnnotationSession({0: tree}, AnnotationParams(), Selection(0.0, 0.0), seed=1)
    base = s.rebase()
    qs = s.lease(2**31, max_new_clusters=2**40)
    assert qs
    again = AnnotationSession.restore(base, {0: tree}, log=[s.take_log()])
    assert again.snapshot() == s.snapshot()
