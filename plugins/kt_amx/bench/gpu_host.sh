#!/usr/bin/env bash
# kt-amx on the GPU host (Intel Xeon with AMX): install, AMX tests, benchmark. Run from the
# repository root:  bash plugins/kt_amx/bench/gpu_host.sh [THREADS]
# Writes env.txt, tests.log, bench.log (+ the NUMA split run), bench_amx.json and sweep_*.json under $OUT (at most 8
# files come back from the device tool), install.log only when the editable install fails.
# Packages the host image lacks (cffi for Python 3.12, pycparser, gguf) are read as wheels
# from plugins/kt_amx/.whl when present (see README.md).
set -u
OUT=${OUT:-/tmp/kt_amx_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/../../.."
PY=${PYTHON:-python3}
THREADS=${1:-14}
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
step() { echo "=== $(date +%T) $*"; }

step env
{
    nproc; lscpu | grep -E "Model name|Thread|Core|Socket|NUMA node\(s\)|L3"
    grep -o -w -E "amx_tile|amx_int8|amx_bf16|avx512_bf16|avx512_vnni" /proc/cpuinfo | sort | uniq -c
    gcc --version | head -1; "$PY" --version
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step install
if ls plugins/kt_amx/.whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site plugins/kt_amx/.whl/*.whl \
        >> /tmp/kt_amx_install.log 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/kt_amx \
        >> /tmp/kt_amx_install.log 2>&1; then
    echo "editable install failed; building in place"
    (cd plugins/kt_amx && "$PY" setup.py -q build_ext --inplace) >> /tmp/kt_amx_install.log 2>&1
    export PYTHONPATH=$PWD:$PWD/plugins/kt_amx:$PYTHONPATH
    cp /tmp/kt_amx_install.log "$OUT/install.log"
fi
tail -3 /tmp/kt_amx_install.log
"$PY" -c "from kt_amx import _lib; print('isa', _lib.available_isa(), 'threads', _lib.default_threads())"

step "all tests (AMX included)"
timeout 200 "$PY" -m pytest plugins/kt_amx/tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.log" | tail -6

step bench
timeout 150 "$PY" plugins/kt_amx/bench/bench_experts.py --threads "$THREADS" --gpu-io \
    --json "$OUT/bench_amx.json" 2>&1 | tee "$OUT/bench.log"

step "sweeps: AMX row threshold, AVX-512 only, 16 threads"
B="plugins/kt_amx/bench/bench_experts.py --shapes deepseek-v3 --tokens 32 256 1024"
for rows in 1 33; do
    KT_AMX_MIN_ROWS=$rows timeout 45 "$PY" $B --threads "$THREADS" --json "$OUT/sweep_rows$rows.json" 2>&1 | tail -7
done
KT_AMX_ISA=avx512 timeout 45 "$PY" $B --threads "$THREADS" --json "$OUT/sweep_avx512.json" 2>&1 | tail -7
timeout 45 "$PY" plugins/kt_amx/bench/bench_experts.py --threads 16 --tokens 1 4 --json "$OUT/sweep_t16.json" 2>&1 | tail -5

step "NUMA split over 2 simulated nodes (the log only: at most 8 files come back)"
KT_AMX_NUMA=2 timeout 50 "$PY" plugins/kt_amx/bench/bench_experts.py --numa split --shapes deepseek-v3 --formats int4 \
    --tokens 1 32 256 --threads "$THREADS" --bw-gib 1 2>&1 | tee -a "$OUT/bench.log" | tail -5
step done
