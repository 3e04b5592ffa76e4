"""A GGUF of random *valid* blocks for any config and type plan, written fast (benchmarks).

``write_gguf`` quantises real values with ``kquants``: right for correctness tests, far too
slow for the ~7 G expert weights of a full-size model. ``write_random_gguf`` writes the same
file layout (``gguf_write.write_gguf_blocks``: llama.cpp's names, shapes, metadata and the
tokenizer, so ``ktcore.load(gguf=...)`` and llama.cpp read it as any other GGUF) with tensor
contents made directly in their encoding:

- quantised types: random bytes (every code and packed-scale pattern is valid) with the fp16
  scale fields (``SCALE_FIELDS``) overwritten by finite values: ``d`` is the tensor's target
  standard deviation / ``code_rms(qtype)`` times a per-block jitter ``2**(u - 1/2)`` (``u``
  uniform from the block's own random bits); the min field of the types with one is ``d``
  times the mean code (``MIN_RATIO``), so each block is zero-mean on average, as quantised
  weights are;
- F32/F16 (norms, routers, row-length fallbacks): ``mean + std * normal``.

Target scales are the ones ``models.synth`` gives the same tensor (``canonical_tensors``:
``1/sqrt(fan_in)``, residual outputs further by ``sqrt(2 * layers)``, norms ``1 + 0.05 z``,
...), so the random model keeps its activations O(1) through the layers.

Speed: a tensor is cut into chunks of ``CHUNK_BLOCKS`` blocks, each from its own SFC64 stream
keyed by (seed, tensor name, chunk) (``random_raw`` releases the GIL: chunks run on a thread
pool), so the bytes depend on neither the thread count nor the order; one tensor is in memory
at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ktcore.errors import KtError

log = logging.getLogger(__name__)

#: Version of the generator: part of the bench cache key; change it when the bytes change.
VERSION = "ktcore.random_gguf/1"
#: Blocks per chunk (one random stream, one thread task).
CHUNK_BLOCKS = 1 << 15
#: Byte offsets of the fp16 scale fields (d, then the min/dmin) inside one block.
SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
#: min field / d: ``+m`` (Q4_1, Q5_1: w = d q + m) or ``dmin`` (K types: w = d sc q - dmin m),
#: so that a block is zero-mean on average (the mean code; equal mean scale and min codes).
MIN_RATIO = {"Q4_1": -7.5, "Q5_1": -15.5, "Q2_K": 1.5, "Q4_K": 7.5, "Q5_K": 15.5}
FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}


def _stream(seed: int, name: str, chunk: int) -> np.random.SFC64:
    key = int.from_bytes(hashlib.sha256(f"{VERSION}|{seed}|{name}".encode()).digest()[:8], "little")
    return np.random.SFC64(np.random.SeedSequence((key, chunk)))


def _block_shape(qtype: str) -> tuple[int, int]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]  # (values, bytes) per block


def _fill_blocks(out: np.ndarray, qtype: str, d_base: float, bitgen: np.random.SFC64) -> None:
    """Fills ``out`` (uint8 [n * block bytes]) with n random valid ``qtype`` blocks."""
    size = _block_shape(qtype)[1]
    words = -(-out.size // 8)
    out[:] = bitgen.random_raw(words).view(np.uint8)[:out.size]
    b16 = out.view(np.uint16).reshape(-1, size // 2)  # [n, size/2]; every block size is even
    fields = SCALE_FIELDS[qtype]
    u = b16[:, fields[0] // 2].astype(np.float32) * np.float32(1 / 65536)  # [n] uniform in [0, 1)
    d = np.exp2(u - np.float32(0.5)) * np.float32(d_base)  # [n]
    b16[:, fields[0] // 2] = d.astype(np.float16).view(np.uint16)
    if len(fields) > 1:
        b16[:, fields[1] // 2] = (d * np.float32(MIN_RATIO[qtype])).astype(np.float16).view(np.uint16)


@lru_cache(maxsize=None)
def code_rms(qtype: str) -> float:
    """RMS of the dequantised values of random ``qtype`` blocks made with ``d_base = 1``
    (measured once on 4096 blocks with ``gguf.quants``)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    blocks = np.empty(4096 * _block_shape(qtype)[1], dtype=np.uint8)
    _fill_blocks(blocks, qtype, 1.0, _stream(0, f"code_rms:{qtype}", 0))
    values = dequantize(blocks, GGMLQuantizationType[qtype]).astype(np.float64)
    return float(np.sqrt(np.mean(values * values)))


