"""Each kernel level this host supports (avx512, avx2, scalar), selected with
KT_LLAMAFILE_ISA in a subprocess, passes the per-type matmul checks and quantises activations
to the same bytes; a level above the CPU's is never selected (no SIGILL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kt_llamafile import _lib

LEVELS = _lib.ISA_NAMES[: _lib.ISA_NAMES.index(_lib.available_isa()) + 1]


def _run_checks(isa: str) -> dict:
    env = dict(os.environ, KT_LLAMAFILE_ISA=isa)
    proc = subprocess.run([sys.executable, "-m", "kt_llamafile.testing", "2"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def results() -> dict[str, dict]:
    return {isa: _run_checks(isa) for isa in LEVELS}


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_each_level_passes_all_types(results, isa):
    if isa not in results:
        pytest.skip(f"this CPU has no {isa}")
    assert results[isa]["isa"] == isa
    assert set(results[isa]["worst"]) == set(_lib.QTYPE_IDS)


def test_levels_quantise_activations_identically(results):
    digests = {isa: r["digest"] for isa, r in results.items()}
    assert len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1, digests


def test_unknown_or_higher_level_request_falls_back():
    env = dict(os.environ, KT_LLAMAFILE_ISA="avx512")
    code = "from kt_llamafile import _lib; print(_lib.selected_isa(), _lib.available_isa())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1]  # never above what the CPU has
    with pytest.raises(ValueError):
        _lib.select_isa("amx")
