#!/usr/bin/env bash
# The main job on a fresh machine: install, then
#  0. `maskprop demo`: the paper's loop on images end to end (synthetic scenes -> train the
#     detector -> detect -> cluster -> verify with a simulated crowd -> propagate -> retrain,
#     2 rounds; out/demo/report.json, annotations.json, plots; ~10 minutes on 2 CPU cores);
#  1. the whole pipeline in one process (embedded: in-memory bus, embedded store): a simulated
#     detector's 20,000 masks -> clusterer -> search -> a simulated crowd -> sink -> COCO,
#     checked against the library (out/run/run_report.json, out/run/annotations.json);
#  2. the paper's large-scale simulation (200,000 masks, 100 classes, paper parameters) against
#     manual polygons, naive verification and LSUN (out/simulate/report.json + plots).
# Extra arguments go to `maskprop simulate`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${MASKPROP_OUT:-$root/out}"
bash "$root/scripts/bootstrap.sh" detector
rm -rf "$out/run" "$out/demo"  # the demo's own output: a rerun starts afresh
"$root/.venv/bin/maskprop" demo --out "$out/demo"
"$root/.venv/bin/maskprop" run --config "$root/configs/embedded-demo.toml" --out "$out/run"
exec "$root/.venv/bin/maskprop" simulate --masks 200000 --classes 100 --seed 0 \
  --out "$out/simulate" "$@"
