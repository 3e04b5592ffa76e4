"""Conformance checks for Experts backends that offer the job protocol (host_experts.py).

A CPU plugin whose experts should run inside CUDA graphs calls these from its tests (kt-amx
and kt-llamafile do); each raises ``AssertionError`` on a failure:

- ``check_runner_plumbing`` (any host): ``HostExpertsRunner`` through a stand-in CUDA runtime
  gives the operator's own output, enqueues copies and host functions in order, and reports
  a bad expert id after the fact;
- ``check_runner_eager`` (GPU host): the runner from GPU tensors gives the operator's output
  and is close to a reference operator;
- ``check_graph_replay`` (GPU host): a captured graph with the CPU experts between unrelated
  GPU work replays new inputs with none of the plugin's Python running.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from ktcore.runtime import cudart as rt
from ktcore.runtime.fake_cudart import FakeCudart
from ktcore.runtime.host_experts import HostExpertsRunner


def random_inputs(spec, T: int, seed: int, device: str | torch.device = "cpu"):
    """(x [T, H], topk_ids [T, K], topk_weights [T, K]) with a repeated expert in row 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, spec.hidden_size, generator=gen)
    ids = torch.randint(0, spec.num_experts, (T, spec.top_k), generator=gen)
    ids[0, 1] = ids[0, 0]
    w = torch.rand(T, spec.top_k, generator=gen)
    return x.to(device), ids.to(device), w.to(device)


@contextlib.contextmanager
def fake_cuda_runtime():
    """Installs a ``FakeCudart`` as the process's CUDA runtime for the ``with`` block."""
    fake, saved = FakeCudart(), rt.cudart
    rt.cudart = lambda: fake
    try:
        yield fake
    finally:
        rt.cudart = saved


def check_runner_plumbing(experts, dtype: torch.dtype, bad_id_error: type[Exception] = IndexError) -> HostExpertsRunner:
    """See the module docstring; returns the runner (its jobs, for backend-specific checks)."""
    spec = experts.spec
    with fake_cuda_runtime() as fake:
        runner = HostExpertsRunner(experts, max_tokens=8, device="cpu", dtype=dtype)
        submit_fn, wait_fn = experts.make_job(*random_inputs(spec, 1, 0)).host_functions()
        for T, seed in ((8, 1), (3, 2), (8, 3)):
            x, ids, w = random_inputs(spec, T, seed)
            y = runner.forward(x, ids.int(), w.double())
            assert y.shape == (T, spec.hidden_size) and y.dtype == dtype
            assert torch.equal(y, experts(x.to(dtype), ids, w))
        assert runner.python_calls == 3 and sorted(runner._jobs) == [3, 8]
        assert [kind for kind, _ in fake.log[:6]] == ["copy", "copy", "copy", "host", "host", "copy"]
        assert [fn for kind, fn in fake.log[:6] if kind == "host"] == [submit_fn, wait_fn]
        runner.check_status()
        try:
            runner.forward(*random_inputs(spec, 9, 0))
        except ValueError as exc:
            assert "max 8 tokens" in str(exc)
        else:
            raise AssertionError("9 tokens through a runner for 8 were accepted")
        x, ids, w = random_inputs(spec, 3, 4)
        ids[1, 0] = spec.num_experts + 1  # host nodes cannot raise: the error is read afterwards
        runner.forward(x, ids, w)
        try:
            runner.check_status()
        except bad_id_error:
            pass
        else:
            raise AssertionError("an expert id out of range went unreported")
    return runner


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _check_signal(runner: HostExpertsRunner, expect_signal: str | None, expect_copies: str | None) -> None:
    if expect_signal is not None:
        assert runner.signal.startswith(expect_signal), (runner.signal, expect_signal)
    if expect_copies is not None:
        assert runner.copies.startswith(expect_copies), (runner.copies, expect_copies)


def check_runner_eager(experts, reference, dtype: torch.dtype, tolerance: float = 2e-2,
                       expect_signal: str | None = None, expect_copies: str | None = None) -> None:
    """GPU host: ``reference`` is an Experts operator on the GPU (e.g. TorchExperts, fp32);
    ``expect_signal``: how the runner must reach the CPU ("doorbell" or "host nodes");
    ``expect_copies``: how its data must move ("kernels" or "memcpy")."""
    runner = HostExpertsRunner(experts, max_tokens=16, dtype=dtype)
    _check_signal(runner, expect_signal, expect_copies)
    assert "libcudart" in Path(rt.cudart().path).name
    for T, seed in ((16, 1), (5, 2), (1, 3)):
        x, ids, w = random_inputs(experts.spec, T, seed, "cuda")
        y = runner.forward(x, ids, w).clone()
        torch.cuda.synchronize()
        assert y.device.type == "cuda" and y.shape == x.shape and y.dtype == dtype
        assert torch.equal(y.cpu(), experts(x.cpu().to(dtype), ids.cpu(), w.cpu()))
        err = relative_error(y, reference(x.float(), ids, w))
        assert err < tolerance, (T, err)
    runner.check_status()
    runner.close()


def _calls_under(package: Path, seen: list):
    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(str(package)):
            seen.append(frame.f_code.co_name)
    return profile


def check_graph_replay(experts, T: int, package: Path, replays: int = 5, expect_signal: str | None = None,
                       expect_copies: str | None = None) -> None:
    """GPU host: see the module docstring; ``package`` is the plugin's directory, none of
    whose Python may run during a replay."""
    spec = experts.spec
    runner = HostExpertsRunner(experts, max_tokens=8, dtype=torch.bfloat16)
    _check_signal(runner, expect_signal, expect_copies)
    dev = torch.device("cuda")
    static_x = torch.zeros(T, spec.hidden_size, dtype=torch.bfloat16, device=dev)
    static_ids = torch.zeros(T, spec.top_k, dtype=torch.int64, device=dev)
    static_w = torch.zeros(T, spec.top_k, dtype=torch.float32, device=dev)
    a = torch.randn(1024, 1024, device=dev)

    def step():
        pending = runner.submit(static_x, static_ids, static_w)
        other = torch.relu(a @ a).sum(dim=1)  # unrelated GPU work between submit and wait
        return pending.finish().float() * 2.0 + 1.0, other

    def load(seed):
        x, ids, w = random_inputs(spec, T, seed, dev)
        static_x.copy_(x.bfloat16()), static_ids.copy_(ids), static_w.copy_(w)
        return x, ids, w

    load(100)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (jobs, libcudart, worker threads) outside the capture
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
    for seed in range(1, replays + 1):
        x, ids, w = load(seed)
        seen: list[str] = []
        sys.setprofile(_calls_under(package, seen))
        try:
            graph.replay()
            torch.cuda.synchronize()
        finally:
            sys.setprofile(None)
        assert runner.python_calls == calls and seen == [], seen  # no plugin Python ran
        expected = experts(x.cpu().bfloat16(), ids.cpu(), w.cpu()).float() * 2.0 + 1.0
        assert torch.equal(out.cpu(), expected)
        assert torch.allclose(other, other_ref)
    runner.check_status()
    runner.close()
