"""How much a speed option changes a model's predictions: the mean KL divergence of the
next-token distributions against the model's own full-quality run on the same text."""

from __future__ import annotations

import torch


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(p_ref || p) in nats; both ``[T, V]``."""
    ref = torch.log_softmax(reference_logits.double(), dim=-1)  # [T, V]
    log_p = torch.log_softmax(logits.double(), dim=-1)  # [T, V]
    return float((ref.exp() * (ref - log_p)).sum(dim=-1).mean())


def experts_per_token_kl(model, ids, counts) -> dict[int, float]:
    """``{n: mean KL}`` of running ``n`` routed experts per token against the config's count,
    over the positions of ``ids`` (held-out text); the model is restored afterwards."""
    reference = model.logits(ids)  # [T, V]
    out = {}
    try:
        for n in counts:
            model.set_experts_per_token(n)
            out[n] = mean_kl(reference, model.logits(ids))
    finally:
        model.set_experts_per_token(None)
    return out
