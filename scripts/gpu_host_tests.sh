#!/usr/bin/env bash
# On the GPU host (no network; its image has torch with CUDA, triton, transformers): installs
# ktcore and the plugins into the image's Python without touching its packages, plus the
# wheels carried in .whl/ (gguf, cffi, pycparser: see the device notes), then runs the tests
# marked cuda or amx. Extra arguments go to pytest. Logs go to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=/tmp/ktcore-site
mkdir -p "$SITE"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl || exit 1
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
for pkg in . plugins/kt_amx plugins/kt_llamafile plugins/kt_marlin examples/kt_example_plugin; do
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$pkg" || exit 1
done
log=${OUT:-/tmp}/gpu_host_tests.log
"$PY" -m pytest -q -m "cuda or amx" -p no:cacheprovider "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
