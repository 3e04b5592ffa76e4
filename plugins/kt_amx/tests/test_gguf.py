"""Packing from GGUF blocks: Q8_0, Q4_0 and Q4_K exactly (bit for bit against gguf's reference
dequantisation), mixed types, and lossy conversions only on request."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from kt_amx import _lib, reference
from kt_amx.experts import AmxExperts
from kt_amx.packing import LayerFormat, layer_format, pack_matrix, unpack
from ktcore.errors import WeightError
from ktcore.ops.experts import ExpertsSpec, TorchExperts
from ktcore.ops.weights import GGUFWeight

E, H, I, K = 4, 256, 512, 2
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def random_gguf(qtype: str, shape: tuple[int, ...], seed: int) -> GGUFWeight:
    """Random blocks with sane fp16 scales (the other bytes are any bit pattern)."""
    rng = np.random.default_rng(seed)
    block, size = BLOCKS[qtype]
    rows = int(np.prod(shape[:-1]))
    nb = rows * shape[-1] // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)

    def fp16(lo, hi):
        return rng.uniform(lo, hi, size=(nb, 1)).astype(np.float16).view(np.uint8)

    if qtype in ("Q8_0", "Q4_0"):
        raw[:, 0:2] = fp16(1e-3, 2e-2)
    elif qtype == "Q4_K":
        raw[:, 0:2] = fp16(1e-4, 2e-3)
        raw[:, 2:4] = fp16(1e-4, 2e-3)
    else:  # Q6_K: ql[128] qh[64] scales[16] (int8) d
        raw[:, 192:208] = rng.integers(-32, 32, size=(nb, 16), dtype=np.int8).view(np.uint8)
        raw[:, 208:210] = fp16(1e-4, 1e-3)
    return GGUFWeight(torch.from_numpy(raw.reshape(-1)), qtype, shape, f"blk.0.{qtype}")


def sources(gate_type: str, up_type: str, down_type: str, seed: int = 0):
    return {"gate": random_gguf(gate_type, (E, I, H), seed),
            "up": random_gguf(up_type, (E, I, H), seed + 1),
            "down": random_gguf(down_type, (E, H, I), seed + 2)}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K"])
@pytest.mark.parametrize("owned", [None, (1, 3)])
def test_exact_packing(qtype, owned):
    src = random_gguf(qtype, (E, I, H), seed=1)
    fmt = layer_format({"gate": src}, {})
    packed, err = pack_matrix(src, owned, fmt)
    assert err is None
    ref = src.to_dense(torch.float32)  # gguf.quants, the bit-exact reference
    if owned is not None:
        ref = ref[list(owned)]
    assert torch.equal(unpack(packed, fmt), ref)


@pytest.mark.parametrize(("types", "expected"), [
    (("Q8_0", "Q8_0", "Q8_0"), LayerFormat("int8", 32)),
    (("Q4_0", "Q4_0", "Q4_0"), LayerFormat("int4", 32, symmetric=True)),
    (("Q4_K", "Q4_K", "Q4_K"), LayerFormat("int4", 32, symmetric=False, scale_f32=True)),
    (("Q4_K", "Q4_K", "Q4_0"), LayerFormat("int4", 32, symmetric=False, scale_f32=True)),
    (("Q4_0", "Q4_0", "Q8_0"), LayerFormat("int8", 32)),
])
def test_native_formats_are_exact(types, expected):
    src = sources(*types)
    assert layer_format(src, {}) == expected
    for s in src.values():
        packed, err = pack_matrix(s, None, expected)
        assert err is None and torch.equal(unpack(packed, expected), s.to_dense(torch.float32))


@pytest.mark.parametrize("isa", [pytest.param(i, marks=[pytest.mark.amx] if i == "amx" else [])
                                 for i in ("avx2", "avx512", "amx")])
@pytest.mark.parametrize("types", [("Q4_K",) * 3, ("Q8_0",) * 3, ("Q4_0",) * 3])
def test_forward_from_gguf(isa, types):
    if isa not in _lib.isas_here():
        pytest.skip(f"no {isa} here")
    src = sources(*types, seed=5)
    spec = ExpertsSpec(E, H, I, K, owned=(0, 2, 3))
    amx = AmxExperts(spec, "cpu", {})
    amx.load_weights(src)
    ref = TorchExperts(spec, "cpu", {"dtype": "fp32"})
    ref.load_weights(src)
    x = torch.randn(9, H) * 4
    ids = torch.randint(0, E + 1, (9, K))
    w = torch.rand(9, K)
    with _lib.use_isa(isa):
        y = amx(x, ids, w)
    r = ref(x, ids, w)
    assert float((y - r).norm() / r.norm()) < 3e-2
    e = reference.forward(amx, x, ids, w, isa)
    assert float((y - e).norm() / e.norm()) < 2e-3


def test_mixed_types_need_an_explicit_format(caplog):
    src = sources("Q4_K", "Q4_K", "Q6_K")
    spec = ExpertsSpec(E, H, I, K)
    with pytest.raises(WeightError, match="Q6_K"):
        AmxExperts(spec, "cpu", {}).load_weights(src)
    amx = AmxExperts(spec, "cpu", {"format": "int4"})
    with caplog.at_level(logging.WARNING, logger="kt_amx.experts"):
        amx.load_weights(src)
    assert amx.layer_format == LayerFormat("int4", 32, symmetric=False, scale_f32=True)
    assert any("Q6_K" in r.getMessage() and "relative error" in r.getMessage() for r in caplog.records)
    # gate/up stay exact, down carries the reported conversion error
    dq = amx.dequantized()
    assert torch.equal(dq["gate"], src["gate"].to_dense(torch.float32))
