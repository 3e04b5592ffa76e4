"""Random GGUF blocks for tests, fuzzing and benchmarks (numpy, no torch).

- ``valid``: what a real file holds. Types gguf-py can quantise (F32, F16, BF16, Q4_0..Q8_0)
  come from quantising normal data with ``gguf.quants.quantize``. The K types cannot be
  quantised by gguf-py; every byte pattern of their codes and packed scales is valid, so
  their blocks are random bytes with the fp16 scale fields overwritten by random finite fp16
  of moderate size (dmin = d * mean code, so that the blocks are zero-mean on average, as
  quantised weights are).
- ``zero``: all-zero blocks.
- ``extreme``: valid blocks whose fp16 scales are the extremes (largest finite, smallest
  subnormal, both signs, zero).
- ``fuzz``: raw random bytes, NaN and infinite scales included.
"""

from __future__ import annotations

import numpy as np

from kt_llamafile.qtypes import BLOCKS, FLOAT_TYPES, K_TYPES, QTYPES, row_bytes
from ktcore.formats.random_gguf import SCALE_FIELDS  # byte offsets of the fp16 scale fields (d, m / dmin)

__all__ = ["BLOCKS", "FLOAT_TYPES", "K_TYPES", "QTYPES", "quantize", "random_weight", "row_bytes"]

#: mean unsigned code of the K types with mins (Q2_K 2 bits, Q4_K 4, Q5_K 5)
MEAN_CODE = {"Q2_K": 1.5, "Q4_K": 7.5, "Q5_K": 15.5}
EXTREME_F16 = np.array([65504.0, -65504.0, 6.0e-8, -6.0e-8, 0.0, 1.0, -2.0, 6.1035e-05], dtype=np.float16)


def quantize(values: np.ndarray, qtype: str) -> np.ndarray:
    """Quantises float rows ``[rows, k]`` with gguf-py (not the K types); uint8 ``[rows, bytes]``."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F32":
        out = values
    elif qtype == "F16":
        out = values.astype(np.float16)
    else:
        out = gguf_quantize(values, GGMLQuantizationType[qtype])
    return np.ascontiguousarray(out).view(np.uint8).reshape(values.shape[0], -1)


def _set_scales(blocks: np.ndarray, qtype: str, values: np.ndarray) -> None:
    """Writes fp16 ``values`` (one per block and field) into the scale fields of ``blocks``."""
    for i, off in enumerate(SCALE_FIELDS[qtype]):
        blocks[:, off:off + 2] = values[:, i].astype(np.float16).reshape(-1, 1).view(np.uint8)


def random_weight(qtype: str, rows: int, k: int, rng: np.random.Generator, kind: str = "valid",
                  scale: float = 1.0) -> np.ndarray:
    """uint8 ``[rows, row_bytes]`` of ``qtype`` blocks (see the module docstring for ``kind``)."""
    block, size = BLOCKS[qtype]
    nblocks = rows * k // block
    if kind == "zero":
        return np.zeros((rows, row_bytes(qtype, k)), dtype=np.uint8)
    if kind == "fuzz":
        return rng.integers(0, 256, (rows, row_bytes(qtype, k)), dtype=np.uint8)
    if qtype in K_TYPES:
        blocks = rng.integers(0, 256, (nblocks, size), dtype=np.uint8)
        fields = len(SCALE_FIELDS[qtype])
        # moderate scales: |d| in [2^-10, 2^-4] (K types multiply d by 6-bit scales)
        d = np.exp2(rng.uniform(-10, -4, (nblocks, 1))) * scale
        if fields == 2:  # d, dmin: dmin = d * mean code, so that groups are zero-mean on average
            d = np.concatenate([d, d * MEAN_CODE[qtype]], axis=1)
        else:  # Q3_K, Q6_K: signed d
            d = d * np.where(rng.random((nblocks, 1)) < 0.5, -1.0, 1.0)
        _set_scales(blocks, qtype, d)
    else:
        quantised = quantize(rng.standard_normal((rows, k)).astype(np.float32) * scale, qtype)
        if qtype in FLOAT_TYPES:
            if kind != "valid":
                raise ValueError(f"kind {kind!r} does not apply to {qtype}")
            return quantised
        blocks = quantised.reshape(nblocks, size)
    if kind == "extreme":
        picks = rng.integers(0, len(EXTREME_F16), (nblocks, len(SCALE_FIELDS[qtype])))
        _set_scales(blocks, qtype, EXTREME_F16[picks].astype(np.float32))
    elif kind != "valid":
        raise ValueError(f"unknown kind {kind!r}")
    return np.ascontiguousarray(blocks.reshape(rows, row_bytes(qtype, k)))
