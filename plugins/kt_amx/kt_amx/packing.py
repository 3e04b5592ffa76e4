"""Packing expert weights into the kernels' panel layouts (csrc/kt_internal.h), once, at load.

Every matrix ``W[n][k]`` of the owned experts ends up as

- ``bf16``: panels ``[S, n/16, k/2, 16, 2]`` bf16;
- ``int8``: u8 = q + 128 in panels ``[S, n/16, k/G, G/4, 16, 4]`` with scales ``[S, n/16, k/G, 16]``;
- ``int4``: nibbles in panels ``[S, n/16, k/G, G/8, 16, 4]`` (low nibble k = 8j + b, high
  nibble k = 8j + 4 + b) with scales and, when affine, mins of the same shape.

A value is ``s * (u - 128)`` (int8), ``s * (u - 8)`` (symmetric int4) or ``s * u + m``
(affine int4). Dense sources are quantised here; GGUF Q8_0, Q4_0 and Q4_K blocks are decoded
into (u, s, m) exactly (their scales are fp16, or exact fp32 products for Q4_K), so the packed
weights represent the GGUF values bit for bit. Other GGUF types are dequantised with the
``gguf`` reference and quantised, and the added error is returned for the caller to report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kt_amx import hugepages
from ktcore.errors import WeightError
from ktcore.ops.experts import owned_experts_dense
from ktcore.ops.weights import GGUFWeight, WeightSource

FORMATS = ("bf16", "int8", "int4")
#: GGUF block types each packed format represents exactly.
EXACT_INTO = {"int8": {"Q8_0", "Q4_0"}, "int4": {"Q4_0", "Q4_K"}}
GGUF_GROUP = 32


@dataclass(frozen=True)
class LayerFormat:
    """How all three matrices of a layer are packed (the kernels take one format per layer)."""

    format: str  # bf16 | int8 | int4
    group: int = 0  # along k; 0 = the whole row (per output channel)
    symmetric: bool = True  # int4 only: implicit zero point 8, else explicit mins
    scale_f32: bool = False  # scales (and mins) stored as fp32 instead of fp16

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"kt-amx format must be one of {FORMATS}, got {self.format!r}")
        if self.group < 0 or self.group % 32:
            raise ValueError(f"kt-amx group size must be 0 (per channel) or a multiple of 32, got {self.group}")
        if self.format == "int4" and self.group == 0:
            raise ValueError("kt-amx int4 needs a group size (32, 64 or 128)")

    def group_for(self, k: int) -> int:
        return k if self.format == "bf16" or self.group == 0 else self.group

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.scale_f32 else torch.float16


@dataclass
class PackedMatrix:
    """One stacked matrix ``[S, n, k]`` of S owned experts in the kernel layout."""

    w: torch.Tensor  # uint8 or bf16, contiguous
    scale: torch.Tensor | None  # fp16/fp32 [S, n/16, k/G, 16]
    zmin: torch.Tensor | None
    n: int
    k: int


@dataclass
class Quantized:
    """Integer codes and per-group parameters of ``[S, n, k]``: value = s * (u - zero) + m."""

    u: torch.Tensor  # uint8 [S, n, k]
    s: torch.Tensor  # float [S, n, k/G]
    m: torch.Tensor | None  # float [S, n, k/G] (affine only)
    zero: int  # 128 (int8), 8 (symmetric int4), 0 (affine int4)

    @property
    def group(self) -> int:
        return self.u.shape[-1] // self.s.shape[-1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``[S, n, k]`` in ``dtype``, on the codes' device: the arithmetic is fp32 (exact for
        the codes and scales, one rounding to ``dtype`` at the end)."""
        S, n, k = self.u.shape
        G = self.group
        u = self.u.view(S, n, k // G, G).float()
        value = u.sub_(self.zero).mul_(self.s.float().unsqueeze(-1))  # u is a fresh fp32 copy
        if self.m is not None:
            value = value.add_(self.m.float().unsqueeze(-1))
        return value.reshape(S, n, k).to(dtype)


# ----------------------------------------------------------------------------- quantising


def _groups(w: torch.Tensor, G: int) -> torch.Tensor:
    S, n, k = w.shape
    return w.float().reshape(S, n, k // G, G)


def quantize_int8(w: torch.Tensor, G: int, scale_dtype: torch.dtype) -> Quantized:
    """Symmetric int8 per group (G = k: per output channel), codes in [-127, 127]."""
    g = _groups(w, G)
    s = (g.abs().amax(-1) / 127).to(scale_dtype)  # [S, n, k/G]
    sf = s.float().unsqueeze(-1)
    q = torch.where(sf > 0, torch.round(g / sf.clamp_min(torch.finfo(torch.float32).tiny)), 0).clamp(-127, 127)
    return Quantized((q + 128).to(torch.uint8).reshape(w.shape), s, None, 128)


def quantize_int4_symmetric(w: torch.Tensor, G: int, scale_dtype: torch.dtype) -> Quantized:
    """Q4_0-style: s = (the value of largest magnitude) / -8, codes u = round(x / s) + 8 in [0, 15]."""
    g = _groups(w, G)
    idx = g.abs().argmax(-1, keepdim=True)
    s = (torch.gather(g, -1, idx).squeeze(-1) / -8).to(scale_dtype)
    sf = s.float().unsqueeze(-1)
    safe = torch.where(sf != 0, sf, torch.ones_like(sf))
    q = torch.where(sf != 0, torch.round(g / safe) + 8, 8).clamp(0, 15)
    return Quantized(q.to(torch.uint8).reshape(w.shape), s, None, 8)


def quantize_int4_affine(w: torch.Tensor, G: int, scale_dtype: torch.dtype) -> Quantized:
    """min/max per group: s = (max - min) / 15, m = min, u = round((x - m) / s) in [0, 15]."""
    g = _groups(w, G)
    lo, hi = g.amin(-1), g.amax(-1)
    s = ((hi - lo) / 15).to(scale_dtype)
    m = lo.to(scale_dtype)
    sf, mf = s.float().unsqueeze(-1), m.float().unsqueeze(-1)
    safe = torch.where(sf > 0, sf, torch.ones_like(sf))
    q = torch.where(sf > 0, torch.round((g - mf) / safe), 0).clamp(0, 15)
    return Quantized(q.to(torch.uint8).reshape(w.shape), s, m, 0)


def quantize(w: torch.Tensor, fmt: LayerFormat) -> Quantized:
    G = fmt.group_for(w.shape[-1])
    if w.shape[-1] % G:
        raise WeightError(f"kt-amx: k={w.shape[-1]} is not a multiple of the group size {G}")
    if fmt.format == "int8":
        return quantize_int8(w, G, fmt.scale_dtype)
    if fmt.symmetric:
        return quantize_int4_symmetric(w, G, fmt.scale_dtype)
    return quantize_int4_affine(w, G, fmt.scale_dtype)


# --------------------------------------------------------------------------- GGUF blocks


def _blocks(source: GGUFWeight, owned: Sequence[int] | None, block_bytes: int, block: int) -> torch.Tensor:
    """Raw blocks of the owned experts: uint8 [S, n, k / block, block_bytes]."""
    E, n, k = source.shape
    raw = source.data.reshape(E, n, k // block, block_bytes)
    if owned is not None:
        raw = raw[torch.tensor(list(owned), dtype=torch.long)]
    return raw.contiguous()


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> float16 [...]."""
    return raw.contiguous().view(torch.float16).squeeze(-1)


def decode_q8_0(source: GGUFWeight, owned) -> Quantized:
    raw = _blocks(source, owned, 34, 32)  # fp16 d, 32 x int8
    S, n, nb, _ = raw.shape
    q = raw[..., 2:].contiguous().view(torch.int8).to(torch.int16)
    return Quantized((q + 128).to(torch.uint8).reshape(S, n, nb * 32), _fp16(raw[..., :2]), None, 128)


def decode_q4_0(source: GGUFWeight, owned) -> Quantized:
    raw = _blocks(source, owned, 18, 32)  # fp16 d, 16 bytes: low nibbles = 0..15, high = 16..31
    S, n, nb, _ = raw.shape
    qs = raw[..., 2:]
    u = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    return Quantized(u.reshape(S, n, nb * 32), _fp16(raw[..., :2]), None, 8)


def decode_q4_k(source: GGUFWeight, owned) -> Quantized:
    """Super-blocks of 256: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) x 8, 128 bytes of
    nibbles (64 values per 32 bytes: low nibbles first). Sub-block j: d*sc_j*u - dmin*m_j."""
    raw = _blocks(source, owned, 144, 256)
    S, n, nb, _ = raw.shape
    d, dmin = _fp16(raw[..., 0:2]).float(), _fp16(raw[..., 2:4]).float()
    sc6 = raw[..., 4:16].reshape(S, n, nb, 3, 4).to(torch.int32)
    lo, hi, mix = sc6[..., 0, :], sc6[..., 1, :], sc6[..., 2, :]
    sc = torch.cat([lo & 63, (mix & 15) | ((lo >> 2) & 48)], dim=-1)  # [S, n, nb, 8]
    mn = torch.cat([hi & 63, (mix >> 4) | ((hi >> 2) & 48)], dim=-1)
    qs = raw[..., 16:].reshape(S, n, nb, 4, 1, 32)
    u = torch.cat([qs & 0x0F, qs >> 4], dim=-2).reshape(S, n, nb * 256)
    s = (d.unsqueeze(-1) * sc.float()).reshape(S, n, nb * 8)  # exact in fp32 (11 x 6 bits)
    m = (-(dmin.unsqueeze(-1) * mn.float())).reshape(S, n, nb * 8)
    return Quantized(u, s, m, 0)


DECODERS = {"Q8_0": decode_q8_0, "Q4_0": decode_q4_0, "Q4_K": decode_q4_k}


def convert_exact(q: Quantized, fmt: LayerFormat) -> Quantized | None:
    """``q`` in the layer's (format, symmetry, scale type) when that represents it exactly."""
    if q.group != fmt.group_for(q.u.shape[-1]):
        return None
    sdt = fmt.scale_dtype

    def fits(t: torch.Tensor) -> bool:
        return bool(torch.equal(t.to(sdt).float(), t.float()))

    if fmt.format == "int8":
        if q.m is not None or not fits(q.s):
            return None
        u = q.u if q.zero == 128 else (q.u.to(torch.int16) + (128 - q.zero)).to(torch.uint8)
        return Quantized(u, q.s.to(sdt), None, 128)
    if fmt.format != "int4" or q.zero == 128 or not fits(q.s):
        return None
    if fmt.symmetric:
        return Quantized(q.u, q.s.to(sdt), None, 8) if q.zero == 8 and q.m is None else None
    m = q.m if q.m is not None else -8 * q.s.float()
    return Quantized(q.u, q.s.to(sdt), m.to(sdt), 0) if fits(m) else None


# ------------------------------------------------------------------------------- layouts


def _placed(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of the (permuted) panels ``t`` on huge pages where the host allows it."""
    out = hugepages.empty(t.shape, t.dtype)
    return out.copy_(t)


def panel_layout(q: Quantized, fmt: LayerFormat) -> PackedMatrix:
    S, n, k = q.u.shape
    G = q.group
    ng = k // G
    if fmt.format == "int8":
        w = q.u.view(S, n // 16, 16, ng, G // 4, 4).permute(0, 1, 3, 4, 2, 5)
    else:
        u = q.u.view(S, n // 16, 16, ng, G // 8, 2, 4).permute(0, 1, 3, 4, 2, 6, 5)
        w = u[..., 0] | (u[..., 1] << 4)
    scales = q.s.view(S, n // 16, 16, ng).permute(0, 1, 3, 2).contiguous()
    mins = None if q.m is None else q.m.view(S, n // 16, 16, ng).permute(0, 1, 3, 2).contiguous()
    return PackedMatrix(_placed(w).reshape(S, -1), scales, mins, n, k)


def pack_bf16(w: torch.Tensor) -> PackedMatrix:
    S, n, k = w.shape
    panels = w.to(torch.bfloat16).reshape(S, n // 16, 16, k // 2, 2).permute(0, 1, 3, 2, 4)
    return PackedMatrix(_placed(panels).reshape(S, -1), None, None, n, k)


def unpack(p: PackedMatrix, fmt: LayerFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The packed values as ``[S, n, k]`` in ``dtype`` on the device of ``p``'s tensors (the
    inverse of the layouts; used by tests and by streaming prefill, on CPU or GPU copies).
    bf16 panels are only reordered; int codes are unpacked as uint8 and scaled in fp32 once."""
    S, n, k = p.w.shape[0], p.n, p.k
    if fmt.format == "bf16":
        return p.w.view(S, n // 16, k // 2, 16, 2).permute(0, 1, 3, 2, 4).reshape(S, n, k).to(dtype)
    G = fmt.group_for(k)
    ng = k // G
    if fmt.format == "int4":
        return _unpack_int4(p, G, dtype)
    u = p.w.view(S, n // 16, ng, G // 4, 16, 4).permute(0, 1, 4, 2, 3, 5)
    s = p.scale.permute(0, 1, 3, 2).reshape(S, n, ng)
    m = None if p.zmin is None else p.zmin.permute(0, 1, 3, 2).reshape(S, n, ng)
    return Quantized(u.reshape(S, n, k), s, m, 128).dequantize(dtype)


def _unpack_int4(p: PackedMatrix, G: int, dtype: torch.dtype) -> torch.Tensor:
    """int4 panels -> ``[S, n, k]``: each nibble half scaled straight into its strided place
    (one fp32 ``s * u + m`` per half, exact for fp16 scales, then one rounding to ``dtype``),
    a few passes over the codes instead of materialising them as fp32 and permuting."""
    S, n, k = p.w.shape[0], p.n, p.k
    ng = k // G
    b = p.w.view(S, n // 16, ng, G // 8, 16, 4).permute(0, 1, 4, 2, 3, 5)  # [S, n/16, 16, ng, G/8, 4]
    s = p.scale.permute(0, 1, 3, 2)[..., None, None].float()  # [S, n/16, 16, ng, 1, 1]
    m = -8 * s if p.zmin is None else p.zmin.permute(0, 1, 3, 2)[..., None, None].float()  # offset
    out = torch.empty(S, n // 16, 16, ng, G // 8, 2, 4, dtype=dtype, device=p.w.device)  # k = (G/8, half, byte)
    out[..., 0, :] = torch.addcmul(m, b & 0x0F, s)  # low nibbles: the first 4 values of 8
    out[..., 1, :] = torch.addcmul(m, b >> 4, s)
    return out.view(S, n, k)


# ---------------------------------------------------------------------------- the layer


def _gguf_types(sources: Mapping[str, WeightSource]) -> set[str]:
    return {s.qtype for s in sources.values() if isinstance(s, GGUFWeight)}


def native_format(sources: Mapping[str, WeightSource]) -> LayerFormat | None:
    """The exact packed format of a layer whose sources are all Q8_0, Q4_0 or Q4_K, else None."""
    if not all(isinstance(s, GGUFWeight) for s in sources.values()):
        return None
    types = _gguf_types(sources)
    if types == {"Q4_0"}:
        return LayerFormat("int4", GGUF_GROUP, symmetric=True)
    if types <= EXACT_INTO["int8"]:
        return LayerFormat("int8", GGUF_GROUP)
    if types <= EXACT_INTO["int4"]:
        return LayerFormat("int4", GGUF_GROUP, symmetric=False, scale_f32=True)
    return None


def layer_format(sources: Mapping[str, WeightSource], options: Mapping) -> LayerFormat:
    """The layer's packed format: from the options, or the exact format of its GGUF blocks.

    When GGUF blocks that the requested format represents exactly are among the sources, the
    layer uses their groups of 32 (and fp32 scales where Q4_K needs them) so they stay exact.
    """
    requested = options.get("format")
    if requested is None:
        native = native_format(sources)
        if native is not None:
            return native
        quantized = sorted(t for t in _gguf_types(sources) if t not in ("F32", "F16", "BF16"))
        if quantized:
            raise WeightError(
                f"kt-amx: GGUF types {', '.join(quantized)} have no common exact kt-amx format; "
                "name one with options: {format: int4|int8|bf16} (the conversion error is logged)"
            )
        return LayerFormat("bf16")
    if requested not in FORMATS:
        raise WeightError(f"kt-amx: format must be one of {FORMATS}, got {requested!r}")
    if requested == "bf16":
        return LayerFormat("bf16")
    exact = _gguf_types(sources) & EXACT_INTO[requested]
    if requested == "int8":
        return LayerFormat("int8", GGUF_GROUP if exact else int(options.get("group_size", 128)))
    if exact:
        symmetric = exact == {"Q4_0"} and bool(options.get("symmetric", True))
        return LayerFormat("int4", GGUF_GROUP, symmetric=symmetric, scale_f32=not symmetric)
    return LayerFormat("int4", int(options.get("group_size", 128)), symmetric=bool(options.get("symmetric", False)))


def pack_matrix(source: WeightSource, owned: Sequence[int] | None, fmt: LayerFormat) -> tuple[PackedMatrix, float | None]:
    """Packs one stacked source; returns it and the relative error added by a lossy conversion
    of a GGUF-quantized source (None when exact or dense)."""
    if fmt.format != "bf16" and isinstance(source, GGUFWeight) and source.qtype in DECODERS:
        q = convert_exact(DECODERS[source.qtype](source, owned), fmt)
        if q is not None:
            return panel_layout(q, fmt), None
    dense = owned_experts_dense(source, owned, torch.float32)
    lossy_source = isinstance(source, GGUFWeight) and source.qtype not in ("F32", "F16", "BF16")
    if fmt.format == "bf16":
        packed = pack_bf16(dense)
        if not lossy_source:
            return packed, None
        approx = dense.to(torch.bfloat16).float()
    else:
        q = quantize(dense, fmt)
        packed = panel_layout(q, fmt)
        if not lossy_source:  # dense weights: no error to report, so no dequantising them back
            return packed, None
        approx = q.dequantize()
    err = float((approx - dense).norm() / dense.norm().clamp_min(1e-30))
    return packed, err

