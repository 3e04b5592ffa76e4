"""The decode step captured once as a CUDA graph and replayed for every token.

Everything the step reads lives in static buffers (token ids, positions, cache lengths, the
caches themselves), so a replay is one launch with no Python in between. Every module must
sit on one CUDA device, except routed experts on the CPU whose backend offers the job
protocol (kt-amx, kt-llamafile): they run from host nodes inside the graph
(ktcore.runtime.host_experts), overlapped with the shared experts and the GPU's experts.
"""

from __future__ import annotations

import torch
from torch import nn

from ktcore.errors import KtError
from ktcore.runtime.blocks import ExpertsParts


def _tensor_devices(module: nn.Module, skip: set[int]) -> dict[torch.device, str]:
    """Devices of the tensors under ``module`` (one module name per device), leaving out the
    modules whose ids are in ``skip``."""
    found: dict[torch.device, str] = {}

    def visit(name: str, m: nn.Module) -> None:
        if id(m) in skip:
            return
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None:
                found.setdefault(t.device, name or "<model>")
        for child_name, child in m._modules.items():
            if child is not None:
                visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", module)
    return found


def graph_device(decoder) -> tuple[torch.device | None, str]:
    """``(device, "")`` when the decode step can be captured on one CUDA device, else
    ``(None, reason)``."""
    skip, blockers = set(), []
    for name, module in decoder.named_modules():
        if isinstance(module, ExpertsParts):
            host_parts = set(module.host_job_parts())
            for i, part in enumerate(module.parts):
                if i in host_parts:
                    skip.add(id(part))
                elif part.device.type == "cpu":
                    blockers.append(f"{name}.parts.{i} ({type(part).__name__} on the CPU has no host-job support)")
    devices = _tensor_devices(decoder, skip)
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    others = [f"{where} on {d}" for d, where in devices.items() if d.type != "cuda"]
    if blockers or others:
        return None, "modules outside the GPU cannot run in a CUDA graph: " + "; ".join(blockers + others)
    if len(cuda) != 1:
        return None, f"CUDA graphs need every module on one GPU, the model uses {len(cuda)}"
    return cuda[0], ""


class GraphDecodeStep:
    """``step(tokens, positions) -> logits[B, V]`` replaying one captured decode step (T = 1)
    of ``batch`` sequences (cache rows ``[0, batch)``);
    ``compile``: the captured step is the decoder compiled with ``torch.compile(fullgraph=True)``
    (fewer, fused kernels per layer)."""

    def __init__(self, decoder, device: torch.device, batch: int = 1, warmup: int = 2, compile: bool = False):
        if device.type != "cuda":
            raise KtError(f"CUDA graphs need a CUDA device, got {device}")
        self.decoder = decoder
        # compiled once for this batch and T = 1: captured below, never re-traced at replay
        if compile:
            from ktcore.runtime.model import compile_decoder

            forward = compile_decoder(decoder)
        else:
            forward = decoder
        self.experts = [m for m in decoder.modules() if isinstance(m, ExpertsParts) and m.host_job_parts()]
        for experts in self.experts:  # CPU experts from host nodes, static pinned buffers shared
            if not experts.runners:  # by every batch bucket's graph (sized for the largest)
                experts.attach_host_runners(decoder.batch, device, decoder.cache_dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.lens = torch.ones(batch, dtype=torch.long, device=device)  # [B]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():  # warm-up: lazy inits outside capture
            for _ in range(warmup):
                forward(self.ids, self.positions, self.lens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = forward(self.ids, self.positions, self.lens)[:, -1]  # [B, V]
        decoder.reset()  # the warm-up wrote into the caches; prefill starts from clean ones

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, positions: [B] -> logits [B, V] (a view of the graph's output buffer)."""
        self.ids.copy_(tokens.reshape(self.ids.shape), non_blocking=True)
        positions = positions.reshape(self.lens.shape).to(self.lens.device, non_blocking=True)
        self.positions.copy_(positions[:, None])
        torch.add(positions, 1, out=self.lens)
        self.graph.replay()
        return self.logits

    def check_cpu_experts(self) -> None:
        """Raises the error a CPU experts job met during the replays (host nodes cannot
        raise); call after synchronising."""
        for experts in self.experts:
            for runner in experts.runners.values():
                runner.check_status()

    def release(self) -> None:
        """Detaches the host runners (the eager decoder runs as before)."""
        for experts in self.experts:
            experts.detach_host_runners()
