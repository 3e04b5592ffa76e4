"""MLA prefill attention over decompressed K/V: a causal flash-attention kernel.

Prefill decompresses the valid part of the latent cache once (``kv = kv_b_proj(latent)``,
per head ``k_nope`` and ``v``) and attends in the 192-channel (``Dn + Dr``) head space,
which for long prompts costs far fewer FLOPs than the 576-channel absorbed form. The shared
rope key is read from the cache as it is (never expanded over heads):

    score[b, h, t, s] = (q_nope[b, t, h] . k_nope[b, s, h] + q_rope[b, t, h] . k_rope[b, s]) * scale
    out[b, t, h] = sum_s softmax(score)[s] * v[b, s, h]          for s < limits[b, t]

with ``limits[b, t] = min(position + 1, cache_len)``. One program holds ``BLOCK_T`` queries of
one head, walks the key blocks below the largest limit of its queries with an online softmax
(base 2, fp32) and writes ``[BLOCK_T, Dv]``; nothing ``[T, S]``-sized is materialised. A
query with no visible slot gets zeros.

Registered as ``torch.ops.kt_marlin.mla_prefill`` (``custom_op`` + ``register_fake``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(qn_ptr, qr_ptr, kv_ptr, kr_ptr, lim_ptr, out_ptr, T, n_heads, scale_log2,
                    s_qn_b, s_qn_t, s_qn_h, s_qr_b, s_qr_t, s_qr_h, s_kv_b, s_kv_s, s_kv_h, s_kr_b, s_kr_s,
                    DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr, DOT_IEEE: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    mask_t = t < T
    dn, dr, dv = tl.arange(0, BLOCK_DN), tl.arange(0, BLOCK_DR), tl.arange(0, BLOCK_DV)
    lim = tl.load(lim_ptr + b * T + t, mask=mask_t, other=0).to(tl.int32)  # [BT]
    kv_end = tl.max(lim, axis=0)

    qn = tl.load(qn_ptr + b * s_qn_b + t[:, None] * s_qn_t + h * s_qn_h + dn[None, :],
                 mask=mask_t[:, None] & (dn < DN)[None, :], other=0)  # [BT, BDN]
    qr = tl.load(qr_ptr + b * s_qr_b + t[:, None] * s_qr_t + h * s_qr_h + dr[None, :],
                 mask=mask_t[:, None] & (dr < DR)[None, :], other=0)  # [BT, BDR]
    if DOT_IEEE:
        qn = qn.to(tl.float32)
        qr = qr.to(tl.float32)
    kv_base = kv_ptr + b * s_kv_b + h * s_kv_h
    kr_base = kr_ptr + b * s_kr_b

    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_DV), dtype=tl.float32)
    for s0 in range(0, kv_end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)  # [BS]
        mask_s = s < kv_end
        rows = kv_base + s[:, None].to(tl.int64) * s_kv_s
        kn = tl.load(rows + dn[None, :], mask=mask_s[:, None] & (dn < DN)[None, :], other=0).to(qn.dtype)  # [BS, BDN]
        v = tl.load(rows + DN + dv[None, :], mask=mask_s[:, None] & (dv < DV)[None, :], other=0).to(qn.dtype)
        kr = tl.load(kr_base + s[:, None].to(tl.int64) * s_kr_s + dr[None, :],
                     mask=mask_s[:, None] & (dr < DR)[None, :], other=0).to(qr.dtype)  # [BS, BDR]
        if DOT_IEEE:
            score = tl.dot(qn, tl.trans(kn), input_precision="ieee")
            score += tl.dot(qr, tl.trans(kr), input_precision="ieee")
        else:
            score = tl.dot(qn, tl.trans(kn))
            score += tl.dot(qr, tl.trans(kr))  # [BT, BS] fp32
        visible = s[None, :] < lim[:, None]  # causal and length mask in one
        score = tl.where(visible, score * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(score, axis=1))  # [BT]; -inf while a row has seen nothing
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(score - m_safe[:, None])  # [BT, BS]
        l = l * alpha + tl.sum(p, axis=1)
        if DOT_IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # [BT, BDV]
        m = m_new

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    ptrs = out_ptr + ((b * T + t[:, None]) * n_heads + h) * DV + dv[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & (dv < DV)[None, :])


def choose_config(t: int, head_dims: tuple[int, int, int], device: torch.device, element_size: int) -> dict:
    if device.type != "cuda":  # Triton's interpreter: its cost is per operation, so large tiles
        return dict(BLOCK_T=64, BLOCK_S=64, num_warps=4, num_stages=1)
    block_t = 64 if t > 32 else (32 if t > 16 else 16)
    block_s = 64 if element_size <= 2 else 32
    return dict(BLOCK_T=block_t, BLOCK_S=block_s, num_warps=4 if block_t <= 32 else 8, num_stages=2)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


def launch(q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
           limits: torch.Tensor, softmax_scale: float, config: dict | None = None) -> torch.Tensor:
    """q_nope: [B, T, nH, Dn], q_rope: [B, T, nH, Dr], kv: [B, S, nH, Dn + Dv] (k_nope then v),
    k_rope: [B, S, Dr], limits: [B, T] int (contiguous) -> [B, T, nH, Dv] in q's dtype."""
    B, T, n_heads, dn = q_nope.shape
    dr = q_rope.shape[-1]
    dv = kv.shape[-1] - dn
    out = torch.empty((B, T, n_heads, dv), dtype=q_nope.dtype, device=q_nope.device)
    if out.numel() == 0:
        return out
    cfg = dict(config or choose_config(T, (dn, dr, dv), q_nope.device, q_nope.element_size()))
    dot_ieee = q_nope.dtype == torch.float32 or q_nope.device.type == "cpu"
    with on_device(q_nope):
        _prefill_kernel[(triton.cdiv(T, cfg["BLOCK_T"]), B * n_heads)](
            q_nope, q_rope, kv, k_rope, limits, out, T, n_heads, softmax_scale * _LOG2E,
            q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), q_rope.stride(0), q_rope.stride(1), q_rope.stride(2),
            kv.stride(0), kv.stride(1), kv.stride(2), k_rope.stride(0), k_rope.stride(1),
            DN=dn, DR=dr, DV=dv, BLOCK_DN=_pow2(dn), BLOCK_DR=_pow2(dr), BLOCK_DV=_pow2(dv), DOT_IEEE=dot_ieee, **cfg)
    return out


def _channels_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@torch.library.custom_op("kt_marlin::mla_prefill", mutates_args=())
def mla_prefill(q_nope: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor,
                limits: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Causal attention of [B, T, nH, *] queries over decompressed K/V; see the module docstring."""
    return launch(_channels_contiguous(q_nope), _channels_contiguous(q_rope), _channels_contiguous(kv),
                  _channels_contiguous(k_rope), limits.contiguous(), softmax_scale)


@mla_prefill.register_fake
def _(q_nope, q_rope, kv, k_rope, limits, softmax_scale):
    B, T, n_heads, dn = q_nope.shape
    return q_nope.new_empty((B, T, n_heads, kv.shape[-1] - dn))
