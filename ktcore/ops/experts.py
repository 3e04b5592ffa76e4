"""Experts operator: the routed experts of one MoE layer (no router, no shared experts).

    y[t] = sum_k owned[id[t,k]] * w[t,k] * down[id](act(gate[id] @ x[t]) * (up[id] @ x[t]))

Weights are always handed over stacked for all E experts — gate/up ``[E, I, H]``, down
``[E, H, I]`` — and a backend keeps only the experts in ``spec.owned``. Experts that are not
owned add exactly zero, so the instances holding the parts of one layer on different devices
simply add up. A token may name the same expert twice in its top-k; it then counts twice.
The id ``E`` (one past the last expert) is a padding id that adds zero, as in transformers.

``TorchExperts`` is the reference backend. Its ``forward_gather`` path has no data-dependent
shapes and no host synchronisation (capture-safe, used for decode and whenever torch.compile
or a CUDA graph capture is running); ``forward_grouped`` sorts the (token, k) pairs by
expert and runs one matmul per expert, which is faster for prefill but syncs with the host.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ktcore.ops.base import Operator
from ktcore.ops.linear import check_options, dense_dtype, dtype_option
from ktcore.ops.weights import DenseWeight, GGUFWeight, WeightSource

logger = logging.getLogger(__name__)

#: Canonical activation names of ``ExpertsSpec.activation``.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

#: transformers ``hidden_act`` names (``ACT2FN`` keys) -> canonical activation name.
HF_ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "relu": "relu",
}


def canonical_activation(name: str) -> str:
    """Maps a canonical or transformers ``hidden_act`` name to one of ``ACTIVATIONS``."""
    if isinstance(name, str) and name in HF_ACTIVATIONS:
        return HF_ACTIVATIONS[name]
    raise ValueError(
        f"unsupported expert activation {name!r} (supported: {', '.join(sorted(HF_ACTIVATIONS))})"
    )


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function of an activation name (canonical or transformers)."""
    name = canonical_activation(name)
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return functools.partial(F.gelu, approximate="tanh")
    return F.relu


