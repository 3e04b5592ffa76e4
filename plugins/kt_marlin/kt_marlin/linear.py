"""``MarlinLinear``: the ``linear`` operator of the ``marlin`` backend.

Options: ``format`` ``bf16 | int8 | int4`` (default bf16) and ``group_size`` ``32 | 64 | 128``
(default 128; quantised formats built from dense weights).

- ``bf16``: the weight dequantised on the device (GGUF through ``kt_marlin.dequantize``) and
  ``F.linear`` in bf16.
- ``int4`` / ``int8``: packed once at load (``kt_marlin.packing``; int4 in its ``mma`` layout,
  so in_features must be a multiple of 64), run by the Triton kernel
  ``torch.ops.kt_marlin.wq_matmul``. GGUF Q4_0/Q4_1/Q4_K (int4) and Q8_0 (int8) are repacked
  exactly, in groups of 32 whatever ``group_size`` says; any other source is quantised with
  ``group_size`` and the added error (relative RMS against the source) is logged at warning
  level, since it is a lossy conversion the user asked for with the option.

``forward(x[..., in]) -> y[..., out]`` in the dtype of x; capture-safe.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ktcore.errors import BackendError
from ktcore.ops.linear import Linear, LinearSpec, check_options
from ktcore.ops.weights import GGUFWeight, WeightSource

from kt_marlin import packing
from kt_marlin import wq_matmul as _wq_matmul  # noqa: F401  (registers torch.ops.kt_marlin.wq_matmul)
from kt_marlin.dequant import QTYPES, dequantize_weight

logger = logging.getLogger(__name__)

FORMATS = ("bf16", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
BITS = {"bf16": 16, "int8": 8, "int4": 4}


def weight_format(name: str, options: Mapping[str, Any], option_names: tuple[str, ...]) -> tuple[str, int]:
    """``(format, group_size)`` from a kt-marlin operator's options, checked (BackendError)."""
    check_options(name, options, option_names)
    fmt = options.get("format", "bf16")
    if fmt not in FORMATS:
        raise BackendError(f"{name}: option format={fmt!r} is not one of {', '.join(FORMATS)}")
    group_size = int(options.get("group_size", 128))
    if group_size not in GROUP_SIZES:
        raise BackendError(f"{name}: option group_size={group_size!r} is not one of {GROUP_SIZES}")
    return fmt, group_size


def _dense_on(source: WeightSource, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A source as a dense tensor on ``device``; GGUF blocks are dequantised there."""
    if isinstance(source, GGUFWeight):
        if source.qtype in QTYPES:
            return dequantize_weight(source, dtype, device)
        return source.to_dense(dtype).to(device)  # F32 / F16 / BF16
    return source.to_dense(dtype).to(device)


class MarlinLinear(Linear):
    """Linear on the GPU: bf16 ``F.linear`` or weight-only int8/int4 Triton kernels."""

    option_names: ClassVar[tuple[str, ...]] = ("format", "group_size")

    def __init__(self, spec: LinearSpec, device: str | torch.device = "cuda", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        name = type(self).__name__
        self.format, self.group_size = weight_format(name, self.options, self.option_names)
        multiple = 64 if self.format == "int4" else 32  # int4: the kernel's layout unit (packing.mma_unit)
        if self.format != "bf16" and spec.in_features % multiple:
            raise BackendError(f"{name}: {self.format} needs in_features ({spec.in_features}) to be a multiple of "
                               f"{multiple}")
        self.bits = BITS[self.format]
        self.group = self.group_size
        self.exact = False
        for buf in ("weight", "qweight", "scales", "offsets", "bias"):
            self.register_buffer(buf, None)

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        src = sources["weight"]
        if self.spec.bias:
            self.bias = sources["bias"].to_dense(torch.float32).to(self.device).contiguous()
        if self.format == "bf16":
            self.weight = _dense_on(src, self.device, torch.bfloat16).contiguous()
            return
        exact = packing.EXACT_INT4 if self.bits == 4 else packing.EXACT_INT8
        if isinstance(src, GGUFWeight) and src.qtype in exact:
            packed = packing.from_gguf(src.data, src.qtype, src.shape, self.device)
            self.exact = True
        else:
            group = self.group_size
            if self.spec.in_features % group:
                group = 32
                logger.warning("%s: in_features %d is not a multiple of group_size %d; using 32",
                               type(self).__name__, self.spec.in_features, self.group_size)
            dense = _dense_on(src, self.device, torch.float32)
            packed = packing.quantize_dense(dense, self.bits, group)
            err = (packing.unpack(packed) - dense).pow(2).mean().sqrt() / dense.pow(2).mean().sqrt().clamp_min(1e-30)
            logger.warning("%s: quantising %s (%s) to %s adds a relative RMS error of %.3g",
                           type(self).__name__, getattr(src, "name", "<tensor>"), src.format, self.format, float(err))
        if self.bits == 4:
            packed = packing.to_mma(packed)
        self.group = packed.group
        self.qweight, self.scales, self.offsets = packed.qweight, packed.scales, packed.offsets

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight this instance multiplies by (for tests)."""
        if self.bits == 16:
            return self.weight.float()
        return packing.unpack(packing.Packed(self.bits, self.group, self.qweight, self.scales, self.offsets))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if not self.loaded:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        if self.bits == 16:
            b = None if self.bias is None else self.bias.to(torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), self.weight, b).to(x.dtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.spec.in_features)  # [T, in]
        y = torch.ops.kt_marlin.wq_matmul(x2, self.qweight, self.scales, self.offsets, self.bias,
                                          self.bits, self.group)  # [T, out]
        return y.reshape(*lead, self.spec.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.format}, group={self.group}, exact={self.exact}"
