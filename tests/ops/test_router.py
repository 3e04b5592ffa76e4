"""Routers against transformers' router modules; whole MoE blocks composed from ktcore parts."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from ktcore.errors import KtError
from ktcore.ops.experts import ExpertsSpec, TorchExperts, activation_fn
from ktcore.ops.linear import LinearSpec, TorchLinear
from ktcore.ops.router import (
    GroupLimitedRouter,
    NoAuxTCRouter,
    RouterSpec,
    SoftmaxTopKRouter,
    build_router,
    router_spec_from_config,
)

# (atol, rtol) of the top-k weights per dtype; ids must match exactly.
TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 8e-3)}  # HF's Qwen routers round to bf16

# name -> (config class name, config kwargs, HF router class path, HF block class path)
CASES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=40),
                  "qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", "qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock"),
    "qwen3_moe_norm": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=3, moe_intermediate_size=40,
                                              norm_topk_prob=True),
                       "qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter", "qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock"),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                                         shared_expert_intermediate_size=56, num_attention_heads=8),
                  "qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter", "qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock"),
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=40),
                "mixtral.modeling_mixtral.MixtralTopKRouter", "mixtral.modeling_mixtral.MixtralSparseMoeBlock"),
    "deepseek_v2": ("DeepseekV2Config", dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=40,
                                             n_shared_experts=2, routed_scaling_factor=16.0, num_attention_heads=8),
                    "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter", "deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe"),
    "deepseek_v2_group": ("DeepseekV2Config", dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=40,
                                                   n_shared_experts=1, n_group=4, topk_group=2, num_attention_heads=8,
                                                   topk_method="group_limited_greedy", routed_scaling_factor=2.0),
                          "deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter", "deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe"),
    "deepseek_v3": ("DeepseekV3Config", dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=40,
                                             n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5),
                    "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter", "deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE"),
    "deepseek_v3_plain": ("DeepseekV3Config", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=40,
                                                   n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0),
                          "deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter", "deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE"),
}


def hf_class(path: str):
    import importlib

    module, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


def hf_config(case: str, hidden_size: int = 64):
    import transformers

    config_cls, kwargs, _, _ = CASES[case]
    return getattr(transformers, config_cls)(hidden_size=hidden_size, experts_implementation="eager", **kwargs)


def randomise(module: nn.Module) -> nn.Module:
    """Random weights (fan-in scaled) and a random DeepSeek-V3 score correction bias."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return module


