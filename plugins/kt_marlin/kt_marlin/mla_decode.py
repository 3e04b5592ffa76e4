"""MLA attention over the latent cache (the absorbed form): split-K flash decoding.

Per query row ``n`` (one token ``(b, t)``) and head ``h``, with ``q_latent = q_nope @ W_UK``
already folded into latent space:

    score[s] = (q_latent[n, h] . latent[b, s] + q_rope[n, h] . k_rope[b, s]) * softmax_scale
    out[n, h] = sum_s softmax(score)[s] * latent[b, s]          for s < limits[n]

``limits[n] = min(position + 1, cache_len)`` is a device tensor: only cache slots below it
are read, so the work follows the true context while every shape stays static.

Two kernels:

1. ``_split_kernel``, grid ``(rows, head blocks, splits)``: the visible slots of a row are
   cut into ``splits`` equal runs of whole ``BLOCK_S`` blocks (computed on the device from the
   row's limit, so a short context in a long cache still spreads over every split). A program
   holds ``BLOCK_H`` heads of one row, so each latent block it loads from memory feeds all of
   them (MLA's heads share one latent, as in MQA): two dots for the scores, an online softmax
   in base 2, one dot ``p @ latent`` into an fp32 ``[BLOCK_H, R]`` accumulator. It writes the
   normalised partial output (in the query's dtype: a bf16 query rounds its output to bf16
   anyway) and its log-sum-exp (``-inf`` for an empty run). On the GPU a 16-bit query takes
   64 heads per program with 8 warps: the two dots become Hopper warpgroup MMAs (M = 64; the
   two warpgroups share the scores and each owns half of the 512 value columns), and
   DeepSeek-V3's 128 heads read each latent block twice (the second time from L2) instead
   of eight times with 16-head blocks.
2. ``_reduce_kernel``, grid ``(rows, heads, R / BLOCK_RR)``: combines the splits by their
   log-sum-exps, loading all splits of a ``BLOCK_RR`` column chunk at once.

A row with no visible slot (limit 0: a padding row of a batch bucket) gets zeros.

Registered as ``torch.ops.kt_marlin.mla_decode`` (``custom_op`` + ``register_fake``): the
number of splits is chosen on the host from shapes alone, the partial buffers have static
shapes, no host synchronisation: capture-safe and opaque to ``torch.compile``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device

_LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(ql_ptr, qr_ptr, lat_ptr, kr_ptr, lim_ptr, part_ptr, lse_ptr,
                  n_heads, rows_per_batch, scale_log2, SPLITS,
                  s_ql_n, s_ql_h, s_qr_n, s_qr_h, s_lat_b, s_lat_s, s_kr_b, s_kr_s,
                  R: tl.constexpr, DR: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DR: tl.constexpr,
                  DOT_IEEE: tl.constexpr):
    n = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    b = (n // rows_per_batch).to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    mask_h = heads < n_heads
    rr = tl.arange(0, BLOCK_R)  # [BR]
    rd = tl.arange(0, BLOCK_DR)  # [BDR]
    mask_r = rr < R  # all true when R == BLOCK_R (DeepSeek's 512 and 64)
    mask_d = rd < DR

    # this split's run of slots: whole blocks, the same count for every split of the row
    limit = tl.maximum(tl.load(lim_ptr + n).to(tl.int32), 0)
    blocks = tl.cdiv(limit, BLOCK_S)
    per_split = tl.cdiv(blocks, SPLITS)
    start = split * per_split * BLOCK_S
    end = tl.minimum(start + per_split * BLOCK_S, limit)

    ql = tl.load(ql_ptr + n.to(tl.int64) * s_ql_n + heads[:, None] * s_ql_h + rr[None, :],
                 mask=mask_h[:, None] & mask_r[None, :], other=0)  # [BH, BR]
    qr = tl.load(qr_ptr + n.to(tl.int64) * s_qr_n + heads[:, None] * s_qr_h + rd[None, :],
                 mask=mask_h[:, None] & mask_d[None, :], other=0)  # [BH, BDR]
    if DOT_IEEE:
        ql = ql.to(tl.float32)
        qr = qr.to(tl.float32)
    lat_base = lat_ptr + b * s_lat_b
    kr_base = kr_ptr + b * s_kr_b

    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_R), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)  # [BS]
        mask_s = s < end
        lat = tl.load(lat_base + s[:, None].to(tl.int64) * s_lat_s + rr[None, :],
                      mask=mask_s[:, None] & mask_r[None, :], other=0).to(ql.dtype)  # [BS, BR]
        kr = tl.load(kr_base + s[:, None].to(tl.int64) * s_kr_s + rd[None, :],
                     mask=mask_s[:, None] & mask_d[None, :], other=0).to(qr.dtype)  # [BS, BDR]
        # each dot accumulates into its third operand in place (a separate add would hold a
        # second [BH, BR] fp32 tile in registers)
        if DOT_IEEE:
            score = tl.dot(ql, tl.trans(lat), tl.dot(qr, tl.trans(kr), input_precision="ieee"), input_precision="ieee")
        else:
            score = tl.dot(ql, tl.trans(lat), tl.dot(qr, tl.trans(kr)))  # [BH, BS] fp32
        score = tl.where(mask_s[None, :], score * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=1))  # [BH]
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(score - m_new[:, None])  # [BH, BS]
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_IEEE:
            acc = tl.dot(p, lat, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(p.to(lat.dtype), lat, acc * alpha[:, None])  # [BH, BR]
        m = m_new

    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))  # base 2
    row_head = n.to(tl.int64) * n_heads + heads  # [BH]
    tl.store(part_ptr + (row_head[:, None] * SPLITS + split) * R + rr[None, :], out.to(part_ptr.dtype.element_ty),
             mask=mask_h[:, None] & mask_r[None, :])
    tl.store(lse_ptr + row_head * SPLITS + split, lse, mask=mask_h)


@triton.jit
def _reduce_kernel(part_ptr, lse_ptr, out_ptr, n_heads, SPLITS, s_out_n, s_out_h,
                   R: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_RR: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)
    rr = tl.program_id(2) * BLOCK_RR + tl.arange(0, BLOCK_RR)  # [BRR]
    row_head = n.to(tl.int64) * n_heads + h
    sp = tl.arange(0, BLOCK_SPLITS)  # [BSP]
    mask_sp = sp < SPLITS
    mask_r = rr < R
    lse = tl.load(lse_ptr + row_head * SPLITS + sp, mask=mask_sp, other=float("-inf"))  # [BSP]
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # empty splits weigh 0
    total = tl.sum(w, axis=0)
    part = tl.load(part_ptr + (row_head * SPLITS + sp[:, None]) * R + rr[None, :],
                   mask=mask_sp[:, None] & mask_r[None, :], other=0).to(tl.float32)  # [BSP, BRR]
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)  # [BRR]
    tl.store(out_ptr + n.to(tl.int64) * s_out_n + h * s_out_h + rr, out.to(out_ptr.dtype.element_ty), mask=mask_r)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(rows: int, n_heads: int, max_len: int, device: torch.device, q_element_size: int = 2) -> dict:
    """Tile sizes and the split count for one call, from shapes only (capture-safe)."""
    if device.type != "cuda":  # Triton's interpreter: small tiles, a few splits to exercise the reduce
        return dict(BLOCK_H=16, BLOCK_S=16, SPLITS=max(1, min(3, triton.cdiv(max_len, 16))), num_warps=4, num_stages=1)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if q_element_size <= 2 and n_heads >= 64:
        # warpgroup MMAs (M = 64 heads), the [64, 512] fp32 accumulator over 256 threads;
        # shared memory (q 72 KiB + 2 stages of 72 KiB) fits one program per SM. BLOCK_S 64
        # was the fastest of the H200 sweep (bench/results/nvidia-h200_bench_mla.md)
        block_h, block_s, warps, per_sm = 64, 64, 8, 1
    else:  # fp32 (twice the bytes per tile) or few heads: 16-head blocks
        block_h, block_s, warps, per_sm = 16, (32 if q_element_size <= 2 else 16), 4, 2
    programs = rows * triton.cdiv(n_heads, block_h)
    # one wave of programs, no split shorter than a block of the static cache
    splits = max(1, min(triton.cdiv(per_sm * sms, programs), max_len // block_s, 128))
    return dict(BLOCK_H=block_h, BLOCK_S=block_s, SPLITS=splits, num_warps=warps, num_stages=2)


def launch(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
           limits: torch.Tensor, rows_per_batch: int, softmax_scale: float, config: dict | None = None) -> torch.Tensor:
    """q_latent: [N, nH, R], q_rope: [N, nH, Dr] (channels contiguous); latent: [Bc, S, R],
    k_rope: [Bc, S, Dr]; limits: [N] int; row n reads cache row ``n // rows_per_batch``.
    Returns [N, nH, R] in q_latent's dtype."""
    n, n_heads, r = q_latent.shape
    dr = q_rope.shape[-1]
    out = torch.empty((n, n_heads, r), dtype=q_latent.dtype, device=q_latent.device)
    if n == 0:
        return out
    cfg = dict(config or choose_config(n, n_heads, latent.shape[1], q_latent.device, q_latent.element_size()))
    splits = cfg.pop("SPLITS")
    part = torch.empty((n, n_heads, splits, r), dtype=q_latent.dtype, device=q_latent.device)
    lse = torch.empty((n, n_heads, splits), dtype=torch.float32, device=q_latent.device)
    block_r, block_dr = max(16, triton.next_power_of_2(r)), max(16, triton.next_power_of_2(dr))  # tl.dot: >= 16
    block_splits = triton.next_power_of_2(splits)
    block_rr = min(block_r, max(32, 8192 // block_splits))  # the reduce's [splits, BLOCK_RR] tile: <= 8192 values
    dot_ieee = q_latent.dtype == torch.float32 or q_latent.device.type == "cpu"
    with on_device(q_latent):
        _split_kernel[(n, triton.cdiv(n_heads, cfg["BLOCK_H"]), splits)](
            q_latent, q_rope, latent, k_rope, limits, part, lse,
            n_heads, rows_per_batch, softmax_scale * _LOG2E, splits,
            q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
            latent.stride(0), latent.stride(1), k_rope.stride(0), k_rope.stride(1),
            R=r, DR=dr, BLOCK_R=block_r, BLOCK_DR=block_dr, DOT_IEEE=dot_ieee, **cfg)
        _reduce_kernel[(n, n_heads, triton.cdiv(r, block_rr))](
            part, lse, out, n_heads, splits, out.stride(0), out.stride(1),
            R=r, BLOCK_SPLITS=block_splits, BLOCK_RR=block_rr, num_warps=4)
    return out


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("kt_marlin::mla_decode", mutates_args=())
def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
               limits: torch.Tensor, rows_per_batch: int, softmax_scale: float) -> torch.Tensor:
    """Attention of query rows [N, nH, *] over the latent cache; see the module docstring."""
    return launch(_channels_contiguous(q_latent), _channels_contiguous(q_rope), _channels_contiguous(latent),
                  _channels_contiguous(k_rope), limits.contiguous(), rows_per_batch, softmax_scale)


@mla_decode.register_fake
def _(q_latent, q_rope, latent, k_rope, limits, rows_per_batch, softmax_scale):
    return q_latent.new_empty(q_latent.shape)
