"""Fuzzing the C library with random bytes as GGUF blocks (NaN and infinite scales included),
odd shapes, special activations and bad arguments, on every kernel level of the host; experts
also as asynchronous jobs (bf16 / int64 buffers) on the own and on an external pool.

    python -m kt_llamafile.fuzz [CASES] [SEED]

Needs only numpy and the extension (no torch), so that it runs under AddressSanitizer: the
test (tests/test_fuzz.py) builds the library with KT_LLAMAFILE_SANITIZE-style flags into a
temporary directory and runs this module with libasan preloaded and KT_LLAMAFILE_KERNELS
pointing at that build. Every buffer is allocated with exactly the bytes it needs, so a read
past a weight row, an activation row or an output is reported. Prints ``OK <cases>``.
"""

from __future__ import annotations

import sys

import numpy as np

from kt_llamafile._load import kernels
from kt_llamafile.qtypes import BLOCKS, QTYPE_IDS, QTYPES, row_bytes

SPECIALS = np.array([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-40, 0.0], dtype=np.float32)


def _activations(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    if x.size and rng.random() < 0.3:
        where = rng.random(shape) < 0.05
        x[where] = rng.choice(SPECIALS, size=int(where.sum()))
    return x


def _row_len(rng: np.random.Generator, qtype: str) -> int:
    block = BLOCKS[qtype][0]
    if block == 1:
        return int(rng.integers(1, 70))
    return block * int(rng.integers(1, 5 if block == 256 else 19))


class Fuzzer:
    def __init__(self, seed: int, threads: int = 2):
        self.ffi, self.lib = kernels()
        self.rng = np.random.default_rng(seed)
        self.pool = self.lib.ktl_pool_create(threads, 0)
        self.levels = self.lib.ktl_isa_available() + 1

        @self.ffi.callback("ktl_parallel_for_fn")
        def serial_for(fn, ctx, n_items):  # an external parallel-for (kt-amx's stand-in)
            for i in range(n_items):
                fn(ctx, i, i % 2)
            return 0

        self._serial_for = serial_for
        self.ext_pool = self.lib.ktl_pool_create_external(serial_for, 2)

    def close(self) -> None:
        self.lib.ktl_pool_destroy(self.pool)
        self.lib.ktl_pool_destroy(self.ext_pool)

    def ptr(self, array: np.ndarray, ctype: str = "uint8_t *"):
        return self.ffi.cast(ctype, self.ffi.from_buffer(array))

    def dequantize(self) -> None:
        qtype = self.rng.choice(QTYPES)
        block, size = BLOCKS[qtype]
        nblocks = int(self.rng.integers(1, 9))
        src = self.rng.integers(0, 256, nblocks * size, dtype=np.uint8)
        out = np.empty(nblocks * block, dtype=np.float32)
        rc = self.lib.ktl_dequantize(QTYPE_IDS[qtype], self.ptr(src), out.size, self.ptr(out, "float *"))
        assert rc == 0, (qtype, rc)

    def matmul(self) -> None:
        rng = self.rng
        qtype = rng.choice(QTYPES)
        k = _row_len(rng, qtype)
        n = int(rng.integers(1, 21))
        t = int(rng.choice([0, 1, 2, 3, 4, 5, 7, 9, 17]))
        w = rng.integers(0, 256, n * row_bytes(qtype, k), dtype=np.uint8)
        x = _activations(rng, (t, k))
        y = np.empty((t, n), dtype=np.float32)
        rc = self.lib.ktl_matmul(self.pool, QTYPE_IDS[qtype], self.ptr(w), n, k, self.ptr(x, "float *"), t,
                                 self.ptr(y, "float *"))
        assert rc == 0, (qtype, n, k, t, rc)

    def experts(self, as_job: bool = False) -> None:
        rng = self.rng
        gate = rng.choice(QTYPES)
        down = rng.choice(QTYPES)
        hidden = _row_len(rng, gate)  # gate/up rows have `hidden` values, down rows `inter`
        inter = _row_len(rng, down)
        n_experts = int(rng.integers(1, 6))
        owned = rng.random(n_experts) < 0.7
        slot_of = np.full(n_experts + 1, -1, dtype=np.int32)
        slot_of[np.flatnonzero(owned)] = np.arange(int(owned.sum()), dtype=np.int32)
        slots = int(owned.sum())
        weights = {name: rng.integers(0, 256, max(1, slots * rows * row_bytes(q, k)), dtype=np.uint8)
                   for name, q, rows, k in (("gate", gate, inter, hidden), ("up", gate, inter, hidden),
                                            ("down", down, hidden, inter))}
        t = int(rng.integers(0, 10))
        topk = int(rng.integers(1, min(n_experts, 3) + 1))
        ids = rng.integers(0, n_experts + 1, (t, topk)).astype(np.int32)
        tw = _activations(rng, (t, topk))
        x = _activations(rng, (t, hidden))
        y = np.empty((t, hidden), dtype=np.float32)
        desc = self.ffi.new("ktl_experts_desc *")
        desc.qtype_gate = desc.qtype_up = QTYPE_IDS[gate]
        desc.qtype_down = QTYPE_IDS[down]
        desc.gate, desc.up, desc.down = (self.ptr(weights[n]) for n in ("gate", "up", "down"))
        desc.num_experts, desc.hidden, desc.inter = n_experts, hidden, inter
        desc.slot_of = self.ptr(slot_of, "int32_t *")
        desc.act = int(rng.integers(0, 4))
        if as_job:
            self._job(desc, x, ids, tw, y)
            return
        rc = self.lib.ktl_experts(self.pool, desc, self.ptr(x, "float *"), t, self.ptr(ids, "int32_t *"), topk,
                                  self.ptr(tw, "float *"), self.ptr(y, "float *"))
        assert rc == 0, (gate, down, hidden, inter, rc)

    def _job(self, desc, x, ids, tw, y) -> None:
        """The same forward as an asynchronous job: bf16 or fp32 x / y, int64 or int32 ids (an id
        out of range now and then: reported by wait), on the own or the external pool."""
        rng, lib = self.rng, self.lib
        t = x.shape[0]
        if t == 0:
            return
        x_bf16, y_bf16, ids64 = (bool(b) for b in rng.random(3) < 0.5)
        xs = (x.view(np.uint32) >> 16).astype(np.uint16) if x_bf16 else x
        ys = np.empty(y.shape, dtype=np.uint16) if y_bf16 else y
        ids_s = ids.astype(np.int64) if ids64 else ids
        bad = ids.size > 0 and rng.random() < 0.1
        if bad:
            ids_s.reshape(-1)[int(rng.integers(0, ids.size))] = desc.num_experts + 1 if rng.random() < 0.5 else -1
        pool = self.ext_pool if rng.random() < 0.5 else self.pool
        job = lib.ktl_job_create(pool, desc, t, ids.shape[1], self.ptr(xs, "void *"), int(x_bf16),
                                 self.ptr(ids_s, "void *"), int(ids64), self.ptr(tw, "float *"),
                                 self.ptr(ys, "void *"), int(y_bf16))
        assert job != self.ffi.NULL
        try:
            for _ in range(2):
                assert lib.ktl_job_submit(job) == 0
                rc = lib.ktl_job_wait(job)
                assert rc == (-4 if bad else 0), rc
        finally:
            lib.ktl_job_destroy(job)

    def experts_job(self) -> None:
        self.experts(as_job=True)

    def bad_arguments(self) -> None:
        w = np.zeros(144, dtype=np.uint8)
        x = np.zeros((1, 256), dtype=np.float32)
        y = np.zeros((1, 1), dtype=np.float32)
        lib, p = self.lib, self.ptr
        assert lib.ktl_matmul(self.pool, 99, p(w), 1, 256, p(x, "float *"), 1, p(y, "float *")) == -1
        assert lib.ktl_matmul(self.pool, QTYPE_IDS["Q4_K"], p(w), 1, 250, p(x, "float *"), 1, p(y, "float *")) == -2
        assert lib.ktl_matmul(self.pool, QTYPE_IDS["Q4_K"], p(w), 0, 256, p(x, "float *"), 1, p(y, "float *")) == -2
        assert lib.ktl_dequantize(QTYPE_IDS["Q4_K"], p(w), 255, p(x, "float *")) == -2

    def run(self, cases: int) -> None:
        steps = (self.dequantize, self.matmul, self.matmul, self.experts, self.experts_job)
        for i in range(cases):
            self.lib.ktl_isa_select(i % self.levels)
            steps[i % len(steps)]()
        self.bad_arguments()


def main(cases: int = 3000, seed: int = 0) -> None:
    fuzzer = Fuzzer(seed)
    try:
        fuzzer.run(cases)
    finally:
        fuzzer.close()
    print(f"OK {cases}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