def by_id(ids: torch.Tensor, weights: torch.Tensor):
    """Sorts each token's (id, weight) pairs by id so that routers of any order compare."""
    order = ids.long().argsort(dim=-1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


def routed_by_both(case, T, dtype):
    """``(our router, x, (ids, weights) ours, (ids, weights) transformers')`` for one case."""
    torch.manual_seed(0)
    config = hf_config(case)
    hf = randomise(hf_class(CASES[case][2])(config)).to(dtype)
    ours = build_router(router_spec_from_config(config), dtype=dtype)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(T, 64, dtype=dtype)
    with torch.no_grad():
        _, hf_weights, hf_ids = hf(x)
    ids, weights = ours(x)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == (T, config.num_experts_per_tok)
    return ours, x, (ids, weights), (hf_ids, hf_weights)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 3, 16, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_matches_transformers(case, T, dtype):
    _, _, (ids, weights), (hf_ids, hf_weights) = routed_by_both(case, T, dtype)
    ids, weights = by_id(ids, weights)
    hf_ids, hf_weights = by_id(hf_ids, hf_weights)
    assert torch.equal(ids, hf_ids)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(weights, hf_weights, atol=atol, rtol=rtol)


def test_router_outputs_are_ordered_by_score():
    torch.manual_seed(1)
    router = randomise(build_router(RouterSpec("softmax_topk", 8, 64, 3)))
    ids, weights = router(torch.randn(5, 64))
    assert torch.all(weights[:, :-1] >= weights[:, 1:])


@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v2_group", "deepseek_v3"])
def test_router_compiles_without_graph_breaks(case):
    torch.manual_seed(2)
    router = randomise(build_router(router_spec_from_config(hf_config(case))))
    compiled = torch.compile(router, fullgraph=True, backend="eager")
    x = torch.randn(4, 64)
    for got, expected in zip(compiled(x), router(x)):
        assert torch.equal(got, expected)


class ComposedMoE(nn.Module):
    """An HF sparse-MoE block rebuilt from ktcore parts: router + TorchExperts (+ shared MLP)."""

    def __init__(self, hf_block: nn.Module, config):
        super().__init__()
        spec = router_spec_from_config(config)
        self.router = build_router(spec)
        self.router.load_state_dict(hf_block.gate.state_dict())
        gate_up, down = hf_block.experts.gate_up_proj.detach(), hf_block.experts.down_proj.detach()
        E, two_i, H = gate_up.shape
        I = two_i // 2
        self.experts = TorchExperts(ExpertsSpec(E, H, I, spec.top_k, activation=config.hidden_act))
        self.experts.load_weights({"gate": gate_up[:, :I], "up": gate_up[:, I:], "down": down})
        self.act = activation_fn(config.hidden_act)
        shared = getattr(hf_block, "shared_experts", None) or getattr(hf_block, "shared_expert", None)
        self.shared = None if shared is None else nn.ModuleDict(
            {name: self._linear(getattr(shared, name)) for name in ("gate_proj", "up_proj", "down_proj")}
        )
        gate = getattr(hf_block, "shared_expert_gate", None)
        self.shared_gate = None if gate is None else self._linear(gate)

    @staticmethod
    def _linear(hf_linear: nn.Linear) -> TorchLinear:
        linear = TorchLinear(LinearSpec(hf_linear.in_features, hf_linear.out_features, bias=hf_linear.bias is not None))
        weights = {"weight": hf_linear.weight.detach()}
        if hf_linear.bias is not None:
            weights["bias"] = hf_linear.bias.detach()
        linear.load_weights(weights)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, S, H]
        h = x.reshape(-1, x.shape[-1])  # [T, H]
        ids, weights = self.router(h)  # [T, K] int32, [T, K] fp32
        y = self.experts(h, ids, weights)  # [T, H]
        if self.shared is not None:
            s = self.shared["down_proj"](self.act(self.shared["gate_proj"](h)) * self.shared["up_proj"](h))
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(h)) * s
            y = y + s
        return y.view(x.shape)


@pytest.mark.parametrize("case", ["qwen3_moe_norm", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v2_group", "deepseek_v3"])
@pytest.mark.parametrize("B,S", [(1, 1), (2, 40)])
@pytest.mark.parametrize("hidden_size", [64, 72])
def test_moe_block_matches_transformers(case, B, S, hidden_size):
    torch.manual_seed(3)
    config = hf_config(case, hidden_size)
    hf = randomise(hf_class(CASES[case][3])(config)).eval()
    ours = ComposedMoE(hf, config)
    x = torch.randn(B, S, hidden_size)
    with torch.no_grad():
        expected = hf(x)
    torch.testing.assert_close(ours(x), expected, atol=2e-5, rtol=1e-4)


def test_composed_decode_step_compiles_without_graph_breaks():
    torch.manual_seed(4)
    config = hf_config("deepseek_v3")
    hf = randomise(hf_class(CASES["deepseek_v3"][3])(config)).eval()
    ours = ComposedMoE(hf, config)
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), hf(x), atol=2e-5, rtol=1e-4)


