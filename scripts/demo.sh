#!/usr/bin/env bash
# The main job on a fresh machine: install, then run the paper's large-scale simulation
# (200k masks, 100 classes, paper parameters).  Extra arguments go to `maskprop simulate`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/maskprop" simulate --masks 200000 --classes 100 --seed 0 \
  --out "${MASKPROP_OUT:-$root/out/simulate}" "$@"
