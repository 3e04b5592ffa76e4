"""Registers the ``llamafile`` backend with ktcore (entry point ``ktcore.backends: llamafile``)."""

from __future__ import annotations

from ktcore.backends import host
from ktcore.backends.spec import BackendSpec, OptionSpec

EXTENSION = "kt_llamafile._kernels"
_FORMATS = ("gguf:*", "dense")
_THREADS = OptionSpec("threads", int, None, None, "worker threads (default: kt-amx's pool or physical cores - 1)")


def probe() -> str | None:
    """Available on x86-64 CPUs with AVX2+FMA, once the C kernels are built."""
    if not host.is_x86_64():
        return "needs an x86-64 CPU"
    if not {"avx2", "fma"} <= host.cpu_flags():
        return "CPU lacks AVX2+FMA"
    return host.missing_module_reason(EXTENSION, "kt-llamafile")


def register(registry) -> None:
    for op, factory in (("linear", "kt_llamafile.linear:LlamafileLinear"),
                        ("experts", "kt_llamafile.experts:LlamafileExperts")):
        registry.add(BackendSpec(
            name="llamafile",
            op=op,
            devices=("cpu",),
            factory=factory,
            formats=_FORMATS,
            options=(_THREADS,),
            probe=probe,
            description=f"CPU {op} on GGUF blocks in place (Q2_K..Q8_0, BF16/F16/F32), AVX-512 or AVX2",
        ))
