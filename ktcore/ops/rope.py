"""RoPE: rotary position embedding, the operator interface and its torch reference.

``Rope.forward(q[..., T, nH, D], k[..., T, nKV, D], positions[..., T]) -> (q, k)`` rotates the
first ``spec.rotary_dim`` channels of every head by the angle ``position * inv_freq`` and
passes the other channels through. Two channel layouts exist:

- half-split (``interleaved=False``; Llama, Qwen, Mixtral): channel ``i`` pairs with
  ``i + rotary_dim/2`` (transformers' ``rotate_half``);
- interleaved (``interleaved=True``; DeepSeek-V2/V3 checkpoints): channels ``2i`` and ``2i+1``
  form a pair. The output keeps that layout (pairs stay adjacent), as DeepSeek's reference
  code, transformers' DeepSeek-V2 (complex multiply) and llama.cpp do. transformers'
  DeepSeek-V3 ``apply_rotary_pos_emb_interleave`` returns the same numbers de-interleaved
  (evens first, then odds); attention scores are identical because q and k are permuted alike.

The inverse frequencies and the attention factor (YaRN's mscale, multiplied into cos/sin)
reproduce transformers' ``ROPE_INIT_FUNCTIONS`` (``modeling_rope_utils.py``) operation by
operation, so they agree bit for bit on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ktcore.ops.base import Operator

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    """Everything that determines the rotation; ``factor`` is the context scaling factor."""

    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int | None = None
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    # layout
    interleaved: bool = False

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"RopeSpec: rope_type {self.rope_type!r} is not one of {', '.join(ROPE_TYPES)}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"RopeSpec: rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.rope_type == "dynamic" and self.rotary_dim < 4:
            raise ValueError("RopeSpec: dynamic NTK needs rotary_dim >= 4 (it divides by rotary_dim - 2)")
        if not self.theta > 0:
            raise ValueError(f"RopeSpec: theta must be positive, got {self.theta}")
        if not self.factor > 0:
            raise ValueError(f"RopeSpec: factor must be positive, got {self.factor}")
        if self.max_position_embeddings <= 0:
            raise ValueError(f"RopeSpec: max_position_embeddings must be positive, got {self.max_position_embeddings}")
        if self.rope_type in ("yarn", "llama3"):
            omax = self.original_max_position_embeddings
            if omax is None or omax <= 0:
                raise ValueError(
                    f"RopeSpec: rope_type {self.rope_type!r} needs a positive "
                    f"original_max_position_embeddings, got {omax}"
                )
        if self.rope_type == "yarn" and not (self.beta_fast > 0 and self.beta_slow > 0):
            raise ValueError(
                f"RopeSpec: yarn beta_fast/beta_slow must be positive, got {self.beta_fast}/{self.beta_slow}"
            )
        if self.rope_type == "llama3":
            low, high = self.low_freq_factor, self.high_freq_factor
            if low is None or high is None or not high > low:
                raise ValueError(
                    f"RopeSpec: llama3 needs low_freq_factor < high_freq_factor, got {low} and {high}"
                )
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"RopeSpec: attention_factor must be positive, got {self.attention_factor}")


def rope_spec_from_config(hf_config: Any, rotary_dim: int | None = None) -> RopeSpec:
    """Reads a transformers 5 config (``config.rope_parameters``; the transformers 4
    ``rope_scaling``/``rope_theta`` attributes are accepted too).

    ``rotary_dim`` defaults to ``head_dim * partial_rotary_factor`` where ``head_dim`` is the
    config's ``head_dim`` (DeepSeek configs set it to ``qk_rope_head_dim``) or
    ``hidden_size // num_attention_heads``. DeepSeek-V2 always uses the interleaved layout;
    other models use it when ``config.rope_interleave`` is true (DeepSeek-V3 defaults to it).
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    layer_keys = set(getattr(hf_config, "layer_types", None) or ()) & set(params)
    if layer_keys:
        raise ValueError(f"rope_parameters nested per layer type ({', '.join(sorted(layer_keys))}) are not supported")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type {rope_type!r} of this config is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    theta = float(theta) if theta is not None else 10000.0
    max_pos = int(hf_config.max_position_embeddings)
    model_type = getattr(hf_config, "model_type", "")
    if rotary_dim is None:
        if model_type in ("deepseek_v2", "deepseek_v3"):
            head_dim = hf_config.qk_rope_head_dim
        else:
            head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None)) or 1.0
        rotary_dim = int(head_dim * partial)
    original = params.get("original_max_position_embeddings")
    if original is None:
        original = getattr(hf_config, "original_max_position_embeddings", None)
    if original is None and rope_type in ("yarn", "llama3"):
        original = max_pos  # transformers' standardize_rope_params does the same
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / original if rope_type == "yarn" else 1.0
    interleaved = model_type == "deepseek_v2" or bool(getattr(hf_config, "rope_interleave", False))

    def opt_float(key: str) -> float | None:
        value = params.get(key)
        return None if value is None else float(value)

    return RopeSpec(
        rotary_dim=int(rotary_dim),
        theta=theta,
        rope_type=rope_type,
        factor=float(factor),
        max_position_embeddings=max_pos,
        original_max_position_embeddings=None if original is None else int(original),
        beta_fast=float(params.get("beta_fast") or 32),  # `or`: transformers treats 0/None as unset
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=opt_float("mscale"),
        mscale_all_dim=opt_float("mscale_all_dim"),
        attention_factor=opt_float("attention_factor"),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=opt_float("low_freq_factor"),
        high_freq_factor=opt_float("high_freq_factor"),
        interleaved=interleaved,
    )


