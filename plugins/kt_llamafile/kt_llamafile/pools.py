"""Which worker pool kt-llamafile's C code runs on (DESIGN §6: one pool shared by the CPU backends).

``KT_LLAMAFILE_POOL`` (read on first use):

- ``auto`` (default): kt-amx's pool when ``import kt_amx`` works and it offers
  ``kt_amx.shared_pool() -> (address of kt_pool_parallel_for, threads)``; else a pool of our own;
- ``own``: always a pool of our own (pinned pthreads, ``threads`` of them per size asked);
- ``shared``: kt-amx's pool or an error saying why it is unavailable.

With the shared pool every ``pool(threads)`` is the same handle: a ktl pool with no workers
whose parallel loops go to kt-amx's ``kt_pool_parallel_for`` (``threads`` then does not size
anything; kt-amx's pool size does). The choice is logged once (logger ``kt_llamafile``).

``spin_for_graphs()``: once jobs run from CUDA graphs, idle workers spin longer before they
sleep: kt-amx's ``spin_for_graphs`` on its shared pool, ``KT_LLAMAFILE_GRAPH_SPIN_US``
(default 2000) for our own pools; ``KT_LLAMAFILE_SPIN_US``, when set, fixes our own pools'
spin for good. Why: on the GPU host the GPU's work between two layers (~65 µs) outlasted
kt-amx's default 50 µs spin, so the workers slept and every layer's job first woke them; the
CPU experts took 68-84 µs a layer longer in the captured decode than back to back, 15 µs
after this (bench/experts_in_step.py).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from kt_llamafile._load import kernels

logger = logging.getLogger("kt_llamafile")

POOL_ENV = "KT_LLAMAFILE_POOL"
MODES = ("auto", "own", "shared")
SPIN_ENV, GRAPH_SPIN_ENV = "KT_LLAMAFILE_SPIN_US", "KT_LLAMAFILE_GRAPH_SPIN_US"
GRAPH_SPIN_US = 2000


def pool_mode() -> str:
    mode = os.environ.get(POOL_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{POOL_ENV} must be one of {MODES}, got {mode!r}")
    return mode


def kt_amx_parallel_for() -> tuple[tuple[int, int] | None, str]:
    """``((address, threads), "")`` of kt-amx's shared parallel-for, or ``(None, why not)``."""
    try:
        import kt_amx
    except Exception as exc:  # not installed, or a broken build: our own pool still works
        return None, f"kt_amx does not import ({type(exc).__name__}: {exc})"
    shared_pool = getattr(kt_amx, "shared_pool", None)
    if not callable(shared_pool):
        return None, "kt_amx has no shared_pool()"
    try:
        address, threads = shared_pool()
    except Exception as exc:
        return None, f"kt_amx.shared_pool() failed ({type(exc).__name__}: {exc})"
    if not address or int(threads) < 1:
        return None, f"kt_amx.shared_pool() returned ({address!r}, {threads!r})"
    return (int(address), int(threads)), ""


def external_pool(address: int, threads: int) -> Any:
    """A ktl pool whose parallel loops run on the C function at ``address``
    (``int (*)(ktl_task_fn, void *, int64_t)``, e.g. kt-amx's ``kt_pool_parallel_for``)."""
    ffi, lib = kernels()
    handle = lib.ktl_pool_create_external(ffi.cast("ktl_parallel_for_fn", address), int(threads))
    if handle == ffi.NULL:
        raise MemoryError("kt-llamafile: cannot create the external pool")
    return ffi.gc(handle, lib.ktl_pool_destroy)


def own_pool(threads: int) -> Any:
    """A pool of ``threads`` threads of our own (the caller counts as one; the rest pinned)."""
    ffi, lib = kernels()
    handle = lib.ktl_pool_create(int(threads), 1)
    if handle == ffi.NULL:
        raise MemoryError("kt-llamafile: cannot create the worker pool")
    return ffi.gc(handle, lib.ktl_pool_destroy)


@functools.lru_cache(maxsize=1)
def shared_pool() -> Any | None:
    """kt-amx's pool wrapped as a ktl pool per ``KT_LLAMAFILE_POOL``, or None for own pools."""
    mode = pool_mode()
    if mode == "own":
        logger.info("kt-llamafile: using its own worker pool (%s=own)", POOL_ENV)
        return None
    found, why = kt_amx_parallel_for()
    if found is None:
        if mode == "shared":
            raise RuntimeError(f"kt-llamafile: {POOL_ENV}=shared but kt-amx's pool is unavailable: {why}")
        logger.info("kt-llamafile: using its own worker pool (%s)", why)
        return None
    address, threads = found
    logger.info("kt-llamafile: running on kt-amx's shared pool (%d threads)", threads)
    return external_pool(address, threads)


@functools.lru_cache(maxsize=None)
def _own(threads: int) -> Any:
    if os.environ.get(SPIN_ENV):
        kernels()[1].ktl_set_spin_us(int(os.environ[SPIN_ENV]))
    return own_pool(threads)


def spin_for_graphs() -> None:
    """Idle workers spin through the GPU's work between two layers from now on (see above)."""
    if shared_pool() is not None:
        import kt_amx

        hook = getattr(kt_amx, "spin_for_graphs", None)
        if callable(hook):
            hook()
    if not os.environ.get(SPIN_ENV):
        kernels()[1].ktl_set_spin_us(int(os.environ.get(GRAPH_SPIN_ENV, GRAPH_SPIN_US)))


@functools.lru_cache(maxsize=None)
def _note_ignored_threads(threads: int, shared_threads: int) -> None:  # logs once per pair
    logger.info("kt-llamafile: threads=%d asked for; the shared pool has %d (KT_AMX_THREADS sets it)",
                threads, shared_threads)


def pool(threads: int) -> Any:
    """The process-wide pool for ``threads`` workers: kt-amx's shared one when in use (its size
    is kt-amx's, whatever ``threads`` says), else our own of that size (each created once)."""
    shared = shared_pool()
    if shared is None:
        return _own(int(threads))
    if int(threads) != pool_threads(shared):
        _note_ignored_threads(int(threads), pool_threads(shared))
    return shared


def pool_threads(handle: Any) -> int:
    return int(kernels()[1].ktl_pool_threads(handle))
