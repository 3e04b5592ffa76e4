"""LlamafileLinear: GGUF and dense sources, bias, dtypes and batch shapes, the custom op under
opcheck and torch.compile, the registry, and zero-copy use of a GGUF file's memory map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_llamafile.experts import LlamafileExperts
from kt_llamafile.linear import LlamafileLinear
from kt_llamafile.random_blocks import random_weight
from kt_llamafile.testing import NORM_TOL
from ktcore.errors import BackendError
from ktcore.ops.experts import ExpertsSpec, TorchExperts
from ktcore.ops.linear import LinearSpec, TorchLinear
from ktcore.ops.weights import GGUFWeight


def _gguf(qtype: str, n: int, k: int, seed: int = 0) -> GGUFWeight:
    return GGUFWeight(torch.from_numpy(random_weight(qtype, n, k, np.random.default_rng(seed))), qtype, (n, k))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.norm(a.double() - b.double()) / torch.linalg.norm(b.double())).item()


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_1", "Q8_0", "Q3_K", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("bias", [False, True])
def test_gguf_linear_matches_torch_linear(qtype, bias):
    spec = LinearSpec(512, 77, bias)
    weights = {"weight": _gguf(qtype, 77, 512)}
    if bias:
        weights["bias"] = torch.randn(77)
    ours, ref = LlamafileLinear(spec, "cpu", {"threads": 2}), TorchLinear(spec)
    ours.load_weights(weights)
    ref.load_weights(weights)
    assert ours.zero_copy and ours.weight_rows.data_ptr() == weights["weight"].data.data_ptr()
    x = torch.randn(2, 5, 512)  # batch dims are kept
    y = ours(x)
    assert y.shape == (2, 5, 77) and y.dtype == torch.float32
    assert _rel(y, ref(x)) <= NORM_TOL[qtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dense_sources_are_exact(dtype):
    spec = LinearSpec(100, 31)
    w = (torch.randn(31, 100) / 10).to(dtype)
    ours, ref = LlamafileLinear(spec, "cpu", {}), TorchLinear(spec, "cpu", {"dtype": "fp32"})
    ours.load_weights({"weight": w})
    ref.load_weights({"weight": w})
    assert ours.qtype == {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}.get(dtype, "F32")
    assert ours.zero_copy == (dtype != torch.float64)
    x = torch.randn(7, 100)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_output_keeps_input_dtype():
    ours = LlamafileLinear(LinearSpec(256, 9), "cpu", {})
    ours.load_weights({"weight": _gguf("Q4_K", 9, 256)})
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert ours(torch.randn(3, 256, dtype=dtype)).dtype == dtype


def test_options_and_device_are_checked():
    with pytest.raises(BackendError, match="unknown option"):
        LlamafileLinear(LinearSpec(32, 1), "cpu", {"format": "int4"})
    with pytest.raises(BackendError, match="positive int"):
        LlamafileLinear(LinearSpec(32, 1), "cpu", {"threads": 0})
    with pytest.raises(BackendError, match="CPU"):
        LlamafileLinear(LinearSpec(32, 1), "meta", {})


def test_opcheck_and_compile_fullgraph():
    w = _gguf("Q5_0", 33, 256)
    args = (torch.randn(4, 256), w.data, torch.randn(33), 6, 33, 1)
    torch.library.opcheck(torch.ops.kt_llamafile.linear, args)
    ours = LlamafileLinear(LinearSpec(256, 33), "cpu", {"threads": 1})
    ours.load_weights({"weight": w})
    x = torch.randn(4, 256)
    compiled = torch.compile(lambda t: ours(t) * 2.0, fullgraph=True)
    torch.testing.assert_close(compiled(x), ours(x) * 2.0)


def test_built_through_the_registry():
    from ktcore.backends.registry import Registry

    registry = Registry.from_entry_points()
    linear = registry.get("llamafile", "linear")
    assert linear.run_probe() is None
    assert linear.accepts("gguf:Q4_K") and linear.accepts("dense")
    op = linear.build(LinearSpec(256, 5), "cpu", {"threads": 1})
    assert isinstance(op, LlamafileLinear)
    assert isinstance(registry.get("llamafile", "experts").build(ExpertsSpec(4, 256, 256, 2), "cpu", {}), LlamafileExperts)


def _mapped_ranges(path) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(str(path)):
                lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
                ranges.append((lo, hi))
    return ranges


def test_gguf_file_is_used_in_place(tmp_path):
    """Experts and a projection of a Q4_K GGUF (written by ktcore, opened in place) run on the
    file's memory map: the kernels' pointers lie inside the mapping, nothing is repacked."""
    from ktcore.formats.gguf_names import canonical_shapes
    from ktcore.formats.gguf_read import GGUFStore
    from ktcore.formats.gguf_write import write_gguf
    from ktcore.models.presets import make_config

    config = make_config("qwen3_moe", "tiny", layers=1, hidden_size=256, moe_intermediate_size=256, head_dim=64)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) * 0.05 for name, shape in canonical_shapes(config).items()}
    path = write_gguf(tmp_path / "m.gguf", config, None, tensors.items(), "Q4_K")[0]
    store = GGUFStore(path, in_place=True)
    prefix = "model.layers.0.mlp.experts."
    layer = {n: store.get(prefix + n) for n in ("gate", "up", "down")}
    assert all(isinstance(w, GGUFWeight) and w.qtype == "Q4_K" for w in layer.values())
    E, K = config.num_experts, config.num_experts_per_tok
    spec = ExpertsSpec(E, 256, 256, K, owned=tuple(range(0, E, 2)))
    ours, ref = LlamafileExperts(spec, "cpu", {"threads": 2}), TorchExperts(spec)
    ours.load_weights(layer)
    ref.load_weights(layer)
    ranges = _mapped_ranges(path)
    assert ranges, "the GGUF file is not memory-mapped"
    for rows in ours.rows.values():
        assert any(lo <= rows.data_ptr() and rows.data_ptr() + rows.numel() <= hi for lo, hi in ranges)
    x = torch.randn(5, 256, generator=gen)
    ids = torch.randint(0, E + 1, (5, K), generator=gen)
    w = torch.rand(5, K, generator=gen)
    assert _rel(ours(x, ids, w), ref(x, ids, w)) < 3e-2

    proj = store.get("model.layers.0.self_attn.q_proj.weight")
    lin = LlamafileLinear(LinearSpec(256, 256), "cpu", {"threads": 2})
    lin.load_weights({"weight": proj})
    assert lin.zero_copy
    assert any(lo <= lin.weight_rows.data_ptr() < hi for lo, hi in ranges)
    ref_lin = TorchLinear(LinearSpec(256, 256))
    ref_lin.load_weights({"weight": proj})
    assert _rel(lin(x), ref_lin(x)) <= NORM_TOL["Q4_K"]
