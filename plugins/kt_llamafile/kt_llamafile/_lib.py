"""The compiled library ``kt_llamafile._kernels`` and its process-wide state (ISA, pools),
with thin torch-facing helpers (dequantize, matmul) used by the ops and the tests.

``KT_LLAMAFILE_ISA=scalar|avx2|avx512`` selects a lower kernel level than the CPU supports
(read once, when the library loads); ``KT_LLAMAFILE_KERNELS`` loads another build (_load.py).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from kt_llamafile._load import kernels
from kt_llamafile.qtypes import BLOCKS, QTYPE_IDS, act_kind, row_bytes  # noqa: F401 (re-exported)

#: ISA level names, indexed by the C level (csrc/cpu.c).
ISA_NAMES = ("scalar", "avx2", "avx512")

ERRORS = {-1: "unsupported type", -2: "bad shape", -3: "out of memory", -4: "expert id outside [0, E]",
          -5: "bad argument", -6: "job never submitted"}


def check(rc: int, what: str) -> None:
    if rc < 0:
        raise (IndexError if rc == -4 else RuntimeError)(f"kt-llamafile {what}: {ERRORS.get(rc, rc)}")


def available_isa() -> str:
    """The highest kernel level this CPU and OS support."""
    return ISA_NAMES[kernels()[1].ktl_isa_available()]


def selected_isa() -> str:
    return ISA_NAMES[kernels()[1].ktl_isa_selected()]


def select_isa(name: str) -> str:
    """Uses the ``name`` kernels from now on (at most ``available_isa()``); not while ops run."""
    if name not in ISA_NAMES:
        raise ValueError(f"ISA must be one of {ISA_NAMES}, got {name!r}")
    level = kernels()[1].ktl_isa_select(ISA_NAMES.index(name))
    if level < 0:
        raise ValueError(f"ISA {name!r} is not available on this CPU (best: {available_isa()})")
    return ISA_NAMES[level]


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (from /proc/cpuinfo)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return len(allowed)
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" in fields and int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields.get("core id", fields["processor"])))
    return len(cores) or len(allowed)


def default_threads(gpu_driving: bool = False) -> int:
    """DESIGN §6: physical cores - 1 (- 2 when a GPU is driving), at least 1."""
    return max(1, physical_cores() - (2 if gpu_driving else 1))


def pool(threads: int) -> Any:
    """The process-wide worker pool for ``threads`` threads: kt-amx's shared pool when in use,
    else one of our own (created once, pinned); see kt_llamafile.pools."""
    from kt_llamafile.pools import pool as select_pool

    return select_pool(threads)


def ptr(tensor: torch.Tensor, ctype: str = "uint8_t *") -> Any:
    ffi, _ = kernels()
    return ffi.cast(ctype, tensor.data_ptr())


def dequantize(data: torch.Tensor | np.ndarray, qtype: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Reference dequantisation in C (bit-exact with gguf.quants) of raw blocks -> fp32."""
    raw = torch.as_tensor(data).reshape(-1).contiguous()
    if raw.dtype != torch.uint8:
        raw = raw.view(torch.uint8)
    block, size = BLOCKS[qtype]
    if raw.numel() % size:
        raise ValueError(f"{qtype}: {raw.numel()} bytes is not a whole number of {size}-byte blocks")
    n = raw.numel() // size * block
    out = torch.empty(n, dtype=torch.float32)
    _, lib = kernels()
    check(lib.ktl_dequantize(QTYPE_IDS[qtype], ptr(raw), n, ptr(out, "float *")), "dequantize")
    return out if shape is None else out.reshape(shape)


def matmul(x: torch.Tensor, data: torch.Tensor, qtype: str, n: int, threads: int) -> torch.Tensor:
    """``y[T, n] = x[T, k] @ W.T`` on the raw blocks ``data`` (uint8, n rows); x fp32 contiguous."""
    x = x.to(torch.float32).contiguous()
    t, k = x.shape
    if data.dtype != torch.uint8 or not data.is_contiguous() or data.numel() != n * row_bytes(qtype, k):
        raise ValueError(f"kt-llamafile matmul: weight must be {n} contiguous uint8 rows of {k} {qtype} values")
    y = torch.empty((t, n), dtype=torch.float32)
    _, lib = kernels()
    rc = lib.ktl_matmul(pool(threads), QTYPE_IDS[qtype], ptr(data), n, k, ptr(x, "float *"), t, ptr(y, "float *"))
    check(rc, "matmul")
    return y


def quantized_activations(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """The activations ``x[T, k]`` as the kernels see them for ``qtype`` weights (8-bit rows
    dequantised back to fp32: d * q), for tests; fp32 types get x unchanged."""
    kind = act_kind(qtype)
    x = x.float().contiguous()
    if kind == 0:
        return x.clone()
    ffi, lib = kernels()
    t, k = x.shape
    block = 32 if kind == 1 else 256
    out = torch.empty_like(x)
    q = torch.empty(k, dtype=torch.int8)
    d = torch.empty(k // block, dtype=torch.float32)
    sums = torch.empty(k // block if kind == 1 else k // 16, dtype=torch.int32 if kind == 1 else torch.int16)
    for row in range(t):
        check(lib.ktl_quantize_act(kind, ptr(x[row], "float *"), k, ptr(q, "int8_t *"), ptr(d, "float *"),
                                   ptr(sums, "void *")), "quantize_act")
        out[row] = (q.float().view(-1, block) * d.view(-1, 1)).reshape(-1)
    return out
