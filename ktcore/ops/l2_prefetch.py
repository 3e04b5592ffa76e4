"""Reading tensors into the GPU's L2 cache ahead of their use.

In the captured decode step the GPU has nothing to do while the CPU experts of a layer run
(about 170 µs per Qwen3-30B-A3B layer); then the next layer's attention starts and its
one-row linears read their weights from HBM (q/k/v, o_proj and the router: 38 MB at that
shape, some 15 µs of GEMVs). Reading those weights during the wait, marked to stay in L2,
moves that HBM traffic off the critical path.

Two ways, chosen by ``METHODS``:
- ``"bulk"`` (sm_90 and newer): each thread issues one ``cp.async.bulk.prefetch.L2`` of a
  chunk, with an evict-last cache policy: no data passes through the SMs, the kernel ends
  as soon as the requests are issued;
- ``"load"`` (any GPU, and Triton's interpreter): 32-bit loads marked evict-last, summed;
  the sum is stored only if it equals a sentinel, which keeps the loads alive and writes
  nothing that matters.

``torch.ops.ktcore.l2_prefetch(ticket, tensors)`` returns a new empty ticket, so that a
compiled graph orders it between the CPU experts' submit (whose ticket it takes) and their
finish (which takes the one it returns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Bytes one thread of the bulk kernel asks for (a multiple of 16, as the instruction needs).
BULK_CHUNK = 16384
SENTINEL = 0x5EED1234  # a block sum the load kernel stores (to a buffer nobody reads)
_SENTINEL = tl.constexpr(SENTINEL)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _load_kernel(src_ptr, sink_ptr, n_words, BLOCK: tl.constexpr):
    """Loads src [n_words] int32, evict-last."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    words = tl.load(src_ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    total = tl.reduce(words, 0, _add)  # wraps; only its dependence on the loads matters
    tl.store(sink_ptr, total, mask=total == _SENTINEL)


@triton.jit
def _bulk_kernel(start, n_bytes, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """start: a 16-byte aligned address; n_bytes: a multiple of 16. One chunk per thread;
    threads past the end repeat the last chunk (a hint twice costs nothing)."""
    n_chunks = tl.cdiv(n_bytes, CHUNK)
    chunk = tl.minimum(tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK), n_chunks - 1)  # [BLOCK]
    offset = chunk * CHUNK
    size = tl.minimum(n_bytes - offset, CHUNK).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
        "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; mov.b32 $0, 0; }",
        "=r,l,r", [start + offset, size], dtype=tl.int32, is_pure=False, pack=1)


def bulk_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def prefetch(tensors: list[torch.Tensor], method: str = "auto") -> None:
    """Launches the reads of ``tensors`` (contiguous, on one device; others are skipped) on
    the current stream."""
    if not tensors:
        return
    device = tensors[0].device
    if method == "auto":
        method = "bulk" if bulk_supported(device) else "load"
    sink = torch.empty(1, dtype=torch.int32, device=device)  # never read
    for t in tensors:
        if not t.is_contiguous() or t.device != device:
            continue
        if method == "bulk":
            start = (t.data_ptr() + 15) // 16 * 16
            n_bytes = (t.data_ptr() + t.numel() * t.element_size() - start) // 16 * 16
            if n_bytes > 0:
                block = 128
                grid = triton.cdiv(triton.cdiv(n_bytes, BULK_CHUNK), block)
                _bulk_kernel[(grid,)](start, n_bytes, CHUNK=BULK_CHUNK, BLOCK=block, num_warps=4)
        else:
            raw = t.view(-1).view(torch.uint8)
            skip = -t.data_ptr() % 4  # to the first 4-byte aligned address
            words = raw[skip: skip + (raw.numel() - skip) // 4 * 4].view(torch.int32)
            if words.numel():
                block = 4096 if sink.is_cuda else 64
                _load_kernel[(triton.cdiv(words.numel(), block),)](words, sink, words.numel(), BLOCK=block)


@torch.library.custom_op("ktcore::l2_prefetch", mutates_args=())
def l2_prefetch(ticket: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """Reads ``tensors`` into L2 (see the module docstring); returns a new empty ticket."""
    prefetch(tensors)
    return ticket.new_empty(0)


@l2_prefetch.register_fake
def _(ticket, tensors):
    return ticket.new_empty(0)
