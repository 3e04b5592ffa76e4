"""GQAAttention against transformers' Qwen3MoeAttention / Qwen2MoeAttention / MixtralAttention,
and token-by-token decode against prefill."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as hf_mixtral  # noqa: E402
from transformers.models.qwen2_moe import modeling_qwen2_moe as hf_qwen2  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_qwen3  # noqa: E402

from ktcore.ops.gqa import GQAAttention, GQASpec, KVCache, gqa_spec_from_config  # noqa: E402
from ktcore.ops.rope import RopeSpec  # noqa: E402

#: max |ours - reference| / max |reference| per dtype
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
MAX_LEN = 24  # static cache length of the tests

MODELS = {
    # name: (config factory, attention class, rotary embedding class)
    "qwen3_moe": (lambda: Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                         max_position_embeddings=64),
                  hf_qwen3.Qwen3MoeAttention, hf_qwen3.Qwen3MoeRotaryEmbedding),
    "qwen3_moe-bias-yarn": (lambda: Qwen3MoeConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16, attention_bias=True,
        max_position_embeddings=64, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                     "original_max_position_embeddings": 16}),
        hf_qwen3.Qwen3MoeAttention, hf_qwen3.Qwen3MoeRotaryEmbedding),
    "qwen2_moe": (lambda: Qwen2MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64),
                  hf_qwen2.Qwen2MoeAttention, hf_qwen2.Qwen2MoeRotaryEmbedding),
    "mixtral": (lambda: MixtralConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=64),
                hf_mixtral.MixtralAttention, hf_mixtral.MixtralRotaryEmbedding),
}


def make_pair(model, dtype, seed=0):
    factory, attn_cls, rotary_cls = MODELS[model]
    config = factory()
    config._attn_implementation = "eager"
    hf = attn_cls(config, layer_idx=0).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    hf = hf.to(dtype)
    ours = GQAAttention(gqa_spec_from_config(config), options={"max_positions": MAX_LEN})
    ours.load_weights(dict(hf.state_dict()))
    return config, hf, rotary_cls, ours


@torch.no_grad()
def hf_forward(config, hf, rotary_cls, x):
    B, T, _ = x.shape
    positions = torch.arange(T)[None].expand(B, T)
    mask = torch.full((T, T), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)[None, None].expand(B, 1, T, T)
    cos_sin = rotary_cls(config)(x, positions)
    return hf(x, position_embeddings=cos_sin, attention_mask=mask)[0]


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


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 5), (1, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_matches_transformers(model, batch, seq, dtype):
    config, hf, rotary_cls, ours = make_pair(model, dtype, seed=seq)
    torch.manual_seed(seq * 7 + batch)
    x = torch.randn(batch, seq, 64).to(dtype)
    expected = hf_forward(config, hf, rotary_cls, x)
    positions = torch.arange(seq)[None].expand(batch, seq)
    with torch.no_grad():
        out = ours(x, positions, ours.new_cache(batch, MAX_LEN, dtype), torch.full((batch,), seq))
    assert out.dtype == dtype and out.shape == expected.shape
    assert rel_err(out, expected) < TOL[dtype]


@pytest.mark.parametrize("model", ["qwen3_moe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("batch, seq, prefix", [(1, 5, 0), (2, 17, 6), (2, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_matches_prefill(model, batch, seq, prefix, dtype):
    _, _, _, ours = make_pair(model, dtype, seed=seq + prefix)
    torch.manual_seed(seq + batch)
    x = torch.randn(batch, seq, 64).to(dtype)
    positions = torch.arange(seq)[None].expand(batch, seq)
    with torch.no_grad():
        full = ours(x, positions, ours.new_cache(batch, MAX_LEN, dtype), torch.full((batch,), seq))
        cache = ours.new_cache(batch, MAX_LEN, dtype)
        steps = []
        if prefix:
            steps.append(ours(x[:, :prefix], positions[:, :prefix], cache, torch.full((batch,), prefix)))
        for t in range(prefix, seq):
            steps.append(ours(x[:, t:t + 1], positions[:, t:t + 1], cache, torch.full((batch,), t + 1)))
        static_chunk = ours(x, positions, ours.new_cache(batch, MAX_LEN, dtype), torch.full((batch,), seq), static=True)
    assert rel_err(torch.cat(steps, dim=1), full) < TOL[dtype]
    assert rel_err(static_chunk, full) < TOL[dtype]


def test_ragged_batch_rows_are_independent():
    _, _, _, ours = make_pair("qwen3_moe", torch.float32, seed=5)
    torch.manual_seed(1)
    lengths = [5, 3]
    x = torch.randn(2, 6, 64)
    with torch.no_grad():
        cache = ours.new_cache(2, MAX_LEN, torch.float32)
        ours(x[:, :5], torch.arange(5)[None].expand(2, 5), cache, torch.tensor(lengths))  # row 1: 2 padding tokens
        step_x = torch.stack((x[0, 5:6], x[1, 3:4]))
        both = ours(step_x, torch.tensor([[5], [3]]), cache, torch.tensor([6, 4]))
        for row, n in enumerate(lengths):
            ref = ours(x[row:row + 1, : n + 1], torch.arange(n + 1)[None],
                       ours.new_cache(1, MAX_LEN, torch.float32), torch.tensor([n + 1]))
            assert rel_err(both[row], ref[0, -1:]) < 1e-5


def test_decode_compiles_without_graph_breaks():
    _, _, _, ours = make_pair("qwen3_moe", torch.float32, seed=2)
    torch._dynamo.reset()
    step = torch.compile(ours, backend="eager", fullgraph=True)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        eager_cache, compiled_cache = (ours.new_cache(2, MAX_LEN, torch.float32) for _ in range(2))
        for t in range(3):
            pos, lens = torch.full((2, 1), t), torch.full((2,), t + 1)
            torch.testing.assert_close(step(x[:, t:t + 1], pos, compiled_cache, lens),
                                       ours(x[:, t:t + 1], pos, eager_cache, lens), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_spec_and_weight_names_match_transformers(model):
    config, hf, _, ours = make_pair(model, torch.float32)
    assert set(ours.weight_names()) == set(hf.state_dict())
    assert set(ours.state_dict()) == set(hf.state_dict())  # submodules carry HF's names
    for name, tensor in hf.state_dict().items():
        assert ours.expected_shape(name) == tuple(tensor.shape)
    assert ours.spec.softmax_scale == hf.scaling


def test_bias_rules():
    qwen2 = gqa_spec_from_config(Qwen2MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm) == (True, False, False)
    qwen3 = gqa_spec_from_config(Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                attention_bias=True))
    assert (qwen3.qkv_bias, qwen3.o_bias, qwen3.qk_norm) == (True, True, True)
    mixtral = gqa_spec_from_config(MixtralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert (mixtral.qkv_bias, mixtral.o_bias, mixtral.qk_norm, mixtral.head_dim) == (False, False, False, 16)


def test_sliding_window_is_rejected():
    with pytest.raises(ValueError, match="sliding"):
        gqa_spec_from_config(MixtralConfig(hidden_size=64, num_attention_heads=4, sliding_window=32))
    with pytest.raises(ValueError, match="sliding"):
        gqa_spec_from_config(Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                            use_sliding_window=True))
    with pytest.raises(ValueError, match="model_type"):
        gqa_spec_from_config(type("Cfg", (), {"model_type": "gpt2"})())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_kv_heads=3), "multiple"),
        (dict(head_dim=0), "head_dim"),
        (dict(rope=RopeSpec(rotary_dim=32)), "exceeds"),
        (dict(rope=RopeSpec(rotary_dim=16, interleaved=True)), "half-split"),
    ],
)
def test_spec_validation(kwargs, message):
    base = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, rope=RopeSpec(rotary_dim=16))
    with pytest.raises(ValueError, match=message):
        GQASpec(**{**base, **kwargs})


def test_cache_shapes():
    cache = KVCache(2, 9, 2, 16, dtype=torch.float16)
    assert tuple(cache.k.shape) == tuple(cache.v.shape) == (2, 9, 2, 16)
    assert cache.k.dtype == torch.float16 and (cache.batch, cache.max_len) == (2, 9) and not cache.state_dict()
    with pytest.raises(ValueError, match="n_kv_heads"):
        KVCache(2, 9, 0, 16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_graph_decode_matches_eager(dtype):
    """The static decode step captured in a CUDA graph replays like eager decode."""
    config, hf, _, _ = make_pair("qwen3_moe-bias-yarn", torch.float32, seed=4)
    ours = GQAAttention(gqa_spec_from_config(config), "cuda", {"max_positions": MAX_LEN})
    ours.load_weights({name: w.to(dtype) for name, w in hf.state_dict().items()})
    torch.manual_seed(0)
    got, expected, graph_cache, eager_cache = graph_decode_vs_eager(ours, batch=2, steps=7, dtype=dtype)
    assert rel_err(got, expected) < TOL[dtype] / 10
    torch.testing.assert_close(graph_cache.k, eager_cache.k, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(graph_cache.v, eager_cache.v, rtol=TOL[dtype], atol=TOL[dtype])
