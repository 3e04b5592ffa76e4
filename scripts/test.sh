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
# kt-marlin's Triton-interpreter tests run in a process of their own: after the kt-amx and
# core suites in one process, Triton's interpreter fails to patch tl.* inside kt-marlin's
# matmul kernel ("Cannot call @triton.jit'd outside of the scope of a kernel"); each part
# passes alone, and the cause is not found yet.
if [ $# -gt 0 ]; then  # a chosen selection runs as asked
    exec .venv/bin/python -m pytest -q "$@"
fi
status=0
.venv/bin/python -m pytest -q --ignore=plugins/kt_marlin || status=$?
.venv/bin/python -m pytest -q plugins/kt_marlin || status=$?
exit "$status"
