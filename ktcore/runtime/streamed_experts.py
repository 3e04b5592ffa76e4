"""Streaming prefill: a CPU Experts part computed on the GPU from its own weights, copied over
PCIe chunk by chunk (as llama.cpp does for large batches).

For a prefill chunk of hundreds of tokens the CPU is compute-bound, while copying a layer's
quantised experts to the GPU takes a few milliseconds (~315 MB of int4 Qwen3-30B-A3B experts
at ~55 GB/s: ~6 ms) and the GPU computes them in far less. ``ExpertsParts`` streams a part
when the batch has at least ``stream_min_tokens`` tokens, its input is on a CUDA device and
the part offers the protocol below. Decode never streams (one token, CUDA-graph replays).

The protocol (duck-typed: ktcore never imports a plugin). A CPU Experts part may offer

- ``stream_tensors() -> dict[str, Tensor] | None``: host tensors holding everything needed to
  rebuild the weights of the part's stored experts; each is contiguous with the stored-slot
  index as its leading dimension S. ``None`` when the part cannot stream (the plugin logs
  why). Called once; the runtime may page-lock the tensors in place (cudaHostRegister), so
  the plugin must not reallocate them afterwards.
- ``stream_expert_ids() -> Tensor[S]`` int64: the expert id of each stored slot (the runtime
  computes only slots whose id the part owns, ``spec.owned``; ids outside ``[0, E)`` never).
- ``stream_dense(chunk, dtype) -> (gate [n, I, H], up [n, I, H], down [n, H, I])``: the dense
  weights of n consecutive stored slots from the same keys sliced ``[a:b]`` along dim 0 and
  moved to any device, computed on that device in ``dtype``; equal to the values the part's
  own CPU kernel computes with.

``StreamedPart`` holds one part's slot map and chunk plan and computes a batch from dense
chunks (grouped batched matmuls over the tokens routed to each chunk's experts); the copies,
their buffers, streams and the prefetch across layers are ``StreamPool``'s
(ktcore.runtime.stream_pool).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ktcore.ops.experts import activation_fn

log = logging.getLogger(__name__)

#: Default ``stream_min_tokens``: see docs/decisions.md ("Streaming prefill").
DEFAULT_MIN_TOKENS = 128
#: Dense weights one chunk may rebuild on the target device.
DENSE_BUDGET_BYTES = 2 << 30
#: Host bytes copied per chunk: several chunks per layer, so copies overlap compute.
CHUNK_BYTES = 64 << 20
#: Activations one group of experts may materialise ([n, m, max(H, I)] per tensor).
GROUP_BYTES = 256 << 20
#: Padding rows a group of experts may add, as a multiple of its real rows.
GROUP_WASTE = 2.0

_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports_streaming(part) -> bool:
    """True when ``part`` offers the streaming protocol (see the module docstring)."""
    return all(callable(getattr(part, name, None)) for name in ("stream_tensors", "stream_expert_ids", "stream_dense"))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype streamed experts compute in for activations of ``dtype``."""
    return dtype if dtype in _COMPUTE_DTYPES else torch.float32


def plan_chunks(keep: list[bool], max_slots: int) -> list[tuple[int, int]]:
    """Runs of consecutive kept slots, each cut into ``[a, b)`` of at most ``max_slots``."""
    chunks = []
    start = None
    for slot, k in enumerate([*keep, False]):
        if k and start is None:
            start = slot
        if start is not None and (not k or slot - start == max_slots):
            chunks.append((start, slot))
            start = slot if k else None
    return chunks


def group_slots(counts: list[int], row_bytes: int, max_bytes: int = GROUP_BYTES,
                waste: float = GROUP_WASTE) -> list[tuple[int, int]]:
    """Consecutive slots ``[lo, hi)`` computed by one padded batched matmul: each group pads
    its slots to its largest count, adding at most ``waste`` x its real rows (a hot expert
    ends up alone) and holding at most ``max_bytes`` of ``row_bytes`` rows. Slots without
    tokens start no group."""
    groups = []
    lo, n = 0, len(counts)
    while lo < n:
        if counts[lo] == 0:
            lo += 1
            continue
        hi, most, total = lo + 1, counts[lo], counts[lo]
        while hi < n:
            m, t = max(most, counts[hi]), total + counts[hi]
            padded = (hi + 1 - lo) * m
            if padded > waste * t or padded * row_bytes > max_bytes:
                break
            hi, most, total = hi + 1, m, t
        while counts[hi - 1] == 0:  # trailing empty slots add only padding
            hi -= 1
        groups.append((lo, hi))
        lo = hi
    return groups


