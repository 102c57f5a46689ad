#!/usr/bin/env bash
# Create .venv (if needed) and install maskprop into it; "dev" adds the test tools,
# "detectron2" the PointRend backend (its dependencies, then scripts/install_detectron2.py:
# the sha256-pinned sdist, patched, installed without build isolation; a no-op when present).
# Sourced by scripts/demo.sh and scripts/test.sh so the install step exists once.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extra="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
  "$py" -m venv "$root/.venv"
fi
"$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
if [ -n "$extra" ]; then
  "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[$extra]"
else
  "$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root"
fi
case ",$extra," in
  *,detectron2,*) "$root/.venv/bin/python" "$root/scripts/install_detectron2.py" ;;
esac
