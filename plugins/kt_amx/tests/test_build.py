"""ISA detection and selection (KT_AMX_ISA) in fresh processes, and the sanitizer build:
ASan + UBSan, with the AMX tile code emulated in C so that its paths run on any AVX-512 host,
checked by ``python -m kt_amx.selfcheck`` with libasan preloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kt_amx import _build, _lib
from ktcore.backends.host import cpu_flags

AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"}
AMX_FLAGS = {"amx_tile", "amx_int8", "amx_bf16"}


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


SELECTED = "import logging; logging.basicConfig(); from kt_amx import _lib; print(_lib.selected_isa())"


def test_detection_agrees_with_cpuinfo():
    flags = cpu_flags()
    expected = "avx2"
    if AVX512_FLAGS <= flags:
        expected = "avx512"
        if AMX_FLAGS <= flags and 3 in _build.variant_levels(False) and not _lib.amx_emulated():
            expected = "amx"
    assert _lib.available_isa() == expected


# ids without the bare word "amx": the root conftest skips tests with that keyword off AMX hosts
@pytest.mark.parametrize("isa", ["avx2", "avx512", "amx"], ids=lambda v: f"KT_AMX_ISA={v}")
def test_env_selects_a_level(isa):
    proc = run_python(SELECTED, KT_AMX_ISA=isa)
    assert proc.returncode == 0, proc.stderr
    if isa in _lib.isas_here():
        assert proc.stdout.strip() == isa and "KT_AMX_ISA" not in proc.stderr
    else:  # never above what the CPU has: the best available, with a warning
        assert proc.stdout.strip() == _lib.available_isa()
        assert "above what this CPU" in proc.stderr


def test_env_unknown_value_warns():
    proc = run_python(SELECTED, KT_AMX_ISA="sse9")
    assert proc.returncode == 0 and proc.stdout.strip() == _lib.available_isa()
    assert "not one of" in proc.stderr


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_sanitizer_build_runs_clean(tmp_path: Path):
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("libasan.so not found")
    flags = cpu_flags()
    emulate = not (AMX_FLAGS <= flags)  # on AMX hosts the real tiles run
    so = _build.build_into(tmp_path, sanitize=True, emulate_amx=emulate)
    env = {**os.environ, "KT_AMX_KERNELS": str(so), "KT_AMX_MIN_ROWS": "1", "KT_AMX_THREADS": "3",
           "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    # plain layers and AmxLinear, then layers split over 3 simulated NUMA nodes
    for args, extra in (([], {}), (["--numa", "split"], {"KT_AMX_NUMA": "3"})):
        proc = subprocess.run([sys.executable, "-m", "kt_amx.selfcheck", *args], capture_output=True, text=True,
                              timeout=300, env={**env, **extra})
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        assert "AddressSanitizer" not in log and "runtime error" not in log, log[-4000:]
        assert "MISMATCH" not in log and log.count(" ok") >= 60
        if AVX512_FLAGS <= flags:
            assert " amx " in log  # the (emulated) tile path ran
