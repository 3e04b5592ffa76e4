"""The RoPE rotation kernel: rotates q and k of a batch of tokens in one launch.

For token ``n`` the angle table row is ``cos[pos[n]], sin[pos[n]]`` (``GATHER``: a static
table indexed by the device positions) or ``cos[n], sin[n]`` (rows computed per token, as
the "dynamic" NTK rope needs). Channel pairs of the first ``rotary_dim`` channels are

- half-split: ``(i, i + rotary_dim/2)``,
- interleaved: ``(2i, 2i + 1)``, written back in place (pairs stay adjacent),

and rotate as ``(x1 cos - x2 sin, x2 cos + x1 sin)`` in fp32, the rest of each head is
copied. One program owns ``BLOCK_T`` tokens and ``BLOCK_H`` q heads (3-D tiles
``[BLOCK_T, BLOCK_H, rotary_dim/2]``, the cos/sin rows shared by the heads); the programs of
head block 0 also rotate those tokens' k heads. Inputs may be strided views (the rope part of a q
projection); the outputs are new contiguous tensors.

Registered as ``torch.ops.kt_marlin.rope`` (``custom_op`` + ``register_fake``): shapes only
from the inputs, no host synchronisation, so it compiles fullgraph and captures in graphs.
Positions outside the table are not checked (no host sync); their loads are masked, so they
read no memory out of bounds, and rotate by angle 0 scaled by 0 (zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_tok, stride_head, n_heads, head0, cos, sin, tok, mask_t,
                  HEAD_DIM: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr):
    """Rotates heads ``[head0, head0 + BLOCK_H)`` of tokens ``tok`` [BT]; cos/sin: [BT, BHF] fp32."""
    heads = head0 + tl.arange(0, BLOCK_H)  # [BH]
    mask_th = mask_t[:, None, None] & (heads < n_heads)[None, :, None]  # [BT, BH, 1]
    i = tl.arange(0, BLOCK_HALF)[None, None, :]  # [1, 1, BHF] pair index
    mask = mask_th & (i < HALF)  # [BT, BH, BHF]
    if INTERLEAVED:
        c1 = 2 * i
        c2 = 2 * i + 1
    else:
        c1 = i
        c2 = i + HALF
    tok64 = tok.to(tl.int64)[:, None, None]
    src = x_ptr + tok64 * stride_tok + heads.to(tl.int64)[None, :, None] * stride_head  # [BT, BH, 1]
    dst = out_ptr + (tok64 * n_heads + heads[None, :, None]) * HEAD_DIM
    x1 = tl.load(src + c1, mask=mask, other=0).to(tl.float32)  # [BT, BH, BHF]
    x2 = tl.load(src + c2, mask=mask, other=0).to(tl.float32)
    cos3 = cos[:, None, :]  # [BT, 1, BHF]: shared by the heads
    sin3 = sin[:, None, :]
    out_ty = out_ptr.dtype.element_ty
    tl.store(dst + c1, (x1 * cos3 - x2 * sin3).to(out_ty), mask=mask)
    tl.store(dst + c2, (x2 * cos3 + x1 * sin3).to(out_ty), mask=mask)
    if BLOCK_PASS > 0:  # channels [rotary_dim, HEAD_DIM) pass through
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)[None, None, :]  # [1, 1, BP]
        mask_p = mask_th & (p < HEAD_DIM)
        tl.store(dst + p, tl.load(src + p, mask=mask_p, other=0), mask=mask_p)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, pos_ptr, n_tokens, n_rows,
                 q_stride_tok, q_stride_head, k_stride_tok, k_stride_head, n_q_heads, n_k_heads,
                 HEAD_DIM_Q: tl.constexpr, HEAD_DIM_K: tl.constexpr, HALF: tl.constexpr,
                 INTERLEAVED: tl.constexpr, GATHER: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
                 BLOCK_PASS_Q: tl.constexpr, BLOCK_PASS_K: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    hb = tl.program_id(1)
    mask_t = tok < n_tokens
    if GATHER:
        row = tl.load(pos_ptr + tok, mask=mask_t, other=-1).to(tl.int64)  # [BT]
    else:
        row = tok.to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)  # [BHF]
    mask = ((row >= 0) & (row < n_rows))[:, None] & (i < HALF)[None, :]  # [BT, BHF]
    cos = tl.load(cos_ptr + row[:, None] * HALF + i[None, :], mask=mask, other=0).to(tl.float32)  # [BT, BHF]
    sin = tl.load(sin_ptr + row[:, None] * HALF + i[None, :], mask=mask, other=0).to(tl.float32)
    _rotate_heads(q_ptr, qo_ptr, q_stride_tok, q_stride_head, n_q_heads, hb * BLOCK_H, cos, sin, tok, mask_t,
                  HEAD_DIM_Q, HALF, INTERLEAVED, BLOCK_H, BLOCK_HALF, BLOCK_PASS_Q)
    if hb == 0:
        _rotate_heads(k_ptr, ko_ptr, k_stride_tok, k_stride_head, n_k_heads, 0, cos, sin, tok, mask_t,
                      HEAD_DIM_K, HALF, INTERLEAVED, BLOCK_HK, BLOCK_HALF, BLOCK_PASS_K)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., T, nH, D] -> [N, nH, D] (a view when the leading dims allow), channels contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _pass_block(head_dim: int, rotary_dim: int) -> int:
    return 0 if head_dim == rotary_dim else triton.next_power_of_2(head_dim - rotary_dim)


def launch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [..., T, nH, Dq], k: [..., T, nKV, Dk], positions: [..., T]; cos/sin: [P, R/2] fp32
    (``gather``) or [N, R/2] rows per token -> rotated (q, k), new contiguous tensors."""
    half = cos.shape[-1]
    q3, k3 = _as_rows(q), _as_rows(k)  # [N, nH, Dq], [N, nKV, Dk]
    n, n_q, d_q = q3.shape
    n_k, d_k = k3.shape[1], k3.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if n == 0:
        return q_out, k_out
    pos = positions.reshape(-1).contiguous()  # [N]; an expanded view may have stride 0
    block_h = min(triton.next_power_of_2(n_q), 16)
    block_half = triton.next_power_of_2(half)
    # tokens per program: ~4096 rotated pairs of q on the GPU; the interpreter pays per program
    budget = 4096 if q.device.type == "cuda" else 1 << 16
    block_t = max(1, min(triton.next_power_of_2(n), budget // (block_h * block_half)))
    grid = (triton.cdiv(n, block_t), triton.cdiv(n_q, block_h))
    with on_device(q):
        _rope_kernel[grid](
            q3, k3, q_out, k_out, cos, sin, pos, n, cos.shape[0],
            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), n_q, n_k,
            HEAD_DIM_Q=d_q, HEAD_DIM_K=d_k, HALF=half, INTERLEAVED=interleaved, GATHER=gather, BLOCK_T=block_t,
            BLOCK_H=block_h, BLOCK_HK=triton.next_power_of_2(n_k), BLOCK_HALF=block_half,
            BLOCK_PASS_Q=_pass_block(d_q, 2 * half), BLOCK_PASS_K=_pass_block(d_k, 2 * half),
            num_warps=1 if block_t * block_h * block_half <= 512 else 4,
        )
    return q_out, k_out


@torch.library.custom_op("kt_marlin::rope", mutates_args=())
def rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         interleaved: bool, gather: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q [..., T, nH, D] and k [..., T, nKV, D]; see the module docstring."""
    return launch(q, k, positions, cos.contiguous(), sin.contiguous(), interleaved, gather)


@rope.register_fake
def _(q, k, positions, cos, sin, interleaved, gather):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format)
