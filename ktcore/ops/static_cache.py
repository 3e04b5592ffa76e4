"""What the static per-layer caches of MLA and GQA share.

Buffers are token-major, ``[B, S, ...]``: slot ``s`` of row ``b`` holds the token at position
``s``. They are zero-initialised (masked slots never hold NaN/inf) and never change address,
so a captured CUDA graph can keep pointing at them.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticCache(nn.Module):
    """Named zero buffers of shape ``[batch, max_len, *tail]``, written at token positions."""

    def __init__(self, batch: int, max_len: int, tails: dict[str, tuple[int, ...]],
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", **sizes: int):
        """``sizes`` names the dimensions in ``tails`` for error messages."""
        super().__init__()
        for what, value in {"batch": batch, "max_len": max_len, **sizes}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{type(self).__name__}.{what} must be a positive int, got {value!r}")
        self.names = tuple(tails)
        for name, tail in tails.items():
            self.register_buffer(name, torch.zeros(batch, max_len, *tail, dtype=dtype, device=device),
                                 persistent=False)

    @property
    def batch(self) -> int:
        return getattr(self, self.names[0]).shape[0]

    @property
    def max_len(self) -> int:
        return getattr(self, self.names[0]).shape[1]

    def _write(self, positions: torch.Tensor, *values: torch.Tensor) -> None:
        """positions: [B, T]; values: [B, T, *tail] in buffer order -> slots (b, positions[b, t])
        of rows ``b < B``. Positions must lie in ``[0, max_len)``."""
        B, T = positions.shape
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)  # [B, T]
        for name, value in zip(self.names, values, strict=True):
            buffer = getattr(self, name)
            buffer.index_put_((rows, positions), value.to(buffer.dtype))

    def reset(self) -> None:
        for name in self.names:
            getattr(self, name).zero_()

    def rows(self, start: int, stop: int) -> "StaticCache":
        """A cache of rows ``[start, stop)`` sharing this one's memory (a sequence's slot):
        writes through it land in this cache."""
        view = type(self).__new__(type(self))
        view.__dict__ = dict(self.__dict__)
        view._buffers = {name: buffer[start:stop] for name, buffer in self._buffers.items()}
        return view


def visible_slots(positions: torch.Tensor, cache_lens: torch.Tensor, kv_len: int) -> torch.Tensor:
    """[B, T, S] bool: slot ``s`` is visible to token (b, t) iff ``s <= positions[b, t]`` and
    ``s < cache_lens[b]``."""
    slots = torch.arange(kv_len, device=positions.device)  # [S]
    return (slots <= positions[..., None]) & (slots < cache_lens[:, None, None])
