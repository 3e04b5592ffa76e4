"""ktcore's K-quant quantisers (``ktcore/formats/kquants.py``): block sizes, error bounds,
byte-identity with ggml's reference quantiser, and a Q4_K GGUF written and read back.

``gguf.quants.dequantize`` (bit-exact with ggml) is the reference for what the bytes mean.
When llama-cpp-python's ``libggml-base`` is installed, ``ggml_quantize_chunk`` (no imatrix:
``quantize_row_qN_K_ref``) quantises the same data: ours must be within 1.25x of its error
(it is equal: the bytes are identical, which is checked too, allowing 1% of bytes to differ
for a libggml built with fused multiply-adds).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import QuantError, dequantize
from gguf.quants import quantize as gguf_quantize

from ktcore.formats import kquants
from ktcore.formats.gguf_names import canonical_shapes, gguf_plan, to_gguf
from ktcore.formats.gguf_read import GGUFStore
from ktcore.formats.gguf_write import write_gguf
from ktcore.models.presets import make_config
from ktcore.ops.weights import GGUFWeight, gguf_nbytes

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
SHAPES = [(1, 256), (7, 512), (3, 2, 1024)]

#: Relative RMS error bound on Gaussian rows. A uniform quantiser's error is step/sqrt(12);
#: with the expected range of a sub-block of standard normals the step gives Q6_K (16 values,
#: 64 symmetric levels, range ~2 x 1.9) ~1.7%, Q5_K (32 values, 32 affine levels over ~4.1)
#: ~3.8%, Q4_K (16 levels) ~7.9%, Q3_K (16 values, 8 symmetric levels) ~14%, Q2_K (4 levels
#: over ~3.5) ~34%. ggml's scale search lands at 1.78%, 3.62%, 7.19%, 15.1%, 29.6% on this
#: data; the bounds leave ~10% on top.
BOUND = {"Q2_K": 0.33, "Q3_K": 0.17, "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}

def _outliers(rng, shape):
    x = rng.standard_normal(shape)
    x[rng.random(shape) < 0.01] *= 30
    return x


#: data: (multiplier of BOUND, generator). Heavy tails put a large value in some sub-blocks,
#: whose step grows with it; "tiny" (std 1e-3) puts Q6_K's float16 super-block scale d into
#: float16's subnormal range, which costs it ~15%.
DATA = {
    "normal": (1.0, lambda rng, shape: rng.standard_normal(shape)),
    "uniform": (1.0, lambda rng, shape: rng.uniform(-1, 1, shape)),
    "positive": (1.0, lambda rng, shape: rng.uniform(0.5, 2, shape)),
    "laplace": (1.3, lambda rng, shape: rng.laplace(size=shape)),
    "outliers": (2.0, _outliers),
    "tiny": (1.3, lambda rng, shape: rng.standard_normal(shape) * 1e-3),
    "huge": (1.05, lambda rng, shape: rng.standard_normal(shape) * 1e3),
}


@functools.lru_cache(maxsize=None)
def _ggml():
    """``ggml_quantize_chunk`` of llama-cpp-python's libggml-base, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.ggml_quantize_chunk
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    return fn


