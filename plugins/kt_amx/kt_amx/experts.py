"""``AmxExperts``: ktcore's Experts operator on kt-amx's C kernels (AMX / AVX-512 / AVX2).

A thin wrapper: ``pack`` converts the weights once (kt_amx.packing) and describes them to the
C library; ``forward`` calls ``torch.ops.kt_amx.experts``, a ``torch.library.custom_op`` with
a fake implementation, so ``torch.compile(fullgraph=True)`` traces through it. The op runs the
C forward synchronously on the shared worker pool (the calling thread sleeps in the wait, so
torch's own threads and ours do not compete). ``make_job`` binds fixed buffers for the
asynchronous submit/wait API (kt_amx.jobs) used by CUDA-graph decode.

Options: ``format`` bf16|int8|int4 (default: exact format of GGUF Q8_0/Q4_0/Q4_K sources,
else bf16), ``group_size`` 32|64|128 or 0 = per output channel (int8; default 128),
``symmetric`` (int4; default False = affine), ``threads`` (default: physical cores - 1),
``numa`` split|mirror|off (default split; only matters on a topology of several nodes, see
kt_amx.numa and kt_amx.numa_layer).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from kt_amx import _lib
from kt_amx.numa import read_topology
from kt_amx.numa_layer import MODES, Plan, build_parts, join_parts, make_plan, node_of_workers
from kt_amx.packing import LayerFormat, PackedMatrix, layer_format, pack_matrix, unpack
from ktcore.errors import BackendError, WeightError
from ktcore.ops.experts import Experts, ExpertsSpec
from ktcore.ops.linear import check_options
from ktcore.ops.weights import WeightSource

logger = logging.getLogger(__name__)

FORMAT_CODES = {"bf16": 0, "int8": 1, "int4": 2}
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
STATUS = {1: "job not set", 2: "topk_ids outside [0, num_experts]", 4: "worker pool not started",
          8: "no usable ISA", 16: "workspace too small"}

#: Live instances by handle: the custom op receives the handle (an int), not the module.
_INSTANCES: weakref.WeakValueDictionary[int, AmxExperts] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def status_error(status: int) -> RuntimeError | IndexError:
    names = [text for bit, text in STATUS.items() if status & bit] or [f"status {status}"]
    cls = IndexError if status == 2 else RuntimeError
    return cls(f"kt-amx: {'; '.join(names)}")


class AmxExperts(Experts):
    """Routed experts on the CPU with packed bf16/int8/int4 weights (see the module docstring)."""

    option_names: ClassVar[tuple[str, ...]] = ("format", "group_size", "symmetric", "threads", "numa")

    def __init__(self, spec: ExpertsSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        if self.device.type != "cpu":
            raise BackendError(f"{type(self).__name__} runs on the CPU, not on {self.device}")
        if spec.activation not in ACT_CODES:
            raise BackendError(f"{type(self).__name__}: unsupported activation {spec.activation!r}")
        threads = self.options.get("threads")
        self.threads = int(threads) if threads else _lib.default_threads()
        self.numa = str(self.options.get("numa", "split"))
        if self.numa not in MODES:
            raise BackendError(f"{type(self).__name__}: option numa must be one of {', '.join(MODES)}, got {self.numa!r}")
        self.layer_format: LayerFormat | None = None
        # plain attributes: Module.to() must not touch them. `packed` is the whole layer until
        # _create_layer cuts it into per-node `parts` (split) or copies (mirror).
        self.packed: dict[str, PackedMatrix] = {}
        self.parts: list[dict[str, PackedMatrix]] = []
        self.plan: Plan | None = None
        self._part_moes: list = []
        self._moe = None
        self._job = None
        self._reserved = (0, 0)
        self.handle = next(_HANDLES)
        _INSTANCES[self.handle] = self

    # ----------------------------------------------------------------------------- packing

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        fmt = layer_format(sources, self.options)
        owned = self.spec.owned
        packed = {}
        for name in self.weight_names():
            packed[name], err = pack_matrix(sources[name], owned, fmt)
            if err is not None:
                label = getattr(sources[name], "name", name)
                logger.warning("kt-amx: %s (%s) converted to %s with relative error %.3g", label,
                               sources[name].format, fmt.format, err)
        self.layer_format = fmt
        self.packed = packed
        self._create_layer()
        logger.debug("%s packed %d/%d experts as %s", type(self).__name__, self.spec.num_owned,
                     self.spec.num_experts, fmt)

    def _create_layer(self) -> None:
        """Describes the packed weights to the C library: one kt_moe, or one per NUMA node
        combined by kt_moe_combine (kt_amx/numa_layer.py)."""
        ffi, lib = _lib.kernels()
        _lib.ensure_pool(self.threads)
        fmt = self.layer_format
        whole = self.packed or self._whole()  # re-created after a split: reassembled
        self.plan = make_plan(self.numa, read_topology(), fmt, self.spec.intermediate_size)
        if self.plan is None:
            self.packed = whole
            self.parts = [whole]
            self._part_moes = []
            self._moe = self._make_moe(whole)
        else:
            nodes = node_of_workers(self.plan.topology)
            self.parts = build_parts(whole, fmt, self.plan, nodes)
            self.packed = {}  # the parts hold the bytes (once for split, once per node for mirror)
            self._part_moes = [self._make_moe(p) for p in self.parts]
            err = ffi.new("char[512]")
            moe = lib.kt_moe_combine(self._part_moes, len(self._part_moes), 0 if self.plan.mode == "split" else 1,
                                     ffi.new("int32_t[]", nodes), len(nodes), err, 512)
            if moe == ffi.NULL:
                raise WeightError(f"kt-amx: {ffi.string(err).decode()}")
            self._moe = ffi.gc(moe, lib.kt_moe_destroy)
            logger.debug("%s: %s over %d NUMA nodes, I cuts %s", type(self).__name__, self.plan.mode,
                         self.plan.n_parts, self.plan.bounds)
        self._job = ffi.gc(lib.kt_job_create(), lib.kt_job_destroy)
        self._reserved = (0, 0)

    def _make_moe(self, packed: dict[str, PackedMatrix]):
        ffi, lib = _lib.kernels()
        s, fmt = self.spec, self.layer_format
        slot_of = torch.full((s.num_experts + 1,), -1, dtype=torch.int32)
        slot_of[list(s.owned_ids)] = torch.arange(s.num_owned, dtype=torch.int32)
        desc = ffi.new("kt_layer *")
        desc.format = FORMAT_CODES[fmt.format]
        desc.group = fmt.group
        desc.scale_f32 = int(fmt.scale_f32)
        desc.symmetric = int(fmt.symmetric)
        desc.act = ACT_CODES[s.activation]
        desc.n_experts = s.num_experts
        desc.n_slots = s.num_owned
        desc.hidden = s.hidden_size
        desc.inter = packed["gate"].n
        desc.slot_of = _lib.address(slot_of, "int32_t *")  # copied by kt_moe_create
        for name in self.weight_names():
            p, m = packed[name], getattr(desc, name)
            m.w, m.scale, m.zmin = _lib.address(p.w), _lib.address(p.scale), _lib.address(p.zmin)
            m.n, m.k = p.n, p.k
        err = ffi.new("char[512]")
        moe = lib.kt_moe_create(desc, err, 512)
        if moe == ffi.NULL:
            raise WeightError(f"kt-amx: {ffi.string(err).decode()}")
        return ffi.gc(moe, lib.kt_moe_destroy)

    def _whole(self) -> dict[str, PackedMatrix]:
        """The layer's packed matrices from its parts (cat along I for split)."""
        if self.plan is not None and self.plan.mode == "split":
            return join_parts(self.parts, self.layer_format)
        return self.parts[0]

    def dequantized_parts(self) -> list[dict[str, torch.Tensor]]:
        """Per NUMA part (one part without NUMA): the packed weights as fp32 ``[n_owned, ...]``
        (gate/up ``[n, I_j, H]``, down ``[n, H, I_j]``), what each part computes with."""
        parts = self.parts if self.plan is not None and self.plan.mode == "split" else [self.parts[0]]
        return [{name: unpack(p, self.layer_format) for name, p in part.items()} for part in parts]

    def dequantized(self) -> dict[str, torch.Tensor]:
        """The packed weights as fp32 ``[n_owned, ...]`` (what the kernels compute with)."""
        parts = self.dequantized_parts()
        return {"gate": torch.cat([p["gate"] for p in parts], dim=1), "up": torch.cat([p["up"] for p in parts], dim=1),
                "down": torch.cat([p["down"] for p in parts], dim=2)}

    def packed_bytes(self) -> int:
        """Bytes of packed weights held (every copy, for mirror)."""
        return sum(t.numel() * t.element_size() for part in self.parts for p in part.values()
                   for t in (p.w, p.scale, p.zmin) if t is not None)

    # ------------------------------------------------------- streaming (ktcore.runtime.streamed_experts)

    def stream_tensors(self) -> dict[str, torch.Tensor] | None:
        """The packed matrices, ``{"gate.w", "gate.scale", "gate.zmin", ...}`` (those present),
        each ``[S, ...]`` over the owned experts; None for a layer split over NUMA nodes (its
        parts cut I, so no tensor holds whole experts)."""
        if not self.parts:
            return None
        if self.plan is not None and self.plan.mode == "split":
            logger.debug("%s: no streaming, the layer is split over %d NUMA nodes", type(self).__name__,
                         self.plan.n_parts)
            return None
        packed = self.parts[0]  # mirror: every node holds the same bytes
        return {f"{name}.{field}": t for name, p in packed.items()
                for field, t in (("w", p.w), ("scale", p.scale), ("zmin", p.zmin)) if t is not None}

    def stream_expert_ids(self) -> torch.Tensor:
        return torch.tensor(self.spec.owned_ids, dtype=torch.int64)

    def stream_dense(self, chunk: Mapping[str, torch.Tensor], dtype: torch.dtype):
        """gate, up ``[n, I, H]`` and down ``[n, H, I]`` in ``dtype`` on the chunk's device: the
        packed values the kernels compute with (kt_amx.packing.unpack)."""
        out = []
        for name in ("gate", "up", "down"):
            shape = self.parts[0][name]
            p = PackedMatrix(chunk[f"{name}.w"], chunk.get(f"{name}.scale"), chunk.get(f"{name}.zmin"),
                             shape.n, shape.k)
            out.append(unpack(p, self.layer_format, dtype))
        return tuple(out)

    # ----------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, topk_ids, topk_weights)
        if self._moe is None:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        return torch.ops.kt_amx.experts(x, topk_ids, topk_weights, self.handle)

    def reserve(self, tokens: int, top_k: int) -> None:
        """Sizes the workspace for up to ``tokens`` x ``top_k`` (grows only)."""
        if tokens <= self._reserved[0] and top_k == self._reserved[1]:
            return
        tokens = max(tokens, self._reserved[0] if top_k == self._reserved[1] else 0)
        if _lib.kernels()[1].kt_moe_reserve(self._moe, tokens, top_k) != 0:
            raise MemoryError(f"kt-amx: cannot allocate the workspace for {tokens} tokens x top-{top_k}")
        self._reserved = (tokens, top_k)

    def run(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The C forward on contiguous CPU tensors (the custom op's implementation)."""
        T, K = topk_ids.shape
        out_dtype = x.dtype
        xc = (x if x.dtype in DTYPE_CODES else x.float()).contiguous()
        ids = (topk_ids if topk_ids.dtype in (torch.int32, torch.int64) else topk_ids.long()).contiguous()
        w = topk_weights.to(torch.float32).contiguous()
        y = torch.empty_like(xc)
        if T == 0:
            return y.to(out_dtype)
        self.reserve(T, K)
        lib = _lib.kernels()[1]
        lib.kt_job_set(self._job, self._moe, T, K, _lib.address(xc), DTYPE_CODES[xc.dtype], _lib.address(ids),
                       int(ids.dtype == torch.int64), _lib.address(w, "float *"), _lib.address(y), self.threads)
        status = lib.kt_run(self._job)
        if status:
            raise status_error(status)
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def make_job(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 y: torch.Tensor | None = None):
        """An asynchronous forward bound to these (static) buffers: see kt_amx.jobs.ExpertsJob."""
        from kt_amx.jobs import ExpertsJob

        return ExpertsJob(self, x, topk_ids, topk_weights, y)

    def host_doorbell(self, device: torch.device):
        """The doorbell a CUDA stream on ``device`` rings to run this layer's jobs without host
        nodes (kt_amx.doorbell; the job protocol's optional part)."""
        from kt_amx.doorbell import doorbell_for

        return doorbell_for(device.index if device.index is not None else torch.cuda.current_device())

    def extra_repr(self) -> str:
        numa = "" if self.plan is None else f", numa={self.plan.mode}x{self.plan.n_parts}"
        return (f"{super().extra_repr()}, owned={self.spec.num_owned}/{self.spec.num_experts}, "
                f"format={self.layer_format}, threads={self.threads}{numa}")


def instance(handle: int) -> AmxExperts:
    layer = _INSTANCES.get(handle)
    if layer is None:
        raise RuntimeError(f"kt-amx: no live AmxExperts with handle {handle}")
    return layer


@torch.library.custom_op("kt_amx::experts", mutates_args=(), device_types="cpu")
def experts_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int) -> torch.Tensor:
    """y[T, H] in x's dtype; ``handle`` names the AmxExperts instance."""
    return instance(handle).run(x, topk_ids, topk_weights)


@experts_op.register_fake
def _experts_fake(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(x)
