"""Model configs ktcore can generate without downloading anything.

``tiny`` presets are small enough for unit tests on two CPU cores yet keep every structural
feature of their family (MLA with and without q LoRA, YaRN, group-limited and ``noaux_tc``
routing, shared experts, first dense layers, GQA). Full-size-shaped presets carry the real
models' dimensions for benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Architectures (HF ``model_type``) ktcore supports.
ARCHITECTURES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "qwen2_moe", "mixtral")

_TINY_COMMON = dict(vocab_size=512, hidden_size=64, rms_norm_eps=1e-6, max_position_embeddings=1024, tie_word_embeddings=False)

_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "deepseek_v3": dict(
            _TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
            routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8,
            v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4,
            first_k_dense_replace=1, norm_topk_prob=True, rope_interleave=True,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                 original_max_position_embeddings=256, beta_fast=32.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        ),
        "deepseek_v2": dict(
            _TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=16,
            routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
            v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4,
            topk_method="group_limited_greedy", first_k_dense_replace=1, norm_topk_prob=False,
        ),
        "qwen3_moe": dict(
            _TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
            num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        ),
        "qwen2_moe": dict(
            _TINY_COMMON, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=4,
            shared_expert_intermediate_size=64, norm_topk_prob=False, decoder_sparse_step=1,
            mlp_only_layers=[],
        ),
        "mixtral": dict(
            _TINY_COMMON, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        ),
    },
}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def make_config(arch: str, preset: str = "tiny", **overrides: Any):
    """A transformers config object of ``arch`` with the preset's dimensions."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    if preset not in _PRESETS or arch not in _PRESETS[preset]:
        raise ValueError(f"no preset {preset!r} for {arch}; presets: {', '.join(preset_names())}")
    kwargs = dict(_PRESETS[preset][arch], **overrides)
    return AutoConfig.for_model(arch, **kwargs)


def write_config(arch: str, outdir: str | Path, preset: str = "tiny", **overrides: Any) -> Path:
    """Writes ``config.json`` of the preset into ``outdir``; returns the directory."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    config = make_config(arch, preset, **overrides)
    config.architectures = [_CAUSAL_LM[arch]]
    config.save_pretrained(outdir)
    return outdir


_CAUSAL_LM = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