def test_spec_from_default_configs():
    from transformers import DeepseekV3Config, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    v3 = router_spec_from_config(DeepseekV3Config())
    assert v3 == RouterSpec("noaux_tc", 256, 7168, 8, norm_topk_prob=True, n_group=8, topk_group=4,
                            routed_scaling_factor=2.5, fp32_logits=True)
    assert router_spec_from_config(Qwen3MoeConfig()) == RouterSpec("softmax_topk", 128, 2048, 8, fp32_logits=False)
    assert router_spec_from_config(Qwen2MoeConfig()) == RouterSpec("softmax_topk", 60, 2048, 4, fp32_logits=False)
    assert router_spec_from_config(MixtralConfig()) == RouterSpec(
        "softmax_topk", 8, 4096, 2, norm_topk_prob=True, fp32_logits=False)
    v2 = router_spec_from_config(hf_config("deepseek_v2_group"))
    assert (v2.kind, v2.n_group, v2.topk_group, v2.routed_scaling_factor) == ("group_limited", 4, 2, 2.0)
    assert isinstance(build_router(v2), GroupLimitedRouter)
    assert isinstance(build_router(v3), NoAuxTCRouter)
    assert isinstance(build_router(router_spec_from_config(hf_config("deepseek_v2"))), SoftmaxTopKRouter)


def test_spec_from_config_errors(caplog):
    from transformers import DeepseekV2Config, DeepseekV3Config, LlamaConfig

    with pytest.raises(KtError, match="model_type 'llama'"):
        router_spec_from_config(LlamaConfig())
    with pytest.raises(KtError, match="num_experts_per_tok"):
        router_spec_from_config(DeepseekV2Config())  # transformers leaves it None
    with pytest.raises(KtError, match="topk_method"):
        router_spec_from_config(DeepseekV2Config(num_experts_per_tok=6, topk_method="noaux_tc"))
    with pytest.raises(KtError, match="scoring_func"):
        router_spec_from_config(DeepseekV3Config(scoring_func="softmax"))
    with caplog.at_level(logging.WARNING, logger="ktcore.ops.router"):
        spec = router_spec_from_config(DeepseekV2Config(num_experts_per_tok=6, norm_topk_prob=True))
    assert not spec.norm_topk_prob and "norm_topk_prob" in caplog.text


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(kind="softmax"), "kind"),
        (dict(top_k=9), "top_k"),
        (dict(kind="noaux_tc", n_group=3), "divisible"),
        (dict(kind="noaux_tc", n_group=4, topk_group=5), "topk_group"),
        (dict(kind="group_limited", n_group=4, topk_group=1, top_k=3), "top_k=3 exceeds"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor"),
        (dict(norm_topk_prob=1), "norm_topk_prob"),
        (dict(hidden_size=0), "hidden_size"),
    ],
)
def test_spec_validation(kwargs, message):
    args = dict(kind="softmax_topk", num_experts=8, hidden_size=64, top_k=2) | kwargs
    with pytest.raises(ValueError, match=message):
        RouterSpec(**args)


@pytest.mark.parametrize("case", list(CASES))
def test_fewer_experts_per_token_equal_a_router_built_with_fewer(case):
    """Running n of the config's K experts gives a router configured with top-k = n (weights
    renormalised as configured), padded back to K with the padding id and weight 0."""
    torch.manual_seed(2)
    config = hf_config(case)
    K = config.num_experts_per_tok
    full = randomise(build_router(router_spec_from_config(config)))
    x = torch.randn(7, 64)
    for n in range(1, K):
        config.num_experts_per_tok = n
        fewer = build_router(router_spec_from_config(config))
        fewer.load_state_dict(full.state_dict())
        config.num_experts_per_tok = K
        full.set_active_top_k(n)
        ids, weights = full(x)
        want_ids, want_weights = fewer(x)
        assert ids.shape == weights.shape == (7, K)
        assert torch.equal(ids[:, :n], want_ids)
        torch.testing.assert_close(weights[:, :n], want_weights, atol=1e-7, rtol=1e-6)
        assert torch.all(ids[:, n:] == full.spec.num_experts) and torch.all(weights[:, n:] == 0)
    full.set_active_top_k(None)
    assert full(x)[0].shape == (7, K) and torch.all(full(x)[0] < full.spec.num_experts)
    for bad in (0, K + 1, 1.5, True):
        with pytest.raises(ValueError, match="experts per token"):
            full.set_active_top_k(bad)
