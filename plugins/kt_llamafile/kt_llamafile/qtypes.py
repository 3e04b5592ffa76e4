"""The GGUF types kt-llamafile handles: ggml ids and block geometry (no dependencies)."""

from __future__ import annotations

#: ggml type id of each supported GGUF type name (the C API takes ids).
QTYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8,
             "Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14, "BF16": 30}
#: (elements, bytes) per block of each type.
BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
          "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84),
          "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210)}
QTYPES = tuple(BLOCKS)
FLOAT_TYPES = ("F32", "F16", "BF16")
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def row_bytes(qtype: str, k: int) -> int:
    """Bytes of one row of ``k`` values; ``k`` must be a multiple of the block size."""
    block, size = BLOCKS[qtype]
    if k % block:
        raise ValueError(f"{qtype}: row length {k} is not a multiple of the block size {block}")
    return k // block * size


def act_kind(qtype: str) -> int:
    """Activation kind the kernels use with a weight type: 0 fp32, 1 Q8_0-style, 2 Q8_K-style."""
    block = BLOCKS[qtype][0]
    return 0 if block == 1 else 1 if block == 32 else 2
