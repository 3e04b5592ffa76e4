"""The single pool run of small batches (csrc/experts.c, t * topk <= 64): gate/up items, h
quantised by the last worker of each expert, down items that wait for every expert. Checked
against the emulation of the kernels' roundings (test_experts), across thread counts (more
threads than cores: waiters yield), for repeated and unowned experts, for bf16 / fp32 jobs,
and on an external parallel-for whose items run concurrently on several threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kt_llamafile import _lib, pools
from kt_llamafile.experts import LlamafileExperts
from kt_llamafile.random_blocks import random_weight
from kt_llamafile.testing import assert_experts_emulated
from ktcore.ops.experts import ExpertsSpec
from ktcore.ops.weights import GGUFWeight

E, H, I, TOPK = 16, 512, 256, 8  # top-8 as Qwen3-30B-A3B


def make_layer(types=("Q4_K", "Q4_K", "Q6_K"), owned=None, threads=2, seed=0):
    rng = np.random.default_rng(seed)
    layer = {}
    for name, qtype, rows, k in (("gate", types[0], I, H), ("up", types[1], I, H), ("down", types[2], H, I)):
        data = torch.from_numpy(random_weight(qtype, E * rows, k, rng)).reshape(E, rows, -1)
        layer[name] = GGUFWeight(data, qtype, (E, rows, k))
    spec = ExpertsSpec(E, H, I, TOPK, owned=owned)
    experts = LlamafileExperts(spec, "cpu", {"threads": threads})
    experts.load_weights(layer)
    return experts, layer, spec


def routing(T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E + 1, generator=g)[:TOPK] for _ in range(T)])  # E: padding
    ids[0, 1] = ids[0, 0]  # an expert twice in one token's top-k: counts twice
    return torch.randn(T, H, generator=g), ids, torch.rand(T, TOPK, generator=g)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q4_K", "Q4_K", "Q4_K"), ("Q8_0", "Q4_K", "F16")])
@pytest.mark.parametrize("T", [1, 3, 8, 9])  # 8 x top-8 = 64 pairs: the largest single run; 9: phases
@pytest.mark.parametrize("owned", [None, (0, 2, 3, 5, 8, 13)])  # unowned: slot_of -1, adds zero
def test_matches_the_emulation(types, T, owned):
    experts, layer, spec = make_layer(types, owned, seed=T)
    x, ids, w = routing(T, T)
    assert_experts_emulated(experts(x, ids, w), x, ids, w, layer, spec)


@pytest.mark.parametrize("T", [1, 3])
def test_identical_for_any_thread_count(T):
    x, ids, w = routing(T, 10 + T)
    ys = [make_layer(owned=(1, 2, 3, 4, 6, 9, 11), threads=n)[0](x, ids, w) for n in (1, 2, 3, 5)]
    for y in ys[1:]:
        assert torch.equal(y, ys[0])


def test_all_pairs_unowned_or_padding_give_zeros():
    experts, _, _ = make_layer(owned=(0,))
    ids = torch.tensor([[E] * TOPK, [1, 2, 3, 4, 5, 6, 7, E]])
    y = experts(torch.randn(2, H), ids, torch.ones(2, TOPK))
    assert not y.any()
    job = experts.make_job(torch.randn(2, H).bfloat16(), ids, torch.ones(2, TOPK),
                           torch.full((2, H), 1.0, dtype=torch.bfloat16))
    assert not job().any()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_job_equals_the_synchronous_forward(x_dtype, y_dtype, T):
    experts, _, _ = make_layer(owned=(0, 1, 2, 4, 7, 8, 10, 12, 15), threads=3)
    x, ids, w = routing(T, 20 + T)
    y = torch.full((T, H), float("nan"), dtype=y_dtype)
    job = experts.make_job(x.to(x_dtype), ids, w, y)
    for _ in range(3):  # the job's workspace is reused
        job()
        assert torch.equal(y, experts(x.to(x_dtype).float(), ids, w).to(y_dtype))


class ThreadedParallelFor:
    """An external ``int parallel_for(fn, ctx, n)`` whose items run concurrently on `threads`
    Python threads, taken in order from one counter (as kt-amx's pool does; cffi releases the
    GIL while the C item runs, so down items really wait on gate/up items of other threads)."""

    def __init__(self, threads: int = 3):
        ffi = _lib.kernels()[0]
        self.threads = threads

        @ffi.callback("ktl_parallel_for_fn")
        def parallel_for(fn, ctx, n_items):
            lock, counter = threading.Lock(), [0]

            def worker(wid):
                while True:
                    with lock:
                        i = counter[0]
                        counter[0] += 1
                    if i >= n_items:
                        return
                    fn(ctx, i, wid)

            workers = [threading.Thread(target=worker, args=(wid,)) for wid in range(threads)]
            for t in workers:
                t.start()
            for t in workers:
                t.join()
            return 0

        self.callback = parallel_for  # keep alive
        self.pool = pools.external_pool(int(ffi.cast("uintptr_t", parallel_for)), threads)


@pytest.mark.parametrize("T", [1, 3])
def test_external_parallel_for_running_items_concurrently(monkeypatch, T):
    experts, layer, spec = make_layer(owned=(0, 1, 3, 4, 6, 8, 9, 14))
    x, ids, w = routing(T, 30 + T)
    own = experts(x, ids, w)
    ext = ThreadedParallelFor()
    monkeypatch.setattr(pools, "shared_pool", lambda: ext.pool)
    assert torch.equal(experts(x, ids, w), own)
    y = torch.empty(T, H, dtype=torch.bfloat16)
    job = experts.make_job(x.bfloat16(), ids, w, y)
    job()
    assert torch.equal(y, experts(x.bfloat16().float(), ids, w).bfloat16())
