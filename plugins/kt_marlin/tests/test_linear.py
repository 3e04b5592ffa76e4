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
    cfg = dict(BLOCK_T=1, BLOCK_N=16, BLOCK_K=128, num_warps=4)
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


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("path,t", [("fma", 1), ("fma", 3), ("dot", 5)])
def test_int4_kernel_paths_and_split_k(group, path, t, device):
    """The int4 kernel's fma and dot paths, without and with split-K (the last program of a
    tile adds the partials in a fixed order, bias included): equal up to fp32 reordering, and
    a split result repeats bit for bit."""
    from kt_marlin.packing import quantize_dense, unpack

    n, k = 21, 1024
    gen = torch.Generator().manual_seed(group + t)
    p = quantize_dense(torch.randn(n, k, generator=gen), 4, group)
    qw, s, o = (v.to(device) for v in (p.qweight, p.scales, p.offsets))
    bias = torch.randn(n, generator=gen).to(device)
    x = torch.randn(t, k, generator=gen).to(device)
    ref = _reference(unpack(p), bias.cpu(), x.cpu())
    bt = 16 if path == "dot" else 4
    base = dict(path=path, BLOCK_T=bt, BLOCK_N=16, BLOCK_K=256, num_warps=4)
    ys = [launch(x, qw, s, o, bias, 4, group, dict(base, SPLIT_K=split)).cpu() for split in (1, 3, 4)]
    for y in ys:
        _close(y, ref, torch.float32)
    again = launch(x, qw, s, o, bias, 4, group, dict(base, SPLIT_K=3)).cpu()
    assert torch.equal(again, ys[1])


def test_config_table_resolves():
    """Every table entry resolves for the shapes of each class (BLOCK_K divides K, a dot only
    where its K slice has 16 columns) and a sweep JSON updates the table."""
    import json
    import tempfile

    from kt_marlin import wq_matmul as W

    cpu = torch.device("cpu")
    for n, k in [(576, 7168), (7168, 2048), (32768, 512), (24, 96), (19, 384)]:
        for t in (1, 2, 4, 9, 16, 40, 300):
            for group in (32, 64, 128):
                if k % group:
                    continue
                cfg = W.choose_config(t, n, k, 4, group, cpu)
                assert k % cfg["BLOCK_K"] == 0 and cfg["BLOCK_K"] % group == 0
                assert cfg["path"] in ("fma", "dot") and cfg["SPLIT_K"] >= 1
                if cfg["path"] == "dot":
                    assert cfg["BLOCK_T"] >= 16 and (group == 128 or cfg["BLOCK_K"] >= 128)
    entry = dict(W.DEFAULT_TABLE["n<=2k,k>2k|1"], BLOCK_N=64, WAVES=8)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"table": {"n<=2k,k>2k|1": entry}}, f)
    table = W.load_table(f.name)
    assert table["n<=2k,k>2k|1"]["BLOCK_N"] == 64 and table["n>8k,k>2k|1"] == W.DEFAULT_TABLE["n>8k,k>2k|1"]
