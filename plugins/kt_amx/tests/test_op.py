"""The operator around the kernels: torch.library registration, torch.compile, the async job
API, the registry entry, option and input errors."""

from __future__ import annotations

import pytest
import torch

from kt_amx import _lib
from kt_amx.experts import AmxExperts
from kt_amx.jobs import ExpertsJob
from ktcore.errors import BackendError, WeightError
from ktcore.ops.experts import ExpertsSpec

E, H, I, K = 8, 64, 96, 2


def make(options=None, owned=None):
    gen = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(E, I, H, generator=gen) * 0.1, "up": torch.randn(E, I, H, generator=gen) * 0.1,
               "down": torch.randn(E, H, I, generator=gen) * 0.1}
    amx = AmxExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", options or {"format": "int4", "group_size": 32})
    amx.load_weights(weights)
    return amx


def inputs(T=5, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=gen), torch.randint(0, E, (T, K), generator=gen), torch.rand(T, K, generator=gen)


def test_opcheck():
    amx = make()
    x, ids, w = inputs()
    torch.library.opcheck(torch.ops.kt_amx.experts.default, (x, ids, w, amx.handle))
    torch.library.opcheck(torch.ops.kt_amx.experts.default, (x.bfloat16(), ids.int(), w, amx.handle))


def test_compile_fullgraph_matches_eager():
    amx = make()
    x, ids, w = inputs(4)

    def layer(x, ids, w):
        return amx(x * 2.0, ids, w) + 1.0

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, ids, w), layer(x, ids, w))


def test_async_job_matches_sync():
    amx = make()
    x, ids, w = inputs(6)
    job = amx.make_job(x, ids, w)
    job.submit()
    y = job.wait().clone()
    assert torch.equal(y, amx(x, ids, w))
    x.mul_(0.5)  # the job reads its buffers at submit time
    job.submit()
    assert torch.equal(job.wait(), amx(x, ids, w))


def test_host_function_addresses():
    amx = make()
    job = ExpertsJob(amx, *inputs(2))
    submit, wait = ExpertsJob.host_functions()
    assert submit and wait and submit != wait and job.address


def test_jobs_of_two_layers_in_turn():
    a, b = make(), make({"format": "bf16"})
    x, ids, w = inputs(3)
    ja, jb = a.make_job(x, ids, w), b.make_job(x, ids, w)
    ja.submit()
    jb.submit()  # waits for ja first: one job runs at a time
    assert torch.equal(jb.wait(), b(x, ids, w))
    assert torch.equal(ja.wait(), a(x, ids, w))


def test_zero_tokens_and_padding_only():
    amx = make()
    assert amx(torch.zeros(0, H), torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K)).shape == (0, H)
    x, _, w = inputs(3)
    assert torch.all(amx(x, torch.full((3, K), E), w) == 0)


def test_bad_ids_raise():
    amx = make()
    x, ids, w = inputs(3)
    ids[1, 0] = E + 1
    with pytest.raises(IndexError, match="topk_ids"):
        amx(x, ids, w)


def test_errors():
    with pytest.raises(BackendError, match="unknown option"):
        AmxExperts(ExpertsSpec(E, H, I, K), "cpu", {"dtype": "bf16"})
    with pytest.raises(BackendError, match="CPU"):
        AmxExperts(ExpertsSpec(E, H, I, K), "meta", {})
    with pytest.raises(WeightError, match="multiple"):
        make({"format": "int4", "group_size": 128})  # H = 64
    with pytest.raises(RuntimeError, match="load_weights"):
        AmxExperts(ExpertsSpec(E, H, I, K), "cpu", {})(*inputs())


def test_module_to_keeps_packed_weights():
    amx = make()
    x, ids, w = inputs()
    before = amx(x, ids, w)
    amx.to(torch.float16)  # packed tensors are not buffers: nothing to cast
    assert torch.equal(amx(x, ids, w), before)


def test_registry_entry():
    """The entry point registers ``amx`` for experts on the CPU, available once built."""
    from ktcore.backends.registry import Registry

    spec = Registry.from_entry_points().get("amx", "experts")
    assert spec.devices == ("cpu",) and spec.distribution == "kt-amx"
    assert spec.run_probe() is None
    assert isinstance(spec.build(ExpertsSpec(E, H, I, K), "cpu", {"format": "int8"}), AmxExperts)


def test_isa_reporting():
    assert _lib.available_isa() in ("avx2", "avx512", "amx")
    assert _lib.isas_here()[0] == "avx2"
    with pytest.raises(ValueError):
        _lib.select_isa("sse")
    assert _lib.default_threads() >= 1
