"""The ``softmax_topk`` router of a few tokens (decode) in one Triton kernel.

For ``x [T, H]`` and the router weight ``W [E, H]`` it computes what ``SoftmaxTopKRouter``
returns (``ktcore.ops.router``), with the top-k of ``small_topk`` (ties to the lower expert
index, NaN before every number):

    logits = x @ W^T            fp32 accumulation; rounded to x's dtype unless fp32_logits
    p = softmax(logits)         fp32; a row with a NaN logit is all NaN, as in torch
    ids, w = top-k of p         ordered by p, highest first
    w = w / (sum(w) + 1e-20)    when renormalising (over the ``n_active`` kept places)
    w = w * scale               routed_scaling_factor

One launch, grid ``(E,)``: program ``e`` streams row ``e`` of ``W`` once for all ``T``
tokens (elementwise fp32 products accumulated over ``BLOCK_H`` lanes, then one tree sum, so
each logit is computed by one program in a fixed order: deterministic) and writes
``logits[:, e]`` to a scratch buffer. It then adds one to ``counter`` (acq_rel, GPU scope);
the program that sees ``E - 1`` is the last, reads all logits back past L1 and ranks every
token at once as a ``[T, E]`` tile, then sets ``counter`` back to 0, so every launch finds
it at 0: a CUDA graph replays the kernel as often as it likes. ``counter`` is an int32
``[1]`` buffer of the router module (one per router: two launches sharing a counter must
not run concurrently).

Ranking: each score is mapped to an int64 key whose order is the ranking order: the float's
bits made monotone (NaN as the largest), shifted up 32 bits, with ``E_PAD - 1 - e`` below so
equal scores prefer the lower expert. Each of the K places is then one max-reduction per
token; the chosen key is cleared, and the score is read back from the key's high bits.

Kernels call no ``@triton.jit`` function of Triton's standard library (``tl.sum``,
``tl.max``...): reductions go through ``tl.reduce`` with the combine functions below, so
the interpreter tests work whatever the import order (see ``ktcore.ops.gqa_decode``).

Registered as ``torch.ops.ktcore.router_topk`` (``custom_op`` + ``register_fake``) when this
module is imported; ``ktcore.ops.router`` imports it on its CUDA decode path only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: The key bits of a NaN score: above those of every number (+inf is 0x7F800000).
_NAN_KEY = 0x7FFFFFFF


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b)


@triton.jit
def _rounded(v, dtype: tl.constexpr):
    """fp32 ``v`` rounded to the nearest ``dtype`` value (ties to even), kept in fp32. bf16 by
    bit arithmetic: Triton's interpreter truncates a float32 -> bfloat16 cast."""
    if dtype == tl.float32:
        return v
    elif dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # NaN payloads could carry out
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def _router_kernel(x_ptr, w_ptr, logits_ptr, counter_ptr, ids_ptr, weights_ptr,
                   T, H, E, n_active, scale, s_x, s_w,
                   K: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                   BLOCK_H: tl.constexpr, FP32_LOGITS: tl.constexpr, RENORM: tl.constexpr):
    e = tl.program_id(0)
    tt = tl.arange(0, T_PAD)  # [TP]
    mask_t = tt < T
    hh = tl.arange(0, BLOCK_H)  # [BH]
    acc = tl.full((T_PAD, BLOCK_H), 0.0, dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        mask_h = h < H
        w = tl.load(w_ptr + e.to(tl.int64) * s_w + h, mask=mask_h, other=0)  # [BH]
        x = tl.load(x_ptr + tt[:, None].to(tl.int64) * s_x + h[None, :],
                    mask=mask_t[:, None] & mask_h[None, :], other=0)  # [TP, BH]
        w = w.to(tl.float32)
        if not FP32_LOGITS:
            w = _rounded(w, x_ptr.dtype.element_ty)  # the torch path: weight.to(x.dtype)
        acc += x.to(tl.float32) * w[None, :]
    logit = tl.reduce(acc, 1, _add)  # [TP]
    if not FP32_LOGITS:
        logit = _rounded(logit, x_ptr.dtype.element_ty)  # F.linear's output dtype
    tl.store(logits_ptr + tt * E + e, logit, mask=mask_t)

    tl.debug_barrier()  # every thread's logits are stored before the release below
    finished = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if finished == E - 1:  # the last program: every logit is written
        ee = tl.arange(0, E_PAD)  # [EP]
        valid = mask_t[:, None] & (ee < E)[None, :]  # [TP, EP]
        logits = tl.load(logits_ptr + tt[:, None] * E + ee[None, :], mask=valid, other=float("-inf"),
                         cache_modifier=".cg")  # [TP, EP]
        logits = tl.where(mask_t[:, None], logits, 0.0)  # padding tokens: finite, never stored
        nan = logits != logits
        row_nan = tl.reduce(nan.to(tl.int32), 1, _maximum) > 0  # [TP]
        top = tl.reduce(tl.where(nan, float("-inf"), logits), 1, _maximum)  # [TP]
        ex = tl.exp(logits - top[:, None])  # [TP, EP]; padding: 0 (or NaN in a padded row)
        p = ex / tl.reduce(tl.where((ee < E)[None, :], ex, 0.0), 1, _add)[:, None]
        p = tl.where(row_nan[:, None], float("nan"), p) + 0.0  # + 0.0: no -0.0 (it would rank below +0.0)

        bits = p.to(tl.int32, bitcast=True)
        bits = tl.where(p != p, _NAN_KEY, bits ^ ((bits >> 31) & 0x7FFFFFFF))  # monotone in p as signed ints
        low = (E_PAD - 1 - ee).to(tl.int64)  # [EP]: higher for the lower expert
        key = (bits.to(tl.int64) << 32) | low[None, :]  # [TP, EP]
        taken = -0x7FFFFFFFFFFFFFFF - 1
        key = tl.where(valid, key, taken)
        kk = tl.arange(0, K_PAD)  # [KP]
        ids = tl.full((T_PAD, K_PAD), 0, dtype=tl.int32)
        weights = tl.full((T_PAD, K_PAD), 0.0, dtype=tl.float32)
        for k in tl.static_range(K):
            best = tl.reduce(key, 1, _maximum)  # [TP]
            expert = (E_PAD - 1 - (best & 0x7FFFFFFF)).to(tl.int32)  # [TP]
            key = tl.where(ee[None, :] == expert[:, None], taken, key)
            vbits = (best >> 32).to(tl.int32)
            vbits = vbits ^ ((vbits >> 31) & 0x7FFFFFFF)  # the mapping is its own inverse
            value = vbits.to(tl.float32, bitcast=True)  # [TP]
            keep = k < n_active  # the last K - n_active places: padding id E, weight 0
            ids = tl.where(kk[None, :] == k, tl.where(keep, expert, E)[:, None], ids)
            weights = tl.where(kk[None, :] == k, tl.where(keep, value, 0.0)[:, None], weights)
        if RENORM:
            weights = weights / (tl.reduce(weights, 1, _add)[:, None] + 1e-20)
        weights = weights * scale
        out = tt[:, None] * K + kk[None, :]
        mask_out = mask_t[:, None] & (kk < K)[None, :]
        tl.store(ids_ptr + out, ids, mask=mask_out)
        tl.store(weights_ptr + out, weights, mask=mask_out)
        tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch (or graph replay)


def choose_config(tokens: int, hidden: int, experts: int, device: torch.device) -> dict:
    """Tile sizes from shapes only (capture-safe)."""
    t_pad = triton.next_power_of_2(max(tokens, 1))
    if device.type != "cuda":  # the interpreter: small H tiles, to exercise the loop and its tail
        return dict(T_PAD=t_pad, BLOCK_H=32, num_warps=4)
    # about 4K fp32 lanes of products per program: the whole row of W (2048 bf16) for one token,
    # 256 columns a step for 16
    block_h = max(64, min(triton.next_power_of_2(hidden), 4096 // t_pad))
    ranked = t_pad * triton.next_power_of_2(experts)  # the last program's [T, E] tile
    return dict(T_PAD=t_pad, BLOCK_H=block_h, num_warps=8 if ranked >= 4096 else 4)


def launch(x: torch.Tensor, weight: torch.Tensor, counter: torch.Tensor, top_k: int, n_active: int,
           renormalize: bool, scale: float, fp32_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] (rows contiguous), counter int32 [1] at 0 -> ids int32 [T, K],
    weights fp32 [T, K]."""
    tokens, hidden = x.shape
    experts = weight.shape[0]
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=x.device)
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return ids, weights
    logits = torch.empty((tokens, experts), dtype=torch.float32, device=x.device)  # scratch
    cfg = choose_config(tokens, hidden, experts, x.device)
    with torch.device(x.device):
        _router_kernel[(experts,)](
            x, weight, logits, counter, ids, weights,
            tokens, hidden, experts, n_active, scale, x.stride(0), weight.stride(0),
            K=top_k, E_PAD=triton.next_power_of_2(experts), K_PAD=triton.next_power_of_2(top_k),
            FP32_LOGITS=fp32_logits, RENORM=renormalize, **cfg)
    return ids, weights


def _check(x: torch.Tensor, weight: torch.Tensor, counter: torch.Tensor, top_k: int, n_active: int) -> None:
    """Shape checks on the host (shapes only: no synchronisation)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"router_topk: x must be [T, H] and weight [E, H], got {tuple(x.shape)}, {tuple(weight.shape)}")
    if counter.shape != (1,) or counter.dtype != torch.int32:
        raise ValueError(f"router_topk: counter must be int32 [1], got {counter.dtype} {tuple(counter.shape)}")
    if not 1 <= n_active <= top_k <= weight.shape[0]:
        raise ValueError(f"router_topk: need 1 <= n_active={n_active} <= top_k={top_k} <= E={weight.shape[0]}")


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("ktcore::router_topk", mutates_args=())
def router_topk(x: torch.Tensor, weight: torch.Tensor, counter: torch.Tensor, top_k: int, n_active: int,
                renormalize: bool, scale: float, fp32_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [T, K], weights fp32 [T, K]) of the softmax top-k router; see the module
    docstring. ``counter`` is written during the launch and is back at 0 when it ends."""
    _check(x, weight, counter, top_k, n_active)
    return launch(_rows_contiguous(x), _rows_contiguous(weight), counter, top_k, n_active, renormalize,
                  scale, fp32_logits)


@router_topk.register_fake
def _(x, weight, counter, top_k, n_active, renormalize, scale, fp32_logits):
    _check(x, weight, counter, top_k, n_active)
    return (x.new_empty((x.shape[0], top_k), dtype=torch.int32),
            x.new_empty((x.shape[0], top_k), dtype=torch.float32))
