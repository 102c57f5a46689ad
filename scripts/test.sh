#!/usr/bin/env bash
# Install everything the tests need, start the real Kafka broker and Redis server on
# 127.0.0.1 (scripts/dev-infra.sh), and run every tier: lint, types, stubs, then pytest
# (unit, in-process, integration).  Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/bootstrap.sh dev,detector,detectron2
# Real headless Chromium for the annotator-page test (Debian's build; Playwright drives it).
if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium"
  if [ "$(id -u)" = 0 ]; then apt_get="apt-get"; else apt_get="sudo apt-get"; fi
  $apt_get update -qq && $apt_get install -y -qq chromium >/dev/null
fi
echo "== ruff"
.venv/bin/ruff check src services tests benchmarks scripts
.venv/bin/ruff format --check src services tests benchmarks scripts
echo "== mypy"
.venv/bin/mypy
echo "== protos"
.venv/bin/python scripts/gen_protos.py --check
echo "== kafka + redis"
bash scripts/dev-infra.sh up
trap 'bash scripts/dev-infra.sh down >/dev/null 2>&1 || true' EXIT
# shellcheck disable=SC1091
source .cache/dev-infra/env
export MASKPROP_IT_KAFKA="$KAFKA_BOOTSTRAP" MASKPROP_IT_REDIS="$REDIS_URL"
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
