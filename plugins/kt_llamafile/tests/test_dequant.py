"""Reference dequantisation in C is bit-exact with gguf.quants for every type: on random valid
blocks, all-zero blocks, extreme scales and (NaN-aware) on raw random bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_llamafile import _lib
from kt_llamafile.random_blocks import FLOAT_TYPES, QTYPES, random_weight
from kt_llamafile.testing import gguf_dequantize

QUANT_TYPES = [q for q in QTYPES if q not in FLOAT_TYPES]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,k", [(1, 256), (7, 512), (33, 2048)])
def test_valid_blocks_bit_exact(qtype, rows, k):
    w = random_weight(qtype, rows, k, np.random.default_rng(rows * 1000 + k))
    ref = gguf_dequantize(w, qtype, (rows, k)).astype(np.float32)
    got = _lib.dequantize(torch.from_numpy(w), qtype, (rows, k)).numpy()
    np.testing.assert_array_equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("kind", ["zero", "extreme"])
def test_zero_and_extreme_scales_bit_exact(qtype, kind):
    w = random_weight(qtype, 16, 1024, np.random.default_rng(7), kind)
    ref = gguf_dequantize(w, qtype, (16, 1024)).astype(np.float32)
    got = _lib.dequantize(torch.from_numpy(w), qtype, (16, 1024)).numpy()
    np.testing.assert_array_equal(_bits(got), _bits(ref))
    if kind == "zero":
        assert not got.any()


@pytest.mark.parametrize("qtype", QTYPES)
def test_random_bytes_match_including_nan(qtype):
    w = random_weight(qtype, 8, 2048, np.random.default_rng(11), "fuzz")
    with np.errstate(all="ignore"):
        ref = gguf_dequantize(w, qtype, (8, 2048)).astype(np.float32)
    got = _lib.dequantize(torch.from_numpy(w), qtype, (8, 2048)).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    finite = ~np.isnan(ref)
    np.testing.assert_array_equal(_bits(got[finite]), _bits(ref[finite]))


def test_rejects_partial_blocks():
    with pytest.raises(ValueError, match="whole number"):
        _lib.dequantize(torch.zeros(145, dtype=torch.uint8), "Q4_K")
