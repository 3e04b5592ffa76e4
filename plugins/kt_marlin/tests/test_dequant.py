"""GGUF dequantisation kernels: bit-exact (fp32) with gguf.quants, rounded like torch for
fp16/bf16; the op under torch.compile, CUDA graphs and opcheck on the GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="kt-marlin's kernels need triton (pip install triton)")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from kt_marlin.dequant import QTYPES, dequantize, launch  # noqa: E402

SHAPES = [(1, 256), (3, 512), (5, 768)]  # ordinary, odd rows, 3 super-blocks per row


def _reference(raw: np.ndarray, qtype: str, shape) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType[qtype]).reshape(shape).copy())


@pytest.mark.parametrize("qtype", list(QTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_exact_fp32(qtype, shape, device, random_blocks):
    raw = random_blocks(qtype, shape, seed=hash((qtype, shape)) % 1000)
    ref = _reference(raw, qtype, shape)
    out = dequantize(torch.from_numpy(raw).to(device), qtype, shape, torch.float32).cpu()
    assert out.shape == ref.shape
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_round_like_torch(qtype, dtype, device, random_blocks):
    shape = (2, 512)
    raw = random_blocks(qtype, shape, seed=7)
    ref = _reference(raw, qtype, shape).to(dtype)
    out = dequantize(torch.from_numpy(raw).to(device), qtype, shape, dtype).cpu()
    assert out.dtype == dtype
    if device == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter casts fp32 -> bf16 by truncation (numpy has no bf16); the GPU
        # rounds to nearest-even like torch, which the cuda run checks exactly.
        ulp = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
        assert int(ulp.max()) <= 1
    else:
        assert torch.equal(out, ref)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy/the interpreter on NaN scales
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("config", [(4, 1), (16, 4), (64, 8)])
def test_kquant_tiles_bit_exact(qtype, config, device):
    """The K-quant kernel at several super-blocks per program over 37 super-blocks (a last,
    partly masked program) of random bytes, fp16 scales included."""
    rng = np.random.default_rng(len(qtype) * 100 + config[0])
    _, qk, size = QTYPES[qtype]
    raw = rng.integers(0, 256, size=37 * size, dtype=np.uint8)
    ref = _reference(raw, qtype, (37 * qk,))
    out = torch.full((37 * qk,), 7.0, device=device)
    launch(torch.from_numpy(raw).to(device), out, qtype, config)
    assert _same_bits(out.cpu(), ref)


def test_rejects_bad_input(device):
    with pytest.raises(ValueError, match="IQ4_XS|not supported"):
        dequantize(torch.zeros(18, dtype=torch.uint8, device=device), "IQ4_XS", (32,))
    with pytest.raises(ValueError, match="does not hold"):
        dequantize(torch.zeros(17, dtype=torch.uint8, device=device), "Q4_0", (32,))


def _same_bits(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Bit-equal, except that NaN matches any NaN (numpy keeps an input NaN's payload, the
    GPU writes the canonical NaN)."""
    same = out.view(torch.int32) == ref.view(torch.int32)
    return bool((same | (torch.isnan(out) & torch.isnan(ref))).all())


def test_extreme_scales_exact(device):
    """fp16 scales at the edges (largest, subnormal, negative zero) stay bit-exact."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, size=(64, 144), dtype=np.uint8)  # random bytes are valid Q4_K
    d = np.array([65504.0, 6e-8, -0.0, 1.0] * 16, dtype=np.float16).view(np.uint8).reshape(64, 2)
    blocks[:, 0:2] = d
    dmin = rng.uniform(-2, 2, size=64).astype(np.float16).view(np.uint8).reshape(64, 2)
    blocks[:, 2:4] = dmin  # finite mins: a NaN here would only test NaN payloads
    raw = blocks.reshape(-1)
    ref = _reference(raw, "Q4_K", (64, 256))
    out = dequantize(torch.from_numpy(raw).to(device), "Q4_K", (64, 256)).cpu()
    assert _same_bits(out, ref)


# ------------------------------------------------------------------------------------------
# GPU: large shapes, torch.compile(fullgraph=True), CUDA graph capture, opcheck.


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # numpy on NaN scales
@pytest.mark.parametrize("qtype", list(QTYPES))
def test_bit_exact_large_gpu(qtype):
    rng = np.random.default_rng(1)
    _, qk, size = QTYPES[qtype]
    rows, cols = 1024, 4096  # random bytes are valid blocks for every type here
    raw = rng.integers(0, 256, size=rows * cols // qk * size, dtype=np.uint8)
    # random fp16 scale bytes include inf and NaN: every bit must match, NaN payloads aside
    ref = _reference(raw, qtype, (rows, cols))
    out = dequantize(torch.from_numpy(raw).cuda(), qtype, (rows, cols)).cpu()
    assert _same_bits(out, ref)


@pytest.mark.cuda
def test_compile_graph_and_opcheck(random_blocks):
    raw = torch.from_numpy(random_blocks("Q4_K", (64, 512), seed=2)).cuda()
    eager = dequantize(raw, "Q4_K", (64, 512), torch.bfloat16)
    compiled = torch.compile(lambda r: dequantize(r, "Q4_K", (64, 512), torch.bfloat16) * 2, fullgraph=True)
    assert torch.equal(compiled(raw), eager * 2)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = dequantize(raw, "Q4_K", (64, 512), torch.bfloat16)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    torch.library.opcheck(torch.ops.kt_marlin.dequantize.default, (raw, "Q4_K", [64, 512], 2))