@dataclass(frozen=True)
class ExpertsSpec:
    """One MoE layer's routed experts; ``owned`` (sorted expert ids) or None for all of them.

    ``activation`` accepts transformers ``hidden_act`` names and is stored canonical.
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    top_k: int
    activation: str = "silu"
    owned: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("num_experts", "hidden_size", "intermediate_size", "top_k"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ExpertsSpec.{field} must be a positive int, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"ExpertsSpec.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        object.__setattr__(self, "activation", canonical_activation(self.activation))
        if self.owned is None:
            return
        if not isinstance(self.owned, (tuple, list, range)):
            raise ValueError(f"ExpertsSpec.owned must be None or a tuple of expert ids, got {self.owned!r}")
        owned = tuple(self.owned)
        object.__setattr__(self, "owned", owned)
        if not owned:
            raise ValueError("ExpertsSpec.owned is empty; an Experts instance must own at least one expert")
        bad = [e for e in owned if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"ExpertsSpec.owned: ids {bad} are not experts of a layer with {self.num_experts}")
        if any(a >= b for a, b in zip(owned, owned[1:])):
            raise ValueError(f"ExpertsSpec.owned must be sorted and without repeats, got {owned}")

    @property
    def owned_ids(self) -> tuple[int, ...]:
        """The owned expert ids, all of them when ``owned`` is None."""
        return tuple(range(self.num_experts)) if self.owned is None else self.owned

    @property
    def num_owned(self) -> int:
        return self.num_experts if self.owned is None else len(self.owned)

    def owned_mask(self, device: str | torch.device | None = None) -> torch.Tensor:
        """``BoolTensor[E]``: True for the experts this instance computes."""
        mask = torch.zeros(self.num_experts, dtype=torch.bool, device=device)
        mask[list(self.owned_ids)] = True
        return mask


class Experts(Operator):
    """Interface: ``forward(x[T,H], topk_ids[T,K], topk_weights[T,K]) -> y[T,H]`` (x's dtype).

    ``topk_ids`` int32 or int64, ``topk_weights`` fp32. Weights ``gate``/``up`` ``[E, I, H]``
    and ``down`` ``[E, H, I]`` for all E experts; a backend keeps the owned ones.
    """

    op_name: ClassVar[str] = "experts"

    spec: ExpertsSpec

    def __init__(self, spec: ExpertsSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        if not isinstance(spec, ExpertsSpec):
            raise TypeError(f"{type(self).__name__} needs an ExpertsSpec, got {type(spec).__name__}")
        super().__init__(spec, device, options)

    def weight_names(self) -> tuple[str, ...]:
        return ("gate", "up", "down")

    def expected_shape(self, name: str) -> tuple[int, ...]:
        s = self.spec
        if name in ("gate", "up"):
            return (s.num_experts, s.intermediate_size, s.hidden_size)
        if name == "down":
            return (s.num_experts, s.hidden_size, s.intermediate_size)
        raise KeyError(f"{type(self).__name__} has no weight named {name!r}")

    def check_inputs(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Static (shape and dtype only, no host sync) checks of the forward arguments."""
        if x.dim() != 2 or x.shape[1] != self.spec.hidden_size:
            raise ValueError(f"{type(self).__name__}: x must be [T, {self.spec.hidden_size}], got {list(x.shape)}")
        if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"{type(self).__name__}: topk_ids must be [T={x.shape[0]}, K], got {list(topk_ids.shape)}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{type(self).__name__}: topk_ids must be int32 or int64, got {topk_ids.dtype}")
        if topk_weights.shape != topk_ids.shape or not topk_weights.is_floating_point():
            raise ValueError(
                f"{type(self).__name__}: topk_weights must be float {list(topk_ids.shape)}, "
                f"got {topk_weights.dtype} {list(topk_weights.shape)}"
            )

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchExperts(Experts):
    """Reference backend: the owned experts' weights stacked compactly on ``device``.

    Options: ``dtype`` in ``bf16 | fp16 | fp32`` (default: the dense sources' dtype, fp32 for
    GGUF sources). Buffers: ``gate_up`` ``[n, 2I, H]`` (gate rows first), ``down``
    ``[n, H, I]`` for the n owned experts, and ``slot_of`` ``[E + 1]`` mapping a global expert
    id to its local slot, -1 when not owned (entry E is the padding id).
    """

    option_names: ClassVar[tuple[str, ...]] = ("dtype",)
    #: Up to this many (token, k) pairs, eager forward takes the capture-safe gather path.
    gather_max_pairs: ClassVar[int] = 64
    #: Bytes of gathered expert weights one gather step may materialise.
    gather_chunk_bytes: ClassVar[int] = 256 << 20

    gate_up: torch.Tensor | None
    down: torch.Tensor | None
    slot_of: torch.Tensor

    def __init__(self, spec: ExpertsSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        self.dtype_request = dtype_option(type(self).__name__, self.options)
        self.act = activation_fn(spec.activation)
        slot_of = torch.full((spec.num_experts + 1,), -1, dtype=torch.int64)  # [E + 1]
        slot_of[list(spec.owned_ids)] = torch.arange(spec.num_owned)
        self.register_buffer("slot_of", slot_of, persistent=False)
        self.register_buffer("gate_up", None)
        self.register_buffer("down", None)

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        dtype = self.dtype_request or dense_dtype(sources.values())
        owned = self.spec.owned
        gate = owned_experts_dense(sources["gate"], owned, dtype)  # [n, I, H]
        up = owned_experts_dense(sources["up"], owned, dtype)  # [n, I, H]
        down = owned_experts_dense(sources["down"], owned, dtype)  # [n, H, I]
        self.gate_up = torch.cat([gate.to(self.device), up.to(self.device)], dim=1).contiguous()  # [n, 2I, H]
        self.down = down.to(self.device).contiguous()
        self.slot_of = self.slot_of.to(self.device)
        logger.debug("%s packed %d/%d experts as %s on %s", type(self).__name__,
                     self.spec.num_owned, self.spec.num_experts, dtype, self.device)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        self.check_inputs(x, topk_ids, topk_weights)
        if self.gate_up is None:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        pairs = topk_ids.shape[0] * topk_ids.shape[1]
        if pairs <= self.gather_max_pairs or must_be_capture_safe():
            return self.forward_gather(x, topk_ids, topk_weights)
        return self.forward_grouped(x, topk_ids, topk_weights)

    def _route(self, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
        """Per (token, k) pair: local slot (0 where not owned), owned flag, fp32 scale."""
        slot = self.slot_of[topk_ids.reshape(-1).long()]  # [P] int64, -1 = not owned
        owned = slot >= 0  # [P]
        scale = torch.where(owned, topk_weights.reshape(-1).float(), 0.0)  # [P] fp32
        return slot.clamp(min=0), owned, scale

    def forward_gather(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Capture-safe path: gathers each pair's expert weights, batched matmuls, fixed shapes."""
        T, K = topk_ids.shape
        H, I = self.spec.hidden_size, self.spec.intermediate_size
        gate_up, down = self.gate_up, self.down  # [n, 2I, H], [n, H, I]
        if T * K == 0:
            return torch.zeros_like(x)
        slot, owned, scale = self._route(topk_ids, topk_weights)  # [P] each, P = T*K
        xs = x.to(gate_up.dtype).unsqueeze(1).expand(T, K, H).reshape(T * K, H)  # [P, H]
        per_step = max(1, self.gather_chunk_bytes // (3 * I * H * gate_up.element_size()))
        outs = []
        for start in range(0, T * K, per_step):  # static trip count: depends on shapes only
            s = slot[start:start + per_step]  # [p]
            gu = torch.bmm(gate_up.index_select(0, s), xs[start:start + per_step].unsqueeze(-1))  # [p, 2I, 1]
            h = self.act(gu[:, :I]) * gu[:, I:]  # [p, I, 1]
            outs.append(torch.bmm(down.index_select(0, s), h).squeeze(-1))  # [p, H]
        d = outs[0] if len(outs) == 1 else torch.cat(outs)  # [P, H]
        y = torch.where(owned.unsqueeze(1), d.float() * scale.unsqueeze(1), 0.0)  # [P, H] fp32
        return y.view(T, K, H).sum(dim=1).to(x.dtype)  # [T, H]

    def forward_grouped(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Eager path for many tokens: sorts pairs by expert, one matmul pair per expert.

        Not capture-safe (the per-expert counts are read on the host).
        """
        T, K = topk_ids.shape
        I = self.spec.intermediate_size
        n = self.spec.num_owned
        gate_up, down = self.gate_up, self.down  # [n, 2I, H], [n, H, I]
        slot, owned, scale = self._route(topk_ids, topk_weights)  # [P] each
        key = torch.where(owned, slot, n)  # [P], n = bucket of pairs that add nothing
        order = torch.argsort(key, stable=True)  # [P] pair indices grouped by expert
        counts = torch.bincount(key, minlength=n + 1)[:n].tolist()  # host sync
        xs = x.to(gate_up.dtype).index_select(0, order // K)  # [P, H] rows in expert order
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            gu = F.linear(xs[rows], gate_up[e])  # [c, 2I]
            h = self.act(gu[:, :I]) * gu[:, I:]  # [c, I]
            d = F.linear(h, down[e])  # [c, H]
            pair = order[rows]  # [c]
            out.index_add_(0, pair // K, d.float() * scale[pair].unsqueeze(1))
            start += count
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        dtype = None if self.gate_up is None else self.gate_up.dtype
        return (f"{super().extra_repr()}, owned={self.spec.num_owned}/{self.spec.num_experts}, "
                f"activation={self.spec.activation}, dtype={dtype}")


def owned_experts_dense(source: WeightSource, owned: Sequence[int] | None, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[n, ...]`` slice of a stacked ``[E, ...]`` source for the ``owned`` experts.

    A GGUF source is sliced in its quantized blocks first, so only owned experts are
    dequantised (each expert's rows are contiguous bytes).
    """
    if owned is None:
        return source.to_dense(dtype)
    if isinstance(source, DenseWeight):
        t = source.tensor  # [E, ...]
        return t.index_select(0, torch.tensor(owned, dtype=torch.long, device=t.device)).to(dtype)
    if isinstance(source, GGUFWeight):
        num_experts = source.shape[0]
        rows = source.data.reshape(num_experts, -1)  # [E, bytes per expert]
        picked = rows[torch.tensor(owned, dtype=torch.long, device=rows.device)].contiguous()
        sliced = GGUFWeight(picked, source.qtype, (len(owned),) + tuple(source.shape[1:]), source.name)
        return sliced.to_dense(dtype)
    raise TypeError(f"unsupported weight source {type(source).__name__}")


def must_be_capture_safe() -> bool:
    """True while torch.compile traces or a CUDA graph is being captured on this stream."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
