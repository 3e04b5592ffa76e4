"""The int4 weight-only matmul kernel: ``y[T, N] = x[T, K] @ (s q + o)[N, K].T (+ b)``.

Weights in the ``mma`` layout of ``kt_marlin.packing``: int16 ``[N, K/4]`` in units of ``U =
max(G, 64)`` columns, element ``c`` of a unit holding columns ``c + j U/4`` of the unit in
nibble ``j``; scales/offsets ``[N, K/G]``.

Computed as ``y.T = W x.T`` so that the weights are the register operand of ``tl.dot``
(M = ``BLOCK_N`` rows, N = ``BLOCK_T`` tokens padded to 16, K = the group): the
multiply-adds run on the tensor cores and only the unpacking runs on the ALUs. Per unit:

- one load of ``[BLOCK_N, U/4]`` int16 (rows are contiguous runs of ``U/2`` bytes: 16-byte
  vectors, coalesced; Triton pipelines it with cp.async for ``num_stages`` > 1);
- the unpack: nibble ``j`` becomes the 16-bit float ``MAGIC + q`` (``MAGIC`` = 128 for bf16,
  1024 for fp16, exact) by OR-ing it into the low mantissa bits of ``MAGIC``. On the GPU that
  is ``tl.inline_asm_elementwise`` on two int16 (one 32-bit register) at a time (``ASM``):
  a shift and one LOP3 per nibble give two weights in the two halves of a register, which
  is the dot operand's register format. Triton's interpreter cannot run inline assembly, so
  it (and ``ASM=False``) takes the same values from integer ops;
- the nibble planes of a group put side by side (``_cat``: plane ``j`` holds the unit's
  columns ``[j U/4, (j+1) U/4)``, so this is the columns in order, and in registers only a
  renaming) and **one dot per group** against the group's ``x.T`` tile ``[G, BLOCK_T]``
  (cp.async, no transposition in registers): ``acc_g[n, t] = sum_k (MAGIC + q) x`` in fp32
  (exact products), a single wgmma wait per group;
- the affine part on the ``[BLOCK_N, BLOCK_T]`` accumulator: ``y += s acc_g + (o - MAGIC s)
  sum_k x``. The coefficients of the next K tile's first group are loaded one iteration
  ahead (the scale loads' latency off the critical path). ``XS`` picks where ``sum_k x`` of
  the group comes from: 0 a reduction of the x tile (shuffles and a layout change through
  shared memory), 1 a ``[T, K/G]`` fp32 tensor computed by torch before the launch (loaded
  with the scales), 2 a second dot, ones ``[BLOCK_N, G]`` times the x tile (tensor cores,
  no layout change).

Split-K (``SPLIT_K`` programs per output tile along K): each program takes a contiguous run
of K tiles (a row's loads follow each other in memory), stores its fp32 partial, bumps the
tile's counter (acq_rel atomic), and the program that arrives last adds the partials **in the
fixed order 0..S-1**, adds the bias and stores: deterministic, one launch, no separate
reduction pass. That program also sets the tile's counter back to 0, so the counters
(``wq_matmul`` gives each stream a region of one zeroed buffer per device) are ready for the
next launch without a memset: a captured CUDA graph replays correctly.

``PDL`` (programmatic dependent launch, sm_90): launched with ``launch_pdl``, the kernel may
start while the previous kernel of the stream is still running. Before ``gdc_wait`` (which
waits until that kernel has finished and its writes are visible) it only touches the
weights, which no kernel writes: it asks the L2 to fetch the first ``PF`` K tiles of its
rows (``cp.async.bulk.prefetch.L2``, one request per row), so their HBM latency overlaps the
previous kernel; x, the x sums and the output are read or written only after the wait. A
program lets the next kernel launch (``gdc_launch_dependents``) when its K loop is done, so
the next kernel's programs take the slots that the epilogues free.

fp32 activations (and CPU tensors, which only the interpreter runs: its bf16 ``tl.dot``
multiplies raw bits) take an fp32 ("ieee") dot on fp32 ``MAGIC + q``.
"""

from __future__ import annotations

import triton
import triton.language as tl


def _unpack_ptx(magic: int) -> str:
    """PTX: two int16 ``$4`` (low half: element 0) -> for ``j`` = 0..3, ``$j`` = the pair
    ``magic + nibble j`` of element 0 (low half) and of element 1 (high half): a shift and one
    LOP3 ``(a & b) | c`` (0xea) per two weights."""
    m = f"0x{magic:04X}{magic:04X}"
    return ("{ .reg .b32 t1, t2, t3;\n"
            "shr.b32 t1, $4, 4; shr.b32 t2, $4, 8; shr.b32 t3, $4, 12;\n"
            f"lop3.b32 $0, $4, 0x000F000F, {m}, 0xea; lop3.b32 $1, t1, 0x000F000F, {m}, 0xea;\n"
            f"lop3.b32 $2, t2, 0x000F000F, {m}, 0xea; lop3.b32 $3, t3, 0x000F000F, {m}, 0xea; }}")


