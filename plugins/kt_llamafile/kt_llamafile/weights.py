"""Weight sources -> the raw rows the kernels read (kt-llamafile's only "packing").

A ``GGUFWeight`` is used as it is: its ``data`` (a zero-copy view of the mmapped file when it
comes from ``GGUFStore(in_place=True)``) is handed to the kernels untouched. A dense tensor
becomes F32 rows (BF16 or F16 rows when it already is bf16 or fp16): exact, no quantisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ktcore.errors import WeightError
from ktcore.ops.weights import DenseWeight, GGUFWeight, WeightSource

logger = logging.getLogger("kt_llamafile")

_DENSE_TYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def raw_rows(source: WeightSource) -> tuple[torch.Tensor, str]:
    """``(uint8 tensor [..., row_bytes], gguf type name)`` of a weight source, on the CPU."""
    if isinstance(source, GGUFWeight):
        data = source.data
        if data.device.type != "cpu":
            raise WeightError(f"tensor {source.name!r}: kt-llamafile reads GGUF blocks on the CPU, got {data.device}")
        if not data.is_contiguous():
            logger.debug("tensor %r: GGUF blocks are not contiguous; copying them", source.name)
            data = data.contiguous()
        return data, source.qtype
    if isinstance(source, DenseWeight):
        t = source.tensor.detach().cpu()
        qtype = _DENSE_TYPES.get(t.dtype, "F32")
        t = t.to(torch.float32) if qtype == "F32" else t
        t = t.contiguous()
        return t.view(torch.uint8).reshape(*t.shape[:-1], t.shape[-1] * t.element_size()), qtype
    raise WeightError(f"kt-llamafile: unsupported weight source {type(source).__name__}")


def select_experts(rows: torch.Tensor, owned: Sequence[int]) -> torch.Tensor:
    """The owned experts' rows of a stacked ``[E, ...]`` uint8 tensor, compact (a copy)."""
    index = torch.tensor(list(owned), dtype=torch.long)
    return rows.reshape(rows.shape[0], -1).index_select(0, index).contiguous()


def is_zero_copy(source: WeightSource, rows: torch.Tensor) -> bool:
    """True when ``rows`` shares the source's storage (no bytes were copied)."""
    base = source.data if isinstance(source, GGUFWeight) else source.tensor
    return rows.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
