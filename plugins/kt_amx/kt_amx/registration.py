"""Registers the ``amx`` backend with ktcore (entry point ``ktcore.backends: amx``)."""

from __future__ import annotations

from ktcore.backends import host
from ktcore.backends.spec import BackendSpec, OptionSpec

EXTENSION = "kt_amx._kernels"


def probe() -> str | None:
    """Available on x86-64 CPUs with at least AVX2+FMA, once the C kernels are built."""
    if not host.is_x86_64():
        return "needs an x86-64 CPU"
    flags = host.cpu_flags()
    if not {"avx2", "fma"} <= flags:
        return "CPU lacks AVX2+FMA (the lowest kernel ISA)"
    return host.missing_module_reason(EXTENSION, "kt-amx")


#: Options the experts and linear backends share (they pack with the same code).
_FORMAT = OptionSpec("format", str, ("bf16", "int8", "int4"), "bf16", "packed weight format")
_SYMMETRIC = OptionSpec("symmetric", bool, None, False, "int4 without zero points")
_THREADS = OptionSpec("threads", int, None, None, "worker threads (default: physical cores - 1)")


def register(registry) -> None:
    registry.add(BackendSpec(
        name="amx",
        op="experts",
        devices=("cpu",),
        factory="kt_amx.experts:AmxExperts",
        formats=("dense", "gguf:*"),  # Q8_0/Q4_0/Q4_K exactly; others only with an explicit format
        options=(
            _FORMAT,
            OptionSpec("group_size", int, (0, 32, 64, 128), 128, "int4/int8 group along k; 0 = per output channel (int8)"),
            _SYMMETRIC,
            _THREADS,
            OptionSpec("numa", str, ("split", "mirror", "off"), "split",
                       "several NUMA nodes: cut I over the nodes, a full copy per node, or ignore them"),
        ),
        probe=probe,
        description="CPU routed experts: AMX tiles, AVX-512 BF16/VNNI or AVX2, picked by CPUID",
    ))
    registry.add(BackendSpec(
        name="amx",
        op="linear",
        devices=("cpu",),
        factory="kt_amx.linear:AmxLinear",
        formats=("dense", "gguf:*"),  # Q8_0/Q4_0/Q4_K exactly; others only with an explicit format
        options=(
            _FORMAT,
            OptionSpec("group_size", int, (0, 32, 64, 128), 128, "int4/int8 group along in_features; 0 = per row (int8)"),
            _SYMMETRIC,
            _THREADS,
        ),
        probe=probe,
        description="CPU linear layers (lm_head, dense) on the experts' packed formats and kernels",
    ))