_PTX_BF16 = tl.constexpr(_unpack_ptx(0x4300))  # bf16 128.0
_PTX_FP16 = tl.constexpr(_unpack_ptx(0x6400))  # fp16 1024.0


@triton.jit
def _unpack_asm(b, MAGIC: tl.constexpr):
    """int16 ``b`` -> the four ``MAGIC + nibble j`` as 16-bit floats (``MAGIC`` 128: bf16,
    1024: fp16); two elements per asm instance."""
    if MAGIC == 128:
        return tl.inline_asm_elementwise(_PTX_BF16, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16,) * 4,
                                         is_pure=True, pack=2)
    else:
        return tl.inline_asm_elementwise(_PTX_FP16, "=r,=r,=r,=r,r", [b], dtype=(tl.float16,) * 4,
                                         is_pure=True, pack=2)


@triton.jit
def _unpack_int(b, MAGIC: tl.constexpr, DTYPE: tl.constexpr):
    """The values of ``_unpack_asm`` from integer ops (the interpreter; fp32 dots)."""
    q0 = ((b & 15).to(tl.float32) + MAGIC).to(DTYPE)
    q1 = (((b >> 4) & 15).to(tl.float32) + MAGIC).to(DTYPE)
    q2 = (((b >> 8) & 15).to(tl.float32) + MAGIC).to(DTYPE)
    q3 = (((b >> 12) & 15).to(tl.float32) + MAGIC).to(DTYPE)
    return q0, q1, q2, q3


