"""kt-llamafile experts in a CUDA graph (DESIGN §5) through ktcore's ``HostExpertsRunner``.

The CPU test checks the runner's plumbing with kt-llamafile's jobs (pinned-buffer copies, the
host functions called through their C addresses) with a fake CUDA runtime. The ``cuda`` tests
run on the GPU host (the root conftest skips them elsewhere): the runner's eager output
against the CPU op and TorchExperts, and a captured graph (D2H copies, submit host node,
unrelated GPU work, wait host node, H2D copy) replayed on new inputs with no Python.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kt_llamafile
from kt_llamafile import _lib
from kt_llamafile.experts import LlamafileExperts
from kt_llamafile.random_blocks import random_weight
from ktcore.ops.experts import ExpertsSpec, TorchExperts
from ktcore.ops.weights import GGUFWeight
from ktcore.runtime import cudart as rt
from ktcore.runtime.fake_cudart import FakeCudart
from ktcore.runtime.host_experts import HostExpertsRunner

E, H, I, K = 16, 256, 256, 4
PACKAGE = Path(kt_llamafile.__file__).resolve().parent


def _no_shared_pool_reason() -> str | None:
    try:
        import kt_amx
    except Exception as exc:
        return f"kt-amx does not import: {exc}"
    return None if callable(getattr(kt_amx, "shared_pool", None)) else "kt_amx.shared_pool() does not exist"


#: the pool the jobs run on: kt-llamafile's own, or kt-amx's shared one (DESIGN §6)
POOLS = ["own", pytest.param("shared", marks=pytest.mark.skipif(_no_shared_pool_reason() is not None,
                                                                 reason=str(_no_shared_pool_reason())))]


def gguf_layer(types=("Q4_K", "Q4_K", "Q6_K"), seed=0) -> dict[str, GGUFWeight]:
    rng = np.random.default_rng(seed)

    def stacked(qtype, rows, k):
        data = torch.from_numpy(random_weight(qtype, E * rows, k, rng)).reshape(E, rows, -1)
        return GGUFWeight(data, qtype, (E, rows, k))

    return {"gate": stacked(types[0], I, H), "up": stacked(types[1], I, H), "down": stacked(types[2], H, I)}


def make(layer=None, owned=None) -> LlamafileExperts:
    experts = LlamafileExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", {"threads": 2})
    experts.load_weights(gguf_layer() if layer is None else layer)
    return experts


def inputs(T, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    ids = torch.randint(0, E, (T, K), generator=gen)
    ids[0, 1] = ids[0, 0]  # a repeated expert within a token's top-k
    w = torch.rand(T, K, generator=gen)
    return x.to(device), ids.to(device), w.to(device)


# ------------------------------------------------------------------------------- CPU only


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_plumbing_with_fake_runtime(monkeypatch, pool_mode, dtype, pool):
    pool_mode(pool)
    fake = FakeCudart()
    monkeypatch.setattr(rt, "cudart", lambda: fake)
    experts = make(owned=tuple(range(0, E, 2)))
    runner = HostExpertsRunner(experts, max_tokens=8, device="cpu", dtype=dtype)
    submit_fn, wait_fn = experts.make_job(*inputs(1, 0)).host_functions()
    for T, seed in ((8, 1), (3, 2), (8, 3)):
        x, ids, w = inputs(T, seed)
        y = runner.forward(x, ids.int(), w.double())
        assert y.shape == (T, H) and y.dtype == dtype
        assert torch.equal(y, experts(x.to(dtype), ids, w))
    assert runner.python_calls == 3 and sorted(runner._jobs) == [3, 8]
    assert _lib.kernels()[1].ktl_pool_is_external(runner._jobs[8].pool) == (pool == "shared")
    kinds = [k for k, _ in fake.log]
    assert kinds[:6] == ["copy", "copy", "copy", "host", "host", "copy"]
    assert [fn for k, fn in fake.log[:6] if k == "host"] == [submit_fn, wait_fn]
    runner.check_status()
    with pytest.raises(ValueError, match="max 8 tokens"):
        runner.forward(*inputs(9, 0))
    x, ids, w = inputs(3, 4)
    ids[1, 0] = E + 1  # host nodes cannot raise: the error is read afterwards
    runner.forward(x, ids, w)
    with pytest.raises(IndexError, match="expert id"):
        runner.check_status()


# ------------------------------------------------------------------------------- GPU host


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_eager_matches_cpu_op_and_torch_experts(dtype):
    layer = gguf_layer(("Q8_0", "Q8_0", "Q8_0"), seed=1)
    experts = make(layer)
    ref = TorchExperts(ExpertsSpec(E, H, I, K), "cuda", {"dtype": "fp32"})
    ref.load_weights(layer)
    runner = HostExpertsRunner(experts, max_tokens=16, dtype=dtype)
    lib = rt.cudart()
    assert "libcudart" in os.path.basename(lib.path)
    for T, seed in ((16, 1), (5, 2), (1, 3)):
        x, ids, w = inputs(T, seed, "cuda")
        y = runner.forward(x, ids, w).clone()
        torch.cuda.synchronize()
        assert y.device.type == "cuda" and y.shape == (T, H) and y.dtype == dtype
        assert torch.equal(y.cpu(), experts(x.cpu().to(dtype), ids.cpu(), w.cpu()))
        expected = ref(x.float(), ids, w)
        assert _relative_error(y, expected) < 2e-2, (T, _relative_error(y, expected))
    runner.check_status()


def _kt_llamafile_profiler(counter):
    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(PACKAGE)):
            counter.append(frame.f_code.co_name)
    return profile


@pytest.mark.cuda
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("T", [1, 7])
def test_graph_capture_replays_cpu_experts_without_python(pool_mode, T, pool):
    pool_mode(pool)
    experts = make()
    runner = HostExpertsRunner(experts, max_tokens=8, dtype=torch.bfloat16)
    dev = torch.device("cuda")
    static_x = torch.zeros(T, H, dtype=torch.bfloat16, device=dev)
    static_ids = torch.zeros(T, K, dtype=torch.int64, device=dev)
    static_w = torch.zeros(T, K, dtype=torch.float32, device=dev)
    a = torch.randn(1024, 1024, device=dev)

    def step():
        pending = runner.submit(static_x, static_ids, static_w)
        other = torch.relu(a @ a).sum(dim=1)  # unrelated GPU work between submit and wait
        y = pending.finish()
        return y.float() * 2.0 + 1.0, other

    x0, ids0, w0 = inputs(T, 100, dev)
    static_x.copy_(x0.bfloat16()), static_ids.copy_(ids0), static_w.copy_(w0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (jobs, libcudart, the dispatcher thread) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, other = step()
    torch.cuda.synchronize()
    calls = runner.python_calls
    other_ref = torch.relu(a @ a).sum(dim=1)

    for seed in range(1, 6):
        x, ids, w = inputs(T, seed, dev)
        eager = runner.forward(x.bfloat16(), ids, w).float() * 2.0 + 1.0
        torch.cuda.synchronize()
        eager = eager.cpu()
        static_x.copy_(x.bfloat16()), static_ids.copy_(ids), static_w.copy_(w)
        calls_before, seen = runner.python_calls, []
        sys.setprofile(_kt_llamafile_profiler(seen))
        try:
            graph.replay()
            torch.cuda.synchronize()
        finally:
            sys.setprofile(None)
        assert runner.python_calls == calls_before and seen == []  # no kt_llamafile Python ran
        expected = experts(x.cpu().bfloat16(), ids.cpu(), w.cpu()).float() * 2.0 + 1.0
        assert torch.equal(out.cpu(), eager)
        assert torch.equal(out.cpu(), expected)
        assert torch.allclose(other, other_ref)
    assert runner.python_calls == calls + 5  # the eager forwards only
    runner.check_status()
