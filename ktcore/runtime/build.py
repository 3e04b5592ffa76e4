"""Build a runnable decoder from a config, a ``WeightStore`` and a placement ``Plan``.

1. The transformers skeleton is built on the meta device (no memory).
2. Every module a rule replaces becomes an operator instance from its backend; its weights
   go straight from the store into the operator (packed once, on its device).
3. The core modules the runtime needs in every layer are put in: the attention (ktcore's
   GQA, or the torch MLA when no rule placed one) with static caches, our router, and the
   MoE block around the routed experts and the shared experts.
4. Whatever is still on the meta device (embeddings, norms, dense MLPs, shared experts,
   lm_head) is materialised on the device the plan gives it and filled from the store.

Weights are read one tensor at a time, so host memory peaks near the final resident size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ktcore.backends.registry import Registry
from ktcore.errors import KtError
from ktcore.formats.store import EXPERT_PARTS, WeightStore
from ktcore.ops.base import Operator
from ktcore.runtime.blocks import ExpertsParts, LinearOnDevice, MoEBlock

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class Builder:
    """Holds what every step needs; ``build()`` returns the filled skeleton."""

    def __init__(self, config, store: WeightStore, plan, registry: Registry, dtype: torch.dtype,
                 max_len: int, progress: Callable[[str], None] | None = None):
        from ktcore.models.skeleton import build_skeleton

        self.config = config
        self.store = store
        self.plan = plan
        self.registry = registry
        self.dtype = dtype
        self.max_len = max_len
        self.progress = progress or (lambda name: None)
        self.skeleton = build_skeleton(config)
        self.default_device = plan.rules.default_device

    # -- helpers ---------------------------------------------------------------------------
    def device(self, module_name: str) -> str:
        """Where the plan puts a kept module (its ancestors' device if it has no entry)."""
        name = module_name
        while name:
            device = self.plan.device_of(name)
            if device is not None:
                return device
            name = name.rpartition(".")[0]
        return self.default_device

    def weights(self, module_name: str, names) -> dict:
        out = {}
        for name in names:
            full = f"{module_name}.{name}"
            if full == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False) \
                    and full not in self.store.names():
                full = "model.embed_tokens.weight"
            out[name] = self.store.get(full)
            self.progress(full)
        return out

    def options(self, backend_spec, options) -> dict:
        """The rule's options plus the runtime's dtype and cache length where the backend takes them."""
        options = dict(options)
        for key, value in self.core_options().items():
            if backend_spec.option(key) is not None and key not in options:
                options[key] = value
        return options

    def core_options(self) -> dict:
        return {"dtype": DTYPE_NAMES[self.dtype], "max_positions": self.max_len}

    def set_module(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.skeleton.get_submodule(parent) if parent else self.skeleton, child, module)

    # -- step 2: operators named by rules ----------------------------------------------------
    def operator_spec(self, op: str, module_name: str, owned):
        module = self.skeleton.get_submodule(module_name)
        if op == "experts":
            from ktcore.ops.experts import ExpertsSpec

            return ExpertsSpec(module.num_experts, module.hidden_dim, module.intermediate_dim,
                               int(self.config.num_experts_per_tok), self.config.hidden_act, owned)
        if op == "linear":
            from ktcore.ops.linear import LinearSpec

            return LinearSpec(module.in_features, module.out_features, module.bias is not None)
        if op == "mla":
            from ktcore.ops.mla import mla_spec_from_config

            return mla_spec_from_config(self.config)
        raise KtError(f"{self.plan.rules.file}: operator {op!r} cannot replace {module_name} "
                      f"({type(module).__name__}); the runtime places rope inside attention")

    def build_operator(self, placement) -> Operator:
        backend = self.registry.get(placement.backend, placement.op)
        spec = self.operator_spec(placement.op, placement.module, placement.experts)
        instance = backend.build(spec, placement.device, self.options(backend, placement.options))
        instance.load_weights(self.weights(placement.module, instance.weight_names()))
        return instance

    def replace_ruled_modules(self) -> None:
        seen = set()
        for placement in self.plan.replacements:
            if placement.module in seen:
                continue
            seen.add(placement.module)
            instances = [self.build_operator(p) for p in self.plan.placements_of(placement.module)]
            if placement.op == "experts":
                module = ExpertsParts(instances)
            elif placement.op == "linear":
                module = LinearOnDevice(instances[0])
            else:
                module = instances[0]
            self.set_module(placement.module, module)

    # -- step 3: the runtime's core modules --------------------------------------------------
    def attention(self, name: str) -> nn.Module:
        """ktcore's attention for a layer whose attention no rule replaced."""
        device = self.device(name)
        options = self.core_options()
        if self.config.model_type.startswith("deepseek"):
            from ktcore.ops.mla import TorchMLA, mla_spec_from_config

            op = TorchMLA(mla_spec_from_config(self.config), device, options)
        else:
            from ktcore.ops.gqa import GQAAttention, gqa_spec_from_config

            op = GQAAttention(gqa_spec_from_config(self.config), device, options)
        op.load_weights(self.weights(name, op.weight_names()))
        return op

    def moe_block(self, name: str, hf_block: nn.Module) -> MoEBlock:
        from ktcore.ops.router import build_router, router_spec_from_config

        experts = hf_block.experts
        if not isinstance(experts, ExpertsParts):  # no rule placed them: torch, where the plan says
            from ktcore.ops.experts import ExpertsSpec, TorchExperts

            spec = ExpertsSpec(experts.num_experts, experts.hidden_dim, experts.intermediate_dim,
                               int(self.config.num_experts_per_tok), self.config.hidden_act)
            op = TorchExperts(spec, self.device(f"{name}.experts"), {"dtype": DTYPE_NAMES[self.dtype]})
            op.load_weights(self.weights(f"{name}.experts", EXPERT_PARTS))
            experts = ExpertsParts([op])
        router = build_router(router_spec_from_config(self.config), device=self.device(f"{name}.gate"),
                              dtype=self.dtype)
        router.load_state_dict({k: v.to_dense(self.dtype) for k, v in
                                self.weights(f"{name}.gate", router.state_dict().keys()).items()})
        shared = {name: getattr(hf_block, name) for name in (*MoEBlock.SHARED_NAMES, "shared_expert_gate")
                  if hasattr(hf_block, name)}
        return MoEBlock(router, experts, shared)

    def insert_core_modules(self) -> None:
        for i, layer in enumerate(self.skeleton.model.layers):
            prefix = f"model.layers.{i}"
            if not isinstance(layer.self_attn, Operator):
                layer.self_attn = self.attention(f"{prefix}.self_attn")
            if hasattr(layer.mlp, "experts"):
                layer.mlp = self.moe_block(f"{prefix}.mlp", layer.mlp)
        if hasattr(self.skeleton.model, "rotary_emb"):  # RoPE lives inside ktcore's attention
            del self.skeleton.model.rotary_emb

    # -- step 4: everything transformers keeps -----------------------------------------------
    def materialise_kept(self) -> None:
        for name, module in self.skeleton.named_modules():
            tensors = {**{k: v for k, v in module._parameters.items() if v is not None},
                       **{k: v for k, v in module._buffers.items() if v is not None}}
            meta = [k for k, v in tensors.items() if v.is_meta]
            if not meta:
                continue
            device = self.device(name)
            loaded = self.weights(name, meta)
            for key in meta:
                value = loaded[key].to_dense(self.dtype).to(device)
                if key in module._parameters:
                    module._parameters[key] = nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[key] = value

    def build(self) -> nn.Module:
        self.replace_ruled_modules()
        self.insert_core_modules()
        self.materialise_kept()
        return self.skeleton.eval()
