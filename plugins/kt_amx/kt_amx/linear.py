"""``AmxLinear``: ktcore's Linear operator on kt-amx's C kernels, for lm_head and dense layers
on CPU-only hosts.

The weight ``[out, in]`` is packed exactly like one expert's matrix (kt_amx.packing: 16-row
panels, bf16 / int8 / int4 with the same GGUF exactness rules) and computed by the same
per-ISA kernels (``csrc/linear.c`` drives them: activations quantised per group as for the
experts, AMX tiles from ``KT_AMX_MIN_ROWS`` rows, bias added and y stored in x's dtype) on the
shared worker pool. ``out_features`` that are not a multiple of 16 are padded with zero rows
(never written to y); ``in_features`` must be a multiple of 32 and of the group size.

``forward`` calls ``torch.ops.kt_amx.linear`` (custom op with a fake implementation: no graph
break under ``torch.compile(fullgraph=True)``). Options: ``format`` bf16|int8|int4 (default:
the exact format of a Q8_0/Q4_0/Q4_K source, else bf16), ``group_size``, ``symmetric``,
``threads``, as for AmxExperts.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kt_amx import _lib
from kt_amx.experts import DTYPE_CODES, FORMAT_CODES, status_error
from kt_amx.packing import LayerFormat, PackedMatrix, layer_format, pack_matrix, unpack
from ktcore.errors import BackendError, WeightError
from ktcore.ops.linear import Linear, LinearSpec, check_options
from ktcore.ops.weights import DenseWeight, GGUFWeight, WeightSource

logger = logging.getLogger(__name__)

_INSTANCES: weakref.WeakValueDictionary[int, AmxLinear] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def as_one_expert(source: WeightSource, pad_rows: int) -> WeightSource:
    """``[out, in]`` -> a stacked ``[1, out + pad_rows, in]`` source for kt_amx.packing. GGUF
    blocks stay blocks when no padding is needed (exact formats keep their exactness)."""
    if isinstance(source, GGUFWeight) and pad_rows == 0:
        return GGUFWeight(source.data, source.qtype, (1, *source.shape), source.name)
    dense = source.to_dense(torch.float32 if isinstance(source, GGUFWeight) else None)  # [out, in]
    if pad_rows:
        dense = F.pad(dense, (0, 0, 0, pad_rows))
    return DenseWeight(dense.unsqueeze(0), getattr(source, "name", "weight"))


class AmxLinear(Linear):
    """``y[..., out] = x[..., in] @ W.T (+ b)`` on the CPU with a packed bf16/int8/int4 weight."""

    option_names: ClassVar[tuple[str, ...]] = ("format", "group_size", "symmetric", "threads")

    def __init__(self, spec: LinearSpec, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__(spec, device, options)
        check_options(type(self).__name__, self.options, self.option_names)
        if self.device.type != "cpu":
            raise BackendError(f"{type(self).__name__} runs on the CPU, not on {self.device}")
        if spec.in_features % 32:
            raise BackendError(f"{type(self).__name__}: in_features {spec.in_features} must be a multiple of 32")
        threads = self.options.get("threads")
        self.threads = int(threads) if threads else _lib.default_threads()
        self.layer_format: LayerFormat | None = None
        self.packed: PackedMatrix | None = None  # plain attributes: Module.to() must not touch them
        self.bias_f32: torch.Tensor | None = None
        self._lin = None
        self._job = None
        self._reserved = 0
        self.handle = next(_HANDLES)
        _INSTANCES[self.handle] = self

    # ----------------------------------------------------------------------------- packing

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        N = self.spec.out_features
        fmt = layer_format({"weight": sources["weight"]}, self.options)
        if self.spec.in_features % fmt.group_for(self.spec.in_features):
            raise WeightError(f"kt-amx: in_features {self.spec.in_features} is not a multiple of the group size "
                              f"{fmt.group}")
        source = as_one_expert(sources["weight"], -N % 16)
        packed, err = pack_matrix(source, None, fmt)  # [1, N padded to 16, in]
        if err is not None:
            logger.warning("kt-amx: %s (%s) converted to %s with relative error %.3g", source.name,
                           sources["weight"].format, fmt.format, err)
        self.layer_format, self.packed = fmt, packed
        if self.spec.bias:
            self.bias_f32 = sources["bias"].to_dense(torch.float32).contiguous()  # [out]
        self._create()

    def _create(self) -> None:
        ffi, lib = _lib.kernels()
        _lib.ensure_pool(self.threads)
        fmt, p = self.layer_format, self.packed
        desc = ffi.new("kt_dense *")
        desc.format = FORMAT_CODES[fmt.format]
        desc.group = fmt.group
        desc.scale_f32 = int(fmt.scale_f32)
        desc.symmetric = int(fmt.symmetric)
        desc.out_features = self.spec.out_features
        desc.weight.w, desc.weight.scale, desc.weight.zmin = _lib.address(p.w), _lib.address(p.scale), _lib.address(p.zmin)
        desc.weight.n, desc.weight.k = p.n, p.k
        desc.bias = _lib.address(self.bias_f32, "float *")
        err = ffi.new("char[512]")
        lin = lib.kt_linear_create(desc, err, 512)
        if lin == ffi.NULL:
            raise WeightError(f"kt-amx: {ffi.string(err).decode()}")
        self._lin = ffi.gc(lin, lib.kt_linear_destroy)
        self._job = ffi.gc(lib.kt_job_create(), lib.kt_job_destroy)
        self._reserved = 0

    def dequantized(self) -> torch.Tensor:
        """The packed weight as fp32 ``[out, in]`` (what the kernels compute with)."""
        return unpack(self.packed, self.layer_format)[0, : self.spec.out_features]

    def packed_bytes(self) -> int:
        p = self.packed
        return sum(t.numel() * t.element_size() for t in (p.w, p.scale, p.zmin) if t is not None)

    # ----------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        if self._lin is None:
            raise RuntimeError(f"{type(self).__name__}: call load_weights() before forward()")
        if x.shape[-1] != self.spec.in_features or x.device.type != "cpu":
            raise ValueError(f"{type(self).__name__}: x must be a CPU tensor [..., {self.spec.in_features}], "
                             f"got {tuple(x.shape)} on {x.device}")
        y = torch.ops.kt_amx.linear(x.reshape(-1, self.spec.in_features), self.handle)  # [T, out]
        return y.reshape(*x.shape[:-1], self.spec.out_features)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The C forward on a 2-D CPU tensor (the custom op's implementation)."""
        T = x.shape[0]
        xc = (x if x.dtype in DTYPE_CODES else x.float()).contiguous()
        y = torch.empty(T, self.spec.out_features, dtype=xc.dtype)
        if T == 0:
            return y.to(x.dtype)
        lib = _lib.kernels()[1]
        if T > self._reserved:
            if lib.kt_linear_reserve(self._lin, T) != 0:
                raise MemoryError(f"kt-amx: cannot allocate the linear workspace for {T} rows")
            self._reserved = T
        lib.kt_linear_set(self._job, self._lin, T, _lib.address(xc), DTYPE_CODES[xc.dtype], _lib.address(y),
                          self.threads)
        status = lib.kt_run(self._job)
        if status:
            raise status_error(status)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.layer_format}, threads={self.threads}"


def instance(handle: int) -> AmxLinear:
    layer = _INSTANCES.get(handle)
    if layer is None:
        raise RuntimeError(f"kt-amx: no live AmxLinear with handle {handle}")
    return layer


@torch.library.custom_op("kt_amx::linear", mutates_args=(), device_types="cpu")
def linear_op(x: torch.Tensor, handle: int) -> torch.Tensor:
    """y [T, out] in x's dtype from x [T, in]; ``handle`` names the AmxLinear instance."""
    return instance(handle).run(x)


@linear_op.register_fake
def _linear_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], instance(handle).spec.out_features)
