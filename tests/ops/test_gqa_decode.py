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
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton", reason="the GQA decode kernel needs triton (pip install triton)")

from ktcore.ops.gqa import GQAAttention, GQASpec, KVCache, cache_attention  # noqa: E402
from ktcore.ops.rmsnorm import RMSNorm  # noqa: E402
from ktcore.ops.rope import RopeSpec, TorchRope  # noqa: E402

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
    return import_kernels("ktcore.ops.gqa_decode", device, "_decode_kernel")


def random_cache(batch, max_len, n_kv, head_dim, dtype, device, gen) -> KVCache:
    cache = KVCache(batch, max_len, n_kv, head_dim, dtype, device)
    cache.k.copy_(torch.randn(cache.k.shape, generator=gen))
    cache.v.copy_(torch.randn(cache.v.shape, generator=gen))
    return cache


def twin(cache: KVCache) -> KVCache:
    """An equal cache of its own memory (the reference's)."""
    other = KVCache(cache.batch, cache.max_len, cache.k.shape[2], cache.k.shape[3], cache.k.dtype, cache.k.device)
    other.k.copy_(cache.k)
    other.v.copy_(cache.v)
    return other


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


@dataclass
class Prep:
    """What the step does to the new token before attention: the per-head norms (Qwen3) and
    RoPE, or neither."""

    norms: tuple[RMSNorm, RMSNorm] | None = None
    rope: TorchRope | None = None

    @classmethod
    def make(cls, head_dim: int, dtype: torch.dtype, device, gen, norm: bool = True,
             rope: RopeSpec | None | bool = True) -> "Prep":
        """``rope``: a spec, True for full-head RoPE over 128 positions, None for none."""
        norms = None
        if norm:
            norms = tuple(RMSNorm(head_dim, 1e-6, device=device, dtype=dtype) for _ in range(2))
            for n in norms:
                n.weight.requires_grad_(False).copy_(1 + 0.2 * torch.randn(head_dim, generator=gen))
        if rope is True:
            rope = RopeSpec(head_dim, theta=1e4, max_position_embeddings=128)
        return cls(norms, None if rope is None else TorchRope(rope, device))

    def args(self, positions: torch.Tensor) -> tuple:
        """The op's q_norm, k_norm, cos, sin, cos_by_position, eps."""
        norms = (None, None) if self.norms is None else tuple(n.weight for n in self.norms)
        cos_sin = (None, None, True) if self.rope is None else self.rope.decode_cos_sin(positions[:, 0])
        return (*norms, *cos_sin, 1e-6)

    def reference(self, q, k, v, cache: KVCache, positions, lens, scale) -> torch.Tensor:
        """The torch path of GQAAttention on q [B, nH, D], k, v [B, nKV, D]: writes ``cache``,
        returns [B, nH, D] from attention over the whole static cache."""
        q, k, v = q[:, None], k[:, None], v[:, None]
        if self.norms is not None:
            q, k = self.norms[0](q), self.norms[1](k)
        if self.rope is not None:
            q, k = self.rope(q, k, positions)
        cache.write(positions, k, v)
        return cache_attention(q, cache, positions, lens, cache.max_len, scale)[:, 0]


def step(q, k, v, cache, positions, lens, scale, prep: Prep, config=None, kernels=None):
    """The kernel's step (through the op, or ``kernels.launch`` with ``config``) and the torch
    path's on a twin cache: (got, want, cache, reference cache)."""
    theirs = twin(cache)
    want = prep.reference(q, k, v, theirs, positions, lens, scale)
    args = (q, k, v, cache.k, cache.v, cache.split_counters, positions[:, 0], lens, *prep.args(positions), scale)
    got = torch.ops.ktcore.gqa_decode(*args) if config is None else kernels.launch(*args, dict(config))
    assert (cache.split_counters == 0).all(), "the last program leaves the counters at 0"
    return got, want, cache, theirs


