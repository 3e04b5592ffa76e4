"""MarlinMLA against ktcore's TorchMLA (itself tested against transformers' DeepSeek-V2/V3
attention) on the same weights: prefill then decode, cache lengths differing across batch
rows, several absorbed tokens, split counts; opcheck and torch.compile(fullgraph=True); on
the GPU DeepSeek-V3-sized heads, CUDA graph capture/replay and inductor."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="kt-marlin's kernels need triton (pip install triton)")

from ktcore.ops.mla import MLASpec, TorchMLA  # noqa: E402
from ktcore.ops.rope import RopeSpec  # noqa: E402

from kt_marlin.mla import MarlinMLA  # noqa: E402
from kt_marlin.mla_decode import launch  # noqa: E402

#: max |ours - reference| / max |reference| per dtype. fp32: both sides accumulate in fp32 in
#: another order. bf16: the reference rounds q_latent, the scores, the probabilities and the
#: latent output to bf16 between its einsums; the kernel keeps scores and the softmax in fp32
#: and rounds p and the output once, so the two differ by a few bf16 ulps of the attention
#: output (observed <= 1e-2); 3e-2 is the bf16 tolerance TorchMLA itself meets against
#: transformers.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
MAX_LEN = 160  # static cache length of the tests (> 129 + decode steps)


def make_spec(kv_lora_rank=32, q_lora_rank=24, yarn=True, heads=3, hidden=48) -> MLASpec:
    if yarn:  # DeepSeek-V2-like YaRN: the softmax scale carries mscale(factor, mscale_all_dim)^2
        rope = RopeSpec(16, rope_type="yarn", factor=40.0, original_max_position_embeddings=64,
                        max_position_embeddings=64 * 40, mscale=0.707, mscale_all_dim=0.707, interleaved=True)
    else:
        rope = RopeSpec(16, max_position_embeddings=MAX_LEN, interleaved=True)
    return MLASpec(hidden_size=hidden, num_heads=heads, q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank,
                   qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=12, rope=rope)


def random_weights(spec: MLASpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: (1 + 0.1 * torch.randn(shape, generator=gen)) if "layernorm" in name
            else 0.15 * torch.randn(shape, generator=gen) for name, shape in spec.weight_shapes().items()}


def build_pair(spec: MLASpec, dtype: torch.dtype, device: str, seed: int = 0):
    options = {"dtype": DTYPE_NAMES[dtype], "max_positions": MAX_LEN}
    weights = random_weights(spec, torch.Generator().manual_seed(seed))
    ref, ours = TorchMLA(spec, "cpu", options), MarlinMLA(spec, device, options)
    ref.load_weights(weights)
    ours.load_weights(weights)
    return ref, ours


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.cpu().float() - ref.float()).abs().max() / ref.float().abs().max())


def check(got, ref, dtype):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prompt, kv_lora_rank, q_lora_rank, yarn", [
    (1, 32, 24, True),
    (7, 64, None, False),  # V2-Lite style: no q LoRA
    (129, 32, 24, True),
])
def test_decode_after_prefill(prompt, kv_lora_rank, q_lora_rank, yarn, dtype, device):
    spec = make_spec(kv_lora_rank, q_lora_rank, yarn)
    ref, ours = build_pair(spec, dtype, device)
    B, H = 2, spec.hidden_size
    ref_cache, our_cache = ref.new_cache(B, MAX_LEN, dtype), ours.new_cache(B, MAX_LEN, dtype)
    x = torch.randn(B, prompt, H).to(dtype)
    positions = torch.arange(prompt)[None].expand(B, prompt)
    lens = torch.full((B,), prompt)
    got = ours(x.to(device), positions.to(device), our_cache, lens.to(device))
    check(got, ref(x, positions, ref_cache, lens), dtype)
    for step in range(2):
        x = torch.randn(B, 1, H).to(dtype)
        positions = torch.full((B, 1), prompt + step)
        lens = torch.full((B,), prompt + step + 1)
        got = ours(x.to(device), positions.to(device), our_cache, lens.to(device))
        check(got, ref(x, positions, ref_cache, lens), dtype)
    torch.testing.assert_close(our_cache.latent.cpu(), ref_cache.latent, rtol=TOL[dtype], atol=TOL[dtype])


def fill_cache(cache, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
    cache.latent.copy_(latent)
    cache.k_rope.copy_(k_rope)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ragged_batch_reads_only_valid_slots(dtype, device):
    """Rows at different positions and lengths (one limited by cache_lens, one empty padding
    row); slots at or past each row's limit hold NaN, which must never be read."""
    spec = make_spec(64)
    ref, ours = build_pair(spec, dtype, device, seed=1)
    B, S = 4, MAX_LEN
    latent = torch.randn(B, S, spec.kv_lora_rank).to(dtype)
    k_rope = torch.randn(B, S, spec.qk_rope_head_dim).to(dtype)
    positions = torch.tensor([[3], [130], [40], [0]])
    lens = torch.tensor([4, 131, 17, 0])  # row 2: cache_lens below position + 1; row 3: padding
    limits = torch.minimum(positions[:, 0] + 1, lens)
    ref_cache, our_cache = ref.new_cache(B, S, dtype), ours.new_cache(B, S, dtype)
    fill_cache(ref_cache, latent, k_rope)
    poisoned_latent, poisoned_rope = latent.clone(), k_rope.clone()
    for b in range(B):
        poisoned_latent[b, int(limits[b]):] = float("nan")
        poisoned_rope[b, int(limits[b]):] = float("nan")
    fill_cache(our_cache, poisoned_latent.to(device), poisoned_rope.to(device))
    x = torch.randn(B, 1, spec.hidden_size).to(dtype)
    want = ref(x, positions, ref_cache, lens)
    got = ours(x.to(device), positions.to(device), our_cache, lens.to(device))
    assert torch.isfinite(got).all()
    # the padding row attends to nothing: zeros before o_proj (the reference averages the cache)
    check(got[:3], want[:3], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absorbed_multi_token(dtype, device):
    """absorbed=True with T = 5 (draft tokens): each token has its own causal limit; equals
    TorchMLA's absorbed form and its decompressed form. The cache holds one row more than
    the batch (a batch bucket)."""
    spec = make_spec(32, yarn=False)
    ref, ours = build_pair(spec, dtype, device, seed=2)
    B, T = 2, 5
    # caches of a larger batch bucket than the call: rows past B are left alone
    ref_cache, our_cache = ref.new_cache(B + 1, MAX_LEN, dtype), ours.new_cache(B + 1, MAX_LEN, dtype)
    x = torch.randn(B, 9, spec.hidden_size).to(dtype)
    positions = torch.arange(9)[None].expand(B, 9)
    lens = torch.full((B,), 9)
    ref(x, positions, ref_cache, lens)
    ours(x.to(device), positions.to(device), our_cache, lens.to(device))
    x = torch.randn(B, T, spec.hidden_size).to(dtype)
    positions = torch.arange(9, 9 + T)[None].expand(B, T) + torch.tensor([[0], [2]])
    lens = positions[:, -1] + 1
    snapshot = (ref_cache.latent.clone(), ref_cache.k_rope.clone())
    want = ref(x, positions, ref_cache, lens, absorbed=True)
    got = ours(x.to(device), positions.to(device), our_cache, lens.to(device), absorbed=True)
    check(got, want, dtype)
    fill_cache(ref_cache, *snapshot)
    check(got, ref(x, positions, ref_cache, lens, absorbed=False), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ragged_prefill(dtype, device):
    """A second prefill chunk attends to the first; rows of different lengths (row 1's
    cache_lens stops inside the chunk: its later tokens see only the valid slots)."""
    spec = make_spec(64, yarn=True)
    ref, ours = build_pair(spec, dtype, device, seed=4)
    B = 2
    ref_cache, our_cache = ref.new_cache(B, MAX_LEN, dtype), ours.new_cache(B, MAX_LEN, dtype)
    for start, T, lens in ((0, 20, [20, 20]), (20, 37, [57, 41])):
        x = torch.randn(B, T, spec.hidden_size).to(dtype)
        positions = torch.arange(start, start + T)[None].expand(B, T)
        lens = torch.tensor(lens)
        want = ref(x, positions, ref_cache, lens)
        got = ours(x.to(device), positions.to(device), our_cache, lens.to(device))
        check(got, want, dtype)


def test_prefill_kernel_odd_dims(device):
    """The prefill kernel against a plain masked softmax: Dn 24, Dr 8, Dv 12 (padded tiles),
    T 19 over S 45, limits not monotone in the batch, one query row with no visible slot."""
    from kt_marlin.mla_prefill import launch as prefill

    B, T, S, nH, dn, dr, dv = 2, 19, 45, 3, 24, 8, 12
    q_nope, q_rope = torch.randn(B, T, nH, dn), torch.randn(B, T, nH, dr)
    kv, k_rope = torch.randn(B, S, nH, dn + dv), torch.randn(B, S, dr)
    limits = torch.stack([torch.arange(1, T + 1) + 26, torch.arange(T).clamp(max=9)])  # [B, T]; row 1 t=0: 0
    cfg = dict(BLOCK_T=16, BLOCK_S=16, num_warps=4, num_stages=1)  # several query and key blocks
    got = prefill(*(a.to(device) for a in (q_nope, q_rope, kv, k_rope, limits)), 0.2, cfg).cpu()
    scores = torch.einsum("bthd,bshd->bhts", q_nope, kv[..., :dn]) + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)
    visible = torch.arange(S)[None, None] < limits[..., None]  # [B, T, S]
    probs = torch.softmax((scores * 0.2).masked_fill(~visible[:, None], float("-inf")), dim=-1).nan_to_num()
    torch.testing.assert_close(got, torch.einsum("bhts,bshv->bthv", probs, kv[..., dn:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_split_count_does_not_change_result(splits, device):
    n, heads, r, dr, S = 3, 5, 32, 16, 100
    q_latent = torch.randn(n, heads, r, device=device)
    q_rope = torch.randn(n, heads, dr, device=device)
    latent = torch.randn(n, S, r, device=device)
    k_rope = torch.randn(n, S, dr, device=device)
    limits = torch.tensor([1, 57, 100], device=device)
    cfg = dict(BLOCK_H=16, BLOCK_S=16, num_warps=4, num_stages=1)
    one = launch(q_latent, q_rope, latent, k_rope, limits, 1, 0.1, dict(cfg, SPLITS=1))
    many = launch(q_latent, q_rope, latent, k_rope, limits, 1, 0.1, dict(cfg, SPLITS=splits))
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
    # against a plain softmax over the visible slots
    scores = (torch.einsum("nhr,nsr->nhs", q_latent, latent) + torch.einsum("nhd,nsd->nhs", q_rope, k_rope)) * 0.1
    visible = torch.arange(S, device=device)[None] < limits[:, None]  # [n, S]
    probs = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
    torch.testing.assert_close(one, torch.einsum("nhs,nsr->nhr", probs, latent), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_head_blocks_and_chunked_reduce(dtype, device):
    """64-head programs with 8 warps (the GPU's tile for many heads) over 70 heads (a masked
    second head block), R 96 (a masked column tile), many splits (the reduce in column
    chunks); NaN past every row's limit, one row with no visible slot (zeros)."""
    n, heads, r, dr, S = 3, 70, 96, 16, 90
    q_latent, q_rope = torch.randn(n, heads, r).to(dtype), torch.randn(n, heads, dr).to(dtype)
    latent, k_rope = torch.randn(n, S, r).to(dtype), torch.randn(n, S, dr).to(dtype)
    limits = torch.tensor([90, 0, 37])
    visible = torch.arange(S)[None] < limits[:, None]  # [n, S]
    got = launch(q_latent.to(device), q_rope.to(device),
                 latent.masked_fill(~visible[..., None], float("nan")).to(device),
                 k_rope.masked_fill(~visible[..., None], float("nan")).to(device), limits.to(device), 1, 0.1,
                 dict(BLOCK_H=64, BLOCK_S=16, SPLITS=40, num_warps=8, num_stages=2)).cpu()
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert (got[1] == 0).all()
    scores = torch.einsum("nhr,nsr->nhs", q_latent.float(), latent.float())
    scores += torch.einsum("nhd,nsd->nhs", q_rope.float(), k_rope.float())
    probs = torch.softmax((scores * 0.1).masked_fill(~visible[:, None], float("-inf")), dim=-1)
    want = torch.einsum("nhs,nsr->nhr", probs, latent.float())
    for row in (0, 2):
        err = rel_err(got[row], want[row])
        assert err <= TOL[dtype], f"row {row}: relative error {err:.3g} > {TOL[dtype]}"


def test_opcheck_and_compile(device):
    spec = make_spec(32)
    ref, ours = build_pair(spec, torch.float32, device, seed=3)
    n, heads, S = 2, spec.num_heads, 40
    args = (torch.randn(n, heads, 32, device=device), torch.randn(n, heads, 16, device=device),
            torch.randn(n, S, 32, device=device), torch.randn(n, S, 16, device=device),
            torch.tensor([9, 40], device=device), 1, 0.125)
    torch.library.opcheck(torch.ops.kt_marlin.mla_decode.default, args)
    prefill_args = (torch.randn(2, 5, heads, 16, device=device), torch.randn(2, 5, heads, 16, device=device),
                    torch.randn(2, 9, heads, 28, device=device), torch.randn(2, 9, 16, device=device),
                    torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 3, 3]], device=device), 0.125)
    torch.library.opcheck(torch.ops.kt_marlin.mla_prefill.default, prefill_args)
    # a decode step compiles without a graph break (aot_eager keeps the CPU test fast)
    cache = ours.new_cache(2, S, torch.float32)
    cache.latent.copy_(torch.randn_like(cache.latent))
    cache.k_rope.copy_(torch.randn_like(cache.k_rope))
    x = torch.randn(2, 1, spec.hidden_size, device=device)
    positions = torch.tensor([[5], [20]], device=device)
    lens = positions[:, 0] + 1
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, positions, cache, lens), ours(x, positions, cache, lens),
                                   rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# GPU: DeepSeek-V3 head shapes, long contexts, CUDA graph capture, inductor.

V3_LIKE = dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128)


