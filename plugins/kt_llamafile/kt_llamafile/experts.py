"""``LlamafileExperts``: ktcore's Experts operator on kt-llamafile's C kernels.

The stacked ``ffn_{gate,up,down}_exps`` tensors are read in place: with GGUF sources the
kernels get the whole stacked blocks (zero copy) and a map ``slot_of[E + 1]`` from expert id
to its index in them, -1 for experts this instance does not own (and for the padding id E).
Dense sources become F32/BF16/F16 rows; when only some experts are owned and a source is
dense, the owned experts are stacked compactly (GGUF ones still quantised) and ``slot_of``
points into that.

``forward`` runs ``torch.ops.kt_llamafile.experts`` (directly its implementation in eager mode,
see ops.py): x is quantised once per token, pairs are
grouped by expert, gate and up run on each expert's tokens, act(gate) * up is quantised again
for down, and each output row sums its experts in expert order (see csrc/matmul.c).

``make_job`` binds fixed buffers for asynchronous submit/wait (kt_llamafile.jobs): what
ktcore's ``HostExpertsRunner`` needs to run these experts inside a CUDA graph.

Streaming prefill (ktcore.runtime.streamed_experts): the raw rows stream as they are (zero
copy from the mmap); ``stream_dense`` dequantises them where they land: on a GPU with
kt-marlin's Triton kernels (an optional dependency, imported lazily), on the CPU with the C
reference. F32/F16/BF16 rows are only reinterpreted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from kt_llamafile import _lib, ops
from kt_llamafile.qtypes import FLOAT_TYPES
from kt_llamafile.linear import threads_option
from kt_llamafile.weights import is_zero_copy, raw_rows, select_experts
from ktcore.errors import BackendError
from ktcore.ops.experts import Experts, ExpertsSpec
from ktcore.ops.linear import check_options
from ktcore.ops.weights import DenseWeight, WeightSource

logger = logging.getLogger("kt_llamafile")

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class LlamafileExperts(Experts):
    """Routed experts on GGUF blocks in place (see the module docstring)."""

    option_names: ClassVar[tuple[str, ...]] = ("threads",)

    def __init__(self, spec: ExpertsSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        if self.device.type != "cpu":
            raise BackendError(f"{type(self).__name__} runs on the CPU, not on {self.device}")
        if spec.activation not in ACT_CODES:
            raise BackendError(f"{type(self).__name__}: unsupported activation {spec.activation!r}")
        self.threads = threads_option(type(self).__name__, self.options)
        # plain attributes, not buffers: Module.to() must not move or convert the raw rows
        self.rows: dict[str, torch.Tensor] = {}
        self.qtypes: dict[str, str] = {}
        self.zero_copy: dict[str, bool] = {}
        self.slot_of: torch.Tensor | None = None
        self.compact = False  # rows hold only the owned experts (slot_of points into them)

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        spec = self.spec
        owned = spec.owned
        compact = owned is not None and any(isinstance(s, DenseWeight) for s in sources.values())
        for name in self.weight_names():
            rows, qtype = raw_rows(sources[name])  # [E, rows, row_bytes] uint8
            if compact:
                rows = select_experts(rows, owned)
            self.rows[name] = rows.reshape(rows.shape[0], -1)
            self.qtypes[name] = qtype
            self.zero_copy[name] = is_zero_copy(sources[name], self.rows[name])
        slot_of = torch.full((spec.num_experts + 1,), -1, dtype=torch.int32)  # [E + 1]
        ids = torch.tensor(spec.owned_ids, dtype=torch.long)
        slot_of[ids] = torch.arange(len(ids), dtype=torch.int32) if compact else ids.to(torch.int32)
        self.slot_of = slot_of
        self.compact = compact
        _lib.kernels()
        logger.debug("%s packed %d/%d experts as %s (zero copy: %s)", type(self).__name__, spec.num_owned,
                     spec.num_experts, self.qtypes, self.zero_copy)

    def packed_bytes(self) -> int:
        """Bytes of the owned experts' weights as held (GGUF blocks or float rows): what
        ``kt bench`` counts for the CPU-bandwidth roofline."""
        return sum(rows.shape[1] for rows in self.rows.values()) * self.spec.num_owned  # rows: [E or S, bytes]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, topk_ids, topk_weights)
        if self.slot_of is None:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        qtypes = [_lib.QTYPE_IDS[self.qtypes[n]] for n in ("gate", "up", "down")]
        return ops.call(torch.ops.kt_llamafile.experts, ops.experts_impl, x, topk_ids, topk_weights,
                        self.rows["gate"], self.rows["up"], self.rows["down"], self.slot_of, qtypes,
                        self.spec.intermediate_size, ACT_CODES[self.spec.activation], self.threads)

    # ------------------------------------------------------- streaming (ktcore.runtime.streamed_experts)

    def _missing_dequantizer(self) -> str | None:
        """Why the rows cannot be dequantised where streaming would put them, or None: a GPU
        (when CUDA is available) needs kt-marlin's kernels, the CPU has the C reference."""
        quantized = sorted({q for q in self.qtypes.values() if q not in FLOAT_TYPES})
        if not quantized or not torch.cuda.is_available():
            return None
        try:
            from kt_marlin.dequant import QTYPES
        except Exception as exc:  # not installed, or Triton missing: no GPU dequantisation
            return f"kt-marlin cannot be imported ({exc})"
        missing = [q for q in quantized if q not in QTYPES]
        return f"kt-marlin cannot dequantise {missing}" if missing else None

    def stream_tensors(self) -> dict[str, torch.Tensor] | None:
        """The raw rows ``{"gate", "up", "down"}``, each ``[S, bytes per expert]`` uint8."""
        if self.slot_of is None:
            return None
        reason = self._missing_dequantizer()
        if reason is not None:
            logger.debug("%s: no streaming, %s", type(self).__name__, reason)
            return None
        return dict(self.rows)

    def stream_expert_ids(self) -> torch.Tensor:
        """All E experts' ids when the rows are the whole stacked tensors, else the owned ones."""
        if self.compact:
            return torch.tensor(self.spec.owned_ids, dtype=torch.int64)
        return torch.arange(self.rows["gate"].shape[0], dtype=torch.int64)

    def stream_dense(self, chunk: Mapping[str, torch.Tensor], dtype: torch.dtype):
        """gate, up ``[n, I, H]`` and down ``[n, H, I]`` in ``dtype`` on the chunk's device."""
        H, I = self.spec.hidden_size, self.spec.intermediate_size
        out = []
        for name, dims in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            rows, qtype = chunk[name], self.qtypes[name]  # [n, bytes] uint8
            shape = (rows.shape[0], *dims)
            if qtype in FLOAT_TYPES:
                out.append(rows.view(FLOAT_DTYPES[qtype]).reshape(shape).to(dtype))
            elif rows.device.type == "cuda":
                from kt_marlin.dequant import dequantize

                out.append(dequantize(rows, qtype, shape, dtype))
            else:
                out.append(_lib.dequantize(rows, qtype, shape).to(device=rows.device, dtype=dtype))
        return tuple(out)

    def make_job(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 y: torch.Tensor | None = None):
        """An asynchronous forward bound to these fixed buffers (the job protocol of ktcore's
        HostExpertsRunner): see kt_llamafile.jobs.ExpertsJob."""
        from kt_llamafile.jobs import ExpertsJob

        return ExpertsJob(self, x, topk_ids, topk_weights, y)

    def host_doorbell(self, device: torch.device):
        """kt-amx's doorbell for ``device`` when kt-amx is installed (its watcher thread runs
        this backend's job functions like its own), else None: host nodes."""
        try:
            from kt_amx.doorbell import doorbell_for
        except ImportError:
            return None
        return doorbell_for(device.index if device.index is not None else torch.cuda.current_device())

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, owned={self.spec.num_owned}/{self.spec.num_experts}, "
                f"qtypes={self.qtypes}, threads={self.threads}")
