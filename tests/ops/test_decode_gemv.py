"""ktcore.ops.decode_gemv (the one-row Triton GEMV of decode steps) against an fp32 oracle and
``F.linear``: odd N and K (tails of the row and column tiles), K below and above one column
tile, with and without bias, bf16 and fp16, explicit tiles; opcheck and
torch.compile(fullgraph=True); bad inputs. On the GPU: the model shapes, ``dense_linear``'s
dispatch (one row to the kernel, more rows and ``KTCORE_DECODE_GEMV=0`` to ``F.linear``),
``TorchLinear`` and GQA decode through it, CUDA graph capture.

Without a CUDA GPU the kernel runs in Triton's interpreter on CPU tensors (small shapes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="the decode GEMV needs triton (pip install triton)")

from ktcore.ops.linear import LinearSpec, TorchLinear, dense_linear  # noqa: E402
from ktcore.ops.weights import DenseWeight  # noqa: E402

from tests.ops.triton_modules import import_kernels, kernel_device, node_generator  # noqa: E402

#: max |kernel - float64 oracle| / max |oracle| per dtype: fp32 accumulation, then one rounding
#: of each output to the dtype, at most one ulp (Triton's interpreter truncates): 2**-7 of the
#: element for bf16, 2**-10 for fp16, plus the fp32 sum's drift.
TOL = {torch.bfloat16: 8e-3, torch.float16: 1.1e-3}


@pytest.fixture(scope="module")
def device() -> str:
    return kernel_device()


@pytest.fixture(scope="module")
def kernels(device):
    """The module ``ktcore.ops.decode_gemv`` (registers ``torch.ops.ktcore.decode_gemv``)."""
    return import_kernels("ktcore.ops.decode_gemv", device, "_gemv_kernel")


def inputs(n, k, dtype, device, gen, bias=True):
    x = torch.randn(k, generator=gen).to(device, dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    return x, w, b


def oracle(x, w, b):
    y = w.double() @ x.double()
    return y if b is None else y + b.double()


def check(got, x, w, b):
    want = oracle(x, w, b)
    assert got.dtype == w.dtype and got.shape == want.shape
    err = float((got.double() - want).abs().max() / want.abs().max())
    assert err <= TOL[w.dtype], f"relative error {err:.3g} > {TOL[w.dtype]}"


@pytest.mark.parametrize("n, k", [(1, 16), (5, 7), (37, 100), (64, 96), (130, 33), (29, 300)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_oracle(n, k, dtype, bias, kernels, device, request):
    x, w, b = inputs(n, k, dtype, device, node_generator(request), bias)
    check(torch.ops.ktcore.decode_gemv(x, w, b), x, w, b)


@pytest.mark.parametrize("config", [dict(BLOCK_N=1, BLOCK_K=16), dict(BLOCK_N=8, BLOCK_K=64),
                                    dict(BLOCK_N=16, BLOCK_K=128)])
def test_explicit_tiles(config, kernels, device, request):
    """Row tiles of one and of more rows than N, column tiles smaller and larger than K."""
    x, w, b = inputs(13, 70, torch.bfloat16, device, node_generator(request))
    check(kernels.launch(x, w, b, dict(config, num_warps=4, num_stages=1)), x, w, b)


def test_chosen_tiles(kernels):
    assert kernels.choose_config(5120, 2048, torch.device("cuda", 0)) == dict(BLOCK_N=4, BLOCK_K=1024, num_warps=8,
                                                                               num_stages=3)
    assert kernels.choose_config(64, 48, torch.device("cuda", 0))["BLOCK_K"] == 64


def test_bad_inputs(kernels, device):
    w = torch.zeros(8, 16, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match=r"x must be \[16\]"):
        torch.ops.ktcore.decode_gemv(torch.zeros(15, dtype=torch.bfloat16, device=device), w, None)
    with pytest.raises(ValueError, match="x must be"):
        torch.ops.ktcore.decode_gemv(torch.zeros(16, device=device), w, None)  # fp32 x
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.ktcore.decode_gemv(torch.zeros(8, dtype=torch.bfloat16, device=device), w.t(), None)
    with pytest.raises(ValueError, match=r"bias must be \[8\]"):
        torch.ops.ktcore.decode_gemv(torch.zeros(16, dtype=torch.bfloat16, device=device), w,
                                     torch.zeros(9, dtype=torch.bfloat16, device=device))


def test_opcheck_and_compile(kernels, device, request):
    x, w, b = inputs(24, 40, torch.bfloat16, device, node_generator(request))
    torch.library.opcheck(torch.ops.ktcore.decode_gemv.default, (x, w, b))
    torch.library.opcheck(torch.ops.ktcore.decode_gemv.default, (x, w, None))

    def step(x, w, b):  # the op among other work compiles without a graph break
        return torch.ops.ktcore.decode_gemv(x * 2, w, b) + 1

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(x, w, b), step(x, w, b), rtol=0, atol=0)


# ------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("n, k", [(5120, 2048), (2048, 4096), (576, 7168), (151936, 2048), (3000, 1000)])
def test_model_shapes_gpu(n, k, kernels, request):
    """The Qwen3-30B-A3B q/k/v and o projections, a DeepSeek-V3 kv_a, a Qwen3 lm_head, an odd one."""
    x, w, b = inputs(n, k, torch.bfloat16, "cuda", node_generator(request))
    got = torch.ops.ktcore.decode_gemv(x, w, b)
    check(got, x, w, b)
    ref = F.linear(x, w, b)  # cuBLAS: the same up to rounding
    assert float((got.float() - ref.float()).abs().max() / ref.float().abs().max()) <= 2 * TOL[torch.bfloat16]


@pytest.mark.cuda
def test_dense_linear_dispatch_gpu(kernels, monkeypatch, request):
    x, w, b = inputs(300, 256, torch.bfloat16, "cuda", node_generator(request))
    rows = torch.randn(3, 256, generator=node_generator(request)).to("cuda", torch.bfloat16)
    one = x.reshape(1, 1, 256)
    assert torch.equal(dense_linear(one, w, b), torch.ops.ktcore.decode_gemv(x, w, b).reshape(1, 1, 300))
    assert torch.equal(dense_linear(rows, w, b), F.linear(rows, w, b))
    monkeypatch.setattr(kernels, "MAX_ELEMENTS", w.numel() - 1)  # a larger weight: cuBLAS
    assert torch.equal(dense_linear(one, w, b), F.linear(one, w, b))
    monkeypatch.undo()
    monkeypatch.setenv("KTCORE_DECODE_GEMV", "0")
    assert torch.equal(dense_linear(one, w, b), F.linear(one, w, b))
    monkeypatch.delenv("KTCORE_DECODE_GEMV")
    linear = TorchLinear(LinearSpec(256, 300, True), "cuda", {"dtype": "bf16"})
    linear.load_weights({"weight": DenseWeight(w.cpu()), "bias": DenseWeight(b.cpu())})
    assert torch.equal(linear(one), torch.ops.ktcore.decode_gemv(x, w, b).reshape(1, 1, 300))


@pytest.mark.cuda
def test_cuda_graph_gpu(kernels, request):
    x, w, b = inputs(2048, 4096, torch.bfloat16, "cuda", node_generator(request))
    want = torch.ops.ktcore.decode_gemv(x, w, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        torch.ops.ktcore.decode_gemv(x, w, b)  # warm-up outside the capture
        with torch.cuda.graph(graph, stream=side):
            got = torch.ops.ktcore.decode_gemv(x, w, b)
    x.copy_(x.flip(0))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, torch.ops.ktcore.decode_gemv(x, w, b))
    assert not torch.equal(got, want)
