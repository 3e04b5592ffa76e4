"""The GQA decode step over the static KV cache in one Triton kernel: the new token's q/k
norm and RoPE, its K and V written to the cache, and split-K flash decoding over the visible
slots, the splits combined by the last program to finish.

One new token per row ``b`` (decode, ``T == 1``), its raw projections ``q [B, nH, D]``,
``k, v [B, nKV, D]``. What the torch path of ``GQAAttention`` does in five or more kernels:

    q, k = q_norm(q), k_norm(k)                 when the family has them (Qwen3)
    q, k = rope(q, k, positions)                 half-split, the first R channels
    k_cache[b, pos[b]], v_cache[b, pos[b]] = k, v          when 0 <= pos[b] < S
    score[h, s] = (q[b, h] . k_cache[b, s, h // G]) * softmax_scale
    out[b, h] = sum_s softmax(score[h])[s] * v_cache[b, s, h // G]        for s < limits[b]

with the torch path's roundings (the norm's normalised value and its product with the weight,
then RoPE's output, in q's dtype; the cache's dtype for what is written). Query head ``h``
uses K/V head ``h // G`` (``G = nH // nKV``, transformers' ``repeat_kv``).
``limits[b] = min(positions[b] + 1, cache_lens[b], S)`` is computed on the device: only cache
slots below it are read, so the work follows the true context while every shape stays static.

Grid ``(rows, K/V heads, splits)``: the visible slots of a row are cut into at most ``splits``
equal runs of whole ``BLOCK_S`` blocks, each at least ``MIN_BLOCKS`` long (computed on the
device from the row's limit, so a long context in a long cache spreads over every split and a
short one stays in split 0). A program prepares the ``G`` query heads of its K/V head (padded
to ``BLOCK_G >= 16`` rows for ``tl.dot``) and that head's new K/V row. Each K/V block feeds all
``G`` heads: one dot for the scores, an online softmax in base 2, one dot ``p @ v`` into an
fp32 ``[BLOCK_G, D]`` accumulator. The new token's slot is masked out of the blocks and the
program whose run holds it adds it from registers after the loop, one more step of the online
softmax; split 0 writes the new row into the cache after its loop, so no program reads a slot
another writes.

When one run holds every visible slot, split 0 writes the output. Otherwise each program
writes its normalised partial output and log-sum-exp (``-inf`` for an empty run) to scratch,
then adds one to the (row, K/V head) counter (acq_rel, GPU scope); the program that sees
``splits - 1`` is the last: it reads the non-empty runs' log-sum-exps back past L1 as one
tile, then their partials ``CHUNK`` runs a load, combines them and sets the counter back to 0,
so every launch (and CUDA-graph replay) finds it at 0. ``counters`` is an int32 ``[Bc, nKV]``
buffer of the cache (``KVCache.split_counters``): two launches over one cache must not run
concurrently.

A row with no visible slot (limit 0: a padding row of a batch bucket) gets zeros; the torch
path gives the mean of all values there (its mask leaves a uniform softmax). Both are finite,
and such rows are discarded by the caller. Positions beyond the RoPE table are clamped to its
last row (the torch path raises an indexing error).

The kernels call no ``@triton.jit`` function of Triton's standard library (``tl.sum``,
``tl.max``, ``tl.cdiv``, ``tl.zeros``): reductions go through ``tl.reduce`` with the combine
functions below, which compiles to the same code. Triton's interpreter cannot call a
standard-library function that was decorated before ``TRITON_INTERPRET`` was set (Triton
imported earlier in the process), so this keeps the interpreter tests independent of import
order.

Registered as ``torch.ops.ktcore.gqa_decode`` (``custom_op`` mutating the two caches, with a
fake) when this module is imported (``ktcore.ops.gqa`` imports it on its CUDA decode path
only: it needs triton). The number of splits comes from shapes alone, the scratch buffers
have static shapes, no host synchronisation: capture-safe and opaque to ``torch.compile``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device

_LOG2E = 1.4426950408889634


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _prepared(rows_ptr, mask_r, dd, w_ptr, cos_ptr, sin_ptr, eps,
              D: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, dtype: tl.constexpr):
    """Rows ``rows_ptr [R]`` (pointers to channel 0) of a new token's q or k: RMS-normed over
    D with the weight ``w_ptr`` when NORM, then rotated by RoPE (cos/sin ``[HALF]``) on the first
    ``2 * HALF`` channels (pairs (i, i + HALF)); rounded as the torch path rounds. fp32 [R, BD]."""
    mask_d = dd < D
    mask = mask_r[:, None] & mask_d[None, :]
    x = tl.load(rows_ptr[:, None] + dd[None, :], mask=mask, other=0).to(tl.float32)  # [R, BD]
    rot = dd < 2 * HALF
    partner = tl.where(dd < HALF, dd + HALF, dd - HALF)  # [BD]: the other channel of the pair
    if HALF > 0:
        xp = tl.load(rows_ptr[:, None] + partner[None, :], mask=mask & rot[None, :], other=0).to(tl.float32)
    if NORM:  # transformers: weight * (x * rsqrt(mean(x^2) + eps)).to(dtype), in dtype
        rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 1, _add) / D + eps)  # [R]
        w = tl.load(w_ptr + dd, mask=mask_d, other=0).to(tl.float32)
        x = (w[None, :] * (x * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        if HALF > 0:
            wp = tl.load(w_ptr + partner, mask=rot, other=0).to(tl.float32)
            xp = (wp[None, :] * (xp * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    if HALF > 0:  # x1 cos - x2 sin | x2 cos + x1 sin, in fp32
        j = tl.where(dd < HALF, dd, dd - HALF)
        cos = tl.load(cos_ptr + j, mask=rot, other=1.0).to(tl.float32)  # [BD]
        sin = tl.load(sin_ptr + j, mask=rot, other=0.0).to(tl.float32)
        sign = tl.where(dd < HALF, -1.0, 1.0)
        x = tl.where(rot[None, :], x * cos[None, :] + sign[None, :] * xp * sin[None, :], x)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, count_ptr, pos_ptr, len_ptr,
                   qw_ptr, kw_ptr, cos_ptr, sin_ptr, part_ptr, lse_ptr, out_ptr,
                   group, n_heads, n_kv, max_len, cs_rows, scale_log2, eps,
                   s_q_b, s_q_h, s_k_b, s_k_h, s_v_b, s_v_h, s_kc_b, s_kc_s, s_kc_h, s_vc_b, s_vc_s, s_vc_h,
                   s_count, s_pos, s_len, s_cs, s_out_b, s_out_h,
                   D: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr, CS_BY_POSITION: tl.constexpr,
                   SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, MIN_BLOCKS: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)  # [BG]
    heads = kv_head * group + g  # [BG]: query heads of this K/V head
    mask_g = g < group
    dd = tl.arange(0, BLOCK_D)  # [BD]
    mask_d = dd < D
    dtype = q_ptr.dtype.element_ty
    if DOT_IEEE:
        dot_dtype = tl.float32
    else:
        dot_dtype = dtype

    pos = tl.load(pos_ptr + b * s_pos)
    if CS_BY_POSITION:  # this row's cos/sin
        cs = tl.maximum(tl.minimum(pos, cs_rows - 1), 0) * s_cs
    else:
        cs = b * s_cs
    q = _prepared(q_ptr + b * s_q_b + heads * s_q_h, mask_g, dd, qw_ptr, cos_ptr + cs, sin_ptr + cs, eps,
                  D, HALF, NORM, dtype).to(dot_dtype)  # [BG, BD]
    one = tl.arange(0, 1)
    k_new = _prepared(k_ptr + b * s_k_b + kv_head * s_k_h + one, one == 0, dd, kw_ptr, cos_ptr + cs, sin_ptr + cs,
                      eps, D, HALF, NORM, dtype)  # [1, BD]
    v_new = tl.load(v_ptr + b * s_v_b + kv_head * s_v_h + dd[None, :], mask=mask_d[None, :], other=0)  # [1, BD]
    k_base = kc_ptr + b * s_kc_b + kv_head * s_kc_h
    v_base = vc_ptr + b * s_vc_b + kv_head * s_vc_h
    k_new = k_new.to(kc_ptr.dtype.element_ty)  # as the cache holds it
    v_new = v_new.to(vc_ptr.dtype.element_ty)

    # visible slots [0, limit) of the row, cut into SPLITS runs of the same number of blocks
    limit = tl.minimum(pos + 1, tl.load(len_ptr + b * s_len))
    limit = tl.maximum(tl.minimum(limit, max_len), 0).to(tl.int32)
    blocks = (limit + BLOCK_S - 1) // BLOCK_S
    per_split = tl.maximum((blocks + SPLITS - 1) // SPLITS, MIN_BLOCKS)
    used = (blocks + per_split - 1) // per_split  # splits with a non-empty run
    start = split * per_split * BLOCK_S
    end = tl.minimum(start + per_split * BLOCK_S, limit)

    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.full((BLOCK_G,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)  # [BS]
        mask_s = s < end
        mask_sd = mask_s[:, None] & mask_d[None, :]
        k = tl.load(k_base + s[:, None].to(tl.int64) * s_kc_s + dd[None, :], mask=mask_sd, other=0).to(dot_dtype)
        v = tl.load(v_base + s[:, None].to(tl.int64) * s_vc_s + dd[None, :], mask=mask_sd, other=0).to(dot_dtype)
        if DOT_IEEE:  # k, v: [BS, BD]
            score = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            score = tl.dot(q, tl.trans(k))  # [BG, BS] fp32
        # the new token's slot may not be written yet: it comes from registers below
        score = tl.where((mask_s & (s != pos))[None, :], score * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(score, 1, _maximum))  # [BG]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of the new slot alone: all masked
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(score - m_safe[:, None])  # [BG, BS]
        l = l * alpha + tl.reduce(p, 1, _add)
        if DOT_IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # [BG, BD]
        m = m_new
    if (pos >= start) & (pos < end):  # this run holds the new token's slot
        score = tl.reduce(q.to(tl.float32) * k_new.to(tl.float32), 1, _add) * scale_log2  # [BG]
        m_new = tl.maximum(m, score)
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(score - m_new)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)
        m = m_new
    if (split == 0) & (pos >= 0) & (pos < max_len):  # after the loop: it never reads the slot
        tl.store(k_base + pos * s_kc_s + dd[None, :], k_new, mask=mask_d[None, :])
        tl.store(v_base + pos * s_vc_s + dd[None, :], v_new, mask=mask_d[None, :])

    has = l > 0  # [BG]: false for every head of an empty run
    out = acc / tl.where(has, l, 1.0)[:, None]
    out_ptrs = out_ptr + b * s_out_b + heads[:, None] * s_out_h + dd[None, :]
    mask_out = mask_g[:, None] & mask_d[None, :]
    if used <= 1:  # split 0 holds every visible slot (or none): its output is the answer
        if split == 0:
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))  # base 2
        row_head = b * n_heads + heads  # [BG]
        tl.store(part_ptr + (row_head[:, None] * SPLITS + split) * D + dd[None, :], out,
                 mask=(mask_g & has)[:, None] & mask_d[None, :])
        tl.store(lse_ptr + row_head * SPLITS + split, lse, mask=mask_g)
        tl.debug_barrier()  # every thread's partials are stored before the release below
        counter = count_ptr + b * s_count + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:  # the last of the row's head
            sp = tl.arange(0, SPLITS_PAD)  # [SP]: all log-sum-exps in one tile, then the weights
            lse_at = lse_ptr + row_head[:, None] * SPLITS + sp[None, :]  # [BG, SP]
            lse_all = tl.load(lse_at, mask=mask_g[:, None] & (sp < used)[None, :], other=float("-inf"),
                              cache_modifier=".cg")
            top = tl.reduce(lse_all, 1, _maximum)  # [BG]
            top = tl.where(top == float("-inf"), 0.0, top)
            l = tl.reduce(tl.exp2(lse_all - top[:, None]), 1, _add)  # [BG]
            acc = tl.full((BLOCK_G, BLOCK_D), 0.0, dtype=tl.float32)
            for c0 in range(0, used, CHUNK):  # CHUNK splits' partials a load: [BG, CHUNK, BD]
                c = c0 + tl.arange(0, CHUNK)  # [C]
                lse_c = tl.load(lse_ptr + row_head[:, None] * SPLITS + c[None, :],
                                mask=mask_g[:, None] & (c < used)[None, :], other=float("-inf"), cache_modifier=".cg")
                w = tl.exp2(lse_c - top[:, None])  # [BG, C]: empty splits weigh 0
                part = tl.load(part_ptr + ((row_head[:, None, None] * SPLITS + c[None, :, None]) * D
                                           + dd[None, None, :]),
                               mask=(lse_c > float("-inf"))[:, :, None] & mask_d[None, None, :], other=0,
                               cache_modifier=".cg")  # [BG, C, BD]
                acc += tl.reduce(w[:, :, None] * part, 1, _add)
            out = acc / tl.where(l > 0, l, 1.0)[:, None]
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_out)
            tl.atomic_xchg(counter, 0)  # ready for the next launch (or graph replay)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(rows: int, n_kv_heads: int, max_len: int, device: torch.device, cache_element_size: int = 2) -> dict:
    """Tile sizes and the split count for one call, from shapes only (capture-safe)."""
    if device.type != "cuda":  # Triton's interpreter: small tiles, a few splits to exercise the combine
        return dict(BLOCK_S=16, SPLITS=max(1, min(3, triton.cdiv(max_len, 16))), num_warps=4, num_stages=1)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # fp32 caches are twice the bytes: halve BLOCK_S to keep the pipelined K/V tiles in shared memory
    block_s = 64 if cache_element_size <= 2 else 32
    programs = rows * n_kv_heads
    # enough programs for ~2 waves, but no split shorter than 128 slots of the static cache: a
    # split writes G * D fp32 partials per K/V head (4 KiB for G = 8, D = 128), a sixteenth of
    # what 128 slots of bf16 K and V weigh
    splits = max(1, min(triton.cdiv(2 * sms, programs), max_len // 128, 64))
    # runs of at least 128 slots: a context that short is one program's (no partials, no combine);
    # 8 warps: 1.2-1.7x faster than 4 at Qwen3's shape on the H200 (bench/results/README.md, session 11)
    return dict(BLOCK_S=block_s, SPLITS=splits, MIN_BLOCKS=max(1, 128 // block_s), num_warps=8, num_stages=2)


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           counters: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
           q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, cos: torch.Tensor | None,
           sin: torch.Tensor | None, cos_by_position: bool, eps: float, softmax_scale: float,
           config: dict | None = None) -> torch.Tensor:
    """q: [B, nH, D], k, v: [B, nKV, D] (channels contiguous); k_cache, v_cache: [Bc >= B, S,
    nKV, D] (channels contiguous; row b is cache row b); counters: int32 [Bc, nKV] at 0;
    positions, cache_lens: [B] int; q_norm, k_norm: [D] or None; cos, sin: [P, R/2] fp32 (rows
    by position when ``cos_by_position``, else by batch row) or None. Returns [B, nH, D] in
    q's dtype; writes the new K/V into the caches."""
    batch, n_heads, head_dim = q.shape
    max_len, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    cfg = dict(config or choose_config(batch, n_kv, max_len, q.device, k_cache.element_size()))
    splits, min_blocks = cfg.pop("SPLITS"), cfg.pop("MIN_BLOCKS", 1)
    part = torch.empty((batch, n_heads, splits, head_dim), dtype=torch.float32, device=q.device)  # unused if 1
    lse = torch.empty((batch, n_heads, splits), dtype=torch.float32, device=q.device)
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))  # tl.dot: >= 16
    dot_ieee = q.dtype == torch.float32 or q.device.type == "cpu"
    half = 0 if cos is None else cos.shape[-1]
    with on_device(q):
        _decode_kernel[(batch, n_kv, splits)](
            q, k, v, k_cache, v_cache, counters, positions, cache_lens,
            q if q_norm is None else q_norm, k if k_norm is None else k_norm,
            q if cos is None else cos, q if sin is None else sin, part, lse, out,
            group, n_heads, n_kv, max_len, 1 if cos is None else cos.shape[0], softmax_scale * _LOG2E, eps,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), counters.stride(0), positions.stride(0), cache_lens.stride(0),
            0 if cos is None else cos.stride(0), out.stride(0), out.stride(1),
            D=head_dim, HALF=half, NORM=q_norm is not None, CS_BY_POSITION=cos_by_position, SPLITS=splits,
            SPLITS_PAD=triton.next_power_of_2(splits), MIN_BLOCKS=min_blocks, CHUNK=min(4, triton.next_power_of_2(splits)),
            BLOCK_G=block_g, BLOCK_D=block_d, DOT_IEEE=dot_ieee, **cfg)
    return out


