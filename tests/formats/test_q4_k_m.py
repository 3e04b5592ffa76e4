"""llama.cpp's Q4_K_M type mix (``ktcore.formats.q4_k_m``): which tensors get Q6_K for the
12- and 48-layer Qwen3-30B-A3B shape, the F32 tensors, 8-expert models and row fallbacks."""

from __future__ import annotations

import pytest

from ktcore.formats.gguf_names import gguf_plan
from ktcore.formats.q4_k_m import q4_k_m_types, use_more_bits
from ktcore.models.presets import make_config

#: use_more_bits layers, written out from llama-quant.cpp's formula by hand.
MORE_BITS = {12: [0, 3, 6, 9, 10, 11],
             48: [0, 1, 2, 3, 4, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 42, 43, 44, 45, 46, 47]}


def _layers(types: dict[str, str], part: str, qtype: str) -> list[int]:
    return sorted(int(n.split(".")[1]) for n, t in types.items() if f".{part}." in n and t == qtype)


def test_use_more_bits():
    for n, layers in MORE_BITS.items():
        assert [i for i in range(n) if use_more_bits(i, n)] == layers
    assert [i for i in range(3) if use_more_bits(i, 3)] == [2]  # n // 8 = 0, 7n // 8 = 2


@pytest.mark.parametrize("layers", [12, 48])
def test_qwen3_30b_a3b(layers):
    config = make_config("qwen3_moe", "qwen3-30b-a3b", layers=layers)
    types = q4_k_m_types(config)
    assert set(types) == {s.name for s in gguf_plan(config)}
    assert _layers(types, "attn_v", "Q6_K") == _layers(types, "ffn_down_exps", "Q6_K") == MORE_BITS[layers]
    assert _layers(types, "attn_v", "Q4_K") == _layers(types, "ffn_down_exps", "Q4_K") == \
        [i for i in range(layers) if i not in MORE_BITS[layers]]
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    for name, qtype in types.items():
        if name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            assert qtype == "F32", name
        elif not name.startswith(("output.", "token_embd.")) and ".attn_v." not in name \
                and ".ffn_down_exps." not in name:
            assert qtype == "Q4_K", name  # attn_q/k/output, ffn_gate/up_exps
    assert sorted(set(types.values())) == ["F32", "Q4_K", "Q6_K"]  # 2048, 768 and 4096 are multiples of 256


def test_layers_cut_after_quantising():
    """The first 12 layers of a 48-layer Q4_K_M keep the 48-layer choices."""
    types = q4_k_m_types(make_config("qwen3_moe", "qwen3-30b-a3b", layers=12), n_layers=48)
    assert _layers(types, "ffn_down_exps", "Q6_K") == [0, 1, 2, 3, 4, 5, 8, 11]


def test_row_length_fallbacks_on_tiny():
    """Tiny rows (64, 32 values) are not multiples of 256: Q4_K -> Q5_0, Q6_K -> Q8_0."""
    types = q4_k_m_types(make_config("qwen3_moe", "tiny", layers=3))
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_0"
    assert _layers(types, "ffn_down_exps", "Q8_0") == [2]  # 3 layers: only the last uses more bits
    assert _layers(types, "ffn_down_exps", "Q5_0") == [0, 1]
    assert types["blk.1.ffn_gate_exps.weight"] == "Q5_0" and types["blk.1.ffn_gate_inp.weight"] == "F32"


def test_shared_experts_and_dense_layers():
    """ffn_down of a dense first layer and ffn_down_shexp follow the same layer rule."""
    config = make_config("deepseek_v2", "tiny", layers=16, hidden_size=256, moe_intermediate_size=256,
                         intermediate_size=256, kv_lora_rank=256, qk_nope_head_dim=256, v_head_dim=256)
    types = q4_k_m_types(config)
    more = [0, 1, 4, 7, 10, 13, 14, 15]  # n = 16: n/8 = 2, 7n/8 = 14
    assert [i for i in range(16) if use_more_bits(i, 16)] == more
    assert types["blk.0.ffn_down.weight"] == "Q6_K"
    assert _layers(types, "ffn_down_exps", "Q6_K") == _layers(types, "ffn_down_shexp", "Q6_K") == more[1:]
    assert types["blk.3.attn_k_b.weight"] == "Q4_K" and types["blk.3.attn_v_b.weight"] == "Q4_K"


def test_eight_experts():
    """Mixtral (8 experts): attn_v and attn_k Q8_0 in every layer, attn_output Q5_K."""
    config = make_config("mixtral", "tiny", layers=4, hidden_size=256, intermediate_size=256)
    types = q4_k_m_types(config)
    for i in range(4):
        assert types[f"blk.{i}.attn_v.weight"] == types[f"blk.{i}.attn_k.weight"] == "Q8_0"
        assert types[f"blk.{i}.attn_output.weight"] == "Q5_K" and types[f"blk.{i}.attn_q.weight"] == "Q4_K"
    assert _layers(types, "ffn_down_exps", "Q6_K") == [2, 3]  # n = 4: n // 8 = 0, 7n // 8 = 3
