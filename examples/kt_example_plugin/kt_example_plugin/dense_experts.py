"""``DenseExperts``: runs each owned expert on all T tokens and weights the result by how
often (and how strongly) each token chose it. Wasteful for large E, but short, with static
shapes and no host synchronisation, so it is capture-safe."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ktcore.ops.experts import Experts, activation_fn
from ktcore.ops.weights import WeightSource

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class DenseExperts(Experts):
    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        dtype = _DTYPES[self.options.get("dtype", "fp32")]
        owned = torch.tensor(self.spec.owned_ids)
        for name in ("gate", "up", "down"):
            dense = sources[name].to_dense(torch.float32)[owned]  # [E_owned, ...]
            self.register_buffer(name, dense.to(device=self.device, dtype=dtype))
        self.register_buffer("owned_ids", owned.to(self.device))
        self.act = activation_fn(self.spec.activation)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        # x: [T, H]; topk_ids, topk_weights: [T, K]
        xs = x.to(self.gate.dtype)
        hit = topk_ids.long().unsqueeze(-1) == self.owned_ids  # [T, K, E_owned]
        coef = (hit * topk_weights.float().unsqueeze(-1)).sum(1)  # [T, E_owned]
        h = self.act(torch.einsum("th,eih->eti", xs, self.gate)) * torch.einsum("th,eih->eti", xs, self.up)
        y = torch.einsum("eti,ehi->eth", h, self.down)  # [E_owned, T, H]
        return torch.einsum("eth,te->th", y.float(), coef).to(x.dtype)
