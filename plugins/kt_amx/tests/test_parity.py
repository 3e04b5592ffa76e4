"""AmxExperts against the torch references, for every ISA path of this host and every format.

Three comparisons per case (relative Frobenius error ||y - ref|| / ||ref||):

- ``exact``: kt_amx.reference, i.e. the packed weights exactly and the activations rounded the
  way the kernels round them (int8 per group / bf16): catches any layout or indexing error;
- ``dequant``: TorchExperts (fp32) on the dequantised packed weights: the format's weights
  with unrounded activations;
- ``dense``: TorchExperts (fp32) on the original weights: the whole quantisation error.

AMX cases are marked ``amx`` (skipped off AMX hosts by the root conftest).
"""

from __future__ import annotations

import pytest
import torch

from kt_amx import _lib, reference
from kt_amx.experts import AmxExperts
from ktcore.ops.experts import ExpertsSpec, TorchExperts

# format options -> (H, I) multiples of the group with odd quotients, tolerances
# (exact, dequant, dense). Measured here (AVX2/AVX-512, T in 1..129) the worst were: exact
# 4e-7 (3e-4 where fp32 order flips a rounding step of h); dequant 3e-3 (bf16), 1.2e-2..1.7e-2
# (int8 activations); dense 4e-3 (bf16), 2e-2 (int8), 1.6e-1..1.9e-1 (int4: the format's own error).
FORMATS = {
    "bf16": ({"format": "bf16"}, (96, 160), (2e-3, 1e-2, 1e-2)),
    "int8-g32": ({"format": "int8", "group_size": 32}, (96, 160), (2e-3, 3e-2, 4e-2)),
    "int8-channel": ({"format": "int8", "group_size": 0}, (96, 160), (2e-3, 3e-2, 4e-2)),
    "int4-sym-g64": ({"format": "int4", "group_size": 64, "symmetric": True}, (192, 320), (2e-3, 3e-2, 0.25)),
    "int4-g32": ({"format": "int4", "group_size": 32}, (96, 160), (2e-3, 3e-2, 0.25)),
    "int4-g128": ({"format": "int4", "group_size": 128}, (384, 640), (2e-3, 3e-2, 0.25)),
}
TOKENS = [1, 3, 16, 129]
E, K = 8, 4


def isa_params():
    params = []
    for isa in ("avx2", "avx512", "amx"):
        marks = [pytest.mark.amx] if isa == "amx" else []
        params.append(pytest.param(isa, marks=marks, id=isa))
    return params


def need_isa(isa: str) -> None:
    if isa not in _lib.isas_here():
        pytest.skip(f"this host runs {', '.join(_lib.isas_here())}, not {isa}")


def random_layer(H: int, I: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, I, H, generator=gen) * H**-0.5
    up = torch.randn(E, I, H, generator=gen) * H**-0.5
    down = torch.randn(E, H, I, generator=gen) * I**-0.5
    return {"gate": gate, "up": up, "down": down}


