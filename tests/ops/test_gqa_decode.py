"""ktcore.ops.gqa_decode (the length-bounded Triton decode kernel) against the torch path of
GQAAttention (``ktcore.ops.gqa.cache_attention`` over the whole static cache): group sizes
1, 3, 4, 8, head dims 24, 64, 128, caches whose length is not a multiple of the block, limits
0, 1, random and full in one batch, fp32/bf16 caches under fp32/bf16/fp16 queries, explicit
split counts; opcheck and torch.compile(fullgraph=True). On the GPU: long caches, the
GQAAttention decode step, CUDA graph capture and inductor.

Without a CUDA GPU the kernels run in Triton's interpreter on CPU tensors (small shapes): the
``kernels`` fixture imports the kernel module with ``TRITON_INTERPRET=1`` (tests/ops/triton_modules.py).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="the GQA decode kernel needs triton (pip install triton)")

from ktcore.ops import gqa  # noqa: E402
from ktcore.ops.gqa import GQAAttention, GQASpec, KVCache, cache_attention  # noqa: E402
from ktcore.ops.rope import RopeSpec  # noqa: E402

from tests.ops.triton_modules import import_kernels, kernel_device, node_generator  # noqa: E402

#: max |kernel - torch path| / max |torch path| per query dtype. fp32: both accumulate in fp32
#: in another order. bf16/fp16: the torch path rounds the scores, the scaled scores and the
#: probabilities to the query dtype between its einsums; the kernel keeps scores and the
#: softmax in fp32 and rounds p and the output once, so the two differ by a few ulps of the
#: output (observed <= 1.1e-2 for bf16, 9e-4 for fp16; against an fp32 oracle the kernel's
#: error is the smaller of the two); 3e-2 is the bf16 tolerance GQAAttention
#: meets against transformers (tests/ops/test_gqa.py).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.fixture(scope="module")
def device() -> str:
    return kernel_device()


@pytest.fixture(scope="module")
def kernels(device):
    """The module ``ktcore.ops.gqa_decode`` (registers ``torch.ops.ktcore.gqa_decode``)."""
    return import_kernels("ktcore.ops.gqa_decode", device, "_split_kernel")


def random_cache(batch, max_len, n_kv, head_dim, dtype, device, gen) -> KVCache:
    cache = KVCache(batch, max_len, n_kv, head_dim, dtype, device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


def rows_for(limits: list[int], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, 1] and cache_lens [B] giving these limits, alternating which of the two
    bounds ``min(position + 1, cache_len)`` binds."""
    positions, lens = [], []
    for i, limit in enumerate(limits):
        if i % 2:  # the length binds: the position lies beyond it
            positions.append(max_len - 1)
            lens.append(limit)
        else:  # the position binds: later slots are valid for the row but not yet visible
            positions.append(max(limit - 1, 0))
            lens.append(min(limit + 5, max_len) if limit else 0)
    return torch.tensor(positions)[:, None], torch.tensor(lens)


def reference(q: torch.Tensor, cache: KVCache, positions: torch.Tensor, lens: torch.Tensor, scale: float):
    """The torch path over the whole static cache: [B, nH, D]."""
    return cache_attention(q[:, None], cache, positions, lens, cache.max_len, scale)[:, 0]


