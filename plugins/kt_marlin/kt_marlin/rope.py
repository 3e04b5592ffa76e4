"""``MarlinRope``: the ``rope`` operator of the ``marlin`` backend.

The cos/sin tables are ktcore's own (``TorchRope`` builds them once with
``ktcore.ops.rope.rope_init``: default, linear, yarn with its attention factor/mscale,
llama3; "dynamic" NTK computes its rows per sequence on the device), so the frequencies are
bit-identical to the reference; the Triton kernel ``torch.ops.kt_marlin.rope`` applies the
rotation to q and k in one launch, in either layout (``spec.interleaved``: DeepSeek's
adjacent pairs; otherwise Llama/Qwen's half-split), rotating the first ``rotary_dim``
channels and copying the rest.

``forward(q[..., T, nH, D], k[..., T, nKV, D], positions[..., T]) -> (q, k)`` as new
tensors in the inputs' dtypes; positions stay on the device (capture-safe, no ``.item()``).
Options: ``max_positions`` (table length, default ``spec.max_position_embeddings``).
"""

from __future__ import annotations

import torch

from ktcore.ops.rope import TorchRope

from kt_marlin import rope_kernel as _rope_kernel  # noqa: F401  (registers torch.ops.kt_marlin.rope)


class MarlinRope(TorchRope):
    """TorchRope's tables, the Triton rotation."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rot = self.spec.rotary_dim
        if q.shape[-1] < rot or k.shape[-1] < rot:
            raise ValueError(f"MarlinRope: head dims {q.shape[-1]}/{k.shape[-1]} are smaller than rotary_dim {rot}")
        if q.shape[:-2] != k.shape[:-2] or q.shape[:-2] != positions.shape:
            raise ValueError(f"MarlinRope: q {tuple(q.shape)}, k {tuple(k.shape)} and positions "
                             f"{tuple(positions.shape)} disagree on the token dims")
        if self.spec.rope_type == "dynamic":
            cos, sin = self.cos_sin(positions)  # [..., T, R/2] each, per token
            cos, sin = cos.reshape(-1, rot // 2), sin.reshape(-1, rot // 2)
            return torch.ops.kt_marlin.rope(q, k, positions, cos, sin, self.spec.interleaved, False)
        return torch.ops.kt_marlin.rope(q, k, positions, self.cos_table, self.sin_table, self.spec.interleaved, True)
