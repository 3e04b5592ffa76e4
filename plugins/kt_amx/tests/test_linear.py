"""AmxLinear against torch's F.linear, for every format and ISA path of this host.

Two comparisons per case (relative Frobenius error):

- ``exact``: F.linear on the dequantised packed weight with x rounded the way the kernels round
  activations (kt_amx.reference.round_activations): catches any layout or indexing error;
- ``dequant``: F.linear on the dequantised packed weight with x as given.

Shapes: out_features odd multiples of 16 (and one that is not a multiple of 16: padded rows),
T in {1, 3, 64, 129}, with and without bias. AMX cases are marked ``amx``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kt_amx import _lib
from kt_amx.linear import AmxLinear
from kt_amx.reference import round_activations
from ktcore.errors import BackendError, WeightError
from ktcore.ops.linear import LinearSpec
from ktcore.ops.weights import GGUFWeight

# name: (options, in_features, dequant tolerance)
FORMATS = {
    "bf16": ({"format": "bf16"}, 96, 1e-2),
    "int8-g32": ({"format": "int8", "group_size": 32}, 96, 3e-2),
    "int8-channel": ({"format": "int8", "group_size": 0}, 160, 3e-2),
    "int4-g32": ({"format": "int4", "group_size": 32}, 96, 3e-2),
    "int4-sym-g64": ({"format": "int4", "group_size": 64, "symmetric": True}, 192, 3e-2),
}
OUT = [48, 80, 208, 50]
TOKENS = [1, 3, 64, 129]


def isa_params():
    return [pytest.param(isa, marks=[pytest.mark.amx] if isa == "amx" else [], id=isa)
            for isa in ("avx2", "avx512", "amx")]


def need_isa(isa: str) -> None:
    if isa not in _lib.isas_here():
        pytest.skip(f"this host runs {', '.join(_lib.isas_here())}, not {isa}")


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def build(options, K, N, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = {"weight": torch.randn(N, K, generator=gen) * K**-0.5}
    if bias:
        weights["bias"] = torch.randn(N, generator=gen)
    lin = AmxLinear(LinearSpec(K, N, bias), "cpu", options)
    lin.load_weights(weights)
    return lin, weights


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("N", OUT)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("isa", isa_params())
def test_parity(isa, fmt, N, bias):
    need_isa(isa)
    options, K, tol = FORMATS[fmt]
    lin, weights = build(options, K, N, bias, seed=N)
    Wq, b = lin.dequantized(), weights.get("bias")
    assert Wq.shape == (N, K)
    for T in TOKENS:
        x = torch.randn(T, K, generator=torch.Generator().manual_seed(T))
        with _lib.use_isa(isa):
            y = lin(x)
        assert y.shape == (T, N) and y.dtype == x.dtype and torch.isfinite(y).all()
        xr = round_activations(x, lin.layer_format, isa, lin.layer_format.group_for(K))
        assert rel(y, F.linear(xr, Wq, b)) < 2e-5, T
        assert rel(y, F.linear(x, Wq, b)) < tol, T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", isa_params())
def test_dtypes_and_batch_dims(isa, dtype):
    """bf16 natively, fp16 through fp32; [B, S, in] inputs; the output keeps x's dtype."""
    need_isa(isa)
    lin, weights = build({"format": "int4", "group_size": 32}, 96, 80, True)
    x = torch.randn(2, 5, 96).to(dtype)
    with _lib.use_isa(isa):
        y = lin(x)
    assert y.shape == (2, 5, 80) and y.dtype == dtype
    ref = F.linear(x.float(), lin.dequantized(), weights["bias"])
    assert rel(y, ref) < 3e-2


def _q8_0(N, K, seed=0) -> GGUFWeight:
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(N * K // 32, 34), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(1e-3, 2e-2, size=(N * K // 32, 1)).astype(np.float16).view(np.uint8)
    return GGUFWeight(torch.from_numpy(raw.reshape(-1)), "Q8_0", (N, K), "output.weight")


def test_gguf_source_packs_exactly():
    src = _q8_0(80, 256)
    lin = AmxLinear(LinearSpec(256, 80), "cpu", {})
    lin.load_weights({"weight": src})
    assert lin.layer_format.format == "int8" and lin.layer_format.group == 32
    assert torch.equal(lin.dequantized(), src.to_dense(torch.float32))
    x = torch.randn(3, 256)
    assert rel(lin(x), F.linear(x, src.to_dense(torch.float32))) < 3e-2


def test_opcheck_and_compile():
    lin, _ = build({"format": "int8", "group_size": 32}, 96, 48, True)
    x = torch.randn(4, 96)
    torch.library.opcheck(torch.ops.kt_amx.linear.default, (x, lin.handle))
    torch.library.opcheck(torch.ops.kt_amx.linear.default, (x.bfloat16(), lin.handle))
    compiled = torch.compile(lambda t: lin(t * 2.0) + 1.0, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), lin(x * 2.0) + 1.0)


def test_zero_rows_and_errors():
    lin, _ = build({"format": "bf16"}, 96, 48, False)
    assert lin(torch.zeros(0, 96)).shape == (0, 48)
    with pytest.raises(ValueError, match="96"):
        lin(torch.zeros(2, 64))
    with pytest.raises(BackendError, match="multiple of 32"):
        AmxLinear(LinearSpec(100, 48), "cpu", {})
    with pytest.raises(BackendError, match="unknown option"):
        AmxLinear(LinearSpec(96, 48), "cpu", {"numa": "split"})
    with pytest.raises(WeightError, match="group"):
        build({"format": "int4", "group_size": 64}, 96, 48, False)


def test_registry_entry():
    from ktcore.backends.registry import Registry

    spec = Registry.from_entry_points().get("amx", "linear")
    assert spec.devices == ("cpu",) and spec.distribution == "kt-amx" and spec.run_probe() is None
    assert isinstance(spec.build(LinearSpec(96, 48), "cpu", {"format": "int8"}), AmxLinear)
