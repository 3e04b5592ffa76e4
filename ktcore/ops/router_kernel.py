"""The MoE router of a few tokens (decode) in one Triton kernel: ``softmax_topk`` and ``noaux_tc``.

For ``x [T, H]`` and the router weight ``W [E, H]`` it computes what ``SoftmaxTopKRouter`` /
``NoAuxTCRouter`` return (``ktcore.ops.router``), with the top-k of ``small_topk`` (ties to
the lower expert or group index, NaN before every number):

    logits = x @ W^T            fp32 accumulation; rounded to x's dtype unless fp32_logits
    softmax_topk:  s = softmax(logits) (fp32; a row with a NaN logit is all NaN, as in torch);
                   ids, w = top-k of s
    noaux_tc:      s = sigmoid(logits); b = s + bias; with groups, b = -inf outside the
                   topk_group groups whose two best b sum highest; ids = top-k of b, w = s[ids]
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

Ranking: each score (and each group's score) is mapped to an int64 key whose order is the ranking order: the float's
bits made monotone (NaN as the largest), shifted up 32 bits, with ``E_PAD - 1 - e`` below so
equal scores prefer the lower expert. Each of the K places is then one max-reduction per
token; the chosen key is cleared, and the score is read back from the key's high bits.
The sigmoid, exp and sums differ from torch's by float rounding only (the weights agree to
~1e-6 relative); the chosen experts differ only where two scores are that close.

Kernels call no ``@triton.jit`` function of Triton's standard library (``tl.sum``,
``tl.max``...): reductions go through ``tl.reduce`` with the combine functions below, so
the interpreter tests work whatever the import order (see ``ktcore.ops.gqa_decode``).

Registered as ``torch.ops.ktcore.router_topk`` (``custom_op`` + ``register_fake``) when this
module is imported; ``ktcore.ops.router`` imports it on its CUDA decode path only.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device

#: The key bits of a NaN score: above those of every number (+inf is 0x7F800000).
_NAN_KEY = tl.constexpr(0x7FFFFFFF)
#: The key of a taken or padding place: below every score's.
_TAKEN = tl.constexpr(-(1 << 63))


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
def _keys(v, valid, low):
    """int64 keys ordered as the ranking of ``v`` (NaN first, then by value), ``low`` (distinct,
    higher for the place that wins a tie) in the low 32 bits; ``_TAKEN`` where not ``valid``."""
    v = v + 0.0  # -0.0 -> +0.0: equal scores must get equal high bits
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(v != v, _NAN_KEY, bits ^ ((bits >> 31) & 0x7FFFFFFF))  # monotone in v as signed ints
    return tl.where(valid, (bits.to(tl.int64) << 32) | low.to(tl.int64), _TAKEN)


@triton.jit
def _key_value(key):
    """The score a key was made from (the bit map of ``_keys`` is its own inverse)."""
    bits = (key >> 32).to(tl.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _softmax(logits, mask_e):
    """fp32 softmax along dim 1 of ``logits [TP, EP]`` over ``mask_e [1, EP]``; a row with a NaN
    logit is all NaN, as in torch."""
    nan = logits != logits
    row_nan = tl.reduce(nan.to(tl.int32), 1, _maximum) > 0  # [TP]
    top = tl.reduce(tl.where(nan, float("-inf"), logits), 1, _maximum)  # [TP]
    ex = tl.exp(logits - top[:, None])  # [TP, EP]
    p = ex / tl.reduce(tl.where(mask_e, ex, 0.0), 1, _add)[:, None]
    return tl.where(row_nan[:, None], float("nan"), p)


@triton.jit
def _limit_groups(select, valid, ee, T_PAD: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr,
                  TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, E_PAD: tl.constexpr):
    """``select [TP, EP]`` with -inf outside the ``TOPK_GROUP`` groups whose two best scores sum
    highest (``NoAuxTCRouter.choose``; groups ranked like experts, lower group on ties)."""
    group = ee // GROUP_SIZE  # [EP]
    gg = tl.arange(0, G_PAD)  # [GP]
    key = _keys(select, valid, E_PAD - 1 - ee[None, :])  # [TP, EP]
    group_score = tl.full((T_PAD, G_PAD), 0.0, dtype=tl.float32)
    for g in tl.static_range(N_GROUP):
        in_g = tl.where((group == g)[None, :], key, _TAKEN)  # [TP, EP]
        best = tl.reduce(in_g, 1, _maximum)  # [TP]
        total = _key_value(best)
        if GROUP_SIZE > 1:  # keys are distinct: this clears the best one only
            total = total + _key_value(tl.reduce(tl.where(in_g == best[:, None], _TAKEN, in_g), 1, _maximum))
        group_score = tl.where(gg[None, :] == g, total[:, None], group_score)
    group_key = _keys(group_score, (gg < N_GROUP)[None, :], G_PAD - 1 - gg[None, :])  # [TP, GP]
    keep = valid & (ee[None, :] < 0)  # [TP, EP] all False
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.reduce(group_key, 1, _maximum)  # [TP]
        chosen = (G_PAD - 1 - (best & 0x7FFFFFFF)).to(tl.int32)
        group_key = tl.where(gg[None, :] == chosen[:, None], _TAKEN, group_key)
        keep = keep | (group[None, :] == chosen[:, None])  # [TP, EP]
    return tl.where(keep, select, float("-inf"))


@triton.jit
def _router_kernel(x_ptr, w_ptr, bias_ptr, logits_ptr, counter_ptr, ids_ptr, weights_ptr,
                   T, H, E, n_active, scale, s_x, s_w,
                   K: tl.constexpr, T_PAD: tl.constexpr, E_PAD: tl.constexpr, K_PAD: tl.constexpr,
                   BLOCK_H: tl.constexpr, FP32_LOGITS: tl.constexpr, RENORM: tl.constexpr,
                   SIGMOID: tl.constexpr, N_GROUP: tl.constexpr, G_PAD: tl.constexpr,
                   TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr):
    e = tl.program_id(0)
    tt = tl.arange(0, T_PAD)  # [TP]
    mask_t = tt < T
    hh = tl.arange(0, BLOCK_H)  # [BH]
    acc = tl.full((T_PAD, BLOCK_H), 0.0, dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hh
        mask_h = h < H
        w = tl.load(w_ptr + e.to(tl.int64) * s_w + h, mask=mask_h, other=0).to(tl.float32)  # [BH]
        x = tl.load(x_ptr + tt[:, None].to(tl.int64) * s_x + h[None, :],
                    mask=mask_t[:, None] & mask_h[None, :], other=0)  # [TP, BH]
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
        mask_e = (ee < E)[None, :]  # [1, EP]
        valid = mask_t[:, None] & mask_e  # [TP, EP]
        logits = tl.load(logits_ptr + tt[:, None] * E + ee[None, :], mask=valid, other=float("-inf"),
                         cache_modifier=".cg")  # [TP, EP]
        logits = tl.where(mask_t[:, None], logits, 0.0)  # padding tokens: finite, never stored
        if SIGMOID:  # noaux_tc: choose by score + bias (within the best groups), weigh by score
            scores = 1.0 / (1.0 + tl.exp(-logits))
            select = scores + tl.load(bias_ptr + ee, mask=ee < E, other=0).to(tl.float32)[None, :]
            if TOPK_GROUP < N_GROUP:
                select = _limit_groups(select, valid, ee, T_PAD, N_GROUP, G_PAD, TOPK_GROUP, GROUP_SIZE, E_PAD)
        else:
            scores = _softmax(logits, mask_e)
            select = scores

        key = _keys(select, valid, E_PAD - 1 - ee[None, :])  # [TP, EP]
        kk = tl.arange(0, K_PAD)  # [KP]
        ids = tl.full((T_PAD, K_PAD), 0, dtype=tl.int32)
        weights = tl.full((T_PAD, K_PAD), 0.0, dtype=tl.float32)
        for k in tl.static_range(K):
            best = tl.reduce(key, 1, _maximum)  # [TP]
            expert = (E_PAD - 1 - (best & 0x7FFFFFFF)).to(tl.int32)  # [TP]
            chosen = ee[None, :] == expert[:, None]  # [TP, EP]
            key = tl.where(chosen, _TAKEN, key)
            if SIGMOID:
                value = tl.reduce(tl.where(chosen, scores, 0.0), 1, _add)  # [TP]: the unbiased score
            else:
                value = _key_value(best)
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


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counter: torch.Tensor, top_k: int,
           n_active: int, renormalize: bool, scale: float, fp32_logits: bool, n_group: int = 1,
           topk_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], weight [E, H] (rows contiguous), bias [E] or None, counter int32 [1] at 0 ->
    ids int32 [T, K], weights fp32 [T, K]."""
    tokens, hidden = x.shape
    experts = weight.shape[0]
    ids = torch.empty((tokens, top_k), dtype=torch.int32, device=x.device)
    weights = torch.empty((tokens, top_k), dtype=torch.float32, device=x.device)
    if tokens == 0:
        return ids, weights
    logits = torch.empty((tokens, experts), dtype=torch.float32, device=x.device)  # scratch
    cfg = choose_config(tokens, hidden, experts, x.device)
    with on_device(x):
        _router_kernel[(experts,)](
            x, weight, weight if bias is None else bias, logits, counter, ids, weights,
            tokens, hidden, experts, n_active, scale, x.stride(0), weight.stride(0),
            K=top_k, E_PAD=triton.next_power_of_2(experts), K_PAD=triton.next_power_of_2(top_k),
            FP32_LOGITS=fp32_logits, RENORM=renormalize, SIGMOID=bias is not None,
            N_GROUP=n_group, G_PAD=triton.next_power_of_2(n_group), TOPK_GROUP=topk_group,
            GROUP_SIZE=experts // n_group, **cfg)
    return ids, weights


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counter: torch.Tensor, top_k: int,
           n_active: int, n_group: int, topk_group: int) -> None:
    """Shape checks on the host (shapes only: no synchronisation)."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"router_topk: x must be [T, H] and weight [E, H], "
                         f"got {tuple(x.shape)}, {tuple(weight.shape)}")
    experts = weight.shape[0]
    if bias is not None and bias.shape != (experts,):
        raise ValueError(f"router_topk: bias must be [{experts}], got {tuple(bias.shape)}")
    if counter.shape != (1,) or counter.dtype != torch.int32:
        raise ValueError(f"router_topk: counter must be int32 [1], got {counter.dtype} {tuple(counter.shape)}")
    if not 1 <= n_active <= top_k <= experts:
        raise ValueError(f"router_topk: need 1 <= n_active={n_active} <= top_k={top_k} <= E={experts}")
    if experts % n_group or not 1 <= topk_group <= n_group or (n_group > 1 and bias is None):
        raise ValueError(f"router_topk: groups need a bias (noaux_tc) and n_group={n_group} dividing E={experts}, "
                         f"1 <= topk_group={topk_group} <= n_group")


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("ktcore::router_topk", mutates_args=())
def router_topk(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], counter: torch.Tensor,
                top_k: int, n_active: int, renormalize: bool, scale: float, fp32_logits: bool, n_group: int,
                topk_group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int32 [T, K], weights fp32 [T, K]) of the softmax top-k router (``bias`` None) or of
    ``noaux_tc`` (``bias``: ``e_score_correction_bias``); see the module docstring. ``counter``
    is written during the launch and is back at 0 when it ends."""
    _check(x, weight, bias, counter, top_k, n_active, n_group, topk_group)
    return launch(_rows_contiguous(x), _rows_contiguous(weight), bias, counter, top_k, n_active, renormalize,
                  scale, fp32_logits, n_group, topk_group)


@router_topk.register_fake
def _(x, weight, bias, counter, top_k, n_active, renormalize, scale, fp32_logits, n_group, topk_group):
    _check(x, weight, bias, counter, top_k, n_active, n_group, topk_group)
    return (x.new_empty((x.shape[0], top_k), dtype=torch.int32),
            x.new_empty((x.shape[0], top_k), dtype=torch.float32))
