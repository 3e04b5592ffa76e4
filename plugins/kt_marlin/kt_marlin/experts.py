"""``MarlinExperts``: the ``experts`` operator of the ``marlin`` backend (fused MoE on the GPU).

Options: ``format`` ``bf16 | int8 | int4`` (default bf16) and ``group_size`` ``32 | 64 | 128``
(default 128; quantised formats built from dense weights).

- ``bf16``: the owned experts' weights in bf16 (GGUF sources dequantised on the device).
- ``int4`` / ``int8``: packed once at load in ``kt_marlin.packing``'s layouts (int4: ``mma``,
  with the unit ``mma_unit(G, K)``), one matrix per expert stacked along a leading axis.
  GGUF Q4_0/Q4_1/Q4_K (int4) and Q8_0 (int8) are repacked
  exactly (groups of 32, whatever ``group_size`` says); any other source is quantised with
  ``group_size`` and the added relative RMS error is logged at warning level (DESIGN §7).

Only the experts in ``spec.owned`` are kept (GGUF sources are sliced in their blocks before
anything is dequantised), in chunks of experts so that loading never holds more than about
``load_chunk_bytes`` of fp32 weights at once. ``forward`` runs
``torch.ops.kt_marlin.fused_experts`` (see ``kt_marlin.fused_moe``): capture-safe,
deterministic, no graph break under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ktcore.errors import BackendError
from ktcore.ops.experts import Experts, ExpertsSpec
from ktcore.ops.weights import DenseWeight, GGUFWeight, WeightSource

from kt_marlin import fused_moe as _fused_moe  # noqa: F401  (registers torch.ops.kt_marlin.fused_experts)
from kt_marlin import packing
from kt_marlin.linear import BITS, _dense_on, weight_format

logger = logging.getLogger(__name__)


def owned_source(source: WeightSource, owned: Sequence[int]) -> WeightSource:
    """The ``[len(owned), ...]`` part of a stacked ``[E, ...]`` source, still in its format
    (GGUF blocks are sliced as bytes: each expert's rows are contiguous)."""
    ids = torch.tensor(list(owned), dtype=torch.long)
    if isinstance(source, DenseWeight):
        t = source.tensor  # [E, ...]
        return DenseWeight(t.index_select(0, ids.to(t.device)), source.name)
    rows = source.data.reshape(source.shape[0], -1)  # [E, bytes per expert]
    picked = rows.index_select(0, ids.to(rows.device)).contiguous()
    return GGUFWeight(picked, source.qtype, (len(ids),) + tuple(source.shape[1:]), source.name)


class _ErrorMeter:
    """Relative RMS error of a lossy conversion, summed over chunks."""

    def __init__(self) -> None:
        self.err = 0.0
        self.ref = 0.0

    def add(self, approx: torch.Tensor, ref: torch.Tensor) -> None:
        self.err += float((approx - ref).double().pow(2).sum())
        self.ref += float(ref.double().pow(2).sum())

    @property
    def relative(self) -> float:
        return (self.err / self.ref) ** 0.5 if self.ref > 0 else 0.0


class MarlinExperts(Experts):
    """Fused MoE on the GPU: bf16 or weight-only int8/int4 grouped GEMM Triton kernels."""

    option_names: ClassVar[tuple[str, ...]] = ("format", "group_size")
    #: fp32 bytes of dense weights one load step may materialise on the device.
    load_chunk_bytes: ClassVar[int] = 512 << 20

    def __init__(self, spec: ExpertsSpec, device: str | torch.device = "cuda", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        name = type(self).__name__
        self.format, self.group_size = weight_format(name, self.options, self.option_names)
        if self.format != "bf16" and (spec.hidden_size % 32 or spec.intermediate_size % 32):
            raise BackendError(f"{name}: format {self.format} needs hidden and intermediate sizes that are "
                               f"multiples of 32, got {spec.hidden_size} and {spec.intermediate_size}")
        self.bits = BITS[self.format]
        self.group = {"w13": self.group_size, "w2": self.group_size}
        self.exact = False
        slot_of = torch.full((spec.num_experts + 1,), -1, dtype=torch.int32)  # [E + 1], entry E = padding id
        slot_of[list(spec.owned_ids)] = torch.arange(spec.num_owned, dtype=torch.int32)
        self.register_buffer("slot_of", slot_of, persistent=False)
        for buf in ("w13", "s13", "o13", "w2", "s2", "o2"):
            self.register_buffer(buf, None)

    # ----------------------------------------------------------------------------- loading

    def _chunks(self, rows: int, cols: int) -> list[tuple[int, int]]:
        n = self.spec.num_owned
        per = max(1, self.load_chunk_bytes // (4 * rows * cols))
        return [(a, min(n, a + per)) for a in range(0, n, per)]

    def _pack_dense16(self, source: WeightSource) -> torch.Tensor:
        n, rows, cols = (self.spec.num_owned,) + tuple(source.shape[1:])
        out = torch.empty((n, rows, cols), dtype=torch.bfloat16, device=self.device)
        for a, b in self._chunks(rows, cols):
            out[a:b] = _dense_on(_slice(source, a, b), self.device, torch.bfloat16)
        return out  # [n, rows, cols]

    def _is_exact(self, source: WeightSource) -> bool:
        exact_types = packing.EXACT_INT4 if self.bits == 4 else packing.EXACT_INT8
        return isinstance(source, GGUFWeight) and source.qtype in exact_types

    def _pack_quantised(self, source: WeightSource, what: str, group: int) -> tuple[packing.Packed, bool]:
        """Packs an owned-only ``[n, rows, cols]`` source as one ``[n * rows, cols]`` matrix
        (exactly, or quantised with ``group``); also says whether that was exact."""
        rows, cols = source.shape[1:]
        exact = self._is_exact(source)
        if not exact and cols % group:
            logger.warning("%s: %s has %d columns, not a multiple of group_size %d; using 32",
                           type(self).__name__, what, cols, group)
            group = 32
        meter = _ErrorMeter()
        parts = []
        for a, b in self._chunks(rows, cols):
            part = _slice(source, a, b)
            if exact:
                packed = packing.from_gguf(part.data, part.qtype, ((b - a) * rows, cols), self.device)
            else:
                dense = _dense_on(part, self.device, torch.float32).reshape((b - a) * rows, cols)
                packed = packing.quantize_dense(dense, self.bits, group)
                meter.add(packing.unpack(packed), dense)
            parts.append(packing.to_mma(packed, fit=True) if self.bits == 4 else packed)  # per chunk: bounded memory
        if not exact:
            label = what if source.name == "<tensor>" else source.name
            logger.warning("%s: quantising %s (%s) to %s adds a relative RMS error of %.3g",
                           type(self).__name__, label, source.format, self.format, meter.relative)
        return _concat(parts), exact

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        spec = self.spec
        owned = spec.owned_ids
        srcs = {k: (v if spec.owned is None else owned_source(v, owned)) for k, v in sources.items()}
        n, I, H = spec.num_owned, spec.intermediate_size, spec.hidden_size
        if self.bits == 16:
            self.w13 = torch.cat([self._pack_dense16(srcs["gate"]), self._pack_dense16(srcs["up"])], dim=1)
            self.w2 = self._pack_dense16(srcs["down"])
            self.group = {"w13": 0, "w2": 0}
        else:
            # gate and up share one group: 32 when either is repacked exactly from GGUF
            g13 = 32 if self._is_exact(srcs["gate"]) or self._is_exact(srcs["up"]) else self.group_size
            gate, e1 = self._pack_quantised(srcs["gate"], "gate", g13)
            up, e2 = self._pack_quantised(srcs["up"], "up", g13)
            down, e3 = self._pack_quantised(srcs["down"], "down", self.group_size)
            self.exact = e1 and e2 and e3
            elements = gate.qweight.shape[1]  # int4: K / 4 (int16), int8: K
            self.w13 = torch.cat([gate.qweight.reshape(n, I, elements), up.qweight.reshape(n, I, elements)], 1)
            self.s13 = _cat_like(gate.scales, up.scales, n, I)
            self.o13 = None if gate.offsets is None else _cat_like(gate.offsets, up.offsets, n, I)
            self.w2 = down.qweight.reshape(n, H, -1)
            self.s2 = down.scales.reshape(n, H, -1)
            self.o2 = None if down.offsets is None else down.offsets.reshape(n, H, -1)
            self.group = {"w13": gate.group, "w2": down.group}
        self.slot_of = self.slot_of.to(self.device)
        logger.debug("%s packed %d/%d experts as %s on %s (exact: %s)", type(self).__name__, n,
                     spec.num_experts, self.format, self.device, self.exact)

    # ----------------------------------------------------------------------------- running

    def dequantized_weights(self) -> dict[str, torch.Tensor]:
        """The fp32 ``gate``/``up`` ``[n, I, H]`` and ``down`` ``[n, H, I]`` of the owned experts
        that the kernels multiply by (for tests)."""
        n, I = self.spec.num_owned, self.spec.intermediate_size
        if self.bits == 16:
            w13, w2 = self.w13.float(), self.w2.float()
        else:
            w13 = packing.unpack(packing.Packed(self.bits, self.group["w13"], self.w13.reshape(n * 2 * I, -1),
                                                self.s13.reshape(n * 2 * I, -1),
                                                None if self.o13 is None else self.o13.reshape(n * 2 * I, -1)))
            w13 = w13.reshape(n, 2 * I, -1)
            H = self.spec.hidden_size
            w2 = packing.unpack(packing.Packed(self.bits, self.group["w2"], self.w2.reshape(n * H, -1),
                                               self.s2.reshape(n * H, -1),
                                               None if self.o2 is None else self.o2.reshape(n * H, -1)))
            w2 = w2.reshape(n, H, -1)
        return {"gate": w13[:, :I], "up": w13[:, I:], "down": w2}

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, topk_ids, topk_weights)
        if self.w13 is None:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        return torch.ops.kt_marlin.fused_experts(
            x, topk_ids, topk_weights, self.slot_of, self.w13, self.s13, self.o13, self.w2, self.s2, self.o2,
            self.bits, self.group["w13"], self.group["w2"], self.spec.activation)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, owned={self.spec.num_owned}/{self.spec.num_experts}, "
                f"activation={self.spec.activation}, format={self.format}, group={self.group}, exact={self.exact}")


def _slice(source: WeightSource, a: int, b: int) -> WeightSource:
    """Experts ``a .. b`` of a stacked source (a view of dense tensors, a byte slice of GGUF)."""
    if isinstance(source, DenseWeight):
        return DenseWeight(source.tensor[a:b], source.name)
    rows = source.data.reshape(source.shape[0], -1)[a:b]  # [b - a, bytes per expert]
    return GGUFWeight(rows.contiguous(), source.qtype, (b - a,) + tuple(source.shape[1:]), source.name)


def _common_dtype(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Scale tensors in one dtype: theirs when they agree, fp32 (exact for fp16) otherwise."""
    dtype = ts[0].dtype if len({t.dtype for t in ts}) == 1 else torch.float32
    return [t.to(dtype) for t in ts]


def _concat(parts: list[packing.Packed]) -> packing.Packed:
    """Packed chunks (rows of one matrix) joined."""
    if len(parts) == 1:
        return parts[0]
    offsets = None if parts[0].offsets is None else torch.cat(_common_dtype([p.offsets for p in parts]))
    return packing.Packed(parts[0].bits, parts[0].group, torch.cat([p.qweight for p in parts]),
                          torch.cat(_common_dtype([p.scales for p in parts])), offsets)


def _cat_like(a: torch.Tensor, b: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    """gate and up scale rows ``[n * rows, G]`` each -> ``[n, 2 rows, G]`` in a common dtype."""
    a, b = _common_dtype([a, b])
    return torch.cat([a.reshape(n, rows, -1), b.reshape(n, rows, -1)], 1).contiguous()
