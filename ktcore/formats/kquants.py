"""K-quant quantisers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in vectorised numpy.

gguf-py 0.19 dequantises the K-quants but cannot quantise them. These functions write the
raw super-blocks of 256 values in exactly ggml's layout (``block_qN_K`` of ``ggml-common.h``;
``gguf.quants`` dequantises them bit-exactly):

=====  =====  =====================================================================
type   bytes  block layout
=====  =====  =====================================================================
Q2_K     84   scales[16] (4-bit scale | 4-bit min << 4), qs[64] (2 bits), d, dmin
Q3_K    110   hmask[32] (3rd bit), qs[64] (low 2 bits), scales[12] (16 x 6 bits), d
Q4_K    144   d, dmin, scales[12] (8 scales + 8 mins, 6 bits each), qs[128] (4 bits)
Q5_K    176   d, dmin, scales[12] (as Q4_K), qh[32] (5th bit), qs[128] (low 4 bits)
Q6_K    210   ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (int8), d
=====  =====  =====================================================================

(d and dmin are float16.) The algorithm is that of ggml's reference quantisers without an
importance matrix (``quantize_row_qN_K_ref`` in ``ggml-quants.c``: what ``llama-quantize``
and ``ggml_quantize_chunk`` run when no imatrix is given), re-derived and vectorised over all
sub-blocks at once instead of looping over them:

- Q4_K/Q5_K (32-value sub-blocks, 4/5 bits) and Q2_K (16-value sub-blocks, 2 bits): affine
  ``x ~ scale * q - min`` with ``min >= 0``; a search over 21/16/16 inverse scales, each
  candidate's levels getting their weighted least-squares scale and offset, the best kept
  under weighted squared error (Q4_K/Q5_K, weights ``rms(sub-block) + |x|``) or weighted
  absolute error (Q2_K, weights ``|x|``) -- ggml's ``make_qkx2_quants``.
- Q6_K (16-value sub-blocks, 6 bits): symmetric levels -32..31, the value of largest
  magnitude at -32; 19 candidate scales around it, each with its ``x^2``-weighted
  least-squares scale -- ggml's ``make_qx_quants`` (rmse_type 1).
- Q3_K (16-value sub-blocks, 3 bits): symmetric -4..3, then 5 sweeps of coordinate descent
  that move single levels while the ``x^2``-weighted least-squares fit improves -- ggml's
  ``make_q3_quants``; the sweep is sequential within a sub-block, vectorised across them.

The sub-block scales (and mins) are then quantised to 6 bits (Q3_K/Q4_K/Q5_K), 4 bits
(Q2_K) or int8 (Q6_K) against the float16 super-block scale, and the values re-quantised
with the scales actually stored, as ggml does. Sub-blocks are laid out value-index-first so
that every float32 sum runs in ggml's order: the output is byte-identical to ggml's
reference (``tests/formats/test_kquants.py`` compares with llama-cpp-python's libggml), at
roughly half the speed of that scalar C code (~100-250 ns per value on one core).

Deliberate deviations, only where ggml's float32 intermediates overflow or underflow (its
``x^3``/``x^4`` products in Q3_K/Q6_K for magnitudes around 1e5 and up or 1e-6 and down) or
its float16 scales overflow: each super-block is scaled by a power of two before the search
(exact, so nothing changes elsewhere), and the float16 super-block scales saturate at +-65504
instead of becoming inf, so values beyond the format's range (~1e6..1e7 for Q2_K..Q5_K) are
clipped rather than turned into inf/NaN. As in ggml, magnitudes whose scales fall below
float16's range (values ~1e-5 and smaller) lose precision or flush to zero, and Q4_K/Q5_K
blocks of values ~1e-6 can reconstruct worse than zero (their d underflows, dmin does not).
Non-finite input is a ``ValueError``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import QuantError
from gguf.quants import quantize as _gguf_quantize

QK_K = 256
_F16_MAX = np.float32(65504.0)
_GROUP_MAX_EPS = np.float32(1e-15)  # ggml's threshold for an all-zero sub-block

__all__ = ["quantize", "quantize_q2_k", "quantize_q3_k", "quantize_q4_k", "quantize_q5_k", "quantize_q6_k",
           "K_QUANTS"]

#: super-blocks quantised at a time: temporaries of ~1 MB each stay in cache
_CHUNK_BLOCKS = 1024


# ----------------------------------------------------------------------------- helpers


def _blocks(x: np.ndarray, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """(n_blocks, 256) float32 view/copy of ``x`` and the shape of the output bytes."""
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise QuantError(f"Can't quantize tensor with shape {x.shape} to {name}: the last dimension "
                         f"must be a multiple of {QK_K}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]
    out_shape = (*x.shape[:-1], x.shape[-1] // QK_K * type_size)
    return x.reshape(-1, QK_K), out_shape


def _normalise(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each block divided by a power of two so that max |x| is in [0.5, 1); exact in float."""
    amax = np.abs(b).max(axis=-1, keepdims=True)
    _, e = np.frexp(amax)  # amax = m * 2**e, m in [0.5, 1); e = 0 for zero blocks
    return np.ldexp(b, -e).astype(np.float32, copy=False), e.astype(np.int32)


