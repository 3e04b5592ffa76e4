"""Registers the ``llamafile`` backend with ktcore (entry point ``ktcore.backends: llamafile``)."""

from __future__ import annotations

from ktcore.backends import host
from ktcore.backends.spec import BackendSpec, OptionSpec

EXTENSION = "kt_llamafile._kernels"
_FORMATS = ("gguf:*", "dense")
_THREADS = OptionSpec("threads", int, None, None,
                      "worker threads of its own pool (default: physical cores - 1); kt-amx's shared pool, when used, has its own size")


def probe() -> str | None:
    """Available on x86-64 CPUs once the C kernels are built (AVX-512 VNNI or AVX2+FMA kernels
    are picked at run time; other x86-64 CPUs get the portable scalar kernels, correct but slow)."""
    if not host.is_x86_64():
        return "needs an x86-64 CPU"
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
            description=f"CPU {op} on GGUF blocks in place (Q2_K..Q8_0, BF16/F16/F32), AVX-512 VNNI, AVX2 or scalar",
        ))
