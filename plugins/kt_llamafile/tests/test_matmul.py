"""Matmul on GGUF blocks against dequantise-then-matmul, on the best ISA of this host (the other
ISAs run the same checks in subprocesses: test_isa.py). Tolerances: kt_llamafile.testing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_llamafile import _lib
from kt_llamafile.random_blocks import QTYPES, random_weight
from kt_llamafile.testing import assert_matmul_close, shapes_for

TOKENS = [1, 2, 7, 64, 512]


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_matmul_matches_dequantised_reference(qtype, tokens):
    rng = np.random.default_rng(tokens)
    for k in shapes_for(qtype):
        rows = 33 if tokens < 512 else 7  # odd N; keeps the float64 reference quick at T=512
        w = random_weight(qtype, rows, k, rng)
        x = torch.from_numpy(rng.standard_normal((tokens, k)).astype(np.float32))
        y = _lib.matmul(x, torch.from_numpy(w), qtype, rows, 2)
        assert y.shape == (tokens, rows)
        assert_matmul_close(x, w, qtype, y)


@pytest.mark.parametrize("qtype,k", [("Q4_K", 7168), ("Q4_K", 256 * 23), ("Q8_0", 7168 + 32), ("Q8_0", 256 * 3 + 96),
                                     ("Q8_0", 256 * 129), ("Q4_1", 4096 + 96), ("Q6_K", 7168),
                                     ("BF16", 7168), ("F32", 5000 + 7), ("F16", 4096 + 9)])
@pytest.mark.parametrize("tokens", [1, 3])
def test_long_rows(qtype, k, tokens):
    """Long rows; with one token the kernels sum them in parts (k_chunk in csrc/kernels.c), and
    AVX-512 Q4_K decodes the heads of 16 blocks at a time, four per zmm (23 blocks: 16 + 4 + 3);
    AVX-512 Q8_0 walks groups of 8 blocks, the rest (a pair, an odd block) and rows of more than
    128 groups by the pair tile."""
    rng = np.random.default_rng(3)
    w = random_weight(qtype, 67, k, rng)
    x = torch.from_numpy(rng.standard_normal((tokens, k)).astype(np.float32))
    assert_matmul_close(x, w, qtype, _lib.matmul(x, torch.from_numpy(w), qtype, 67, 2))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_K", "F16"])
def test_thread_count_does_not_change_results(qtype):
    rng = np.random.default_rng(4)
    k = 512
    w = torch.from_numpy(random_weight(qtype, 101, k, rng))
    x = torch.randn(9, k)
    ys = [_lib.matmul(x, w, qtype, 101, threads) for threads in (1, 2, 3, 5)]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


def test_zero_blocks_and_zero_activations_give_zero():
    rng = np.random.default_rng(5)
    for qtype in QTYPES:
        k = shapes_for(qtype)[-1]
        w = random_weight(qtype, 5, k, rng, "zero" if qtype not in ("F32", "F16", "BF16") else "valid")
        x = torch.zeros(3, k) if qtype in ("F32", "F16", "BF16") else torch.randn(3, k)
        assert not _lib.matmul(x, torch.from_numpy(w), qtype, 5, 1).any(), qtype


def test_empty_token_batch():
    w = torch.from_numpy(random_weight("Q4_K", 3, 256, np.random.default_rng(0)))
    assert _lib.matmul(torch.zeros(0, 256), w, "Q4_K", 3, 2).shape == (0, 3)


def test_bad_shapes_are_errors_not_crashes():
    _, lib = _lib.kernels()
    w = torch.zeros(144, dtype=torch.uint8)
    x = torch.zeros(1, 250)
    y = torch.zeros(1, 1)
    assert lib.ktl_matmul(_lib.pool(1), 12, _lib.ptr(w), 1, 250, _lib.ptr(x, "float *"), 1, _lib.ptr(y, "float *")) == -2
    assert lib.ktl_matmul(_lib.pool(1), 99, _lib.ptr(w), 1, 256, _lib.ptr(x, "float *"), 1, _lib.ptr(y, "float *")) == -1
