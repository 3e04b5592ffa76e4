"""The decode step captured once as a CUDA graph and replayed for every token.

Everything the step reads lives in static buffers (token ids, positions, cache lengths, the
caches themselves), so a replay is one launch with no Python in between. This first version
captures plans whose modules all sit on one CUDA device; CPU experts inside the graph go
through kt-amx's host nodes (the runtime issue).
"""

from __future__ import annotations

import torch

from ktcore.errors import KtError


def graph_device(plan) -> torch.device | None:
    """The one CUDA device of a plan whose placements all share it, else None."""
    devices = {torch.device(p.device) for p in plan.placements}
    if len(devices) == 1:
        (device,) = devices
        if device.type == "cuda":
            return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return None


class GraphDecodeStep:
    """``step(token, position) -> logits[B, V]`` replaying one captured decode step (T = 1)."""

    def __init__(self, decoder, device: torch.device, batch: int = 1, warmup: int = 2):
        if device.type != "cuda":
            raise KtError(f"CUDA graphs need a CUDA device, got {device}")
        self.decoder = decoder
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.lens = torch.ones(batch, dtype=torch.long, device=device)  # [B]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():  # warm-up: lazy inits outside capture
            for _ in range(warmup):
                decoder(self.ids, self.positions, self.lens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = decoder(self.ids, self.positions, self.lens)[:, -1]  # [B, V]
        decoder.reset()  # the warm-up wrote into slot 0; prefill starts from clean caches

    def step(self, token: torch.Tensor, position: int) -> torch.Tensor:
        self.ids.copy_(token.reshape(self.ids.shape), non_blocking=True)
        self.positions.fill_(position)
        self.lens.fill_(position + 1)
        self.graph.replay()
        return self.logits
