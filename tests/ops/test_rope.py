"""RoPE against transformers: inverse frequencies, attention factor and rotated q/k."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig, Qwen3MoeConfig  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf_v2  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf_qwen3  # noqa: E402

from ktcore.ops.rope import RopeSpec, TorchRope, rope_attention_factor, rope_init, rope_spec_from_config  # noqa: E402

# fp32 tolerance: cos/sin of the same float may differ by an ulp between vectorised and
# scalar code paths, so the comparison is not bit-exact.
FP32 = dict(rtol=1e-5, atol=1e-6)

V3_YARN = {
    "rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000.0,
}


def qwen3_config(rope_parameters=None, max_pos=64, head_dim=24):
    params = {"rope_theta": 10000.0, "rope_type": "default", **(rope_parameters or {})}
    return Qwen3MoeConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
        max_position_embeddings=max_pos, rope_parameters=params,
    )


def v3_config(rope_parameters=None, interleave=True, max_pos=4096 * 40):
    return DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=max_pos, rope_interleave=interleave,
        rope_parameters=dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}),
    )


def v2_config(rope_parameters=None, max_pos=256):
    return DeepseekV2Config(
        hidden_size=64, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=max_pos,
        rope_parameters=dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0}),
    )


INIT_CASES = {
    "default": lambda: qwen3_config(),
    "linear": lambda: qwen3_config({"rope_type": "linear", "factor": 4.0}),
    "dynamic": lambda: qwen3_config({"rope_type": "dynamic", "factor": 2.0}),
    "yarn-v3": lambda: v3_config(V3_YARN),
    "yarn-v2-mscale": lambda: v2_config({**V3_YARN, "factor": 16.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "yarn-qwen": lambda: qwen3_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
                                      max_pos=64),
    "yarn-mscale-ratio": lambda: v3_config({**V3_YARN, "mscale": 1.0, "mscale_all_dim": 0.5}),
    "yarn-attention-factor": lambda: qwen3_config(
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8, "attention_factor": 0.8,
         "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}),
    "llama3": lambda: LlamaConfig(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0}),
}


def hf_init(config, seq_len=None):
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return hf_qwen3.Qwen3MoeRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, None, seq_len=seq_len)


@pytest.mark.parametrize("case", sorted(INIT_CASES))
def test_inv_freq_and_attention_factor_match_transformers(case):
    config = INIT_CASES[case]()
    spec = rope_spec_from_config(config)
    expected_freq, expected_factor = hf_init(config)
    inv_freq, factor = rope_init(spec)
    assert inv_freq.dtype == expected_freq.dtype == torch.float32
    assert torch.equal(inv_freq, expected_freq)
    assert factor == expected_factor
    assert rope_attention_factor(spec) == expected_factor


@pytest.mark.parametrize("seq_len", [10, 64, 65, 200, 1000])
def test_dynamic_inv_freq_for_a_sequence_length(seq_len):
    config = INIT_CASES["dynamic"]()
    spec = rope_spec_from_config(config)
    expected, _ = hf_init(config, seq_len=seq_len)
    assert torch.equal(rope_init(spec, seq_len=seq_len)[0], expected)
    # a tensor length is computed on the device like transformers' tensor path
    expected_t, _ = hf_init(config, seq_len=torch.tensor(seq_len))
    assert torch.equal(rope_init(spec, seq_len=torch.tensor(seq_len))[0], expected_t)


def test_spec_from_config_fields():
    v3 = rope_spec_from_config(v3_config(V3_YARN))
    assert (v3.rope_type, v3.factor, v3.rotary_dim, v3.interleaved) == ("yarn", 40.0, 8, True)
    assert (v3.mscale, v3.mscale_all_dim, v3.original_max_position_embeddings) == (1.0, 1.0, 4096)
    assert rope_spec_from_config(v3_config(interleave=False)).interleaved is False
    assert rope_spec_from_config(v2_config()).interleaved is True
    qwen = rope_spec_from_config(qwen3_config())
    assert (qwen.rotary_dim, qwen.interleaved, qwen.rope_type) == (24, False, "default")
    assert rope_spec_from_config(qwen3_config(), rotary_dim=8).rotary_dim == 8
    # transformers 4 style fields
    legacy = type("Legacy", (), dict(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=500.0,
                                     max_position_embeddings=128, hidden_size=64, num_attention_heads=4))()
    spec = rope_spec_from_config(legacy)
    assert (spec.rope_type, spec.factor, spec.theta, spec.rotary_dim) == ("linear", 2.0, 500.0, 16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rotary_dim=7), "even"),
        (dict(rotary_dim=8, rope_type="longrope"), "rope_type"),
        (dict(rotary_dim=8, theta=0.0), "theta"),
        (dict(rotary_dim=8, rope_type="yarn", factor=4.0), "original_max_position_embeddings"),
        (dict(rotary_dim=8, rope_type="llama3", factor=8.0, original_max_position_embeddings=8,
              low_freq_factor=4.0, high_freq_factor=1.0), "low_freq_factor"),
        (dict(rotary_dim=8, factor=-1.0), "factor"),
    ],
)
def test_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RopeSpec(**kwargs)


def test_unsupported_rope_type_in_config():
    config = qwen3_config()
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 1.0}
    with pytest.raises(ValueError, match="longrope"):
        rope_spec_from_config(config)


def deinterleave(x):
    """transformers' DeepSeek-V3 layout: rotated even channels, then rotated odd channels."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def random_qk(batch, seq, heads, kv_heads, dim, max_pos, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim, generator=gen)
    k = torch.randn(batch, seq, kv_heads, dim, generator=gen)
    start = torch.randint(0, max_pos - seq, (batch, 1), generator=gen)
    positions = start + torch.arange(seq)  # [B, T]
    return q, k, positions


