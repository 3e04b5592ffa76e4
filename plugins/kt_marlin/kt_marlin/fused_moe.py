"""Fused MoE experts on the GPU: grouped GEMM Triton kernels over expert-aligned blocks.

``y[t] = sum_k w[t,k] * down[e](act(gate[e] x[t]) * (up[e] x[t]))`` for the owned experts
``e = slot_of[id[t,k]]``, in three steps, all with shapes fixed by ``T``, ``K`` and the
weights (capture-safe, no host synchronisation):

1. ``moe_routing.align_blocks``: the ``P = T*K`` pairs grouped by expert slot into blocks of
   ``BLOCK_M`` rows (``sorted_pair[R]``, ``block_expert[B]``).
2. ``_gate_up_kernel``, grid ``(B, cdiv(I, BLOCK_N))``: a program gathers the block's token
   rows of x, multiplies them by the same ``BLOCK_N`` rows of its expert's gate and of its
   up projection (one pass over x, two accumulators), applies the activation and writes
   ``act(g) * u`` to ``h[R, I]`` (row r of h belongs to pair ``sorted_pair[r]``).
3. ``_down_kernel``, grid ``(B, cdiv(H, BLOCK_N))``: ``h`` rows of the block times the
   expert's down rows, scaled by the pair's top-k weight, stored in fp32 at row ``t*K + k``
   of ``out[P, H]`` (zeros for pairs no owned expert computes); ``y = out.view(T, K, H)
   .sum(1)``: a fixed-order sum, no atomics, so results repeat bit for bit.

Weights: ``w13`` is gate and up stacked as ``[n, 2I, ...]`` (gate rows first), ``w2`` is down
``[n, H, ...]``; each bf16/fp16 ``[n, N, K]`` or packed as in ``kt_marlin.packing`` (int4
words ``[n, N, K/8]`` + scales/offsets ``[n, N, K/G]``, int8 ``[n, N, K]`` + scales). The
weight tile is dequantised in registers and fed to ``tl.dot`` in the dtype of x (fp32 "ieee"
dot for fp32 x, and for CPU tensors, which only Triton's interpreter runs: its bf16 dot
multiplies raw bits). int4 tiles are never reshaped into columns: nibble j of each word is a
2-D slice of columns ``8w + j``, multiplied by the matching strided slice of x (a sum over K
does not care about the order), which keeps the kernels at a third of the registers. Decode batches whose pairs are few against the experts use blocks of
one row (``BLOCK_M = 1``): each program is then a GEMV that sums products in registers, and
no tensor-core tile computes 15 padding rows.

Registered as ``torch.ops.kt_marlin.fused_experts`` (``custom_op`` + ``register_fake``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kt_marlin.moe_routing import align_blocks
from kt_marlin.wq_matmul import _block_k as packed_block_k

#: Activation names (ktcore's canonical ones) -> kernel code.
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.jit
def _act(g, ACT: tl.constexpr):
    """The activation of an fp32 tile."""
    if ACT == 0:  # silu
        a = g * tl.sigmoid(g)
    elif ACT == 1:  # gelu (erf)
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:  # gelu, tanh approximation: 0.5 g (1 + tanh(z)) = g sigmoid(2z)
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    else:  # relu
        a = tl.maximum(g, 0.0)
    return a


@triton.jit
def _weight_tile(w_ptr, s_ptr, e, rn, mask_n, k0, N, K,
                 BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows ``rn`` x columns ``k0 .. k0 + BLOCK_K`` of expert ``e``'s 16-bit or int8 ``[N, K]``
    weight: ``[BLOCK_N, BLOCK_K]`` (the stored dtype for 16 bits, fp32 dequantised for int8;
    zero outside ``N``/``K``). int8 K is a multiple of ``BLOCK_K``, a multiple of GROUP;
    16-bit weights take any K (GROUP unused). int4 goes through ``_int4_mac``."""
    e64 = e.to(tl.int64)
    rn64 = rn.to(tl.int64)
    if BITS == 16:
        rk = k0 + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + e64 * N * K + rn64[:, None] * K + rk[None, :]
        w = tl.load(ptrs, mask=mask_n[:, None] & (rk < K)[None, :], other=0.0)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(w_ptr + e64 * N * K + rn64[:, None] * K + rk[None, :], mask=mask_n[:, None], other=0)
        q = q.to(tl.int32)
        n_groups = K // GROUP
        rg = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        gofs = e64 * N * n_groups + rn64[:, None] * n_groups + rg[None, :]  # [BN, BK/G]
        s = tl.load(s_ptr + gofs, mask=mask_n[:, None], other=0).to(tl.float32)
        wg = tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None]
        w = tl.reshape(wg, (BLOCK_N, BLOCK_K))
    return w


