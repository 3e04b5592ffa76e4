"""MarlinLinear (int4 / int8 / bf16) against TorchLinear on the same weights: exact packing
of GGUF Q4_0/Q4_1/Q4_K/Q8_0, kernel output within per-dtype tolerances for T in {1, 3, 16,
65}; on the GPU larger shapes, CUDA graph capture, torch.compile and opcheck."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="kt-marlin's kernels need triton (pip install triton)")

from ktcore.ops.linear import LinearSpec, TorchLinear  # noqa: E402
from ktcore.ops.weights import DenseWeight, GGUFWeight  # noqa: E402

from kt_marlin.linear import MarlinLinear  # noqa: E402
from kt_marlin.wq_matmul import launch  # noqa: E402

#: (rtol, atol relative to the output's scale) per activation dtype. The weights are equal;
#: the difference is the accumulation order and, for fp16/bf16, the tensor-core rounding of
#: the dequantised weight and of the output.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _gguf_weight(random_blocks, qtype, n, k, seed=0):
    raw = torch.from_numpy(random_blocks(qtype, (n, k), seed=seed))
    return GGUFWeight(raw, qtype, (n, k), name=f"w.{qtype}")


def _reference(weight_fp32: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ weight_fp32.double().T
    return y if bias is None else y + bias.double()


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    scale = ref.abs().max().clamp_min(1e-6)
    err = (y.double() - ref).abs().max()
    assert float(err / scale) <= tol, f"max error {float(err):.3g} vs scale {float(scale):.3g}"


def _build(spec, device, options, weights):
    op = MarlinLinear(spec, device, options)
    op.load_weights(weights)
    return op


@pytest.mark.parametrize("qtype,fmt", [("Q4_0", "int4"), ("Q4_1", "int4"), ("Q4_K", "int4"), ("Q8_0", "int8")])
def test_gguf_packing_is_exact(qtype, fmt, device, random_blocks):
    n, k = 7, 512
    w = _gguf_weight(random_blocks, qtype, n, k)
    op = _build(LinearSpec(k, n), device, {"format": fmt}, {"weight": w})
    assert op.exact and op.group == 32
    ref = w.to_dense(torch.float32)
    # equal values (Q4_0's d*q + (-8d) gives +0 where d*(q-8) gives -0 for d < 0)
    assert torch.equal(op.dequantized_weight().cpu(), ref)


@pytest.mark.parametrize("t", [1, 3, 16, 65])
@pytest.mark.parametrize("qtype,fmt", [("Q4_0", "int4"), ("Q4_K", "int4"), ("Q8_0", "int8")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_linear_matches_torch(t, qtype, fmt, dtype, device, random_blocks):
    n, k = 37, 512  # odd N
    w = _gguf_weight(random_blocks, qtype, n, k, seed=t)
    op = _build(LinearSpec(k, n), device, {"format": fmt}, {"weight": w})
    oracle = TorchLinear(LinearSpec(k, n), "cpu", {"dtype": "fp32"})
    oracle.load_weights({"weight": w})
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t)).to(dtype)
    y = op(x.to(device)).cpu()
    assert y.dtype == dtype and y.shape == (t, n)
    _close(y, _reference(oracle.weight, None, x), dtype)


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("t", [1, 3, 65])
def test_dense_quantised_linear(fmt, group, t, device):
    n, k = 19, 384
    gen = torch.Generator().manual_seed(group + t)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    spec = LinearSpec(k, n, bias=True)
    op = _build(spec, device, {"format": fmt, "group_size": group},
                {"weight": DenseWeight(weight), "bias": DenseWeight(bias)})
    assert not op.exact and op.group == group
    wq = op.dequantized_weight().cpu()
    # quantisation error bounded by half a step of the group
    assert float((wq - weight).abs().max()) <= float(weight.abs().max()) * (0.08 if fmt == "int4" else 0.005)
    x = torch.randn(2, (t + 1) // 2, k, generator=gen)[:, : t, :] if t > 1 else torch.randn(1, k, generator=gen)
    y = op(x.to(device)).cpu()
    assert y.shape == x.shape[:-1] + (n,)
    _close(y.reshape(-1, n), _reference(wq, bias, x.reshape(-1, k)), torch.float32)


def test_bf16_format(device, random_blocks):
    n, k = 11, 256
    w = _gguf_weight(random_blocks, "Q6_K", n, k)
    op = _build(LinearSpec(k, n), device, {"format": "bf16"}, {"weight": w})
    assert torch.equal(op.weight.cpu(), w.to_dense(torch.bfloat16)) or device == "cpu"
    x = torch.randn(3, k)
    _close(op(x.to(device)).cpu(), _reference(w.to_dense(torch.float32), None, x), torch.bfloat16)


def test_split_k_config_matches(device, random_blocks):
    """A forced split-K and a single-split launch agree (the reduction path is exercised)."""
    n, k = 24, 1024
    w = _gguf_weight(random_blocks, "Q4_0", n, k)
    op = _build(LinearSpec(k, n, bias=False), device, {"format": "int4"}, {"weight": w})
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(device)
    cfg = dict(BLOCK_T=16, BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=1)
    one = launch(x, op.qweight, op.scales, op.offsets, None, 4, 32, dict(cfg, SPLIT_K=1))
    four = launch(x, op.qweight, op.scales, op.offsets, None, 4, 32, dict(cfg, SPLIT_K=4))
    # fp32 sums of 1024 products in another order: a few ulps of the largest output
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-5 * one.abs().max().item())


def test_options_are_checked():
    from ktcore.errors import BackendError

    with pytest.raises(BackendError, match="format"):
        MarlinLinear(LinearSpec(64, 8), "cpu", {"format": "int3"})
    with pytest.raises(BackendError, match="group_size"):
        MarlinLinear(LinearSpec(64, 8), "cpu", {"group_size": 48})
    with pytest.raises(BackendError, match="unknown option"):
        MarlinLinear(LinearSpec(64, 8), "cpu", {"dtype": "bf16"})
    with pytest.raises(BackendError, match="multiple of 64"):
        MarlinLinear(LinearSpec(96, 8), "cpu", {"format": "int4"})


# ------------------------------------------------------------------------------------------
# GPU: larger shapes, torch.compile(fullgraph=True), CUDA graph capture, opcheck.


@pytest.mark.cuda
@pytest.mark.parametrize("t", [1, 4, 16, 64, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_int4_gpu(t, dtype, random_blocks):
    n, k = 1031, 4096
    w = _gguf_weight(random_blocks, "Q4_K", n, k)
    op = _build(LinearSpec(k, n), "cuda", {"format": "int4"}, {"weight": w})
    x = torch.randn(t, k, device="cuda").to(dtype)
    _close(op(x).cpu(), _reference(w.to_dense(torch.float32), None, x.cpu()), dtype)


@pytest.mark.cuda
def test_graph_compile_opcheck_gpu(random_blocks):
    n, k = 512, 1024
    w = _gguf_weight(random_blocks, "Q4_0", n, k)
    op = _build(LinearSpec(k, n, bias=True), "cuda", {"format": "int4"},
                {"weight": w, "bias": DenseWeight(torch.randn(n))})
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    eager = op(x)
    compiled = torch.compile(op, fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)
    static_x = x.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = op(static_x)
    static_x.copy_(x * 2)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_y, op(x * 2))
    for t in (1, 16):
        xt = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        torch.library.opcheck(torch.ops.kt_marlin.wq_matmul.default,
                              (xt, op.qweight, op.scales, op.offsets, op.bias, 4, op.group))


def test_compile_fullgraph_and_opcheck(device, random_blocks):
    """Both ops compile without a graph break and pass opcheck (here in the interpreter on
    CPU tensors, on the GPU there)."""
    from kt_marlin.dequant import dequantize

    n, k = 64, 256
    w = _gguf_weight(random_blocks, "Q4_0", n, k)
    op = _build(LinearSpec(k, n), device, {"format": "int4"}, {"weight": w})
    x = torch.randn(2, k, device=device)
    torch.testing.assert_close(torch.compile(op, fullgraph=True)(x), op(x), rtol=0, atol=0)
    raw = w.data.to(device)
    compiled = torch.compile(lambda r: dequantize(r, "Q4_0", (n, k)) * 2, fullgraph=True)
    assert torch.equal(compiled(raw), dequantize(raw, "Q4_0", (n, k)) * 2)
    torch.library.opcheck(torch.ops.kt_marlin.wq_matmul.default, (x, op.qweight, op.scales, op.offsets, None, 4, 32))
    torch.library.opcheck(torch.ops.kt_marlin.dequantize.default, (raw, "Q4_0", [n, k], 0))


def test_mma_layout():
    """``to_mma`` puts column ``u U + j U/4 + c`` in nibble j of int16 element ``u U/4 + c``
    (U = max(G, 64)), and ``unpack`` reads both layouts to the same weight."""
    from kt_marlin.packing import mma_unit, pack_int4, to_mma, unpack

    gen = torch.Generator().manual_seed(5)
    n, k = 5, 256
    for group in (32, 64, 128):
        q = torch.randint(0, 16, (n, k), generator=gen)
        s, o = torch.rand(n, k // group, generator=gen), torch.randn(n, k // group, generator=gen)
        words = pack_int4(q, s, o, group)
        mma = to_mma(words)
        assert mma.qweight.dtype == torch.int16 and mma.shape == (n, k)
        unit = mma_unit(group)
        e = mma.qweight.to(torch.int32) & 0xFFFF
        for col in (0, 1, unit // 4 - 1, unit // 4, unit - 1, unit + 3, k - 1):
            u, r = divmod(col, unit)
            j, c = divmod(r, unit // 4)
            assert torch.equal((e[:, u * unit // 4 + c] >> (4 * j)) & 15, q[:, col].to(torch.int32))
        assert torch.equal(unpack(mma), unpack(words))


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("t", [1, 3, 17])
def test_int4_kernel_groups_and_split_k(group, t, device):
    """The int4 kernel against the fp64 product for every group, without and with split-K (the
    last program of a tile adds the partials in a fixed order, bias included; a split of
    three over four K tiles leaves one program empty) and each way of summing x per group
    (XS 0/1/2): equal up to fp32 reordering, and a split result repeats bit for bit."""
    from kt_marlin.packing import quantize_dense, to_mma, unpack

    n, k = 21, 1024
    gen = torch.Generator().manual_seed(group + t)
    p = to_mma(quantize_dense(torch.randn(n, k, generator=gen), 4, group))
    qw, s, o = (v.to(device) for v in (p.qweight, p.scales, p.offsets))
    bias = torch.randn(n, generator=gen).to(device)
    x = torch.randn(t, k, generator=gen).to(device)
    ref = _reference(unpack(p), bias.cpu(), x.cpu())
    base = dict(BLOCK_T=16, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=1)
    # (split, XS): the groups' x sums from the kernel's x tile, from torch, from a dot with ones
    runs = [(1, 0), (3, 0), (4, 0), (3, 1), (4, 2)]
    ys = [launch(x, qw, s, o, bias, 4, group, dict(base, SPLIT_K=split, XS=xs)).cpu() for split, xs in runs]
    for y in ys:
        _close(y, ref, torch.float32)
    again = launch(x, qw, s, o, bias, 4, group, dict(base, SPLIT_K=3, XS=1)).cpu()
    assert torch.equal(again, ys[3])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("t", [1, 16, 40])
def test_int4_asm_unpack_gpu(dtype, group, t):
    """The inline-asm unpack gives the integer-op unpack's values: equal outputs bit for bit
    (same dots on the same operands), and both match the fp64 product (XS 0/1/2 by T)."""
    from kt_marlin.packing import quantize_dense, to_mma, unpack

    n, k = 300, 2048
    p = to_mma(quantize_dense(torch.randn(n, k), 4, group))
    qw, s, o = (v.cuda() for v in (p.qweight, p.scales, p.offsets))
    x = torch.randn(t, k, device="cuda").to(dtype)
    cfg = dict(BLOCK_T=16 if t <= 16 else 64, BLOCK_N=64, BLOCK_K=256, SPLIT_K=2, num_warps=4, num_stages=2)
    xs = {1: 2, 16: 1, 40: 0}[t]  # each way of summing x per group, once per (dtype, group)
    y_asm = launch(x, qw, s, o, None, 4, group, dict(cfg, ASM=True, XS=xs))
    y_int = launch(x, qw, s, o, None, 4, group, dict(cfg, ASM=False, XS=xs))
    assert torch.equal(y_asm, y_int)
    _close(y_asm.cpu(), _reference(unpack(p), None, x.cpu()), dtype)


def test_config_table_resolves():
    """Every table entry resolves for the shapes of each class (BLOCK_K a multiple of the
    layout unit dividing K, at least 16 tokens per program) and a sweep JSON updates the table."""
    import json
    import tempfile

    from kt_marlin import wq_matmul as W
    from kt_marlin.packing import mma_unit

    cpu = torch.device("cpu")
    for n, k in [(576, 7168), (7168, 2048), (32768, 512), (24, 128), (19, 384)]:
        for t in (1, 2, 4, 9, 16, 40, 300):
            for group in (32, 64, 128):
                if k % mma_unit(group):
                    continue
                cfg = W.choose_config(t, n, k, 4, group, cpu)
                assert k % cfg["BLOCK_K"] == 0 and cfg["BLOCK_K"] % mma_unit(group) == 0
                assert cfg["BLOCK_T"] >= 16 and cfg["SPLIT_K"] >= 1
    entry = dict(W.DEFAULT_TABLE["n<=2k,k>2k|16"], BLOCK_N=64, WAVES=8)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"table": {"n<=2k,k>2k|16": entry}}, f)
    table = W.load_table(f.name)
    assert table["n<=2k,k>2k|16"]["BLOCK_N"] == 64 and table["n>8k,k>2k|16"] == W.DEFAULT_TABLE["n>8k,k>2k|16"]