@triton.jit
def _prefetch_l2(ptrs, nbytes):
    """Asks the L2 to fetch ``nbytes`` (a multiple of 16, 0: nothing) from each address of
    ``ptrs`` (16-byte aligned): ``cp.async.bulk.prefetch.L2``, no registers written."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _cat(a, b):
    """``[BN, P]``, ``[BN, P]`` -> ``[BN, 2P]``: a's columns then b's (in the dot-operand
    layout this only renames registers: P is a multiple of the dot's K step 16)."""
    return tl.reshape(tl.permute(tl.join(a, b), (0, 2, 1)), (a.shape[0], 2 * a.shape[1]))


@triton.jit
def _unit_operands(b, MAGIC: tl.constexpr, DTYPE: tl.constexpr, ASM: tl.constexpr, HALVES: tl.constexpr):
    """int16 ``b`` ``[BN, P]`` of one layout unit -> its dot operands ``(first, second)``:
    with ``HALVES == 1`` the unit's columns in order ``[BN, 4P]`` (as both), with 2 its two
    groups ``[BN, 2P]`` each. Values ``MAGIC + q``: by inline PTX with ``ASM``, else by
    integer ops in ``DTYPE``."""
    if ASM:
        q0, q1, q2, q3 = _unpack_asm(b, MAGIC)  # [BN, P] each: MAGIC + q of columns j P + c
    else:
        q0, q1, q2, q3 = _unpack_int(b, MAGIC, DTYPE)
    if HALVES == 1:
        first = _cat(_cat(q0, q1), _cat(q2, q3))
        second = first
    else:
        first = _cat(q0, q1)
        second = _cat(q2, q3)
    return first, second


@triton.jit
def _coef(s_ptr, o_ptr, xs_ptr, g, rows, rt, mask_n, mask_t, n_groups, MAGIC: tl.constexpr, XS: tl.constexpr):
    """Group ``g``'s affine coefficients ``s`` and ``o - MAGIC s`` ``[BN]`` (fp32) and, with
    ``XS == 1``, the precomputed ``sum x`` of the group ``[BT]`` (else zeros)."""
    s = tl.load(s_ptr + rows + g, mask=mask_n, other=0).to(tl.float32)
    o = tl.load(o_ptr + rows + g, mask=mask_n, other=0).to(tl.float32)
    if XS == 1:
        xs = tl.load(xs_ptr + rt * n_groups + g, mask=mask_t, other=0.0)
    else:
        xs = tl.zeros(rt.shape, dtype=tl.float32)
    return s, o - MAGIC * s, xs


@triton.jit
def int4_kernel(x_ptr, xs_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, T, N, K, KQ, stride_x, SPLIT_K,
                GROUP: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr, DOT_IEEE: tl.constexpr,
                HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, XS: tl.constexpr, PDL: tl.constexpr,
                PF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    U: tl.constexpr = 64 if GROUP == 32 else GROUP  # columns of a layout unit
    P: tl.constexpr = U // 4  # columns of a part = int16 elements of a row per unit
    H: tl.constexpr = U // GROUP  # groups per unit (1, or 2 for groups of 32)
    GT: tl.constexpr = BLOCK_K // GROUP  # groups per K tile
    if DOT_IEEE:
        WT: tl.constexpr = tl.float32
    else:
        WT: tl.constexpr = x_ptr.dtype.element_ty
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_n = rn < N
    mask_t = rt < T
    rn64 = rn.to(tl.int64)
    rt64 = rt.to(tl.int64)
    n_groups = K // GROUP  # KQ = K // 4 is an argument: Triton then knows the rows are 16-byte aligned
    w_rows = qw_ptr + rn64[:, None] * KQ + tl.arange(0, P)[None, :]  # [BN, P]
    xt_cols = x_ptr + rt64[None, :] * stride_x + tl.arange(0, GROUP)[:, None]  # [G, BT]: x.T of a group
    g_rows = rn64 * n_groups  # [BN]
    # this split's K tiles: a contiguous run (consecutive loads of a row are adjacent in memory)
    n_kt = K // BLOCK_K
    per = tl.cdiv(n_kt, SPLIT_K)
    k_lo = pid_k * per
    k_hi = tl.minimum(k_lo + per, n_kt)
    if PDL:
        if PF > 0:  # this program's first PF K tiles of each row (BLOCK_K / 2 bytes per tile)
            n_pf = tl.maximum(tl.minimum(k_hi, k_lo + PF) - k_lo, 0)
            first = qw_ptr + tl.minimum(rn, N - 1).to(tl.int64) * KQ + k_lo * (BLOCK_K // 4)  # [BN]
            _prefetch_l2(first, n_pf * (BLOCK_K // 2))
        tl.extra.cuda.gdc_wait()  # the previous kernel (x's producer) has finished
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    s_c, c_c, xs_c = _coef(s_ptr, o_ptr, xs_ptr, tl.minimum(k_lo, n_kt - 1) * GT, g_rows, rt, mask_n, mask_t, n_groups,
                           MAGIC, XS)
    for kt in range(k_lo, k_hi):
        # the next tile's first-group coefficients, loaded one iteration ahead (latency hidden)
        s_n, c_n, xs_n = _coef(s_ptr, o_ptr, xs_ptr, tl.minimum(kt + 1, n_kt - 1) * GT, g_rows, rt, mask_n, mask_t,
                               n_groups, MAGIC, XS)
        for u in tl.static_range(BLOCK_K // U):
            ku = kt * BLOCK_K + u * U
            b = tl.load(w_rows + ku // 4, mask=mask_n[:, None], other=0)  # [BN, P] int16
            qa0, qa1 = _unit_operands(b, MAGIC, WT, ASM, H)  # [BN, U] (H 1), or groups 2u and 2u + 1
            for h in tl.static_range(H):
                if h == 0:
                    qa = qa0
                else:
                    qa = qa1
                xt = tl.load(xt_cols + (ku + h * GROUP), mask=mask_t[None, :], other=0.0)  # [G, BT]
                if DOT_IEEE:
                    accg = tl.dot(qa, xt.to(tl.float32), input_precision="ieee")  # [BN, BT]
                else:
                    accg = tl.dot(qa, xt)
                if u == 0 and h == 0:
                    s, c, xs = s_c, c_c, xs_c
                else:
                    s, c, xs = _coef(s_ptr, o_ptr, xs_ptr, ku // GROUP + h, g_rows, rt, mask_n, mask_t, n_groups,
                                     MAGIC, XS)
                if XS == 0:
                    xs = tl.sum(xt.to(tl.float32), axis=0)  # [BT]
                if XS == 2:
                    ones = tl.full(qa.shape, 1.0, qa.dtype)
                    if DOT_IEEE:
                        xsb = tl.dot(ones, xt.to(tl.float32), input_precision="ieee")  # [BN, BT], rows = sum x
                    else:
                        xsb = tl.dot(ones, xt)
                    acc += accg * s[:, None] + c[:, None] * xsb
                else:
                    acc += accg * s[:, None] + c[:, None] * xs[None, :]
        s_c, c_c, xs_c = s_n, c_n, xs_n
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    mask_out = mask_n[:, None] & mask_t[None, :]
    out_off = rt64[None, :] * N + rn[:, None]  # [BN, BT]
    if not USE_SPLIT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        # partial of this split; the last of the tile's SPLIT_K programs to arrive adds them
        # in the fixed order 0..SPLIT_K-1 (deterministic) and stores the output
        tl.store(part_ptr + pid_k.to(tl.int64) * T * N + out_off, acc, mask=mask_out)
        tl.debug_barrier()
        cnt = cnt_ptr + pid_n * tl.num_programs(1) + pid_t
        arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            tl.store(cnt, 0)  # every program of the tile has counted: ready for the next launch
            total = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
            parts = part_ptr + out_off
            for _ in range(SPLIT_K):
                total += tl.load(parts, mask=mask_out, other=0.0, cache_modifier=".cg")
                parts += T * N
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=mask_n, other=0).to(tl.float32)[:, None]
            tl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=mask_out)
