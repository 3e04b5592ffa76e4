"""kt-amx's doorbell (csrc/doorbell.c) on any host: Python stands in for the CUDA stream,
writing job codes into the request word and waiting for the done word, as the stream's memory
operations do on the GPU host (there ktcore's runner tests ring it for real)."""

from __future__ import annotations

import time

import pytest
import torch

from kt_amx.doorbell import Doorbell
from kt_amx.experts import AmxExperts
from ktcore.ops.experts import ExpertsSpec
from ktcore.runtime.job_protocol_checks import random_inputs


def make():
    gen = torch.Generator().manual_seed(0)
    E, H, I, K = 8, 128, 64, 2
    weights = {name: torch.randn(shape, generator=gen) * 0.05
               for name, shape in (("gate", (E, I, H)), ("up", (E, I, H)), ("down", (E, H, I)))}
    experts = AmxExperts(ExpertsSpec(E, H, I, K), "cpu", {"format": "int4", "group_size": 32})
    experts.load_weights(weights)
    return experts


def ring(bell: Doorbell, code: int, timeout: float = 10.0) -> None:
    """What the stream does: write the code, wait for it in the done word, reset that."""
    req, done = bell.flags[0:1], bell.flags[16:17]
    req.fill_(code)
    deadline = time.monotonic() + timeout
    while int(done) != code:
        if time.monotonic() > deadline:
            raise AssertionError(f"the doorbell did not answer code {code} within {timeout} s")
        time.sleep(1e-4)
    assert int(req) == 0  # the watcher cleared the request before it answered
    done.fill_(0)


@pytest.fixture
def bell():
    bell = Doorbell(capacity=4, pin_memory=False)
    bell.acquire()
    yield bell
    bell.release()


def job_on(experts, T: int, seed: int):
    x, ids, w = random_inputs(experts.spec, T, seed)
    return experts.make_job(x.contiguous(), ids.contiguous(), w.contiguous()), (x, ids, w)


def test_rung_jobs_run_and_give_the_operator_output(bell):
    experts = make()
    jobs = [job_on(experts, T, seed) for T, seed in ((1, 1), (5, 2))]
    codes = [bell.add(*job.host_functions(), job.address) for job, _ in jobs]
    assert codes == [1, 2]
    for _ in range(3):  # the same codes again, in turn, as layers of several decode steps
        for (job, inputs), code in zip(jobs, codes):
            job.y.zero_()
            ring(bell, code)
            assert torch.equal(job.y, experts(*inputs))
    for job, _ in jobs:
        job.wait()  # no error recorded
    assert bell.counts() == (6, 0)
    times = bell.times()  # every job took time in submit and in wait
    assert times["submit"] > 0 and times["wait"] > 0
    # gaps: rings less than 5 ms after the previous answer (the first has none before it)
    assert 0 <= times["gaps"] <= 5 and (times["gap"] > 0) == (times["gaps"] > 0)


def test_unknown_and_removed_codes_are_answered_without_running_anything(bell):
    experts = make()
    job, _ = job_on(experts, 2, 3)
    code = bell.add(*job.host_functions(), job.address)
    ring(bell, 99)  # never added: answered at once, so the stream cannot hang on it
    bell.remove(code)
    job.y.fill_(7.0)
    ring(bell, code)
    assert torch.all(job.y == 7.0)  # removed: not run
    assert bell.counts() == (0, 2)


def test_capacity_and_watcher_lifetime():
    bell = Doorbell(capacity=2, pin_memory=False)
    experts = make()
    job, _ = job_on(experts, 1, 4)
    fns = job.host_functions()
    assert [bell.add(*fns, job.address) for _ in range(2)] == [1, 2]
    with pytest.raises(RuntimeError, match="no room"):
        bell.add(*fns, job.address)
    assert not bell.running
    bell.acquire()
    bell.acquire()
    bell.release()
    assert bell.running  # one user left
    ring(bell, 2)
    bell.release()
    assert not bell.running
    bell.release()  # more releases than users: ignored
    bell.acquire()  # restarts
    ring(bell, 1)
    bell.release()
    assert bell.counts() == (2, 0)
