"""The streaming protocol of AmxExperts (ktcore.runtime.streamed_experts) on the CPU: the
rebuilt weights are the packed values the kernels use, for every format and any chunk of
slots; a streamed forward agrees with the kernels; a NUMA-split layer declines."""

from __future__ import annotations

import pytest
import torch

from kt_amx.experts import AmxExperts
from ktcore.ops.experts import ExpertsSpec
from ktcore.runtime.stream_protocol_checks import streamed_forward_error
from ktcore.runtime.streamed_experts import streamed_part

E, H, I, K = 8, 128, 96, 3
FORMATS = {"bf16": {"format": "bf16"}, "int8": {"format": "int8", "group_size": 32},
           "int8-channel": {"format": "int8", "group_size": 0},
           "int4": {"format": "int4", "group_size": 32},
           "int4-sym": {"format": "int4", "group_size": 32, "symmetric": True}}
#: relative Frobenius error of the streamed fp32 forward against the kernels, which round
#: activations (int8 per group for int formats, bf16 for the bf16 format on AVX-512/AMX)
FORWARD_TOL = 2e-2


def build(fmt: str, owned=None, numa: str = "off") -> AmxExperts:
    g = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(E, I, H, generator=g) / H**0.5, "up": torch.randn(E, I, H, generator=g) / H**0.5,
               "down": torch.randn(E, H, I, generator=g) / I**0.5}
    amx = AmxExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", {**FORMATS[fmt], "numa": numa, "threads": 2})
    amx.load_weights(weights)
    return amx


@pytest.mark.parametrize("owned", [None, (0, 3, 4, 6, 7)])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_stream_dense_is_the_packed_values(fmt, owned):
    amx = build(fmt, owned)
    tensors = amx.stream_tensors()
    S = len(amx.spec.owned_ids)
    assert all(t.shape[0] == S and t.is_contiguous() for t in tensors.values())
    assert amx.stream_expert_ids().tolist() == list(amx.spec.owned_ids)
    want = amx.dequantized()  # fp32 [S, ...]
    for a, b in ((0, S), (1, 4), (S - 1, S)):
        chunk = {k: t[a:b].clone() for k, t in tensors.items()}
        gate, up, down = amx.stream_dense(chunk, torch.float32)
        assert torch.equal(gate, want["gate"][a:b]) and torch.equal(up, want["up"][a:b])
        assert torch.equal(down, want["down"][a:b])
        gate16 = amx.stream_dense(chunk, torch.bfloat16)[0]
        assert gate16.dtype == torch.bfloat16 and torch.equal(gate16, want["gate"][a:b].bfloat16())


@pytest.mark.parametrize("owned", [None, (1, 2, 5)])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_streamed_forward_agrees_with_the_kernels(fmt, owned):
    amx = build(fmt, owned)
    assert streamed_forward_error(amx, 150, seed=1, chunk_bytes=1) <= FORWARD_TOL  # one slot per chunk


def test_numa_split_declines_and_mirror_streams(monkeypatch):
    monkeypatch.setenv("KT_AMX_NUMA", "2")
    assert streamed_part(build("int4", numa="split")) is None
    mirror = build("int4", numa="mirror")
    assert mirror.plan is not None and streamed_part(mirror) is not None
