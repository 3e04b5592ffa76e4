"""Streaming prefill (ktcore.runtime.streamed_experts, stream_pool): chunk plans, expert groups,
and the streamed forward against the part's own forward, on a CPU target (the same code as
on a GPU, with synchronous copies) and, marked ``cuda``, on the GPU for kt-amx and
kt-llamafile parts."""

from __future__ import annotations

import pytest
import torch

from ktcore.ops.experts import ExpertsSpec, TorchExperts, owned_experts_dense
from ktcore.runtime.blocks import ExpertsParts
from ktcore.runtime.stream_pool import StreamPool
from ktcore.runtime.streamed_experts import StreamedPart, group_slots, plan_chunks, streamed_part, supports_streaming

H, I, K = 64, 32, 3
#: relative Frobenius error of the streamed forward against the part's own, per compute dtype
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


class StreamingTorchExperts(TorchExperts):
    """TorchExperts that also streams: it stores every expert of the layer in reversed order
    plus one junk slot (id -1, NaN weights), so the slot map, the owned mask and ids outside
    the layer are exercised; its weights are streamed as fp32 and cast by ``stream_dense``."""

    def pack(self, sources):
        super().pack(sources)
        E = self.spec.num_experts
        order = torch.arange(E - 1, -1, -1)
        gate, up, down = (owned_experts_dense(sources[n], None, torch.float32)[order] for n in ("gate", "up", "down"))
        nan = torch.full((1, *gate.shape[1:]), float("nan"))
        self.host = {"gate_up": torch.cat([torch.cat([gate, up], dim=1), torch.cat([nan, nan], dim=1)]).contiguous(),
                     "down": torch.cat([down, torch.full((1, *down.shape[1:]), float("nan"))]).contiguous()}
        self.ids = torch.cat([order, torch.tensor([-1])])
        self.dense_calls = 0

    def stream_tensors(self):
        return self.host

    def stream_expert_ids(self):
        return self.ids

    def stream_dense(self, chunk, dtype):
        self.dense_calls += 1
        gate_up = chunk["gate_up"].to(dtype)  # [n, 2I, H]
        return gate_up[:, :I], gate_up[:, I:], chunk["down"].to(dtype)


def make_part(E: int, owned=None, dtype=torch.float32, seed: int = 0) -> StreamingTorchExperts:
    g = torch.Generator().manual_seed(seed)
    weights = {"gate": torch.randn(E, I, H, generator=g) / H**0.5, "up": torch.randn(E, I, H, generator=g) / H**0.5,
               "down": torch.randn(E, H, I, generator=g) / I**0.5}
    option = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    part = StreamingTorchExperts(ExpertsSpec(E, H, I, K, owned=owned), "cpu", {"dtype": option})
    part.load_weights(weights)
    return part


