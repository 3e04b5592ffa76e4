"""The routers' decode top-k (``small_topk``, ranks by comparisons) against ``torch.topk``.

On this CPU the routers take ``torch.topk`` (``uses_small_topk`` is True only while compiling
for CUDA), so the tests force a path by patching ``uses_small_topk``: ``small`` ranks wherever
``small_topk_is_cheap``, ``topk`` always calls ``torch.topk``.
"""

from __future__ import annotations

import pytest
import torch

from ktcore.ops import router as router_mod
from ktcore.ops.router import (
    RouterSpec,
    build_router,
    expert_rank,
    small_topk,
    small_topk_is_cheap,
    topk_experts,
    uses_small_topk,
)
from tests.ops import test_router as ref

PATHS = {"small": small_topk_is_cheap, "topk": lambda scores: False}

# Routers of real sizes (DeepSeek-V3: 256 experts in 8 groups; DeepSeek-V2-Lite: 64; Qwen: 60, 128).
SPECS = [
    RouterSpec("softmax_topk", 60, 32, 4),
    RouterSpec("softmax_topk", 128, 32, 8, norm_topk_prob=True),
    RouterSpec("group_limited", 64, 32, 6, n_group=8, topk_group=3, routed_scaling_factor=2.0),
    RouterSpec("group_limited", 160, 32, 6, n_group=8, topk_group=8),
    RouterSpec("noaux_tc", 256, 32, 8, norm_topk_prob=True, n_group=8, topk_group=4, routed_scaling_factor=2.5),
    RouterSpec("noaux_tc", 64, 32, 6, n_group=1, topk_group=1),
]


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    monkeypatch.setattr(router_mod, "uses_small_topk", PATHS[request.param])
    return request.param


