"""kt-amx's worker pool as the one CPU thread pool of the process (DESIGN §6), for other CPU
plugins (kt-llamafile, ...).

The C library exports

    typedef void (*kt_task_fn)(void *ctx, int64_t item, int worker);
    int kt_pool_parallel_for(kt_task_fn fn, void *ctx, int64_t n_items);

``kt_pool_parallel_for`` runs ``fn(ctx, item, worker)`` for every item in ``[0, n_items)``
exactly once on the pool's pinned workers (``worker`` in ``[0, threads)``, usable to index
per-thread scratch), blocks until all are done and returns 0, or nonzero when the pool is not
started. Jobs on the pool run one at a time: a call made while a kt-amx job (an experts
forward, a submitted async job) is running first waits for that job to finish, and an async
job submitted meanwhile waits for the loop; they serialise, never interleave or deadlock. Called
from inside a pool task (nested), it runs the items inline on that worker. ``fn`` must not
call back into kt-amx's job API (kt_run / kt_wait) from a worker.

A plugin whose jobs run from CUDA graphs (host nodes or a doorbell) on this pool calls
``kt_amx.spin_for_graphs()`` once: the workers then spin through the GPU's work between two
layers instead of sleeping and being woken for every layer.
"""

from __future__ import annotations

from kt_amx import _lib


def shared_pool() -> tuple[int, int]:
    """``(address of kt_pool_parallel_for, number of workers)``; starts the pool with the default
    thread count (``kt_amx._lib.default_threads``, ``KT_AMX_THREADS``) if it is not running."""
    ffi, lib = _lib.kernels()
    threads = _lib.ensure_pool()
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, "kt_pool_parallel_for"))), threads


#: The C type of kt_pool_parallel_for, for callers that cast the address with cffi or ctypes.
PARALLEL_FOR_CDECL = "int (*)(void (*)(void *, int64_t, int), void *, int64_t)"
