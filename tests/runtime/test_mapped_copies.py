"""Mapped copies (ktcore.runtime.mapped_copies) on the GPU host: the kernels move odd-sized
inputs and outputs exactly, eagerly and in a captured graph. Their setting is tested beside
stream_memops' (tests/runtime/test_stream_memops.py, one helper), runners with them in the
plugins' test_host_experts.py."""

from __future__ import annotations

import pytest
import torch

from ktcore.runtime import mapped_copies


@pytest.mark.cuda
@pytest.mark.parametrize("T,H,K", [(1, 2048, 8), (5, 1000, 6), (3, 3, 1)])
def test_kernels_move_exact_values_eager_and_captured(T, H, K):
    ok, why = mapped_copies.available(torch.device("cuda"))
    assert ok, why
    gen = torch.Generator(device="cuda").manual_seed(T)
    pins = {"x": torch.zeros(8, H, dtype=torch.bfloat16, pin_memory=True),
            "ids": torch.zeros(8, K, dtype=torch.int64, pin_memory=True),
            "w": torch.zeros(8, K, dtype=torch.float32, pin_memory=True),
            "y": torch.zeros(8, H, dtype=torch.bfloat16, pin_memory=True)}
    views = {name: mapped_copies.mapped(t) for name, t in pins.items()}
    x = torch.randn(T, H, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.randint(-5, 1 << 40, (T, K), device="cuda", generator=gen)
    w = torch.randn(T, K, device="cuda", generator=gen)
    out = torch.full((T, H), 7.0, dtype=torch.bfloat16, device="cuda")

    def step():
        mapped_copies.stage(x, ids, w, views["x"], views["ids"], views["w"])
        mapped_copies.load(views["y"], out)

    for captured in (False, True):
        for t in pins.values():
            t.zero_()
        y = torch.randn(T, H).to(torch.bfloat16)
        pins["y"][:T].copy_(y)
        if captured:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            pins["y"][:T].copy_(-y)  # what a replay must load: the buffer's content at replay time
            graph.replay()
            y = -y
        else:
            step()
        torch.cuda.synchronize()
        assert torch.equal(pins["x"][:T], x.cpu()) and torch.equal(pins["ids"][:T], ids.cpu())
        assert torch.equal(pins["w"][:T], w.cpu()) and torch.equal(out.cpu(), y)
        assert pins["x"][T:].abs().sum() == 0  # nothing past the T rows


@pytest.mark.cuda
def test_stage_converts_to_the_buffers_types():
    """int32 ids, bf16 weights and fp32 x (a router's outputs as they come) stored as int64,
    fp32 and bf16: the values torch's conversions give."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    pins = {"x": torch.zeros(2, 300, dtype=torch.bfloat16, pin_memory=True),
            "ids": torch.zeros(2, 6, dtype=torch.int64, pin_memory=True),
            "w": torch.zeros(2, 6, dtype=torch.float32, pin_memory=True)}
    x = torch.randn(2, 300, device="cuda", generator=gen)
    ids = torch.randint(0, 1 << 30, (2, 6), device="cuda", generator=gen, dtype=torch.int32)
    w = torch.rand(2, 6, device="cuda", generator=gen).to(torch.bfloat16)
    mapped_copies.stage(x, ids, w, *(mapped_copies.mapped(pins[k]) for k in ("x", "ids", "w")))
    torch.cuda.synchronize()
    assert torch.equal(pins["x"], x.to(torch.bfloat16).cpu())
    assert torch.equal(pins["ids"], ids.to(torch.int64).cpu())
    assert torch.equal(pins["w"], w.float().cpu())
