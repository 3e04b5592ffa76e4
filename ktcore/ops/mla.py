"""MLA: DeepSeek-V2/V3 multi-head latent attention, the operator interface and its torch reference.

Per token, the KV cache holds only the normalised compressed latent ``c_kv`` (``kv_lora_rank``)
and the shared roped key ``k_rope`` (``qk_rope_head_dim``), never decompressed K/V
(``MLACache``). With ``W_UK``/``W_UV`` the key/value halves of ``kv_b_proj`` per head:

    k_nope[s, h] = W_UK[h] @ c_kv[s]        v[s, h] = W_UV[h] @ c_kv[s]
    score[t, h, s] = (q_nope[t, h] . k_nope[s, h] + q_rope[t, h] . k_rope[s]) * softmax_scale

Prefill decompresses K/V of the valid part of the cache (one host synchronisation to bound it).
Decode uses the absorbed form: ``q_nope @ W_UK`` is a query in latent space, attention runs
over the latents of the whole static cache (masked by length), ``W_UV`` is applied after the
weighted sum; static shapes, no host synchronisation (capture-safe).

Forward convention (shared with ``ktcore.ops.gqa``):
``forward(x[B, T, H], positions[B, T] int64, cache, cache_lens[B] int) -> [B, T, H]``. The new
tokens' latents are written at ``positions`` (slot = position); ``cache_lens[b]`` is the number
of valid slots of row ``b`` *after* this write (normally ``positions[b, -1] + 1``). Token
``(b, t)`` attends to slots ``s <= positions[b, t]`` and ``s < cache_lens[b]``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ktcore.ops.base import Operator
from ktcore.ops.linear import LinearSpec, TorchLinear, check_options, dense_dtype, dtype_option
from ktcore.ops.rmsnorm import RMSNorm, load_submodule_weights
from ktcore.ops.rope import RopeSpec, TorchRope, rope_spec_from_config, yarn_get_mscale
from ktcore.ops.static_cache import StaticCache, visible_slots
from ktcore.ops.weights import WeightSource

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MLASpec:
    """Shapes of one MLA layer; ``q_lora_rank=None`` means a plain ``q_proj`` (V2-Lite)."""

    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeSpec
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MLASpec.{name} must be a positive int, got {value!r}")
        rank = self.q_lora_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
            raise ValueError(f"MLASpec.q_lora_rank must be None or a positive int, got {rank!r}")
        if not isinstance(self.rope, RopeSpec):
            raise ValueError(f"MLASpec.rope must be a RopeSpec, got {type(self.rope).__name__}")
        if self.rope.rotary_dim != self.qk_rope_head_dim:
            raise ValueError(
                f"MLASpec: rope.rotary_dim {self.rope.rotary_dim} must equal qk_rope_head_dim {self.qk_rope_head_dim}"
            )
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"MLASpec.rms_norm_eps must be >= 0, got {self.rms_norm_eps}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5``, times YaRN's ``mscale(factor, mscale_all_dim)**2`` when the rope
        is scaled and ``mscale_all_dim`` is set (transformers' ``yarn_apply_mscale``)."""
        scale = self.qk_head_dim ** (-0.5)
        if self.rope.rope_type != "default" and self.rope.mscale_all_dim:
            mscale = yarn_get_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale = scale * mscale * mscale
        return scale

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF parameter names (relative to ``self_attn``) and their shapes, in load order."""
        H, nH, R = self.hidden_size, self.num_heads, self.kv_lora_rank
        shapes: dict[str, tuple[int, ...]] = {}
        if self.q_lora_rank is None:
            shapes["q_proj.weight"] = (nH * self.qk_head_dim, H)
        else:
            shapes["q_a_proj.weight"] = (self.q_lora_rank, H)
            if self.attention_bias:
                shapes["q_a_proj.bias"] = (self.q_lora_rank,)
            shapes["q_a_layernorm.weight"] = (self.q_lora_rank,)
            shapes["q_b_proj.weight"] = (nH * self.qk_head_dim, self.q_lora_rank)
        shapes["kv_a_proj_with_mqa.weight"] = (R + self.qk_rope_head_dim, H)
        if self.attention_bias:
            shapes["kv_a_proj_with_mqa.bias"] = (R + self.qk_rope_head_dim,)
        shapes["kv_a_layernorm.weight"] = (R,)
        shapes["kv_b_proj.weight"] = (nH * (self.qk_nope_head_dim + self.v_head_dim), R)
        shapes["o_proj.weight"] = (H, nH * self.v_head_dim)
        if self.attention_bias:
            shapes["o_proj.bias"] = (H,)
        return shapes


def mla_spec_from_config(hf_config: Any) -> MLASpec:
    """The spec of a transformers ``DeepseekV2Config``/``DeepseekV3Config`` (or alike)."""
    return MLASpec(
        hidden_size=hf_config.hidden_size,
        num_heads=hf_config.num_attention_heads,
        q_lora_rank=getattr(hf_config, "q_lora_rank", None),
        kv_lora_rank=hf_config.kv_lora_rank,
        qk_nope_head_dim=hf_config.qk_nope_head_dim,
        qk_rope_head_dim=hf_config.qk_rope_head_dim,
        v_head_dim=hf_config.v_head_dim,
        rope=rope_spec_from_config(hf_config, rotary_dim=hf_config.qk_rope_head_dim),
        rms_norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
        attention_bias=bool(getattr(hf_config, "attention_bias", False)),
    )


class MLACache(StaticCache):
    """Static latent KV cache of one MLA layer (see ``StaticCache``): latent [B, S, kv_lora_rank]
    (after ``kv_a_layernorm``) and k_rope [B, S, rope_dim] (roped), never decompressed K/V."""

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        super().__init__(batch, max_len, {"latent": (kv_lora_rank,), "k_rope": (rope_dim,)}, dtype, device,
                         kv_lora_rank=kv_lora_rank, rope_dim=rope_dim)

    @classmethod
    def for_spec(cls, spec: MLASpec, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> "MLACache":
        return cls(batch, max_len, spec.kv_lora_rank, spec.qk_rope_head_dim, dtype, device)

    def write(self, positions: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """positions: [B, T]; latent: [B, T, R]; k_rope: [B, T, Dr]."""
        self._write(positions, latent, k_rope)


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scores: [B, nH, T, S]; visible: [B, T, S] -> probabilities in ``dtype`` (fp32 softmax).
    A row with no visible slot gets uniform weights over zeros, never NaN."""
    scores = scores.masked_fill(~visible[:, None], torch.finfo(scores.dtype).min)
    return torch.softmax(scores.float(), dim=-1).to(dtype)