def ggml_quantize(x: np.ndarray, qtype: str) -> np.ndarray | None:
    fn = _ggml()
    if fn is None:
        return None
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    kind = GGMLQuantizationType[qtype]
    out = np.zeros((*x.shape[:-1], n // 256 * GGML_QUANT_SIZES[kind][1]), dtype=np.uint8)
    assert fn(int(kind), x.ctypes.data, out.ctypes.data, 0, x.size // n, n, None) == out.size
    return out


def _rel_err(x: np.ndarray, q: np.ndarray, qtype: str) -> float:
    y = dequantize(q, GGMLQuantizationType[qtype]).astype(np.float64)
    assert y.shape == x.shape and np.isfinite(y).all()
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize("qtype", K_TYPES)
def test_errors_sizes_and_ggml_agreement(qtype):
    rng = np.random.default_rng(K_TYPES.index(qtype))
    for data, (factor, gen) in DATA.items():
        for shape in SHAPES:
            x = gen(rng, shape).astype(np.float32)
            ours = kquants.quantize(x, qtype)
            assert ours.dtype == np.uint8 and ours.flags.c_contiguous
            assert ours.shape == (*shape[:-1], shape[-1] // 256 * GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1])
            assert ours.nbytes == gguf_nbytes(qtype, shape)
            err = _rel_err(x, ours, qtype)
            assert err < factor * BOUND[qtype], (data, shape, err)
            ref = ggml_quantize(x, qtype)
            if ref is not None:
                assert err <= 1.25 * _rel_err(x, ref, qtype) + 1e-6, (data, shape)
                assert np.mean(ours == ref) >= 0.99, (data, shape)
    if _ggml() is not None:  # the bulk comparison, on enough blocks to mean something
        x = rng.standard_normal((64, 4096)).astype(np.float32)
        ours, ref = kquants.quantize(x, qtype), ggml_quantize(x, qtype)
        assert np.mean(ours == ref) >= 0.99
        assert _rel_err(x, ours, qtype) <= 1.001 * _rel_err(x, ref, qtype)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_zero_constant_and_extreme_rows(qtype):
    kind = GGMLQuantizationType[qtype]
    zeros = np.zeros((3, 512), np.float32)
    assert np.array_equal(dequantize(kquants.quantize(zeros, qtype), kind), zeros)  # exact zeros, not -0/NaN
    # a zero row among non-zero ones, a zero sub-block, a single spike
    x = np.random.default_rng(5).standard_normal((4, 512)).astype(np.float32)
    x[1] = 0
    x[2, :32] = 0
    x[3] = 0
    x[3, 300] = 7
    y = dequantize(kquants.quantize(x, qtype), kind)
    assert np.isfinite(y).all() and np.array_equal(y[1], x[1]) and (y[2, :32] == 0).all()
    assert abs(y[3, 300] - 7) < 0.05 * 7 and (y[3, :256] == 0).all()
    # constant rows, both signs: exact up to the rounding of the float16 scales (with values
    # this large; small positive constants put Q4_K's d = c / 945 among float16 subnormals)
    for c in (0.37, -1.7, -0.05, 250.0):
        x = np.full((2, 256), c, np.float32)
        y = dequantize(kquants.quantize(x, qtype), kind)
        assert np.isfinite(y).all() and np.abs(y - c).max() <= 2e-3 * abs(c), (c, y[0, :4])
    # magnitudes at the ends of (and beyond) what float16 scales can hold: always finite;
    # where ggml's own result is finite, ours is no worse
    base = np.random.default_rng(6).standard_normal((2, 512)).astype(np.float32)
    for scale in (1e-30, 1e-7, 1e-5, 1e5, 1e8, 1e30):
        x = (base * np.float32(scale)).astype(np.float32)
        y = dequantize(kquants.quantize(x, qtype), kind)
        assert np.isfinite(y).all(), scale
        with np.errstate(all="ignore"):
            ref = ggml_quantize(x, qtype)
            if ref is not None and np.isfinite(dequantize(ref, kind)).all():
                assert _rel_err(x, kquants.quantize(x, qtype), qtype) <= 1.25 * _rel_err(x, ref, qtype) + 1e-6


def test_bad_input_and_dispatch():
    with pytest.raises(QuantError, match="multiple of 256"):
        kquants.quantize_q4_k(np.zeros((2, 128), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        kquants.quantize(np.full((1, 256), np.nan, np.float32), "Q6_K")
    x = np.random.default_rng(7).standard_normal((3, 256)).astype(np.float32)
    for qtype in ("Q8_0", "Q4_0", "Q5_1", "F16", "BF16"):  # passed through to gguf.quants
        kind = GGMLQuantizationType[qtype]
        assert np.array_equal(kquants.quantize(x, qtype), gguf_quantize(x, kind))
    kind = GGMLQuantizationType.Q5_K  # the enum works as well as the name; float64 input is cast
    assert np.array_equal(kquants.quantize(x.astype(np.float64), kind), kquants.quantize_q5_k(x))
    # chunking over blocks does not change anything
    big = np.random.default_rng(8).standard_normal((5, 256 * 3)).astype(np.float32)
    whole = kquants.quantize_q4_k(big)
    chunk, kquants._CHUNK_BLOCKS = kquants._CHUNK_BLOCKS, 4
    try:
        assert np.array_equal(kquants.quantize_q4_k(big), whole)
    finally:
        kquants._CHUNK_BLOCKS = chunk


def test_q4_k_gguf_round_trip(tmp_path, caplog):
    """A model whose rows are multiples of 256 is written as real Q4_K (no fallback) and reads
    back with the very bytes ``kquants`` produces."""
    config = make_config("qwen3_moe", "tiny", layers=2, hidden_size=256, moe_intermediate_size=256, head_dim=64)
    gen = torch.Generator().manual_seed(3)
    tensors = {name: torch.randn(shape, generator=gen) * 0.05 for name, shape in canonical_shapes(config).items()}
    with caplog.at_level(logging.WARNING):
        path = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q4_K")[0]
    assert "falling back" not in caplog.text
    store = GGUFStore(path)
    n_q4k = 0
    for spec in gguf_plan(config):
        weight = store.get(spec.source)
        x = to_gguf(spec, tensors[spec.source]).numpy()
        if spec.keep_f32:
            assert store.gguf_type(spec.source) == "F32"
            continue
        n_q4k += 1
        assert store.gguf_type(spec.source) == "Q4_K" and isinstance(weight, GGUFWeight), spec.name
        ours = kquants.quantize(x, "Q4_K")
        assert weight.data.numpy().tobytes() == ours.tobytes(), spec.name
        dense = weight.to_dense(torch.float32).numpy()
        assert np.array_equal(dense, dequantize(ours, GGMLQuantizationType.Q4_K)), spec.name
        assert _rel_err(x, ours, "Q4_K") < BOUND["Q4_K"], spec.name
    assert n_q4k >= 8  # embeddings, attention, experts, lm_head
