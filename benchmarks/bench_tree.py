"""Tree building: exact complete linkage, its scipy reference, and the two-level tree at scale.

Every build runs in a fresh child process.  Memory is measured two ways: the child's own
``ru_maxrss`` and, because the two-level tree links its blocks in worker processes, the peak
over time of the summed proportional set size (PSS, shared pages split between sharers) of the
child and all its descendants, sampled every 0.5 s by this parent.  The input features are
generated inside the child (float32, in chunks) and count towards its memory.

    python benchmarks/bench_tree.py compare 10000 20000     # ours (exact) vs scipy linkage
    python benchmarks/bench_tree.py scale 1000000           # exact-20k baseline, then two_level
    python benchmarks/bench_tree.py scale 10000000
    python benchmarks/bench_tree.py quality                 # two_level vs exact, seeds 0-15
    python benchmarks/bench_tree.py quality 0 1 2 --block-size 500 --fragments 0   # variants
    python benchmarks/bench_tree.py quality --draws 6       # + the spread over equally valid trees
    python benchmarks/bench_tree.py quality --draws 6 --representatives 16   # a variant, 6 draws
    python benchmarks/bench_tree.py quality $(seq 16 77) --draws 6 --jitter-draws 2   # seeds
    python benchmarks/bench_tree.py quality $(seq 0 77) --pools hard --draws 6 --jitter-draws 1 \
        --out hard.json                                     # + how precisely the sum reads
    python benchmarks/bench_tree.py report benchmarks/results/tree_quality_hard_0-77.json  # + more
    python benchmarks/bench_tree.py hard                    # hard pools, search run to its end

``scale`` prints, for each size, seconds, peak MiB and the ratio of its time to the exact 20k
build timed in the same run (the issue's goals: 1M within 3x and < 1 GB, 10M within 36x and
< 8 GB).  ``quality`` runs the paper's Algorithm 1 (heuristic search, priors K_pr = 0 and
K_pa = 0.7, K_a = 0.85, K_iou = 0.75) with the oracle quality estimate Q~ = Q (paper Sec. 5.1)
on the same class's exact and two-level trees, and prints the masks in accepted clusters after
100, 300 and 1000 annotated clusters, and their ratio (goal >= 98 % at every budget), per
class and summed over the easy, the hard and all classes, with the same figures for the
two-level tree of whole blocks (no fragments) and for the exact tree of slightly jittered
features (how far the metric moves by itself).  ``--draws K`` adds, summed per pool, the
two-level tree with k-means seeds 0..K-1 and the exact tree of K jittered inputs: the exact
tree is one draw of a figure that equally valid trees move by several percent, so a variant is
judged by its mean over draws against the jittered exact tree's, not by one draw.
"""

from __future__ import annotations

import heapq
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

CHILD = r"""
import json, resource, sys, time
import numpy as np
n, which = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
# 40 well-separated groups in d=32, like one class of mask-attention features (float32).
centres = rng.normal(0, 4, size=(40, 32)).astype(np.float32)
f = np.empty((n, 32), dtype=np.float32)
for lo in range(0, n, 1 << 20):
    hi = min(n, lo + (1 << 20))
    f[lo:hi] = centres[rng.integers(0, 40, hi - lo)]
    f[lo:hi] += rng.standard_normal((hi - lo, 32), dtype=np.float32)
s = rng.uniform(size=n)
from maskprop.tree import build_tree, embed
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if which == "scipy":
    from scipy.cluster.hierarchy import linkage
    z = linkage(embed(f, s), method="complete")
    heights = np.sort(z[:, 2])
else:
    tree = build_tree(f, s, method=which)
    heights = np.sort(tree.height[n:])
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": secs, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024,
                  "worker_peak_mib": workers / 1024, "input_mib": f.nbytes / 2**20,
                  "height_checksum": float(heights.sum())}))
"""


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                todo.extend(int(k) for k in kids)
        except OSError:
            continue
    return out


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def run_child(args: list[str]) -> dict[str, float]:
    """Run ``python -c <args>`` whose last stdout line is a JSON object; returns it with
    ``tree_pss_mib``: the peak PSS of the child and its descendants, sampled every 0.5 s."""
    proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _pss_mib(_descendants(proc.pid)))
            time.sleep(0.5)  # smaps_rollup walks page tables: sampling costs CPU

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"child {args[1:]} failed with exit code {proc.returncode}")
    res: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    res["tree_pss_mib"] = peak[0]
    return res