def check(got: torch.Tensor, want: torch.Tensor, limits: list[int], dtype: torch.dtype,
          cache_dtype: torch.dtype = torch.float32) -> None:
    """Rows of limit 0 (padding rows, discarded by the caller) are zeros here and the mean of
    the values in the torch path: only finiteness is compared there. In the interpreter the
    cache's dtype bounds the error too: the new key is truncated to it there (rounded on the
    GPU and in torch; emulating the truncation in the torch path brings an fp32 query over a
    bf16 cache from 5e-3 to 4e-7)."""
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    empty = torch.tensor(limits, device=got.device) == 0
    assert (got[empty] == 0).all()
    got, want = got[~empty].float(), want[~empty].float()
    err = float((got - want).abs().max() / want.abs().max())
    tol = TOL[dtype] if got.is_cuda else max(TOL[dtype], TOL[cache_dtype])
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def check_caches(ours: KVCache, theirs: KVCache, dtype: torch.dtype = torch.float32) -> None:
    """The new K/V rows as the torch path wrote them, every other slot untouched. fp32 steps
    (``dtype``) into fp32 caches closely (the logic); else to four ulps of the largest value: the interpreter truncates
    where the GPU rounds, at each of the norm's and RoPE's three roundings."""
    for name in ("k", "v"):
        a, b = getattr(ours, name).float(), getattr(theirs, name).float()
        atol = 1e-5 if getattr(ours, name).dtype == dtype == torch.float32 else float(b.abs().max()) * 2 ** -6
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=lambda m: f"cache {name}: {m}")


def random_step(B, n_heads, n_kv, head_dim, dtype, device, gen):
    """Raw q [B, nH, D] (scaled up: a peaked softmax), k, v [B, nKV, D]."""
    q = (2 * torch.randn(B, n_heads, head_dim, generator=gen)).to(device, dtype)
    k = (2 * torch.randn(B, n_kv, head_dim, generator=gen)).to(device, dtype)
    v = torch.randn(B, n_kv, head_dim, generator=gen).to(device, dtype)
    return q, k, v


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
@pytest.mark.parametrize("norm, rope", [(True, True), (False, True), (False, None)])
def test_matches_torch_path(n_heads, n_kv, head_dim, dtype, cache_dtype, norm, rope, kernels, device, request):
    gen = node_generator(request)
    S = 45  # not a multiple of the interpreter's BLOCK_S (16)
    limits = [0, 1, int(torch.randint(2, S, (1,), generator=gen)), S, 17]
    B = len(limits)
    cache = random_cache(B + 1, S, n_kv, head_dim, cache_dtype, device, gen)  # one cache row unused
    q, k, v = random_step(B, n_heads, n_kv, head_dim, dtype, device, gen)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    prep = Prep.make(head_dim, dtype, device, gen, norm=norm, rope=rope)
    got, want, ours, theirs = step(q, k, v, cache, positions, lens, head_dim ** -0.5, prep)
    check(got, want, limits, dtype, cache_dtype)
    check_caches(ours, theirs, dtype)


@pytest.mark.parametrize("rope", [
    RopeSpec(32, theta=1e4, max_position_embeddings=64),  # half the head rotated, the rest kept
    RopeSpec(64, theta=1e4, max_position_embeddings=16, rope_type="dynamic", factor=2.0),  # cos/sin per row
    RopeSpec(16, theta=1e4, max_position_embeddings=64, rope_type="yarn", factor=4.0,
             original_max_position_embeddings=16),  # an attention factor in the table
], ids=["partial", "dynamic", "yarn"])
def test_partial_and_scaled_rope(rope, kernels, device, request):
    gen = node_generator(request)
    S, limits = 40, [40, 9, 23]
    cache = random_cache(3, S, 2, 64, torch.float32, device, gen)
    q, k, v = random_step(3, 8, 2, 64, torch.float32, device, gen)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    prep = Prep.make(64, torch.float32, device, gen, rope=rope)
    got, want, ours, theirs = step(q, k, v, cache, positions, lens, 0.125, prep)
    check(got, want, limits, torch.float32)
    check_caches(ours, theirs)


def test_fp16_and_int32_lengths(kernels, device, request):
    gen = node_generator(request)
    S, limits = 33, [33, 0, 9]
    cache = random_cache(3, S, 2, 64, torch.bfloat16, device, gen)
    q, k, v = random_step(3, 8, 2, 64, torch.float16, device, gen)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    prep = Prep.make(64, torch.float16, device, gen)
    got, want, _, _ = step(q, k, v, cache, positions, lens.int(), 0.125, prep)
    check(got, want, limits, torch.float16, torch.bfloat16)


