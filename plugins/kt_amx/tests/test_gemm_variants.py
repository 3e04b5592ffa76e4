"""Both int8/int4 AMX tile kernels (``KT_AMX_GEMM=1``: one panel at a time; default / ``2``: 2 x 2
tile blocks with the rescale pipelined) against torch, on real AMX tiles or the emulated build
(``KT_AMX_EMULATE=1 python setup.py build_ext --inplace``).

The variant is read once per process, so each one runs in a fresh interpreter (this file in
worker mode) that computes every case on the AMX path (``KT_AMX_MIN_ROWS=1``) and saves the
outputs; the tests check each output against the reference and the two variants against each
other (they do the same integer sums and the same fp32 steps, so they agree bit for bit).

Cases: AmxLinear with int8 (group 32/64/128/per channel), symmetric and affine int4 (group
32/64/128, and one group spanning k: one panel per tile block, the unpacked group fills the
scratch); T rows -> M = 16, 32, 48, 64, 80 and 304 (two row blocks, 256 + 48); out_features
giving 1, 2, 3 and 5 panels per call (odd runs end with a single panel); one worker thread so
that the panels per call are known. AmxExperts at T = 1024 (gate/up one panel per call with up
to 256 rows, down several panels) for int8 and both int4 kinds.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# name: (options, in_features)
LINEAR_FORMATS = {
    "int8-g32": ({"format": "int8", "group_size": 32}, 96),
    "int8-g64": ({"format": "int8", "group_size": 64}, 192),
    "int8-g128": ({"format": "int8", "group_size": 128}, 384),
    "int8-channel": ({"format": "int8", "group_size": 0}, 160),
    "int4sym-g32": ({"format": "int4", "group_size": 32, "symmetric": True}, 96),
    "int4sym-g64": ({"format": "int4", "group_size": 64, "symmetric": True}, 256),
    "int4sym-g128": ({"format": "int4", "group_size": 128, "symmetric": True}, 384),
    "int4sym-g128-k128": ({"format": "int4", "group_size": 128, "symmetric": True}, 128),
    "int4aff-g32": ({"format": "int4", "group_size": 32, "symmetric": False}, 160),
    "int4aff-g64": ({"format": "int4", "group_size": 64, "symmetric": False}, 192),
    "int4aff-g128": ({"format": "int4", "group_size": 128, "symmetric": False}, 256),
    "int4aff-g64-k64": ({"format": "int4", "group_size": 64, "symmetric": False}, 64),
}
# panels: 3 -> 1 per call, 16 -> 2, 27 -> 3, 40 -> 5 (linear.c: npanels * blocks / 8, 1 worker)
LINEAR_OUT = [48, 256, 432, 640]
LINEAR_TOKENS = [16, 32, 48, 64, 80, 304]
EXPERT_FORMATS = {
    "int8-g32": ({"format": "int8", "group_size": 32}, (96, 160)),
    "int4sym-g64": ({"format": "int4", "group_size": 64, "symmetric": True}, (192, 320)),
    "int4aff-g32": ({"format": "int4", "group_size": 32, "symmetric": False}, (96, 160)),
}
EXPERTS, TOP_K, EXPERT_TOKENS = 8, 4, 1024
LINEAR_TOL = 2e-5   # test_linear.py's exact tolerance
EXPERT_TOL = 2e-3   # test_parity.py's (fp32 order may flip a rounding step of h)
VARIANTS = ("1", "2")


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def have_tiles() -> str | None:
    """None when the AMX kernels can run here (real tiles or the emulated build), else why not."""
    from kt_amx import _lib
    from ktcore.backends.host import cpu_flags

    if _lib.amx_emulated():
        return None
    if {"amx_tile", "amx_int8", "amx_bf16"} <= cpu_flags() and _lib.available_isa() == "amx":
        return None
    return ("needs AMX tiles: this CPU has none and kt_amx._kernels is not the emulated build "
            "(KT_AMX_EMULATE=1 python setup.py build_ext --inplace in plugins/kt_amx)")


def linear_cases():
    for fmt in LINEAR_FORMATS:
        for n in LINEAR_OUT:
            for t in LINEAR_TOKENS:
                yield fmt, n, t


def worker(out_path: str) -> None:
    """Runs every case with the variant in KT_AMX_GEMM and saves {case: (y, rel error)}."""
    import torch.nn.functional as F

    from kt_amx import _lib, reference
    from kt_amx.experts import AmxExperts
    from kt_amx.linear import AmxLinear
    from kt_amx.reference import round_activations
    from ktcore.ops.experts import ExpertsSpec
    from ktcore.ops.linear import LinearSpec

    assert _lib.selected_isa() == "amx", _lib.selected_isa()
    results = {}
    for fmt, n, t in linear_cases():
        options, k = LINEAR_FORMATS[fmt]
        gen = torch.Generator().manual_seed(n * 1000 + k)
        lin = AmxLinear(LinearSpec(k, n, False), "cpu", options)
        lin.load_weights({"weight": torch.randn(n, k, generator=gen) * k**-0.5})
        x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
        y = lin(x)
        xr = round_activations(x, lin.layer_format, "amx", lin.layer_format.group_for(k))
        results[f"linear/{fmt}/n{n}/t{t}"] = (y, rel(y, F.linear(xr, lin.dequantized())))
    for fmt, (options, (h, i)) in EXPERT_FORMATS.items():
        gen = torch.Generator().manual_seed(h + i)
        weights = {"gate": torch.randn(EXPERTS, i, h, generator=gen) * h**-0.5,
                   "up": torch.randn(EXPERTS, i, h, generator=gen) * h**-0.5,
                   "down": torch.randn(EXPERTS, h, i, generator=gen) * i**-0.5}
        experts = AmxExperts(ExpertsSpec(EXPERTS, h, i, TOP_K), "cpu", options)
        experts.load_weights(weights)
        x = torch.randn(EXPERT_TOKENS, h, generator=gen)
        ids = torch.randint(0, EXPERTS, (EXPERT_TOKENS, TOP_K), generator=gen)
        w = torch.rand(EXPERT_TOKENS, TOP_K, generator=gen)
        y = experts(x, ids, w)
        results[f"experts/{fmt}"] = (y, rel(y, reference.forward(experts, x, ids, w, "amx")))
    torch.save(results, out_path)


@functools.lru_cache(maxsize=None)
def run_variant(variant: str, out_dir: str) -> dict:
    out = Path(out_dir, f"variant{variant}.pt")
    env = {**os.environ, "KT_AMX_GEMM": variant, "KT_AMX_ISA": "amx", "KT_AMX_MIN_ROWS": "1",
           "KT_AMX_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, env=env,
                          timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    reason = have_tiles()
    if reason:
        pytest.skip(reason)
    out_dir = str(tmp_path_factory.mktemp("gemm_variants"))
    return {v: run_variant(v, out_dir) for v in VARIANTS}


# ids say "KT_AMX_GEMM=..", never the bare word that the root conftest skips off AMX hosts
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"KT_AMX_GEMM={v}")
def test_variant_matches_reference(outputs, variant):
    results = outputs[variant]
    assert len(results) == len(LINEAR_FORMATS) * len(LINEAR_OUT) * len(LINEAR_TOKENS) + len(EXPERT_FORMATS)
    bad = {case: err for case, (y, err) in results.items()
           if not (torch.isfinite(y).all() and err < (EXPERT_TOL if case.startswith("experts") else LINEAR_TOL))}
    assert not bad, bad


def test_variants_agree(outputs):
    a, b = outputs["1"], outputs["2"]
    assert a.keys() == b.keys()
    differ = {case: rel(b[case][0], a[case][0]) for case in a if not torch.equal(a[case][0], b[case][0])}
    assert not differ, differ


if __name__ == "__main__":
    worker(sys.argv[1])
