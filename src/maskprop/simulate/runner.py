"""The large-scale simulation of paper Sec. 5.2: our method against the baselines on one pool.

Everything here composes library pieces; nothing reads files or prints.  Long loops report
through an optional ``progress(label, done, total)`` callback so the CLI can draw bars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from maskprop.metrics import pearson, summarize
from maskprop.params import AnnotationParams
from maskprop.progress import Progress, no_progress
from maskprop.search import make_frontier, universal_cut
from maskprop.selection import Likelihoods, Selection, fit_likelihoods
from maskprop.session import AnnotationSession, Answer
from maskprop.simulate.annotator import SimulatedAnnotator
from maskprop.simulate.baselines import lsun, manual_polygons, naive_verification
from maskprop.simulate.pool import MaskPool
from maskprop.simulate.result import Curve, MethodResult, sample_curve
from maskprop.tree import Tree, build_tree

#: Fig. 6b strategies: the library's searches plus the oracle upper bound (true mean IoU as
#: priority, the paper's dashed lines) and the universal threshold cut.
CURVE_STRATEGIES = ("heuristic", "oracle", "dfs_heuristic", "bfs", "dfs", "universal")

#: Label reuse and sequential verification, each on and off (issue: "measure it").
ABLATION: dict[str, dict[str, object]] = {
    "paper_fixed_ns": {"reuse_answers": False, "sequential": "off"},
    "reuse": {"reuse_answers": True, "sequential": "off"},
    "curtail": {"reuse_answers": False, "sequential": "curtail"},
    "beta": {"reuse_answers": False, "sequential": "beta"},
    "reuse_curtail": {"reuse_answers": True, "sequential": "curtail"},
    "reuse_beta": {"reuse_answers": True, "sequential": "beta"},
}


@dataclass
class ClassTrees:
    """Trees of every class, with each class's pool indices (leaf i -> ``index[c][i]``)."""

    trees: dict[int, Tree]
    index: dict[int, NDArray[np.int64]]

    def correct(self, pool: MaskPool, iou_threshold: float) -> dict[int, NDArray[np.float64]]:
        """Q_j for every node of every class tree."""
        out = {}
        for c, t in self.trees.items():
            ok = (pool.ious[self.index[c]] >= iou_threshold).astype(np.float64)
            out[c] = t.subtree_sum(ok) / t.size
        return out

    def mean_iou(self, pool: MaskPool) -> dict[int, NDArray[np.float64]]:
        return {
            c: t.subtree_sum(pool.ious[self.index[c]].astype(np.float64)) / t.size
            for c, t in self.trees.items()
        }


def build_class_trees(pool: MaskPool, progress: Progress = no_progress) -> ClassTrees:
    """One complete-linkage tree per class (largest first, so progress is honest)."""
    classes = [c for c in range(len(pool.class_names)) if (pool.class_ids == c).any()]
    index = {c: pool.class_indices(c) for c in classes}
    total = int(sum(len(i) ** 2 for i in index.values()))  # work grows with n^2
    done = 0
    trees: dict[int, Tree] = {}
    for c in sorted(classes, key=lambda k: -len(index[k])):
        idx = index[c]
        trees[c] = build_tree(pool.features[idx], pool.scores[idx])
        done += len(idx) ** 2
        progress("trees", done, total)
    return ClassTrees(trees={c: trees[c] for c in sorted(trees)}, index=index)


