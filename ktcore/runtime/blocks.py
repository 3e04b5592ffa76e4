"""Modules the runtime puts in the transformers skeleton where transformers' own forward
would not do: the MoE block (our router, the Experts operator, the shared experts) and the
bridges that let operators on one device serve modules on another."""

from __future__ import annotations

import torch
from torch import nn


def device_of(module: nn.Module) -> torch.device:
    """The device of an operator (``.device``) or of a module's first tensor."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class ExpertsParts(nn.Module):
    """One MoE layer's routed experts held by one or more Experts instances (several for a
    rule's ``split``): each computes its owned experts on its own device; the results add up
    on the device of the input."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_ids, topk_weights: [T, K]
        out = None
        for part in self.parts:
            dev = part.device
            y = part(x.to(dev), topk_ids.to(dev), topk_weights.to(dev)).to(x.device)
            out = y if out is None else out + y
        return out


class LinearOnDevice(nn.Module):
    """A Linear operator called from modules on another device: moves x there and back."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.op(x.to(self.op.device)).to(x.device)


class MoEBlock(nn.Module):
    """``y = experts(x, gate(x)) + shared(x)`` for every supported family.

    Children keep transformers' names, so weights load under the checkpoint's names: ``gate``
    (our router), ``experts``, and DeepSeek's ``shared_experts`` or Qwen2-MoE's
    ``shared_expert`` with ``shared_expert_gate`` (output scaled by ``sigmoid(gate(x))``);
    Qwen3-MoE and Mixtral have no shared expert.
    """

    SHARED_NAMES = ("shared_experts", "shared_expert")

    def __init__(self, gate: nn.Module, experts: nn.Module, shared: dict[str, nn.Module]):
        super().__init__()
        self.gate = gate
        self.experts = experts
        unknown = set(shared) - {*self.SHARED_NAMES, "shared_expert_gate"}
        if unknown:
            raise ValueError(f"MoEBlock: unknown shared modules {sorted(unknown)}")
        for name, module in shared.items():
            setattr(self, name, module)
        self.shared_name = next((n for n in self.SHARED_NAMES if n in shared), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H]
        flat = x.reshape(-1, x.shape[-1])  # [B*T, H]
        topk_ids, topk_weights = self.gate(flat.to(device_of(self.gate)))  # [B*T, K] int32, fp32
        y = self.experts(flat, topk_ids, topk_weights)
        if self.shared_name is not None:
            shared = getattr(self, self.shared_name)(flat)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            y = y + shared
        return y.view_as(x)