def _eps(e: np.ndarray) -> np.ndarray:
    """ggml's all-zero threshold (1e-15 in the input's units) in units normalised by 2**e."""
    return np.ldexp(np.float64(_GROUP_MAX_EPS), -e)


def _to_f16(v: np.ndarray, e: np.ndarray) -> np.ndarray:
    """float16 of ``v * 2**e`` (round to nearest even), saturating at the float16 maximum."""
    v = np.ldexp(v.astype(np.float32), e).astype(np.float32)
    return np.clip(v, -_F16_MAX, _F16_MAX).astype(np.float16)


def _sum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 in float32, first to last: the order (and rounding) of ggml's loops."""
    acc = a[0].astype(np.float32, copy=True)
    for row in a[1:]:
        acc += row
    return acc


def _rint(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """ggml's ``nearest_int`` (round half to even) clamped to [lo, hi], as float32."""
    return np.clip(np.rint(v), lo, hi).astype(np.float32, copy=False)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b == 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0).astype(np.float32, copy=False)


def _signed_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max |x|, the signed value attaining it, the first on ties) over axis 0."""
    i = np.abs(x).argmax(axis=0)[None]
    mx = np.take_along_axis(x, i, axis=0)[0]
    return np.abs(mx), mx


def _subblocks(b: np.ndarray, n: int) -> np.ndarray:
    """(nb, 256) -> (n, nb, 256 // n): value index within the sub-block first, so that the
    sums over a sub-block run over rows of contiguous memory, in order."""
    return np.ascontiguousarray(b.reshape(b.shape[0], QK_K // n, n).transpose(2, 0, 1))


def _unsubblocks(L: np.ndarray) -> np.ndarray:
    """(n, nb, S) -> (nb, S, n), the inverse of ``_subblocks`` (before the final reshape)."""
    return L.transpose(1, 2, 0)


def _affine_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                   use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels L in [0, nmax], scale >= 0 and min >= 0 with x ~ scale * L - min per sub-block.

    ``x``, ``w``: (n, ...) sub-blocks (axis 0) and weights. Starts from the levels of the full
    range [min(x, 0), max(x)], then tries ``nstep + 1`` inverse scales ``(nmax + rmin +
    rdelta*i) / (max - offset)`` on ``x - offset``; for each, the weighted least-squares
    (scale, offset) of its levels (offset capped at 0), kept when its weighted error (squared,
    or absolute with ``use_mad``) is lower -- and a kept offset is the origin of the later
    candidates. Returns (L, scale, min), scale and min of shape (...). (ggml's make_qkx2_quants.)
    """
    f32 = np.float32
    xmin = np.minimum(x.min(axis=0), 0)
    xmax = x.max(axis=0)
    flat = xmax == xmin  # all equal and <= 0: scale 0, min = -x
    xmax = np.where(flat, xmin + f32(1), xmax)
    sum_w = _sum(w)
    sum_x = _sum(w * x)

    def err(scale, off, levels):
        d = scale * levels + off - x
        return _sum(w * (np.abs(d) if use_mad else d * d))

    iscale = f32(nmax) / (xmax - xmin)
    scale = (f32(1) / iscale).astype(f32)
    off = xmin
    L = _rint(iscale * (x - off), 0, nmax)
    best = err(scale, off, L)
    with np.errstate(divide="ignore", invalid="ignore"):
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (xmax - off)
            La = _rint(iscale * (x - off), 0, nmax)
            wl = w * La
            sum_l = _sum(wl)
            sum_l2 = _sum(wl * La)
            sum_xl = _sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            ok = D > 0
            Ds = np.where(ok, D, f32(1))
            s = (sum_w * sum_xl - sum_x * sum_l) / Ds
            m = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
            pos = m > 0
            s = np.where(pos, _div(sum_xl, sum_l2), s)
            m = np.where(pos, f32(0), m)
            cur = err(s, m, La)
            better = ok & (cur < best)
            L = np.where(better, La, L)
            best = np.where(better, cur, best)
            scale = np.where(better, s, scale)
            off = np.where(better, m, off)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat, f32(0), L)
    return L, scale.astype(f32), (-off).astype(f32)


