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

Two implementations of the same layout: for decode batches (``P <= KERNEL_MAX_PAIRS``) one
Triton program (``_align_kernel``: counts, block offsets and each pair's rank among the
earlier pairs of its expert from comparison tiles, a single launch), else torch ops (a stable
sort and scatters, some 40 small kernels: at decode their launches cost more than the
experts' GEMMs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device

#: Largest ``P = T * K`` the single-program kernel lays out (its rank pass is O(P^2)).
KERNEL_MAX_PAIRS = 512
_CHUNK = 32  # pairs / blocks / slots compared per tile row


def num_blocks(pairs: int, n_owned: int, block_m: int) -> int:
    """Blocks the layout of ``pairs`` pairs over ``n_owned`` experts can need, at most."""
    return min(pairs, -(-pairs // block_m) + min(pairs, n_owned))


@triton.jit
def _slots(ids_ptr, slot_ptr, j, P):
    """Slots of pairs ``j`` (-1: not owned, the padding id, or past ``P``)."""
    valid = j < P
    ids = tl.load(ids_ptr + j, mask=valid, other=0)
    return tl.where(valid, tl.load(slot_ptr + ids, mask=valid, other=-1), -1)


@triton.jit
def _align_kernel(ids_ptr, slot_ptr, sorted_ptr, block_expert_ptr, first_ptr, P, N, B,
                  BLOCK_M: tl.constexpr, NB: tl.constexpr, CHUNK: tl.constexpr):
    """The layout of ``align_blocks`` in one program: ``NB`` (a power of two >= N) slots."""
    e = tl.arange(0, NB)  # [NB] slots
    c = tl.arange(0, CHUNK)
    counts = tl.zeros((NB,), dtype=tl.int32)
    for j0 in range(0, P, CHUNK):
        kj = _slots(ids_ptr, slot_ptr, j0 + c, P)  # [C]
        counts += tl.sum((e[:, None] == kj[None, :]).to(tl.int32), axis=1)
    per = (counts + BLOCK_M - 1) // BLOCK_M  # [NB] blocks of each slot (0 past N)
    end = tl.cumsum(per, 0)  # [NB] one past each slot's last block
    tl.store(first_ptr + e, end - per)
    for b0 in range(0, B, CHUNK):  # owner of block b: #{e < N: end[e] <= b}, -1 past the used blocks
        b = b0 + c
        owner = tl.sum(((end[None, :] <= b[:, None]) & (e[None, :] < N)).to(tl.int32), axis=1)  # [C]
        tl.store(block_expert_ptr + b, tl.where(owner < N, owner, -1), mask=b < B)
    for r0 in range(0, B * BLOCK_M, CHUNK):  # every row padding first
        tl.store(sorted_ptr + r0 + c, tl.full((CHUNK,), 0, tl.int32) + P, mask=r0 + c < B * BLOCK_M)
    tl.debug_barrier()  # the slots' first blocks and the padding rows, seen by every thread
    for i0 in range(0, P, CHUNK):
        i = i0 + c
        ki = _slots(ids_ptr, slot_ptr, i, P)  # [C]
        rank = tl.zeros((CHUNK,), dtype=tl.int32)  # earlier pairs of the same slot
        for j0 in range(0, i0 + CHUNK, CHUNK):
            j = j0 + c
            kj = _slots(ids_ptr, slot_ptr, j, P)
            rank += tl.sum(((ki[:, None] == kj[None, :]) & (j[None, :] < i[:, None])).to(tl.int32), axis=1)
        owned = ki >= 0
        first = tl.load(first_ptr + ki, mask=owned, other=0)
        tl.store(sorted_ptr + first * BLOCK_M + rank, i, mask=owned)


def align_blocks(topk_ids: torch.Tensor, slot_of: torch.Tensor, n_owned: int,
                 block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups the pairs of ``topk_ids[T, K]`` by expert into blocks of ``block_m`` rows.

    ``slot_of[E + 1]`` maps an expert id to its local slot (0..n_owned-1) or -1 when not
    owned (entry E: the padding id). Returns ``sorted_pair`` int32 ``[B * block_m]`` (the pair
    index ``t * K + k`` of each row, ``P`` on padding rows) and ``block_expert`` int32 ``[B]``
    (the slot of each block, -1 for unused blocks), ``B = num_blocks(P, n_owned, block_m)``.
    """
    pairs = topk_ids.numel()
    if 0 < pairs <= KERNEL_MAX_PAIRS:
        blocks = num_blocks(pairs, n_owned, block_m)
        nb = triton.next_power_of_2(max(n_owned, 16))
        sorted_pair = torch.empty(blocks * block_m, dtype=torch.int32, device=topk_ids.device)
        block_expert = torch.empty(blocks, dtype=torch.int32, device=topk_ids.device)
        first = torch.empty(nb, dtype=torch.int32, device=topk_ids.device)  # scratch: each slot's first block
        with on_device(topk_ids):
            _align_kernel[(1,)](topk_ids.reshape(-1), slot_of, sorted_pair, block_expert, first, pairs, n_owned,
                                blocks, BLOCK_M=block_m, NB=nb, CHUNK=_CHUNK, num_warps=8 if nb > 128 else 4)
        return sorted_pair, block_expert
    return align_blocks_torch(topk_ids, slot_of, n_owned, block_m)


def align_blocks_torch(topk_ids: torch.Tensor, slot_of: torch.Tensor, n_owned: int,
                       block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``align_blocks`` with torch ops (any number of pairs)."""
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
