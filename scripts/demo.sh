#!/usr/bin/env bash
# Set up the environment if needed, then run the he2st demo on her2st (fetch -> prepare -> embed -> benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
# An assignment keeps setup.sh's exit status (set -e stops here when it fails); `eval "$(...)"` would not.
setup_env=$(bash scripts/setup.sh)
eval "$setup_env"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec .venv/bin/he2st demo "$@"