QWEN_ROTATION_CASES = {
    "default": lambda: qwen3_config(max_pos=256),
    "linear": lambda: qwen3_config({"rope_type": "linear", "factor": 4.0}, max_pos=256),
    "yarn": lambda: qwen3_config({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
                                 max_pos=256),
    "llama3": lambda: qwen3_config({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, max_pos=256),
}


@pytest.mark.parametrize("case", sorted(QWEN_ROTATION_CASES))
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 5), (1, 17)])
def test_half_split_matches_qwen3_moe(case, batch, seq):
    config = QWEN_ROTATION_CASES[case]()
    q, k, positions = random_qk(batch, seq, 4, 2, 24, 256, seed=seq * 10 + batch)
    cos, sin = hf_qwen3.Qwen3MoeRotaryEmbedding(config)(q, positions)  # [B, T, D]
    q_hf, k_hf = hf_qwen3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    rope = TorchRope(rope_spec_from_config(config))
    q_out, k_out = rope(q, k, positions)
    torch.testing.assert_close(q_out, q_hf.transpose(1, 2), **FP32)
    torch.testing.assert_close(k_out, k_hf.transpose(1, 2), **FP32)


@pytest.mark.parametrize("seq", [5, 17])
def test_dynamic_matches_qwen3_moe_for_the_sequence_length(seq):
    # max_position_embeddings=8: sequences beyond it scale the base (transformers recomputes)
    config = qwen3_config({"rope_type": "dynamic", "factor": 2.0}, max_pos=8)
    q, k, _ = random_qk(1, seq, 4, 2, 24, 64, seed=seq)
    positions = torch.arange(seq)[None]
    cos, sin = hf_qwen3.Qwen3MoeRotaryEmbedding(config)(q, positions)
    q_hf, k_hf = hf_qwen3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    q_out, k_out = TorchRope(rope_spec_from_config(config))(q, k, positions)
    torch.testing.assert_close(q_out, q_hf.transpose(1, 2), **FP32)
    torch.testing.assert_close(k_out, k_hf.transpose(1, 2), **FP32)


def test_dynamic_uses_each_sequence_length():
    config = qwen3_config({"rope_type": "dynamic", "factor": 2.0}, max_pos=8)
    rope = TorchRope(rope_spec_from_config(config))
    q, k, _ = random_qk(2, 5, 4, 2, 24, 64, seed=3)
    positions = torch.tensor([[0, 1, 2, 3, 4], [20, 21, 22, 23, 24]])
    q_both, _ = rope(q, k, positions)
    for row in range(2):
        q_row, _ = rope(q[row:row + 1], k[row:row + 1], positions[row:row + 1])
        torch.testing.assert_close(q_both[row:row + 1], q_row, rtol=0, atol=0)


