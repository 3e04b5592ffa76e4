"""Static-shape routing of a fused MoE layer: (token, k) pairs grouped by expert into blocks.

The grouped GEMM kernels of ``kt_marlin.fused_moe`` work on blocks of ``block_m`` rows that
all belong to one expert. This module lays the ``P = T * K`` pairs out that way with torch
ops only, so the layout is computed on the device, with shapes that depend on ``T``, ``K``,
the number of owned experts ``n`` and ``block_m`` alone (no ``.item()``, no ``nonzero``, no
host synchronisation: capture-safe).

Layout: expert slot ``e`` (local index of an owned expert) owns ``ceil(count_e / block_m)``
consecutive blocks; its pairs fill their first ``count_e`` rows in their original order
(stable), the rest are padding rows holding the sentinel ``P``. Pairs whose expert is not
owned (or the padding id E) are in no block. Blocks past the used ones belong to expert -1,
which the kernels skip.

The number of blocks is ``min(P, ceil(P / block_m) + min(P, n))``: each used block holds at
least one pair, and ``sum_e ceil(c_e / b) <= P / b + #(experts with c_e > 0)``.
"""

from __future__ import annotations

import torch


def num_blocks(pairs: int, n_owned: int, block_m: int) -> int:
    """Blocks the layout of ``pairs`` pairs over ``n_owned`` experts can need, at most."""
    return min(pairs, -(-pairs // block_m) + min(pairs, n_owned))


def align_blocks(topk_ids: torch.Tensor, slot_of: torch.Tensor, n_owned: int,
                 block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups the pairs of ``topk_ids[T, K]`` by expert into blocks of ``block_m`` rows.

    ``slot_of[E + 1]`` maps an expert id to its local slot (0..n_owned-1) or -1 when not
    owned (entry E: the padding id). Returns ``sorted_pair`` int32 ``[B * block_m]`` (the pair
    index ``t * K + k`` of each row, ``P`` on padding rows) and ``block_expert`` int32 ``[B]``
    (the slot of each block, -1 for unused blocks), ``B = num_blocks(P, n_owned, block_m)``.
    """
    device = topk_ids.device
    pairs = topk_ids.numel()
    blocks = num_blocks(pairs, n_owned, block_m)
    rows = blocks * block_m
    slot = slot_of[topk_ids.reshape(-1).long()].long()  # [P], -1 = not owned
    key = torch.where(slot >= 0, slot, n_owned)  # [P], n_owned = the bucket of dropped pairs
    order = torch.argsort(key, stable=True)  # [P] pair indices grouped by slot
    counts = torch.zeros(n_owned + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, key, torch.ones_like(key))  # [n + 1]
    counts = counts[:n_owned]  # [n]
    first_sorted = torch.cumsum(counts, 0) - counts  # [n] position of slot e's first pair in `order`
    per_slot = (counts + block_m - 1) // block_m  # [n] blocks of slot e
    block_end = torch.cumsum(per_slot, 0)  # [n] one past slot e's last block
    first_row = (block_end - per_slot) * block_m  # [n]

    sorted_key = key[order]  # [P]
    owned = sorted_key < n_owned  # [P]
    e = sorted_key.clamp(max=n_owned - 1)  # [P]
    rank = torch.arange(pairs, device=device) - first_sorted[e]  # [P] index within its slot
    row = torch.where(owned, first_row[e] + rank, rows)  # [P], rows = a discarded dump row
    sorted_pair = torch.full((rows + 1,), pairs, dtype=torch.long, device=device)
    sorted_pair.scatter_(0, row, order)  # [rows + 1]
    sorted_pair = sorted_pair[:rows].to(torch.int32)  # [rows]

    b = torch.arange(blocks, device=device)  # [B]
    block_expert = torch.searchsorted(block_end, b, right=True)  # [B] first slot ending after b
    block_expert = torch.where(block_expert < n_owned, block_expert, -1).to(torch.int32)  # [B]
    return sorted_pair, block_expert
