#!/usr/bin/env bash
# Creates .venv (if missing) and installs ktcore, its plugins, the example plugin and the test
# tools into it, editable. Safe to run again: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: on the project's machines this picks the CPU build from the local wheel
# directory instead of pulling several GB of CUDA packages.
"${PIP[@]}" "torch==${TORCH_VERSION:-2.13.0}"
"${PIP[@]}" -e ".[test]"
"${PIP[@]}" --no-deps -e plugins/kt_amx -e plugins/kt_llamafile -e plugins/kt_marlin -e examples/kt_example_plugin
"${PIP[@]}" cffi