def cluster_points(
    trees: ClassTrees, pool: MaskPool, min_cluster_size: int = 10
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Paper Fig. 4, cluster level: (S_j, mean true IoU) of every cluster of at least
    ``min_cluster_size`` masks, over all class trees."""
    mean_iou = trees.mean_iou(pool)
    s, iou = [np.zeros(0)], [np.zeros(0)]
    for c, t in trees.trees.items():
        big = np.flatnonzero(t.size >= min_cluster_size)
        s.append(t.cluster_scores()[big])
        iou.append(mean_iou[c][big])
    return np.concatenate(s), np.concatenate(iou)


def fig4_correlations(trees: ClassTrees, pool: MaskPool) -> dict[str, float]:
    """Paper Fig. 4: per-mask corr(s, IoU) and per-cluster corr(S, mean IoU) (clusters of
    >= 10 masks); the method relies on the second being much the stronger."""
    return {
        "mask_corr_s_iou": pearson(pool.scores.astype(np.float64), pool.ious),
        "cluster_corr_S_mean_iou": pearson(*cluster_points(trees, pool)),
    }


def learn_selection(
    heldout: MaskPool,
    params: AnnotationParams,
    progress: Progress = no_progress,
    min_cluster_size: int = 10,
) -> tuple[Selection, Likelihoods, dict[str, float]]:
    """Fit P_h / P_l on every cluster of held-out trees and derive (K_pr, K_pa).

    Fixed thresholds in ``params`` win over learned ones; ``None`` there means "use learned".
    Also returns the Fig. 4 correlations measured on the held-out set.
    """
    ht = build_class_trees(heldout, progress)
    quality = ht.correct(heldout, params.iou_threshold)
    scores = {c: t.cluster_scores() for c, t in ht.trees.items()}
    # Fit on clusters big enough to be worth a question: singletons and pairs (most nodes of a
    # tree) have Q in {0, 0.5, 1} and would swamp the S -> Q relation of real clusters.
    fit = {c: t.size >= min_cluster_size for c, t in ht.trees.items()}
    s_all = np.concatenate([scores[c][fit[c]] for c in ht.trees])
    q_all = np.concatenate([quality[c][fit[c]] for c in ht.trees])
    lik = fit_likelihoods(s_all, q_all, params.accept_threshold)
    learned = lik.thresholds()
    k_pr = (
        params.prior_reject_threshold
        if params.prior_reject_threshold is not None
        else learned.prior_reject_threshold
    )
    k_pa = (
        params.prior_accept_threshold
        if params.prior_accept_threshold is not None
        else learned.prior_accept_threshold
    )
    k_pr = min(k_pr, k_pa)
    fig4 = {
        **fig4_correlations(ht, heldout),
        "learned_prior_reject_threshold": learned.prior_reject_threshold,
        "learned_prior_accept_threshold": learned.prior_accept_threshold,
    }
    return Selection(k_pr, k_pa), lik, fig4


@dataclass
class SessionRun:
    result: MethodResult
    decisions: dict[str, int] = field(default_factory=dict)


def run_maskprop(
    pool: MaskPool,
    ct: ClassTrees,
    params: AnnotationParams,
    selection: Selection,
    annotator: SimulatedAnnotator,
    *,
    strategy: str = "heuristic",
    seed: int = 0,
    name: str = "maskprop",
    progress: Progress = no_progress,
) -> SessionRun:
    """Run Algorithm 1 over every class with a simulated annotator answering."""
    priorities = ct.mean_iou(pool) if strategy == "oracle" else None
    session = AnnotationSession(
        ct.trees,
        params,
        selection,
        strategy="heuristic" if strategy == "oracle" else strategy,
        seed=seed,
        priorities=priorities,
    )
    batch = params.samples_per_cluster if params.sequential == "off" else params.sequential_batch
    seconds: list[float] = []
    ious: list[NDArray[np.float64]] = []
    clusters: list[int] = []
    obtained: list[NDArray[np.int64]] = []
    outcomes: dict[str, int] = {}
    n_total = len(pool)
    decided = 0
    elapsed = 0.0
    while not session.done:
        # Strict Algorithm 1 order: a new cluster is opened only when none is in flight.
        qs = session.lease(batch, max_new_clusters=1)
        if qs:
            ids = np.fromiter((ct.index[q.class_id][q.mask] for q in qs), np.int64, len(qs))
            labels = annotator.answer(ids)
            session.submit(
                Answer(q.class_id, q.node, q.mask, bool(v)) for q, v in zip(qs, labels, strict=True)
            )
            elapsed = session.questions * params.seconds_per_question
            seconds.append(elapsed)
            ious.append(np.array([np.nan]))
            clusters.append(session.clusters_annotated)
        for d in session.pop_decisions():
            outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
            if not d.terminal:
                continue
            masks, labels_, _ = session.decision_labels(d)
            ids = ct.index[d.class_id][masks[labels_ == 1]]
            decided += masks.shape[0]
            if ids.size:
                obtained.append(ids)
                ious.append(pool.ious[ids].astype(np.float64))
                seconds.extend([elapsed] * ids.size)
                clusters.extend([session.clusters_annotated] * ids.size)
        progress(name, decided, n_total)
        if not qs and not session.done:
            raise RuntimeError("session stalled: no questions to ask but not done")
    obtained_ids = np.concatenate(obtained) if obtained else np.zeros(0, np.int64)
    curve = sample_curve(
        np.asarray(seconds, dtype=np.float64),
        np.concatenate(ious) if ious else np.zeros(0),
        np.asarray(clusters, dtype=np.int64),
    )
    result = MethodResult(
        name=name,
        obtained_ious=pool.ious[obtained_ids],
        questions=session.questions,
        polygons=0,
        clusters_annotated=session.clusters_annotated,
        curve=curve,
        obtained_mask_ids=obtained_ids,
    )
    return SessionRun(result=result, decisions=outcomes)


def run_universal(
    pool: MaskPool,
    ct: ClassTrees,
    params: AnnotationParams,
    annotator: SimulatedAnnotator,
    *,
    mean_cluster_size: float = 8.0,
    seed: int = 0,
) -> MethodResult:
    """Universal threshold baseline: cut each tree at one height, verify N_s masks per cluster,
    accept (Q~ >= K_a) or drop; never split."""
    rng = np.random.default_rng(seed)
    got: list[NDArray[np.int64]] = []
    questions = 0
    annotated = 0
    for c, t in ct.trees.items():
        k = max(1, math.ceil(t.n_leaves / mean_cluster_size))
        for node in universal_cut(t, k):
            members = t.leaves(int(node))
            m = min(params.samples_per_cluster, members.shape[0])
            sample = members[rng.choice(members.shape[0], m, replace=False)]
            yes = int(annotator.answer(ct.index[c][sample]).sum())
            questions += m
            annotated += 1
            if yes / m >= params.accept_threshold - 1e-9:
                got.append(ct.index[c][members])
    ids = np.concatenate(got) if got else np.zeros(0, np.int64)
    seconds = questions * params.seconds_per_question
    curve = sample_curve(
        np.full(ids.size, seconds, dtype=np.float64), pool.ious[ids].astype(np.float64)
    )
    return MethodResult(
        name="universal",
        obtained_ious=pool.ious[ids],
        questions=questions,
        polygons=0,
        clusters_annotated=annotated,
        curve=curve,
        obtained_mask_ids=ids,
    )


def search_curve(
    ct: ClassTrees,
    quality: dict[int, NDArray[np.float64]],
    priorities: dict[int, NDArray[np.float64]],
    strategy: str,
    accept_threshold: float,
    points: int = 200,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Fig. 6b protocol: Q~ = Q (no sampling) and every popped cluster annotated.

    Returns (clusters annotated, masks obtained) sampled along the search.
    """
    frontier = make_frontier(strategy, priorities)
    frontier.push_roots([(c, t.root) for c, t in ct.trees.items()])
    xs: list[int] = []
    ys: list[int] = []
    obtained = 0
    while len(frontier):
        c, node = frontier.pop()
        q = quality[c][node]
        t = ct.trees[c]
        if q >= accept_threshold - 1e-12:
            obtained += int(t.size[node])
        elif q > 1.0 - accept_threshold + 1e-12 and not t.is_leaf(node):
            lc, rc = t.children(node)
            frontier.push_children((c, node), [(c, lc), (c, rc)])
        xs.append(len(xs) + 1)
        ys.append(obtained)
    at = np.unique(np.geomspace(1, len(xs), points).round().astype(np.int64)) - 1
    return np.asarray(xs)[at], np.asarray(ys)[at]


def universal_curve(
    ct: ClassTrees,
    quality: dict[int, NDArray[np.float64]],
    accept_threshold: float,
    points: int = 24,
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Fig. 6b's universal threshold: cuts at growing cluster counts, Q~ = Q."""
    n = sum(t.n_leaves for t in ct.trees.values())
    xs, ys = [], []
    for mean_size in np.geomspace(max(n / len(ct.trees), 2.0), 1.0, points):
        total_k = 0
        got = 0
        for c, t in ct.trees.items():
            nodes = universal_cut(t, max(1, math.ceil(t.n_leaves / mean_size)))
            total_k += nodes.size
            good = quality[c][nodes] >= accept_threshold - 1e-12
            got += int(t.size[nodes[good]].sum())
        xs.append(total_k)
        ys.append(got)
    return np.asarray(xs), np.asarray(ys)


@dataclass
class SimulationOutput:
    report: dict[str, Any]
    curves: dict[str, Curve]
    search_curves: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]]
    likelihoods: Likelihoods