@triton.jit
def _mac(acc, a, w, USE_DOT: tl.constexpr, ONE_ROW: tl.constexpr, DOT_IEEE: tl.constexpr):
    """``acc[M, BN] + a[M, BK] @ w[BN, BK].T`` in fp32: a tensor-core dot (16-bit inputs in
    x's dtype, or an fp32 "ieee" dot), or for ``M < 16`` products summed in registers (for one
    row, ``M == 1``, in the 2-D layout of the weight tile, as ``wq_matmul``'s GEMV)."""
    if USE_DOT:
        if DOT_IEEE:
            acc += tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    elif ONE_ROW:
        acc += tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1)[None, :]
    else:
        acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    return acc


@triton.jit
def _int4_mac(acc, a_rows, a_mask, w_ptr, s_ptr, o_ptr, e, rn, mask_n, k0, N, K,
              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              USE_DOT: tl.constexpr, ONE_ROW: tl.constexpr, DOT_IEEE: tl.constexpr):
    """``acc + a[:, k0 : k0 + BLOCK_K] @ W[rn, k0 : k0 + BLOCK_K].T`` for expert ``e``'s int4
    ``[N, K]`` weight, without reshaping nibbles into columns: nibble ``j`` of the tile's
    words ``[BN, BK/8]`` holds columns ``k0 + 8w + j``, so the tile is eight 2-D slices, each
    multiplied by the matching strided slice of ``a`` (rows at pointers ``a_rows[M]``); the
    sum over K does not care about the order. All eight slices of a word share its group."""
    e64 = e.to(tl.int64)
    rn64 = rn.to(tl.int64)
    rw = tl.arange(0, BLOCK_K // 8)  # [BK/8] word within the tile
    words = tl.load(w_ptr + e64 * N * (K // 8) + rn64[:, None] * (K // 8) + (k0 // 8 + rw)[None, :],
                    mask=mask_n[:, None], other=0)  # [BN, BK/8] int32
    n_groups = K // GROUP
    gofs = e64 * N * n_groups + rn64[:, None] * n_groups + ((k0 + 8 * rw) // GROUP)[None, :]  # [BN, BK/8]
    s = tl.load(s_ptr + gofs, mask=mask_n[:, None], other=0).to(tl.float32)
    o = tl.load(o_ptr + gofs, mask=mask_n[:, None], other=0).to(tl.float32)
    for j in tl.static_range(8):
        w = ((words >> (4 * j)) & 15).to(tl.float32) * s + o  # [BN, BK/8]: columns k0 + 8w + j
        a = tl.load(a_rows[:, None] + (k0 + 8 * rw + j)[None, :], mask=a_mask[:, None], other=0.0)  # [M, BK/8]
        acc = _mac(acc, a, w, USE_DOT, ONE_ROW, DOT_IEEE)
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, o_ptr, h_ptr, sorted_pair_ptr, block_expert_ptr,
                    P, H, I, stride_x,
                    TOPK: tl.constexpr, ACT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                    USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b)
    if e < 0:
        return
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    pair = tl.load(sorted_pair_ptr + rows)  # [BM], P on padding rows
    valid = pair < P
    tok = (pair // TOPK).to(tl.int64)  # [BM]
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of gate; up rows are I + rn
    mask_n = rn < I
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = x_ptr + tok * stride_x  # [BM] pointers
    for k0 in range(0, H, BLOCK_K):
        if BITS == 4:
            acc_g = _int4_mac(acc_g, x_rows, valid, w_ptr, s_ptr, o_ptr, e, rn, mask_n, k0, 2 * I, H,
                              GROUP, BLOCK_N, BLOCK_K, USE_DOT, BLOCK_M == 1, DOT_IEEE)
            acc_u = _int4_mac(acc_u, x_rows, valid, w_ptr, s_ptr, o_ptr, e, I + rn, mask_n, k0, 2 * I, H,
                              GROUP, BLOCK_N, BLOCK_K, USE_DOT, BLOCK_M == 1, DOT_IEEE)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_rows[:, None] + rk[None, :], mask=valid[:, None] & (rk < H)[None, :], other=0.0)
            wg = _weight_tile(w_ptr, s_ptr, e, rn, mask_n, k0, 2 * I, H, BITS, GROUP, BLOCK_N, BLOCK_K)
            acc_g = _mac(acc_g, xk, wg, USE_DOT, BLOCK_M == 1, DOT_IEEE)
            wu = _weight_tile(w_ptr, s_ptr, e, I + rn, mask_n, k0, 2 * I, H, BITS, GROUP, BLOCK_N, BLOCK_K)
            acc_u = _mac(acc_u, xk, wu, USE_DOT, BLOCK_M == 1, DOT_IEEE)
    h = _act(acc_g, ACT) * acc_u  # [BM, BN] fp32
    ptrs = h_ptr + rows[:, None].to(tl.int64) * I + rn[None, :]
    tl.store(ptrs, h.to(h_ptr.dtype.element_ty), mask=mask_n[None, :])


@triton.jit
def _down_kernel(h_ptr, w_ptr, s_ptr, o_ptr, out_ptr, topk_w_ptr, sorted_pair_ptr, block_expert_ptr,
                 P, H, I,
                 BITS: tl.constexpr, GROUP: tl.constexpr, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_b)
    if e < 0:
        return
    rows = pid_b * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    pair = tl.load(sorted_pair_ptr + rows)  # [BM]
    valid = pair < P
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output columns
    mask_n = rn < H
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64) * I  # [BM] pointers
    for k0 in range(0, I, BLOCK_K):
        if BITS == 4:
            acc = _int4_mac(acc, h_rows, rows >= 0, w_ptr, s_ptr, o_ptr, e, rn, mask_n, k0, H, I,
                            GROUP, BLOCK_N, BLOCK_K, USE_DOT, BLOCK_M == 1, DOT_IEEE)
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            hk = tl.load(h_rows[:, None] + rk[None, :], mask=(rk < I)[None, :], other=0.0)
            w = _weight_tile(w_ptr, s_ptr, e, rn, mask_n, k0, H, I, BITS, GROUP, BLOCK_N, BLOCK_K)
            acc = _mac(acc, hk, w, USE_DOT, BLOCK_M == 1, DOT_IEEE)
    wt = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # [BM]
    acc = acc * wt[:, None]
    ptrs = out_ptr + pair[:, None].to(tl.int64) * H + rn[None, :]
    tl.store(ptrs, acc, mask=valid[:, None] & mask_n[None, :])


def block_k(k: int, bits: int, group: int, target: int) -> int:
    """``BLOCK_K``: for packed weights (as for ``wq_matmul``) the largest ``group * 2^i <=
    max(target, group)`` dividing K; for 16-bit weights ``target`` shrunk towards K (masked)."""
    if bits != 16:
        return packed_block_k(k, group, target)
    bk = 16
    while bk < target and bk < k:
        bk *= 2
    return bk


def choose_config(t: int, topk: int, n_owned: int, h: int, i: int, bits: int, group13: int, group2: int,
                  interpreter: bool = False) -> dict:
    """Tile sizes for one call, from shapes only.

    ``BLOCK_M`` is 1 (a GEMV per pair, no ``tl.dot``) while the pairs are few against the
    experts (most experts then get one pair, and a block of 16 would compute 15 padding rows),
    else 16 (the smallest ``tl.dot`` tile), 32 or 64 by the average rows per expert. Each
    case's ``BLOCK_N``/``BLOCK_K``/warps compile for sm_90 (Triton 3.9) without register
    spills (``bench/ptxas_check.py``); ``bench/bench_experts.py`` times others beside them.
    """
    pairs = t * topk
    avg = pairs / n_owned
    if 2 * pairs <= n_owned:
        bm, bn, target = 1, 16, 256
    elif avg <= 16:
        bm, bn, target = 16, (16 if bits == 8 else 32), 128
    else:
        bm = 32 if avg <= 48 else 64
        bn, target = {16: (64, 64), 8: (16, 128), 4: (32, 128)}[bits]
    if interpreter:  # CPU tensors in Triton's interpreter: fewer, larger tiles run faster
        bn, target = 64, 512
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K_UP": block_k(h, bits, group13, target),
            "BLOCK_K_DOWN": block_k(i, bits, group2, target), "num_warps": 8}


