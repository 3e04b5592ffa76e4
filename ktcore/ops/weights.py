"""Weight sources: what an operator is built from.

A weight is either a dense tensor or a GGUF-quantized tensor (raw blocks plus the GGUF type
name). Backends declare which sources they accept (``BackendSpec.formats``); the torch
reference backends accept all of them and dequantise with ``gguf.quants``, the bit-exact
reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from ktcore.errors import WeightError

#: GGUF tensor types of DESIGN §7, by their gguf-py names.
GGUF_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)


@dataclass(frozen=True)
class DenseWeight:
    """A dense tensor in the torch layout of the operator (e.g. ``[out, in]`` for Linear)."""

    tensor: torch.Tensor
    name: str = "<tensor>"

    @property
    def format(self) -> str:
        return "dense"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensor if dtype is None else self.tensor.to(dtype)


@dataclass(frozen=True)
class GGUFWeight:
    """A GGUF tensor kept in its quantized blocks.

    ``data`` holds the raw bytes (uint8, any shape, C-contiguous); ``shape`` is the logical
    shape in torch order (row-major, last dimension contiguous, i.e. GGUF's ``ne`` reversed).
    """

    data: torch.Tensor  # uint8, raw GGUF blocks
    qtype: str  # gguf-py GGMLQuantizationType name, e.g. "Q4_K"
    shape: tuple[int, ...]
    name: str = "<tensor>"

    def __post_init__(self) -> None:
        if self.qtype not in GGUF_TYPES:
            raise WeightError(
                f"tensor {self.name!r}: GGUF type {self.qtype} is not supported "
                f"(supported: {', '.join(GGUF_TYPES)})"
            )
        if self.data.dtype != torch.uint8:
            raise WeightError(f"tensor {self.name!r}: GGUF data must be uint8 bytes, got {self.data.dtype}")
        expected = gguf_nbytes(self.qtype, self.shape, self.name)
        if self.data.numel() != expected:
            raise WeightError(
                f"tensor {self.name!r}: {self.qtype} data of shape {list(self.shape)} needs "
                f"{expected} bytes, got {self.data.numel()} (truncated or wrong type?)"
            )

    @property
    def format(self) -> str:
        return f"gguf:{self.qtype}"

    def to_dense(self, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Dequantise with ``gguf.quants`` (bit-exact reference); returns ``shape``."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType[self.qtype]
        raw = self.data.reshape(-1).cpu().numpy()
        values = dequantize(raw, qtype).reshape(self.shape)
        out = torch.from_numpy(values.copy())
        return out if dtype is None else out.to(dtype)


WeightSource = Union[DenseWeight, GGUFWeight]


def gguf_nbytes(qtype: str, shape: tuple[int, ...], name: str = "<tensor>") -> int:
    """Bytes a GGUF tensor of ``qtype`` and torch ``shape`` occupies; checks block alignment."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    if not shape or shape[-1] % block:
        raise WeightError(
            f"tensor {name!r}: last dimension of {list(shape)} is not a multiple of the "
            f"{qtype} block size {block}"
        )
    rows = 1
    for dim in shape[:-1]:
        rows *= dim
    return rows * (shape[-1] // block) * type_size


def as_weight(value: "WeightSource | torch.Tensor", name: str = "<tensor>") -> WeightSource:
    """Wraps a plain tensor as a ``DenseWeight``; passes weight sources through."""
    if isinstance(value, (DenseWeight, GGUFWeight)):
        return value
    if isinstance(value, torch.Tensor):
        return DenseWeight(value, name)
    raise WeightError(f"tensor {name!r}: expected a tensor or a weight source, got {type(value).__name__}")
