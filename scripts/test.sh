#!/usr/bin/env bash
# Set everything up and run the whole test suite (fast tests on tiny models + slow tests on the
# embedded default model). Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
python -m pytest -q -ra --durations=15 "$@"
