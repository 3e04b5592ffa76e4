"""Runs the Triton kernels in Triton's interpreter on hosts without a CUDA GPU, and shares
the test plumbing (``device``, ``random_blocks``) as fixtures.

``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so it is set here,
before any test module imports ``kt_marlin``'s kernel modules.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where the kernels run: the GPU when there is one, else CPU tensors in the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _random_blocks(qtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    from ktcore.formats import kquants

    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x *= np.exp(rng.uniform(-3, 3, size=shape[:-1] + (1,))).astype(np.float32)
    return kquants.quantize(x, qtype).reshape(-1)


@pytest.fixture
def random_blocks():
    """``random_blocks(qtype, shape, seed)``: valid GGUF blocks (uint8, flat) of random normal
    rows with a spread of magnitudes, quantised by ktcore's K-quant or gguf-py's quantisers."""
    return _random_blocks


@pytest.fixture(autouse=True)
def _seeded(request):
    """Random inputs differ per test but repeat run to run, so a tolerance failure reproduces."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