def launch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_of: torch.Tensor,
           w13: torch.Tensor, s13: Optional[torch.Tensor], o13: Optional[torch.Tensor],
           w2: torch.Tensor, s2: Optional[torch.Tensor], o2: Optional[torch.Tensor],
           bits: int, group13: int, group2: int, activation: str, config: dict | None = None) -> torch.Tensor:
    """The fused experts on ``x[T, H]`` (contiguous rows); ``config`` overrides the heuristic."""
    t, h = x.shape
    topk = topk_ids.shape[1]
    n_owned = w13.shape[0]
    i = w13.shape[1] // 2
    pairs = t * topk
    if bits != 16 and (h % group13 or i % group2):
        raise ValueError(f"fused_experts: H={h} / I={i} are not multiples of the groups {group13} / {group2}")
    if pairs == 0:
        return torch.zeros_like(x)
    cfg = dict(config or choose_config(t, topk, n_owned, h, i, bits, group13, group2, x.device.type == "cpu"))
    if bits != 16:
        for name, k, group in (("BLOCK_K_UP", h, group13), ("BLOCK_K_DOWN", i, group2)):
            if k % cfg[name] or cfg[name] % group:
                raise ValueError(f"fused_experts: {name}={cfg[name]} must divide {k} and be a multiple of {group}")
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    sorted_pair, block_expert = align_blocks(topk_ids, slot_of, n_owned, bm)  # [R], [B]
    blocks = block_expert.shape[0]
    hbuf = torch.empty((blocks * bm, i), dtype=x.dtype, device=x.device)  # [R, I]
    out = torch.zeros((pairs, h), dtype=torch.float32, device=x.device)  # [P, H]
    weights = topk_weights.reshape(-1).float().contiguous()  # [P]
    dummy = w13 if s13 is None else s13
    dot_ieee = x.dtype == torch.float32 or x.device.type == "cpu"
    common = dict(BITS=bits, DOT_IEEE=dot_ieee, BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg["num_warps"])

    def use_dot(bk: int) -> bool:  # tl.dot needs 16 rows and K >= 16 (int4 slices: BK / 8)
        return bm >= 16 and (bk >= 128 if bits == 4 else bk >= 16)

    with torch.device(x.device):
        _gate_up_kernel[(blocks, triton.cdiv(i, bn))](
            x, w13, dummy, dummy if o13 is None else o13, hbuf, sorted_pair, block_expert,
            pairs, h, i, x.stride(0), TOPK=topk, ACT=ACTIVATIONS[activation],
            GROUP=group13, BLOCK_K=cfg["BLOCK_K_UP"], USE_DOT=use_dot(cfg["BLOCK_K_UP"]), **common)
        _down_kernel[(blocks, triton.cdiv(h, bn))](
            hbuf, w2, dummy if s2 is None else s2, dummy if o2 is None else o2, out, weights,
            sorted_pair, block_expert, pairs, h, i, GROUP=group2, BLOCK_K=cfg["BLOCK_K_DOWN"],
            USE_DOT=use_dot(cfg["BLOCK_K_DOWN"]), **common)
    return out.view(t, topk, h).sum(dim=1).to(x.dtype)  # [T, H]


@torch.library.custom_op("kt_marlin::fused_experts", mutates_args=())
def fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, slot_of: torch.Tensor,
                  w13: torch.Tensor, s13: Optional[torch.Tensor], o13: Optional[torch.Tensor],
                  w2: torch.Tensor, s2: Optional[torch.Tensor], o2: Optional[torch.Tensor],
                  bits: int, group13: int, group2: int, activation: str) -> torch.Tensor:
    """Routed experts of one MoE layer: ``x[T, H]``, ``topk_ids[T, K]``, ``topk_weights[T, K]``
    -> ``y[T, H]`` in x's dtype (see the module docstring for the weight layouts)."""
    return launch(x.contiguous(), topk_ids, topk_weights, slot_of, w13, s13, o13, w2, s2, o2,
                  bits, group13, group2, activation)


@fused_experts.register_fake
def _(x, topk_ids, topk_weights, slot_of, w13, s13, o13, w2, s2, o2, bits, group13, group2, activation):
    return torch.empty_like(x)