def run(n: int, which: str) -> dict[str, float]:
    return run_child([CHILD, str(n), which])


def compare(sizes: list[int]) -> None:
    print(
        f"{'n':>7} {'scipy s':>9} {'ours s':>8} {'speed-up':>9} "
        f"{'scipy MiB':>10} {'ours MiB':>9} {'memory ratio':>13} same-heights"
    )
    for n in sizes:
        ref = run(n, "scipy")
        ours = run(n, "exact")
        same = abs(ref["height_checksum"] - ours["height_checksum"]) <= 1e-6 * abs(
            ref["height_checksum"]
        )
        print(
            f"{n:>7} {ref['seconds']:>9.2f} {ours['seconds']:>8.2f} "
            f"{ref['seconds'] / ours['seconds']:>8.2f}x {ref['delta_mib']:>10.0f} "
            f"{ours['delta_mib']:>9.0f} {ref['delta_mib'] / max(ours['delta_mib'], 1):>12.2f}x "
            f"{same}"
        )


def scale(sizes: list[int]) -> None:
    base = run(20_000, "exact")
    print(
        f"{'n':>9} {'method':>9} {'seconds':>8} {'x exact-20k':>11} {'peak MiB (PSS, tree)':>21} "
        f"{'main RSS MiB':>12} {'worker RSS MiB':>14} {'input MiB':>9}",
        flush=True,
    )

    def line(n: int, which: str, r: dict[str, float]) -> None:
        print(
            f"{n:>9} {which:>9} {r['seconds']:>8.1f} {r['seconds'] / base['seconds']:>10.2f}x "
            f"{r['tree_pss_mib']:>21.0f} {r['peak_mib']:>12.0f} {r['worker_peak_mib']:>14.0f} "
            f"{r['input_mib']:>9.0f}",
            flush=True,
        )

    line(20_000, "exact", base)
    for n in sizes:
        line(n, "two_level", run(n, "two_level"))


# ---------------------------------------------------------------------------------------------
# Quality: Algorithm 1 with the oracle estimate Q~ = Q on exact and two-level trees.

K_PR, K_PA, K_A, K_IOU = 0.0, 0.7, 0.85, 0.75
BUDGETS = (100, 300, 1000)
#: The arms ``quality`` compares with the exact tree, in its tables' order: the two-level tree
#: as configured, the one that links whole blocks (fragments=0), and the exact tree of
#: jittered features (the noise floor).
ARMS = ("two_level", "blocks only", "exact jittered")


def annotations(tree, ious: np.ndarray):  # type: ignore[no-untyped-def]
    """Algorithm 1's annotated clusters in order, as ``(node, outcome)``: heuristic search
    (highest cluster score S first); S <= K_pr: reject unasked; S <= K_pa: split unasked (a
    leaf: reject); else annotate with Q~ = Q: ``accept`` at Q >= K_a, ``split`` between,
    ``reject`` at Q <= 1 - K_a (or a leaf)."""
    score = tree.cluster_scores()
    quality = tree.subtree_sum((ious >= K_IOU).astype(np.float64)) / tree.size
    heap = [(-score[tree.root], tree.root)]
    while heap:
        _, j = heapq.heappop(heap)
        leaf = tree.is_leaf(j)
        if score[j] <= K_PR:
            continue
        if score[j] <= K_PA:
            if not leaf:
                for c in tree.children(j):
                    heapq.heappush(heap, (-score[c], c))
            continue
        if quality[j] >= K_A - 1e-12:
            yield j, "accept"
        elif quality[j] > 1 - K_A and not leaf:
            for c in tree.children(j):
                heapq.heappush(heap, (-score[c], c))
            yield j, "split"
        else:
            yield j, "reject"


def accepted_after(tree, ious: np.ndarray) -> list[int]:  # type: ignore[no-untyped-def]
    """Masks in accepted clusters after each budget of annotated clusters (the search ran dry
    before a budget: what it had accepted by then)."""
    accepted, out = 0, []
    for annotated, (j, outcome) in enumerate(annotations(tree, ious), start=1):
        if outcome == "accept":
            accepted += int(tree.size[j])
        if annotated in BUDGETS:
            out.append(accepted)
            if annotated == BUDGETS[-1]:
                break
    while len(out) < len(BUDGETS):
        out.append(accepted)
    return out


