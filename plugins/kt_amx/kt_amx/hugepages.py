"""Packed weights on transparent huge pages.

Decode streams each selected expert's weights once; with 4 KiB pages every expert matrix
spans hundreds of pages (TLB misses, and Intel's hardware prefetchers stop at page
boundaries). On Linux hosts whose THP mode is ``madvise`` (the common default), memory gets
2 MiB pages only where ``madvise(MADV_HUGEPAGE)`` asked for them before it was touched.
``empty(shape, dtype)`` returns such a tensor; ``KT_AMX_HUGEPAGES=0`` turns the hint off.
Anywhere the hint is unavailable (not Linux, not glibc, THP off) it is a plain ``torch.empty``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

import torch

logger = logging.getLogger("kt_amx")

MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
MIN_BYTES = 2 * HUGE_PAGE  # smaller buffers hold no whole aligned huge page worth asking for


@functools.lru_cache(maxsize=1)
def _madvise():
    if os.uname().sysname != "Linux" or os.environ.get("KT_AMX_HUGEPAGES", "1") == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose whole aligned 2 MiB ranges are marked for huge pages."""
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    madvise = _madvise()
    if madvise is None or nbytes < MIN_BYTES:
        return t
    start = (t.data_ptr() + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
    end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start and madvise(start, end - start, MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
    return t