def random_tensor(qtype: str, shape: tuple[int, ...], std: float, mean: float = 0.0, *, seed: int = 0,
                  name: str = "<tensor>", pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """The GGUF bytes (uint8, flat) of a random ``qtype`` tensor of torch ``shape``."""
    from ktcore.ops.weights import gguf_nbytes

    nbytes = gguf_nbytes(qtype, shape, name)
    if qtype in FLOAT_TYPES:
        numel = nbytes // np.dtype(FLOAT_TYPES[qtype]).itemsize
        rng = np.random.Generator(_stream(seed, name, 0))
        values = rng.standard_normal(numel, dtype=np.float32) * np.float32(std) + np.float32(mean)  # [numel]
        return values.astype(FLOAT_TYPES[qtype]).view(np.uint8)
    if qtype not in SCALE_FIELDS:
        raise KtError(f"tensor {name!r}: random blocks of GGUF type {qtype} are not supported "
                      f"(supported: {', '.join([*FLOAT_TYPES, *SCALE_FIELDS])})")
    if mean:
        raise KtError(f"tensor {name!r}: random {qtype} blocks are zero-mean; a mean of {mean} needs F32/F16")
    size = _block_shape(qtype)[1]
    out = np.empty(nbytes, dtype=np.uint8)  # [blocks * size]
    d_base = std / code_rms(qtype)
    step = CHUNK_BLOCKS * size
    chunks = range(-(-nbytes // step))

    def fill(c: int) -> None:
        _fill_blocks(out[c * step:(c + 1) * step], qtype, d_base, _stream(seed, name, c))

    if pool is None or len(chunks) == 1:
        for c in chunks:
            fill(c)
    else:
        list(pool.map(fill, chunks))
    return out


def random_blocks(config: Any, types: Mapping[str, str], seed: int = 0, threads: int | None = None
                  ) -> Iterator[tuple[str, np.ndarray]]:
    """``(GGUF name, bytes)`` of every tensor of ``config``'s model in ``types``, in file order;
    the next tensor is made while the caller writes this one (two in memory at most)."""
    from ktcore.formats.gguf_names import gguf_plan
    from ktcore.models.synth import canonical_tensors

    infos = canonical_tensors(config)
    threads = threads or len(os.sched_getaffinity(0))
    with ThreadPoolExecutor(threads, thread_name_prefix="random-gguf") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="random-gguf-next") as ahead:

        def make(spec: Any) -> tuple[str, np.ndarray]:
            info = infos[spec.source]
            return spec.name, random_tensor(types[spec.name], spec.shape, info.std, info.mean, seed=seed,
                                            name=spec.name, pool=pool)

        plan = gguf_plan(config)
        pending = ahead.submit(make, plan[0])
        for spec in plan[1:]:
            done, pending = pending.result(), ahead.submit(make, spec)
            yield done
            del done
        yield pending.result()


def write_random_gguf(path: str | Path, config: Any, tokenizer: Any, types: Mapping[str, str], *, seed: int = 0,
                      file_qtype: str = "Q4_K", threads: int | None = None, name: str | None = None) -> list[Path]:
    """Writes ``config``'s model as a GGUF of random valid blocks of ``types`` (GGUF name ->
    type, e.g. ``q4_k_m.q4_k_m_types(config)``); ``file_qtype`` names the file type (Q4_K:
    MOSTLY_Q4_K_M). Deterministic in ``seed``. Returns the paths (one file)."""
    from ktcore.formats.gguf_write import write_gguf_blocks

    return write_gguf_blocks(path, config, tokenizer, types, random_blocks(config, types, seed, threads),
                             file_qtype, name=name)
