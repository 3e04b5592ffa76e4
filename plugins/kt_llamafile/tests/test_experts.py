"""LlamafileExperts against the torch reference (TorchExperts on the dequantised weights) and
against an emulation of its own activation quantisation (tight), for GGUF and dense sources,
owned subsets, repeated and padding ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_llamafile import _lib
from kt_llamafile.experts import LlamafileExperts
from kt_llamafile.random_blocks import random_weight
from kt_llamafile.testing import assert_experts_emulated
from ktcore.ops.experts import ExpertsSpec, TorchExperts
from ktcore.ops.weights import GGUFWeight

E, H, I, TOPK = 8, 512, 256, 3
#: relative Frobenius error against TorchExperts (x and act(gate)*up both rounded to 8 bits)
TORCH_TOL = {"Q4_K": 3e-2, "Q8_0": 2e-2, "Q6_K": 3e-2, "Q5_0": 2e-2, "Q2_K": 3e-2, "F16": 1e-5}

def _stacked(qtype: str, rows: int, k: int, rng) -> GGUFWeight:
    data = torch.from_numpy(random_weight(qtype, E * rows, k, rng)).reshape(E, rows, -1)
    return GGUFWeight(data, qtype, (E, rows, k))


def _layer(types: tuple[str, str, str], seed: int = 0) -> dict[str, GGUFWeight]:
    rng = np.random.default_rng(seed)
    return {"gate": _stacked(types[0], I, H, rng), "up": _stacked(types[1], I, H, rng),
            "down": _stacked(types[2], H, I, rng)}


def _routing(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E + 1, generator=g)[:TOPK] for _ in range(tokens)]).to(torch.int32)
    if tokens > 1:
        ids[1, 1] = ids[1, 0]  # the same expert twice: counts twice
    return ids, torch.rand(tokens, TOPK, generator=g)


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q8_0"), ("Q5_0", "Q5_0", "Q2_K"),
                                   ("Q4_K", "Q8_0", "F16")])
@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("owned", [None, (1, 3, 4, 7)])
def test_gguf_experts(types, tokens, owned):
    layer = _layer(types, seed=tokens)
    spec = ExpertsSpec(E, H, I, TOPK, owned=owned)
    ours = LlamafileExperts(spec, "cpu", {"threads": 2})
    ours.load_weights(layer)
    assert all(ours.zero_copy.values())  # the GGUF blocks are used in place
    ref = TorchExperts(spec)
    ref.load_weights(layer)
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(tokens))
    ids, tw = _routing(tokens, tokens)
    y = ours(x, ids, tw)
    y_ref = ref(x, ids, tw)
    err = (torch.linalg.norm(y - y_ref) / torch.linalg.norm(y_ref)).item()
    assert err <= max(TORCH_TOL[t] for t in types), err
    assert_experts_emulated(y, x, ids, tw, layer, spec)


def test_dense_sources_match_the_reference_closely():
    g = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(E, I, H, generator=g) / H**0.5, "up": torch.randn(E, I, H, generator=g) / H**0.5,
               "down": torch.randn(E, H, I, generator=g) / I**0.5}
    for owned in (None, (0, 2, 5)):
        spec = ExpertsSpec(E, H, I, TOPK, owned=owned)
        ours, ref = LlamafileExperts(spec, "cpu", {"threads": 2}), TorchExperts(spec)
        ours.load_weights(weights)
        ref.load_weights(weights)
        x = torch.randn(5, H, generator=g)
        ids, tw = _routing(5, 1)
        torch.testing.assert_close(ours(x, ids, tw), ref(x, ids, tw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_other_activations(activation):
    layer = _layer(("F16", "F16", "F16"), seed=3)
    spec = ExpertsSpec(E, H, I, TOPK, activation=activation)
    ours, ref = LlamafileExperts(spec, "cpu", {"threads": 1}), TorchExperts(spec)
    ours.load_weights(layer)
    ref.load_weights(layer)
    x = torch.randn(4, H)
    ids, tw = _routing(4, 2)
    y, y_ref = ours(x, ids, tw), ref(x, ids, tw)
    torch.testing.assert_close(y, y_ref, rtol=TORCH_TOL["F16"], atol=TORCH_TOL["F16"] * y_ref.abs().max().item())


def test_unowned_and_padding_ids_add_zero_and_bf16_input():
    layer = _layer(("Q4_K", "Q4_K", "Q4_K"), seed=4)
    spec = ExpertsSpec(E, H, I, TOPK, owned=(2,))
    ours = LlamafileExperts(spec, "cpu", {})
    ours.load_weights(layer)
    x = torch.randn(3, H).bfloat16()
    ids = torch.tensor([[0, 1, 8], [8, 8, 8], [2, 3, 8]], dtype=torch.int64)
    y = ours(x, ids, torch.ones(3, TOPK))
    assert y.dtype == torch.bfloat16
    assert not y[:2].any() and y[2].abs().sum() > 0


def test_out_of_range_ids_raise():
    layer = _layer(("Q8_0", "Q8_0", "Q8_0"), seed=5)
    ours = LlamafileExperts(ExpertsSpec(E, H, I, TOPK), "cpu", {})
    ours.load_weights(layer)
    with pytest.raises(IndexError):
        ours(torch.randn(1, H), torch.tensor([[0, 1, E + 1]], dtype=torch.int32), torch.ones(1, TOPK))


def test_opcheck_experts():
    layer = _layer(("Q4_0", "Q4_0", "Q8_0"), seed=6)
    ours = LlamafileExperts(ExpertsSpec(E, H, I, TOPK, owned=(0, 1, 2, 3)), "cpu", {"threads": 1})
    ours.load_weights(layer)
    ids, tw = _routing(3, 3)
    args = (torch.randn(3, H), ids, tw, ours.rows["gate"], ours.rows["up"], ours.rows["down"], ours.slot_of,
            [2, 2, 8], I, 0, 1)
    torch.library.opcheck(torch.ops.kt_llamafile.experts, args)