def check(got: torch.Tensor, want: torch.Tensor, limits: list[int], dtype: torch.dtype) -> None:
    """Rows of limit 0 (padding rows, discarded by the caller) are zeros here and the mean of
    the values in the torch path: only finiteness is compared there."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    empty = torch.tensor(limits, device=got.device) == 0
    assert (got[empty] == 0).all()
    got, want = got[~empty].float(), want[~empty].float()
    err = float((got - want).abs().max() / want.abs().max())
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("n_heads, n_kv, head_dim", [
    (4, 4, 64),  # G = 1
    (8, 2, 128),  # G = 4
    (16, 2, 64),  # G = 8
    (8, 1, 128),  # G = 8, one K/V head
    (6, 2, 24),  # G = 3 (not a power of two), head_dim not a power of two
    (15, 5, 64),  # odd nH and nKV
])
@pytest.mark.parametrize("dtype, cache_dtype", [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
])
def test_matches_torch_path(n_heads, n_kv, head_dim, dtype, cache_dtype, kernels, device, request):
    gen = node_generator(request)
    S = 45  # not a multiple of the interpreter's BLOCK_S (16)
    limits = [0, 1, int(torch.randint(2, S, (1,), generator=gen)), S, 17]
    B = len(limits)
    cache = random_cache(B + 1, S, n_kv, head_dim, cache_dtype, device, gen)  # one cache row unused
    q = (2 * torch.randn(B, n_heads, head_dim, generator=gen)).to(device, dtype)  # a peaked softmax
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    scale = head_dim ** -0.5
    got = torch.ops.ktcore.gqa_decode(q, cache.k, cache.v, positions[:, 0], lens, scale)
    check(got, reference(q, cache, positions, lens, scale), limits, dtype)


def test_fp16_and_int32_lengths(kernels, device, request):
    gen = node_generator(request)
    S, limits = 33, [33, 0, 9]
    cache = random_cache(3, S, 2, 64, torch.bfloat16, device, gen)
    q = torch.randn(3, 8, 64, generator=gen).to(device, torch.float16)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    got = torch.ops.ktcore.gqa_decode(q, cache.k, cache.v, positions[:, 0], lens.int(), 0.125)
    check(got, reference(q, cache, positions, lens, 0.125), limits, torch.float16)


def test_gqa_decode_path(kernels, device, request):
    """GQAAttention's CUDA decode helper (run here on the test device) takes q [B, 1, nH, D],
    positions [B, 1] and the cache as ``forward`` holds them."""
    gen = node_generator(request)
    S, limits = 40, [40, 0, 11]
    cache = random_cache(4, S, 2, 64, torch.bfloat16, device, gen)
    q = torch.randn(3, 1, 8, 64, generator=gen).to(device, torch.bfloat16)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    got = gqa._decode_attention_cuda(q, cache, positions, lens, 0.125)
    assert got.shape == q.shape
    check(got[:, 0], reference(q[:, 0], cache, positions, lens, 0.125), limits, torch.bfloat16)


@pytest.mark.parametrize("splits, block_s", [(1, 16), (2, 16), (5, 16), (4, 32), (16, 16)])
def test_split_counts(splits, block_s, kernels, device, request):
    """Runs of whole blocks per split, more splits than blocks, one split for everything."""
    gen = node_generator(request)
    S, limits = 70, [70, 3, 0, 33]
    cache = random_cache(4, S, 2, 64, torch.float32, device, gen)
    q = torch.randn(4, 8, 64, generator=gen, device="cpu").to(device)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    config = dict(BLOCK_S=block_s, SPLITS=splits, num_warps=4, num_stages=1)
    got = kernels.launch(q, cache.k, cache.v, positions[:, 0], lens, 0.125, config)
    check(got, reference(q, cache, positions, lens, 0.125), limits, torch.float32)


def test_strided_inputs(kernels, device, request):
    """A cache view of some rows (``KVCache.rows``) and a query cut from a wider tensor."""
    gen = node_generator(request)
    S, limits = 20, [20, 7]
    cache = random_cache(4, S, 2, 32, torch.float32, device, gen).rows(1, 3)
    wide = torch.randn(2, 4, 2 * 32, generator=gen).to(device)
    q = wide[..., :32]  # [B, nH, D], rows and heads strided
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    got = torch.ops.ktcore.gqa_decode(q, cache.k, cache.v, positions[:, 0], lens, 0.2)
    check(got, reference(q, cache, positions, lens, 0.2), limits, torch.float32)


def test_rejects_bad_shapes(kernels, device):
    q, cache = torch.zeros(2, 6, 16, device=device), KVCache(2, 8, 4, 16, torch.float32, device)
    pos = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="does not fit"):
        torch.ops.ktcore.gqa_decode(q, cache.k, cache.v, pos, pos, 1.0)  # 6 heads over 4 K/V heads
    with pytest.raises(ValueError, match="positions and cache_lens"):
        torch.ops.ktcore.gqa_decode(q[:, :4], cache.k, cache.v, pos[:1], pos, 1.0)


def test_opcheck_and_compile(kernels, device, request):
    gen = node_generator(request)
    cache = random_cache(3, 24, 2, 16, torch.float32, device, gen)
    q = torch.randn(2, 4, 16, generator=gen).to(device)
    positions, lens = torch.tensor([5, 23], device=device), torch.tensor([6, 20], device=device)
    torch.library.opcheck(torch.ops.ktcore.gqa_decode.default, (q, cache.k, cache.v, positions, lens, 0.25))

    def step(q, k, v, positions, lens):  # the op among other work compiles without a graph break
        return torch.ops.ktcore.gqa_decode(q * 2, k, v, positions, lens, 0.25) + 1

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    torch.testing.assert_close(compiled(q, cache.k, cache.v, positions, lens), step(q, cache.k, cache.v, positions, lens),
                               rtol=1e-5, atol=1e-5)


def test_gqa_imports_without_triton():
    """``import ktcore.ops.gqa`` and a CPU decode step need no triton."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from ktcore.ops.gqa import GQAAttention, GQASpec\n"
        "from ktcore.ops.rope import RopeSpec\n"
        "spec = GQASpec(32, 4, 2, 8, RopeSpec(8, max_position_embeddings=16))\n"
        "attn = GQAAttention(spec)\n"
        "attn.load_weights({n: 0.1 * torch.randn(s) for n, s in spec.weight_shapes().items()})\n"
        "cache = attn.new_cache(1, 16, torch.float32)\n"
        "out = attn(torch.randn(1, 1, 32), torch.tensor([[3]]), cache, torch.tensor([4]))\n"
        "assert out.shape == (1, 1, 32) and 'ktcore.ops.gqa_decode' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ------------------------------------------------------------------------------------------
