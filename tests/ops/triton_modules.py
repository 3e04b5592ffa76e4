"""Importing ktcore's Triton kernel modules for tests: on a CUDA GPU as they are, else with
``TRITON_INTERPRET=1`` so the kernels run in Triton's interpreter on CPU tensors. Triton reads
that variable when ``@triton.jit`` decorates a kernel, so it is set for that import alone and
the rest of the test process is left as it was. Also where such tests run (``kernel_device``)
and their random inputs (``node_generator``)."""

from __future__ import annotations

import importlib
import os
import sys
import zlib

import pytest
import torch


def import_kernels(name: str, device: str, kernel: str):
    """The module ``name``; without CUDA, fails the test unless its ``kernel`` is interpreted
    (the module was imported earlier without the variable)."""
    if device == "cuda":
        return importlib.import_module(name)
    already = name in sys.modules
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        module = importlib.import_module(name)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(getattr(module, kernel), InterpretedFunction):
        pytest.fail(f"{name} was imported without TRITON_INTERPRET=1 (already imported: {already})")
    return module


def kernel_device() -> str:
    """Where the kernels run: the GPU when there is one, else CPU tensors in the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def node_generator(request) -> torch.Generator:
    """Fresh random inputs per test that repeat run to run (seeded by the test's id), so a
    tolerance failure reproduces."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
