"""Fused MoE experts on the GPU: grouped GEMM Triton kernels over expert-aligned blocks.

``y[t] = sum_k w[t,k] * down[e](act(gate[e] x[t]) * (up[e] x[t]))`` for the owned experts
``e = slot_of[id[t,k]]``, in three steps, all with shapes fixed by ``T``, ``K`` and the
weights (capture-safe, no host synchronisation):

1. ``moe_routing.align_blocks``: the ``P = T*K`` pairs grouped by expert slot into blocks of
   ``BLOCK_M`` rows (``sorted_pair[R]``, ``block_expert[B]``; one Triton program at decode
   sizes).
2. ``_gate_up_kernel``, grid ``(B, cdiv(I, BLOCK_N))``: a program gathers the block's token
   rows of x, multiplies them by the same ``BLOCK_N`` rows of its expert's gate and of its
   up projection (one pass over x, two accumulators), applies the activation and writes
   ``act(g) * u`` to ``h[R, I]`` (row r of h belongs to pair ``sorted_pair[r]``).
3. ``_down_kernel``, grid ``(B, cdiv(H, BLOCK_N))``: ``h`` rows of the block times the
   expert's down rows, scaled by the pair's top-k weight, stored in fp32 at row ``t*K + k``
   of ``out[P, H]`` (zeros for pairs no owned expert computes); ``y = out.view(T, K, H)
   .sum(1)``: a fixed-order sum, no atomics, so results repeat bit for bit.

Weights: ``w13`` is gate and up stacked as ``[n, 2I, ...]`` (gate rows first), ``w2`` is down
``[n, H, ...]``; each bf16/fp16 ``[n, N, K]`` or packed as in ``kt_marlin.packing`` (int4 in
the ``mma`` layout, int16 ``[n, N, K/4]`` in units of ``mma_unit(G, K)`` columns, +
scales/offsets ``[n, N, K/G]``; int8 ``[n, N, K]`` + scales). 16-bit and int8 weight tiles
are dequantised in registers and fed to ``tl.dot`` in the dtype of x (fp32 "ieee" dot for
fp32 x, and for CPU tensors, which only Triton's interpreter runs: its bf16 dot multiplies
raw bits), or for blocks of one row (``BLOCK_M = 1``, decode batches whose pairs are few
against the experts) summed in registers: a GEMV, no tensor-core tile computing 15 padding
rows. int4 takes ``int4_mma``'s unpack: one LOP3 turns two nibbles into two 16-bit weights
``MAGIC + q`` (inline PTX; integer ops in the interpreter), and the affine part is one step
per group, ``s sum (MAGIC + q) x + (o - MAGIC s) sum x``:

- ``_int4_dot`` (``BLOCK_M >= 16``): the unit's four nibble planes side by side are the
  columns in order, the register operand of one ``tl.dot`` per group (``W x.T``, as
  ``int4_mma``);
- ``_int4_gemv`` (``BLOCK_M = 1``): nibble plane ``j`` of a unit multiplies a contiguous
  slice of x in fp32, summed in registers and reduced once after the K loop.

Registered as ``torch.ops.kt_marlin.fused_experts`` (``custom_op`` + ``register_fake``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kt_marlin.int4_mma import _unit_operands, _unpack_asm, _unpack_int
from kt_marlin.moe_routing import align_blocks
from kt_marlin.packing import mma_unit
from kt_marlin.wq_matmul import _block_k as packed_block_k
from ktcore.ops.launch_device import on_device

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
def _int4_gemv(a_ptr, w_ptr, s_ptr, o_ptr, e, rn, mask_n, N, K, GROUP: tl.constexpr, UNIT: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """``W[rn] @ a`` ``[BN]`` (fp32) for expert ``e``'s int4 ``[N, K]`` weight (``mma`` layout,
    units of ``UNIT`` columns, ``P = UNIT/4`` int16 per unit row) and one activation row
    at ``a_ptr``: each K tile is ``[BN, UT, P]`` int16 (UT units), whose nibble ``j`` is the
    weight ``128 + q`` (bf16, exact; ``int4_mma._unpack_asm``) of columns ``u UNIT + j P + p``,
    multiplied by the matching contiguous slices of ``a``. Per group the affine part is
    ``s sum (128 + q) a + (o - 128 s) sum a``; products are summed in registers (fp32) and
    reduced across the tile once, after the K loop."""
    P: tl.constexpr = UNIT // 4
    UT: tl.constexpr = BLOCK_K // UNIT
    e64 = e.to(tl.int64)
    rn64 = rn.to(tl.int64)
    kq = K // 4
    n_groups = K // GROUP
    ru = tl.arange(0, UT)
    rp = tl.arange(0, P)
    w_tile = (w_ptr + e64 * N * kq + rn64[:, None, None] * kq
              + (ru * P)[None, :, None] + rp[None, None, :])  # [BN, UT, P]
    g_tile = e64 * N * n_groups + rn64[:, None] * n_groups + (ru * (UNIT // GROUP))[None, :]  # [BN, UT]
    a_tile = a_ptr + (ru * UNIT)[:, None] + rp[None, :]  # [UT, P]
    mask_w = mask_n[:, None, None]
    acc = tl.zeros((BLOCK_N, UT, P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = tl.load(w_tile + k0 // 4, mask=mask_w, other=0)  # [BN, UT, P] int16
        if ASM:
            q0, q1, q2, q3 = _unpack_asm(b, 128)
            q0, q1, q2, q3 = q0.to(tl.float32), q1.to(tl.float32), q2.to(tl.float32), q3.to(tl.float32)
        else:
            q0, q1, q2, q3 = _unpack_int(b, 128, tl.float32)
        a0 = tl.load(a_tile + k0).to(tl.float32)[None, :, :]  # [1, UT, P]: columns u UNIT + p
        a1 = tl.load(a_tile + (k0 + P)).to(tl.float32)[None, :, :]
        a2 = tl.load(a_tile + (k0 + 2 * P)).to(tl.float32)[None, :, :]
        a3 = tl.load(a_tile + (k0 + 3 * P)).to(tl.float32)[None, :, :]
        g = g_tile + k0 // GROUP
        s = tl.load(s_ptr + g, mask=mask_n[:, None], other=0).to(tl.float32)[:, :, None]  # [BN, UT, 1]
        c = tl.load(o_ptr + g, mask=mask_n[:, None], other=0).to(tl.float32)[:, :, None] - 128.0 * s
        if UNIT == GROUP:  # one group per unit
            acc += s * (q0 * a0 + q1 * a1 + q2 * a2 + q3 * a3) + c * (a0 + a1 + a2 + a3)
        else:  # two groups of 32 per unit of 64: nibbles 0, 1 and 2, 3
            s2 = tl.load(s_ptr + g + 1, mask=mask_n[:, None], other=0).to(tl.float32)[:, :, None]
            c2 = tl.load(o_ptr + g + 1, mask=mask_n[:, None], other=0).to(tl.float32)[:, :, None] - 128.0 * s2
            acc += s * (q0 * a0 + q1 * a1) + c * (a0 + a1) + s2 * (q2 * a2 + q3 * a3) + c2 * (a2 + a3)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _int4_dot(a_rows, a_mask, w_ptr, s_ptr, o_ptr, e, rn, mask_n, N, K,
              GROUP: tl.constexpr, UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr, DOT_IEEE: tl.constexpr):
    """``a @ W[rn].T`` ``[BM, BN]`` (fp32) for expert ``e``'s int4 weight and the activation
    rows at pointers ``a_rows[BM]``, as ``int4_mma``: computed as ``W a.T`` so that the
    unpacked weights (``MAGIC + q`` in a's 16-bit dtype, the planes of a unit put side by
    side: the columns in order) are the register operand of one ``tl.dot`` per group against
    the group's ``a.T`` tile ``[G, BM]``; the affine part ``s acc + (o - MAGIC s) sum a`` is
    applied to the ``[BN, BM]`` result of each group."""
    P: tl.constexpr = UNIT // 4
    HG: tl.constexpr = UNIT // GROUP  # groups per unit: 1, or 2 (groups of 32, units of 64)
    if DOT_IEEE:
        WT: tl.constexpr = tl.float32
    else:
        WT: tl.constexpr = a_rows.dtype.element_ty
    e64 = e.to(tl.int64)
    rn64 = rn.to(tl.int64)
    kq = K // 4
    n_groups = K // GROUP
    w_rows = w_ptr + e64 * N * kq + rn64[:, None] * kq + tl.arange(0, P)[None, :]  # [BN, P]
    g_rows = e64 * N * n_groups + rn64 * n_groups  # [BN]
    at_cols = a_rows[None, :] + tl.arange(0, GROUP)[:, None]  # [G, BM]: a.T of a group
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for u in tl.static_range(BLOCK_K // UNIT):
            ku = k0 + u * UNIT
            b = tl.load(w_rows + ku // 4, mask=mask_n[:, None], other=0)  # [BN, P] int16
            qa0, qa1 = _unit_operands(b, MAGIC, WT, ASM, HG)  # [BN, G] (HG 1), or the unit's two groups
            for h in tl.static_range(HG):
                if h == 0:
                    qa = qa0
                else:
                    qa = qa1
                at = tl.load(at_cols + (ku + h * GROUP), mask=a_mask[None, :], other=0.0)  # [G, BM]
                if DOT_IEEE:
                    accg = tl.dot(qa, at.to(tl.float32), input_precision="ieee")  # [BN, BM]
                else:
                    accg = tl.dot(qa, at)
                s = tl.load(s_ptr + g_rows + (ku // GROUP + h), mask=mask_n, other=0).to(tl.float32)  # [BN]
                c = tl.load(o_ptr + g_rows + (ku // GROUP + h), mask=mask_n, other=0).to(tl.float32) - MAGIC * s
                asum = tl.sum(at.to(tl.float32), axis=0)  # [BM]
                acc += accg * s[:, None] + c[:, None] * asum[None, :]
    return tl.trans(acc)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, s_ptr, o_ptr, h_ptr, sorted_pair_ptr, block_expert_ptr,
                    P, H, I, stride_x,
                    TOPK: tl.constexpr, ACT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                    UNIT: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr, USE_DOT: tl.constexpr,
                    DOT_IEEE: tl.constexpr,
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
    if BITS == 4 and BLOCK_M == 1:
        x_row = x_ptr + (tl.load(sorted_pair_ptr + pid_b) // TOPK).to(tl.int64) * stride_x  # a used block's pair
        acc_g += _int4_gemv(x_row, w_ptr, s_ptr, o_ptr, e, rn, mask_n, 2 * I, H, GROUP, UNIT, BLOCK_N, BLOCK_K,
                            ASM)[None, :]
        acc_u += _int4_gemv(x_row, w_ptr, s_ptr, o_ptr, e, I + rn, mask_n, 2 * I, H, GROUP, UNIT, BLOCK_N, BLOCK_K,
                            ASM)[None, :]
    elif BITS == 4:
        acc_g = _int4_dot(x_rows, valid, w_ptr, s_ptr, o_ptr, e, rn, mask_n, 2 * I, H, GROUP, UNIT,
                          BLOCK_M, BLOCK_N, BLOCK_K, MAGIC, ASM, DOT_IEEE)
        acc_u = _int4_dot(x_rows, valid, w_ptr, s_ptr, o_ptr, e, I + rn, mask_n, 2 * I, H, GROUP, UNIT,
                          BLOCK_M, BLOCK_N, BLOCK_K, MAGIC, ASM, DOT_IEEE)
    else:
        for k0 in range(0, H, BLOCK_K):
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
                 BITS: tl.constexpr, GROUP: tl.constexpr, UNIT: tl.constexpr, MAGIC: tl.constexpr,
                 ASM: tl.constexpr, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
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
    if BITS == 4 and BLOCK_M == 1:
        acc += _int4_gemv(h_ptr + pid_b.to(tl.int64) * I, w_ptr, s_ptr, o_ptr, e, rn, mask_n, H, I, GROUP, UNIT,
                          BLOCK_N, BLOCK_K, ASM)[None, :]
    elif BITS == 4:
        acc = _int4_dot(h_rows, rows >= 0, w_ptr, s_ptr, o_ptr, e, rn, mask_n, H, I, GROUP, UNIT,
                        BLOCK_M, BLOCK_N, BLOCK_K, MAGIC, ASM, DOT_IEEE)
    else:
        for k0 in range(0, I, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            hk = tl.load(h_rows[:, None] + rk[None, :], mask=(rk < I)[None, :], other=0.0)
            w = _weight_tile(w_ptr, s_ptr, e, rn, mask_n, k0, H, I, BITS, GROUP, BLOCK_N, BLOCK_K)
            acc = _mac(acc, hk, w, USE_DOT, BLOCK_M == 1, DOT_IEEE)
    wt = tl.load(topk_w_ptr + pair, mask=valid, other=0.0).to(tl.float32)  # [BM]
    acc = acc * wt[:, None]
    ptrs = out_ptr + pair[:, None].to(tl.int64) * H + rn[None, :]
    tl.store(ptrs, acc, mask=valid[:, None] & mask_n[None, :])


def block_k(k: int, bits: int, group: int, target: int) -> int:
    """``BLOCK_K``: for packed weights (as for ``wq_matmul``) the largest ``unit * 2^i <=
    max(target, unit)`` dividing K (unit: the group for int8, the layout unit ``mma_unit(group,
    K)`` for int4); for 16-bit weights ``target`` shrunk towards K (masked)."""
    if bits != 16:
        return packed_block_k(k, mma_unit(group, k) if bits == 4 else group, target)
    bk = 16
    while bk < target and bk < k:
        bk *= 2
    return bk


def choose_config(t: int, topk: int, n_owned: int, h: int, i: int, bits: int, group13: int, group2: int,
                  interpreter: bool = False) -> dict:
    """Tile sizes for one call, from shapes only.

    ``BLOCK_M`` is 1 (a GEMV per pair, no ``tl.dot``) while the pairs are few against the
    experts (most experts then get one pair, and a block of 16 would compute 15 padding rows),
    else 16 (the smallest ``tl.dot`` tile), 32 or 64 by the average rows per expert. int4
    takes blocks of 16 rows down to T = 1: on the H200 its dot path (the unpacked weights are
    the register operand of the tensor cores) beat its GEMV at T = 1, 4 and 16 on DeepSeek-V3
    and at T = 16 on Qwen3-30B-A3B, and lost by 4 µs at T = 1 there
    (``bench/results/nvidia-h200_bench_experts_session7*``). Each case's
    ``BLOCK_N``/``BLOCK_K``/warps compile for sm_90 (Triton 3.9) without register spills
    (``bench/ptxas_check.py``); ``bench/bench_experts.py`` times others beside them.
    """
    pairs = t * topk
    avg = pairs / n_owned
    warps = 8
    if bits == 4 and avg <= 16:  # int4: tl.dot blocks of 16 rows at every decode size (H200 sweep)
        bm, bn, target, warps = 16, 64, 256, 4
    elif 2 * pairs <= n_owned:
        bm, bn, target = 1, 16, 256
    elif avg <= 16:
        bm, bn, target = 16, (16 if bits == 8 else 32), 128
    else:
        bm = 32 if avg <= 48 else 64
        bn, target = {16: (64, 64), 8: (16, 128), 4: (32, 128)}[bits]
    if interpreter:  # CPU tensors in Triton's interpreter: fewer, larger tiles run faster
        bn, target = 64, 512
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K_UP": block_k(h, bits, group13, target),
            "BLOCK_K_DOWN": block_k(i, bits, group2, target), "num_warps": warps}


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
    units = {"BLOCK_K_UP": 0, "BLOCK_K_DOWN": 0}
    if bits != 16:
        for name, k, group in (("BLOCK_K_UP", h, group13), ("BLOCK_K_DOWN", i, group2)):
            units[name] = mma_unit(group, k) if bits == 4 else group
            if k % cfg[name] or cfg[name] % units[name]:
                raise ValueError(f"fused_experts: {name}={cfg[name]} must divide {k} "
                                 f"and be a multiple of {units[name]}")
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if bits == 4 and 1 < bm < 16:
        raise ValueError(f"fused_experts: int4 takes BLOCK_M 1 (GEMV) or >= 16 (tl.dot), got {bm}")
    sorted_pair, block_expert = align_blocks(topk_ids, slot_of, n_owned, bm)  # [R], [B]
    blocks = block_expert.shape[0]
    hbuf = torch.empty((blocks * bm, i), dtype=x.dtype, device=x.device)  # [R, I]
    out = torch.zeros((pairs, h), dtype=torch.float32, device=x.device)  # [P, H]
    weights = topk_weights.reshape(-1).float().contiguous()  # [P]
    dummy = w13 if s13 is None else s13
    dot_ieee = x.dtype == torch.float32 or x.device.type == "cpu"
    # int4: 16-bit weights MAGIC + q (bf16 128 + q, fp16 1024 + q) from inline PTX on the GPU,
    # from integer ops in the interpreter and for fp32 dots (see int4_mma)
    common = dict(BITS=bits, DOT_IEEE=dot_ieee, BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg["num_warps"],
                  MAGIC=1024 if x.dtype == torch.float16 else 128, ASM=not dot_ieee)
    if "num_stages" in cfg:
        common["num_stages"] = cfg["num_stages"]

    def use_dot(bk: int) -> bool:  # tl.dot needs 16 rows and K >= 16 (int4 always takes it for BLOCK_M >= 16)
        return bm >= 16 and bk >= 16

    with on_device(x):
        _gate_up_kernel[(blocks, triton.cdiv(i, bn))](
            x, w13, dummy, dummy if o13 is None else o13, hbuf, sorted_pair, block_expert,
            pairs, h, i, x.stride(0), TOPK=topk, ACT=ACTIVATIONS[activation],
            GROUP=group13, UNIT=units["BLOCK_K_UP"], BLOCK_K=cfg["BLOCK_K_UP"], USE_DOT=use_dot(cfg["BLOCK_K_UP"]),
            **common)
        _down_kernel[(blocks, triton.cdiv(h, bn))](
            hbuf, w2, dummy if s2 is None else s2, dummy if o2 is None else o2, out, weights,
            sorted_pair, block_expert, pairs, h, i, GROUP=group2, UNIT=units["BLOCK_K_DOWN"],
            BLOCK_K=cfg["BLOCK_K_DOWN"], USE_DOT=use_dot(cfg["BLOCK_K_DOWN"]), **common)
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
