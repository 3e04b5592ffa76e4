"""GQA: grouped-query attention of Qwen3-MoE, Qwen2-MoE, Mixtral (and Qwen2/3, Mistral, Llama).

A core module with a torch implementation and no plugin interface (DESIGN §2). Projections
keep transformers' names and bias rules (``q_proj``/``k_proj``/``v_proj``/``o_proj``; Qwen3's
per-head ``q_norm``/``k_norm`` RMSNorm before RoPE), RoPE in the half-split layout, no sliding
window (a config that enables one is rejected).

Forward convention, the same as ``ktcore.ops.mla``:
``forward(x[B, T, H], positions[B, T] int64, cache: KVCache, cache_lens[B] int) -> [B, T, H]``.
The new tokens' roped keys and values are written at ``positions`` (slot = position);
``cache_lens[b]`` is the number of valid slots of row ``b`` *after* this write. Token (b, t)
attends to slots ``s <= positions[b, t]`` and ``s < cache_lens[b]``. With ``static=True``
(default when ``T == 1``, i.e. decode) attention runs over the whole static cache, masked by
length: capture-safe (on CUDA one Triton kernel, ``ktcore.ops.gqa_decode``, does the
norms, RoPE, the cache write and the attention, reading only the visible slots). Otherwise (prefill) it runs over the first ``max(cache_lens)`` slots,
which costs one host synchronisation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ktcore.ops.base import Operator
from ktcore.ops.linear import LinearSpec, TorchLinear, check_options, dense_dtype, dense_linear, dtype_option
from ktcore.ops.rmsnorm import RMSNorm, load_submodule_weights
from ktcore.ops.rope import RopeSpec, TorchRope, rope_spec_from_config
from ktcore.ops.static_cache import StaticCache, visible_slots
from ktcore.ops.weights import WeightSource

logger = logging.getLogger(__name__)

#: model_type -> (q/k/v bias rule, o bias rule, per-head q/k norm). A rule is a bool or the name
#: of the config attribute transformers reads (default False when the attribute is absent).
_FAMILIES: dict[str, tuple[bool | str, bool | str, bool]] = {
    "qwen3_moe": ("attention_bias", "attention_bias", True),
    "qwen3": ("attention_bias", "attention_bias", True),
    "qwen2_moe": ("qkv_bias", False, False),
    "qwen2": (True, False, False),
    "mixtral": (False, False, False),
    "mistral": (False, False, False),
    "llama": ("attention_bias", "attention_bias", False),
}


@dataclass(frozen=True)
class GQASpec:
    """Shapes of one GQA layer: ``num_heads`` query heads share ``num_kv_heads`` K/V heads."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeSpec
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GQASpec.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"GQASpec: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if not isinstance(self.rope, RopeSpec):
            raise ValueError(f"GQASpec.rope must be a RopeSpec, got {type(self.rope).__name__}")
        if self.rope.rotary_dim > self.head_dim:
            raise ValueError(f"GQASpec: rope.rotary_dim {self.rope.rotary_dim} exceeds head_dim {self.head_dim}")
        if self.rope.interleaved:
            raise ValueError("GQASpec: these models use the half-split RoPE layout, got interleaved=True")
        if not self.rms_norm_eps >= 0:
            raise ValueError(f"GQASpec.rms_norm_eps must be >= 0, got {self.rms_norm_eps}")

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** (-0.5)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF parameter names (relative to ``self_attn``) and their shapes, in load order."""
        H, D = self.hidden_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for name, heads in (("q_proj", self.num_heads), ("k_proj", self.num_kv_heads), ("v_proj", self.num_kv_heads)):
            shapes[f"{name}.weight"] = (heads * D, H)
            if self.qkv_bias:
                shapes[f"{name}.bias"] = (heads * D,)
        shapes["o_proj.weight"] = (H, self.num_heads * D)
        if self.o_bias:
            shapes["o_proj.bias"] = (H,)
        if self.qk_norm:
            shapes["q_norm.weight"] = (D,)
            shapes["k_norm.weight"] = (D,)
        return shapes


def gqa_spec_from_config(hf_config: Any) -> GQASpec:
    """The spec of a transformers Qwen3-MoE/Qwen2-MoE/Mixtral (or Qwen2/3, Mistral, Llama) config."""
    model_type = getattr(hf_config, "model_type", "")
    if model_type not in _FAMILIES:
        raise ValueError(f"GQA: model_type {model_type!r} is not supported (supported: {', '.join(_FAMILIES)})")
    qkv_rule, o_rule, qk_norm = _FAMILIES[model_type]

    def bias(rule: bool | str) -> bool:
        return bool(getattr(hf_config, rule, False)) if isinstance(rule, str) else rule

    layer_types = getattr(hf_config, "layer_types", None) or ()
    window = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", True) else None
    if window or "sliding_attention" in layer_types:
        raise ValueError(
            f"GQA: this {model_type} config enables sliding-window attention (sliding_window={window}), "
            "which is not implemented; set sliding_window to null (or use_sliding_window to false)"
        )
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    num_heads = hf_config.num_attention_heads
    return GQASpec(
        hidden_size=hf_config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        rope=rope_spec_from_config(hf_config),
        qkv_bias=bias(qkv_rule),
        o_bias=bias(o_rule),
        qk_norm=qk_norm,
        rms_norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
    )


class KVCache(StaticCache):
    """Static KV cache of one GQA layer (see ``StaticCache``): k, v [B, S, nKV, D], keys roped;
    ``split_counters`` int32 [B, nKV], zeros between launches, is the CUDA decode kernel's
    (``ktcore.ops.gqa_decode``)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"):
        tail = (n_kv_heads, head_dim)
        super().__init__(batch, max_len, {"k": tail, "v": tail}, dtype, device,
                         n_kv_heads=n_kv_heads, head_dim=head_dim)
        self.register_buffer("split_counters", torch.zeros(batch, n_kv_heads, dtype=torch.int32, device=device),
                             persistent=False)

    @classmethod
    def for_spec(cls, spec: GQASpec, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu") -> "KVCache":
        return cls(batch, max_len, spec.num_kv_heads, spec.head_dim, dtype, device)

    def write(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """positions: [B, T]; k, v: [B, T, nKV, D]."""
        self._write(positions, k, v)


class GQAAttention(Operator):
    """Torch GQA attention; submodules carry transformers' names (``state_dict()`` keys equal
    the HF ``self_attn`` keys). Options: ``dtype`` (``bf16 | fp16 | fp32``; default the dense
    sources' dtype, fp32 for GGUF) and ``max_positions`` (RoPE table length).

    ``forward(x[B, T, H], positions[B, T], cache: KVCache, cache_lens[B], static=None) -> [B, T, H]``.
    Not one of the rule-file operators (``ktcore.ops.OPERATORS``): a core module.
    """

    op_name = "gqa"
    option_names = ("dtype", "max_positions")

    def __init__(self, spec: GQASpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        if not isinstance(spec, GQASpec):
            raise TypeError(f"{type(self).__name__} needs a GQASpec, got {type(spec).__name__}")
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        self.dtype_request = dtype_option(type(self).__name__, self.options)
        self.rope = TorchRope(spec.rope, self.device, {k: v for k, v in self.options.items() if k == "max_positions"})
        linear_options = {"dtype": self.options["dtype"]} if "dtype" in self.options else {}
        H, D = spec.hidden_size, spec.head_dim
        self.q_proj = TorchLinear(LinearSpec(H, spec.num_heads * D, spec.qkv_bias), self.device, linear_options)
        self.k_proj = TorchLinear(LinearSpec(H, spec.num_kv_heads * D, spec.qkv_bias), self.device, linear_options)
        self.v_proj = TorchLinear(LinearSpec(H, spec.num_kv_heads * D, spec.qkv_bias), self.device, linear_options)
        self.o_proj = TorchLinear(LinearSpec(spec.num_heads * D, H, spec.o_bias), self.device, linear_options)
        if spec.qk_norm:
            self.q_norm = RMSNorm(D, spec.rms_norm_eps, device=self.device)
            self.k_norm = RMSNorm(D, spec.rms_norm_eps, device=self.device)
        # q/k/v weights (and biases) as one tensor: see _fuse_qkv; not in state_dict()
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype = torch.bfloat16) -> KVCache:
        return KVCache.for_spec(self.spec, batch, max_len, dtype, self.device)

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        dtype = self.dtype_request or dense_dtype(sources.values())
        load_submodule_weights(self, sources, dtype)
        self._fuse_qkv()
        logger.debug("%s packed %s as %s on %s", type(self).__name__, self.spec, dtype, self.device)

    def _fuse_qkv(self) -> None:
        """Stacks the q/k/v weights into one ``[(nH + 2 nKV) D, H]`` tensor and makes the three
        projections' weights views of it: one matmul (one launch, one pass over x) instead of
        three, the same memory, and ``state_dict()`` keeps transformers' names."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if not all(type(p) is TorchLinear for p in projs) or len({(p.weight.dtype, p.weight.device) for p in projs}) != 1:
            return  # projections replaced by other backends run one by one
        self.qkv_weight = torch.cat([p.weight for p in projs])  # [(nH + 2 nKV) D, H]
        if self.spec.qkv_bias:
            self.qkv_bias = torch.cat([p.bias for p in projs])  # [(nH + 2 nKV) D]
        start = 0
        for p in projs:
            rows = p.weight.shape[0]
            p.weight = self.qkv_weight[start:start + rows]
            if self.spec.qkv_bias:
                p.bias = self.qkv_bias[start:start + rows]
            start += rows

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        cache_lens: torch.Tensor,
        static: bool | None = None,
    ) -> torch.Tensor:
        if not self.loaded:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        s = self.spec
        B, T, _ = x.shape
        nKV, D = s.num_kv_heads, s.head_dim
        w = self.qkv_weight  # [(nH + 2 nKV) D, H]
        if w is not None:
            qkv = dense_linear(x.to(w.dtype), w, self.qkv_bias).to(x.dtype)  # [B, T, (nH + 2 nKV) D]
            q, k, v = qkv.split((s.num_heads * D, nKV * D, nKV * D), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, s.num_heads, D)  # q: [B, T, nH, D]
        k = k.reshape(B, T, nKV, D)  # k: [B, T, nKV, D]
        v = v.reshape(B, T, nKV, D)  # v: [B, T, nKV, D]
        cache_lens = cache_lens[:B]
        if static is None:
            static = T == 1
        if static and T == 1 and x.is_cuda:  # norms, RoPE, cache write and attention in one kernel
            out = self._decode_step_cuda(q, k, v, positions, cache, cache_lens)
        else:
            if s.qk_norm:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rope(q, k, positions)
            cache.write(positions, k, v)
            kv_len = cache.max_len if static else max(int(cache_lens.max()), 1)
            out = cache_attention(q, cache, positions, cache_lens, kv_len, s.softmax_scale)
        return self.o_proj(out.reshape(B, T, s.num_heads * D))

    def _decode_step_cuda(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cache: KVCache, cache_lens: torch.Tensor) -> torch.Tensor:
        """The decode step (T == 1) on CUDA by the Triton kernel (``ktcore.ops.gqa_decode``):
        the new token's raw q [B, 1, nH, D], k, v [B, 1, nKV, D] -> attention output [B, 1, nH, D];
        its roped K/V are written to the cache, only the visible slots are read."""
        from ktcore.ops.gqa_decode import gqa_decode  # imports triton: only on this path

        s = self.spec
        norms = (self.q_norm.weight, self.k_norm.weight) if s.qk_norm else (None, None)
        eps = self.q_norm.eps if s.qk_norm else 0.0
        cos, sin, by_position = self.rope.decode_cos_sin(positions[:, 0])
        out = gqa_decode(q[:, 0], k[:, 0], v[:, 0], cache.k, cache.v, cache.split_counters, positions[:, 0], cache_lens,
                         *norms, cos, sin, by_position, eps, s.softmax_scale)  # [B, nH, D]
        return out[:, None]


def cache_attention(q: torch.Tensor, cache: KVCache, positions: torch.Tensor, cache_lens: torch.Tensor,
                    kv_len: int, softmax_scale: float) -> torch.Tensor:
    """Torch attention of q [B, T, nH, D] over the first ``kv_len`` cache slots, masked by
    ``visible_slots``; returns [B, T, nH, D] in q's dtype. The reference of the CUDA decode
    kernel (``ktcore.ops.gqa_decode``).

    A token that sees no slot (a padding row of a batch bucket) gets the mean of the values
    (the mask leaves a uniform softmax), the kernel gives zeros: finite either way, and such
    rows are discarded."""
    B, T, n_heads, D = q.shape
    nKV = cache.k.shape[2]
    keys = cache.k[:B, :kv_len].to(q.dtype)  # [B, S, nKV, D]
    values = cache.v[:B, :kv_len].to(q.dtype)  # [B, S, nKV, D]
    # query head h = kv_head * G + g uses K/V head kv_head (transformers' repeat_kv)
    q = q.view(B, T, nKV, n_heads // nKV, D)  # q: [B, T, nKV, G, D]
    scores = torch.einsum("btkgd,bskd->bkgts", q, keys) * softmax_scale  # [B, nKV, G, T, S]
    visible = visible_slots(positions, cache_lens, kv_len)[:, None, None]  # [B, 1, 1, T, S]
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # fp32 softmax, as transformers
    out = torch.einsum("bkgts,bskd->btkgd", probs, values)  # [B, T, nKV, G, D]
    return out.reshape(B, T, n_heads, D)
