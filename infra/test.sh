#!/usr/bin/env bash
# The whole test suite (the README's test command runs .ci/run, which installs deps, then this).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
python -m pytest -q "$@"
