"""The one-kernel routers (``ktcore.ops.router_kernel``: softmax_topk, noaux_tc) against the
routers' torch path with the decode top-k (``small_topk``: ties to the lower expert, NaN first), which is what
a compiled CUDA decode step ran before the kernel.

Shapes: odd H, E in {8, 60, 64, 128}, K in {1, 2, 6, 8}, T in {1, 3, 16}, with and without
renormalisation, bf16 and fp32 inputs, logits in the input dtype (Qwen, Mixtral) or in fp32
(DeepSeek); noaux_tc with and without groups; integer-valued inputs whose logits tie, NaN
inputs, fewer active experts, opcheck and torch.compile(fullgraph=True). On the GPU: Qwen3 /
DeepSeek-V2-Lite / Mixtral / DeepSeek-V3 shapes, CUDA graph capture and replay, and inductor.

Without a CUDA GPU the kernel runs in Triton's interpreter on CPU tensors (small shapes): the
``kernels`` fixture imports the module with ``TRITON_INTERPRET=1`` (tests/ops/triton_modules.py).

Tolerance: the ids must be equal. Logits in the input dtype round to the same bf16 values on
both paths (unless an fp32 sum lands within its rounding error of a bf16 midpoint: not at
these seeds on the CPU; the GPU tests use inputs whose logits are exact, and one test on
normal inputs allows a one-ulp logit change); the weights then differ only by the exp and
the sums (softmax, renormalisation) of the two implementations: ``rtol 2e-5``. fp32 logits
differ by the GEMM's summation order (~1e-6 relative), the weights by as much.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the router kernel needs triton (pip install triton)")

from ktcore.ops import router as router_mod  # noqa: E402
from ktcore.ops.router import RouterSpec, build_router, small_topk_is_cheap, uses_router_kernel  # noqa: E402

from tests.ops.triton_modules import import_kernels, kernel_device, node_generator  # noqa: E402

RTOL, ATOL = 2e-5, 1e-7

# (E, K, T): every E, K and T of the brief, each K with a few E
SHAPES = [(8, 1, 1), (8, 2, 16), (60, 6, 3), (60, 2, 1), (64, 6, 16), (64, 1, 3), (128, 8, 1), (128, 8, 16)]


@pytest.fixture(scope="module")
def device() -> str:
    return kernel_device()


@pytest.fixture(scope="module")
def kernels(device):
    """The module ``ktcore.ops.router_kernel`` (registers ``torch.ops.ktcore.router_topk``)."""
    return import_kernels("ktcore.ops.router_kernel", device, "_router_kernel")


@pytest.fixture
def gen(request) -> torch.Generator:
    return node_generator(request)


def make_router(spec: RouterSpec, dtype: torch.dtype, device: str, gen: torch.Generator):
    """Random weights (fan-in scaled) and, for noaux_tc, a random score correction bias."""
    router = build_router(spec, device=device, dtype=dtype)
    w = torch.randn(spec.num_experts, spec.hidden_size, generator=gen) * spec.hidden_size ** -0.5
    router.weight.data.copy_(w)
    if spec.kind == "noaux_tc":
        router.e_score_correction_bias.copy_(torch.randn(spec.num_experts, generator=gen) * 0.1)
    return router


def reference(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's torch path with the decode top-k (small_topk), whatever the device."""
    patch = pytest.MonkeyPatch()
    patch.setattr(router_mod, "uses_router_kernel", lambda x, spec: False)
    patch.setattr(router_mod, "uses_small_topk", small_topk_is_cheap)
    try:
        return router(x)
    finally:
        patch.undo()


def run_kernel(kernels, router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = router.spec
    bias = getattr(router, "e_score_correction_bias", None)
    ids, w = kernels.router_topk(x, router.weight, bias, router.kernel_counter, s.top_k, router.active_top_k,
                                 s.norm_topk_prob, float(s.routed_scaling_factor), s.fp32_logits, s.n_group,
                                 s.topk_group)
    assert int(router.kernel_counter[0]) == 0  # reset by the last program
    return ids, w


def check(got, want) -> None:
    (ids, w), (ref_ids, ref_w) = got, want
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == ref_ids.shape == w.shape
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(w, ref_w, rtol=RTOL, atol=ATOL, equal_nan=True)


@pytest.mark.parametrize("E, K, T", SHAPES)
@pytest.mark.parametrize("dtype, fp32_logits",
                         [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)])
