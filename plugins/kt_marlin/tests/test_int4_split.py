"""The int4 kernel's decode paths: every T of the 1-16 token bucket with and without split-K
(odd N, a split that leaves programs empty), the split-K counters that each launch leaves
zeroed, and on the GPU programmatic dependent launch (with and without the L2 prefetch) in
eager calls and in a replayed CUDA graph."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="kt-marlin's kernels need triton (pip install triton)")

from kt_marlin import wq_matmul as W  # noqa: E402
from kt_marlin.packing import quantize_dense, to_mma, unpack  # noqa: E402

#: relative to the output's largest magnitude: fp32 dots (interpreter), bf16 tensor cores (GPU)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _packed(n: int, k: int, group: int, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    p = to_mma(quantize_dense(torch.randn(n, k, generator=gen), 4, group))
    return p, tuple(v.to(device) for v in (p.qweight, p.scales, p.offsets))


def _check(y: torch.Tensor, p, x: torch.Tensor, bias=None) -> None:
    ref = x.double().cpu() @ unpack(p).double().T  # [T, N]
    if bias is not None:
        ref = ref + bias.double().cpu()
    err = float((y.double().cpu() - ref).abs().max() / ref.abs().max())
    assert err <= TOL[x.dtype], f"relative error {err:.3g}"


@pytest.mark.parametrize("t", range(1, 17))
def test_every_token_count_and_split(t, device):
    """T = 1..16 (one 16-token program) on N = 37 (a partial row tile), K = 768 in three K
    tiles: split 1, 2 (two tiles then one), 3 and 4 (one program without a K tile), each way
    of summing x per group, with and without a bias: the fp64 product within fp32 rounding."""
    n, k, group = 37, 768, 128
    p, (qw, s, o) = _packed(n, k, group, device, seed=t)
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(t, k, generator=gen).to(device)
    bias = torch.randn(n, generator=gen).to(device) if t % 2 else None
    cfg = dict(BLOCK_T=16, BLOCK_N=16, BLOCK_K=256, num_warps=4, num_stages=2, SPLIT_K=1 + t % 4, XS=t % 3)
    y = W.launch(x, qw, s, o, bias, 4, group, cfg)
    assert y.shape == (t, n) and y.dtype == x.dtype
    _check(y, p, x, bias)


def test_split_counters_are_left_zeroed(device):
    """Launches with different grids and splits share one counter buffer: after each the
    counters are zero again, and repeating a launch repeats its output bit for bit (a
    counter left at a wrong count would leave the output unwritten)."""
    n, k, group = 45, 512, 64
    p, (qw, s, o) = _packed(n, k, group, device, seed=7)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(8)).to(device)
    base = dict(BLOCK_T=16, BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=2, XS=0)
    first = {split: W.launch(x, qw, s, o, None, 4, group, dict(base, SPLIT_K=split)) for split in (2, 4, 3)}
    bufs = [W._COUNTERS[str(x.device)]]
    assert int(bufs[0].abs().sum()) == 0
    for split, y in first.items():
        _check(y, p, x)
        again = W.launch(x, qw, s, o, None, 4, group, dict(base, SPLIT_K=split))
        assert torch.equal(again, y)
    assert all(int(b.abs().sum()) == 0 for b in bufs)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [1, 4])
def test_pdl_and_prefetch_gpu(split):
    """PDL with no, a partial and a whole-row L2 prefetch gives the non-PDL output bit for bit,
    eagerly and in a CUDA graph of three chained calls (each reads the previous call's output,
    so a call that read x before the previous kernel finished would differ) replayed on new
    activations."""
    if not W._pdl_supported(torch.cuda.current_device()):
        pytest.skip("programmatic dependent launch needs sm_90 and a Triton with launch_pdl")
    n = k = 1024  # square: y feeds the next call as x
    group = 128
    p, (qw, s, o) = _packed(n, k, group, "cuda", seed=split)
    base = dict(BLOCK_T=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=split, num_warps=4, num_stages=3, XS=0)
    x = torch.randn(5, k, device="cuda", dtype=torch.bfloat16)
    ref = W.launch(x, qw, s, o, None, 4, group, dict(base, PDL=False))
    _check(ref, p, x)
    for pf in (0, 1, 8):
        assert torch.equal(W.launch(x, qw, s, o, None, 4, group, dict(base, PDL=True, PF=pf)), ref)

    def chain(y, pdl):  # [5, K] -> three calls, each on the previous one's output -> [5, N]
        for _ in range(3):
            y = W.launch(y, qw, s, o, None, 4, group, dict(base, PDL=pdl, PF=2))
        return y

    static_x = x.clone()
    chain(static_x, True)  # warm-up outside the capture (compiles, makes the counters)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = chain(static_x, True)
    for scale in (2.0, -0.5):
        static_x.copy_(x * scale)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, chain(x * scale, False))


@pytest.mark.cuda
@pytest.mark.parametrize("bn,warps,xs", [(32, 2, 0), (64, 2, 2), (64, 2, 1), (64, 4, 2), (64, 4, 0)])
def test_mma_sync_and_wgmma_tiles_gpu(bn, warps, xs):
    """Two-warp tiles (Triton's mma.sync dot) and four-warp ones (wgmma), each way of summing
    x, split-K 3 and 1, T = 1, 9, 16 on an odd N: the fp64 product within bf16 tolerance."""
    n, k, group = 333, 1536, 128
    p, (qw, s, o) = _packed(n, k, group, "cuda", seed=bn + warps + xs)
    for t in (1, 9, 16):
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        for split in (3, 1):
            cfg = dict(BLOCK_T=16, BLOCK_N=bn, BLOCK_K=256, SPLIT_K=split, num_warps=warps, num_stages=3, XS=xs)
            _check(W.launch(x, qw, s, o, None, 4, group, cfg), p, x)


@pytest.mark.cuda
def test_counter_regions_per_stream_and_capture_gpu(monkeypatch):
    """Split-K counters: a call first seen inside a graph capture (no counter buffer on the
    device yet) takes a zeroed tensor of its own; once an eager call has made the buffer,
    each stream (a capture stream too) gets its own region of it. Replays on new activations
    and calls on a second stream match eager calls bit for bit; the buffer is zero after."""
    n, k, group = 700, 2048, 128
    p, (qw, s, o) = _packed(n, k, group, "cuda", seed=3)
    cfg = dict(BLOCK_T=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, num_warps=4, num_stages=3, XS=2)
    x = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
    W.launch(x, qw, s, o, None, 4, group, cfg)  # compile outside the capture
    torch.cuda.synchronize()
    monkeypatch.setattr(W, "_COUNTERS", {})
    monkeypatch.setattr(W, "_SLOTS", {})

    def capture():
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = W.launch(static_x, qw, s, o, None, 4, group, cfg)
            stream = torch.cuda.current_stream().cuda_stream
        return graph, static_x, static_y, stream

    first = capture()
    assert not W._COUNTERS  # no buffer made inside a capture
    ref = W.launch(x, qw, s, o, None, 4, group, cfg)  # makes the buffer (default stream's region)
    _check(ref, p, x)
    second = capture()
    assert (str(x.device), second[3]) in W._SLOTS  # the capture stream's own region
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_side = W.launch(x, qw, s, o, None, 4, group, cfg)
    torch.cuda.current_stream().wait_stream(side)
    assert len(set(W._SLOTS.values())) == len(W._SLOTS) >= 2  # one region per stream
    assert torch.equal(y_side, ref)
    for graph, static_x, static_y, _ in (first, second):
        for scale in (1.0, -3.0):
            static_x.copy_(x * scale)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(static_y, W.launch(x * scale, qw, s, o, None, 4, group, cfg))
    assert int(W._COUNTERS[str(x.device)].abs().sum()) == 0
