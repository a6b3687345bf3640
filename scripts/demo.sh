#!/usr/bin/env bash
# Set up the environment if needed, then run the he2st demo on her2st (fetch -> prepare -> embed -> benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/setup.sh)"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/he2st demo "$@"
