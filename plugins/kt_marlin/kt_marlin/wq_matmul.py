"""Weight-only quantised matmul: ``y[T, N] = x[T, K] @ dequant(W)[N, K].T (+ b)``.

One Triton kernel for int4 (affine) and int8 (symmetric) group-wise weights in the layout
of ``kt_marlin.packing``, two paths chosen by ``constexpr``:

- GEMV (``T == 1``): a program owns ``BLOCK_N`` output rows and walks K in ``BLOCK_K`` steps;
  each step loads a ``[BLOCK_N, BLOCK_K / 8]`` tile of int32 words (16-byte vectors along K),
  unpacks the nibbles, applies the per-group scale/offset in fp32 and reduces ``w * x`` along
  K in registers. Split-K over programs fills the GPU when N is small; the fp32 partial sums
  are added by one ``sum`` afterwards (deterministic, no atomics).
- tile + ``tl.dot`` (``T > 1``): the same dequantised tile, cast to the dtype of x, feeds the
  tensor cores against a ``[BLOCK_T, BLOCK_K]`` tile of x (``BLOCK_T`` 16 for small batches
  up to 64 for prefill). fp32 activations use an fp32 ("ieee") dot; so do CPU tensors, which
  only Triton's interpreter runs (its bf16 ``tl.dot`` multiplies the raw bits).

Registered as ``torch.ops.kt_marlin.wq_matmul`` (``custom_op`` + ``register_fake``): no host
synchronisation, fixed allocations, so it captures in CUDA graphs and compiles fullgraph.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl


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


def _block_k(k: int, group: int, target: int) -> int:
    """The largest ``group * 2^i <= max(target, group)`` that divides K."""
    bk = group
    while bk * 2 <= target and k % (bk * 2) == 0:
        bk *= 2
    return bk


def choose_config(t: int, n: int, k: int, bits: int, group: int, device: torch.device) -> dict:
    """Tile sizes and split-K for one call (host-side, from shapes only)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 8
    if t == 1:
        cfg = dict(BLOCK_T=1, BLOCK_N=16, BLOCK_K=_block_k(k, group, 256 if bits == 4 else 128), num_warps=4)
    elif t <= 64:
        bt = 16 if t <= 16 else (32 if t <= 32 else 64)
        cfg = dict(BLOCK_T=bt, BLOCK_N=32, BLOCK_K=_block_k(k, group, 128), num_warps=4)
    else:
        cfg = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=_block_k(k, group, 64), num_warps=4)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(t, cfg["BLOCK_T"])
    k_tiles = k // cfg["BLOCK_K"]
    split = 1
    while tiles * split < 2 * sms and split * 2 <= k_tiles and split < 16:
        split *= 2
    cfg["SPLIT_K"] = split
    return cfg


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], bits: int, group: int, config: dict | None = None) -> torch.Tensor:
    """The kernel on ``x[T, K]`` (contiguous rows); ``config`` overrides the heuristic."""
    t, k = x.shape
    n = qweight.shape[0]
    cfg = dict(config or choose_config(t, n, k, bits, group, x.device))
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    split = cfg.pop("SPLIT_K")
    part = torch.empty((split, t, n), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(t, cfg["BLOCK_T"]), split)
    with torch.device(x.device):
        _wq_matmul_kernel[grid](
            x, qweight, scales, offsets if offsets is not None else scales, bias if bias is not None else scales,
            out, part, t, n, k, x.stride(0),
            BITS=bits, GROUP=group, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
            USE_DOT=cfg["BLOCK_T"] > 1, DOT_IEEE=x.dtype == torch.float32 or x.device.type == "cpu", **cfg)
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
