"""Loads the compiled extension (no torch import: the sanitizer fuzz run uses this alone).

``KT_LLAMAFILE_KERNELS=/path/to/_kernels*.so`` loads another build of the extension, e.g. the
AddressSanitizer build the fuzz test makes in a temporary directory.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def kernels() -> tuple[Any, Any]:
    """``(ffi, lib)`` of the extension, with the CPU detected and KT_LLAMAFILE_ISA applied."""
    from ktcore.backends.host import load_extension

    module = load_extension("kt_llamafile._kernels", "KT_LLAMAFILE_KERNELS")
    module.lib.ktl_init()
    return module.ffi, module.lib