class StreamedPart:
    """One CPU part's streaming state: its host tensors (taken once), the map from expert id to
    stored slot (owned experts only), and its chunk plan per compute dtype."""

    def __init__(self, part, tensors: Mapping[str, torch.Tensor], dense_budget: int = DENSE_BUDGET_BYTES,
                 chunk_bytes: int = CHUNK_BYTES):
        spec = part.spec
        self.part = part
        self.tensors = dict(tensors)
        ids = torch.as_tensor(part.stream_expert_ids()).long().reshape(-1)  # [S]
        S = ids.numel()
        for key, t in self.tensors.items():
            if t.device.type != "cpu" or t.dim() < 1 or t.shape[0] != S or not t.is_contiguous():
                raise ValueError(f"{type(part).__name__}.stream_tensors()[{key!r}]: want a contiguous host tensor "
                                 f"[S={S}, ...], got {t.device} {list(t.shape)}")
        E = spec.num_experts
        valid = (ids >= 0) & (ids < E)
        keep = valid & spec.owned_mask()[ids.clamp(0, E - 1)]  # [S]
        slot_of = torch.full((E + 1,), -1, dtype=torch.long)  # [E + 1]; E: the padding id
        slot_of[ids[keep]] = torch.arange(S)[keep]
        self.slot_of = slot_of
        self.num_slots = S
        self.keep = keep.tolist()
        self.slot_bytes = sum(t[0].numel() * t.element_size() for t in self.tensors.values()) if S else 0
        self.dense_budget = dense_budget
        self.chunk_bytes = chunk_bytes
        self.act = activation_fn(spec.activation)
        self._plans: dict[torch.dtype, list[tuple[int, int]]] = {}
        self._slot_of_on: dict[torch.device, torch.Tensor] = {}

    def max_slots(self, dtype: torch.dtype) -> int:
        """Slots per chunk: within the dense budget and the copy size, at least one."""
        s = self.part.spec
        dense = 3 * s.intermediate_size * s.hidden_size * torch.finfo(dtype).bits // 8
        return max(1, min(self.dense_budget // dense, self.chunk_bytes // max(self.slot_bytes, 1)))

    def chunks(self, dtype: torch.dtype) -> list[tuple[int, int]]:
        if dtype not in self._plans:
            self._plans[dtype] = plan_chunks(self.keep, self.max_slots(dtype))
        return self._plans[dtype]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, pool) -> torch.Tensor:
        """y [T, H] in x's dtype on x's device (``pool.device``)."""
        # x: [T, H]; topk_ids, topk_weights: [T, K]
        T, K = topk_ids.shape
        H = x.shape[1]
        dev, dtype = x.device, compute_dtype(x.dtype)
        if dev not in self._slot_of_on:
            self._slot_of_on[dev] = self.slot_of.to(dev)
        slot = self._slot_of_on[dev][topk_ids.reshape(-1).long()]  # [P], -1: not computed here
        S, P = self.num_slots, T * K
        key = torch.where(slot >= 0, slot, S)  # [P]
        order = torch.argsort(key, stable=True)  # [P] pairs grouped by slot
        counts_dev = torch.bincount(key, minlength=S + 1)[:S]  # [S]
        counts = counts_dev.tolist()  # host sync: prefill is eager
        starts = torch.cumsum(counts_dev, 0) - counts_dev  # [S] first sorted pair of each slot
        scale = torch.where(slot >= 0, topk_weights.reshape(-1).float(), 0.0)  # [P]
        token = torch.cat([order // K, order.new_full((1,), T)])  # [P + 1]; P: a padding row
        weight = torch.cat([scale[order], scale.new_zeros(1)])  # [P + 1]
        xe = torch.cat([x.to(dtype), x.new_zeros(1, H, dtype=dtype)])  # [T + 1, H]
        out = torch.zeros(T + 1, H, dtype=torch.float32, device=dev)  # [T + 1, H]; row T: padding
        routed = [(a, b) for a, b in self.chunks(dtype) if any(counts[a:b])]
        row_bytes = max(H, self.part.spec.intermediate_size) * torch.finfo(dtype).bits // 8 * 3

        def compute(chunk: tuple[int, int], dense) -> None:
            gate, up, down = dense  # [n, I, H], [n, I, H], [n, H, I]
            a, b = chunk
            for lo, hi in group_slots(counts[a:b], row_bytes):
                m = max(counts[a + lo:a + hi])
                r = torch.arange(m, device=dev)  # [m]
                first = starts[a + lo:a + hi].unsqueeze(1)  # [g, 1]
                idx = torch.where(r < counts_dev[a + lo:a + hi].unsqueeze(1), first + r, P)  # [g, m]
                tok = token[idx]  # [g, m]
                xs = xe[tok]  # [g, m, H]
                h = self.act(torch.bmm(xs, gate[lo:hi].transpose(1, 2))) * torch.bmm(xs, up[lo:hi].transpose(1, 2))
                d = torch.bmm(h, down[lo:hi].transpose(1, 2))  # [g, m, H]
                out.index_add_(0, tok.reshape(-1), (d.float() * weight[idx].unsqueeze(-1)).reshape(-1, H))

        pool.run(self, routed, dtype, compute)
        return out[:T].to(x.dtype)


def streamed_part(part, dense_budget: int = DENSE_BUDGET_BYTES, chunk_bytes: int = CHUNK_BYTES) -> StreamedPart | None:
    """``part``'s streaming state, or None when it does not offer the protocol or declines
    (``stream_tensors()`` is None)."""
    if not supports_streaming(part):
        return None
    tensors = part.stream_tensors()
    if tensors is None:
        log.debug("%s does not stream (stream_tensors() is None)", type(part).__name__)
        return None
    return StreamedPart(part, tensors, dense_budget, chunk_bytes)