def random_routing(T: int, seed: int):
    """Ids with repeats inside a token's top-k and the padding id E; weights in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=gen)
    ids[0, 1] = ids[0, 0]  # a repeated expert
    if T > 1:
        ids[1, -1] = E  # padding id
    return ids, torch.rand(T, K, generator=gen)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def build(weights, options, owned=None, activation="silu"):
    H, I = weights["gate"].shape[2], weights["gate"].shape[1]
    spec = ExpertsSpec(E, H, I, K, activation=activation, owned=owned)
    amx = AmxExperts(spec, "cpu", options)
    amx.load_weights(weights)
    return spec, amx


def torch_ref(spec, weights, x, ids, w):
    ref = TorchExperts(spec, "cpu", {"dtype": "fp32"})
    ref.load_weights(weights)
    return ref(x.float(), ids, w)


def run_on(amx, isa, x, ids, w):
    with _lib.use_isa(isa):
        return amx(x, ids, w)


@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("isa", isa_params())
def test_parity(isa, fmt, T):
    need_isa(isa)
    options, (H, I), (tol_exact, tol_dequant, tol_dense) = FORMATS[fmt]
    weights = random_layer(H, I, seed=T)
    spec, amx = build(weights, options)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(100 + T))
    ids, w = random_routing(T, seed=T)
    y = run_on(amx, isa, x, ids, w)
    assert y.shape == (T, H) and y.dtype == x.dtype and torch.isfinite(y).all()
    dequant = {n: t for n, t in zip(("gate", "up", "down"), amx.dequantized().values())}
    assert rel(y, reference.forward(amx, x, ids, w, isa)) < tol_exact
    assert rel(y, torch_ref(spec, dequant, x, ids, w)) < tol_dequant
    assert rel(y, torch_ref(spec, weights, x, ids, w)) < tol_dense


@pytest.mark.parametrize("fmt", ["bf16", "int8-g32", "int4-g32"])
@pytest.mark.parametrize("isa", isa_params())
def test_many_tokens(isa, fmt):
    """T = 1024 on small H and I: many rows per expert (the AMX tile path on AMX hosts)."""
    need_isa(isa)
    options, _, (tol_exact, tol_dequant, _) = FORMATS[fmt]
    H, I = 64, 96
    weights = random_layer(H, I, seed=7)
    spec, amx = build(weights, options)
    x = torch.randn(1024, H)
    ids, w = random_routing(1024, seed=7)
    y = run_on(amx, isa, x, ids, w)
    assert rel(y, reference.forward(amx, x, ids, w, isa)) < tol_exact
    dequant = amx.dequantized()
    assert rel(y, torch_ref(spec, dequant, x, ids, w)) < tol_dequant


@pytest.mark.parametrize("owned", [(1, 4, 6), (0,), (7,)])
@pytest.mark.parametrize("fmt", ["bf16", "int4-g32"])
@pytest.mark.parametrize("isa", isa_params())
def test_owned_subsets_add_up(isa, fmt, owned):
    """Experts not owned add zero; the owned part and its complement sum to the whole layer."""
    need_isa(isa)
    options, (H, I), (tol_exact, _, _) = FORMATS[fmt]
    weights = random_layer(H, I, seed=3)
    rest = tuple(e for e in range(E) if e not in owned)
    _, part = build(weights, options, owned=owned)
    _, other = build(weights, options, owned=rest)
    _, whole = build(weights, options)
    x = torch.randn(16, H)
    ids, w = random_routing(16, seed=5)
    y_part, y_other, y_whole = (run_on(m, isa, x, ids, w) for m in (part, other, whole))
    assert rel(y_part, reference.forward(part, x, ids, w, isa)) < tol_exact
    assert rel(y_part + y_other, y_whole) < 1e-5
    untouched = ~torch.isin(ids, torch.tensor(owned)).any(dim=1)
    assert torch.all(y_part[untouched] == 0)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("isa", isa_params())
def test_activations(isa, activation):
    need_isa(isa)
    weights = random_layer(96, 160, seed=11)
    _, amx = build(weights, {"format": "int8", "group_size": 32}, activation=activation)
    x = torch.randn(5, 96)
    ids, w = random_routing(5, seed=11)
    assert rel(run_on(amx, isa, x, ids, w), reference.forward(amx, x, ids, w, isa)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", isa_params())
def test_input_dtypes(isa, dtype):
    """bf16 runs natively, fp16 through fp32; the output keeps x's dtype; int32 ids work."""
    need_isa(isa)
    weights = random_layer(96, 160, seed=13)
    _, amx = build(weights, {"format": "int4", "group_size": 32})
    x = torch.randn(7, 96).to(dtype)
    ids, w = random_routing(7, seed=13)
    y = run_on(amx, isa, x, ids.int(), w)
    assert y.dtype == dtype
    assert rel(y, reference.forward(amx, x, ids, w, isa)) < 1e-2  # includes the output rounding


def test_isa_paths_agree():
    """The integer formats compute the same sums on every path: results agree to fp32 rounding."""
    weights = random_layer(96, 160, seed=17)
    _, amx = build(weights, {"format": "int8", "group_size": 32})
    x = torch.randn(9, 96)
    ids, w = random_routing(9, seed=17)
    ys = [run_on(amx, isa, x, ids, w) for isa in _lib.isas_here()]
    for y in ys[1:]:
        assert rel(y, ys[0]) < 1e-5