def _symmetric_search(x: np.ndarray, nmax: int, eps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Levels L in [-nmax, nmax-1] and scale with x ~ scale * L, weights x^2 (Q6_K).

    ``x``: (n, ...) sub-blocks (axis 0). The value of largest magnitude maps to -nmax; inverse
    scales ``-(nmax + 0.1*i) / max`` for i in -9..9 are tried, each scored by its least-squares
    fit (sum wxl)^2 / (sum wl^2). (ggml's make_qx_quants with rmse_type 1.)
    """
    f32 = np.float32
    amax, mx = _signed_absmax(x)
    zero = amax < eps  # an all-zero sub-block: levels -nmax (stored 0), scale 0
    mx = np.where(zero, f32(1), mx)
    w = x * x
    wx = w * x

    def fit(iscale):
        levels = _rint(iscale * x, -nmax, nmax - 1)
        return levels, _sum(wx * levels), _sum(w * levels * levels)

    L, sumlx, suml2 = fit(-f32(nmax) / mx)
    scale = _div(sumlx, suml2)
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        La, slx, sl2 = fit(-(f32(nmax) + f32(0.1) * f32(i)) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better, La, L)
        scale = np.where(better, _div(slx, sl2), scale)
        best = np.where(better, scale * slx, best)
    return np.where(zero, f32(-nmax), L), np.where(zero, f32(0), scale).astype(f32)


def _q3_search(x: np.ndarray, eps: np.ndarray, nmax: int = 4, sweeps: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Levels L in [-nmax, nmax-1] and scale with x ~ scale * L, weights x^2 (Q3_K).

    ``x``: (n, ...) sub-blocks (axis 0). Start from the levels of max -> -nmax, then sweeps of
    coordinate descent: each level in turn is moved to the one nearest its value under the fit
    of the others, kept when the least-squares objective (sum wxl)^2 / (sum wl^2) grows.
    (ggml's make_q3_quants with rmse.) A sweep that changes nothing leaves everything as it
    was, so every sub-block may run all sweeps.
    """
    f32 = np.float32
    amax, mx = _signed_absmax(x)
    zero = amax < eps  # an all-zero sub-block: levels -nmax (stored 0), scale 0
    mx = np.where(zero, f32(1), mx)
    L = _rint((-f32(nmax) / mx) * x, -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _sum(wx * L)
    suml2 = _sum(w * L * L)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(sweeps):
            for i in range(x.shape[0]):
                xi, wi, wxi, li = x[i], w[i], wx[i], L[i]
                slx = sumlx - wxi * li
                sl2 = suml2 - wi * li * li
                cand = slx > 0
                new = _rint(xi * sl2 / np.where(cand, slx, f32(1)), -nmax, nmax - 1)
                slx = slx + wxi * new
                sl2 = sl2 + wi * new * new
                take = cand & (new != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                L[i] = np.where(take, new, li)
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
    scale = _div(sumlx, suml2)
    return np.where(zero, f32(-nmax), L), np.where(zero, f32(0), scale).astype(f32)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """(nb, 256) levels 0..3 -> (nb, 64): byte 32c+l holds L[128c+l+32k] at bits 2k."""
    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 scales and 8 mins of 6 bits -> Q4_K/Q5_K's 12 bytes (``get_scale_min_k4`` inverted)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    return np.concatenate([
        ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
        lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
        (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4),
    ], axis=1)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(v.astype(np.float16).reshape(-1, 1)).view(np.uint8)


def _chunked(fn):
    """Runs a (nb, 256) -> (nb, type_size) block quantiser over bounded chunks of blocks."""
    name = fn.__name__.removeprefix("_quantize_").upper()

    def quantize_array(x: np.ndarray) -> np.ndarray:
        blocks, out_shape = _blocks(x, name)
        out = np.empty((blocks.shape[0], GGML_QUANT_SIZES[GGMLQuantizationType[name]][1]), dtype=np.uint8)
        for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
            chunk = blocks[start:start + _CHUNK_BLOCKS]
            if not np.isfinite(chunk).all():
                raise ValueError(f"cannot quantise non-finite values to {name}")
            out[start:start + _CHUNK_BLOCKS] = fn(chunk)
        return out.reshape(out_shape)

    quantize_array.__name__ = fn.__name__.removeprefix("_")
    quantize_array.__qualname__ = quantize_array.__name__
    quantize_array.__doc__ = (f"Quantises float32 ``x`` [..., n] (n % 256 == 0) to {name}: uint8 "
                              f"[..., n // 256 * type_size] of raw ggml blocks.")
    return quantize_array


# ----------------------------------------------------------------------------- the types


def _affine_k(b: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Q4_K/Q5_K: 8 sub-blocks of 32, affine with 6-bit scales/mins. -> (d, dmin, ls, lm, L)."""
    f32 = np.float32
    nb = b.shape[0]
    xn, e = _normalise(b)
    x = _subblocks(xn, 32)  # (32, nb, 8)
    av = np.sqrt(_sum(x * x) / f32(32))
    L, scales, mins = _affine_search(x, av + np.abs(x), nmax, rmin, rdelta, nstep, use_mad=False)
    L = _unsubblocks(L)  # (nb, 8, 32); scales, mins: (nb, 8)
    max_scale = np.maximum(scales.max(axis=1, keepdims=True), 0)
    max_min = np.maximum(mins.max(axis=1, keepdims=True), 0)
    ls = _rint(_div(f32(63), max_scale) * scales, 0, 63)
    lm = _rint(_div(f32(63), max_min) * mins, 0, 63)
    d = _to_f16(max_scale / f32(63), e)
    dmin = _to_f16(max_min / f32(63), e)
    # re-quantise against the stored scales, in the input's own units
    ds = (d.astype(f32) * ls)[..., None]
    dm = (dmin.astype(f32) * lm)[..., None]
    x = b.reshape(nb, 8, 32)
    L = np.where(ds != 0, _rint((x + dm) / np.where(ds != 0, ds, f32(1)), 0, nmax), L)
    return d, dmin, ls, lm, L.reshape(nb, QK_K).astype(np.uint8)


def _quantize_q4_k(b: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, L = _affine_k(b, 15, -1.0, 0.1, 20)
    q = L.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(ls, lm), qs], axis=1)


def _quantize_q5_k(b: np.ndarray) -> np.ndarray:
    d, dmin, ls, lm, L = _affine_k(b, 31, -0.5, 0.1, 15)
    q = L.reshape(-1, 8, 32)  # sub-block j: 32 values, bit 4 -> qh bit j
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    low = (q & 0xF).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k4_scales(ls, lm), qh, qs], axis=1)


def _quantize_q2_k(b: np.ndarray) -> np.ndarray:
    f32 = np.float32
    nb = b.shape[0]
    xn, e = _normalise(b)
    x = _subblocks(xn, 16)  # (16, nb, 16)
    L, scales, mins = _affine_search(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    L = _unsubblocks(L)  # (nb, 16, 16); scales, mins: (nb, 16)
    max_scale = np.maximum(scales.max(axis=1, keepdims=True), 0)
    max_min = np.maximum(mins.max(axis=1, keepdims=True), 0)
    ls = _rint(_div(f32(15), max_scale) * scales, 0, 15)
    lm = _rint(_div(f32(15), max_min) * mins, 0, 15)
    d = _to_f16(max_scale / f32(15), e)
    dmin = _to_f16(max_min / f32(15), e)
    ds = (d.astype(f32) * ls)[..., None]
    dm = (dmin.astype(f32) * lm)[..., None]
    xb = b.reshape(nb, 16, 16)
    L = np.where(ds != 0, _rint((xb + dm) / np.where(ds != 0, ds, f32(1)), 0, 3), L)
    sc = ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)
    return np.concatenate([sc, _pack_2bit(L.reshape(nb, QK_K)), _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _quantize_q3_k(b: np.ndarray) -> np.ndarray:
    f32 = np.float32
    nb = b.shape[0]
    xn, e = _normalise(b)
    L, scales = _q3_search(_subblocks(xn, 16), _eps(e))
    L = _unsubblocks(L)  # (nb, 16, 16); scales: (nb, 16), signed
    _, max_scale = _signed_absmax(scales.T)
    max_scale = max_scale[:, None]
    iscale = _div(f32(-32), max_scale)
    l6 = _rint(iscale * scales, -32, 31) + f32(32)  # 0..63, 32 <=> 0
    l6 = np.where(max_scale != 0, l6, f32(0))  # as ggml: scale bytes all zero when d is
    d = _to_f16(_div(f32(1), iscale), e)
    sc = l6 - f32(32)
    ds = (d.astype(f32) * sc)[..., None]
    xb = b.reshape(nb, 16, 16)
    L = np.where(ds != 0, _rint(xb / np.where(ds != 0, ds, f32(1)), -4, 3), L) + f32(4)  # 0..7
    L = L.reshape(nb, QK_K).astype(np.uint8)
    # value j's third bit goes to hmask[j % 32] bit j // 32
    hmask = ((L >> 2).reshape(nb, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    l6 = l6.astype(np.uint8)
    low, high = l6 & 0xF, (l6 >> 4).reshape(nb, 4, 4)
    scale_bytes = np.concatenate([
        low[:, :8] | (low[:, 8:] << 4),
        high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6),
    ], axis=1)
    return np.concatenate([hmask, _pack_2bit(L & 3), scale_bytes, _f16_bytes(d)], axis=1)


def _quantize_q6_k(b: np.ndarray) -> np.ndarray:
    f32 = np.float32
    nb = b.shape[0]
    xn, e = _normalise(b)
    L, scales = _symmetric_search(_subblocks(xn, 16), 32, _eps(e))
    L = _unsubblocks(L)  # (nb, 16, 16); scales: (nb, 16), signed
    max_abs, max_scale = _signed_absmax(scales.T)
    max_abs, max_scale = max_abs[:, None], max_scale[:, None]
    zero = max_abs < _eps(e)
    iscale = np.where(zero, f32(0), _div(f32(-128), max_scale))
    sc = _rint(iscale * scales, -128, 127)
    d = _to_f16(np.where(zero, f32(0), _div(f32(1), iscale)), e)
    ds = (d.astype(f32) * sc)[..., None]
    xb = b.reshape(nb, 16, 16)
    L = np.where(ds != 0, _rint(xb / np.where(ds != 0, ds, f32(1)), -32, 31), L) + f32(32)  # 0..63
    L = np.where(zero[..., None], f32(0), L)  # ggml zeroes such a block entirely
    q = L.reshape(nb, 2, 4, 32).astype(np.uint8)  # [chunk of 128, quarter, 32]
    lo, hi = q & 0xF, q >> 4
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2).reshape(nb, 128)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(nb, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


quantize_q2_k = _chunked(_quantize_q2_k)
quantize_q3_k = _chunked(_quantize_q3_k)
quantize_q4_k = _chunked(_quantize_q4_k)
quantize_q5_k = _chunked(_quantize_q5_k)
quantize_q6_k = _chunked(_quantize_q6_k)

#: GGUF type name -> quantiser
K_QUANTS = {"Q2_K": quantize_q2_k, "Q3_K": quantize_q3_k, "Q4_K": quantize_q4_k,
            "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(array: np.ndarray, qtype: str | GGMLQuantizationType) -> np.ndarray:
    """``gguf.quants.quantize`` that also writes the K-quants (ours; gguf-py's for the rest)."""
    kind = qtype if isinstance(qtype, GGMLQuantizationType) else GGMLQuantizationType[qtype]
    if kind.name in K_QUANTS:
        return K_QUANTS[kind.name](array)
    return _gguf_quantize(array, kind)
