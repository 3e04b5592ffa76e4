"""Registers the ``marlin`` backend with ktcore (entry point ``ktcore.backends: marlin``)."""

from __future__ import annotations

import importlib.util

from ktcore.backends import host
from ktcore.backends.spec import BackendSpec, OptionSpec
from ktcore.backends.torch_backends import DTYPE_OPTION, MAX_POSITIONS_OPTION

_FACTORIES = {
    "linear": "kt_marlin.linear:MarlinLinear",
    "experts": "kt_marlin.experts:MarlinExperts",
    "mla": "kt_marlin.mla:MarlinMLA",
    "rope": "kt_marlin.rope:MarlinRope",
}
_FORMAT = OptionSpec("format", str, ("bf16", "int8", "int4"), "bf16", "weight format on the GPU")
_GROUP = OptionSpec("group_size", int, (32, 64, 128), 128, "int4 quantisation group")
_OPTIONS = {"linear": (_FORMAT, _GROUP), "experts": (_FORMAT, _GROUP), "mla": (DTYPE_OPTION, MAX_POSITIONS_OPTION),
            "rope": (MAX_POSITIONS_OPTION,)}  # mla and rope as ktcore's torch backends take them



def probe_for(factory: str):
    """The probe of one operator: a CUDA GPU of compute capability 8.0 or newer, Triton, and
    the operator's kernel module."""
    module = factory.partition(":")[0]

    def probe() -> str | None:
        reason = host.cuda_unavailable_reason(min_capability=(8, 0))
        if reason is None and importlib.util.find_spec("triton") is None:
            reason = "triton is not installed"
        if reason is None and importlib.util.find_spec(module) is None:
            reason = f"this kt-marlin version has no {module} kernels yet"
        return reason

    return probe


def register(registry) -> None:
    for op, factory in _FACTORIES.items():
        registry.add(BackendSpec(
            name="marlin",
            op=op,
            devices=("cuda",),
            factory=factory,
            formats=("dense", "gguf:*"),
            options=_OPTIONS[op],
            probe=probe_for(factory),
            description=f"Triton GPU {op}, capture-safe",
        ))