def routing(T: int, E: int, seed: int = 1):
    """x [T, H], ids [T, K] (some padding ids E, one token naming an expert twice), weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E + 1, (T, K), generator=g)
    if T > 2:
        ids[2, 1] = ids[2, 0]
    return x, ids.to(torch.int32), torch.rand(T, K, generator=g)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------- plans


def test_plan_chunks_cuts_runs_of_kept_slots():
    assert plan_chunks([True] * 7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert plan_chunks([True, False, True, True, False, False, True], 4) == [(0, 1), (2, 4), (6, 7)]
    assert plan_chunks([True] * 4, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert plan_chunks([False, False], 2) == []


def test_group_slots_bounds_padding_and_memory():
    assert group_slots([4, 4, 4, 4], row_bytes=1) == [(0, 4)]
    assert group_slots([0, 3, 0, 0, 3, 0], row_bytes=1) == [(1, 2), (4, 5)]  # empties start and end nothing
    assert group_slots([1, 1, 100, 1, 1, 1], row_bytes=1)[0] == (0, 2)  # a hot expert pads no cold group
    for counts in ([1, 1, 100, 1, 1], [5, 0, 7, 2, 9, 0, 0, 1], [3] * 5 + [50] + [1] * 9):
        for lo, hi in group_slots(counts, row_bytes=1):
            assert (hi - lo) * max(counts[lo:hi]) <= 2 * sum(counts[lo:hi])  # padding at most the real rows
    assert group_slots([4] * 8, row_bytes=10, max_bytes=80) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    counts = [5, 0, 7, 2, 9, 0, 0, 1]
    groups = group_slots(counts, row_bytes=1)
    assert sorted(s for lo, hi in groups for s in range(lo, hi) if counts[s]) == [s for s, c in enumerate(counts) if c]


def test_protocol_check_and_declining_part():
    assert supports_streaming(make_part(4)) and not supports_streaming(TorchExperts(ExpertsSpec(4, H, I, K)))
    part = make_part(4)
    part.stream_tensors = lambda: None
    assert streamed_part(part) is None


def test_stream_tensors_are_checked():
    part = make_part(4)
    part.host = {"gate_up": part.host["gate_up"][:2]}
    with pytest.raises(ValueError, match="gate_up"):
        streamed_part(part)


# ------------------------------------------------------------------ forward on a CPU target


@pytest.mark.parametrize("E", [8, 7])
@pytest.mark.parametrize("owned", [None, "odd"])
@pytest.mark.parametrize("chunk_slots", [None, 3, 1])  # None: the whole layer in one chunk
@pytest.mark.parametrize("T", [1, 37, 200])
def test_streamed_forward_matches_the_part(E, owned, chunk_slots, T):
    owned = None if owned is None else tuple(range(1, E, 2))
    part = make_part(E, owned)
    slot_bytes = sum(t[0].numel() * t.element_size() for t in part.host.values())
    streamed = StreamedPart(part, part.stream_tensors(), chunk_bytes=slot_bytes * (chunk_slots or 1000))
    if chunk_slots:
        assert max(b - a for a, b in streamed.chunks(torch.float32)) <= chunk_slots
    x, ids, w = routing(T, E, seed=T)
    y = streamed.forward(x, ids, w, StreamPool("cpu"))
    ref = part(x, ids, w)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()  # the junk slot (id -1) is never computed
    assert rel_err(y, ref) <= TOL[torch.float32]


def test_bf16_activations_and_weights():
    part = make_part(8, dtype=torch.bfloat16)
    x, ids, w = routing(64, 8)
    x = x.bfloat16()
    y = StreamedPart(part, part.stream_tensors(), chunk_bytes=1).forward(x, ids, w, StreamPool("cpu"))
    assert y.dtype == torch.bfloat16
    assert rel_err(y, part(x, ids, w)) <= TOL[torch.bfloat16]


def test_unrouted_chunks_are_not_copied():
    part = make_part(8)
    streamed = StreamedPart(part, part.stream_tensors(), chunk_bytes=1)  # one slot per chunk
    x = torch.randn(5, H)
    ids = torch.full((5, K), 8, dtype=torch.int32)  # padding only ...
    ids[0, 0] = 3  # ... but one pair
    w = torch.rand(5, K)
    y = streamed.forward(x, ids, w, StreamPool("cpu"))
    assert part.dense_calls == 1
    assert rel_err(y, part(x, ids, w)) <= TOL[torch.float32]
    assert torch.equal(y[1:], torch.zeros(4, H))


def _layers(n: int, E: int = 8) -> list[ExpertsParts]:
    layers = []
    for i in range(n):
        layer = ExpertsParts([make_part(E, seed=i)])
        layer.stream_device_types = ("cpu",)
        layer.stream_min_tokens = 16
        layers.append(layer)
    return layers


def test_experts_parts_streams_from_the_threshold_on():
    (layer,) = _layers(1)
    part = layer.parts[0]
    for T, streams in ((15, False), (16, True), (40, True)):
        part.dense_calls = 0
        x, ids, w = routing(T, 8, seed=T)
        y = layer(x, ids, w)
        assert (part.dense_calls > 0) == streams
        assert rel_err(y, part(x, ids, w)) <= TOL[torch.float32]
    for off in (0, None):
        layer.stream_min_tokens = off
        part.dense_calls = 0
        layer(*routing(40, 8))
        assert part.dense_calls == 0


def test_layers_share_a_pool_and_prefetch_the_next_layer():
    layers = _layers(3)
    pools = {}
    for layer in layers:
        layer.stream_pools = pools
    x, ids, w = routing(48, 8)
    copies = []
    for _ in range(3):  # the first round learns the order of the layers
        for layer in layers:
            pool = layer._stream_pool(x.device)
            before = _count_copies(pool)
            y = layer(x, ids, w)
            copies.append(_count_copies(pool) - before)
            assert rel_err(y, layer.parts[0](x, ids, w)) <= TOL[torch.float32]
    (pool,) = pools.values()
    assert pool.successor[id(layers[0].streamed(0))] is layers[1].streamed(0)
    assert pool.successor[id(layers[2].streamed(0))] is layers[0].streamed(0)
    assert pool.buffers[0] is not None and len(pools) == 1
    assert copies[-1] == copies[0]  # each layer copies its chunks once: one of them was prefetched


def _count_copies(pool: StreamPool) -> int:
    if not hasattr(pool, "_copies"):
        pool._copies = 0
        copy = pool._copy

        def counted(streamed, chunk):
            pool._copies += 1
            return copy(streamed, chunk)
        pool._copy = counted
    return pool._copies


def test_model_streaming_gives_the_same_logits():
    pytest.importorskip("kt_amx", reason="the model's CPU experts are kt-amx's")
    import ktcore
    from ktcore.models.presets import make_config
    from ktcore.models.synth import SyntheticWeights

    config = make_config("qwen3_moe")
    rules = "default_device: cpu\nrules:\n  - match: {module: mlp.experts}\n" \
            "    replace: {op: experts, backend: amx, device: cpu, options: {format: int4, group_size: 32}}\n"
    model = ktcore.load(store=SyntheticWeights(config), config=config, rules=rules_file(rules), max_seq_len=64,
                        stream_min_tokens=8)
    layers = [m for m in model.decoder.modules() if isinstance(m, ExpertsParts)]
    assert layers and all(m.stream_min_tokens == 8 for m in layers)
    ids = torch.randint(3, config.vocab_size, (24,), generator=torch.Generator().manual_seed(0))
    off = model.logits(ids)
    for m in layers:
        m.stream_device_types = ("cpu",)
    on = model.logits(ids)
    assert all(m.streamed(0) is not None for m in layers)
    assert rel_err(on, off) <= 2e-2  # the kernels round activations to int8, the stream does not
    model.set_stream_min_tokens(0)
    assert all(m.stream_min_tokens == 0 for m in layers)


def rules_file(text: str):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "rules.yaml"
    path.write_text(text)
    return path


# -------------------------------------------------------------------------- on the GPU


@pytest.mark.cuda
def test_cuda_torch_part_small_chunks_and_prefetch():
    layers = _layers(2)
    pools = {}
    for layer in layers:
        layer.stream_device_types = ("cuda",)
        layer.stream_pools = pools
        layer._streamed[0] = StreamedPart(layer.parts[0], layer.parts[0].stream_tensors(), chunk_bytes=1)
    x, ids, w = routing(200, 8)
    for _ in range(2):
        for layer in layers:
            y = layer(x.cuda().bfloat16(), ids.cuda(), w.cuda())
            assert rel_err(y.cpu(), layer.parts[0](x, ids, w)) <= TOL[torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
def test_cuda_amx_part(fmt):
    pytest.importorskip("kt_amx")
    from kt_amx.experts import AmxExperts

    E = 16
    g = torch.Generator().manual_seed(0)
    weights = {"gate": torch.randn(E, 256, 512, generator=g) / 512**0.5,
               "up": torch.randn(E, 256, 512, generator=g) / 512**0.5,
               "down": torch.randn(E, 512, 256, generator=g) / 256**0.5}
    part = AmxExperts(ExpertsSpec(E, 512, 256, K, owned=tuple(range(0, E, 3))), "cpu",
                      {"format": fmt, "group_size": 32, "numa": "off"})
    part.load_weights(weights)
    _cuda_check_sized(part, E, 512)


@pytest.mark.cuda
@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q8_0", "Q8_0", "Q8_0"), ("F16", "F16", "F16")])
def test_cuda_llamafile_part(types):
    pytest.importorskip("kt_llamafile")
    pytest.importorskip("kt_marlin")
    import numpy as np

    from kt_llamafile.experts import LlamafileExperts
    from kt_llamafile.random_blocks import random_weight
    from ktcore.ops.weights import GGUFWeight

    E, h, i = 8, 512, 256
    rng = np.random.default_rng(0)

    def stacked(qtype, rows, k):
        return GGUFWeight(torch.from_numpy(random_weight(qtype, E * rows, k, rng)).reshape(E, rows, -1), qtype,
                          (E, rows, k))

    part = LlamafileExperts(ExpertsSpec(E, h, i, K, owned=(1, 3, 4, 7)), "cpu", {"threads": 2})
    part.load_weights({"gate": stacked(types[0], i, h), "up": stacked(types[1], i, h), "down": stacked(types[2], h, i)})
    _cuda_check_sized(part, E, h, tol=3e-2)


def _cuda_check_sized(part, E: int, hidden: int, T: int = 300, tol: float = 2e-2) -> None:
    layer = ExpertsParts([part])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, hidden, generator=g)
    ids = torch.randint(0, E + 1, (T, K), generator=g).to(torch.int32)
    w = torch.rand(T, K, generator=g)
    ref = part(x, ids, w)
    y = layer(x.cuda(), ids.cuda(), w.cuda())
    assert layer.streamed(0) is not None and y.device.type == "cuda"
    assert rel_err(y.cpu(), ref) <= tol
    y16 = layer(x.cuda().bfloat16(), ids.cuda(), w.cuda())
    assert rel_err(y16.cpu(), ref) <= tol + TOL[torch.bfloat16]
