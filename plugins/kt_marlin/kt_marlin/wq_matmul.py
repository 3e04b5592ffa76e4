"""Weight-only quantised matmul: ``y[T, N] = x[T, K] @ dequant(W)[N, K].T (+ b)``.

Weights in the layout of ``kt_marlin.packing`` (int4 words ``[N, K/8]``, nibble ``j`` of word
``w`` is column ``8w + j``; int8 ``[N, K]``; scales/offsets ``[N, K/G]``). Two kernels:

``_int4_kernel`` (every int4 call), built for memory bandwidth at decode sizes:

- No reshape of nibbles into columns. A ``BLOCK_K`` step loads the words as a 3-D tile
  ``[BLOCK_N, BLOCK_K/G, G/8]`` (row, group, word of the group; 16-byte vectors along K), and
  nibble ``j`` of it is the 3-D slice of columns ``g*G + 8w + j``, multiplied by the matching
  strided slice of x (a sum over K does not care about the order).
- Nibbles become fp32 without an int->float conversion (16/clk/SM on Hopper, below the
  weight rate HBM delivers): nibble ``j`` at bits ``4jj..4jj+3`` (``jj = j % 4``, the upper
  four from ``word >> 16``) is OR-ed into the mantissa of ``2^(23-4jj)``, so
  ``bitcast(word & (15 << 4jj) | (150 - 4jj) << 23) - 2^(23-4jj) == q`` exactly: one LOP3 and
  one FADD per weight, no shift.
- The affine part leaves the inner loop: ``y = sum_g s_g * sum_{k in g} q_k x_k + o_g *
  sum_{k in g} x_k``. Per weight: LOP3, FADD and one FFMA per token; the scale/offset work is
  per group.
- Path ``fma`` (``BLOCK_T`` 1..8 tokens): products summed in registers, the weights unpacked
  once for all the tokens of the program. Path ``dot`` (``BLOCK_T >= 16``): per group and
  nibble a ``tl.dot`` of x ``[BLOCK_T, G/8]`` against the exact integers q (exact in bf16 /
  fp16) for group 128, scale and offset applied to the fp32 group result; for groups 32/64
  (``G/8 < 16``, too short for a dot) the dequantised ``s q + o`` in x's dtype per slice.
- Split-K (``SPLIT_K`` programs per output tile along K) when the tiles alone cannot fill the
  GPU: each program stores its fp32 partial, bumps the tile's counter (acq_rel atomic), and
  the program that arrives last adds the ``SPLIT_K`` partials **in the fixed order 0..S-1**,
  adds the bias and stores: deterministic (bit-for-bit whatever the arrival order), one
  launch, no separate reduction pass (the counters come from a ``torch.zeros``).

``_wq_matmul_kernel`` (int8, and the previous int4 kernel, kept as the ``legacy`` candidate of
``bench/sweep_gemv.py`` so that a regression shows): dequantised ``[BLOCK_N, BLOCK_K]`` tile
(reshaped from ``[BN, BK/8, 8]`` nibbles), fp32 GEMV for one token, ``tl.dot`` above; split-K
partials added by ``sum`` afterwards.

Config choice: ``choose_config`` looks up ``GEMV_TABLE[(shape_class(N, K), t_bucket(T))]``;
the table is the built-in ``DEFAULT_TABLE`` updated from ``kt_marlin/gemv_table.json`` when that
file exists (or from the file ``$KT_MARLIN_GEMV_TABLE`` names), the ``table`` of the JSON
``bench/sweep_gemv.py`` writes. fp32 activations use an fp32 ("ieee") dot; so do CPU tensors,
which only Triton's interpreter runs (its bf16 ``tl.dot`` multiplies the raw bits).

Registered as ``torch.ops.kt_marlin.wq_matmul`` (``custom_op`` + ``register_fake``): no host
synchronisation, fixed allocations, so it captures in CUDA graphs and compiles fullgraph.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _nibble(words, hi, J: tl.constexpr):
    """Nibble ``J`` of int32 ``words`` (``hi = words >> 16``) as exact fp32 integers 0..15."""
    JJ: tl.constexpr = J % 4
    MASK: tl.constexpr = 15 << (4 * JJ)
    MAGIC: tl.constexpr = (150 - 4 * JJ) << 23  # the float 2^(23 - 4 JJ)
    BIAS: tl.constexpr = 2.0 ** (23 - 4 * JJ)
    if J < 4:
        src = words
    else:
        src = hi
    return ((src & MASK) | MAGIC).to(tl.float32, bitcast=True) - BIAS


@triton.jit
def _int4_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, T, N, K, KW, stride_x, SPLIT_K,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,
                 USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per step
    WG: tl.constexpr = GROUP // 8  # words per group
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_n = rn < N
    mask_t = rt < T
    rn64 = rn.to(tl.int64)
    rt64 = rt.to(tl.int64)
    n_groups = K // GROUP  # KW = K // 8 is an argument: Triton then knows when rows are 16-byte aligned
    rw = tl.arange(0, WG)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    if not USE_DOT:
        rg = tl.arange(0, NG)
        w_off = rn64[:, None, None] * KW + (rg * WG)[None, :, None] + rw[None, None, :]  # [BN, NG, WG]
        x_off = rt64[:, None, None] * stride_x + (rg * GROUP)[None, :, None] + (rw * 8)[None, None, :]  # [BT, NG, WG]
        g_off = rn64[:, None] * n_groups + rg[None, :]  # [BN, NG]
        for kt in range(pid_k, K // BLOCK_K, SPLIT_K):
            k0 = kt * BLOCK_K
            words = tl.load(qw_ptr + w_off + k0 // 8, mask=mask_n[:, None, None], other=0)
            hi = words >> 16
            p = tl.zeros((BLOCK_T, BLOCK_N, NG, WG), dtype=tl.float32)
            xs = tl.zeros((BLOCK_T, NG, WG), dtype=tl.float32)
            for j in tl.static_range(8):
                q = _nibble(words, hi, j)  # [BN, NG, WG]: columns k0 + g G + 8 w + j
                xj = tl.load(x_ptr + x_off + (k0 + j), mask=mask_t[:, None, None], other=0.0).to(tl.float32)
                xs += xj
                p += q[None, :, :, :] * xj[:, None, :, :]
            s = tl.load(s_ptr + g_off + k0 // GROUP, mask=mask_n[:, None], other=0).to(tl.float32)  # [BN, NG]
            o = tl.load(o_ptr + g_off + k0 // GROUP, mask=mask_n[:, None], other=0).to(tl.float32)
            d = tl.sum(p, axis=3)  # [BT, BN, NG]: sum_k q x per group
            xg = tl.sum(xs, axis=2)  # [BT, NG]: sum_k x per group
            acc += tl.sum(d * s[None, :, :] + xg[:, None, :] * o[None, :, :], axis=2)
    else:
        x_rows = x_ptr + rt64 * stride_x  # [BT]
        for kt in range(pid_k, K // BLOCK_K, SPLIT_K):
            k0 = kt * BLOCK_K
            if WG >= 16:  # a dot per group and nibble on the exact integers, affine part per group
                for g in tl.static_range(NG):
                    kg = k0 + g * GROUP
                    words = tl.load(qw_ptr + rn64[:, None] * KW + (kg // 8 + rw)[None, :], mask=mask_n[:, None], other=0)
                    hi = words >> 16
                    accg = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
                    xg = tl.zeros((BLOCK_T,), dtype=tl.float32)
                    for j in tl.static_range(8):
                        q = _nibble(words, hi, j)  # [BN, WG]: columns kg + 8 w + j
                        xj = tl.load(x_rows[:, None] + (kg + 8 * rw + j)[None, :], mask=mask_t[:, None], other=0.0)
                        xg += tl.sum(xj.to(tl.float32), axis=1)
                        if DOT_IEEE:
                            accg += tl.dot(xj.to(tl.float32), tl.trans(q), input_precision="ieee")
                        else:
                            accg += tl.dot(xj, tl.trans(q.to(xj.dtype)))
                    s = tl.load(s_ptr + rn64 * n_groups + kg // GROUP, mask=mask_n, other=0).to(tl.float32)
                    o = tl.load(o_ptr + rn64 * n_groups + kg // GROUP, mask=mask_n, other=0).to(tl.float32)
                    acc += accg * s[None, :] + xg[:, None] * o[None, :]
            else:  # groups 32/64: dequantised slices (s q + o in x's dtype), as fused_moe
                rwk = tl.arange(0, BLOCK_K // 8)
                words = tl.load(qw_ptr + rn64[:, None] * KW + (k0 // 8 + rwk)[None, :], mask=mask_n[:, None], other=0)
                hi = words >> 16
                gofs = rn64[:, None] * n_groups + ((k0 + 8 * rwk) // GROUP)[None, :]  # [BN, BK/8]
                s = tl.load(s_ptr + gofs, mask=mask_n[:, None], other=0).to(tl.float32)
                o = tl.load(o_ptr + gofs, mask=mask_n[:, None], other=0).to(tl.float32)
                for j in tl.static_range(8):
                    w = _nibble(words, hi, j) * s + o  # [BN, BK/8]: columns k0 + 8 w + j
                    xj = tl.load(x_rows[:, None] + (k0 + 8 * rwk + j)[None, :], mask=mask_t[:, None], other=0.0)
                    if DOT_IEEE:
                        acc += tl.dot(xj.to(tl.float32), tl.trans(w), input_precision="ieee")
                    else:
                        acc += tl.dot(xj, tl.trans(w.to(xj.dtype)))
    mask_out = mask_t[:, None] & mask_n[None, :]
    out_off = rt64[:, None] * N + rn[None, :]
    if not USE_SPLIT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        # partial of this split; the last of the tile's SPLIT_K programs to arrive adds them
        # in the fixed order 0..SPLIT_K-1 (deterministic) and stores the output
        tl.store(part_ptr + pid_k.to(tl.int64) * T * N + out_off, acc, mask=mask_out)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n * tl.num_programs(1) + pid_t, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            parts = part_ptr + out_off
            for _ in range(SPLIT_K):
                total += tl.load(parts, mask=mask_out, other=0.0, cache_modifier=".cg")
                parts += T * N
            if HAS_BIAS:
                total += tl.load(b_ptr + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
            tl.store(out_ptr + out_off, total.to(out_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def _wq_matmul_kernel(x_ptr, qw_ptr, s_ptr, o_ptr, b_ptr, out_ptr, part_ptr, T, N, K, stride_x,
                      BITS: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_IEEE: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_n = rn < N
    mask_t = rt < T
    rn64 = rn.to(tl.int64)
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, K // BLOCK_K, SPLIT_K):
        k0 = kt * BLOCK_K
        if BITS == 4:
            rw = k0 // 8 + tl.arange(0, BLOCK_K // 8)
            words = tl.load(qw_ptr + rn64[:, None] * (K // 8) + rw[None, :], mask=mask_n[:, None], other=0)
            shifts = tl.arange(0, 8) * 4
            q = (words[:, :, None] >> shifts[None, None, :]) & 15  # [BN, BK/8, 8]
            q = tl.reshape(q, (BLOCK_N, BLOCK_K))
        else:
            rk = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(qw_ptr + rn64[:, None] * K + rk[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
        rg = k0 // GROUP + tl.arange(0, NG)
        s = tl.load(s_ptr + rn64[:, None] * n_groups + rg[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        w = tl.reshape(q.to(tl.float32), (BLOCK_N, NG, GROUP)) * s[:, :, None]
        if BITS == 4:
            o = tl.load(o_ptr + rn64[:, None] * n_groups + rg[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
            w = w + o[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        rk = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + rt[:, None].to(tl.int64) * stride_x + rk[None, :], mask=mask_t[:, None], other=0)
        if USE_DOT:
            if DOT_IEEE:
                acc += tl.dot(xk.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xk, tl.trans(w.to(xk.dtype)))
        else:
            acc += tl.sum(w * xk.to(tl.float32), axis=1)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
        ptrs = out_ptr + rt[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])
    else:
        ptrs = part_ptr + (pid_k * T + rt[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(ptrs, acc, mask=mask_t[:, None] & mask_n[None, :])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _block_k(k: int, group: int, target: int) -> int:
    """The largest ``group * 2^i <= max(target, group)`` that divides K."""
    bk = group
    while bk * 2 <= target and k % (bk * 2) == 0:
        bk *= 2
    return bk


def _split(tiles: int, k_tiles: int, waves: float, sms: int, max_split: int = 32) -> int:
    """Smallest power-of-two split-K giving ``tiles * split >= waves * sms`` programs."""
    split = 1
    while tiles * split < waves * sms and split * 2 <= k_tiles and split < max_split:
        split *= 2
    return split


# ------------------------------------------------------------------------------------------
# Config table for int4: (shape class, token bucket) -> tile config. Entries:
#   path "fma" | "dot" | "legacy", BLOCK_T, BLOCK_N, BLOCK_K (a target: the largest
#   group * 2^i <= it dividing K), WAVES (split K until tiles * split >= WAVES * SMs; 0: never),
#   num_warps, num_stages.
# bench/sweep_gemv.py measures candidates on the GPU and writes {"table": {...}} with keys
# "<shape class>|<token bucket>"; copy that file to kt_marlin/gemv_table.json (or point
# $KT_MARLIN_GEMV_TABLE at it) and choose_config uses it.

N_CLASSES = ((2048, "n<=2k"), (8192, "n<=8k"), (None, "n>8k"))
K_CLASSES = ((2048, "k<=2k"), (None, "k>2k"))
T_BUCKETS = ((1, "1"), (4, "4"), (16, "16"), (64, "64"), (None, "prefill"))


def shape_class(n: int, k: int) -> str:
    nc = next(name for lim, name in N_CLASSES if lim is None or n <= lim)
    kc = next(name for lim, name in K_CLASSES if lim is None or k <= lim)
    return f"{nc},{kc}"


def t_bucket(t: int) -> str:
    return next(name for lim, name in T_BUCKETS if lim is None or t <= lim)


def _entry(path, bt, bn, bk, waves, warps, stages=1) -> dict:
    return dict(path=path, BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, WAVES=waves, num_warps=warps, num_stages=stages)


#: Built-in guesses (not yet measured: run bench/sweep_gemv.py). Per token bucket, the same
#: for every shape class; the split-K rule adapts them to N.
_BY_T = {
    "1": _entry("fma", 1, 16, 1024, 4, 4),
    "4": _entry("fma", 4, 16, 512, 4, 4),
    "16": _entry("dot", 16, 32, 256, 2, 4),
    "64": _entry("dot", 64, 64, 128, 1, 4),
    "prefill": _entry("dot", 64, 64, 128, 0, 4),
}
DEFAULT_TABLE = {f"{nc},{kc}|{tb}": dict(e) for _, nc in N_CLASSES for _, kc in K_CLASSES for tb, e in _BY_T.items()}
TABLE_FILE = os.path.join(os.path.dirname(__file__), "gemv_table.json")


def load_table(path: str | None = None) -> dict:
    """``DEFAULT_TABLE`` updated by the ``table`` of a ``sweep_gemv.py`` JSON (if it exists)."""
    table = {k: dict(v) for k, v in DEFAULT_TABLE.items()}
    path = path or os.environ.get("KT_MARLIN_GEMV_TABLE") or TABLE_FILE
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        for key, cfg in data.get("table", data).items():
            if key in table:
                table[key].update({k: v for k, v in cfg.items() if k in table[key]})
    return table


GEMV_TABLE = load_table()


def resolve(entry: dict, t: int, n: int, k: int, group: int, device: torch.device) -> dict:
    """A table entry made concrete for one call: BLOCK_K dividing K, BLOCK_T for T, SPLIT_K."""
    path = entry["path"]
    if path == "legacy":
        return legacy_config(t, n, k, 4, group, device)
    bt = entry["BLOCK_T"]
    if path == "fma":
        bt = min(bt, triton.next_power_of_2(t))
    else:
        bt = max(16, min(bt, triton.next_power_of_2(t)))
    target = entry["BLOCK_K"] if path == "fma" else max(entry["BLOCK_K"], 128)
    bk = _block_k(k, group, target)
    if path == "dot" and bk < 128:
        path, bt = "fma", min(8, triton.next_power_of_2(t))  # a dot needs G/8 or BK/8 >= 16 columns
    tiles = triton.cdiv(n, entry["BLOCK_N"]) * triton.cdiv(t, bt)
    split = _split(tiles, k // bk, entry["WAVES"], _sms(device)) if entry["WAVES"] else 1
    return dict(path=path, BLOCK_T=bt, BLOCK_N=entry["BLOCK_N"], BLOCK_K=bk, SPLIT_K=split,
                num_warps=entry["num_warps"], num_stages=entry.get("num_stages", 1))


def legacy_config(t: int, n: int, k: int, bits: int, group: int, device: torch.device) -> dict:
    """The previous heuristic (int8 still uses it; the sweep's ``legacy`` int4 candidate)."""
    sms = _sms(device)
    if t == 1:
        cfg = dict(BLOCK_T=1, BLOCK_N=16, BLOCK_K=_block_k(k, group, 256 if bits == 4 else 128), num_warps=4)
    elif t <= 64:
        bt = 16 if t <= 16 else (32 if t <= 32 else 64)
        cfg = dict(BLOCK_T=bt, BLOCK_N=32, BLOCK_K=_block_k(k, group, 128), num_warps=4)
    else:
        cfg = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=_block_k(k, group, 64), num_warps=4)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(t, cfg["BLOCK_T"])
    split = 1
    while tiles * split < 2 * sms and split * 2 <= k // cfg["BLOCK_K"] and split < 16:
        split *= 2
    cfg["SPLIT_K"] = split
    cfg["path"] = "legacy"
    return cfg