@pytest.mark.parametrize("rope_parameters", [None, V3_YARN], ids=["default", "yarn"])
@pytest.mark.parametrize("batch, seq", [(1, 1), (2, 5), (2, 17)])
def test_interleaved_matches_deepseek_v3(rope_parameters, batch, seq):
    config = v3_config(rope_parameters)
    q, k, positions = random_qk(batch, seq, 4, 1, 8, 5000, seed=seq + batch)
    cos, sin = hf_v3.DeepseekV3RotaryEmbedding(config)(q, positions)
    q_hf, k_hf = hf_v3.apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    rope = TorchRope(rope_spec_from_config(config), options={"max_positions": 5000})
    q_out, k_out = rope(q, k, positions)
    torch.testing.assert_close(deinterleave(q_out), q_hf.transpose(1, 2), **FP32)
    torch.testing.assert_close(deinterleave(k_out), k_hf.transpose(1, 2), **FP32)


def test_deepseek_v3_without_interleave_is_half_split():
    config = v3_config(V3_YARN, interleave=False)
    q, k, positions = random_qk(2, 5, 4, 1, 8, 5000, seed=11)
    cos, sin = hf_v3.DeepseekV3RotaryEmbedding(config)(q, positions)
    q_hf, k_hf = hf_v3.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    q_out, k_out = TorchRope(rope_spec_from_config(config), options={"max_positions": 5000})(q, k, positions)
    torch.testing.assert_close(q_out, q_hf.transpose(1, 2), **FP32)
    torch.testing.assert_close(k_out, k_hf.transpose(1, 2), **FP32)


@pytest.mark.parametrize("batch, seq", [(1, 5), (2, 17)])
def test_interleaved_matches_deepseek_v2(batch, seq):
    config = v2_config({**V3_YARN, "factor": 16.0, "mscale": 0.707, "mscale_all_dim": 0.707}, max_pos=65536)
    q, k, positions = random_qk(batch, seq, 4, 1, 8, 2048, seed=seq)
    freqs_cis = hf_v2.DeepseekV2RotaryEmbedding(config)(q, positions)
    q_hf, k_hf = hf_v2.apply_rotary_emb(q.transpose(1, 2), k.transpose(1, 2), freqs_cis)
    rope = TorchRope(rope_spec_from_config(config), options={"max_positions": 2048})
    q_out, k_out = rope(q, k, positions)
    torch.testing.assert_close(q_out, q_hf.transpose(1, 2), **FP32)
    torch.testing.assert_close(k_out, k_hf.transpose(1, 2), **FP32)


@pytest.mark.parametrize("interleaved", [False, True])
def test_partial_rotary_passes_the_rest_through(interleaved):
    torch.manual_seed(0)
    full = TorchRope(RopeSpec(rotary_dim=8, interleaved=interleaved, max_position_embeddings=32))
    q, k = torch.randn(2, 5, 3, 12), torch.randn(2, 5, 1, 12)
    positions = torch.randint(0, 32, (2, 5))
    q_out, k_out = full(q, k, positions)
    assert torch.equal(q_out[..., 8:], q[..., 8:]) and torch.equal(k_out[..., 8:], k[..., 8:])
    q_rot, _ = full(q[..., :8].contiguous(), k[..., :8].contiguous(), positions)
    assert torch.equal(q_out[..., :8], q_rot)
    # rotation keeps the norm of each pair; position 0 is the identity
    torch.testing.assert_close(q_out.norm(dim=-1), q.norm(dim=-1), **FP32)
    q0, _ = full(q, k, torch.zeros_like(positions))
    assert torch.equal(q0, q)


def test_bf16_keeps_dtype_and_is_close():
    torch.manual_seed(0)
    rope = TorchRope(RopeSpec(rotary_dim=16, max_position_embeddings=64))
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    positions = torch.randint(0, 64, (2, 5))
    q32, k32 = rope(q, k, positions)
    q16, k16 = rope(q.bfloat16(), k.bfloat16(), positions)
    assert q16.dtype == k16.dtype == torch.bfloat16
    torch.testing.assert_close(q16.float(), q32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(k16.float(), k32, rtol=2e-2, atol=2e-2)


def test_rope_has_no_weights():
    rope = TorchRope(RopeSpec(rotary_dim=8))
    assert rope.weight_names() == () and rope.loaded
    rope.load_weights({})
    assert rope.op_name == "rope"
