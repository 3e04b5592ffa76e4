"""TorchMLA against transformers' DeepseekV3Attention / DeepseekV2Attention, and absorbed decode
against prefill."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DeepseekV2Config, DeepseekV3Config  # noqa: E402
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402

from ktcore.errors import WeightError  # noqa: E402
from ktcore.ops.mla import MLACache, MLASpec, TorchMLA, mla_spec_from_config  # noqa: E402
from ktcore.ops.rope import RopeSpec  # noqa: E402

#: max |ours - reference| / max |reference| per dtype
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}

V3_YARN = {
    "rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0,
}
V2_YARN = {**V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
MAX_LEN = 24  # static cache length of the tests


def make_config(model, q_lora_rank, yarn, bias=False):
    common = dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, attention_bias=bias, rms_norm_eps=1e-6,
    )
    if model == "v3":
        params = V3_YARN if yarn else DEFAULT
        config = DeepseekV3Config(**common, max_position_embeddings=4096 * 40 if yarn else 4096,
                                  rope_parameters=dict(params))
    else:
        params = V2_YARN if yarn else DEFAULT
        config = DeepseekV2Config(**common, max_position_embeddings=4096 * 40 if yarn else 2048,
                                  rope_parameters=dict(params))
    config._attn_implementation = "eager"
    return config


def make_pair(model, q_lora_rank, yarn, dtype, bias=False, seed=0):
    """An HF attention module with random weights and a TorchMLA holding the same weights."""
    config = make_config(model, q_lora_rank, yarn, bias)
    attn_cls = hf_v3.DeepseekV3Attention if model == "v3" else hf_v2.DeepseekV2Attention
    hf = attn_cls(config, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "layernorm" in name else 0.15 * noise)
    hf = hf.to(dtype)
    ours = TorchMLA(mla_spec_from_config(config), options={"max_positions": MAX_LEN})
    ours.load_weights(dict(hf.state_dict()))
    return config, hf, ours


@torch.no_grad()
def hf_forward(model, config, hf, x):
    B, T, _ = x.shape
    positions = torch.arange(T)[None].expand(B, T)
    mask = torch.full((T, T), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None].expand(B, 1, T, T)
    if model == "v3":
        cos_sin = hf_v3.DeepseekV3RotaryEmbedding(config)(x, positions)
        return hf(x, position_embeddings=cos_sin, attention_mask=mask)[0]
    freqs_cis = hf_v2.DeepseekV2RotaryEmbedding(config)(x, positions)
    return hf(x, attention_mask=mask, position_embeddings=freqs_cis)[0]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def graph_decode_vs_eager(ours, batch, steps, dtype):
    """Captures one decode step in a CUDA graph over static inputs, replays it `steps` times and
    returns (graph outputs, eager outputs, graph cache, eager cache)."""
    H = ours.spec.hidden_size
    x = torch.randn(batch, steps, H, device="cuda", dtype=dtype)
    static_x = torch.zeros(batch, 1, H, device="cuda", dtype=dtype)
    static_pos = torch.zeros(batch, 1, dtype=torch.int64, device="cuda")
    static_lens = torch.ones(batch, dtype=torch.int64, device="cuda")
    graph_cache, eager_cache = ours.new_cache(batch, MAX_LEN, dtype), ours.new_cache(batch, MAX_LEN, dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):  # warm-up outside the capture, as torch.cuda.graphs requires
            ours(static_x, static_pos, graph_cache, static_lens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = ours(static_x, static_pos, graph_cache, static_lens)
    got, expected = [], []
    with torch.no_grad():
        for t in range(steps):
            static_x.copy_(x[:, t:t + 1])
            static_pos.fill_(t)
            static_lens.fill_(t + 1)
            graph.replay()
            got.append(static_out.clone())
            expected.append(ours(static_x.clone(), static_pos.clone(), eager_cache, static_lens.clone()))
    return torch.cat(got, 1), torch.cat(expected, 1), graph_cache, eager_cache


CASES = [  # (model, q_lora_rank, yarn)
    ("v3", 32, True),
    ("v3", 32, False),
    ("v3", None, True),
    ("v2", None, False),  # DeepSeek-V2-Lite: no q LoRA
    ("v2", None, True),
    ("v2", 32, True),
]


@pytest.mark.parametrize("model, q_lora_rank, yarn", CASES)
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 5), (1, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_matches_transformers(model, q_lora_rank, yarn, batch, seq, dtype):
    config, hf, ours = make_pair(model, q_lora_rank, yarn, dtype, seed=seq)
    torch.manual_seed(seq * 7 + batch)
    x = torch.randn(batch, seq, 64).to(dtype)
    expected = hf_forward(model, config, hf, x)
    cache = ours.new_cache(batch, MAX_LEN, dtype=dtype)
    positions = torch.arange(seq)[None].expand(batch, seq)
    with torch.no_grad():
        out = ours(x, positions, cache, torch.full((batch,), seq), absorbed=False)
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) < TOL[dtype]


def test_attention_bias_matches_transformers():
    config, hf, ours = make_pair("v3", 32, True, torch.float32, bias=True, seed=3)
    assert "o_proj.bias" in ours.weight_names() and "q_a_proj.bias" in ours.weight_names()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64)
    cache = ours.new_cache(2, MAX_LEN, dtype=torch.float32)
    with torch.no_grad():
        out = ours(x, torch.arange(5)[None].expand(2, 5), cache, torch.full((2,), 5))
    assert rel_err(out, hf_forward("v3", config, hf, x)) < TOL[torch.float32]


@pytest.mark.parametrize("model, q_lora_rank, yarn", [("v3", 32, True), ("v2", None, False), ("v2", 32, True)])
@pytest.mark.parametrize("batch, seq, prefix", [(1, 5, 0), (2, 17, 6), (2, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_absorbed_decode_matches_prefill(model, q_lora_rank, yarn, batch, seq, prefix, dtype):
    """Prefill `prefix` tokens, then decode the rest one at a time (absorbed, static)."""
    _, _, ours = make_pair(model, q_lora_rank, yarn, dtype, seed=seq + prefix)
    torch.manual_seed(seq + batch)
    x = torch.randn(batch, seq, 64).to(dtype)
    positions = torch.arange(seq)[None].expand(batch, seq)
    with torch.no_grad():
        full = ours(x, positions, ours.new_cache(batch, MAX_LEN, dtype), torch.full((batch,), seq), absorbed=False)
        cache = ours.new_cache(batch, MAX_LEN, dtype)
        steps = []
        if prefix:
            steps.append(ours(x[:, :prefix], positions[:, :prefix], cache, torch.full((batch,), prefix)))
        for t in range(prefix, seq):
            steps.append(ours(x[:, t:t + 1], positions[:, t:t + 1], cache, torch.full((batch,), t + 1)))
        # the absorbed form over a whole chunk too
        chunk = ours(x, positions, ours.new_cache(batch, MAX_LEN, dtype), torch.full((batch,), seq), absorbed=True)
    assert rel_err(torch.cat(steps, dim=1), full) < TOL[dtype]
    assert rel_err(chunk, full) < TOL[dtype]


def test_ragged_batch_rows_are_independent():
    """Rows of different lengths in one batch: padding tokens beyond cache_lens are invisible and
    are overwritten by the next decode step; each row equals its own single-row run."""
    _, _, ours = make_pair("v3", 32, True, torch.float32, seed=5)
    torch.manual_seed(1)
    lengths = [5, 3]
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        cache = ours.new_cache(2, MAX_LEN, torch.float32)
        positions = torch.arange(5)[None].expand(2, 5)
        ours(x[:, :5], positions, cache, torch.tensor(lengths))  # row 1: tokens 3, 4 are padding
        step_pos = torch.tensor([[5], [3]])
        step_x = torch.stack((x[0, 5:6], x[1, 3:4]))
        both = ours(step_x, step_pos, cache, torch.tensor([6, 4]))
        for row, n in enumerate(lengths):
            ref = ours(x[row:row + 1, : n + 1], torch.arange(n + 1)[None],
                       ours.new_cache(1, MAX_LEN, torch.float32), torch.tensor([n + 1]))
            assert rel_err(both[row], ref[0, -1:]) < 1e-5


def test_decode_compiles_without_graph_breaks():
    """The absorbed decode path traces with fullgraph=True: no .item(), no data-dependent shape."""
    _, _, ours = make_pair("v3", 32, True, torch.float32, seed=2)
    torch._dynamo.reset()
    step = torch.compile(ours, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        eager_cache, compiled_cache = (ours.new_cache(2, MAX_LEN, torch.float32) for _ in range(2))
        for t in range(3):
            pos = torch.full((2, 1), t)
            lens = torch.full((2,), t + 1)
            expected = ours(x[:, t:t + 1], pos, eager_cache, lens)
            got = step(x[:, t:t + 1], pos, compiled_cache, lens)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_cache.latent, eager_cache.latent)


@pytest.mark.parametrize("model, q_lora_rank, yarn", CASES)
def test_spec_and_softmax_scale_match_transformers(model, q_lora_rank, yarn):
    config, hf, ours = make_pair(model, q_lora_rank, yarn, torch.float32)
    spec = ours.spec
    assert spec.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)
    assert spec.q_lora_rank == q_lora_rank and spec.qk_head_dim == 24
    assert spec.rope.interleaved is True
    assert set(ours.weight_names()) == set(hf.state_dict())
    assert set(ours.state_dict()) == set(hf.state_dict())  # submodules carry HF's names
    for name, tensor in hf.state_dict().items():
        assert ours.expected_shape(name) == tuple(tensor.shape)


def test_cache_holds_only_latent_and_rope_key():
    spec = MLASpec(64, 4, None, 16, 16, 8, 12, RopeSpec(rotary_dim=8, interleaved=True))
    cache = MLACache.for_spec(spec, batch=2, max_len=7, dtype=torch.float16)
    assert dict((k, tuple(v.shape)) for k, v in cache.named_buffers()) == {"latent": (2, 7, 16), "k_rope": (2, 7, 8)}
    assert cache.latent.dtype == torch.float16 and (cache.batch, cache.max_len) == (2, 7)
    assert not cache.state_dict()
    with pytest.raises(ValueError, match="max_len"):
        MLACache(2, 0, 16, 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=0), "num_heads"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(rope=RopeSpec(rotary_dim=4)), "rotary_dim"),
        (dict(rope="yarn"), "RopeSpec"),
        (dict(kv_lora_rank=1.5), "kv_lora_rank"),
    ],
)
def test_spec_validation(kwargs, message):
    base = dict(hidden_size=64, num_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=12, rope=RopeSpec(rotary_dim=8))
    with pytest.raises(ValueError, match=message):
        MLASpec(**{**base, **kwargs})


def test_wrong_weight_shape_is_a_weight_error():
    _, hf, _ = make_pair("v2", None, False, torch.float32)
    weights = dict(hf.state_dict())
    weights["kv_b_proj.weight"] = weights["kv_b_proj.weight"][:-1]
    ours = TorchMLA(mla_spec_from_config(make_config("v2", None, False)))
    with pytest.raises(WeightError, match="kv_b_proj.weight"):
        ours.load_weights(weights)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decode_matches_eager(dtype):
    """The absorbed decode step captured in a CUDA graph replays like eager decode."""
    config, hf, _ = make_pair("v3", 32, True, torch.float32, seed=4)
    ours = TorchMLA(mla_spec_from_config(config), "cuda", {"max_positions": MAX_LEN})
    ours.load_weights({name: w.to(dtype) for name, w in hf.state_dict().items()})
    torch.manual_seed(0)
    got, expected, graph_cache, eager_cache = graph_decode_vs_eager(ours, batch=2, steps=7, dtype=dtype)
    assert rel_err(got, expected) < TOL[dtype] / 10
    torch.testing.assert_close(graph_cache.latent, eager_cache.latent, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(graph_cache.k_rope, eager_cache.k_rope, rtol=TOL[dtype], atol=TOL[dtype])
