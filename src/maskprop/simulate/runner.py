"""The large-scale simulation of paper Sec. 5.2: our method against the baselines on one pool.

Everything here composes library pieces; nothing reads files or prints.  Long loops report
through an optional ``progress(label, done, total)`` callback so the CLI can draw bars.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from maskprop.metrics import pearson
from maskprop.params import AnnotationParams
from maskprop.progress import Progress, no_progress
from maskprop.selection import Likelihoods, Selection, fit_likelihoods
from maskprop.simulate.classwise import ClasswiseOutput, PoolSource, simulate_classes
from maskprop.simulate.pool import MaskPool
from maskprop.tree import Tree, build_tree

#: Fig. 6b strategies: the library's searches plus the oracle upper bound (true mean IoU as
#: priority, the paper's dashed lines) and the universal threshold cut.
CURVE_STRATEGIES = ("heuristic", "oracle", "dfs_heuristic", "bfs", "dfs", "universal")


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
    fig4 = {
        **fig4_correlations(ht, heldout),
        "learned_prior_reject_threshold": learned.prior_reject_threshold,
        "learned_prior_accept_threshold": learned.prior_accept_threshold,
    }
    selection = learned.overridden(params.prior_reject_threshold, params.prior_accept_threshold)
    return selection, lik, fig4


SimulationOutput = ClasswiseOutput


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
    """Run ours and the baselines on ``pool`` (in memory); thresholds are learned on
    ``heldout``.  Class by class in this process (:func:`simulate_classes`, which also runs
    pools too large for memory from a generator, in worker processes)."""
    return simulate_classes(
        PoolSource(pool, heldout),
        params,
        strategy=strategy,
        annotator_error=annotator_error,
        seed=seed,
        ablation=ablation,
        strategy_curves=strategy_curves,
        workers=1,
        progress=progress,
    )