def whole_search(tree, ious: np.ndarray) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """The search run until nothing is left to ask: (clusters annotated, masks accepted, size
    of the largest cluster rejected whole)."""
    annotated = accepted = biggest = 0
    for j, outcome in annotations(tree, ious):
        annotated += 1
        if outcome == "accept":
            accepted += int(tree.size[j])
        elif outcome == "reject":
            biggest = max(biggest, int(tree.size[j]))
    return annotated, accepted, biggest


def pools(seed: int, n: int) -> dict[str, int]:
    """The easy and the hard pool of a seed: of 8 ADE-like classes, the ones with the most and
    the fewest correct masks."""
    from maskprop.simulate.generator import ade_like_class

    good = [float((ade_like_class(c, n, seed)[2] >= K_IOU).mean()) for c in range(8)]
    return {"easy": int(np.argmax(good)), "hard": int(np.argmin(good))}


def jittered(f: np.ndarray, seed: int, draw: int = 0) -> np.ndarray:
    """The features moved by 1e-3 of their spread: an equally valid input (the noise floor).
    Draw 0 is the jitter the single-draw tables used; draw ``k`` another one."""
    rng = np.random.default_rng(seed if draw == 0 else [seed, draw])
    return f + rng.normal(0.0, 1e-3, f.shape) * f.std(axis=0)


def hard(seeds: list[int]) -> None:
    """The hard pools' whole search: how many masks each tree accepts when the search runs
    to its end, against the budgets of ``quality``."""
    from maskprop.simulate.generator import ade_like_class
    from maskprop.tree import build_tree

    n = 20_000
    arms = ("exact", "two_level", "exact jittered")
    total = np.zeros((3, 3), dtype=np.int64)
    print(
        f"{'seed':>4} {'class':>5} "
        + "  ".join(f"{a + ': annotated/accepted/largest rejected':>44}" for a in arms)
    )
    for seed in seeds:
        c = pools(seed, n)["hard"]
        f, s, iou, _ = ade_like_class(c, n, seed)
        trees = (
            build_tree(f, s, method="exact"),
            build_tree(f, s, method="two_level"),
            build_tree(jittered(f, seed), s, method="exact"),
        )
        got = np.array([whole_search(t, iou) for t in trees])
        total += got
        print(
            f"{seed:>4} {c:>5} " + "  ".join(f"{'/'.join(map(str, g)):>44}" for g in got),
            flush=True,
        )
    print(
        f"hard pools, whole search, masks accepted: exact {total[0, 1]}, two_level {total[1, 1]} "
        f"({100 * total[1, 1] / total[0, 1]:.1f} %), exact jittered {total[2, 1]} "
        f"({100 * total[2, 1] / total[0, 1]:.1f} %); clusters annotated "
        f"{total[0, 0]} / {total[1, 0]} / {total[2, 0]}"
    )


def structure(z_ref: np.ndarray, z: np.ndarray, ks: tuple[int, ...]) -> list[float]:
    """Adjusted Rand index of the flat clusterings cut from two trees at ``k`` clusters each: a
    smooth measure of how alike two trees are (1 = the same partition), unlike the search."""
    from scipy.cluster.hierarchy import fcluster
    from sklearn.metrics import adjusted_rand_score

    return [
        adjusted_rand_score(
            fcluster(z_ref, k, criterion="maxclust"), fcluster(z, k, criterion="maxclust")
        )
        for k in ks
    ]


