#!/usr/bin/env bash
# Create or refresh the project virtual environment (.venv) with pinned torch/torchvision.
# Idempotent: skips pip when pyproject.toml and constraints.txt are unchanged since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.he2st-install-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing he2st and its dependencies into .venv (first run takes a few minutes)..." >&2
  log=.venv/pip-install.log
  status=0
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]" >"$log" 2>&1 \
    || status=$?
  grep -v -E "^WARNING: Location .* is ignored" "$log" >&2 || true
  if [ "$status" -ne 0 ]; then
    echo "error: installing he2st and its dependencies into .venv failed (pip exit $status; log: $log)" >&2
    exit 1
  fi
  .venv/bin/python -c "import he2st, torch, torchvision, timm" # fail loudly if the install is broken
  echo "$want" > "$stamp"
fi
# Data: the shared read-only her2st copy next to the checkout is a filled cache (see README).
if [ -z "${HE2ST_DATA_DIR:-}" ] && [ -d ../shared/data/her2st/data ]; then
  echo "export HE2ST_DATA_DIR=$(cd ../shared/data/her2st && pwd)"
fi
