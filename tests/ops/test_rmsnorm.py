"""RMSNorm against transformers' RMSNorm modules."""

from __future__ import annotations

import pytest
import torch

from ktcore.ops.rmsnorm import RMSNorm

# (atol, rtol) per dtype. The order of operations is transformers', so results are usually
# bit-identical; the tolerance only allows for a different reduction order.
TOL = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (1e-2, 1.6e-2), torch.float16: (1e-3, 1e-3)}


def hf_norm(kind: str, hidden_size: int, eps: float):
    if kind == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm as cls
    elif kind == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm as cls
    else:
        from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm as cls
    return cls(hidden_size, eps=eps)


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("shape", [(1, 64), (3, 72), (2, 16, 64), (129, 40)])
@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_transformers(kind, shape, eps, dtype):
    torch.manual_seed(0)
    H = shape[-1]
    hf = hf_norm(kind, H, eps)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(H))
    hf = hf.to(dtype)
    ours = RMSNorm.from_hf(hf)
    assert ours.eps == eps and ours.weight.dtype == dtype
    x = torch.randn(*shape, dtype=dtype) * 3
    with torch.no_grad():
        expected = hf(x)
    got = ours(x)
    assert got.dtype == dtype and got.shape == x.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)


def test_state_dict_of_transformers_loads():
    torch.manual_seed(1)
    hf = hf_norm("qwen3_moe", 72, 1e-6)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(72))
    ours = RMSNorm(72, eps=1e-6)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(5, 72)
    torch.testing.assert_close(ours(x), hf(x).detach(), atol=0, rtol=0)


def test_returns_input_dtype_with_fp32_weight():
    torch.manual_seed(2)
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(y.float(), expected.detach(), atol=2e-2, rtol=2e-2)


def test_large_values_do_not_overflow_in_half():
    norm = RMSNorm(64, eps=1e-5, dtype=torch.float16)
    x = torch.full((2, 64), 6e4, dtype=torch.float16)  # x^2 overflows fp16, not fp32
    torch.testing.assert_close(norm(x), torch.ones(2, 64, dtype=torch.float16), atol=1e-3, rtol=1e-3)


def test_compiles_without_graph_breaks():
    norm = RMSNorm(72)
    compiled = torch.compile(norm, fullgraph=True, backend="eager")
    x = torch.randn(3, 72)
    torch.testing.assert_close(compiled(x), norm(x), atol=0, rtol=0)


@pytest.mark.parametrize("args,message", [((0,), "hidden_size"), ((8, -1.0), "eps"), ((8, float("inf")), "eps")])
def test_validation(args, message):
    with pytest.raises(ValueError, match=message):
        RMSNorm(*args)


def test_wrong_hidden_size_is_an_error():
    with pytest.raises(ValueError, match="expected 64"):
        RMSNorm(64)(torch.randn(2, 72))
