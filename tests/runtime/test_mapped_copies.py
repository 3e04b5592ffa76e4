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



@pytest.mark.cuda
@pytest.mark.parametrize("captured", [False, True])
@pytest.mark.parametrize("T,H", [(1, 2048), (3, 1000)])
def test_kernels_ring_and_wait_for_a_cpu_watcher(captured, T, H):
    """stage with ring + wait_load against a CPU thread playing the doorbell's watcher: when the
    request word holds the code, x, ids and weights must already be in the pinned buffers; the
    thread answers 20 ms later with y = 2 x, and the GPU must load that y, not an earlier one,
    and leave the done word at 0; every replay likewise."""
    import threading
    import time

    ok, why = mapped_copies.available(torch.device("cuda"))
    assert ok, why
    K, code = 8, 0x5EED
    words = torch.zeros(32, dtype=torch.int32, pin_memory=True)  # request at 0, done at 16
    pins = {"x": torch.zeros(T, H, dtype=torch.bfloat16, pin_memory=True),
            "ids": torch.zeros(T, K, dtype=torch.int64, pin_memory=True),
            "w": torch.zeros(T, K, dtype=torch.float32, pin_memory=True),
            "y": torch.zeros(T, H, dtype=torch.bfloat16, pin_memory=True)}
    views = {name: mapped_copies.mapped(t) for name, t in pins.items()}
    req, done = mapped_copies.mapped(words[0:1]), mapped_copies.mapped(words[16:17])
    x = torch.zeros(T, H, dtype=torch.bfloat16, device="cuda")
    ids = torch.zeros(T, K, dtype=torch.int32, device="cuda")
    w = torch.zeros(T, K, dtype=torch.float32, device="cuda")
    out = torch.zeros(T, H, dtype=torch.bfloat16, device="cuda")

    def step():
        mapped_copies.stage(x, ids, w, views["x"], views["ids"], views["w"], ring=(req, code))
        mapped_copies.wait_load(done, code, views["y"], out)

    if captured:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    for rep in range(3):
        gen = torch.Generator(device="cuda").manual_seed(rep)
        x.copy_(torch.randn(T, H, device="cuda", generator=gen))
        ids.copy_(torch.randint(0, 1 << 30, (T, K), device="cuda", generator=gen))
        w.copy_(torch.rand(T, K, device="cuda", generator=gen))
        torch.cuda.synchronize()
        pins["y"].fill_(float("nan"))
        seen = {}

        def watcher():
            deadline = time.monotonic() + 10  # no ring: answer anyway, so the GPU does not hang
            while words[0].item() != code and time.monotonic() < deadline:
                pass
            seen["rung"] = words[0].item() == code
            words[0] = 0
            seen["inputs"] = (pins["x"].clone(), pins["ids"].clone(), pins["w"].clone())
            time.sleep(0.02)
            pins["y"].copy_(seen["inputs"][0] * 2)
            words[16] = code

        thread = threading.Thread(target=watcher)
        thread.start()
        if captured:
            graph.replay()
        else:
            step()
        torch.cuda.synchronize()
        thread.join()
        assert seen["rung"], rep
        got_x, got_ids, got_w = seen["inputs"]
        assert torch.equal(got_x, x.cpu()) and torch.equal(got_ids, ids.cpu().long()), rep
        assert torch.equal(got_w, w.cpu()), rep
        assert torch.equal(out.cpu(), x.cpu() * 2), rep
        assert words[16].item() == 0
