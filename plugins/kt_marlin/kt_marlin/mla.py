"""``MarlinMLA``: the ``mla`` operator of the ``marlin`` backend.

A ``TorchMLA`` (same weights, names, packing, projections, ``MLACache`` and forward
signature) whose hot parts run as Triton kernels:

- RoPE of ``q_rope``/``k_rope``: ``MarlinRope`` (one launch rotates both);
- absorbed attention (decode, ``absorbed=None`` with ``T == 1``, or ``absorbed=True``):
  ``q_nope @ W_UK`` folds the query into latent space (a batched matmul per head), then
  ``torch.ops.kt_marlin.mla_decode`` attends over the compressed latent cache plus the
  shared rope key with split-K flash decoding, reading only the slots below
  ``min(position + 1, cache_lens)``, and ``W_UV`` is applied to the latent output.
  The softmax scale is ``spec.softmax_scale`` (YaRN's mscale included when configured);
- prefill (``T > 1`` with ``absorbed`` not set): as TorchMLA, ``kv_b_proj`` decompresses the
  valid part of the cache once (one host synchronisation for its bound; prefill is not
  captured), then ``torch.ops.kt_marlin.mla_prefill``, a causal flash-attention kernel over
  ``Dn + Dr`` channels (far fewer FLOPs than the 576-channel latent space for long prompts),
  reads the shared rope key straight from the cache and never materialises ``[T, S]`` scores.

``absorbed=True`` with ``T > 1`` (e.g. several draft tokens) runs the decode kernel, each
token with its own causal limit.

Everything on the decode path is capture-safe: static shapes given the cache, positions and
lengths as device tensors, no ``.item()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ktcore.ops.mla import MLACache, MLASpec, TorchMLA

from kt_marlin import mla_decode as _mla_decode  # noqa: F401  (registers torch.ops.kt_marlin.mla_decode)
from kt_marlin import mla_prefill as _mla_prefill  # noqa: F401  (registers torch.ops.kt_marlin.mla_prefill)
from kt_marlin.rope import MarlinRope


class MarlinMLA(TorchMLA):
    """TorchMLA with the Triton RoPE, absorbed (decode) attention and prefill attention."""

    def __init__(self, spec: MLASpec, device: str | torch.device = "cuda", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        rope_options = {k: v for k, v in self.options.items() if k == "max_positions"}
        self.rope = MarlinRope(spec.rope, self.device, rope_options)

    def _attend_decompressed(self, q_nope, q_rope, positions, cache: MLACache, cache_lens) -> torch.Tensor:
        """Prefill: K/V of the valid slots decompressed once (one host sync for the bound), then
        the causal flash kernel. q_nope: [B, T, nH, Dn], q_rope: [B, T, nH, Dr] -> [B, T, nH, Dv]."""
        s = self.spec
        B = q_nope.shape[0]
        kv_len = max(int(cache_lens.max()), 1)
        latent = cache.latent[:B, :kv_len].to(q_nope.dtype)  # [B, S, R]
        kv = self.kv_b_proj(latent).view(B, kv_len, s.num_heads, s.qk_nope_head_dim + s.v_head_dim)
        limits = torch.minimum(positions + 1, cache_lens[:, None].to(positions.dtype))  # [B, T]
        return torch.ops.kt_marlin.mla_prefill(q_nope, q_rope, kv, cache.k_rope[:B, :kv_len], limits,
                                               s.softmax_scale)

    def _attend_absorbed(self, q_nope, q_rope, positions, cache: MLACache, cache_lens) -> torch.Tensor:
        """q_nope: [B, T, nH, Dn], q_rope: [B, T, nH, Dr] (roped) -> [B, T, nH, Dv]."""
        B, T, nH, _ = q_nope.shape
        dtype = q_nope.dtype
        w_uk, w_uv = self._kv_b(dtype)  # [nH, Dn, R], [nH, Dv, R]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # [B, T, nH, R]
        limits = torch.minimum(positions + 1, cache_lens[:, None].to(positions.dtype))  # [B, T]
        o_latent = torch.ops.kt_marlin.mla_decode(
            q_latent.reshape(B * T, nH, -1), q_rope.reshape(B * T, nH, -1),
            cache.latent, cache.k_rope, limits.reshape(B * T), T, self.spec.softmax_scale,
        )  # [B * T, nH, R]
        return torch.einsum("bthr,hvr->bthv", o_latent.view(B, T, nH, -1), w_uv)  # [B, T, nH, Dv]