# GPU: Qwen3-30B-A3B attention shapes, long caches, the GQAAttention decode step, CUDA graphs.

QWEN3_30B = dict(n_heads=32, n_kv=4, head_dim=128)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_len", [4200, 32768])
def test_long_caches_gpu(max_len, dtype, kernels, request):
    gen = node_generator(request)
    limits = [max_len, 64, 4097, 0, 1, 513]
    B, H, D = len(limits), QWEN3_30B["n_heads"], QWEN3_30B["head_dim"]
    cache = random_cache(B, max_len, QWEN3_30B["n_kv"], D, dtype, "cuda", gen)
    q = (2 * torch.randn(B, H, D, generator=gen)).to("cuda", dtype)
    positions, lens = (t.cuda() for t in rows_for(limits, max_len))
    got = torch.ops.ktcore.gqa_decode(q, cache.k, cache.v, positions[:, 0], lens, D ** -0.5)
    check(got, reference(q, cache, positions, lens, D ** -0.5), limits, dtype)


def qwen3_like_attention(dtype: torch.dtype, max_positions: int, seed: int = 0) -> GQAAttention:
    spec = GQASpec(hidden_size=512, num_heads=QWEN3_30B["n_heads"], num_kv_heads=QWEN3_30B["n_kv"],
                   head_dim=QWEN3_30B["head_dim"], rope=RopeSpec(128, theta=1e6, max_position_embeddings=max_positions),
                   qk_norm=True)
    gen = torch.Generator().manual_seed(seed)
    weights = {name: (1 + 0.1 * torch.randn(shape, generator=gen)) if "norm" in name
               else torch.randn(shape, generator=gen) * shape[-1] ** -0.5 for name, shape in spec.weight_shapes().items()}
    attn = GQAAttention(spec, "cuda", {"dtype": {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype],
                                       "max_positions": max_positions})
    attn.load_weights(weights)
    return attn


