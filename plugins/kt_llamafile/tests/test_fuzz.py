"""Random bytes as GGUF blocks never crash the library or make it read out of bounds: the fuzz
driver (kt_llamafile.fuzz) runs in-process on the installed build, and on an
AddressSanitizer + UBSan build (made into a temporary directory) with libasan preloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kt_llamafile import _build, fuzz

ASAN_CASES = 3000


def test_fuzz_in_process():
    fuzz.main(cases=1500, seed=1)


def _libasan() -> str | None:
    cc = _build.compiler()
    try:
        out = subprocess.run([*cc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return out if os.path.isabs(out) and Path(out).exists() else None


@pytest.fixture(scope="module")
def sanitized_build(tmp_path_factory) -> Path:
    if _libasan() is None or shutil.which(_build.compiler()[0]) is None:
        pytest.skip("no C compiler with AddressSanitizer (libasan) on this host")
    return _build.build_into(tmp_path_factory.mktemp("ktl_asan"), sanitize=True)


def test_fuzz_under_address_sanitizer(sanitized_build):
    env = dict(os.environ,
               LD_PRELOAD=_libasan(),
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               KT_LLAMAFILE_KERNELS=str(sanitized_build))
    env.pop("KT_LLAMAFILE_ISA", None)
    proc = subprocess.run([sys.executable, "-m", "kt_llamafile.fuzz", str(ASAN_CASES), "7"], env=env,
                          capture_output=True, text=True, timeout=300)
    report = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and f"OK {ASAN_CASES}" in proc.stdout, report
    assert "AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, report


def test_sanitizer_catches_an_overread(sanitized_build):
    """The harness works: a weight buffer one byte short is reported, on every kernel level."""
    code = ("import numpy as np\n"
            "from kt_llamafile.fuzz import Fuzzer\n"
            "f = Fuzzer(0)\n"
            "f.lib.ktl_isa_select(f.levels - 1)\n"
            "w = np.zeros(144 * 4 - 1, dtype=np.uint8)\n"
            "x = np.zeros((1, 256), np.float32); y = np.zeros((1, 4), np.float32)\n"
            "f.lib.ktl_matmul(f.pool, 12, f.ptr(w), 4, 256, f.ptr(x, 'float *'), 1, f.ptr(y, 'float *'))\n")
    env = dict(os.environ, LD_PRELOAD=_libasan(), ASAN_OPTIONS="detect_leaks=0",
               KT_LLAMAFILE_KERNELS=str(sanitized_build))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    # a wide vector load straddling the end is reported as "unknown-crash", a byte load as
    # "heap-buffer-overflow": either way ASan names the access and aborts
    assert proc.returncode != 0 and "ERROR: AddressSanitizer" in proc.stderr, proc.stderr[-3000:]
