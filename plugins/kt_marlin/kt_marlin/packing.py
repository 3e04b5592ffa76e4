"""Packed weight formats of ``MarlinLinear`` and how each is built (once, at load).

Layout (``out`` rows N, ``in`` columns K, groups of G along K, all row-major, K contiguous):

- ``int4``: ``scales`` and ``offsets`` ``[N, K // G]``: ``w[n, k] = scale * q + offset``
  (affine), ``q`` in 0..15, in one of two layouts told apart by the dtype of ``qweight``:

  - ``words`` (what quantising and GGUF repacking produce): int32 ``[N, K // 8]``, nibble
    ``j`` of word ``w`` is column ``8w + j``;
  - ``mma`` (the kernels', ``to_mma``): int16 ``[N, K // 4]`` in units of ``U =
    mma_unit(G) = max(G, 64)`` columns; element ``c`` (0..U/4-1) of a unit holds columns
    ``c + j U/4`` of the unit in nibble ``j`` (bits ``4j..4j+3``). A unit's row is ``U/2``
    contiguous bytes (16-byte loads, coalesced), and nibble ``j`` of all its elements is
    the contiguous column range ``[j U/4, (j+1) U/4)``: the kernel dots it with a contiguous
    slice of x, and each two weights of a 32-bit register come out of one LOP3 (``int4_mma``).
    Needs K to be a multiple of ``U``; the fused MoE (``to_mma(p, fit=True)``) takes ``U =
    G`` when K is not (groups of 32, K an odd multiple of 32), which ``mma_unit(G, K)`` says.
- ``int8``: ``qweight`` int8 ``[N, K]``, ``scales`` ``[N, K // G]``: ``w = scale * q``.

Scales/offsets are fp16 when that is exact and fp32 otherwise (Q4_K: ``d * sc`` has 17
significant bits). Exact conversions (DESIGN §7): Q4_0 (``d``, ``-8 d``), Q4_1 (``d``, ``m``),
Q4_K (``d sc``, ``-dmin m``, groups of 32) to int4; Q8_0 (``d``) to int8. Dense weights are
quantised (round to nearest, per-group min/max for int4, absmax for int8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EXACT_INT4 = ("Q4_0", "Q4_1", "Q4_K")
EXACT_INT8 = ("Q8_0",)


@dataclass(frozen=True)
class Packed:
    """One packed weight: ``bits`` 4 or 8, ``group`` along K, tensors on one device."""

    bits: int
    group: int
    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"Packed.bits must be 4 or 8, got {self.bits}")
        if (self.bits == 4) != (self.offsets is not None):
            raise ValueError("int4 needs offsets, int8 has none")

    @property
    def shape(self) -> tuple[int, int]:
        n, elements = self.qweight.shape
        return n, elements * (self.qweight.element_size() * 2 if self.bits == 4 else 1)


def mma_unit(group: int, k: int | None = None) -> int:
    """Columns of a unit of the ``mma`` layout for groups of ``group``: ``max(group, 64)``, or
    ``group`` when ``k`` is given and is no multiple of that."""
    unit = max(group, 64)
    return group if k is not None and k % unit else unit


def _compact(t: torch.Tensor) -> torch.Tensor:
    """fp32 scales as fp16 when every value survives the round trip exactly."""
    half = t.to(torch.float16)
    return half if torch.equal(half.to(torch.float32), t) else t


def pack_int4(q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int) -> Packed:
    """q ``[N, K]`` integers in 0..15, fp32 scales/offsets ``[N, K // group]``."""
    n, k = q.shape
    nib = q.to(torch.int64).reshape(n, k // 8, 8) << (4 * torch.arange(8, device=q.device))
    words = nib.sum(-1)  # 0 .. 2^32-1
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return Packed(4, group, words.contiguous(), _compact(scales.float()).contiguous(),
                  _compact(offsets.float()).contiguous())


def pack_int8(q: torch.Tensor, scales: torch.Tensor, group: int) -> Packed:
    return Packed(8, group, q.to(torch.int8).contiguous(), _compact(scales.float()).contiguous(), None)


def _nibbles(p: Packed) -> torch.Tensor:
    """The int32 ``q[N, K]`` (0..15) of an int4 weight in either layout."""
    n, k = p.shape
    if p.qweight.dtype == torch.int32:  # words
        shifts = 4 * torch.arange(8, device=p.qweight.device, dtype=torch.int32)
        return ((p.qweight.unsqueeze(-1) >> shifts) & 15).reshape(n, k)
    unit = mma_unit(p.group, k)
    shifts = 4 * torch.arange(4, device=p.qweight.device, dtype=torch.int32)
    e = p.qweight.to(torch.int32).reshape(n, k // unit, 1, unit // 4)
    return ((e >> shifts[:, None]) & 15).reshape(n, k)  # [n, unit, nibble j, c] -> column j U/4 + c


def to_mma(p: Packed, fit: bool = False) -> Packed:
    """An int4 weight in the ``mma`` layout; K must be a multiple of ``mma_unit(group)``
    (``MarlinLinear``'s kernel assumes that unit), or with ``fit`` of ``mma_unit(group, K)``
    (the fused MoE's kernels take the unit as a parameter)."""
    n, k = p.shape
    unit = mma_unit(p.group, k if fit else None)
    if k % unit:
        raise ValueError(f"the int4 mma layout needs K ({k}) to be a multiple of {unit}")
    q = _nibbles(p).reshape(n, k // unit, 4, unit // 4)
    e = (q << (4 * torch.arange(4, device=q.device, dtype=torch.int32))[:, None]).sum(2)  # 0 .. 2^16-1
    e = torch.where(e >= 2**15, e - 2**16, e).to(torch.int16)
    return Packed(4, p.group, e.reshape(n, k // 4).contiguous(), p.scales, p.offsets)


def unpack(p: Packed) -> torch.Tensor:
    """The fp32 weight ``[N, K]`` a packed weight represents (the kernels' exact values)."""
    q = (_nibbles(p) if p.bits == 4 else p.qweight).float()
    s = p.scales.float().repeat_interleave(p.group, dim=1)
    w = s * q
    if p.offsets is not None:
        w = w + p.offsets.float().repeat_interleave(p.group, dim=1)
    return w


def quantize_dense(w: torch.Tensor, bits: int, group: int) -> Packed:
    """Round-to-nearest group-wise quantisation of a dense ``[N, K]`` weight."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group}")
    g = w.float().reshape(n, k // group, group)
    if bits == 8:
        scale = g.abs().amax(-1) / 127
        scale = scale.to(torch.float16).float()
        q = torch.where(scale[..., None] > 0, torch.round(g / scale[..., None]), 0).clamp(-127, 127)
        return pack_int8(q.reshape(n, k), scale, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).to(torch.float16).float()
    offset = lo.to(torch.float16).float()
    q = torch.where(scale[..., None] > 0, torch.round((g - offset[..., None]) / scale[..., None]), 0).clamp(0, 15)
    return pack_int4(q.reshape(n, k), scale, offset, group)


def _blocks(data: torch.Tensor, rows: int, type_size: int) -> np.ndarray:
    return data.reshape(-1).cpu().numpy().reshape(rows, -1, type_size)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def from_gguf(data: torch.Tensor, qtype: str, shape: tuple[int, int], device) -> Packed:
    """Exact int4/int8 packing of GGUF ``Q4_0 | Q4_1 | Q4_K | Q8_0`` blocks of a ``[N, K]`` weight."""
    n, k = shape
    if qtype == "Q8_0":
        b = _blocks(data, n, 34)
        d = _f16(b[..., 0:2])
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)
        return pack_int8(torch.from_numpy(q).to(device), torch.from_numpy(d).to(device), 32)
    if qtype in ("Q4_0", "Q4_1"):
        head = 2 if qtype == "Q4_0" else 4
        b = _blocks(data, n, head + 16)
        d = _f16(b[..., 0:2])
        m = -8 * d if qtype == "Q4_0" else _f16(b[..., 2:4])
        qs = b[..., head:]
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(n, k)
        return pack_int4(torch.from_numpy(q).to(device), torch.from_numpy(d).to(device),
                         torch.from_numpy(m).to(device), 32)
    if qtype == "Q4_K":
        from gguf.quants import Q4_K

        b = _blocks(data, n, 144)
        nb = b.shape[1]
        d = _f16(b[..., 0:2])[..., None]
        dmin = _f16(b[..., 2:4])[..., None]
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
        scale = d * sc.reshape(n, nb, 8).astype(np.float32)  # exact: 11 x 6 bits
        offset = -(dmin * mn.reshape(n, nb, 8).astype(np.float32))
        qs = b[..., 16:].reshape(n, nb, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(n, k)
        return pack_int4(torch.from_numpy(q).to(device), torch.from_numpy(scale.reshape(n, -1)).to(device),
                         torch.from_numpy(offset.reshape(n, -1)).to(device), 32)
    raise ValueError(f"GGUF {qtype} has no exact int4/int8 form (exact: {', '.join(EXACT_INT4 + EXACT_INT8)})")
