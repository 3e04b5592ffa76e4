"""``LlamafileLinear``: ktcore's Linear operator on kt-llamafile's C kernels.

``pack`` keeps a GGUF weight's blocks as they are (zero copy; from the mmap when the store
was opened in place) and turns a dense weight into F32/BF16/F16 rows; ``forward`` runs
``torch.ops.kt_llamafile.linear`` (its implementation directly in eager mode, see ops.py). Activations are quantised to 8 bits per row for the
quantised types (Q8_0-style blocks of 32, Q8_K-style blocks of 256) and stay fp32 for the
float types. Option ``threads`` (default: physical cores - 1).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from kt_llamafile import _lib, ops
from kt_llamafile.weights import is_zero_copy, raw_rows
from ktcore.errors import BackendError
from ktcore.ops.linear import Linear, LinearSpec, check_options
from ktcore.ops.weights import WeightSource

logger = logging.getLogger("kt_llamafile")


def threads_option(owner: str, options: Mapping[str, Any]) -> int:
    value = options.get("threads")
    if value is None:
        return _lib.default_threads()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BackendError(f"{owner}: option threads must be a positive int, got {value!r}")
    return value


class LlamafileLinear(Linear):
    """Linear on GGUF blocks in place (see the module docstring)."""

    option_names: ClassVar[tuple[str, ...]] = ("threads",)

    def __init__(self, spec: LinearSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        if self.device.type != "cpu":
            raise BackendError(f"{type(self).__name__} runs on the CPU, not on {self.device}")
        self.threads = threads_option(type(self).__name__, self.options)
        self.qtype: str | None = None
        self.zero_copy = False
        # plain attributes, not buffers: Module.to() must not move or convert the raw rows
        self.weight_rows: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        rows, qtype = raw_rows(sources["weight"])  # [out, row_bytes] uint8
        self.weight_rows = rows.reshape(self.spec.out_features, -1)
        self.qtype = qtype
        self.zero_copy = is_zero_copy(sources["weight"], self.weight_rows)
        if self.spec.bias:
            self.bias = sources["bias"].to_dense(torch.float32).detach().cpu().contiguous()
        _lib.kernels()  # load the library (and report a broken build) at load time
        logger.debug("%s packed %s as %s (zero copy: %s)", type(self).__name__, self.spec, qtype, self.zero_copy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if self.weight_rows is None:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        if x.shape[-1] != self.spec.in_features:
            raise ValueError(f"{type(self).__name__}: x must be [..., {self.spec.in_features}], got {list(x.shape)}")
        return ops.call(torch.ops.kt_llamafile.linear, ops.linear_impl, x, self.weight_rows, self.bias,
                        _lib.QTYPE_IDS[self.qtype], self.spec.out_features, self.threads)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}, zero_copy={self.zero_copy}, threads={self.threads}"
