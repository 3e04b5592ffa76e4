"""RMSNorm as in transformers' Llama/Qwen/Mixtral/DeepSeek modules.

    y = weight * (x / sqrt(mean(x^2) + eps))

The statistics are computed in fp32; the normalised value is rounded to the input dtype
before the multiplication by ``weight`` (exactly transformers' order of operations), and the
result is returned in the input dtype. A core module without a plugin interface (DESIGN §2);
capture-safe.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, with a learned ``weight [H]``.

    The parameter is named ``weight`` and ``eps`` plays the role of transformers'
    ``variance_epsilon``, so an HF norm's state dict loads as is (or use ``from_hf``).
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-6,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"RMSNorm.hidden_size must be a positive int, got {hidden_size!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"RMSNorm.eps must be a finite number >= 0, got {eps!r}")
        self.hidden_size = hidden_size
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    @classmethod
    def from_hf(cls, module: nn.Module) -> "RMSNorm":
        """A copy of a transformers RMSNorm module (``weight`` and ``variance_epsilon``)."""
        weight = module.weight.detach()
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        norm = cls(weight.shape[-1], eps, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            norm.weight.copy_(weight)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., H] -> [..., H]
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm: last dimension of x is {x.shape[-1]}, expected {self.hidden_size}")
        h = x.float()  # [..., H] fp32
        variance = h.pow(2).mean(dim=-1, keepdim=True)  # [..., 1]
        h = h * torch.rsqrt(variance + self.eps)  # [..., H]
        return (self.weight * h.to(x.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


def load_submodule_weights(owner: nn.Module, sources, dtype: torch.dtype) -> None:
    """Loads ``{"child.weight": source, ...}`` into ``owner``'s children of those names: RMSNorm
    weights directly (in ``dtype``, on the norm's device), operators through their own
    ``load_weights``. Used by the attention modules, whose children keep transformers' names."""
    by_child: dict[str, dict] = {}
    for name, source in sources.items():
        child, kind = name.rsplit(".", 1)
        by_child.setdefault(child, {})[kind] = source
    for child_name, child_sources in by_child.items():
        child = getattr(owner, child_name)
        if isinstance(child, RMSNorm):
            weight = child_sources["weight"].to_dense(dtype).to(child.weight.device).contiguous()
            child.weight = nn.Parameter(weight, requires_grad=False)
        else:
            child.load_weights(child_sources)