# --- inverse frequencies and attention factor, one function per rope_type ---------------------


def _exponents(dim: int, device: torch.device | str | None) -> torch.Tensor:
    # [dim/2]: 2i / dim, as transformers computes it (int64 arange cast to float32)
    return torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim


def default_inv_freq(spec: RopeSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / theta^(2i/d)``, ``[rotary_dim/2]`` float32."""
    return 1.0 / (spec.theta ** _exponents(spec.rotary_dim, device))


def linear_inv_freq(spec: RopeSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """Position interpolation: the default frequencies divided by ``factor``."""
    inv_freq = default_inv_freq(spec, device)
    inv_freq /= spec.factor
    return inv_freq


def dynamic_inv_freq(
    spec: RopeSpec, seq_len: int | torch.Tensor | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Dynamic NTK: the base grows with the sequence length once it exceeds
    ``max_position_embeddings``. ``seq_len`` may be a tensor of any shape ``[...]``; the result is
    then ``[..., rotary_dim/2]`` (computed on the device, no host synchronisation)."""
    dim, max_pos, factor = spec.rotary_dim, spec.max_position_embeddings, spec.factor
    if seq_len is None:
        seq_len = max_pos
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.clamp_min(seq_len, max_pos)
    else:
        seq_len = max(seq_len, max_pos)
    base = spec.theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    if isinstance(base, torch.Tensor):
        base = base.to(device=device)[..., None]  # [..., 1]
    return 1.0 / (base ** _exponents(dim, device))


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(spec: RopeSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """YaRN: interpolated (``/factor``) low frequencies, original high frequencies, a linear
    ramp between the correction dimensions of ``beta_fast`` and ``beta_slow`` rotations."""
    dim, base, factor = spec.rotary_dim, spec.theta, spec.factor
    original = spec.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevents a division by zero, as transformers does

    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)  # [dim/2]
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)  # [dim/2]
    return inv_freq_interpolation * (1 - extrapolation_factor) + inv_freq_extrapolation * extrapolation_factor


def llama3_inv_freq(spec: RopeSpec, device: torch.device | str | None = None) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short kept, a smooth blend between."""
    inv_freq = default_inv_freq(spec, device)
    factor, low_ff, high_ff = spec.factor, spec.low_freq_factor, spec.high_freq_factor
    old_context_len = spec.original_max_position_embeddings
    low_freq_wavelen = old_context_len / low_ff
    high_freq_wavelen = old_context_len / high_ff

    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def rope_attention_factor(spec: RopeSpec) -> float:
    """The factor transformers multiplies into cos and sin (``attention_scaling``)."""
    if spec.rope_type != "yarn":
        return 1.0
    if spec.attention_factor is not None:
        return spec.attention_factor
    if spec.mscale and spec.mscale_all_dim:
        return float(yarn_get_mscale(spec.factor, spec.mscale) / yarn_get_mscale(spec.factor, spec.mscale_all_dim))
    return yarn_get_mscale(spec.factor)


def rope_init(
    spec: RopeSpec, device: torch.device | str | None = None, seq_len: int | torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """``(inv_freq[rotary_dim/2], attention_factor)``, the pair ``ROPE_INIT_FUNCTIONS`` returns.
    ``seq_len`` matters only for "dynamic"."""
    if spec.rope_type == "default":
        inv_freq = default_inv_freq(spec, device)
    elif spec.rope_type == "linear":
        inv_freq = linear_inv_freq(spec, device)
    elif spec.rope_type == "dynamic":
        inv_freq = dynamic_inv_freq(spec, seq_len, device)
    elif spec.rope_type == "yarn":
        inv_freq = yarn_inv_freq(spec, device)
    else:
        inv_freq = llama3_inv_freq(spec, device)
    return inv_freq, rope_attention_factor(spec)


# --- rotation ----------------------------------------------------------------------------------


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotates the first ``2 * cos.shape[-1]`` channels of ``x`` in float32, keeps the rest.

    x: [..., T, nH, D]; cos, sin: [..., T, 1, R/2] (broadcast over heads), attention factor
    already multiplied in. Returns x's dtype and shape.
    """
    rot = 2 * cos.shape[-1]
    x_rot = x[..., :rot].float()  # [..., T, nH, R]
    if interleaved:
        x1, x2 = x_rot[..., 0::2], x_rot[..., 1::2]  # [..., T, nH, R/2] each: pair (2i, 2i+1)
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]  # pair (i, i + R/2)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    out = out.to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rot:]), dim=-1)


