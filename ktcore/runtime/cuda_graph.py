"""The decode step captured once as a CUDA graph and replayed for every token.

Everything the step reads lives in static buffers (token ids, positions, cache lengths, the
caches themselves), so a replay is one launch with no Python in between. Every module must
sit on one CUDA device, except routed experts on the CPU whose backend offers the job
protocol (kt-amx, kt-llamafile): they run from host nodes inside the graph
(ktcore.runtime.host_experts), overlapped with the shared experts and the GPU's experts.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ktcore.errors import KtError
from ktcore.runtime.blocks import ExpertsParts

#: Share of the GPU's L2 cache the next layer's weights may fill (``l2_prefetch_budget``).
PREFETCH_L2_FRACTION = 0.75


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


def l2_prefetch_budget(device: torch.device) -> int:
    """Bytes of next-layer weights read into L2 during a CPU-experts wait:
    ``KTCORE_L2_PREFETCH_MB`` (0: none), by default PREFETCH_L2_FRACTION of the L2 cache."""
    mb = os.environ.get("KTCORE_L2_PREFETCH_MB")
    if mb is not None:
        try:
            return int(float(mb) * 2**20)
        except ValueError:
            raise KtError(f"KTCORE_L2_PREFETCH_MB must be a number of MiB, got {mb!r}") from None
    return int(PREFETCH_L2_FRACTION * torch.cuda.get_device_properties(device).L2_cache_size)


def decode_reads(module: nn.Module) -> list[torch.Tensor]:
    """The tensors under ``module`` that a decode step reads whole: parameters and buffers,
    each storage once (GQA's q/k/v projection weights are views of its fused weight), without
    the RoPE tables (one row per token)."""
    from ktcore.ops.rope import Rope

    seen, found = set(), []

    def visit(m: nn.Module) -> None:
        if isinstance(m, Rope):
            return
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                found.append(t)
        for child in m._modules.values():
            if child is not None:
                visit(child)

    visit(module)
    return found


def next_layer_weights(decoder, device: torch.device, budget: int) -> dict[ExpertsParts, list[torch.Tensor]]:
    """For the routed experts of each layer with host runners: the weights of the next layer's
    norms, attention and router on ``device``, in the order they are used, up to ``budget``
    bytes (none after the last layer)."""
    layers = list(decoder.model.model.layers)
    plan = {}
    for layer, following in zip(layers, [*layers[1:], None]):
        experts = getattr(layer.mlp, "experts", None)
        if not isinstance(experts, ExpertsParts) or not experts.runners:
            continue
        chosen, total = [], 0
        if following is not None:
            modules = (following.input_layernorm, following.self_attn, following.post_attention_layernorm,
                       getattr(following.mlp, "gate", None))
            for module in filter(None, modules):
                for t in decode_reads(module):
                    size = t.numel() * t.element_size()
                    if t.device == device and t.is_contiguous() and total + size <= budget:
                        chosen.append(t)
                        total += size
        plan[experts] = chosen
    return plan


def plan_l2_prefetch(decoder, device: torch.device) -> None:
    """Sets ``ExpertsParts.l2_prefetch`` of the layers with CPU experts in host nodes: the GPU
    reads the next layer's weights into L2 while the CPU works (``next_layer_weights``)."""
    import ktcore.ops.l2_prefetch  # noqa: F401  registers torch.ops.ktcore.l2_prefetch

    for experts, weights in next_layer_weights(decoder, device, l2_prefetch_budget(device)).items():
        experts.l2_prefetch = weights


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
        plan_l2_prefetch(decoder, device)
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
