"""The compiled library ``kt_amx._kernels`` and its process-wide state: ISA level, thread pool.

``KT_AMX_KERNELS=/path/to/_kernels*.so`` loads another build of the extension (the sanitizer
and AMX-emulation tests build variants into temporary directories). ``KT_AMX_PREFETCH``: see
``DEFAULT_PREFETCH``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger("kt_amx")

#: Bytes ahead that the one-token kernels prefetch in the weight stream (``KT_AMX_PREFETCH``;
#: 0 turns it off). On the GPU host, one token through 12 Qwen3-30B-A3B-shaped int4 layers with
#: fresh routings: 296 µs per layer without, 249-251 µs with 2048-4096; DeepSeek-V3 shape:
#: 2270 -> 1777 µs at 4096 (bench/results/README.md).
DEFAULT_PREFETCH = 4096

#: ISA level names, indexed by the C enum (KT_ISA_*).
ISA_NAMES = ("none", "avx2", "avx512", "amx")


@functools.lru_cache(maxsize=1)
def kernels() -> tuple[Any, Any]:
    """``(ffi, lib)`` of the extension, initialised (CPU detected, KT_AMX_ISA applied)."""
    from ktcore.backends.host import load_extension

    module = load_extension("kt_amx._kernels", "KT_AMX_KERNELS")
    ffi, lib = module.ffi, module.lib
    lib.kt_init()
    lib.kt_set_prefetch(int(os.environ.get("KT_AMX_PREFETCH", DEFAULT_PREFETCH)))
    note = ffi.string(lib.kt_isa_note()).decode()
    if note:
        logger.warning("kt-amx: %s", note)
    return ffi, lib


def available_isa() -> str:
    """Highest ISA level this CPU, OS and build support: 'amx', 'avx512', 'avx2' or 'none'."""
    return ISA_NAMES[kernels()[1].kt_isa_available()]


def selected_isa() -> str:
    return ISA_NAMES[kernels()[1].kt_isa_selected()]


def select_isa(name: str) -> str:
    """Makes the kernels use ``name`` (at most ``available_isa()``); not while jobs run."""
    if name not in ISA_NAMES[1:]:
        raise ValueError(f"ISA must be one of {ISA_NAMES[1:]}, got {name!r}")
    level = kernels()[1].kt_isa_select(ISA_NAMES.index(name))
    if level < 0:
        raise ValueError(f"ISA {name!r} is above what this host supports ({available_isa()})")
    return ISA_NAMES[level]


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Selects an ISA level for the duration of a block (tests: every path a CPU has)."""
    before = selected_isa()
    select_isa(name)
    try:
        yield name
    finally:
        select_isa(before)


def isas_here() -> tuple[str, ...]:
    """Every level this host can run, lowest first."""
    top = ISA_NAMES.index(available_isa())
    return ISA_NAMES[1:top + 1]


def amx_emulated() -> bool:
    return bool(kernels()[1].kt_amx_emulated())


def default_threads() -> int:
    """DESIGN §6: physical cores - 1 (- 2 when a GPU is driving), at least 1, at most the CPUs
    this process may use. ``KT_AMX_THREADS`` overrides."""
    env = os.environ.get("KT_AMX_THREADS")
    if env:
        return max(1, int(env))
    physical = kernels()[1].kt_physical_cores()
    reserve = 2 if torch.cuda.is_available() else 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(physical - reserve, usable))


def ensure_pool(threads: int | None = None) -> int:
    """Starts the shared worker pool (first call decides its size); returns its size.
    ``KT_AMX_PIN=0`` leaves the workers unpinned. On a NUMA topology of several nodes
    (``kt_amx.numa``, ``KT_AMX_NUMA``) the workers are spread over the nodes."""
    lib = kernels()[1]
    size = lib.kt_pool_size()
    if not size and os.environ.get("KT_AMX_SPIN_US"):
        set_spin_us(int(os.environ["KT_AMX_SPIN_US"]))
    if size:
        if threads and threads > size:
            logger.info("kt-amx: the worker pool already has %d threads; %d requested", size, threads)
        return size
    pin = os.environ.get("KT_AMX_PIN", "1") not in ("0", "false", "no")
    n = int(threads or default_threads())
    if pin:
        from kt_amx import numa

        topology = numa.read_topology()
        if topology.n_nodes > 1:  # spread the workers over the nodes (kt_amx/numa.py)
            cpus = numa.pool_cpus(topology, n)
            return lib.kt_pool_start_cpus(n, kernels()[0].new("int32_t[]", cpus))
    return lib.kt_pool_start(n, 1 if pin else 0)


def set_spin_us(us: int) -> None:
    """Microseconds idle workers and waiters spin before they sleep."""
    kernels()[1].kt_pool_set_spin_us(int(us))


def spin_for_graphs() -> None:
    """Longer spinning once jobs run from CUDA host nodes (README "CUDA graphs"): the GPU's
    work between two layers outlasts the default spin, and waking sleeping workers costs more.
    ``KT_AMX_SPIN_US`` (set by the user) wins; ``KT_AMX_GRAPH_SPIN_US`` sets this value."""
    if os.environ.get("KT_AMX_SPIN_US"):
        return
    set_spin_us(int(os.environ.get("KT_AMX_GRAPH_SPIN_US", "2000")))


def address(tensor: torch.Tensor | None, ctype: str = "void *"):
    """A cffi pointer to a tensor's data (NULL for None)."""
    ffi = kernels()[0]
    return ffi.NULL if tensor is None else ffi.cast(ctype, tensor.data_ptr())