class MLA(Operator):
    """MLA operator interface. Weights: ``spec.weight_shapes()`` (transformers' names).

    ``forward(x[B, T, H], positions[B, T], cache: MLACache, cache_lens[B], absorbed=None)
    -> [B, T, H]``; ``absorbed=None`` means ``T == 1`` (decode).
    """

    op_name = "mla"

    def __init__(self, spec: MLASpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        if not isinstance(spec, MLASpec):
            raise TypeError(f"{type(self).__name__} needs an MLASpec, got {type(spec).__name__}")
        super().__init__(spec, device, options)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> MLACache:
        return MLACache.for_spec(self.spec, batch, max_len, dtype, self.device)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: MLACache,
        cache_lens: torch.Tensor,
        absorbed: bool | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class TorchMLA(MLA):
    """Reference MLA built from ``TorchLinear``, ``RMSNorm`` and ``TorchRope``; the submodules
    carry transformers' names, so ``state_dict()`` keys equal the HF ``self_attn`` keys.

    Options: ``dtype`` (``bf16 | fp16 | fp32``; default: the dense sources' dtype, fp32 for
    GGUF) and ``max_positions`` (length of the RoPE table, default the model's maximum).
    """

    option_names = ("dtype", "max_positions")

    def __init__(self, spec: MLASpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        self.dtype_request = dtype_option(type(self).__name__, self.options)
        rope_options = {k: v for k, v in self.options.items() if k == "max_positions"}
        self.rope = TorchRope(spec.rope, self.device, rope_options)
        linear_options = {"dtype": self.options["dtype"]} if "dtype" in self.options else {}
        shapes = spec.weight_shapes()
        for name, shape in shapes.items():
            module, kind = name.rsplit(".", 1)
            if module.endswith("layernorm"):
                self.add_module(module, RMSNorm(shape[0], spec.rms_norm_eps, device=self.device))
            elif kind == "weight":
                out_features, in_features = shape
                linear_spec = LinearSpec(in_features, out_features, f"{module}.bias" in shapes)
                self.add_module(module, TorchLinear(linear_spec, self.device, linear_options))

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        dtype = self.dtype_request or dense_dtype(sources.values())
        load_submodule_weights(self, sources, dtype)
        logger.debug("%s packed %s as %s on %s", type(self).__name__, self.spec, dtype, self.device)

    def _project_q(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H] -> [B, T, nH * Dqk]
        if self.spec.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: MLACache,
        cache_lens: torch.Tensor,
        absorbed: bool | None = None,
    ) -> torch.Tensor:
        if not self.loaded:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        s = self.spec
        B, T, _ = x.shape
        q = self._project_q(x).view(B, T, s.num_heads, s.qk_head_dim)  # q: [B, T, nH, Dqk]
        q_nope, q_rope = q.split([s.qk_nope_head_dim, s.qk_rope_head_dim], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(x)  # [B, T, R + Dr]
        latent, k_rope = kv_a.split([s.kv_lora_rank, s.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, R]
        q_rope, k_rope = self.rope(q_rope, k_rope[:, :, None], positions)  # [B, T, nH, Dr], [B, T, 1, Dr]
        cache.write(positions, latent, k_rope[:, :, 0])
        cache_lens = cache_lens[:B]
        if absorbed is None:
            absorbed = T == 1
        if absorbed:
            out = self._attend_absorbed(q_nope, q_rope, positions, cache, cache_lens)
        else:
            out = self._attend_decompressed(q_nope, q_rope, positions, cache, cache_lens)
        return self.o_proj(out.reshape(B, T, s.num_heads * s.v_head_dim))

    def _kv_b(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK: [nH, Dn, R] and W_UV: [nH, Dv, R], views of kv_b_proj's weight."""
        s = self.spec
        w = self.kv_b_proj.weight.to(dtype)  # [nH * (Dn + Dv), R]
        w = w.view(s.num_heads, s.qk_nope_head_dim + s.v_head_dim, s.kv_lora_rank)
        return w[:, : s.qk_nope_head_dim], w[:, s.qk_nope_head_dim :]

    def _attend_absorbed(self, q_nope, q_rope, positions, cache: MLACache, cache_lens) -> torch.Tensor:
        """Static: the whole cache, masked by length. Returns [B, T, nH, Dv]."""
        B, dtype = q_nope.shape[0], q_nope.dtype
        w_uk, w_uv = self._kv_b(dtype)
        latent = cache.latent[:B].to(dtype)  # [B, S, R]
        k_rope = cache.k_rope[:B].to(dtype)  # [B, S, Dr]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)  # [B, T, nH, R]
        scores = torch.einsum("bthr,bsr->bhts", q_latent, latent)  # [B, nH, T, S]
        scores = (scores + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)) * self.spec.softmax_scale
        probs = masked_softmax(scores, visible_slots(positions, cache_lens, latent.shape[1]), dtype)
        o_latent = torch.einsum("bhts,bsr->bthr", probs, latent)  # [B, T, nH, R]
        return torch.einsum("bthr,hvr->bthv", o_latent, w_uv)  # [B, T, nH, Dv]

    def _attend_decompressed(self, q_nope, q_rope, positions, cache: MLACache, cache_lens) -> torch.Tensor:
        """Prefill: K/V of the valid slots only (one host sync for the bound). [B, T, nH, Dv]."""
        s = self.spec
        B, T, nH, _ = q_nope.shape
        dtype = q_nope.dtype
        kv_len = max(int(cache_lens.max()), 1)
        latent = cache.latent[:B, :kv_len].to(dtype)  # [B, S, R]
        k_rope = cache.k_rope[:B, :kv_len].to(dtype)  # [B, S, Dr]
        kv = self.kv_b_proj(latent).view(B, kv_len, nH, s.qk_nope_head_dim + s.v_head_dim)
        k_nope, v = kv.split([s.qk_nope_head_dim, s.v_head_dim], dim=-1)  # [B, S, nH, Dn], [B, S, nH, Dv]
        k = torch.cat((k_nope, k_rope[:, :, None].expand(B, kv_len, nH, s.qk_rope_head_dim)), dim=-1)  # [B, S, nH, Dqk]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, T, nH, Dqk]
        scores = torch.einsum("bthd,bshd->bhts", q, k) * s.softmax_scale  # [B, nH, T, S]
        probs = masked_softmax(scores, visible_slots(positions, cache_lens, kv_len), dtype)
        return torch.einsum("bhts,bshv->bthv", probs, v)  # [B, T, nH, Dv]
