"""TorchExperts against transformers' experts modules and a float64 loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ktcore.errors import BackendError, WeightError
from ktcore.ops.experts import ExpertsSpec, TorchExperts, activation_fn, canonical_activation
from ktcore.ops.weights import GGUFWeight

# (atol, rtol) of TorchExperts vs transformers, per activation/weight dtype. bf16: transformers
# accumulates the experts of a token in bf16, we accumulate in fp32.
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}

SHAPES = [(64, 48), (72, 40)]  # (H, I): ordinary, odd
TOKENS = [1, 3, 16, 129]


def random_weights(E: int, H: int, I: int, dtype=torch.float32):
    """gate/up [E, I, H], down [E, H, I], scaled so activations stay O(1)."""
    gate = torch.randn(E, I, H) * H**-0.5
    up = torch.randn(E, I, H) * H**-0.5
    down = torch.randn(E, H, I) * I**-0.5
    return gate.to(dtype), up.to(dtype), down.to(dtype)


def random_routing(T: int, E: int, K: int, id_dtype=torch.int64):
    ids = torch.rand(T, E).topk(K, dim=-1).indices.to(id_dtype)  # distinct per token
    weights = torch.rand(T, K).softmax(dim=-1)
    return ids, weights


def make_experts(gate, up, down, K, owned=None, activation="silu", options=None) -> TorchExperts:
    E, I, H = gate.shape
    spec = ExpertsSpec(E, H, I, K, activation=activation, owned=owned)
    experts = TorchExperts(spec, "cpu", options)
    experts.load_weights({"gate": gate, "up": up, "down": down})
    return experts


def loop_reference(x, ids, weights, gate, up, down, activation="silu", owned=None):
    """float64, one (token, k) pair at a time; id E and experts not owned add nothing."""
    act = activation_fn(activation)
    E = gate.shape[0]
    x, gate, up, down = (t.double() for t in (x, gate, up, down))
    y = torch.zeros_like(x)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e == E or (owned is not None and e not in owned):
                continue
            h = act(gate[e] @ x[t]) * (up[e] @ x[t])
            y[t] += float(weights[t, k]) * (down[e] @ h)
    return y


def hf_experts(kind: str, E: int, H: int, I: int, hidden_act: str = "silu"):
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls

        config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, hidden_act=hidden_act,
                                 experts_implementation="eager")
    elif kind == "mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as cls

        config = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, hidden_act=hidden_act,
                               experts_implementation="eager")
    else:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts as cls

        config = DeepseekV3Config(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, hidden_act=hidden_act,
                                  experts_implementation="eager")
    return cls(config)


def load_hf(module, gate, up, down):
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.cat([gate, up], dim=1))  # [E, 2I, H], gate rows first
        module.down_proj.copy_(down)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("H,I", SHAPES)
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers(kind, H, I, T, dtype):
    torch.manual_seed(0)
    E, K = 8, 2
    gate, up, down = random_weights(E, H, I, dtype)
    hf = hf_experts(kind, E, H, I).to(dtype)
    load_hf(hf, gate, up, down)
    ours = make_experts(gate, up, down, K)
    x = torch.randn(T, H, dtype=dtype)
    ids, weights = random_routing(T, E, K)
    with torch.no_grad():
        expected = hf(x, ids, weights.to(dtype))
    got = ours(x, ids.to(torch.int32), weights)
    assert got.dtype == dtype and got.shape == (T, H)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("hidden_act", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
def test_activations_match_transformers(hidden_act):
    torch.manual_seed(1)
    E, H, I, K, T = 6, 64, 48, 3, 9
    gate, up, down = random_weights(E, H, I)
    hf = hf_experts("qwen3_moe", E, H, I, hidden_act)
    load_hf(hf, gate, up, down)
    ours = make_experts(gate, up, down, K, activation=hidden_act)
    x = torch.randn(T, H)
    ids, weights = random_routing(T, E, K)
    with torch.no_grad():
        expected = hf(x, ids, weights)
    torch.testing.assert_close(ours(x, ids, weights), expected, **dict(zip(("atol", "rtol"), TOL[torch.float32])))


@pytest.mark.parametrize("T,K", [(1, 1), (3, 2), (16, 4), (129, 2), (40, 8)])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_gather_and_grouped_paths_agree_with_loop(T, K, id_dtype):
    torch.manual_seed(2)
    E, H, I = 8, 72, 40
    gate, up, down = random_weights(E, H, I)
    experts = make_experts(gate, up, down, K)
    x = torch.randn(T, H)
    ids, weights = random_routing(T, E, K, id_dtype)
    expected = loop_reference(x, ids, weights, gate, up, down).float()
    for path in (experts.forward_gather, experts.forward_grouped, experts.forward):
        torch.testing.assert_close(path(x, ids, weights), expected, atol=2e-5, rtol=1e-4)


def test_repeated_ids_count_twice():
    torch.manual_seed(3)
    E, H, I, K, T = 4, 64, 48, 3, 5
    gate, up, down = random_weights(E, H, I)
    experts = make_experts(gate, up, down, K)
    x = torch.randn(T, H)
    ids = torch.tensor([[1, 1, 2], [0, 0, 0], [3, 2, 3], [2, 1, 0], [1, 1, 1]], dtype=torch.int32)
    weights = torch.rand(T, K)
    expected = loop_reference(x, ids, weights, gate, up, down).float()
    torch.testing.assert_close(experts.forward_gather(x, ids, weights), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(experts.forward_grouped(x, ids, weights), expected, atol=2e-5, rtol=1e-4)
    hf = hf_experts("qwen3_moe", E, H, I)  # transformers counts repeats twice as well
    load_hf(hf, gate, up, down)
    with torch.no_grad():
        torch.testing.assert_close(hf(x, ids.long(), weights), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("T", [2, 129])
def test_owned_parts_add_up(T):
    torch.manual_seed(4)
    E, H, I, K = 8, 72, 40, 3
    gate, up, down = random_weights(E, H, I)
    full = make_experts(gate, up, down, K)
    part_a = make_experts(gate, up, down, K, owned=(0, 2, 3, 7))
    part_b = make_experts(gate, up, down, K, owned=(1, 4, 5, 6))
    assert part_a.gate_up.shape == (4, 2 * I, H) and part_a.down.shape == (4, H, I)
    x = torch.randn(T, H)
    ids, weights = random_routing(T, E, K)
    expected = loop_reference(x, ids, weights, gate, up, down, owned=(0, 2, 3, 7)).float()
    torch.testing.assert_close(part_a(x, ids, weights), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(part_a(x, ids, weights) + part_b(x, ids, weights), full(x, ids, weights),
                               atol=2e-5, rtol=1e-4)


def test_not_owned_and_padding_ids_add_exactly_zero():
    torch.manual_seed(5)
    E, H, I, K, T = 8, 64, 48, 2, 70  # T * K > 64: both paths are exercised below
    gate, up, down = random_weights(E, H, I)
    experts = make_experts(gate, up, down, K, owned=(2, 5))
    x = torch.randn(T, H) * 1e4
    ids = torch.tensor([[0, 8], [7, 1]], dtype=torch.int32).repeat(T // 2, 1)  # 8 == E: padding
    weights = torch.full((T, K), float("nan"))  # weights of pairs that add nothing are ignored
    for path in (experts.forward_gather, experts.forward_grouped):
        assert torch.equal(path(x, ids, weights), torch.zeros(T, H))
    assert experts.spec.owned_mask().tolist() == [e in (2, 5) for e in range(E)]


def test_gguf_sources_of_owned_experts():
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    torch.manual_seed(6)
    E, H, I, K, T = 4, 64, 32, 2, 6  # Q8_0 rows need multiples of 32
    dense = random_weights(E, H, I)
    sources, dequantised = {}, []
    for name, t in zip(("gate", "up", "down"), dense):
        blocks = quantize(t.numpy(), GGMLQuantizationType.Q8_0)
        source = GGUFWeight(torch.from_numpy(np.ascontiguousarray(blocks)), "Q8_0", tuple(t.shape), name)
        sources[name] = source
        dequantised.append(source.to_dense())
    experts = TorchExperts(ExpertsSpec(E, H, I, K, owned=(1, 3)), "cpu")
    experts.load_weights(sources)
    assert experts.gate_up.dtype == torch.float32
    x = torch.randn(T, H)
    ids, weights = random_routing(T, E, K)
    expected = loop_reference(x, ids, weights, *dequantised, owned=(1, 3)).float()
    torch.testing.assert_close(experts(x, ids, weights), expected, atol=2e-5, rtol=1e-4)


def test_dtype_option_and_input_dtype():
    torch.manual_seed(7)
    E, H, I, K, T = 4, 64, 48, 2, 3
    gate, up, down = random_weights(E, H, I)
    experts = make_experts(gate, up, down, K, options={"dtype": "bf16"})
    assert experts.gate_up.dtype == torch.bfloat16
    x = torch.randn(T, H)
    ids, weights = random_routing(T, E, K)
    y = experts(x, ids, weights)
    assert y.dtype == torch.float32
    expected = loop_reference(x, ids, weights, gate, up, down).float()
    torch.testing.assert_close(y, expected, atol=3e-2, rtol=3e-2)


def test_compiles_without_graph_breaks():
    torch.manual_seed(8)
    E, H, I, K = 8, 64, 48, 2
    gate, up, down = random_weights(E, H, I)
    experts = make_experts(gate, up, down, K, owned=(0, 1, 2, 5))
    compiled = torch.compile(experts, fullgraph=True, backend="eager", dynamic=False)
    for T in (2, 40):  # 40 * 2 > gather_max_pairs: still the capture-safe path when compiling
        x = torch.randn(T, H)
        ids, weights = random_routing(T, E, K, torch.int32)
        torch.testing.assert_close(compiled(x, ids, weights), experts.forward_grouped(x, ids, weights),
                                   atol=2e-5, rtol=1e-4)


def test_gather_chunks_bound_memory(monkeypatch):
    torch.manual_seed(9)
    E, H, I, K, T = 4, 64, 48, 2, 5
    gate, up, down = random_weights(E, H, I)
    experts = make_experts(gate, up, down, K)
    x = torch.randn(T, H)
    ids, weights = random_routing(T, E, K)
    expected = experts.forward_gather(x, ids, weights)
    monkeypatch.setattr(TorchExperts, "gather_chunk_bytes", 3 * I * H * 4 * 3)  # 3 pairs per step
    torch.testing.assert_close(experts.forward_gather(x, ids, weights), expected, atol=1e-6, rtol=1e-6)


def test_weight_errors():
    E, H, I, K = 4, 64, 48, 2
    gate, up, down = random_weights(E, H, I)
    spec = ExpertsSpec(E, H, I, K)
    with pytest.raises(WeightError, match="missing"):
        TorchExperts(spec).load_weights({"gate": gate, "up": up})
    with pytest.raises(WeightError, match="shape"):
        TorchExperts(spec).load_weights({"gate": gate, "up": up, "down": down.transpose(1, 2)})
    with pytest.raises(WeightError, match="shape"):
        TorchExperts(spec).load_weights({"gate": gate[:3], "up": up, "down": down})
    with pytest.raises(WeightError, match="unexpected"):
        TorchExperts(spec).load_weights({"gate": gate, "up": up, "down": down, "bias": down})


def test_option_errors():
    spec = ExpertsSpec(4, 64, 48, 2)
    with pytest.raises(BackendError, match="dtype"):
        TorchExperts(spec, "cpu", {"dtype": "int4"})
    with pytest.raises(BackendError, match="unknown option"):
        TorchExperts(spec, "cpu", {"fromat": "int4"})


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(owned=(3, 1)), "sorted"),
        (dict(owned=(1, 1)), "sorted"),
        (dict(owned=(0, 4)), "not experts"),
        (dict(owned=()), "empty"),
        (dict(owned=(True,)), "not experts"),
        (dict(activation="swiglu"), "activation"),
        (dict(top_k=5), "top_k"),
        (dict(hidden_size=0), "hidden_size"),
    ],
)
def test_spec_validation(kwargs, message):
    args = dict(num_experts=4, hidden_size=64, intermediate_size=48, top_k=2) | kwargs
    with pytest.raises(ValueError, match=message):
        ExpertsSpec(**args)


def test_spec_normalises_activation_and_owned():
    spec = ExpertsSpec(4, 64, 48, 2, activation="gelu_pytorch_tanh", owned=[0, 3])
    assert spec.activation == "gelu_tanh" and spec.owned == (0, 3) and spec.num_owned == 2
    assert spec == ExpertsSpec(4, 64, 48, 2, activation="gelu_tanh", owned=(0, 3))
    assert canonical_activation("swish") == "silu"
    x = torch.randn(10)
    torch.testing.assert_close(activation_fn("gelu_new")(x), F.gelu(x, approximate="tanh"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype")
def test_router_and_experts_capture_in_a_cuda_graph():
    from ktcore.ops.router import RouterSpec, build_router

    torch.manual_seed(10)
    E, H, I, K, T = 16, 64, 48, 4, 40  # T * K > gather_max_pairs: capture still takes the gather path
    gate, up, down = random_weights(E, H, I)
    experts = TorchExperts(ExpertsSpec(E, H, I, K, owned=tuple(range(0, E, 2))), "cuda")
    experts.load_weights({"gate": gate, "up": up, "down": down})
    router = build_router(RouterSpec("noaux_tc", E, H, K, norm_topk_prob=True, n_group=4, topk_group=2,
                                     routed_scaling_factor=2.5), device="cuda")
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(0, 0.1)

    def step(x):
        ids, weights = router(x)
        return experts(x, ids, weights)

    static_x = torch.randn(T, H, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static_x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step(static_x)
    for _ in range(2):
        x = torch.randn(T, H, device="cuda")
        static_x.copy_(x)
        graph.replay()
        ids, weights = router(x)
        torch.testing.assert_close(static_y, experts.forward_grouped(x, ids, weights), atol=1e-4, rtol=1e-4)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the decode path raises
    try:
        experts.forward_gather(static_x, *router(static_x))
    finally:
        torch.cuda.set_sync_debug_mode("default")
