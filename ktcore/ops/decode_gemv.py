"""One-row dense linear layers on CUDA (the decode step): ``y = x W^T + b`` for a single row of
x as a Triton GEMV that streams W once.

At one token a linear layer is a matrix-vector product bound by reading W. In the captured
decode step of the Qwen3-30B-A3B shape (session 7 profile, H200) cuBLAS took 7.4 µs for the
fused q/k/v projection (21 MB, 2.8 TB/s) and 7.0 + 1.8 µs for o_proj (16.8 MB: a split-K
kernel and its reduce). This kernel has no split over K, so one launch and a fixed order of
additions:

- grid ``cdiv(N, BLOCK_N)``: a program owns ``BLOCK_N`` rows of W (4: many programs per SM,
  so many loads in flight without a split over K);
- it walks K in ``BLOCK_K`` columns, accumulating ``w * x`` elementwise in an fp32
  ``[BLOCK_N, BLOCK_K]`` tile (no reduction inside the loop), and reduces the tile once;
- bias added in fp32, one rounding to W's dtype, as ``F.linear`` does.

The sum is in another order than cuBLAS's, so results differ from ``F.linear`` by rounding
(tests: relative error at most a few ulps of the output). The eager and the captured decode
step both go through ``linear`` below, so they agree with each other.

Like ``ktcore.ops.gqa_decode``, the kernel calls no ``@triton.jit`` function of Triton's
standard library (``tl.sum`` is ``tl.reduce`` with a combine function, ``tl.zeros`` is ``tl.full``), so Triton's
interpreter runs it whatever the import order. Registered as ``torch.ops.ktcore.decode_gemv``
(``custom_op`` + ``register_fake``) on import of this module, which ``linear`` does on its
CUDA path only (it needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device

@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, HAS_BIAS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [K], w [N, K] (rows contiguous), b [N], y [N]."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok = rows < N
    row_start = rows.to(tl.int64) * K  # [BN]: int64, W may pass 2**31 elements
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, dtype=tl.float32)  # [BN, BK]
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BK]
        col_ok = cols < K
        xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BK]
        wv = tl.load(w_ptr + row_start[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0, eviction_policy="evict_first").to(tl.float32)  # [BN, BK]
        acc += wv * xv[None, :]
    y = tl.reduce(acc, 1, _add)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


#: Weights up to this many elements take the kernel (``dense_linear``); larger ones (an
#: lm_head) stream as fast through cuBLAS, which was 2% faster at 151936 x 2048.
MAX_ELEMENTS = 1 << 26


def choose_config(n: int, k: int, device: torch.device) -> dict:
    """Four rows per program and 1024 columns per step (or K rounded up to a power of two when
    smaller), 8 warps: the best of 24 tilings (``bench/decode_gemv.py --sweep``) or within 5%
    of it on every projection of the benchmark models on an H200 (session 7)."""
    block_k = min(1024, triton.next_power_of_2(max(k, 16)))
    if device.type != "cuda":  # Triton's interpreter: small tiles, several programs and K steps
        return dict(BLOCK_N=4, BLOCK_K=min(block_k, 32), num_warps=4, num_stages=1)
    return dict(BLOCK_N=4, BLOCK_K=block_k, num_warps=8, num_stages=3)


def launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, config: dict | None = None) -> torch.Tensor:
    """y [N] in w's dtype for x [K], w [N, K] contiguous; ``config`` overrides the tiles."""
    n, k = w.shape
    cfg = dict(config or choose_config(n, k, w.device))
    y = torch.empty(n, dtype=w.dtype, device=w.device)
    block_n = cfg.pop("BLOCK_N")
    with on_device(w):
        _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, w if bias is None else bias, y, n, k,
                                                   HAS_BIAS=bias is not None, BLOCK_N=block_n, **cfg)
    return y


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> None:
    if w.dim() != 2 or not w.is_contiguous():
        raise ValueError(f"decode_gemv: w must be a contiguous [N, K] matrix, got {tuple(w.shape)}")
    if x.shape != (w.shape[1],) or x.dtype != w.dtype or x.device != w.device:
        raise ValueError(f"decode_gemv: x must be [{w.shape[1]}] {w.dtype} on {w.device}, "
                         f"got {tuple(x.shape)} {x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (w.shape[0],) or bias.device != w.device):
        raise ValueError(f"decode_gemv: bias must be [{w.shape[0]}] on {w.device}, got {tuple(bias.shape)}")


@torch.library.custom_op("ktcore::decode_gemv", mutates_args=())
def decode_gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for one row x [K] (w's dtype, contiguous): y [N]."""
    _check(x, w, bias)
    return launch(x.contiguous(), w, bias)


@decode_gemv.register_fake
def _(x, w, bias):
    _check(x, w, bias)
    return w.new_empty(w.shape[0])