def distinct_scores(T: int, E: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """``[T, E]`` scores without ties: fp32 normal draws, or a permutation of integers (exact in bf16)."""
    if dtype == torch.float32:
        scores = torch.randn(T, E, generator=generator)
    else:
        scores = torch.stack([torch.randperm(E, generator=generator) for _ in range(T)]).to(dtype) - E // 2
    assert all(row.unique().numel() == E for row in scores)
    return scores


def stable_reference(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest first, equal scores lower index first, NaN first: a stable descending sort."""
    values, ids = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], ids[..., :k]


@pytest.mark.parametrize("E", [8, 60, 64, 128, 256])
@pytest.mark.parametrize("K", [1, 2, 6, 8])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_topk_equals_torch_topk(E, K, T, dtype):
    generator = torch.Generator().manual_seed(1000 * E + 10 * K + T)
    for scores in (distinct_scores(T, E, dtype, generator), distinct_scores(T, E, dtype, generator).float().softmax(-1)):
        values, ids = small_topk(scores, K)
        want_values, want_ids = torch.topk(scores, K, dim=-1)
        assert ids.dtype == torch.int64 and values.dtype == scores.dtype and ids.shape == (T, K)
        assert torch.equal(ids, want_ids) and torch.equal(values, want_values)
    assert small_topk_is_cheap(scores)  # every decode shape here is on the small path


def test_small_topk_on_leading_dims():
    scores = torch.randn(5, 8, 32, generator=torch.Generator().manual_seed(7))  # [T, G, E/G]
    values, ids = small_topk(scores, 2)
    want_values, want_ids = torch.topk(scores, 2, dim=-1)
    assert torch.equal(ids, want_ids) and torch.equal(values, want_values)


def test_ties_go_to_the_lower_expert_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 1.0, 2.0, 0.0], [0.0, -0.0, 0.0, -0.0, 3.0, 3.0]])
    values, ids = small_topk(scores, 5)
    assert ids.tolist() == [[1, 2, 4, 0, 3], [4, 5, 0, 1, 2]]
    assert torch.equal(values, torch.topk(scores, 5).values)  # ties change the order of ids only
    assert expert_rank(scores).tolist() == [[3, 0, 1, 4, 2, 5], [2, 3, 4, 5, 0, 1]]
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (8, 64), generator=generator).float()  # many ties
    for k in (1, 6, 8, 64):
        values, ids = small_topk(scores, k)
        want_values, want_ids = stable_reference(scores, k)
        assert torch.equal(ids, want_ids) and torch.equal(values, want_values)
    assert torch.equal(expert_rank(scores).sort(-1).values, torch.arange(64).expand(8, 64))  # a permutation


def test_nan_scores_come_first_and_do_not_crash():
    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[1.0, nan, inf, nan, 2.0, -inf, 0.5, nan], [nan] * 8, [-inf] * 8])
    values, ids = small_topk(scores, 8)
    assert ids.tolist() == [[1, 3, 7, 2, 4, 0, 6, 5], list(range(8)), list(range(8))]
    want = torch.topk(scores, 8).values  # torch.topk also puts NaN first
    assert torch.equal(values.isnan(), want.isnan()) and torch.equal(values.nan_to_num(), want.nan_to_num())
    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(8, 64, generator=generator)
    scores[torch.rand(8, 64, generator=generator) < 0.1] = nan
    values, ids = small_topk(scores, 8)
    want_values, want_ids = stable_reference(scores, 8)
    assert torch.equal(ids, want_ids) and torch.equal(values.nan_to_num(), want_values.nan_to_num())


@pytest.mark.parametrize("kind", ["softmax_topk", "group_limited", "noaux_tc"])
def test_routers_with_nan_input_choose_valid_experts(kind, path):
    spec = RouterSpec(kind, 64, 32, 6, n_group=8, topk_group=2)
    router = ref.randomise(build_router(spec))
    x = torch.randn(3, 32)
    x[1] = float("nan")
    ids, weights = router(x)
    assert ids.shape == (3, 6) and torch.all((ids >= 0) & (ids < 64))
    assert all(row.unique().numel() == 6 for row in ids)
    assert torch.all(weights[1].isnan()) and not weights[[0, 2]].isnan().any()
    if path == "small":
        assert ids[1].tolist() == list(range(6))


def test_threshold():
    for T, E, small in [(1, 256, True), (8, 256, True), (16, 256, True), (17, 256, False), (64, 128, True),
                        (65, 128, False), (4096, 64, False), (4096, 8, True), (16384, 8, True), (16385, 8, False)]:
        assert small_topk_is_cheap(torch.empty(T, E)) == small, (T, E)
    assert not uses_small_topk(torch.zeros(1, 8))  # eager: torch.topk


def graph_targets(fn, *args) -> set:
    """The ops of ``fn``'s fullgraph trace (no compile of code), and the result run eagerly."""
    seen = set()

    def backend(gm, example_inputs):
        seen.update(node.target for node in gm.graph.nodes)
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    return seen, out


@pytest.mark.parametrize("T,E,small", [(8, 256, True), (2048, 256, False), (300, 8, True)])
def test_threshold_picks_the_path_when_compiling(monkeypatch, T, E, small):
    """Compiling (for CUDA; here the device test is patched out): torch.topk above the threshold."""
    monkeypatch.setattr(router_mod, "uses_small_topk", lambda s: torch.compiler.is_compiling() and small_topk_is_cheap(s))
    scores = torch.randn(T, E, generator=torch.Generator().manual_seed(T))
    targets, (values, ids) = graph_targets(lambda s: topk_experts(s, 8), scores)
    assert (torch.topk in targets) != small
    want_values, want_ids = torch.topk(scores, 8, dim=-1)
    assert torch.equal(ids, want_ids) and torch.equal(values, want_values)
    values, ids = topk_experts(scores, 8)  # eager: torch.topk, the same result
    assert torch.equal(ids, want_ids) and torch.equal(values, want_values)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-E{s.num_experts}-G{s.n_group}")
@pytest.mark.parametrize("T", [1, 5])
def test_routers_small_path_equals_topk_path(monkeypatch, spec, T):
    torch.manual_seed(T)
    router = ref.randomise(build_router(spec))
    x = torch.randn(T, 32)
    results = {}
    for name, rule in PATHS.items():
        monkeypatch.setattr(router_mod, "uses_small_topk", rule)
        results[name] = []
        for n in (spec.top_k, 1):  # all experts, and one (the padding of set_active_top_k)
            router.set_active_top_k(n)
            results[name].append(router(x))
        router.set_active_top_k(None)
    for (ids, weights), (want_ids, want_weights) in zip(results["small"], results["topk"]):
        assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == (T, spec.top_k)
        assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)


@pytest.mark.parametrize("case", list(ref.CASES))
@pytest.mark.parametrize("T", [1, 3, 16, 129])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_matches_transformers_on_both_paths(path, case, T, dtype):
    """test_router's parity test on each path. On the small path the bf16 routers can tie
    (bf16 logits): there an expert may be swapped for one of exactly the same selection score,
    since small_topk takes the lower index and CPU torch.topk an unspecified one."""
    if path == "topk":
        return ref.test_router_matches_transformers(case, T, dtype)
    ours, x, (ids, weights), (hf_ids, hf_weights) = ref.routed_by_both(case, T, dtype)
    selection = ours.scores(ours.logits(x)) + getattr(ours, "e_score_correction_bias", 0.0)  # [T, E]
    ids, weights = ref.by_id(ids, weights)
    hf_ids, hf_weights = ref.by_id(hf_ids, hf_weights)
    same = (ids == hf_ids).all(dim=-1)  # [T]
    swapped = ~same
    if dtype == torch.float32:
        assert same.all()
    assert torch.equal(selection[swapped].gather(1, ids[swapped]).sort(-1).values,
                       selection[swapped].gather(1, hf_ids[swapped]).sort(-1).values)  # only ties swapped
    atol, rtol = ref.TOL[dtype]
    torch.testing.assert_close(weights[same], hf_weights[same], atol=atol, rtol=rtol)
    torch.testing.assert_close(weights[swapped].sort(-1).values, hf_weights[swapped].sort(-1).values,
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", list(ref.CASES))
def test_fewer_experts_per_token_on_both_paths(path, case):
    ref.test_fewer_experts_per_token_equal_a_router_built_with_fewer(case)


def test_inductor_cpu_compiles_small_topk_and_the_routers(monkeypatch):
    """fullgraph Inductor on the CPU: small_topk (random, tied and NaN scores of one shape)
    and the three routers with the small path forced, equal to eager torch.topk."""
    compiled = torch.compile(small_topk, fullgraph=True, dynamic=False)
    generator = torch.Generator().manual_seed(11)
    random = torch.randn(3, 60, generator=generator)
    tied = torch.randint(0, 3, (3, 60), generator=generator).float()
    nans = random.masked_fill(torch.rand(3, 60, generator=generator) < 0.1, float("nan"))
    for scores, want in [(random, torch.topk(random, 6)), (tied, stable_reference(tied, 6)),
                         (nans, stable_reference(nans, 6))]:
        values, ids = compiled(scores, 6)
        assert torch.equal(ids, want[1]) and torch.equal(values.nan_to_num(), want[0].nan_to_num())
        assert torch.equal(values.isnan(), want[0].isnan())

    routers = torch.nn.ModuleList(ref.randomise(build_router(spec)) for spec in (SPECS[0], SPECS[2], SPECS[4]))
    x = torch.randn(5, 32)
    want = [r(x) for r in routers]  # eager: torch.topk
    monkeypatch.setattr(router_mod, "uses_small_topk", small_topk_is_cheap)
    got = torch.compile(lambda x: [r(x) for r in routers], fullgraph=True, dynamic=False)(x)
    for (ids, weights), (want_ids, want_weights) in zip(got, want):
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_weights, atol=1e-7, rtol=1e-6)  # Inductor may reassociate


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", SPECS[1::3], ids=lambda s: f"{s.kind}-E{s.num_experts}")
def test_compiled_cuda_router_pads_the_dropped_places(spec):
    """Compiled for CUDA (small_topk), n of K experts: ids E and weight 0 in the last K - n
    places, as eager. A slice + F.pad formulation once left the compiled ids unpadded, so the
    CPU experts kept running all K."""
    torch.manual_seed(3)
    router = ref.randomise(build_router(spec)).cuda()
    x = torch.randn(1, 32, device="cuda")
    compiled = torch.compile(router, fullgraph=True, dynamic=False)
    for n in (spec.top_k - 2, 1):
        router.set_active_top_k(n)
        ids, weights = compiled(x)
        want_ids, want_weights = router(x)
        assert torch.all(ids[:, n:] == spec.num_experts) and torch.all(weights[:, n:] == 0)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_weights)
    router.set_active_top_k(None)
