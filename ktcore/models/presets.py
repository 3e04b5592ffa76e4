"""Model configs ktcore can generate without downloading anything.

``tiny`` presets are small enough for unit tests on two CPU cores yet keep every structural
feature of their family (MLA with and without q LoRA, YaRN, group-limited and ``noaux_tc``
routing, shared experts, first dense layers, GQA). Full-size-shaped presets carry the real
models' dimensions for benchmarks.
"""

from __future__ import annotations

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
    # Full-size shapes, from the published config.json of each model. Benchmarks use them
    # (usually with ``num_hidden_layers`` reduced); tests only build them on the meta device.
    "qwen3-30b-a3b": {
        "qwen3_moe": dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], rms_norm_eps=1e-6, max_position_embeddings=40960,
            tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        ),
    },
    "deepseek-v2-lite": {
        "deepseek_v2": dict(
            vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
            num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
            n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
            qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1,
            num_experts_per_tok=6, topk_method="greedy", first_k_dense_replace=1,
            norm_topk_prob=False, rms_norm_eps=1e-6, max_position_embeddings=163840,
            tie_word_embeddings=False,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                 original_max_position_embeddings=4096, beta_fast=32.0,
                                 beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
        ),
    },
    "deepseek-v3": {
        "deepseek_v3": dict(
            vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
            n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
            qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
            num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, rope_interleave=True,
            rms_norm_eps=1e-6, max_position_embeddings=163840, tie_word_embeddings=False,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=40.0,
                                 original_max_position_embeddings=4096, beta_fast=32.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        ),
    },
}

#: Published total parameter counts of the full-size presets (main model; DeepSeek-V3's
#: multi-token-prediction layer excluded), for sanity checks.
PUBLISHED_PARAMS = {"qwen3-30b-a3b": 30.5e9, "deepseek-v2-lite": 15.7e9, "deepseek-v3": 671e9}


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def preset_architectures(preset: str) -> tuple[str, ...]:
    """The architectures a preset is defined for (every one for ``tiny``, one for a real model)."""
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
    return tuple(arch for arch in ARCHITECTURES if arch in _PRESETS[preset])


def make_config(arch: str, preset: str = "tiny", *, layers: int | None = None, **overrides: Any):
    """A transformers config object of ``arch`` with the preset's dimensions.

    ``layers`` overrides ``num_hidden_layers`` (the first layers of the full model: dense
    layers stay first). Other keyword arguments override config fields.
    """
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(preset_names())}")
    if arch not in _PRESETS[preset]:
        raise ValueError(f"preset {preset!r} is a {'/'.join(preset_architectures(preset))} model, "
                         f"not {arch}")
    kwargs = dict(_PRESETS[preset][arch], **overrides)
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        kwargs["num_hidden_layers"] = layers
    return AutoConfig.for_model(arch, **kwargs)


def causal_lm_class(arch: str) -> str:
    """The transformers ``*ForCausalLM`` class name of ``arch`` (config.json ``architectures``)."""
    if arch not in _CAUSAL_LM:
        raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    return _CAUSAL_LM[arch]


def write_config(arch: str, outdir: str | Path, preset: str = "tiny", **overrides: Any) -> Path:
    """Writes ``config.json`` of the preset into ``outdir``; returns the directory."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    config = make_config(arch, preset, **overrides)
    config.architectures = [causal_lm_class(arch)]
    config.save_pretrained(outdir)
    return outdir


_CAUSAL_LM = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
