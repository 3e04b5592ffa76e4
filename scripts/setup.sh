#!/usr/bin/env bash
# Creates .venv (if missing) and installs ktcore, its plugins, the example plugin and the test
# tools into it, editable. Safe to run again: pip skips what is already installed.
#
# KT_WITH_LLAMACPP=1 also builds llama.cpp (llama-cpp-python from its source distribution,
# about 5-10 minutes on 2 cores) and unpacks its sources into .cache/llamacpp: the tests then
# run our GGUF files in llama.cpp and llama.cpp's own converter on our models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LLAMACPP_VERSION=0.3.36
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: on the project's machines this picks the CPU build from the local wheel
# directory instead of pulling several GB of CUDA packages.
"${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[test]" cffi
# Triton for kt-marlin's kernels: on a CPU-only host its tests run them in the interpreter.
"${PIP[@]}" triton
"${PIP[@]}" --no-deps -e plugins/kt_amx -e plugins/kt_llamafile -e plugins/kt_marlin -e examples/kt_example_plugin

if [ "${KT_WITH_LLAMACPP:-0}" = 1 ]; then
    sdist=.cache/llamacpp/llama_cpp_python-$LLAMACPP_VERSION.tar.gz
    if [ ! -f "$sdist" ]; then
        .venv/bin/python -m pip download --quiet --no-deps --no-binary=:all: \
            "llama-cpp-python==$LLAMACPP_VERSION" -d .cache/llamacpp
    fi
    [ -d ".cache/llamacpp/llama_cpp_python-$LLAMACPP_VERSION" ] || tar xzf "$sdist" -C .cache/llamacpp
    if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
            "${PIP[@]}" "$sdist"
    fi
fi
