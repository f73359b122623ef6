#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (unit tests on tiny models, integration tests on
# the real offline MiniLM teacher and Rotten Tomatoes data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
