"""PNG figures of a simulation, in the layout of the paper's figures (headless, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import NDArray

from maskprop.selection import Likelihoods, Selection
from maskprop.simulate.result import Curve

_LABELS = {
    "maskprop": "maskprop (ours)",
    "manual": "manual polygons",
    "naive_verification": "naive verification",
    "lsun": "LSUN-style classifier",
}
_STYLE = {
    "heuristic": ("k", "-", "Heuristics only: mask score (ours)"),
    "oracle": ("k", "--", "Heuristics only: true mean IoU (upper bound)"),
    "dfs_heuristic": ("tab:red", "-", "DFS with heuristic"),
    "bfs": ("tab:green", "-", "BFS"),
    "dfs": ("tab:cyan", "-", "DFS"),
    "universal": ("tab:blue", "-", "Universal threshold"),
}


def _positive(x: NDArray[np.float64]) -> NDArray[np.bool_]:
    return np.asarray(x) > 0


def fig8(curves: dict[str, Curve], path: Path) -> None:
    """Annotation quantity and quality against human hours (paper Fig. 8)."""
    fig, (ax_q, ax_iou) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, c in curves.items():
        keep = _positive(c.hours) & (c.quantity > 0)
        label = _LABELS.get(name, name)
        ax_q.plot(c.hours[keep], c.quantity[keep], label=label)
        ax_iou.plot(c.hours[keep], c.mean_iou[keep], label=label)
    ax_q.set(xscale="log", yscale="log", xlabel="human hours", ylabel="annotations obtained")
    ax_iou.set(xscale="log", xlabel="human hours", ylabel="mean IoU of annotations", ylim=(0, 1))
    ax_q.set_title("Annotation quantity vs cost")
    ax_iou.set_title("Annotation quality vs cost")
    for ax in (ax_q, ax_iou):
        ax.grid(True, which="both", alpha=0.3)
    ax_q.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig6b(search_curves: dict[str, tuple[Any, Any]], path: Path) -> None:
    """Masks obtained against clusters annotated for each search strategy (paper Fig. 6b)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, (xs, ys) in search_curves.items():
        color, ls, label = _STYLE.get(name, ("gray", "-", name))
        xs_a, ys_a = np.asarray(xs), np.asarray(ys)
        keep = (xs_a > 0) & (ys_a > 0)
        ax.plot(xs_a[keep], ys_a[keep], color=color, linestyle=ls, label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="clusters annotated",
        ylabel="masks obtained",
        title="Searching the tree (Q~ = Q, every cluster annotated)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fig4c(lik: Likelihoods, selection: Selection, path: Path) -> None:
    """Learned likelihoods P_h(S), P_l(S) and the thresholds in use (paper Fig. 4c)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(lik.grid, lik.p_high, label="P_h = P(Q >= K_a | S)")
    ax.plot(lik.grid, lik.p_low, label="P_l = P(Q <= 1 - K_a | S)")
    ax.axvline(selection.prior_reject_threshold, color="tab:red", ls=":", label="K_pr")
    ax.axvline(selection.prior_accept_threshold, color="k", ls=":", label="K_pa")
    ax.set(xlabel="cluster score S", ylabel="probability", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.set_title("Active selection: likelihoods learned on held-out clusters")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ablation(rows: dict[str, dict[str, Any]], path: Path) -> None:
    """Masks per question of each verification variant, with its SQ printed on the bar."""
    names = list(rows)
    mpq = [rows[n]["masks_per_question"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    bars = ax.bar(names, mpq, color="tab:gray")
    for bar, n in zip(bars, names, strict=True):
        sq = rows[n]["sq"]
        ax.annotate(
            f"SQ {sq:.3f}" if sq is not None else "SQ -",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel="masks obtained per question", title="Label reuse and sequential verification")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo_rounds(rounds: list[dict[str, Any]], path: Path) -> None:
    """``maskprop demo``: detector mask AP, accepted masks and SQ per retraining round."""
    r = [x["round"] for x in rounds]
    fig, (ax_ap, ax_n, ax_sq) = plt.subplots(1, 3, figsize=(12, 3.8))
    ax_ap.plot(r, [x["detector_ap"] for x in rounds], "o-k", label="mask AP")
    ax_ap.plot(r, [x["detector_ap50"] for x in rounds], "s--", color="tab:blue", label="AP50")
    control = [(x["round"], x.get("detector_ap_control_labelled_only")) for x in rounds]
    control = [(k, v) for k, v in control if v is not None]
    if control:
        ax_ap.plot(*zip(*control, strict=True), "x", color="tab:orange", ms=9,
                   label="AP, control: labelled set only")  # fmt: skip
    ax_ap.set(xlabel="round", ylabel="held-out mask AP", title="Detector (retrained each round)")
    ax_ap.legend()
    ax_n.bar(r, [x["masks"] for x in rounds], color="tab:green", label="accepted this round")
    ax_n.plot(r, [x["total_masks"] for x in rounds], "o-k", label="total after de-duplication")
    ax_n.set(xlabel="round", ylabel="masks", title="Labels obtained")
    ax_n.legend(loc="lower right")
    ax_sq.plot(r, [x["sq"] for x in rounds], "o-k", label="SQ")
    ax_sq.plot(r, [x["precision"] for x in rounds], "s--", color="tab:red", label="precision")
    ax_sq.set(xlabel="round", ylim=(0, 1), title="Quality of accepted masks")
    ax_sq.legend()
    for ax in (ax_ap, ax_n, ax_sq):
        ax.set_xticks(r)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def demo_fig4(pool: Any, trees: Any, path: Path, min_cluster_size: int = 10) -> None:
    """Paper Fig. 4 on the real detector: per-mask s vs true IoU, and per-cluster mean S vs
    mean true IoU over every cluster of >= ``min_cluster_size`` masks of the class trees."""
    from maskprop.simulate.runner import cluster_points, fig4_correlations

    xs, ys = cluster_points(trees, pool, min_cluster_size)
    r = fig4_correlations(trees, pool)
    fig, (ax_m, ax_c) = plt.subplots(1, 2, figsize=(10, 4.2))
    ax_m.scatter(pool.scores, pool.ious, s=3, alpha=0.3, color="k")
    ax_m.set(xlabel="mask score s", ylabel="true IoU")
    ax_m.set_title(f"Per mask (r = {r['mask_corr_s_iou']:.2f})")
    ax_c.scatter(xs, ys, s=5, alpha=0.4, color="tab:blue")
    ax_c.set(xlabel="cluster score S (mean s)", ylabel="mean true IoU")
    ax_c.set_title(
        f"Per cluster of >= {min_cluster_size} masks (r = {r['cluster_corr_S_mean_iou']:.2f})"
    )
    for ax in (ax_m, ax_c):
        ax.set(xlim=(0, 1), ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
