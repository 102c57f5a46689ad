"""Tree building: maskprop.tree.build_tree against scipy.cluster.hierarchy.linkage.

Both build the exact complete-linkage tree over the same embedded vectors.  Each run happens in
a fresh child process so its peak resident memory (ru_maxrss) is its own.  Prints one line per
size with wall times, peak memory and the ratios (baseline / ours).

    python benchmarks/bench_tree.py            # n = 10000 and 20000
    python benchmarks/bench_tree.py 5000 30000
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
n, which = int(sys.argv[1]), sys.argv[2]
rng = np.random.default_rng(0)
# 40 well-separated groups in d=32, like one class of mask-attention features.
centres = rng.normal(0, 4, size=(40, 32))
f = centres[rng.integers(0, 40, n)] + rng.normal(size=(n, 32))
s = rng.uniform(size=n)
from maskprop.tree import build_tree, embed
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if which == "maskprop":
    tree = build_tree(f, s)
    heights = np.sort(tree.height[n:])
else:
    from scipy.cluster.hierarchy import linkage
    z = linkage(embed(f, s), method="complete")
    heights = np.sort(z[:, 2])
secs = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": secs, "peak_mib": peak / 1024, "delta_mib": (peak - base) / 1024,
                  "height_checksum": float(heights.sum())}))
"""


def run(n: int, which: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(n), which], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10_000, 20_000]
    print(
        f"{'n':>7} {'scipy s':>9} {'ours s':>8} {'speed-up':>9} "
        f"{'scipy MiB':>10} {'ours MiB':>9} {'memory ratio':>13} same-heights"
    )
    for n in sizes:
        ref = run(n, "scipy")
        ours = run(n, "maskprop")
        same = abs(ref["height_checksum"] - ours["height_checksum"]) <= 1e-6 * abs(
            ref["height_checksum"]
        )
        print(
            f"{n:>7} {ref['seconds']:>9.2f} {ours['seconds']:>8.2f} "
            f"{ref['seconds'] / ours['seconds']:>8.2f}x {ref['delta_mib']:>10.0f} "
            f"{ours['delta_mib']:>9.0f} {ref['delta_mib'] / max(ours['delta_mib'], 1):>12.2f}x "
            f"{same}"
        )


if __name__ == "__main__":
    main()
