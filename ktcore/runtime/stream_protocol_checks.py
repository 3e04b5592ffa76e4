"""Conformance check for Experts backends that offer the streaming protocol
(``ktcore.runtime.streamed_experts``): a CPU plugin whose experts should stream to the GPU for
prefill calls it from its tests (kt-amx and kt-llamafile do).
"""

from __future__ import annotations

import torch


def streamed_forward_error(part, tokens: int, seed: int, chunk_bytes: int, device: str = "cpu") -> float:
    """Relative (Frobenius) error of ``part``'s streamed forward against its own forward, on
    ``tokens`` random tokens routed to random experts and the padding id, the weights copied
    to ``device`` in chunks of ``chunk_bytes`` host bytes."""
    from ktcore.runtime.stream_pool import StreamPool
    from ktcore.runtime.streamed_experts import StreamedPart

    spec = part.spec
    streamed = StreamedPart(part, part.stream_tensors(), chunk_bytes=chunk_bytes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, spec.hidden_size, generator=g)  # [T, H]
    ids = torch.randint(0, spec.num_experts + 1, (tokens, spec.top_k), generator=g).to(torch.int32)  # E: padding
    w = torch.rand(tokens, spec.top_k, generator=g)  # [T, K]
    y = streamed.forward(x.to(device), ids.to(device), w.to(device), StreamPool(device)).cpu()
    ref = part(x, ids, w)
    return float((y - ref).norm() / ref.norm())