@pytest.mark.parametrize("renorm", [False, True])
def test_kernel_matches_router(kernels, device, gen, E, K, T, dtype, fp32_logits, renorm):
    H = 37 if E < 128 else 67  # odd: the last H tile is partial
    spec = RouterSpec("softmax_topk", E, H, K, norm_topk_prob=renorm, fp32_logits=fp32_logits,
                      routed_scaling_factor=1.0 if renorm else 2.5)
    router = make_router(spec, dtype, device, gen)
    x = torch.randn(T, H, generator=gen).to(device, dtype)
    check(run_kernel(kernels, router, x), reference(router, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tied_scores_go_to_the_lower_expert(kernels, device, gen, dtype):
    """Integer-valued x and W: logits are small integers, exact in any summation order, and
    most experts share their score with others."""
    E, H, K, T = 60, 9, 8, 16
    router = build_router(RouterSpec("softmax_topk", E, H, K, fp32_logits=False), device=device, dtype=dtype)
    router.weight.data.copy_(torch.randint(-1, 2, (E, H), generator=gen))
    x = torch.randint(-1, 2, (T, H), generator=gen).to(device, dtype)
    ids, w = run_kernel(kernels, router, x)
    logits = (x.float() @ router.weight.float().T).cpu()  # [T, E]
    assert all(row.unique().numel() < E // 2 for row in logits)  # ties everywhere
    check((ids, w), reference(router, x))
    # the stable order: by score, then by index
    order = torch.sort(logits, dim=-1, descending=True, stable=True)[1][:, :K]
    assert torch.equal(ids.cpu().long(), order)


def test_nan_scores_come_first(kernels, device, gen):
    """A NaN in a token's input makes its softmax all NaN: experts 0..K-1 with NaN weights;
    a NaN router weight row makes every token's scores NaN."""
    E, H, K, T = 64, 21, 6, 3
    router = make_router(RouterSpec("softmax_topk", E, H, K, norm_topk_prob=True, fp32_logits=False),
                         torch.bfloat16, device, gen)
    x = torch.randn(T, H, generator=gen).to(device, torch.bfloat16)
    x[1, 5] = float("nan")
    ids, w = run_kernel(kernels, router, x)
    check((ids, w), reference(router, x))
    assert ids[1].tolist() == list(range(K)) and w[1].isnan().all()
    assert not w[[0, 2]].isnan().any()
    router.weight.data[40, 3] = float("nan")
    ids, w = run_kernel(kernels, router, x)
    check((ids, w), reference(router, x))
    assert ids.tolist() == [list(range(K))] * T and w.isnan().all()


@pytest.mark.parametrize("n", [1, 3])
def test_fewer_active_experts(kernels, device, gen, monkeypatch, n):
    """Through SoftmaxTopKRouter.forward: padding id E with weight 0 past the n kept places,
    renormalised over the kept ones, then scaled."""
    monkeypatch.setattr(router_mod, "uses_router_kernel", lambda x, spec: True)
    spec = RouterSpec("softmax_topk", 60, 33, 6, norm_topk_prob=True, routed_scaling_factor=1.5, fp32_logits=False)
    router = make_router(spec, torch.bfloat16, device, gen)
    router.set_active_top_k(n)
    x = torch.randn(2, 3, 33, generator=gen).to(device, torch.bfloat16)  # [B, S, H] as the MoE block passes it
    got = router(x)
    check(got, reference(router, x))
    assert (got[0][:, n:] == 60).all() and (got[1][:, n:] == 0).all()
    torch.testing.assert_close(got[1].sum(-1), torch.full((6,), 1.5, device=device), rtol=1e-6, atol=0)


def test_opcheck(kernels, device, gen):
    router = make_router(RouterSpec("softmax_topk", 8, 19, 2, norm_topk_prob=True, fp32_logits=False),
                         torch.bfloat16, device, gen)
    x = torch.randn(3, 19, generator=gen).to(device, torch.bfloat16)
    args = (x, router.weight, None, router.kernel_counter, 2, 2, True, 1.0, False, 1, 1)
    torch.library.opcheck(kernels.router_topk, args)


def test_kernel_choice_traces_without_graph_breaks():
    """The path choice is traced by torch.compile on every call of a compiled router: shapes and
    device only (the GPU run of an earlier version broke the graph on importlib's find_spec)."""
    spec = RouterSpec("softmax_topk", 64, 8, 6)

    def pick(x):
        return x + 1 if uses_router_kernel(x, spec) else x - 1

    compiled = torch.compile(pick, fullgraph=True, backend="eager")
    assert torch.equal(compiled(torch.zeros(3, 8)), torch.full((3, 8), -1.0))
    assert build_router(spec).kernel_ready  # triton is installed here: the counter exists
    assert not build_router(RouterSpec("group_limited", 64, 8, 6, n_group=8, topk_group=2)).kernel_ready


def test_compiles_without_graph_breaks(kernels, device, gen, monkeypatch):
    monkeypatch.setattr(router_mod, "uses_router_kernel", lambda x, spec: True)
    router = make_router(RouterSpec("softmax_topk", 64, 35, 6, routed_scaling_factor=2.0), torch.bfloat16, device, gen)
    x = torch.randn(3, 35, generator=gen).to(device, torch.bfloat16)
    compiled = torch.compile(router, fullgraph=True, backend="eager")
    check(compiled(x), reference(router, x))


NOAUX_SPECS = [  # (E, H, K, n_group, topk_group): groups of 8, of 1, none; E not a power of two
    (64, 37, 6, 8, 3),
    (16, 21, 4, 16, 4),
    (60, 33, 8, 1, 1),
    (32, 67, 2, 4, 2),
]


@pytest.mark.parametrize("E, H, K, n_group, topk_group", NOAUX_SPECS)
@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("renorm", [False, True])
def test_noaux_tc_matches_router(kernels, device, gen, E, H, K, n_group, topk_group, T, renorm):
    spec = RouterSpec("noaux_tc", E, H, K, norm_topk_prob=renorm, n_group=n_group, topk_group=topk_group,
                      routed_scaling_factor=2.5)
    router = make_router(spec, torch.bfloat16, device, gen)
    x = torch.randn(T, H, generator=gen).to(device, torch.bfloat16)
    check(run_kernel(kernels, router, x), reference(router, x))


def test_noaux_tc_ties_and_nan(kernels, device, gen):
    """Integer-valued inputs and no bias: experts and groups tie everywhere; then a NaN logit
    (noaux_tc's sigmoid keeps it to its expert, which is chosen first, with its group)."""
    E, H, K, T = 32, 5, 4, 16
    router = build_router(RouterSpec("noaux_tc", E, H, K, norm_topk_prob=True, n_group=8, topk_group=2),
                          device=device, dtype=torch.bfloat16)
    router.weight.data.copy_(torch.randint(-1, 2, (E, H), generator=gen))
    x = torch.randint(-1, 2, (T, H), generator=gen).to(device, torch.bfloat16)
    check(run_kernel(kernels, router, x), reference(router, x))
    router.weight.data[21, 2] = float("nan")
    x[:, 2] = 1.0
    ids, w = run_kernel(kernels, router, x)
    check((ids, w), reference(router, x))
    assert (ids[:, 0] == 21).all() and w[:, 0].isnan().all()


# --- on the GPU ---------------------------------------------------------------------------

GPU_SPECS = {
    "qwen3-30b-a3b": (RouterSpec("softmax_topk", 128, 2048, 8, norm_topk_prob=True, fp32_logits=False), torch.bfloat16),
    "deepseek-v2-lite": (RouterSpec("softmax_topk", 64, 2048, 6, routed_scaling_factor=1.0), torch.bfloat16),
    "mixtral": (RouterSpec("softmax_topk", 8, 4096, 2, norm_topk_prob=True, fp32_logits=False), torch.bfloat16),
    "qwen2-57b-fp32": (RouterSpec("softmax_topk", 64, 3584, 8, fp32_logits=False), torch.float32),
    "deepseek-v3": (RouterSpec("noaux_tc", 256, 7168, 8, norm_topk_prob=True, n_group=8, topk_group=4,
                               routed_scaling_factor=2.5), torch.bfloat16),
}


def dyadic_inputs(router, T: int, gen: torch.Generator) -> torch.Tensor:
    """Router weight and x [T, H] of multiples of 2^-9 and 2^-4: every product and partial sum
    of the logits is exact in fp32, so cuBLAS and the kernel get the same logits whatever
    their summation order (the scores then tie often in bf16)."""
    E, H = router.spec.num_experts, router.spec.hidden_size
    w = torch.round(torch.randn(E, H, generator=gen) * H ** -0.5 * 512) / 512
    router.weight.data.copy_(w)
    x = torch.round(torch.randn(T, H, generator=gen) * 16) / 16
    return x.to(router.weight.device, router.weight.dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("model", list(GPU_SPECS))
@pytest.mark.parametrize("T", [1, 5, 16])
def test_gpu_kernel_matches_router(kernels, gen, model, T):
    spec, dtype = GPU_SPECS[model]
    router = make_router(spec, dtype, "cuda", gen)
    x = dyadic_inputs(router, T, gen)
    got = router(x)  # the kernel: CUDA, T <= 16
    check(got, reference(router, x))
    check(got, run_kernel(kernels, router, x))


@pytest.mark.cuda
def test_gpu_kernel_on_normal_inputs(kernels, gen):
    """Normal x and W at the Qwen3 shape (bf16 logits): cuBLAS sums in another order, so a
    logit can round to the next bf16 value (a midpoint within the fp32 error: ~1 in 2000
    logits). Every chosen expert must then be a top-k expert of the torch path's scores
    within that one-ulp change (3 %), and the weights agree to 3 % where the ids agree."""
    spec, dtype = GPU_SPECS["qwen3-30b-a3b"]
    router = make_router(spec, dtype, "cuda", gen)
    x = torch.randn(16, spec.hidden_size, generator=gen).to("cuda", dtype)
    ids, w = router(x)
    ref_ids, ref_w = reference(router, x)
    scores = router.scores(router.logits(x))  # [T, E] the torch path's
    kth = scores.gather(1, ref_ids.long())[:, -1:]  # [T, 1]
    assert (scores.gather(1, ids.long()) >= kth * 0.97).all()
    same = ids == ref_ids
    assert same.float().mean() >= 0.9
    torch.testing.assert_close(w[same], ref_w[same], rtol=3e-2, atol=0)


@pytest.mark.cuda
def test_gpu_graph_capture_and_replay(kernels, gen):
    """Two routers (two counters) called three times in one graph; each replay on new inputs
    gives what eager calls give."""
    spec, dtype = GPU_SPECS["qwen3-30b-a3b"]
    routers = [make_router(spec, dtype, "cuda", gen) for _ in range(2)]
    x = torch.zeros(4, spec.hidden_size, device="cuda", dtype=dtype)
    for r in routers:
        dyadic_inputs(r, 1, gen)
    for r in routers:
        r(x)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [r(x) for r in (routers[0], routers[1], routers[0])]
    for _ in range(3):
        x.copy_(torch.round(torch.randn(x.shape, generator=gen) * 16) / 16)
        graph.replay()
        torch.cuda.synchronize()
        for r, got in zip((routers[0], routers[1], routers[0]), outs):
            check(got, reference(r, x))
            assert int(r.kernel_counter[0]) == 0


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 16])
def test_gpu_inductor(kernels, gen, T):
    """torch.compile(fullgraph=True) (inductor) runs the same kernel: the same output bit for
    bit as eager, and the experts of the torch path."""
    torch._dynamo.reset()
    spec, dtype = GPU_SPECS["qwen3-30b-a3b"]
    router = make_router(spec, dtype, "cuda", gen)
    x = dyadic_inputs(router, T, gen)
    compiled = torch.compile(router, fullgraph=True)
    got = compiled(x)
    eager = router(x)
    assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
    check(got, reference(router, x))
