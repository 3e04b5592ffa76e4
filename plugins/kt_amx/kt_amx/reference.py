"""Torch model of what the kernels compute, for exact-format parity tests.

The kernels use the packed weights exactly and round only the activations: int formats
quantise x and h to int8 per weight group (scale = amax / 127, round to nearest even), the
bf16 format rounds them to bf16 on AVX-512/AMX (AVX2 keeps fp32). ``forward`` applies the
same rounding in fp32 torch code on the dequantised packed weights, so a correct kernel
matches it up to fp32 summation order (and the rare rounding step of h that order flips).
"""

from __future__ import annotations

import torch

from ktcore.ops.experts import activation_fn


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 [R, K] -> the values of its int8 codes: q * amax_g / 127 per group of ``group``."""
    R, K = x.shape
    g = x.float().reshape(R, K // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(g * inv)  # fp32 product, round half to even, as vcvtps2dq
    return (q * (amax / 127.0)).reshape(R, K)


def round_activations(x: torch.Tensor, fmt, isa: str, group: int) -> torch.Tensor:
    if fmt.format == "bf16":
        return x.to(torch.bfloat16).float() if isa in ("avx512", "amx") else x.float()
    return quantize_activations(x, group)


def forward(experts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, isa: str) -> torch.Tensor:
    """y [T, H] in x's dtype, computed like ``experts`` (an AmxExperts) on ``isa``: for a
    layer split over NUMA nodes, the sum of each part's output (h rounded per part)."""
    y = sum(_forward_part(experts, w, x, topk_ids, topk_weights, isa) for w in experts.dequantized_parts())
    return y.to(x.dtype)


def _forward_part(experts, w, x, topk_ids, topk_weights, isa: str) -> torch.Tensor:
    """fp32 y [T, H] of one part: gate/up [n, I_j, H], down [n, H, I_j] (dequantised)."""
    spec, fmt = experts.spec, experts.layer_format
    act = activation_fn(spec.activation)
    T, K = topk_ids.shape
    H, I = spec.hidden_size, w["gate"].shape[1]
    slot_of = torch.full((spec.num_experts + 1,), -1, dtype=torch.long)
    slot_of[list(spec.owned_ids)] = torch.arange(spec.num_owned)
    ids = topk_ids.long().reshape(-1)
    slot = slot_of[ids]  # [P]
    keep = slot >= 0
    xr = round_activations(x.float(), fmt, isa, fmt.group_for(H))  # [T, H]
    pairs = torch.nonzero(keep).squeeze(1)
    tok = pairs // K
    s = slot[pairs]
    xs = xr[tok]  # [p, H]
    g = torch.bmm(w["gate"][s], xs.unsqueeze(-1)).squeeze(-1)  # [p, I_j]
    u = torch.bmm(w["up"][s], xs.unsqueeze(-1)).squeeze(-1)
    h = round_activations(act(g) * u, fmt, isa, fmt.group_for(I))
    d = torch.bmm(w["down"][s], h.unsqueeze(-1)).squeeze(-1)  # [p, H]
    y = torch.zeros(T, H, dtype=torch.float32)
    y.index_add_(0, tok, d * topk_weights.reshape(-1)[pairs].float().unsqueeze(1))
    return y
