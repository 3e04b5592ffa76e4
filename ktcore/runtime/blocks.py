"""Modules the runtime puts in the transformers skeleton where transformers' own forward
would not do: the MoE block (our router, the Experts operator, the shared experts) and the
bridges that let operators on one device serve modules on another."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ktcore.ops.experts import must_be_capture_safe


def device_of(module: nn.Module) -> torch.device:
    """The device of an operator (``.device``) or of a module's first tensor."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


class ExpertsParts(nn.Module):
    """One MoE layer's routed experts held by one or more Experts instances (several for a
    rule's ``split``): each computes its owned experts on its own device; the results add up
    on the device of the input.

    With host runners attached (``attach_host_runners``, done by the CUDA-graph decode step),
    the CPU parts that offer the job protocol (ktcore.runtime.host_experts) run from GPU
    inputs through pinned buffers and host nodes: ``begin`` submits them first, computes the
    parts on GPUs meanwhile, and the returned ``finish`` waits for the CPU and adds up. Batches
    larger than the runners' ``max_tokens`` (prefill chunks) take the plain path.

    Batches of at least ``stream_min_tokens`` tokens (0 or None: never) on a device of
    ``stream_device_types`` run each CPU part that offers the streaming protocol on that
    device instead, its weights copied there chunk by chunk (ktcore.runtime.streamed_experts);
    ``stream_pools`` (device -> StreamPool) is shared by a model's layers.
    """

    stream_device_types: tuple[str, ...] = ("cuda",)  # tests add "cpu"

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        from ktcore.runtime.streamed_experts import DEFAULT_MIN_TOKENS

        self.parts = nn.ModuleList(parts)
        self.runners: dict[int, object] = {}  # index of a CPU part -> HostExpertsRunner
        self.stream_min_tokens: int | None = DEFAULT_MIN_TOKENS
        self.stream_pools: dict | None = None  # torch.device -> StreamPool, shared by the model's layers
        self._streamed: dict[int, object] = {}  # index of a CPU part -> StreamedPart, or None: cannot stream

    def host_job_parts(self) -> list[int]:
        """Indices of the CPU parts that can run inside a CUDA graph."""
        from ktcore.runtime.host_experts import supports_host_jobs

        return [i for i, part in enumerate(self.parts) if part.device.type == "cpu" and supports_host_jobs(part)]

    def attach_host_runners(self, max_tokens: int, device: torch.device, dtype: torch.dtype) -> None:
        """Runs the CPU parts from inputs on ``device`` (a GPU) through host nodes, for batches
        of up to ``max_tokens``; ``dtype`` is the activations' type on the host side."""
        from ktcore.runtime.host_experts import HostExpertsRunner

        host_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        self.runners = {i: HostExpertsRunner(self.parts[i], max_tokens, device, host_dtype)
                        for i in self.host_job_parts()}

    def detach_host_runners(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners = {}

    def streamed(self, i: int):
        """The StreamedPart of CPU part ``i`` (made on first use), or None."""
        if i not in self._streamed:
            from ktcore.runtime.streamed_experts import streamed_part

            part = self.parts[i]
            self._streamed[i] = streamed_part(part) if part.device.type == "cpu" else None
        return self._streamed[i]

    def _streaming(self, x: torch.Tensor) -> dict[int, object]:
        """Index -> StreamedPart of the CPU parts this batch runs on x's device."""
        n = self.stream_min_tokens
        if not n or x.shape[0] < n or x.device.type not in self.stream_device_types or must_be_capture_safe():
            return {}  # streaming syncs with the host: never inside a capture or torch.compile
        out = {i: self.streamed(i) for i, part in enumerate(self.parts) if part.device.type == "cpu"}
        return {i: s for i, s in out.items() if s is not None}

    def _stream_pool(self, device: torch.device):
        from ktcore.runtime.stream_pool import StreamPool

        if self.stream_pools is None:
            self.stream_pools = {}
        if device not in self.stream_pools:
            self.stream_pools[device] = StreamPool(device)
        return self.stream_pools[device]

    def _use_runners(self, x: torch.Tensor) -> bool:
        runner = next(iter(self.runners.values()), None)
        return runner is not None and x.device == runner.device and x.shape[0] <= runner.max_tokens

    def begin(self, x: torch.Tensor, topk_ids: torch.Tensor,
              topk_weights: torch.Tensor) -> Callable[..., torch.Tensor]:
        """Starts the forward; the returned function finishes it and gives y [T, H]."""
        # x: [T, H]; topk_ids, topk_weights: [T, K]
        via_host = self._use_runners(x)
        tickets = []  # (ticket, runner handle) of the submitted CPU parts: ktcore.runtime.host_experts' ops
        if via_host:
            # runners whose kernels store into the pinned buffers convert while storing; for the
            # others, in the runners' types here, where torch.compile fuses the conversions into
            # the kernels before (the submit op would run them as kernels of their own)
            for r in self.runners.values():
                args = (x, topk_ids, topk_weights) if r.mapped is not None else \
                    (x.to(r.dtype), topk_ids.to(torch.int64), topk_weights.to(torch.float32))
                tickets.append((torch.ops.ktcore.host_experts_submit(*args, r.handle), r.handle))
        streaming = {} if via_host else self._streaming(x)
        out = None
        for i, part in enumerate(self.parts):
            if via_host and i in self.runners:
                continue
            if i in streaming:  # on x's device, the weights copied there
                y = streaming[i].forward(x, topk_ids.to(x.device), topk_weights.to(x.device),
                                         self._stream_pool(x.device))
            else:
                dev = part.device
                y = part(x.to(dev), topk_ids.to(dev), topk_weights.to(dev)).to(x.device)
            out = y if out is None else out + y

        def finish(after: Sequence[torch.Tensor] = ()) -> torch.Tensor:
            """``after``: other GPU work of the layer (shared experts) that is to run while the
            CPU works: the compiled step computes it, like the GPU parts, before the wait."""
            result = out
            overlapped = [t for t in (out, *after) if t is not None]
            for ticket, handle in tickets:
                y = torch.ops.ktcore.host_experts_finish(ticket, x, handle, overlapped)
                result = y if result is None else result + y
            return result

        return finish

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.begin(x, topk_ids, topk_weights)()


class LinearOnDevice(nn.Module):
    """A Linear operator called from modules on another device: moves x there and back."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return self.op(x.to(self.op.device)).to(x.device)


class MoEBlock(nn.Module):
    """``y = experts(x, gate(x)) + shared(x)`` for every supported family.

    Children keep transformers' names, so weights load under the checkpoint's names: ``gate``
    (our router), ``experts``, and DeepSeek's ``shared_experts`` or Qwen2-MoE's
    ``shared_expert`` with ``shared_expert_gate`` (output scaled by ``sigmoid(gate(x))``);
    Qwen3-MoE and Mixtral have no shared expert.
    """

    SHARED_NAMES = ("shared_experts", "shared_expert")

    def __init__(self, gate: nn.Module, experts: nn.Module, shared: dict[str, nn.Module]):
        super().__init__()
        self.gate = gate
        self.experts = experts
        unknown = set(shared) - {*self.SHARED_NAMES, "shared_expert_gate"}
        if unknown:
            raise ValueError(f"MoEBlock: unknown shared modules {sorted(unknown)}")
        for name, module in shared.items():
            setattr(self, name, module)
        self.shared_name = next((n for n in self.SHARED_NAMES if n in shared), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, H]
        flat = x.reshape(-1, x.shape[-1])  # [B*T, H]
        topk_ids, topk_weights = self.gate(flat.to(device_of(self.gate)))  # [B*T, K] int32, fp32
        finish = self.experts.begin(flat, topk_ids, topk_weights)  # CPU experts start first
        shared = None
        if self.shared_name is not None:  # overlaps the CPU experts
            shared = getattr(self, self.shared_name)(flat)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
        y = finish(() if shared is None else (shared,))
        if shared is not None:
            y = y + shared
        return y.view_as(x)