def simulate(
    pool: MaskPool,
    heldout: MaskPool,
    params: AnnotationParams,
    *,
    strategy: str = "heuristic",
    annotator_error: float = 0.0,
    seed: int = 0,
    ablation: bool = True,
    strategy_curves: bool = True,
    progress: Progress = no_progress,
) -> SimulationOutput:
    """Run ours and the baselines on ``pool``; thresholds are learned on ``heldout``."""
    selection, lik, fig4 = learn_selection(heldout, params)
    ct = build_class_trees(pool, progress)

    def annotator() -> SimulatedAnnotator:
        # The same simulated crowd for every method: per-mask answers are fixed by the seed.
        return SimulatedAnnotator(
            pool.ious, params.iou_threshold, error_rate=annotator_error, seed=seed
        )

    if strategy == "universal":
        ours = SessionRun(result=run_universal(pool, ct, params, annotator(), seed=seed))
    else:
        ours = run_maskprop(
            pool,
            ct,
            params,
            selection,
            annotator(),
            strategy=strategy,
            seed=seed,
            progress=progress,
        )
    progress("baselines", 0, 3)
    manual = manual_polygons(pool, params, seed=seed)
    progress("baselines", 1, 3)
    naive = naive_verification(pool, annotator(), params)
    progress("baselines", 2, 3)
    lsun_result = lsun(pool, annotator(), params, seed=seed)
    progress("baselines", 3, 3)

    methods = {
        "maskprop": ours.result,
        "manual": manual,
        "naive_verification": naive,
        "lsun": lsun_result,
    }
    report: dict[str, Any] = {name: summarize(r, params) for name, r in methods.items()}
    report["maskprop"]["decisions"] = ours.decisions
    report["config"] = {
        "masks": len(pool),
        "heldout_masks": len(heldout),
        "classes": len(ct.trees),
        "largest_class": int(max(t.n_leaves for t in ct.trees.values())),
        "seed": seed,
        "strategy": strategy,
        "annotator_error": annotator_error,
        "params": params.as_dict(),
        "selection_used": {
            "prior_reject_threshold": selection.prior_reject_threshold,
            "prior_accept_threshold": selection.prior_accept_threshold,
        },
    }
    report["fig4"] = fig4

    search_curves: dict[str, tuple[NDArray[np.int64], NDArray[np.int64]]] = {}
    if strategy_curves:
        quality = ct.correct(pool, params.iou_threshold)
        scores = {c: t.cluster_scores() for c, t in ct.trees.items()}
        mean_iou = ct.mean_iou(pool)
        for i, name in enumerate(CURVE_STRATEGIES):
            progress("search curves", i, len(CURVE_STRATEGIES))
            if name == "universal":
                search_curves[name] = universal_curve(ct, quality, params.accept_threshold)
            elif name == "oracle":
                search_curves[name] = search_curve(
                    ct, quality, mean_iou, "heuristic", params.accept_threshold
                )
            else:
                search_curves[name] = search_curve(
                    ct, quality, scores, name, params.accept_threshold
                )
        progress("search curves", len(CURVE_STRATEGIES), len(CURVE_STRATEGIES))
        report["search_curves"] = {
            name: {"clusters": xs.tolist(), "masks": ys.tolist()}
            for name, (xs, ys) in search_curves.items()
        }

    if ablation:
        rows = {}
        for i, (name, change) in enumerate(ABLATION.items()):
            progress("ablation", i, len(ABLATION))
            p = replace(params, **change)  # type: ignore[arg-type]
            run = run_maskprop(pool, ct, p, selection, annotator(), strategy=strategy, seed=seed)
            s = summarize(run.result, p)
            rows[name] = {
                k: s[k] for k in ("quantity", "questions", "masks_per_question", "sq", "precision")
            }
        progress("ablation", len(ABLATION), len(ABLATION))
        base = rows["paper_fixed_ns"]["masks_per_question"] or math.nan
        for row in rows.values():
            mpq = row["masks_per_question"]
            row["masks_per_question_vs_paper"] = mpq / base if mpq else None
        report["ablation"] = rows

    return SimulationOutput(
        report=report,
        curves={name: r.curve for name, r in methods.items()},
        search_curves=search_curves,
        likelihoods=lik,
    )
