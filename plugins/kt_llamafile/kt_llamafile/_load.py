"""Loads the compiled extension (no torch import: the sanitizer fuzz run uses this alone).

``KT_LLAMAFILE_KERNELS=/path/to/_kernels*.so`` loads another build of the extension, e.g. the
AddressSanitizer build the fuzz test makes in a temporary directory.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any


@functools.lru_cache(maxsize=1)
def kernels() -> tuple[Any, Any]:
    """``(ffi, lib)`` of the extension, with the CPU detected and KT_LLAMAFILE_ISA applied."""
    path = os.environ.get("KT_LLAMAFILE_KERNELS")
    if path:
        spec = importlib.util.spec_from_file_location("kt_llamafile._kernels", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"KT_LLAMAFILE_KERNELS={path!r} is not a loadable extension")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module("kt_llamafile._kernels")
    module.lib.ktl_init()
    return module.ffi, module.lib