def choose_config(t: int, n: int, k: int, bits: int, group: int, device: torch.device) -> dict:
    """Tile sizes and split-K for one call (host-side, from shapes only)."""
    if bits != 4:
        return legacy_config(t, n, k, bits, group, device)
    entry = GEMV_TABLE[f"{shape_class(n, k)}|{t_bucket(t)}"]
    if device.type == "cpu":  # Triton's interpreter: fewer, larger programs run faster
        entry = dict(entry, BLOCK_N=max(entry["BLOCK_N"], 32))
    return resolve(entry, t, n, k, group, device)


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], bits: int, group: int, config: dict | None = None) -> torch.Tensor:
    """The kernel on ``x[T, K]`` (contiguous rows); ``config`` overrides the heuristic (a
    resolved config: ``path`` fma/dot/legacy, ``BLOCK_T/N/K``, ``SPLIT_K``, ``num_warps``,
    optional ``num_stages``; a config without ``path`` is a legacy-kernel one)."""
    t, k = x.shape
    n = qweight.shape[0]
    cfg = dict(config or choose_config(t, n, k, bits, group, x.device))
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    path = cfg.pop("path", "legacy")
    split = cfg.pop("SPLIT_K")
    if bits != 4:
        path = "legacy"
    if k % cfg["BLOCK_K"] or cfg["BLOCK_K"] % group:
        raise ValueError(f"wq_matmul: BLOCK_K={cfg['BLOCK_K']} must divide K={k} and be a multiple of {group}")
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(t, cfg["BLOCK_T"]), split)
    dot_ieee = x.dtype == torch.float32 or x.device.type == "cpu"
    offs = offsets if offsets is not None else scales
    b = bias if bias is not None else scales
    if path != "legacy":
        part = torch.empty((split, t, n), dtype=torch.float32, device=x.device) if split > 1 else out
        cnt = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x.device) if split > 1 else out
        with torch.device(x.device):
            _int4_kernel[grid](x, qweight, scales, offs, b, out, part, cnt, t, n, k, k // 8, x.stride(0), split,
                               GROUP=group, HAS_BIAS=bias is not None, USE_SPLIT=split > 1,
                               USE_DOT=path == "dot", DOT_IEEE=dot_ieee, **cfg)
        return out
    cfg.pop("num_stages", None)
    part = torch.empty((split, t, n), dtype=torch.float32, device=x.device) if split > 1 else out
    with torch.device(x.device):
        _wq_matmul_kernel[grid](
            x, qweight, scales, offs, b, out, part, t, n, k, x.stride(0),
            BITS=bits, GROUP=group, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
            USE_DOT=cfg["BLOCK_T"] > 1, DOT_IEEE=dot_ieee, **cfg)
    if split > 1:
        y = part.sum(0)
        if bias is not None:
            y = y + bias.float()
        out.copy_(y)
    return out


@torch.library.custom_op("kt_marlin::wq_matmul", mutates_args=())
def wq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], bits: int, group: int) -> torch.Tensor:
    """``x[T, K] @ W.T (+ bias)`` for a packed int4/int8 ``W``; returns ``[T, N]`` in x's dtype."""
    return launch(x.contiguous(), qweight, scales, offsets, bias, bits, group)


@wq_matmul.register_fake
def _(x, qweight, scales, offsets, bias, bits, group):
    return x.new_empty((x.shape[0], qweight.shape[0]))
