#!/usr/bin/env bash
# Screenshots of the HTML report, the 3D stack viewer and the docs site's index for the documentation:
# tests/test_pages_browser.py opens each in a headless Chromium and saves report.png, stack_view.png and
# docs_index.png into docs/assets/screenshots/ (or the folder given as the first argument).
# Needs Chromium and chromedriver (Debian: apt-get install chromium chromium-driver) and he2st[dev].
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/assets/screenshots}
mkdir -p "$out"
eval "$(bash scripts/setup.sh)"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg HE2ST_SCREENSHOTS
HE2ST_SCREENSHOTS=$(cd "$out" && pwd)
.venv/bin/python -m pytest tests/test_pages_browser.py -q -rs
for name in report.png stack_view.png docs_index.png; do
  if [ -f "$HE2ST_SCREENSHOTS/$name" ]; then
    echo "$HE2ST_SCREENSHOTS/$name"
  else
    echo "not written: $name (its test was skipped: see above)" >&2
  fi
done
