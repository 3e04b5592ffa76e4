"""The external (shared) pool: kt-llamafile's parallel loops on another library's parallel-for.

A tiny external parallel-for built here (a cffi callback that runs the items serially, with
worker ids spread over its "threads") stands in for kt-amx's until that exists; results are
bit-identical to the own pool's, synchronous and asynchronous (jobs: the blocking parallel-for
is called from the dispatcher thread). KT_LLAMAFILE_POOL selects the pool; the kt-amx
integration test runs when ``kt_amx.shared_pool`` exists and skips saying so otherwise.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from kt_llamafile import _lib, pools
from kt_llamafile.experts import LlamafileExperts
from kt_llamafile.random_blocks import random_weight
from ktcore.ops.experts import ExpertsSpec
from ktcore.ops.weights import GGUFWeight

E, H, I, K = 8, 512, 256, 3


def make_layer(seed=0, owned=None) -> LlamafileExperts:
    rng = np.random.default_rng(seed)

    def stacked(qtype, rows, k):
        data = torch.from_numpy(random_weight(qtype, E * rows, k, rng)).reshape(E, rows, -1)
        return GGUFWeight(data, qtype, (E, rows, k))

    experts = LlamafileExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", {"threads": 2})
    experts.load_weights({"gate": stacked("Q4_K", I, H), "up": stacked("Q8_0", I, H), "down": stacked("Q6_K", H, I)})
    return experts


def routing(T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), torch.randint(0, E + 1, (T, K), generator=g), torch.rand(T, K, generator=g)


class SerialParallelFor:
    """An external ``int parallel_for(fn, ctx, n)`` as a cffi callback: runs the items in order
    on the calling thread; ``fail`` makes it report "not started" (nonzero) without running."""

    def __init__(self, threads: int = 3, fail: bool = False):
        ffi = _lib.kernels()[0]
        self.threads, self.fail = threads, fail
        self.calls, self.items, self.workers = 0, 0, set()

        @ffi.callback("ktl_parallel_for_fn")
        def parallel_for(fn, ctx, n_items):
            self.calls += 1
            if self.fail:
                return 1
            for i in range(n_items):
                worker = i % self.threads
                self.workers.add(worker)
                fn(ctx, i, worker)
            self.items += n_items
            return 0

        self.callback = parallel_for  # keep alive
        self.address = int(ffi.cast("uintptr_t", parallel_for))
        self.pool = pools.external_pool(self.address, threads)


@pytest.fixture
def external(monkeypatch):
    ext = SerialParallelFor()
    monkeypatch.setattr(pools, "shared_pool", lambda: ext.pool)
    return ext


def test_external_pool_handle():
    ext = SerialParallelFor(threads=5)
    lib = _lib.kernels()[1]
    assert lib.ktl_pool_is_external(ext.pool) == 1 and pools.pool_threads(ext.pool) == 5
    assert lib.ktl_pool_is_external(pools.own_pool(2)) == 0


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", "Q6_K", "BF16"])
@pytest.mark.parametrize("T", [1, 7])
def test_matmul_on_external_pool_is_identical(monkeypatch, qtype, T):
    w = torch.from_numpy(random_weight(qtype, 200, 512, np.random.default_rng(T)))
    x = torch.randn(T, 512)
    own = _lib.matmul(x, w, qtype, 200, 2)
    ext = SerialParallelFor()
    monkeypatch.setattr(pools, "shared_pool", lambda: ext.pool)
    assert torch.equal(_lib.matmul(x, w, qtype, 200, 2), own)
    assert ext.calls > 0 and ext.items > 1 and ext.workers == {0, 1, 2}


def test_experts_and_jobs_on_external_pool_are_identical(monkeypatch):
    experts = make_layer(owned=(1, 2, 4, 6))
    x, ids, w = routing(9, 5)
    own, own_bf16 = experts(x, ids, w), experts(x.bfloat16(), ids, w)
    ext = SerialParallelFor()
    monkeypatch.setattr(pools, "shared_pool", lambda: ext.pool)
    assert torch.equal(experts(x, ids, w), own)
    calls = ext.calls
    job = experts.make_job(x.bfloat16(), ids, w, torch.empty(9, H, dtype=torch.bfloat16))
    for _ in range(2):
        job.submit()  # the dispatcher thread calls the external parallel-for
        assert torch.equal(job.wait(), own_bf16)
    assert ext.calls > calls


def test_external_pool_that_is_not_started_falls_back(monkeypatch):
    experts = make_layer()
    x, ids, w = routing(4, 6)
    own = experts(x, ids, w)
    ext = SerialParallelFor(fail=True)
    monkeypatch.setattr(pools, "shared_pool", lambda: ext.pool)
    assert torch.equal(experts(x, ids, w), own)
    assert ext.calls > 0 and ext.items == 0
    job = experts.make_job(x, ids, w)
    assert torch.equal(job(), own)


def test_pool_mode_environment(monkeypatch, caplog):
    monkeypatch.setenv(pools.POOL_ENV, "own")
    with caplog.at_level(logging.INFO, logger="kt_llamafile"):
        assert pools.shared_pool.__wrapped__() is None
    assert "its own worker pool" in caplog.text
    monkeypatch.setenv(pools.POOL_ENV, "bogus")
    with pytest.raises(ValueError, match="KT_LLAMAFILE_POOL"):
        pools.shared_pool.__wrapped__()
    monkeypatch.setattr(pools, "kt_amx_parallel_for", lambda: (None, "kt_amx has no shared_pool()"))
    monkeypatch.setenv(pools.POOL_ENV, "shared")
    with pytest.raises(RuntimeError, match="no shared_pool"):
        pools.shared_pool.__wrapped__()
    monkeypatch.setenv(pools.POOL_ENV, "auto")
    assert pools.shared_pool.__wrapped__() is None


def test_auto_mode_uses_an_offered_parallel_for(monkeypatch):
    ext = SerialParallelFor(threads=4)
    monkeypatch.delenv(pools.POOL_ENV, raising=False)
    monkeypatch.setattr(pools, "kt_amx_parallel_for", lambda: ((ext.address, 4), ""))
    handle = pools.shared_pool.__wrapped__()
    assert _lib.kernels()[1].ktl_pool_is_external(handle) == 1 and pools.pool_threads(handle) == 4


# ------------------------------------------------------------------------------- kt-amx


def _kt_amx_shared_pool_reason() -> str | None:
    try:
        import kt_amx
    except Exception as exc:
        return f"kt-amx does not import: {exc}"
    if not callable(getattr(kt_amx, "shared_pool", None)):
        return "kt_amx.shared_pool() does not exist yet (kt-amx side of the shared pool, issue #5)"
    return None


needs_kt_amx_pool = pytest.mark.skipif(_kt_amx_shared_pool_reason() is not None,
                                       reason=str(_kt_amx_shared_pool_reason()))


@needs_kt_amx_pool
def test_kt_amx_shared_pool_runs_matmul_experts_and_jobs(monkeypatch):
    found, why = pools.kt_amx_parallel_for()
    assert found is not None, why
    address, threads = found
    experts = make_layer()
    x, ids, w = routing(6, 7)
    own = experts(x, ids, w)
    wq = torch.from_numpy(random_weight("Q4_K", 96, 512, np.random.default_rng(0)))
    xq = torch.randn(3, 512)
    own_mm = _lib.matmul(xq, wq, "Q4_K", 96, 2)
    shared = pools.external_pool(address, threads)
    monkeypatch.setattr(pools, "shared_pool", lambda: shared)
    assert torch.equal(_lib.matmul(xq, wq, "Q4_K", 96, 2), own_mm)
    assert torch.equal(experts(x, ids, w), own)
    job = experts.make_job(x, ids, w)
    for _ in range(3):
        assert torch.equal(job(), own)


@needs_kt_amx_pool
def test_auto_mode_picks_kt_amx_in_a_fresh_process():
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from kt_llamafile import _lib, pools\n"
            "h = _lib.pool(2); print(_lib.kernels()[1].ktl_pool_is_external(h))\n")
    env = {k: v for k, v in os.environ.items() if k != pools.POOL_ENV}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "1" and "kt-amx's shared pool" in proc.stderr


# ----------------------------------------------------------------------- spin for graphs


@pytest.fixture
def spin_restored():
    lib = _lib.kernels()[1]
    before = lib.ktl_spin_us()
    yield lib
    lib.ktl_set_spin_us(before)


@pytest.mark.parametrize("spin_us", [0, 3000])
def test_own_pool_results_do_not_depend_on_the_spin(spin_restored, monkeypatch, spin_us):
    monkeypatch.setattr(pools, "shared_pool", lambda: None)
    experts = make_layer()
    x, ids, w = routing(5, 11)
    expected = experts(x, ids, w)
    spin_restored.ktl_set_spin_us(spin_us)
    assert spin_restored.ktl_spin_us() == spin_us
    for _ in range(5):
        assert torch.equal(experts(x, ids, w), expected)


@pytest.mark.parametrize("functions", ["host_functions", "doorbell_functions"])
def test_graph_jobs_make_own_workers_spin_longer(spin_restored, monkeypatch, functions):
    monkeypatch.setattr(pools, "shared_pool", lambda: None)
    monkeypatch.delenv(pools.SPIN_ENV, raising=False)
    monkeypatch.setenv(pools.GRAPH_SPIN_ENV, "1234")
    spin_restored.ktl_set_spin_us(50)
    experts = make_layer()
    job = experts.make_job(*routing(2, 12))
    assert spin_restored.ktl_spin_us() == 50  # a job alone may never run from a graph
    getattr(job, functions)()
    assert spin_restored.ktl_spin_us() == 1234
    monkeypatch.setenv(pools.SPIN_ENV, "77")  # the user's fixed spin wins
    spin_restored.ktl_set_spin_us(77)
    getattr(job, functions)()
    assert spin_restored.ktl_spin_us() == 77


def test_graph_jobs_on_the_shared_pool_ask_kt_amx_to_spin_longer(external, spin_restored, monkeypatch):
    calls = []
    fake = type(sys)("kt_amx")
    fake.spin_for_graphs = lambda: calls.append(1)
    monkeypatch.setitem(sys.modules, "kt_amx", fake)
    job = make_layer().make_job(*routing(2, 13))
    job.doorbell_functions()
    assert calls == [1]
    del fake.spin_for_graphs  # an older kt-amx without the hook: nothing to call, no error
    job.host_functions()
    assert calls == [1]
