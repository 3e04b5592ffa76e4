"""The one-phase decode path (moe.c: up to KT_AMX_DECODE_TOKENS tokens, default 4) against the
six-phase path (KT_AMX_DECODE_TOKENS=0) and the exact reference, on the vector ISAs of this host.

Both paths quantise the same way, run the same kernels per row and sum each token's pairs with
the same reduce, so their outputs are equal bit for bit: a token's output does not depend on
how many tokens share its forward (decode against prefill).
"""

from __future__ import annotations

import pytest
import torch

from kt_amx import _lib, reference
from kt_amx.experts import AmxExperts
from ktcore.ops.experts import ExpertsSpec

from .test_parity import FORMATS, need_isa, random_layer, rel

E, K = 8, 4


def build(weights, options, owned=None) -> AmxExperts:
    H, I = weights["gate"].shape[2], weights["gate"].shape[1]
    amx = AmxExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", options)
    amx.load_weights(weights)
    return amx


def routing(T: int, seed: int):
    """Repeats inside a top-k, the padding id E, and (T > 2) a token with only padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=gen)
    ids[0, 1] = ids[0, 0]
    if T > 1:
        ids[1, -1] = E
    if T > 2:
        ids[2, :] = E
    return ids, torch.rand(T, K, generator=gen)


def both_paths(monkeypatch, weights, options, x, ids, w, isa, owned=None):
    """(one-phase, six-phase) outputs: the path is chosen when the layer is created."""
    outs = []
    for tokens in ("4", "0"):
        monkeypatch.setenv("KT_AMX_DECODE_TOKENS", tokens)
        amx = build(weights, options, owned)
        with _lib.use_isa(isa):
            outs.append(amx(x, ids, w))
    return outs, amx


@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_one_phase_matches_phases(monkeypatch, isa, fmt, T):
    need_isa(isa)
    options, (H, I), (tol_exact, _, _) = FORMATS[fmt]
    weights = random_layer(H, I, seed=10 + T)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    ids, w = routing(T, seed=T)
    (one, six), amx = both_paths(monkeypatch, weights, options, x, ids, w, isa)
    assert torch.isfinite(one).all()
    assert torch.equal(one, six)
    assert rel(one, reference.forward(amx, x, ids, w, isa)) < tol_exact
    if T > 2:  # a token routed only to the padding id gets zeros
        assert one[2].abs().max() == 0


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_one_phase_bf16_and_owned_subset(monkeypatch, isa):
    need_isa(isa)
    options, (H, I), _ = FORMATS["int4-g32"]
    weights = random_layer(H, I, seed=3)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    ids, w = routing(3, seed=5)
    owned = tuple(range(0, E, 2))
    (one, six), _ = both_paths(monkeypatch, weights, options, x, ids, w, isa, owned=owned)
    assert one.dtype == torch.bfloat16 and torch.equal(one, six)


def test_one_phase_rejects_bad_ids(monkeypatch):
    options, (H, I), _ = FORMATS["int8-g32"]
    monkeypatch.setenv("KT_AMX_DECODE_TOKENS", "4")
    amx = build(random_layer(H, I, seed=6), options)
    ids = torch.zeros(1, K, dtype=torch.int64)
    ids[0, 2] = E + 3
    with pytest.raises(IndexError, match="topk_ids"):
        amx(torch.randn(1, H), ids, torch.rand(1, K))
