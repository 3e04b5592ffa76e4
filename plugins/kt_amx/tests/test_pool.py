"""The shared pool API for other CPU plugins: kt_pool_parallel_for through its address."""

from __future__ import annotations

import threading

import torch

import kt_amx
from kt_amx import _lib
from kt_amx.experts import AmxExperts
from kt_amx.pool import PARALLEL_FOR_CDECL
from ktcore.ops.experts import ExpertsSpec


def parallel_for():
    ffi = _lib.kernels()[0]
    address, threads = kt_amx.shared_pool()
    return ffi, ffi.cast(PARALLEL_FOR_CDECL, address), threads


def test_address_and_size():
    address, threads = kt_amx.shared_pool()
    assert address and threads == _lib.kernels()[1].kt_pool_size() >= 1


def test_every_item_once_on_valid_workers():
    ffi, pfor, threads = parallel_for()
    counts = [0] * 1000
    workers = set()
    lock = threading.Lock()

    @ffi.callback("void(void *, int64_t, int)")
    def task(ctx, item, worker):
        with lock:
            counts[item] += 1
            workers.add(worker)

    assert pfor(task, ffi.NULL, len(counts)) == 0
    assert counts == [1] * len(counts)
    assert workers and all(0 <= w < threads for w in workers)
    assert pfor(task, ffi.NULL, 0) == 0  # nothing to do


def test_ctx_reaches_the_task():
    ffi, pfor, _ = parallel_for()
    out = torch.zeros(64, dtype=torch.int64)
    ctx = ffi.cast("int64_t *", out.data_ptr())

    @ffi.callback("void(void *, int64_t, int)")
    def task(c, item, worker):
        ffi.cast("int64_t *", c)[item] = item * item

    assert pfor(task, ctx, 64) == 0
    assert torch.equal(out, torch.arange(64) ** 2)


def test_serialises_with_an_async_job():
    """A loop called while an experts job is in flight waits for it; both results are right."""
    gen = torch.Generator().manual_seed(0)
    E, H, I, K = 8, 64, 96, 2
    amx = AmxExperts(ExpertsSpec(E, H, I, K), "cpu", {"format": "int8", "group_size": 32})
    amx.load_weights({"gate": torch.randn(E, I, H, generator=gen), "up": torch.randn(E, I, H, generator=gen),
                      "down": torch.randn(E, H, I, generator=gen)})
    x, ids, w = torch.randn(33, H), torch.randint(0, E, (33, K)), torch.rand(33, K)
    expected = amx(x, ids, w)
    ffi, pfor, _ = parallel_for()
    seen = []

    @ffi.callback("void(void *, int64_t, int)")
    def task(ctx, item, worker):
        seen.append(item)

    job = amx.make_job(x, ids, w)
    job.submit()
    assert pfor(task, ffi.NULL, 10) == 0
    assert sorted(seen) == list(range(10))
    assert torch.equal(job.wait(), expected)
    job.submit()  # and the other way round: a job after a loop
    assert torch.equal(job.wait(), expected)


def test_nested_call_runs_inline():
    """A task that calls the loop again (from a pool worker) runs the inner items itself."""
    ffi, pfor, threads = parallel_for()
    inner_workers = []

    @ffi.callback("void(void *, int64_t, int)")
    def inner(ctx, item, worker):
        inner_workers.append(worker)

    @ffi.callback("void(void *, int64_t, int)")
    def outer(ctx, item, worker):
        pfor(inner, ffi.NULL, 3)  # (an exception in a cffi callback would only be printed)

    assert pfor(outer, ffi.NULL, 2) == 0
    assert len(inner_workers) == 6 and all(0 <= w < threads for w in inner_workers)


def test_not_started_is_an_error():
    import subprocess
    import sys

    code = ("from kt_amx import _lib; ffi, lib = _lib.kernels(); "
            "print(lib.kt_pool_size(), lib.kt_pool_parallel_for(ffi.NULL, ffi.NULL, 4))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    size, rc = map(int, out.stdout.split())
    assert size == 0 and rc != 0, out.stderr


def test_spin_for_graphs_sets_the_graph_spin_unless_the_user_fixed_one(monkeypatch):
    spins = []
    monkeypatch.setattr(_lib, "set_spin_us", spins.append)
    monkeypatch.delenv("KT_AMX_SPIN_US", raising=False)
    monkeypatch.setenv("KT_AMX_GRAPH_SPIN_US", "1500")
    kt_amx.spin_for_graphs()
    assert spins == [1500]
    monkeypatch.setenv("KT_AMX_SPIN_US", "10")
    kt_amx.spin_for_graphs()
    assert spins == [1500]