def _check(q, k, v, k_cache, v_cache, counters, positions, cache_lens, q_norm, k_norm, cos, sin) -> None:
    """Shape checks on the host (shapes only: no synchronisation)."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"gqa_decode: q must be [B, nH, D] and k/v caches [Bc, S, nKV, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or n_heads % n_kv or k_cache.shape[0] < batch:
        raise ValueError(f"gqa_decode: q {tuple(q.shape)} does not fit the caches {tuple(k_cache.shape)}")
    if k.shape != (batch, n_kv, head_dim) or v.shape != k.shape:
        raise ValueError(f"gqa_decode: the new k and v must be [{batch}, {n_kv}, {head_dim}], got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if counters.dtype != torch.int32 or counters.shape != (k_cache.shape[0], n_kv):
        raise ValueError(f"gqa_decode: counters must be int32 [{k_cache.shape[0]}, {n_kv}], got "
                         f"{counters.dtype} {tuple(counters.shape)}")
    if positions.shape != (batch,) or cache_lens.shape != (batch,):
        raise ValueError(f"gqa_decode: positions and cache_lens must be [{batch}], got "
                         f"{tuple(positions.shape)}, {tuple(cache_lens.shape)}")
    if (q_norm is None) != (k_norm is None) or any(w is not None and w.shape != (head_dim,) for w in (q_norm, k_norm)):
        raise ValueError(f"gqa_decode: q_norm and k_norm must both be [{head_dim}] or both None")
    if (cos is None) != (sin is None) or (cos is not None and (cos.dim() != 2 or sin.shape != cos.shape
                                                               or 2 * cos.shape[1] > head_dim)):
        raise ValueError(f"gqa_decode: cos and sin must both be [P, R/2] with R <= {head_dim}, or both None")


def _channels_contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("ktcore::gqa_decode", mutates_args=("k_cache", "v_cache"))
def gqa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               counters: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
               q_norm: Optional[torch.Tensor], k_norm: Optional[torch.Tensor], cos: Optional[torch.Tensor],
               sin: Optional[torch.Tensor], cos_by_position: bool, eps: float, softmax_scale: float) -> torch.Tensor:
    """One decode step of GQA attention for the new token's raw q [B, nH, D], k, v [B, nKV, D]
    over the caches [Bc, S, nKV, D]; see the module docstring. ``counters`` is written during
    the launch and is back at 0 when it ends."""
    _check(q, k, v, k_cache, v_cache, counters, positions, cache_lens, q_norm, k_norm, cos, sin)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("gqa_decode: the caches' channels must be contiguous (they are written in place)")
    return launch(*map(_channels_contiguous, (q, k, v)), k_cache, v_cache, counters, positions, cache_lens,
                  *map(_channels_contiguous, (q_norm, k_norm, cos, sin)), cos_by_position, eps, softmax_scale)


@gqa_decode.register_fake
def _(q, k, v, k_cache, v_cache, counters, positions, cache_lens, q_norm, k_norm, cos, sin, cos_by_position, eps,
      softmax_scale):
    _check(q, k, v, k_cache, v_cache, counters, positions, cache_lens, q_norm, k_norm, cos, sin)
    return q.new_empty(q.shape)