def test_gqa_decode_path(kernels, device, request):
    """GQAAttention's CUDA decode helper (run here on the test device) takes q [B, 1, nH, D],
    k, v [B, 1, nKV, D], positions [B, 1] and the cache as ``forward`` holds them."""
    gen = node_generator(request)
    S, limits = 40, [40, 0, 11]
    spec = GQASpec(256, 8, 2, 32, RopeSpec(32, theta=1e4, max_position_embeddings=S), qk_norm=True)
    attn = GQAAttention(spec, device)
    attn.load_weights({n: (1 + 0.1 * torch.randn(s, generator=gen)) if "norm" in n else torch.randn(s, generator=gen)
                       for n, s in spec.weight_shapes().items()})
    cache = random_cache(4, S, 2, 32, torch.float32, device, gen)
    q, k, v = random_step(3, 8, 2, 32, torch.float32, device, gen)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    theirs = twin(cache)
    got = attn._decode_step_cuda(q[:, None], k[:, None], v[:, None], positions, cache, lens)
    prep = Prep((attn.q_norm, attn.k_norm), attn.rope)
    want = prep.reference(q, k, v, theirs, positions, lens, spec.softmax_scale)
    assert got.shape == (3, 1, 8, 32)
    check(got[:, 0], want, limits, torch.float32)
    check_caches(cache, theirs)


@pytest.mark.parametrize("splits, block_s, min_blocks", [(1, 16, 1), (2, 16, 1), (5, 16, 1), (4, 32, 1), (16, 16, 1),
                                                       (4, 16, 3)])
def test_split_counts(splits, block_s, min_blocks, kernels, device, request):
    """Runs of whole blocks per split, more splits than blocks, one split for everything; a
    limit of 17 with 16-slot blocks leaves a block holding only the new token's slot. With
    runs of at least 3 blocks, rows of up to 3 blocks are split 0's alone (no combine) and
    the 5-block row is cut in two."""
    gen = node_generator(request)
    S, limits = 70, [70, 3, 0, 33, 17]
    cache = random_cache(5, S, 2, 64, torch.float32, device, gen)
    q, k, v = random_step(5, 8, 2, 64, torch.float32, device, gen)
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    config = dict(BLOCK_S=block_s, SPLITS=splits, MIN_BLOCKS=min_blocks, num_warps=4, num_stages=1)
    prep = Prep.make(64, torch.float32, device, gen)
    got, want, ours, theirs = step(q, k, v, cache, positions, lens, 0.125, prep, config, kernels)
    check(got, want, limits, torch.float32)
    check_caches(ours, theirs)


def test_strided_inputs(kernels, device, request):
    """A cache view of some rows (``KVCache.rows``) and q/k/v cut from one wider tensor, as
    the fused q/k/v projection gives them."""
    gen = node_generator(request)
    S, limits = 20, [20, 7]
    cache = random_cache(4, S, 2, 32, torch.float32, device, gen).rows(1, 3)
    qkv = torch.randn(2, (4 + 2 + 2) * 32, generator=gen).to(device)
    q, k, v = (t.view(2, -1, 32) for t in qkv.split((4 * 32, 2 * 32, 2 * 32), dim=-1))
    positions, lens = (t.to(device) for t in rows_for(limits, S))
    prep = Prep.make(32, torch.float32, device, gen)
    got, want, ours, theirs = step(q, k, v, cache, positions, lens, 0.2, prep)
    check(got, want, limits, torch.float32)
    check_caches(ours, theirs)


def test_rejects_bad_shapes(kernels, device):
    cache = KVCache(2, 8, 4, 16, torch.float32, device)
    q, kv = torch.zeros(2, 6, 16, device=device), torch.zeros(2, 4, 16, device=device)
    pos = torch.zeros(2, dtype=torch.int64, device=device)
    none = (None, None, None, None, True, 1e-6, 1.0)
    with pytest.raises(ValueError, match="does not fit"):  # 6 heads over 4 K/V heads
        torch.ops.ktcore.gqa_decode(q, kv, kv, cache.k, cache.v, cache.split_counters, pos, pos, *none)
    with pytest.raises(ValueError, match="positions and cache_lens"):
        torch.ops.ktcore.gqa_decode(q[:, :4], kv, kv, cache.k, cache.v, cache.split_counters, pos[:1], pos, *none)
    with pytest.raises(ValueError, match="new k and v"):
        torch.ops.ktcore.gqa_decode(q[:, :4], kv[:, :2], kv, cache.k, cache.v, cache.split_counters, pos, pos, *none)
    with pytest.raises(ValueError, match="counters"):
        torch.ops.ktcore.gqa_decode(q[:, :4], kv, kv, cache.k, cache.v, cache.split_counters.long(), pos, pos, *none)
    with pytest.raises(ValueError, match="q_norm and k_norm"):
        torch.ops.ktcore.gqa_decode(q[:, :4], kv, kv, cache.k, cache.v, cache.split_counters, pos, pos,
                                    torch.ones(16, device=device), None, None, None, True, 1e-6, 1.0)


