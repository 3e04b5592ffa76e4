"""kt-amx experts in a CUDA graph (DESIGN §5) through ktcore's ``HostExpertsRunner``.

The ``cuda`` tests run on the GPU host (the root conftest skips them elsewhere): the runner's
eager output against the CPU op and TorchExperts, and a captured graph with D2H copies, the
submit host node, unrelated GPU work, the wait host node and the H2D copy, replayed on new
inputs with no Python. The CPU test checks the runner's plumbing with kt-amx's jobs (buffers,
host functions called through their C addresses) with a fake CUDA runtime.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kt_amx
from kt_amx.experts import AmxExperts
from ktcore.ops.experts import ExpertsSpec, TorchExperts
from ktcore.runtime.job_protocol_checks import check_graph_replay, check_runner_eager, check_runner_plumbing

E, H, I, K = 16, 256, 128, 4
PACKAGE = Path(kt_amx.__file__).resolve().parent


def make(fmt="int4", group=32):
    gen = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(E, I, H, generator=gen) * 0.05, "up": torch.randn(E, I, H, generator=gen) * 0.05,
               "down": torch.randn(E, H, I, generator=gen) * 0.05}
    options = {"format": fmt} if fmt == "bf16" else {"format": fmt, "group_size": group}
    amx = AmxExperts(ExpertsSpec(E, H, I, K), "cpu", options)
    amx.load_weights(weights)
    return amx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_plumbing_with_fake_runtime(dtype):
    check_runner_plumbing(make(), dtype, bad_id_error=IndexError)


#: How the runner reaches the CPU: kt-amx's doorbell (the default where the driver offers
#: stream memory operations) or host nodes (KTCORE_HOST_SIGNAL=host-nodes).
SIGNALS = {"doorbell": "auto", "host nodes": "host-nodes"}
#: How its data moves: GPU kernels through the mapped pinned buffers (the default where the
#: probe passes) or memcpys (KTCORE_HOST_COPIES=memcpy).
COPIES = {"kernels": "auto", "memcpy": "memcpy"}
#: With both of the defaults, who rings the doorbell and waits for its answer: the stage and
#: load kernels (the default) or stream memory operations (KTCORE_HOST_RING and
#: KTCORE_HOST_WAIT=memop); ignored otherwise.
WAITS = ("kernel", "memop")


@pytest.mark.cuda
@pytest.mark.parametrize("wait", WAITS)
@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_eager_matches_cpu_op_and_torch_experts(dtype, signal, copies, wait, monkeypatch):
    monkeypatch.setenv("KTCORE_HOST_WAIT", wait)
    monkeypatch.setenv("KTCORE_HOST_RING", wait)
    monkeypatch.setenv("KTCORE_HOST_SIGNAL", SIGNALS[signal])
    monkeypatch.setenv("KTCORE_HOST_COPIES", COPIES[copies])
    amx = make("bf16")
    ref = TorchExperts(ExpertsSpec(E, H, I, K), "cuda", {"dtype": "fp32"})
    ref.load_weights({k: v.contiguous() for k, v in amx.dequantized().items()})
    check_runner_eager(amx, ref, dtype, expect_signal=signal, expect_copies=copies)


@pytest.mark.cuda
@pytest.mark.parametrize("wait", WAITS)
@pytest.mark.parametrize("copies", COPIES)
@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("T", [1, 7])
def test_graph_capture_replays_cpu_experts_without_python(T, signal, copies, wait, monkeypatch):
    monkeypatch.setenv("KTCORE_HOST_WAIT", wait)
    monkeypatch.setenv("KTCORE_HOST_RING", wait)
    monkeypatch.setenv("KTCORE_HOST_SIGNAL", SIGNALS[signal])
    monkeypatch.setenv("KTCORE_HOST_COPIES", COPIES[copies])
    check_graph_replay(make("int4"), T, PACKAGE, expect_signal=signal, expect_copies=copies)
