"""Asynchronous experts jobs (kt_llamafile.jobs): submit/wait give exactly the synchronous
forward, for fp32 and bf16 buffers, int64 and int32 ids, repeated runs and several jobs in
flight; errors surface in wait(); the host functions are the C symbols."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from kt_llamafile import _lib
from kt_llamafile.experts import LlamafileExperts
from kt_llamafile.random_blocks import random_weight
from ktcore.ops.experts import ExpertsSpec
from ktcore.ops.weights import GGUFWeight

E, H, I, K = 8, 512, 256, 3


def make_layer(types=("Q4_K", "Q4_K", "Q6_K"), seed=0, owned=None, threads=2) -> LlamafileExperts:
    rng = np.random.default_rng(seed)

    def stacked(qtype, rows, k):
        data = torch.from_numpy(random_weight(qtype, E * rows, k, rng)).reshape(E, rows, -1)
        return GGUFWeight(data, qtype, (E, rows, k))

    layer = {"gate": stacked(types[0], I, H), "up": stacked(types[1], I, H), "down": stacked(types[2], H, I)}
    experts = LlamafileExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", {"threads": threads})
    experts.load_weights(layer)
    return experts


def routing(T, seed, ids_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E + 1, (T, K), generator=g)  # E: the padding id, adds zero
    ids[0, 1] = ids[0, 0]
    return x, ids.to(ids_dtype), torch.rand(T, K, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_submit_wait_matches_the_synchronous_forward(dtype, T, ids_dtype):
    experts = make_layer(owned=(0, 2, 3, 5) if T == 7 else None)
    x_buf = torch.empty(T, H, dtype=dtype)
    ids_buf = torch.empty(T, K, dtype=ids_dtype)
    w_buf = torch.empty(T, K)
    y_buf = torch.full((T, H), float("nan"), dtype=dtype)
    job = experts.make_job(x_buf, ids_buf, w_buf, y_buf)
    for seed in range(3):  # one job, rebound inputs: the buffers are read at each run
        x, ids, w = routing(T, seed, ids_dtype)
        x_buf.copy_(x.to(dtype)), ids_buf.copy_(ids), w_buf.copy_(w)
        job.submit()
        y = job.wait()
        assert y.data_ptr() == y_buf.data_ptr()
        assert torch.equal(y_buf, experts(x.to(dtype), ids, w))


def test_float_weights_and_fp32_x_with_bf16_y():
    experts = make_layer(("F16", "Q8_0", "BF16"), seed=1)
    x, ids, w = routing(5, 1)
    y = torch.empty(5, H, dtype=torch.bfloat16)
    job = experts.make_job(x, ids, w, y)
    job()
    assert torch.equal(y, experts(x, ids, w).to(torch.bfloat16))


def test_several_jobs_in_flight_and_from_threads():
    layers = [make_layer(seed=s) for s in range(3)]
    bound = []
    for s, layer in enumerate(layers):
        x, ids, w = routing(4, 10 + s)
        bound.append((layer, (x, ids, w), layer.make_job(x, ids, w)))
    for _, _, job in bound:  # queued in order on the dispatcher
        job.submit()
    for layer, args, job in reversed(bound):
        assert torch.equal(job.wait(), layer(*args))
    errors = []

    def worker(layer, args, job):
        try:
            for _ in range(5):
                job.submit()
                if not torch.equal(job.wait(), layer(*args)):
                    errors.append("mismatch")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=b) for b in bound]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_errors_surface_in_wait_and_the_job_recovers():
    experts = make_layer()
    x, ids, w = routing(3, 2)
    job = experts.make_job(x, ids, w)
    with pytest.raises(RuntimeError, match="never submitted"):
        job.wait()
    ids[1, 0] = E + 1
    job.submit()  # host functions cannot raise: submit returns, the error waits for wait()
    with pytest.raises(IndexError, match="expert id"):
        job.wait()
    ids[1, 0] = -1
    with pytest.raises(IndexError):
        job()
    ids[1, 0] = 0
    assert torch.equal(job(), experts(x, ids, w))


def test_bad_buffers_are_refused():
    experts = make_layer()
    x, ids, w = routing(3, 3)
    with pytest.raises(ValueError, match="contiguous"):
        experts.make_job(x.t().contiguous().t(), ids, w)
    with pytest.raises(ValueError, match="fp32"):
        experts.make_job(x, ids, w.double())
    with pytest.raises(ValueError, match="fp32 or bf16"):
        experts.make_job(x.half(), ids, w)
    with pytest.raises(RuntimeError, match="load the weights"):
        LlamafileExperts(ExpertsSpec(E, H, I, K), "cpu", {}).make_job(x, ids, w)


def c_symbol(name: str) -> int:
    """The address of a C function of the extension."""
    ffi, lib = _lib.kernels()
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


def call_host_function(address: int, job_address: int) -> None:
    """Calls ``void f(void *job)`` at ``address``, as a CUDA host node or the doorbell does."""
    import ctypes

    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(address)(job_address)


def test_host_functions_are_the_c_symbols_and_run_the_job():
    experts = make_layer()
    x, ids, w = routing(2, 4)
    job = experts.make_job(x, ids, w)
    submit_fn, wait_fn = job.host_functions()
    assert submit_fn == c_symbol("ktl_host_submit")
    assert submit_fn != wait_fn and job.address != 0
    call_host_function(submit_fn, job.address)
    call_host_function(wait_fn, job.address)
    assert torch.equal(job.y, experts(x, ids, w))


def test_doorbell_functions_run_the_job_on_the_calling_thread():
    experts = make_layer()
    x, ids, w = routing(3, 5)
    job = experts.make_job(x, ids, w)
    run_fn, done_fn = job.doorbell_functions()
    assert run_fn == c_symbol("ktl_host_run")
    assert run_fn not in job.host_functions() and done_fn not in job.host_functions()
    expected = experts(x, ids, w)
    call_host_function(run_fn, job.address)
    assert torch.equal(job.y, expected)  # done before run_fn returned: done_fn waits for nothing
    call_host_function(done_fn, job.address)
    job.wait()
    job.y.zero_()
    job.submit()  # a posted run, then a direct one: the direct run waits for it first
    call_host_function(run_fn, job.address)
    assert torch.equal(job.wait(), expected)
    ids[0, 0] = E + 5  # an error of a direct run surfaces in wait()
    call_host_function(run_fn, job.address)
    with pytest.raises(IndexError):
        job.wait()
    with pytest.raises(IndexError):  # and in run(), the same run from Python
        job.run()
    ids[0, 0] = 1
    job.y.zero_()
    assert torch.equal(job.run(), experts(x, ids, w))


def test_a_doorbell_watcher_runs_the_job_with_its_pair():
    doorbell = pytest.importorskip("kt_amx.doorbell", reason="the doorbell comes with kt-amx")
    import time

    experts = make_layer(types=("Q8_0", "Q4_K", "Q6_K"))
    bell = doorbell.Doorbell(capacity=2, pin_memory=False)
    bell.acquire()
    try:
        x, ids, w = routing(1, 6)
        job = experts.make_job(x, ids, w)
        code = bell.add(*job.doorbell_functions(), job.address)
        req, done = bell.flags[0:1], bell.flags[16:17]
        for _ in range(3):  # as the layer of several decode steps
            job.y.zero_()
            req.fill_(code)
            deadline = time.monotonic() + 10
            while int(done) != code:
                assert time.monotonic() < deadline, "the doorbell did not answer"
                time.sleep(1e-4)
            done.fill_(0)
            assert torch.equal(job.y, experts(x, ids, w))
        job.wait()
        assert bell.counts() == (3, 0)
    finally:
        bell.release()
