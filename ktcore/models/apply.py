"""Swap the modules of a materialised transformers model for operator instances, as a
``Plan`` says, taking the weights from the modules being replaced.

This is how ktcore's operators are checked against transformers end to end: the same model
object, some modules replaced by plugin operators, the rest untouched. (The model runtime
streams weights from GGUF/safetensors straight into the operators instead.)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ktcore.backends.registry import Registry
from ktcore.errors import KtError

log = logging.getLogger(__name__)


class ExpertsParts(nn.Module):
    """One MoE layer's routed experts held by one or more Experts instances (several for a
    rule's ``split``): each computes its owned experts on its own device; the results add up
    on the device of the input."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_ids, topk_weights: [T, K]
        out = torch.zeros_like(x)
        for part in self.parts:
            dev = part.device
            out += part(x.to(dev), topk_ids.to(dev), topk_weights.to(dev)).to(x.device)
        return out


class LinearOnDevice(nn.Module):
    """A Linear operator called from modules on another device: moves x there and back."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x.to(self.op.device)).to(x.device)


class MLAForTransformers(nn.Module):
    """Lets an MLA operator stand where transformers calls ``DeepseekV{2,3}Attention``.

    Runs whole sequences without transformers' KV cache (``use_cache=False``): each call
    writes the sequence into a fresh latent cache and attends causally over it.
    """

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is not None:
            raise KtError("the MLA operator replaces transformers' attention only with use_cache=False")
        B, T, _ = hidden_states.shape  # hidden_states: [B, T, H]
        dev = self.op.device
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(T, device=dev)[None].expand(B, T)
        positions = positions.to(dev).expand(B, T)
        cache = self.op.new_cache(B, T, dtype=torch.float32)
        lens = torch.full((B,), T, dtype=torch.long, device=dev)
        out = self.op(hidden_states.to(dev), positions, cache, lens, absorbed=False)
        return out.to(hidden_states.device), None


def _experts_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """transformers' fused ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` -> ours."""
    inter = module.intermediate_dim
    gate_up = module.gate_up_proj.detach()
    return {"gate": gate_up[:, :inter], "up": gate_up[:, inter:], "down": module.down_proj.detach()}


def _operator_spec(op: str, module: nn.Module, config, owned):
    if op == "experts":
        from ktcore.ops.experts import ExpertsSpec

        return ExpertsSpec(module.num_experts, module.hidden_dim, module.intermediate_dim,
                           int(config.num_experts_per_tok), config.hidden_act, owned)
    if op == "linear":
        from ktcore.ops.linear import LinearSpec

        return LinearSpec(module.in_features, module.out_features, module.bias is not None)
    if op == "mla":
        from ktcore.ops.mla import mla_spec_from_config

        return mla_spec_from_config(config)
    raise KtError(f"operator {op!r} cannot stand in for a transformers module yet (only experts, linear, mla)")


def _weights(op: str, module: nn.Module, names) -> Mapping[str, torch.Tensor]:
    if op == "experts":
        return _experts_weights(module)
    state = {k: v.detach() for k, v in module.state_dict().items()}
    return {name: state[name] for name in names}


def apply_plan(model: nn.Module, plan, config, registry: Registry | None = None) -> nn.Module:
    """Replaces every module the plan replaces and moves kept modules to their devices.

    Operators may sit on any device (inputs are moved to them and back), but the modules
    that keep their transformers implementation must share one device: transformers does not
    move activations between its own modules.
    """
    registry = registry or Registry.from_entry_points()
    kept_devices = sorted({p.device for p in plan.placements if p.op is None})
    if len(kept_devices) > 1:
        raise KtError(f"{plan.rules.file}: transformers modules kept on several devices "
                      f"({', '.join(kept_devices)}); running them needs the ktcore model runtime")
    for placement in plan.placements:
        if placement.op is None:
            module = model.get_submodule(placement.module)
            for tensor_dict in (module._parameters, module._buffers):
                for key, value in tensor_dict.items():
                    if value is not None:
                        value.data = value.data.to(placement.device)
    done = set()
    for placement in plan.replacements:
        if placement.module in done:
            continue
        done.add(placement.module)
        module = model.get_submodule(placement.module)
        instances = []
        for part in plan.placements_of(placement.module):
            backend = registry.get(part.backend, part.op)
            spec = _operator_spec(part.op, module, config, part.experts)
            instance = backend.build(spec, part.device, dict(part.options))
            instance.load_weights(_weights(part.op, module, instance.weight_names()))
            instances.append(instance)
        if placement.op == "experts":
            replacement = ExpertsParts(instances)
        elif placement.op == "mla":
            replacement = MLAForTransformers(instances[0])
        else:
            replacement = LinearOnDevice(instances[0])
        parent_name, _, child = placement.module.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        log.debug("replaced %s with %s", placement.module, type(replacement).__name__)
    return model