def quality(
    seeds: list[int],
    block_size: int | None = None,
    fragments: int | None = None,
    draws: int = 1,
    representatives: int | None = None,
    jitter_draws: int | None = None,
    pool_names: tuple[str, ...] = ("easy", "hard"),
    out: Path | None = None,
) -> None:
    """The tables above for draw 0; with ``draws`` > 1 also the two-level tree with k-means
    seeds 1..draws-1 and the exact tree of jitter draws 1..jitter_draws-1 (default: as many
    as ``draws``; each is an exact build, the run's costliest part), summed per draw: how far
    equally valid trees of each kind move the figure (the exact tree itself is one draw).
    ``pool_names`` restricts the run to some pools; ``out`` keeps every class's row as JSON
    (the per-class figures behind the sums, for pooling runs and for later analysis)."""
    from maskprop.simulate.generator import ade_like_class
    from maskprop.tree import DEFAULT_BLOCK_SIZE, DEFAULT_REPRESENTATIVES, build_tree

    jitter_draws = draws if jitter_draws is None else max(1, jitter_draws)
    block_size = block_size or DEFAULT_BLOCK_SIZE
    reps = representatives or DEFAULT_REPRESENTATIVES
    print(
        f"two-level block size {block_size}, representatives {reps}, fragments "
        f"{'library default' if fragments is None else fragments}; seeds {seeds}; "
        f"draws {draws}, jitter draws {jitter_draws}",
        flush=True,
    )
    n = 20_000
    ks = (10, 100, 1000)
    # The two-level tree as configured (k-means seed 0 unless a draw sets it).
    two_level: dict[str, Any] = {
        "method": "two_level",
        "block_size": block_size,
        "fragments": fragments,
        "representatives": reps,
    }
    # Arms against the exact tree: the two-level tree as configured; the two-level tree that
    # links whole blocks (fragments=0, the tree before fragments); and the noise floor, the
    # exact tree of the same features moved by 1e-3 of their spread (an equally valid input).
    # A row a class: each arm's accepted masks (draw 0), and under "draws" every draw (0: the
    # tables' own) of the two-level tree (k-means seed) and of the jittered exact tree.
    rows: list[dict[str, Any]] = []
    aris: list[list[list[float]]] = []
    print(
        f"{'seed':>4} {'pool':>5} {'class':>5} {'good %':>6} {'2lvl s':>6} "
        f"{'exact @100/@300/@1000':>22}  "
        + "  ".join(f"{arm + ' %':>20}" for arm in ARMS)
        + "  ARI vs exact @k10/100/1000: two_level | blocks only | jittered",
        flush=True,
    )
    for seed in seeds:
        picks = pools(seed, n)
        for label, c in picks.items():
            if label not in pool_names:
                continue
            f, s, iou, _ = ade_like_class(c, n, seed)
            exact = build_tree(f, s, method="exact")
            t0 = time.perf_counter()
            two = build_tree(f, s, **two_level)
            secs = time.perf_counter() - t0
            blocks = build_tree(f, s, **{**two_level, "fragments": 0})
            again = build_tree(jittered(f, seed), s, method="exact")
            got = {
                "exact": accepted_after(exact, iou),
                "two_level": accepted_after(two, iou),
                "blocks only": accepted_after(blocks, iou),
                "exact jittered": accepted_after(again, iou),
            }
            z = exact.to_linkage()
            ari = [structure(z, t.to_linkage(), ks) for t in (two, blocks, again)]
            draw_rows = {
                "two_level": [got["two_level"]]
                + [
                    accepted_after(build_tree(f, s, seed=k, **two_level), iou)
                    for k in range(1, draws)
                ],
                "exact jittered": [got["exact jittered"]]
                + [
                    accepted_after(build_tree(jittered(f, seed, k), s, method="exact"), iou)
                    for k in range(1, jitter_draws)
                ],
            }
            rows.append({"seed": seed, "pool": label, "class": c, **got, "draws": draw_rows})
            if out is not None:
                out.write_text(json.dumps(rows))
            aris.append(ari)
            pct = {
                arm: "/".join(
                    f"{100 * b / a:.0f}" if a else "-"
                    for a, b in zip(got["exact"], got[arm], strict=True)
                )
                for arm in ARMS
            }
            print(
                f"{seed:>4} {label:>5} {c:>5} {100 * (iou >= K_IOU).mean():>6.1f} {secs:>6.1f} "
                f"{'/'.join(map(str, got['exact'])):>22}  "
                + "  ".join(f"{pct[arm]:>20}" for arm in ARMS)
                + "  "
                + " | ".join("/".join(f"{v:.2f}" for v in a) for a in ari),
                flush=True,
            )
    mean_ari = np.array(aris).mean(axis=0)
    print(
        "\nmean ARI against the exact tree @k10/100/1000: "
        + ", ".join(
            f"{arm} " + "/".join(f"{v:.2f}" for v in mean_ari[i]) for i, arm in enumerate(ARMS)
        )
    )
    summarise(rows, pool_names)


def in_pool(rows: list[dict[str, Any]], pool: str) -> list[dict[str, Any]]:
    """The rows of one pool ("all": every row)."""
    return [r for r in rows if pool == "all" or r["pool"] == pool]