def v3_like_spec(heads: int) -> MLASpec:
    rope = RopeSpec(64, rope_type="yarn", factor=40.0, original_max_position_embeddings=4096,
                    max_position_embeddings=4096 * 40, mscale=1.0, mscale_all_dim=1.0, interleaved=True)
    return MLASpec(hidden_size=1024, num_heads=heads, rope=rope, **V3_LIKE)


def scaled_weights(spec: MLASpec, seed: int) -> dict[str, torch.Tensor]:
    """bf16-representable weights of unit-variance outputs (``randn / sqrt(fan_in)``), so the
    softmax has a realistic spread at DeepSeek sizes."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.weight_shapes().items():
        w = torch.randn(shape, generator=gen)
        w = 1 + 0.1 * w if "layernorm" in name else (w * shape[-1] ** -0.5 if len(shape) == 2 else 0.1 * w)
        out[name] = w.bfloat16().float()
    return out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, context", [(16, 4096), (128, 1000), (128, 9000)])
def test_v3_shapes_gpu(heads, context, dtype):
    """Against an fp32 TorchMLA oracle on the same (bf16-representable) weights, cache and input."""
    spec = v3_like_spec(heads)
    weights = scaled_weights(spec, heads)
    S = context + 8
    oracle = TorchMLA(spec, "cuda", {"dtype": "fp32", "max_positions": S})
    ours = MarlinMLA(spec, "cuda", {"dtype": DTYPE_NAMES[dtype], "max_positions": S})
    oracle.load_weights(weights)
    ours.load_weights(weights)
    B = 2
    cache, oracle_cache = ours.new_cache(B, S, dtype), oracle.new_cache(B, S, torch.float32)
    fill_cache(cache, torch.randn_like(cache.latent), torch.randn_like(cache.k_rope))
    fill_cache(oracle_cache, cache.latent.float(), cache.k_rope.float())
    x = torch.randn(B, 1, spec.hidden_size, device="cuda").to(dtype)
    positions = torch.tensor([[context - 1], [context // 3]], device="cuda")
    lens = positions[:, 0] + 1
    with torch.no_grad():
        got = ours(x, positions, cache, lens)
        want = oracle(x.float(), positions, oracle_cache, lens)
    assert got.dtype == dtype
    err = rel_err(got, want.cpu())
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


@pytest.mark.cuda
@pytest.mark.parametrize("S, limits", [(4200, [4096, 0, 1500]), (33000, [32768, 9000, 5])])
def test_v3_decode_kernel_default_config_gpu(S, limits):
    """The op with its default (64-head, many-split) config at DeepSeek-V3's 128 heads,
    latent 512 + rope 64, bf16: NaN past each row's limit, a row with no visible slot."""
    n, heads, r, dr = len(limits), 128, 512, 64
    q_latent = torch.randn(n, heads, r, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(n, heads, dr, device="cuda", dtype=torch.bfloat16)
    latent = torch.randn(n, S, r, device="cuda", dtype=torch.bfloat16)
    k_rope = torch.randn(n, S, dr, device="cuda", dtype=torch.bfloat16)
    lim = torch.tensor(limits, device="cuda")
    visible = torch.arange(S, device="cuda")[None] < lim[:, None]  # [n, S]
    got = torch.ops.kt_marlin.mla_decode(q_latent, q_rope, latent.masked_fill(~visible[..., None], float("nan")),
                                         k_rope.masked_fill(~visible[..., None], float("nan")), lim, 1, 0.07)
    assert torch.isfinite(got).all()
    scores = torch.einsum("nhr,nsr->nhs", q_latent.float(), latent.float())
    scores += torch.einsum("nhd,nsd->nhs", q_rope.float(), k_rope.float())
    probs = torch.softmax((scores * 0.07).masked_fill(~visible[:, None], float("-inf")), dim=-1).nan_to_num()
    want = torch.einsum("nhs,nsr->nhr", probs, latent.float())
    assert rel_err(got, want.cpu()) <= TOL[torch.bfloat16]
    assert (got[lim == 0] == 0).all()


@pytest.mark.cuda
def test_cuda_graph_and_compile_gpu():
    """A captured decode step replayed over 6 steps equals eager decode; inductor fullgraph too."""
    spec = v3_like_spec(32)
    dtype = torch.bfloat16
    ours = MarlinMLA(spec, "cuda", {"dtype": "bf16", "max_positions": 512})
    ours.load_weights(scaled_weights(spec, 7))
    B, S, H = 3, 512, spec.hidden_size
    graph_cache, eager_cache = ours.new_cache(B, S, dtype), ours.new_cache(B, S, dtype)
    prompt = torch.randn(B, 100, H, device="cuda", dtype=dtype)
    positions = torch.arange(100, device="cuda")[None].expand(B, 100)
    with torch.no_grad():
        for cache in (graph_cache, eager_cache):
            ours(prompt, positions, cache, torch.full((B,), 100, device="cuda"))
        static_x = torch.zeros(B, 1, H, device="cuda", dtype=dtype)
        static_pos = torch.full((B, 1), 100, device="cuda")
        static_lens = static_pos[:, 0] + 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ours(static_x, static_pos, ours.new_cache(B, S, dtype), static_lens)  # warm-up
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = ours(static_x, static_pos, graph_cache, static_lens)
        compiled = torch.compile(ours, fullgraph=True)
        for step in range(6):
            x = torch.randn(B, 1, H, device="cuda", dtype=dtype)
            static_x.copy_(x)
            static_pos.fill_(100 + step)
            static_lens.copy_(static_pos[:, 0] + 1)
            graph.replay()
            eager = ours(x, static_pos.clone(), eager_cache, static_lens.clone())
            assert rel_err(static_out, eager.cpu()) <= TOL[dtype] / 10  # same kernels: equal in practice
        torch.testing.assert_close(graph_cache.latent, eager_cache.latent, rtol=TOL[dtype], atol=TOL[dtype])
        step_cache = ours.new_cache(B, S, dtype)
        fill_cache(step_cache, eager_cache.latent, eager_cache.k_rope)
        got = compiled(x, static_pos, step_cache, static_lens)
        want = ours(x, static_pos, eager_cache, static_lens)
        assert rel_err(got, want.cpu()) <= TOL[dtype]
    torch.library.opcheck(torch.ops.kt_marlin.mla_decode.default,
                          (torch.randn(2, 128, 512, device="cuda", dtype=dtype),
                           torch.randn(2, 128, 64, device="cuda", dtype=dtype),
                           torch.randn(2, 300, 512, device="cuda", dtype=dtype),
                           torch.randn(2, 300, 64, device="cuda", dtype=dtype),
                           torch.tensor([300, 17], device="cuda"), 1, 0.07))


MARLIN_MLA_RULES = """\
default_device: cuda:0
rules:
  - match: {module: self_attn}
    replace: {op: mla, backend: marlin, device: cuda:0}
  - match: {module: mlp.experts}
    replace: {op: experts, backend: torch, device: cuda:0}
"""


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_marlin_mla_in_a_model_gpu(arch, tmp_path):
    """A rule places MarlinMLA in every layer: the model's logits match ktcore's torch MLA on
    the same GPU, and the captured (compiled) decode step gives the eager tokens."""
    import ktcore
    from ktcore.models.presets import make_config
    from ktcore.models.synth import SyntheticWeights

    rules = tmp_path / "marlin-mla.yaml"
    rules.write_text(MARLIN_MLA_RULES)
    config = make_config(arch)

    def load(path, **kwargs):
        return ktcore.load(store=SyntheticWeights(config, seed=4, dtype=torch.float32), config=config,
                           rules=path, dtype="fp32", max_seq_len=96, **kwargs)

    ours, ref = load(rules, compile=True), load(f"{arch}-gpu")
    assert type(ours.decoder.model.model.layers[0].self_attn).__name__ == "MarlinMLA"
    prompt = torch.randint(3, config.vocab_size, (21,), generator=torch.Generator().manual_seed(8))
    want, got = ref.logits(prompt), ours.logits(prompt)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    eager = ours.generate(prompt, 48, stop_ids=[], use_graph=False)
    assert ours.generate(prompt, 48, stop_ids=[], use_graph=True) == eager
