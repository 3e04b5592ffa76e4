"""Linear operator: ``y[..., out] = x[..., in] @ W.T (+ b)``.

``Linear`` is the interface every linear backend implements (weight names, shapes, forward
contract); ``TorchLinear`` is the pure-torch reference backend, the correctness oracle for
the others. It dequantises any weight source once at load (GGUF through ``gguf.quants``) and
runs ``dense_linear`` in the weight dtype: ``F.linear``, except for a single row on CUDA (a
decode step), which goes to the Triton GEMV of ``ktcore.ops.decode_gemv`` (one launch, no
split-K; ``KTCORE_DECODE_GEMV=0`` turns it off).

The small dtype helpers at the bottom (``dtype_option``, ``dense_dtype``) are shared by the
other torch reference backends (``ktcore.ops.experts``), which take the same ``dtype`` option.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ktcore.errors import BackendError
from ktcore.ops.base import Operator
from ktcore.ops.weights import DenseWeight, WeightSource

logger = logging.getLogger(__name__)

#: Values of the ``dtype`` option of the torch reference backends.
DTYPE_OPTIONS: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}

_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LinearSpec:
    """Shape of one linear layer: ``in_features -> out_features``, with or without bias."""

    in_features: int
    out_features: int
    bias: bool = False

    def __post_init__(self) -> None:
        for field in ("in_features", "out_features"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LinearSpec.{field} must be a positive int, got {value!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"LinearSpec.bias must be a bool, got {self.bias!r}")


class Linear(Operator):
    """Interface: ``forward(x[..., in]) -> y[..., out]`` in the dtype of ``x``.

    Weights: ``weight`` ``[out, in]`` and, when ``spec.bias``, ``bias`` ``[out]``.
    """

    op_name: ClassVar[str] = "linear"

    spec: LinearSpec

    def __init__(self, spec: LinearSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        if not isinstance(spec, LinearSpec):
            raise TypeError(f"{type(self).__name__} needs a LinearSpec, got {type(spec).__name__}")
        super().__init__(spec, device, options)

    def weight_names(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.spec.bias else ("weight",)

    def expected_shape(self, name: str) -> tuple[int, ...]:
        if name == "weight":
            return (self.spec.out_features, self.spec.in_features)
        if name == "bias" and self.spec.bias:
            return (self.spec.out_features,)
        raise KeyError(f"{type(self).__name__} has no weight named {name!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        raise NotImplementedError


class TorchLinear(Linear):
    """Reference backend: a dense weight on ``device``, ``F.linear`` in the weight dtype.

    Options: ``dtype`` in ``bf16 | fp16 | fp32``. Without it a dense source keeps its float
    dtype and a GGUF source is dequantised to fp32.
    """

    #: Option keys this backend understands; anything else is a user error.
    option_names: ClassVar[tuple[str, ...]] = ("dtype",)

    weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, spec: LinearSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        self.dtype_request = dtype_option(type(self).__name__, self.options)
        self.register_buffer("weight", None)
        self.register_buffer("bias", None)

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        dtype = self.dtype_request or dense_dtype(sources.values())
        # weight: [out, in]; bias: [out]
        self.weight = sources["weight"].to_dense(dtype).to(self.device).contiguous()
        if self.spec.bias:
            self.bias = sources["bias"].to_dense(dtype).to(self.device).contiguous()
        logger.debug("%s packed %s as %s on %s", type(self).__name__, self.spec, dtype, self.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        w = self.weight  # [out, in]
        y = dense_linear(x.to(w.dtype), w, self.bias)  # [..., out] in the weight dtype
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        dtype = None if self.weight is None else self.weight.dtype
        return f"{super().extra_repr()}, dtype={dtype}"


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, bias)`` for x [..., in] in w's dtype; one row of x on CUDA with a
    contiguous bf16/fp16 w of at most ``decode_gemv.MAX_ELEMENTS`` goes to
    ``torch.ops.ktcore.decode_gemv`` (the module docstring)."""
    if (x.is_cuda and x.numel() == w.shape[-1] and w.dtype in (torch.bfloat16, torch.float16)
            and w.is_contiguous() and os.environ.get("KTCORE_DECODE_GEMV", "1") != "0"):
        from ktcore.ops import decode_gemv  # imports triton; registers the op

        if w.numel() > decode_gemv.MAX_ELEMENTS:
            return F.linear(x, w, bias)

        y = torch.ops.ktcore.decode_gemv(x.reshape(-1), w, bias)  # [out]
        return y.reshape(*x.shape[:-1], w.shape[0])
    return F.linear(x, w, bias)


# --------------------------------------------------------------------------------------------
# Option helpers shared by the torch reference backends.


def check_options(owner: str, options: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raises ``BackendError`` for option keys ``owner`` does not understand (typos)."""
    known = tuple(known)
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        accepted = ", ".join(known) if known else "none"
        raise BackendError(f"{owner}: unknown option(s) {', '.join(unknown)} (accepted: {accepted})")


def dtype_option(owner: str, options: Mapping[str, Any]) -> torch.dtype | None:
    """The torch dtype named by ``options['dtype']`` (``bf16 | fp16 | fp32``), or None."""
    value = options.get("dtype")
    if value is None:
        return None
    if value not in DTYPE_OPTIONS:
        raise BackendError(
            f"{owner}: option dtype={value!r} is not one of {', '.join(DTYPE_OPTIONS)}"
        )
    return DTYPE_OPTIONS[value]


def dense_dtype(sources: Iterable[WeightSource]) -> torch.dtype:
    """Default compute dtype for a set of sources: their common float dtype when all are dense
    bf16/fp16/fp32/fp64 tensors, fp32 otherwise (GGUF sources, integer or fp8 tensors)."""
    dtype: torch.dtype | None = None
    for source in sources:
        if not isinstance(source, DenseWeight) or source.tensor.dtype not in _COMPUTE_DTYPES:
            return torch.float32
        dtype = source.tensor.dtype if dtype is None else torch.promote_types(dtype, source.tensor.dtype)
    return dtype or torch.float32