def test_opcheck_and_compile(kernels, device, request):
    gen = node_generator(request)
    cache = random_cache(3, 24, 2, 16, torch.float32, device, gen)
    q, k, v = random_step(2, 4, 2, 16, torch.float32, device, gen)
    positions, lens = torch.tensor([5, 23], device=device), torch.tensor([6, 20], device=device)
    prep = Prep.make(16, torch.float32, device, gen)
    torch.library.opcheck(torch.ops.ktcore.gqa_decode.default,
                          (q, k, v, cache.k, cache.v, cache.split_counters, positions, lens, *prep.args(positions[:, None]),
                           0.25))

    def decode(q, k, v, kc, vc, counters, positions, lens):  # the op among other work, no graph break
        return torch.ops.ktcore.gqa_decode(q * 2, k, v, kc, vc, counters, positions, lens,
                                           *prep.args(positions[:, None]), 0.25) + 1

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(decode, fullgraph=True, backend=backend)
    theirs = twin(cache)
    got = compiled(q, k, v, cache.k, cache.v, cache.split_counters, positions, lens)
    want = decode(q, k, v, theirs.k, theirs.v, theirs.split_counters, positions, lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.k, theirs.k, rtol=0, atol=0)  # the compiled step wrote the cache in place
    torch.testing.assert_close(cache.v, theirs.v, rtol=0, atol=0)


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
    q, k, v = random_step(B, H, QWEN3_30B["n_kv"], D, dtype, "cuda", gen)
    positions, lens = (t.cuda() for t in rows_for(limits, max_len))
    prep = Prep.make(D, dtype, "cuda", gen, rope=RopeSpec(D, theta=1e6, max_position_embeddings=max_len))
    got, want, ours, theirs = step(q, k, v, cache, positions, lens, D ** -0.5, prep)
    check(got, want, limits, dtype, dtype)
    check_caches(ours, theirs, dtype)


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
    """The op captured in a CUDA graph replays over new inputs, positions and lengths as eager
    (output and cache); a GQAAttention decode step compiles with inductor (fullgraph) and
    matches eager, the compiled step's cache written in place."""
    gen = node_generator(request)
    dtype, max_len, B = torch.bfloat16, 4200, 3
    n_heads, n_kv, D = QWEN3_30B["n_heads"], QWEN3_30B["n_kv"], QWEN3_30B["head_dim"]
    cache = random_cache(B, max_len, n_kv, D, dtype, "cuda", gen)
    q, k, v = random_step(B, n_heads, n_kv, D, dtype, "cuda", gen)
    positions = torch.zeros(B, dtype=torch.int64, device="cuda")
    lens = torch.ones(B, dtype=torch.int64, device="cuda")
    prep = Prep.make(D, dtype, "cuda", gen, rope=RopeSpec(D, theta=1e6, max_position_embeddings=max_len))

    def op():
        return torch.ops.ktcore.gqa_decode(q, k, v, cache.k, cache.v, cache.split_counters, positions, lens,
                                           *prep.args(positions[:, None]), 0.088)

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
        for t in (q, k, v):
            t.copy_(torch.randn(t.shape, generator=gen))
        before = twin(cache)
        graph.replay()
        replayed = twin(cache)
        cache.k.copy_(before.k)
        cache.v.copy_(before.v)
        torch.testing.assert_close(static_out, op(), rtol=0, atol=0)
        assert torch.equal(cache.k, replayed.k) and torch.equal(cache.v, replayed.v)
        assert (cache.split_counters == 0).all()

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
    check_caches(compiled_cache, eager_cache, dtype)
    assert compiled_cache.k[0, 100].abs().sum() > 0, "the compiled step wrote the new key into its cache"
