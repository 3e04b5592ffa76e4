"""Registers the ``marlin`` backend with ktcore (entry point ``ktcore.backends: marlin``)."""

from __future__ import annotations

import importlib.util

from ktcore.backends import host
from ktcore.backends.spec import BackendSpec, OptionSpec

_FACTORIES = {
    "linear": "kt_marlin.linear:MarlinLinear",
    "experts": "kt_marlin.experts:MarlinExperts",
    "mla": "kt_marlin.mla:MarlinMLA",
    "rope": "kt_marlin.rope:MarlinRope",
}
_FORMAT = OptionSpec("format", str, ("bf16", "int8", "int4"), "bf16", "weight format on the GPU")
_GROUP = OptionSpec("group_size", int, (32, 64, 128), 128, "int4 quantisation group")


def probe() -> str | None:
    """Needs a CUDA GPU of compute capability 8.0 or newer, and Triton."""
    reason = host.cuda_unavailable_reason(min_capability=(8, 0))
    if reason is None and importlib.util.find_spec("triton") is None:
        reason = "triton is not installed"
    return reason


def register(registry) -> None:
    for op, factory in _FACTORIES.items():
        registry.add(BackendSpec(
            name="marlin",
            op=op,
            devices=("cuda",),
            factory=factory,
            formats=("dense", "gguf:*"),
            options=(_FORMAT, _GROUP) if op in ("linear", "experts") else (),
            probe=probe,
            description=f"Triton GPU {op}, capture-safe",
        ))
