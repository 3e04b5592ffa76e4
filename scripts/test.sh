#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs the whole test suite on this host.
# Tests that need a GPU or AMX are marked and skipped here with the reason; tests that need
# llama.cpp run when it was built (KT_WITH_LLAMACPP=1, as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
src=$(ls -d .cache/llamacpp/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -n 1 || true)
if [ -z "${KT_LLAMACPP_SRC:-}" ] && [ -n "$src" ]; then
    export KT_LLAMACPP_SRC=$PWD/$src
fi
exec .venv/bin/python -m pytest -q "$@"
