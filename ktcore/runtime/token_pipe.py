"""Sampled token ids on their way to the host, read one decode step late.

The decode loop needs each step's tokens on the host (to append them and to check stop
tokens), but reading them right after sampling would leave the GPU idle while Python runs.
``TokenPipe.push`` starts an asynchronous copy into a pinned buffer and records an event;
``pop`` waits for the oldest copy only. The loop launches step i + 1 before it reads the
tokens of step i, so the GPU always has the next step queued; a sequence that stopped at
step i costs one step that is thrown away.
"""

from __future__ import annotations

from collections import deque

import torch


class TokenPipe:
    """FIFO of token-id copies to the host: ``push(tokens[B])``, ``pop() -> list[int]``."""

    def __init__(self, batch: int, device: torch.device, depth: int = 2):
        self.device = device
        self.on_cuda = device.type == "cuda"
        # a ring of pinned buffers: a buffer is reused only after its tokens were popped
        self.buffers = [torch.empty(batch, dtype=torch.long, pin_memory=self.on_cuda) for _ in range(depth + 1)]
        self.pending: deque = deque()  # (buffer, event or None)
        self.next = 0

    def __len__(self) -> int:
        return len(self.pending)

    def push(self, tokens: torch.Tensor) -> None:
        """tokens: [B] on ``device``; starts their copy to the host."""
        if len(self.pending) >= len(self.buffers):
            raise RuntimeError("TokenPipe: pop before pushing more tokens than its depth")
        buffer = self.buffers[self.next]
        self.next = (self.next + 1) % len(self.buffers)
        if self.on_cuda:
            buffer.copy_(tokens, non_blocking=True)
            event = torch.cuda.Event(blocking=True)  # the waiting thread sleeps: its core is the CPU experts'
            event.record(torch.cuda.current_stream(self.device))
        else:
            buffer.copy_(tokens)
            event = None
        self.pending.append((buffer, event))

    def pop(self) -> list[int]:
        """The oldest pushed tokens (waits for their copy)."""
        buffer, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        return buffer.tolist()