def prefilled_caches(attn: GQAAttention, prompts: list[int], max_len: int, dtype, gen) -> tuple[KVCache, KVCache]:
    """Two equal caches holding prompts of these lengths (0: an empty padding row)."""
    B, H = len(prompts), attn.spec.hidden_size
    caches = attn.new_cache(B, max_len, dtype), attn.new_cache(B, max_len, dtype)
    T = max(prompts)
    x = torch.randn(B, T, H, generator=gen).to("cuda", dtype)
    positions = torch.arange(T, device="cuda")[None].expand(B, T)
    with torch.no_grad():
        for cache in caches:
            attn(x, positions, cache, torch.tensor(prompts, device="cuda"))
    return caches


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gqa_attention_decode_gpu(dtype, kernels, request):
    """GQAAttention decode steps on CUDA (the kernel) against the same steps on the torch path
    (``static=False``), rows of different lengths and a padding row."""
    gen = node_generator(request)
    max_len, prompts = 1000, [700, 1, 333, 0]
    attn = qwen3_like_attention(dtype, max_len)
    ours, theirs = prefilled_caches(attn, prompts, max_len, dtype, gen)
    B, H = len(prompts), attn.spec.hidden_size
    with torch.no_grad():
        for step in range(3):
            x = torch.randn(B, 1, H, generator=gen).to("cuda", dtype)
            positions = torch.tensor([[p + step] for p in prompts], device="cuda")
            lens = torch.tensor([p + step + 1 if p else 0 for p in prompts], device="cuda")
            got = attn(x, positions, ours, lens)
            want = attn(x, positions, theirs, lens, static=False)
            err = float((got[:-1].float() - want[:-1].float()).abs().max() / want[:-1].float().abs().max())
            assert err <= TOL[dtype], f"step {step}: relative error {err:.3g} > {TOL[dtype]}"
            assert torch.isfinite(got).all()


@pytest.mark.cuda
def test_cuda_graph_and_compile_gpu(kernels, request):
    """The op captured in a CUDA graph replays over new positions and lengths as eager; a
    GQAAttention decode step compiles with inductor (fullgraph) and matches eager."""
    gen = node_generator(request)
    dtype, max_len, B = torch.bfloat16, 4200, 3
    cache = random_cache(B, max_len, QWEN3_30B["n_kv"], QWEN3_30B["head_dim"], dtype, "cuda", gen)
    q = torch.randn(B, QWEN3_30B["n_heads"], QWEN3_30B["head_dim"], generator=gen).to("cuda", dtype)
    positions = torch.zeros(B, dtype=torch.int64, device="cuda")
    lens = torch.ones(B, dtype=torch.int64, device="cuda")

    def op():
        return torch.ops.ktcore.gqa_decode(q, cache.k, cache.v, positions, lens, 0.088)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = op()
    for limits in ([1, 2, 3], [4200, 64, 0], [4096, 4097, 513]):
        pos, new_lens = rows_for(limits, max_len)
        positions.copy_(pos[:, 0])
        lens.copy_(new_lens)
        q.copy_(torch.randn(q.shape, generator=gen))
        graph.replay()
        torch.testing.assert_close(static_out, op(), rtol=0, atol=0)

    attn = qwen3_like_attention(dtype, 512)
    eager_cache, compiled_cache = prefilled_caches(attn, [100, 37, 0], 512, dtype, gen)
    compiled = torch.compile(attn, fullgraph=True)
    with torch.no_grad():
        x = torch.randn(3, 1, attn.spec.hidden_size, generator=gen).to("cuda", dtype)
        step_positions = torch.tensor([[100], [37], [0]], device="cuda")
        step_lens = torch.tensor([101, 38, 0], device="cuda")
        got = compiled(x, step_positions, compiled_cache, step_lens)
        want = attn(x, step_positions, eager_cache, step_lens)
    err = float((got.float() - want.float()).abs().max() / want.float().abs().max())
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"
    torch.library.opcheck(torch.ops.ktcore.gqa_decode.default, (q, cache.k, cache.v, positions, lens, 0.088))
