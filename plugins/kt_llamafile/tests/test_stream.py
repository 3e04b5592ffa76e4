"""The streaming protocol of LlamafileExperts (ktcore.runtime.streamed_experts) on the CPU:
raw rows stream in place, ``stream_dense`` is the gguf reference dequantisation of any chunk
of slots, and a streamed forward agrees with the kernels, for GGUF and dense sources and
owned subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kt_llamafile.experts import LlamafileExperts
from kt_llamafile.random_blocks import random_weight
from kt_llamafile.testing import gguf_dequantize
from ktcore.ops.experts import ExpertsSpec
from ktcore.ops.weights import GGUFWeight
from ktcore.runtime.stream_pool import StreamPool
from ktcore.runtime.stream_protocol_checks import streamed_forward_error
from ktcore.runtime.streamed_experts import StreamedPart

E, H, I, K = 8, 512, 256, 3
#: relative Frobenius error of the streamed fp32 forward against the kernels, which round
#: the activations to 8 bits per block (none for float rows)
FORWARD_TOL = {"Q4_K": 3e-2, "Q8_0": 2e-2, "Q6_K": 3e-2, "Q5_0": 2e-2, "Q2_K": 3e-2, "F16": 1e-5}
TYPES = [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q8_0"), ("Q5_0", "Q5_0", "Q2_K"), ("F16", "F16", "F16")]


def gguf_layer(types, seed: int = 0) -> dict[str, GGUFWeight]:
    rng = np.random.default_rng(seed)

    def stacked(qtype, rows, k):
        data = torch.from_numpy(random_weight(qtype, E * rows, k, rng)).reshape(E, rows, -1)
        return GGUFWeight(data, qtype, (E, rows, k))

    return {"gate": stacked(types[0], I, H), "up": stacked(types[1], I, H), "down": stacked(types[2], H, I)}


def build(weights, owned=None) -> LlamafileExperts:
    part = LlamafileExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", {"threads": 2})
    part.load_weights(weights)
    return part


@pytest.mark.parametrize("types", TYPES)
def test_rows_stream_in_place_and_dequantise_like_gguf(types):
    layer = gguf_layer(types)
    part = build(layer, owned=(1, 3, 4))
    tensors = part.stream_tensors()
    assert part.stream_expert_ids().tolist() == list(range(E))  # every stored expert; the runtime masks
    for name, t in tensors.items():
        assert t.shape[0] == E and t.is_contiguous()
        assert t.untyped_storage().data_ptr() == layer[name].data.untyped_storage().data_ptr()  # zero copy
    for a, b in ((0, E), (2, 5), (7, 8)):
        dense = part.stream_dense({k: t[a:b].clone() for k, t in tensors.items()}, torch.float32)
        for name, got in zip(("gate", "up", "down"), dense):
            w = layer[name]
            want = gguf_dequantize(w.data.numpy(), w.qtype, w.shape)[a:b]
            assert torch.equal(got, torch.from_numpy(want).float())
        assert part.stream_dense({k: t[a:b] for k, t in tensors.items()}, torch.bfloat16)[0].dtype == torch.bfloat16


@pytest.mark.parametrize("owned", [None, (0, 2, 5, 6)])
@pytest.mark.parametrize("types", TYPES)
def test_streamed_forward_agrees_with_the_kernels(types, owned):
    part = build(gguf_layer(types, seed=1), owned)
    error = streamed_forward_error(part, 140, seed=2, chunk_bytes=3 * part.rows["gate"][0].numel())
    assert error <= max(FORWARD_TOL[t] for t in types)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_sources_stream_compact_rows(dtype):
    g = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(E, I, H, generator=g) / H**0.5, "up": torch.randn(E, I, H, generator=g) / H**0.5,
               "down": torch.randn(E, H, I, generator=g) / I**0.5}
    weights = {k: v.to(dtype) for k, v in weights.items()}
    owned = (1, 2, 6)
    part = build(weights, owned)
    tensors = part.stream_tensors()
    assert part.stream_expert_ids().tolist() == list(owned) and tensors["gate"].shape[0] == len(owned)
    gate, up, down = part.stream_dense(tensors, torch.float32)
    rows = list(owned)
    assert torch.equal(gate, weights["gate"][rows].float()) and torch.equal(down, weights["down"][rows].float())
    x = torch.randn(50, H, generator=g)
    ids = torch.randint(0, E + 1, (50, K), generator=g)
    w = torch.rand(50, K, generator=g)
    y = StreamedPart(part, tensors).forward(x, ids, w, StreamPool("cpu"))
    ref = part(x, ids, w)
    assert float((y - ref).norm() / ref.norm()) <= 1e-5
