"""kt-llamafile experts in a CUDA graph (DESIGN §5) through ktcore's ``HostExpertsRunner``.

The CPU test checks the runner's plumbing with kt-llamafile's jobs (pinned-buffer copies, the
host functions called through their C addresses) with a fake CUDA runtime. The ``cuda`` tests
run on the GPU host (the root conftest skips them elsewhere): the runner's eager output
against the CPU op and TorchExperts, and a captured graph (D2H copies, submit host node,
unrelated GPU work, wait host node, H2D copy) replayed on new inputs with no Python.
"""

from __future__ import annotations

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
from ktcore.runtime.job_protocol_checks import check_graph_replay, check_runner_eager, check_runner_plumbing

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


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_plumbing_with_fake_runtime(pool_mode, dtype, pool):
    pool_mode(pool)
    runner = check_runner_plumbing(make(owned=tuple(range(0, E, 2))), dtype, bad_id_error=IndexError)
    assert _lib.kernels()[1].ktl_pool_is_external(runner._jobs[8].pool) == (pool == "shared")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runner_eager_matches_cpu_op_and_torch_experts(dtype):
    layer = gguf_layer(("Q8_0", "Q8_0", "Q8_0"), seed=1)
    ref = TorchExperts(ExpertsSpec(E, H, I, K), "cuda", {"dtype": "fp32"})
    ref.load_weights(layer)
    check_runner_eager(make(layer), ref, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("T", [1, 7])
def test_graph_capture_replays_cpu_experts_without_python(pool_mode, T, pool):
    pool_mode(pool)
    check_graph_replay(make(), T, PACKAGE)