def _bootstrap(
    got: np.ndarray, base: np.ndarray, rng: np.random.Generator, times: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """The 90 % bootstrap interval over classes (rows) of ``sum(got) / sum(base)``, a budget
    a column."""
    boot = []
    for _ in range(times):
        i = rng.integers(0, len(got), len(got))
        boot.append(got[i].sum(0) / np.maximum(base[i].sum(0), 1.0))
    lo, hi = np.percentile(np.array(boot), [5, 95], axis=0)
    return lo, hi


def summarise(rows: list[dict[str, Any]], pool_names: tuple[str, ...]) -> None:
    """The summed tables of ``quality`` from its per-class rows (a run's, or ``--out``'s JSON
    read back by ``bench_tree.py report``): bootstrap intervals, the draws, the noise."""
    draws = len(rows[0]["draws"]["two_level"])
    jitter_draws = len(rows[0]["draws"]["exact jittered"])
    rng = np.random.default_rng(0)
    summed = (*pool_names, "all") if len(pool_names) > 1 else pool_names
    print(
        "\nmasks accepted, summed over classes, % of the exact tree's at @100/@300/@1000 "
        "[90 % bootstrap interval over classes]; share of classes at >= 98 %:"
    )
    for pool in summed:
        sel = in_pool(rows, pool)
        base = np.array([r["exact"] for r in sel], dtype=np.float64)
        for arm in ARMS:
            got_arm = np.array([r[arm] for r in sel], dtype=np.float64)
            ratio = got_arm.sum(0) / base.sum(0)
            lo, hi = _bootstrap(got_arm, base, rng)
            share = (got_arm >= 0.98 * base).mean(0)
            print(
                f"  {pool:>4} ({len(sel):>2} classes) {arm:>15}: "
                + "  ".join(
                    f"{100 * r:5.1f} [{100 * a:3.0f}-{100 * b:3.0f}]"
                    for r, a, b in zip(ratio, lo, hi, strict=True)
                )
                + "   per class >= 98 %: "
                + "/".join(f"{v:.2f}" for v in share),
                flush=True,
            )
    if max(draws, jitter_draws) > 1:
        print(
            f"\nover {draws} draws (two_level: k-means seeds 0-{draws - 1}; exact jittered: "
            f"jitter draws 0-{jitter_draws - 1}), masks accepted summed over classes, % of the "
            "exact tree's at @100/@300/@1000, per draw; then mean [min-max] over draws:"
        )
        for pool in summed:
            sel = in_pool(rows, pool)
            exact = np.array([r["exact"] for r in sel], dtype=np.float64)
            base = exact.sum(0)
            for arm in ("two_level", "exact jittered"):
                got_draws = np.array([r["draws"][arm] for r in sel], dtype=np.float64)
                per = 100 * got_draws.sum(0) / base
                lo, hi = _bootstrap(got_draws.mean(1), exact, rng)
                print(
                    f"  {pool:>4} ({len(sel):>2} classes) {arm:>15}: "
                    + "  ".join("/".join(f"{v:.1f}" for v in d) for d in per)
                    + "   mean "
                    + "/".join(f"{v:.1f}" for v in per.mean(0))
                    + " ["
                    + " ".join(
                        f"{a:.0f}-{b:.0f}" for a, b in zip(per.min(0), per.max(0), strict=True)
                    )
                    + "], the mean's 90 % bootstrap interval over classes "
                    + " ".join(f"{100 * a:.0f}-{100 * b:.0f}" for a, b in zip(lo, hi, strict=True)),
                    flush=True,
                )
    noise(rows, summed, draws)


def noise(rows: list[dict[str, Any]], pool_names: tuple[str, ...], draws: int) -> None:
    """How precisely the summed figure can be read, from the per-class rows.

    The exact tree is one draw among equally valid trees: the exact tree of the jittered
    input is another, so per class ``(exact - jittered)^2 / 2`` estimates the variance of one
    draw, and classes are independent, so the summed figure's standard deviation, in points
    of the exact tree's sum, is ``100 sqrt(sum_i (e_i - j_i)^2 / 2) / sum_i e_i``.  It shrinks
    as one over the square root of the classes: reading the figure to +-1 point (one SD)
    takes ``classes * sd^2`` classes.  Beside it, the spread of the two-level tree over its
    k-means draws (per-class sample variances, summed) and the SD of the ratio two-level mean
    over draws / exact, taking the two as independent."""
    print(
        "\nnoise of the summed figure, points of the exact tree's sum at @100/@300/@1000 (one "
        "SD): the reference (exact vs its jittered twin), one two-level draw, the ratio of the "
        "mean over draws; classes needed for the reference's SD to reach 1 point:"
    )
    for pool in pool_names:
        sel = in_pool(rows, pool)
        if not sel:
            continue
        e = np.array([r["exact"] for r in sel], dtype=np.float64)
        j = np.array([r["exact jittered"] for r in sel], dtype=np.float64)
        total = np.maximum(e.sum(0), 1.0)
        sd_ref = 100 * np.sqrt(((e - j) ** 2 / 2).sum(0)) / total
        if draws > 1:
            t = np.array([r["draws"]["two_level"] for r in sel], dtype=np.float64)
            sd_two = 100 * np.sqrt(t.var(axis=1, ddof=1).sum(0)) / total
        else:
            sd_two = np.full(len(BUDGETS), np.nan)
        sd_ratio = np.sqrt(sd_ref**2 + sd_two**2 / draws)
        need = len(sel) * sd_ref**2
        print(
            f"  {pool:>4} ({len(sel):>3} classes): reference "
            + "/".join(f"{v:.1f}" for v in sd_ref)
            + "   two-level draw "
            + "/".join(f"{v:.1f}" for v in sd_two)
            + "   ratio "
            + "/".join(f"{v:.1f}" for v in sd_ratio)
            + "   classes for 1 point "
            + "/".join(f"{v:,.0f}" for v in need),
            flush=True,
        )


def main() -> None:
    args = sys.argv[1:]

    def option(flag: str) -> int | None:
        """The int after ``flag`` (removed from ``args``), or None when absent."""
        if flag not in args:
            return None
        at = args.index(flag)
        value = int(args[at + 1])
        del args[at : at + 2]
        return value

    # quality: the two-level tree's target block size, representatives and fragments, and
    # --draws: also k-means seeds / jitter draws 1..draws-1 (--jitter-draws: fewer exact ones).
    block_size = option("--block-size")
    representatives = option("--representatives")
    fragments = option("--fragments")
    draws = option("--draws") or 1
    jitter_draws = option("--jitter-draws")
    # --pools hard (or easy): run those pools only; --out FILE: every class's row as JSON.
    pool_names: tuple[str, ...] = ("easy", "hard")
    out: Path | None = None
    if "--pools" in args:
        at = args.index("--pools")
        pool_names = tuple(args[at + 1].split(","))
        del args[at : at + 2]
        if not set(pool_names) <= {"easy", "hard"} or not pool_names:
            raise SystemExit(f"--pools takes easy, hard or easy,hard, got {pool_names}")
    if "--out" in args:
        at = args.index("--out")
        out = Path(args[at + 1])
        del args[at : at + 2]
    mode, operands = (args[0], args[1:]) if args and not args[0].isdigit() else ("compare", args)
    try:
        rest = [] if mode == "report" else [int(a) for a in operands]
    except ValueError as exc:
        raise SystemExit(f"{mode} takes whole numbers (sizes or seeds): {exc}") from None
    if mode == "compare":
        compare(rest or [10_000, 20_000])
    elif mode == "scale":
        scale(rest or [1_000_000])
    elif mode == "quality":
        quality(
            rest or list(range(16)),
            block_size,
            fragments,
            draws,
            representatives,
            jitter_draws,
            pool_names,
            out,
        )
    elif mode == "report":
        # Several files pool their classes: shards of seeds run on as many cores or nodes.
        if not operands:
            raise SystemExit("report takes the JSON files that quality --out wrote")
        rows = []
        for name in operands:
            try:
                rows += json.loads(Path(name).read_text())
            except (OSError, ValueError) as exc:
                raise SystemExit(f"cannot read {name}: {exc}") from None
        if not rows:
            raise SystemExit("the files hold no classes")
        try:
            kinds = {
                (len(r["draws"]["two_level"]), len(r["draws"]["exact jittered"])) for r in rows
            }
        except (KeyError, TypeError) as exc:
            raise SystemExit(f"not rows of quality --out (missing {exc})") from None
        if len(kinds) != 1:
            raise SystemExit(f"the files mix runs of different --draws / --jitter-draws: {kinds}")
        summarise(rows, tuple(dict.fromkeys(r["pool"] for r in rows)))
    elif mode == "hard":
        hard(rest or list(range(16)))
    else:
        raise SystemExit(f"unknown mode {mode!r}: compare, scale, quality, report or hard")


if __name__ == "__main__":
    main()