class Rope(Operator):
    """RoPE operator interface: no weights; ``forward(q, k, positions) -> (q, k)``."""

    op_name = "rope"

    def __init__(self, spec: RopeSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        if not isinstance(spec, RopeSpec):
            raise TypeError(f"{type(self).__name__} needs a RopeSpec, got {type(spec).__name__}")
        super().__init__(spec, device, options)
        self.loaded = True  # nothing to load

    def weight_names(self) -> tuple[str, ...]:
        return ()

    def expected_shape(self, name: str) -> tuple[int, ...]:
        raise KeyError(f"{type(self).__name__} has no weight {name!r}")

    def pack(self, sources: Mapping[str, Any]) -> None:
        pass

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [..., T, nH, D], k: [..., T, nKV, D], positions: [..., T] integer -> (q, k) rotated."""
        raise NotImplementedError


class TorchRope(Rope):
    """Reference RoPE with a static cos/sin table gathered by position (capture-safe).

    The table covers positions ``[0, options["max_positions"])`` (default
    ``spec.max_position_embeddings``); positions outside it are an indexing error.

    "dynamic" (NTK) cannot use a fixed table: its frequencies depend on the sequence length. It
    computes them on the device from ``seq_len = max(positions over T) + 1`` per sequence (at
    least ``max_position_embeddings``), which is what transformers does for a sequence of that
    length, without a host synchronisation. Unlike transformers, the length is taken per
    sequence, not over the whole batch, so one request never changes another's rotation.
    Keys already in a KV cache keep the rotation they were written with, as in transformers.
    """

    def __init__(self, spec: RopeSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        inv_freq, self.attention_factor = rope_init(spec)  # [R/2] float32, CPU as in transformers
        self.register_buffer("inv_freq", inv_freq.to(self.device), persistent=False)
        if spec.rope_type == "dynamic":
            self.max_positions = None
            return
        self.max_positions = int(self.options.get("max_positions", spec.max_position_embeddings))
        if self.max_positions <= 0:
            raise ValueError(f"TorchRope: max_positions must be positive, got {self.max_positions}")
        positions = torch.arange(self.max_positions, dtype=torch.int64, device=self.device)
        freqs = positions[:, None].float() * self.inv_freq  # [P, R/2]
        self.register_buffer("cos_table", freqs.cos() * self.attention_factor, persistent=False)  # [P, R/2]
        self.register_buffer("sin_table", freqs.sin() * self.attention_factor, persistent=False)  # [P, R/2]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [..., T] -> cos, sin: [..., T, R/2] float32 (attention factor included)."""
        if self.spec.rope_type != "dynamic":
            return self.cos_table[positions], self.sin_table[positions]
        seq_len = positions.amax(dim=-1, keepdim=True) + 1  # [..., 1]
        inv_freq = dynamic_inv_freq(self.spec, seq_len, positions.device)  # [..., 1, R/2]
        freqs = positions[..., None].float() * inv_freq  # [..., T, R/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def decode_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """For one new token per row, positions [B]: (cos, sin, by_position) as a kernel reads
        them: the tables [P, R/2] to index by position (``by_position``), or, for "dynamic",
        [B, R/2] computed for these positions, one row per batch row."""
        if self.spec.rope_type != "dynamic":
            return self.cos_table, self.sin_table, True
        cos, sin = self.cos_sin(positions[:, None])  # [B, 1, R/2]
        return cos[:, 0], sin[:, 0], False

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rot = self.spec.rotary_dim
        if q.shape[-1] < rot or k.shape[-1] < rot:
            raise ValueError(f"TorchRope: head dims {q.shape[-1]}/{k.shape[-1]} are smaller than rotary_dim {rot}")
        cos, sin = self.cos_sin(positions)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, R/2]: broadcast over heads
        return rotate(q, cos, sin, self.spec.interleaved), rotate(k, cos, sin, self.spec.interleaved)
