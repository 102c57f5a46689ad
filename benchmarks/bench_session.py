"""The session at scale: microseconds an answer (lease + submit) and bytes a save, at 10k, 1M
and 10M-mask classes (issue #14, item 2).

A crowd service's loop is simulated: lease a batch of questions, submit the answers, save.  A
save is the session's change log since the last save (:meth:`AnnotationSession.take_log`), or a
new base (:meth:`AnnotationSession.rebase`) when :meth:`needs_rebase` says so; the figure
before the change was a whole :meth:`snapshot` per save, printed beside it.  At the end the
session is restored from its base and the log chunks and compared byte for byte with the live
one.

The trees are random but valid full binary trees built with numpy (random pairs merged level
by level, no clustering): the session's costs depend on the tree's shape and the answers,
not on how the tree was found.  Answers come from hidden per-mask correctness that is pure
along runs of the tree's depth-first order (run lengths geometric, mean 64 masks; a run is
95 %, 50 % or 5 % correct), so large clusters are mixed and split and small ones are
decided, as in the paper's sweeps.  Every class answers the same number of questions.

Run (heavy at 10M: ~3 GB, a few minutes; share the machine)::

    flock /tmp/mp/heavy.lock .venv/bin/python benchmarks/bench_session.py
    .venv/bin/python benchmarks/bench_session.py --sizes 10000 1000000 --answers 5000

Timings are printed as ratios against the smallest class, run in the same process.

``--samples`` times drawing the sample of every node of one random tree (N_s = 15, half the
nodes leaves, most clusters a few masks, like the clusters a run asks) with
:func:`maskprop.verification.sample_order` (snapshot version 5) against the seeded numpy
generator per cluster that versions 3 and 4 used, the same draws in the same process.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from numpy.typing import NDArray

from maskprop.params import AnnotationParams
from maskprop.selection import Selection
from maskprop.session import AnnotationSession, Answer
from maskprop.tree import Tree
from maskprop.verification import sample_order


def random_tree(n: int, scores: NDArray[np.float64], rng: np.random.Generator) -> Tree:
    """A random full binary tree over ``n`` masks in :class:`Tree`'s arrays (scipy numbering:
    children before parents), built level by level with numpy: no Python loop over nodes."""
    n_nodes = 2 * n - 1
    left = np.full(n_nodes, -1, np.int32)
    right = np.full(n_nodes, -1, np.int32)
    parent = np.full(n_nodes, -1, np.int32)
    size = np.ones(n_nodes, np.int64)
    height = np.zeros(n_nodes, np.float64)
    levels = []
    cur = rng.permutation(n).astype(np.int64)
    next_id = n
    level = 0
    while cur.shape[0] > 1:
        level += 1
        m = cur.shape[0] // 2
        a, b = cur[0 : 2 * m : 2], cur[1 : 2 * m : 2]
        new = np.arange(next_id, next_id + m, dtype=np.int64)
        next_id += m
        left[new], right[new], parent[a], parent[b] = a, b, new, new
        size[new] = size[a] + size[b]
        height[new] = level
        levels.append((a, b, new))
        carry = cur[2 * m :]
        cur = rng.permutation(np.concatenate([new, carry]))
    start = np.zeros(n_nodes, np.int64)
    for a, b, p in reversed(levels):
        start[a] = start[p]
        start[b] = start[p] + size[a]
    order = np.empty(n, np.int32)
    order[start[:n]] = np.arange(n, dtype=np.int32)
    return Tree(left, right, parent, size, height, order, start, scores)


def hidden_truth(tree: Tree, rng: np.random.Generator) -> NDArray[np.bool_]:
    """Per mask correct or not, pure along geometric runs of the depth-first order."""
    n = tree.n_leaves
    runs = rng.geometric(1 / 64, size=n // 16 + 2)
    run_of = np.repeat(np.arange(runs.shape[0]), runs)[:n]
    if run_of.shape[0] < n:
        run_of = np.concatenate([run_of, np.full(n - run_of.shape[0], run_of[-1])])
    p = rng.choice([0.95, 0.5, 0.05], size=runs.shape[0])[run_of]
    by_pos = rng.random(n) < p
    truth = np.empty(n, bool)
    truth[tree.order] = by_pos
    return truth


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def run(n: int, answers_wanted: int, batch: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    # Scores: a noisy view of the hidden truth, so the heuristic order means something.
    placeholder = np.zeros(n)
    tree = random_tree(n, placeholder, rng)
    truth = hidden_truth(tree, rng)
    scores = np.clip(np.where(truth, 0.75, 0.45) + rng.normal(0, 0.2, n), 0, 1)
    tree = Tree(
        tree.left, tree.right, tree.parent, tree.size, tree.height, tree.order, tree.start, scores
    )
    t_tree = time.perf_counter() - t0
    t0 = time.perf_counter()
    session = AnnotationSession(
        {0: tree}, AnnotationParams(prior_accept_threshold=0.0), Selection(0.0, 0.0), seed=seed
    )
    t_init = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = session.rebase()
    t_base = time.perf_counter() - t0
    bases, chunks = [base], []
    call_us: list[float] = []  # lease + submit, per call
    save_bytes: list[int] = []
    save_us: list[float] = []
    rebases = 0
    answered = 0
    while answered < answers_wanted and not session.done:
        t0 = time.perf_counter()
        qs = session.lease(batch)
        session.submit([Answer(q.class_id, q.node, q.mask, bool(truth[q.mask])) for q in qs])
        session.pop_decisions()
        t1 = time.perf_counter()
        if session.needs_rebase():
            blob = session.rebase()
            bases.append(blob)
            chunks = []
            rebases += 1
        else:
            blob = session.take_log()
            chunks.append(blob)
        t2 = time.perf_counter()
        answered += len(qs)
        call_us.append((t1 - t0) * 1e6)
        save_us.append((t2 - t1) * 1e6)
        save_bytes.append(len(blob))
    t0 = time.perf_counter()
    full = session.snapshot()  # what every save wrote before
    t_snapshot = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = AnnotationSession.restore(bases[-1], {0: tree}, log=chunks)
    t_restore = time.perf_counter() - t0
    exact = restored.snapshot() == full
    total_us = sum(call_us)
    return {
        "n": n,
        "answers": answered,
        "saves": len(save_bytes),
        "rebases": rebases,
        "us_per_answer": total_us / max(answered, 1),
        "call_p50_us": pct(call_us, 50),
        "call_p99_us": pct(call_us, 99),
        "bytes_per_save_mean": float(np.mean(save_bytes)) if save_bytes else 0.0,
        "bytes_per_save_p50": pct([float(b) for b in save_bytes], 50),
        "bytes_per_save_p99": pct([float(b) for b in save_bytes], 99),
        "bytes_per_answer": sum(save_bytes) / max(answered, 1),
        "save_p50_us": pct(save_us, 50),
        "snapshot_bytes": len(full),
        "snapshot_s": t_snapshot,
        "base_s": t_base,
        "restore_s": t_restore,
        "restore_exact": float(exact),
        "tree_s": t_tree,
        "init_s": t_init,
        "labelled": int((session.labels(0) >= 0).sum()),
    }


def bench_samples(n: int, seed: int, repeats: int = 3) -> None:
    """Microseconds a cluster sample, both samplers over every node of an n-mask tree."""
    rng = np.random.default_rng(seed)
    tree = random_tree(n, np.zeros(n), rng)
    sizes = tree.size.astype(np.int64).tolist()
    k_of = [min(size, AnnotationParams().samples_per_cluster) for size in sizes]

    def numpy_generator(node: int, size: int, k: int) -> object:
        return np.random.default_rng([seed, 0, node]).choice(size, size=k, replace=False)

    def keyed_shuffle(node: int, size: int, k: int) -> object:
        return sample_order(seed, 0, node, size, k)

    per_draw: dict[str, list[float]] = {}
    for name, draw in (
        ("numpy default_rng + choice (v3/v4)", numpy_generator),
        ("sample_order (v5)", keyed_shuffle),
    ):
        times: list[float] = []
        for _ in range(repeats):
            for node, (size, k) in enumerate(zip(sizes, k_of, strict=True)):
                t0 = time.perf_counter()
                draw(node, size, k)
                times.append((time.perf_counter() - t0) * 1e6)
        per_draw[name] = times
        print(
            f"{name:36s} {len(times):,} draws: mean {np.mean(times):6.2f} us, "
            f"p50 {pct(times, 50):6.2f}, p99 {pct(times, 99):6.2f}",
            flush=True,
        )
    base, new = (float(np.mean(t)) for t in per_draw.values())
    print(f"sample_order / numpy generator, mean us a draw (same run): x{new / base:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000, 10_000_000])
    ap.add_argument("--answers", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=15, help="questions a lease (one save each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--samples", type=int, metavar="N", help="only time the two samplers on an N-mask tree"
    )
    args = ap.parse_args()
    if args.samples:
        bench_samples(args.samples, args.seed)
        return
    rows = []
    for n in args.sizes:
        r = run(n, args.answers, args.batch, args.seed)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append(r)
        print(
            f"n={n:>10,}  answers={r['answers']:>6}  saves={r['saves']:>5}  "
            f"rebases={r['rebases']}  us/answer={r['us_per_answer']:7.1f}  "
            f"call p50/p99={r['call_p50_us']:.0f}/{r['call_p99_us']:.0f} us  "
            f"save bytes mean/p50/p99={r['bytes_per_save_mean']:.0f}/"
            f"{r['bytes_per_save_p50']:.0f}/{r['bytes_per_save_p99']:.0f}  "
            f"bytes/answer={r['bytes_per_answer']:.1f}  take_log p50={r['save_p50_us']:.0f} us",
            flush=True,
        )
        print(
            f"    whole snapshot (the save before): {r['snapshot_bytes']:,} B in "
            f"{r['snapshot_s'] * 1e3:.0f} ms; base {r['base_s'] * 1e3:.0f} ms; restore(base+log) "
            f"{r['restore_s'] * 1e3:.0f} ms, exact={bool(r['restore_exact'])}; tree "
            f"{r['tree_s']:.1f} s, session init {r['init_s']:.1f} s; labelled {r['labelled']:,}; "
            f"peak RSS so far {rss:.2f} GiB",
            flush=True,
        )
    ref = rows[0]
    print(f"\nratios against n={ref['n']:,} (same run):")
    for r in rows:
        print(
            f"  n={r['n']:>10,}  us/answer x{r['us_per_answer'] / ref['us_per_answer']:.2f}  "
            f"bytes/answer x{r['bytes_per_answer'] / ref['bytes_per_answer']:.2f}  "
            f"mean save / whole snapshot = {r['bytes_per_save_mean'] / r['snapshot_bytes']:.2e}"
        )


if __name__ == "__main__":
    main()
