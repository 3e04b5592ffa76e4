"""TorchLinear against torch.nn.Linear and dequantised GGUF references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ktcore.errors import BackendError, WeightError
from ktcore.ops.linear import LinearSpec, TorchLinear, dense_dtype
from ktcore.ops.weights import DenseWeight, GGUFWeight

# (atol, rtol) per compute dtype, against the same computation done by nn.Linear.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (1e-3, 1e-3)}

SHAPES = [(64, 32), (72, 40), (256, 96)]  # (in, out): ordinary, odd, larger
LEADING = [(1,), (3,), (2, 5), (129,)]


def make_linear(weight, bias=None, options=None) -> TorchLinear:
    out_features, in_features = weight.shape
    linear = TorchLinear(LinearSpec(in_features, out_features, bias=bias is not None), "cpu", options)
    linear.load_weights({"weight": weight} if bias is None else {"weight": weight, "bias": bias})
    return linear


def q8_0(t: torch.Tensor, name: str = "w") -> GGUFWeight:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    blocks = quantize(t.float().numpy(), GGMLQuantizationType.Q8_0)
    return GGUFWeight(torch.from_numpy(np.ascontiguousarray(blocks)), "Q8_0", tuple(t.shape), name)


@pytest.mark.parametrize("in_features,out_features", SHAPES)
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_nn_linear(in_features, out_features, leading, bias, dtype):
    torch.manual_seed(0)
    ref = torch.nn.Linear(in_features, out_features, bias=bias).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(out_features, in_features) * in_features**-0.5)
        if bias:
            ref.bias.copy_(torch.randn(out_features))
    ours = make_linear(ref.weight.detach(), ref.bias.detach() if bias else None)
    x = torch.randn(*leading, in_features, dtype=dtype)
    got = ours(x)
    assert got.dtype == dtype and got.shape == (*leading, out_features)
    with torch.no_grad():
        expected = ref(x)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


@pytest.mark.parametrize("option,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_dtype_option_computes_in_that_dtype_and_keeps_x_dtype(option, dtype):
    torch.manual_seed(1)
    w = torch.randn(40, 72) * 72**-0.5
    b = torch.randn(40)
    ours = make_linear(w, b, {"dtype": option})
    assert ours.weight.dtype == dtype and ours.bias.dtype == dtype
    x = torch.randn(3, 72)
    got = ours(x)
    assert got.dtype == torch.float32
    expected = F.linear(x.to(dtype), w.to(dtype), b.to(dtype)).float()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_default_dtype_follows_dense_source():
    torch.manual_seed(2)
    w = torch.randn(16, 32, dtype=torch.bfloat16)
    ours = make_linear(w)
    assert ours.weight.dtype == torch.bfloat16
    x = torch.randn(2, 32)  # fp32 input, bf16 weight: computed in bf16, returned fp32
    y = ours(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.bfloat16(), w).float(), atol=0, rtol=0)
    assert dense_dtype([DenseWeight(torch.zeros(2, dtype=torch.int8))]) == torch.float32


@pytest.mark.parametrize("in_features,out_features", [(64, 32), (96, 40)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 16])
def test_gguf_q8_0_source(in_features, out_features, bias, T):
    torch.manual_seed(3)
    w = torch.randn(out_features, in_features) * in_features**-0.5
    source = q8_0(w, "blk.0.ffn_down.weight")
    b = torch.randn(out_features) if bias else None
    ours = make_linear(source, b)
    assert ours.weight.dtype == torch.float32  # GGUF sources default to fp32
    x = torch.randn(T, in_features)
    expected = F.linear(x, source.to_dense(), b)  # reference: gguf.quants dequantisation
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
    assert (source.to_dense() - w).abs().max() < 0.05  # it is Q8_0 of w


def test_gguf_source_with_bf16_option():
    torch.manual_seed(4)
    w = torch.randn(32, 64) * 0.125
    source = q8_0(w)
    ours = make_linear(source, options={"dtype": "bf16"})
    assert ours.weight.dtype == torch.bfloat16
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(ours(x), F.linear(x, source.to_dense(torch.bfloat16)), atol=0, rtol=0)


def test_weight_errors():
    spec = LinearSpec(64, 32, bias=True)
    w, b = torch.randn(32, 64), torch.randn(32)
    with pytest.raises(WeightError, match="missing weight.*bias"):
        TorchLinear(spec).load_weights({"weight": w})
    with pytest.raises(WeightError, match="shape"):
        TorchLinear(spec).load_weights({"weight": w.T, "bias": b})
    with pytest.raises(WeightError, match="shape"):
        TorchLinear(spec).load_weights({"weight": w, "bias": torch.randn(33)})
    with pytest.raises(WeightError, match="unexpected"):
        TorchLinear(LinearSpec(64, 32)).load_weights({"weight": w, "bias": b})
    with pytest.raises(WeightError, match="shape"):
        TorchLinear(LinearSpec(64, 32)).load_weights({"weight": q8_0(torch.randn(32, 96))})
    with pytest.raises(WeightError, match="bytes"):  # truncated GGUF blocks
        GGUFWeight(q8_0(w).data[:-1], "Q8_0", (32, 64))


def test_forward_before_load_is_an_error():
    with pytest.raises(RuntimeError, match="load_weights"):
        TorchLinear(LinearSpec(8, 4))(torch.randn(1, 8))


def test_option_errors():
    with pytest.raises(BackendError, match="dtype"):
        TorchLinear(LinearSpec(8, 4), "cpu", {"dtype": "fp8"})
    with pytest.raises(BackendError, match="unknown option"):
        TorchLinear(LinearSpec(8, 4), "cpu", {"format": "int4"})


@pytest.mark.parametrize(
    "args,message",
    [((0, 4), "in_features"), ((8, -1), "out_features"), ((8.0, 4), "in_features"), ((8, 4, 1), "bias")],
)
def test_spec_validation(args, message):
    with pytest.raises(ValueError, match=message):
        LinearSpec(*args)


def test_interface_shapes():
    linear = TorchLinear(LinearSpec(72, 40, bias=True))
    assert linear.op_name == "linear"
    assert linear.weight_names() == ("weight", "bias")
    assert linear.expected_shape("weight") == (40, 72) and linear.expected_shape("bias") == (40,)
    assert TorchLinear(LinearSpec(72, 40)).weight_names() == ("weight",)


def test_compiles_without_graph_breaks():
    torch.manual_seed(5)
    ours = make_linear(torch.randn(40, 72), torch.randn(40))
    compiled = torch.compile(ours, fullgraph=True, backend="eager")
    x = torch.randn(3, 72)
    torch.testing.assert_close(compiled(x), ours(x), atol=0, rtol=0)
