"""GQA decode attention over the static KV cache, reading only the visible slots: split-K
flash decoding in Triton.

One query token per row ``b`` (decode, ``T == 1``); query head ``h`` uses K/V head
``h // G`` (``G = nH // nKV``, transformers' ``repeat_kv``):

    score[h, s] = (q[b, h] . k[b, s, h // G]) * softmax_scale
    out[b, h] = sum_s softmax(score[h])[s] * v[b, s, h // G]        for s < limits[b]

``limits[b] = min(positions[b] + 1, cache_lens[b], S)`` is computed on the device from the
position and length tensors: only cache slots below it are read, so the work follows the
true context while every shape stays static.

Two kernels:

1. ``_split_kernel``, grid ``(rows, K/V heads, splits)``: the visible slots of a row are cut
   into ``splits`` equal runs of whole ``BLOCK_S`` blocks (computed on the device from the
   row's limit, so a short context in a long cache still spreads over every split). A program
   holds the ``G`` query heads of one K/V head (padded to ``BLOCK_G >= 16`` rows for
   ``tl.dot``), so each K/V block it loads feeds all of them: one dot for the scores, an
   online softmax in base 2, one dot ``p @ v`` into an fp32 ``[BLOCK_G, D]`` accumulator. It
   writes the normalised partial output and its log-sum-exp (``-inf`` for an empty run; the
   partial output of an empty run is not written and never read).
2. ``_reduce_kernel``, grid ``(rows, query heads)``: combines the splits by their
   log-sum-exps in one ``[splits, D]`` tile.

A row with no visible slot (limit 0: a padding row of a batch bucket) gets zeros; the torch
path gives the mean of all values there (its mask leaves a uniform softmax). Both are finite,
and such rows are discarded by the caller.

The kernels call no ``@triton.jit`` function of Triton's standard library (``tl.sum``,
``tl.max``, ``tl.cdiv``, ``tl.zeros``): reductions go through ``tl.reduce`` with the combine
functions below, which compiles to the same code. Triton's interpreter cannot call a
standard-library function that was decorated before ``TRITON_INTERPRET`` was set (Triton
imported earlier in the process), so this keeps the interpreter tests independent of import
order.

Registered as ``torch.ops.ktcore.gqa_decode`` (``custom_op`` + ``register_fake``) when this
module is imported (``ktcore.ops.gqa`` imports it on its CUDA decode path only: it needs
triton). The number of splits comes from shapes alone, the partial buffers have static
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
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, len_ptr, part_ptr, lse_ptr,
                  group, n_heads, max_len, scale_log2,
                  s_q_b, s_q_h, s_k_b, s_k_s, s_k_h, s_v_b, s_v_s, s_v_h, s_pos, s_len,
                  D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_IEEE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, BLOCK_G)  # [BG]
    heads = kv_head * group + g  # [BG]: query heads of this K/V head
    mask_g = g < group
    dd = tl.arange(0, BLOCK_D)  # [BD]
    mask_d = dd < D

    # visible slots [0, limit) of the row, cut into SPLITS runs of the same number of blocks
    limit = tl.minimum(tl.load(pos_ptr + b * s_pos) + 1, tl.load(len_ptr + b * s_len))
    limit = tl.maximum(tl.minimum(limit, max_len), 0).to(tl.int32)
    blocks = (limit + BLOCK_S - 1) // BLOCK_S
    per_split = (blocks + SPLITS - 1) // SPLITS
    start = split * per_split * BLOCK_S
    end = tl.minimum(start + per_split * BLOCK_S, limit)

    q = tl.load(q_ptr + b * s_q_b + heads[:, None] * s_q_h + dd[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0)  # [BG, BD]
    if DOT_IEEE:
        q = q.to(tl.float32)
    k_base = k_ptr + b * s_k_b + kv_head * s_k_h
    v_base = v_ptr + b * s_v_b + kv_head * s_v_h

    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.full((BLOCK_G,), 0.0, dtype=tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)  # [BS]
        mask_s = s < end
        mask_sd = mask_s[:, None] & mask_d[None, :]
        k = tl.load(k_base + s[:, None].to(tl.int64) * s_k_s + dd[None, :], mask=mask_sd, other=0).to(q.dtype)
        v = tl.load(v_base + s[:, None].to(tl.int64) * s_v_s + dd[None, :], mask=mask_sd, other=0).to(q.dtype)
        if DOT_IEEE:  # k, v: [BS, BD]
            score = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            score = tl.dot(q, tl.trans(k))  # [BG, BS] fp32
        score = tl.where(mask_s[None, :], score * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.reduce(score, 1, _maximum))  # [BG]
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(score - m_new[:, None])  # [BG, BS]
        l = l * alpha + tl.reduce(p, 1, _add)
        if DOT_IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # [BG, BD]
        m = m_new

    has = l > 0  # [BG]: false for every head of an empty run
    out = acc / tl.where(has, l, 1.0)[:, None]
    lse = tl.where(has, m + tl.log2(tl.where(has, l, 1.0)), float("-inf"))  # base 2
    row_head = b * n_heads + heads  # [BG]
    tl.store(part_ptr + (row_head[:, None] * SPLITS + split) * D + dd[None, :], out,
             mask=(mask_g & has)[:, None] & mask_d[None, :])
    tl.store(lse_ptr + row_head * SPLITS + split, lse, mask=mask_g)


@triton.jit
def _reduce_kernel(part_ptr, lse_ptr, out_ptr, n_heads, s_out_b, s_out_h,
                   D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row_head = b * n_heads + h
    sp = tl.arange(0, BLOCK_SPLITS)  # [BSP]
    dd = tl.arange(0, BLOCK_D)  # [BD]
    lse = tl.load(lse_ptr + row_head * SPLITS + sp, mask=sp < SPLITS, other=float("-inf"))  # [BSP]
    top = tl.reduce(lse, 0, _maximum)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp2(lse - top)  # [BSP]: empty splits weigh 0
    total = tl.reduce(w, 0, _add)
    part = tl.load(part_ptr + (row_head * SPLITS + sp[:, None]) * D + dd[None, :],
                   mask=(lse > float("-inf"))[:, None] & (dd < D)[None, :], other=0)  # [BSP, BD]
    out = tl.reduce(w[:, None] * part, 0, _add) / tl.where(total > 0, total, 1.0)  # [BD]
    tl.store(out_ptr + b * s_out_b + h * s_out_h + dd, out.to(out_ptr.dtype.element_ty), mask=dd < D)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_config(rows: int, n_kv_heads: int, max_len: int, device: torch.device, cache_element_size: int = 2) -> dict:
    """Tile sizes and the split count for one call, from shapes only (capture-safe)."""
    if device.type != "cuda":  # Triton's interpreter: small tiles, a few splits to exercise the reduce
        return dict(BLOCK_S=16, SPLITS=max(1, min(3, triton.cdiv(max_len, 16))), num_warps=4, num_stages=1)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    # fp32 caches are twice the bytes: halve BLOCK_S to keep the pipelined K/V tiles in shared memory
    block_s = 64 if cache_element_size <= 2 else 32
    programs = rows * n_kv_heads
    # enough programs for ~2 waves, but no split shorter than 128 slots of the static cache: a
    # split writes G * D fp32 partials per K/V head (4 KiB for G = 8, D = 128), a sixteenth of
    # what 128 slots of bf16 K and V weigh
    splits = max(1, min(triton.cdiv(2 * sms, programs), max_len // 128, 64))
    return dict(BLOCK_S=block_s, SPLITS=splits, num_warps=4, num_stages=2)


def launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
           cache_lens: torch.Tensor, softmax_scale: float, config: dict | None = None) -> torch.Tensor:
    """q: [B, nH, D] (channels contiguous); k_cache, v_cache: [Bc >= B, S, nKV, D] (channels
    contiguous; row b reads cache row b); positions, cache_lens: [B] int.
    Returns [B, nH, D] in q's dtype."""
    batch, n_heads, head_dim = q.shape
    max_len, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    cfg = dict(config or choose_config(batch, n_kv, max_len, q.device, k_cache.element_size()))
    splits = cfg.pop("SPLITS")
    part = torch.empty((batch, n_heads, splits, head_dim), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, n_heads, splits), dtype=torch.float32, device=q.device)
    block_g, block_d = max(16, triton.next_power_of_2(group)), max(16, triton.next_power_of_2(head_dim))  # tl.dot: >= 16
    dot_ieee = q.dtype == torch.float32 or q.device.type == "cpu"
    with on_device(q):
        _split_kernel[(batch, n_kv, splits)](
            q, k_cache, v_cache, positions, cache_lens, part, lse,
            group, n_heads, max_len, softmax_scale * _LOG2E,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), positions.stride(0), cache_lens.stride(0),
            D=head_dim, SPLITS=splits, BLOCK_G=block_g, BLOCK_D=block_d, DOT_IEEE=dot_ieee, **cfg)
        _reduce_kernel[(batch, n_heads)](
            part, lse, out, n_heads, out.stride(0), out.stride(1),
            D=head_dim, SPLITS=splits, BLOCK_SPLITS=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4)
    return out


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
           cache_lens: torch.Tensor) -> None:
    """Shape checks on the host (shapes only: no synchronisation)."""
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"gqa_decode: q must be [B, nH, D] and k/v caches [Bc, S, nKV, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    batch, n_heads, head_dim = q.shape
    if k_cache.shape[3] != head_dim or n_heads % k_cache.shape[2] or k_cache.shape[0] < batch:
        raise ValueError(f"gqa_decode: q {tuple(q.shape)} does not fit the caches {tuple(k_cache.shape)}")
    if positions.shape != (batch,) or cache_lens.shape != (batch,):
        raise ValueError(f"gqa_decode: positions and cache_lens must be [{batch}], got "
                         f"{tuple(positions.shape)}, {tuple(cache_lens.shape)}")


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("ktcore::gqa_decode", mutates_args=())
def gqa_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
               cache_lens: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Decode attention of q [B, nH, D] over the caches [Bc, S, nKV, D]; see the module docstring."""
    _check(q, k_cache, v_cache, positions, cache_lens)
    return launch(_channels_contiguous(q), _channels_contiguous(k_cache), _channels_contiguous(v_cache),
                  positions, cache_lens, softmax_scale)


@gqa_decode.register_fake
def _(q, k_cache, v_cache, positions, cache_lens, softmax_scale):
    _check(q, k_cache, v_cache, positions, cache_lens)
    return q.new_empty(q.shape)
