"""MarlinExperts (bf16 / int8 / int4) against TorchExperts in fp32 on the weights the kernels
multiply by: odd shapes, T in {1, 3, 16, 129}, repeated experts in a token's top-k, owned
subsets, the padding id E, every activation, exact GGUF packing; the routing layout on its
own; opcheck and torch.compile(fullgraph=True). On the GPU: larger shapes, CUDA graph capture."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("triton", reason="kt-marlin's kernels need triton (pip install triton)")

from ktcore.ops.experts import ExpertsSpec, TorchExperts  # noqa: E402
from ktcore.ops.weights import DenseWeight, GGUFWeight  # noqa: E402

from kt_marlin.experts import MarlinExperts  # noqa: E402
from kt_marlin.fused_moe import choose_config, launch  # noqa: E402
from kt_marlin.moe_routing import align_blocks, align_blocks_torch, num_blocks  # noqa: E402

#: Max error relative to the reference output's largest magnitude, per activation dtype.
#: The weights are the same values (``dequantized_weights``); what differs is the summation
#: order (fp32: a few ulps of sums of a few hundred products), and for bf16/fp16 activations
#: the rounding of each weight tile to the tensor-core dtype, of ``act(g) * u`` stored in
#: x's dtype and of the output (each about 2^-8 relative in bf16).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _weights(E: int, H: int, I: int) -> dict[str, torch.Tensor]:
    return {"gate": torch.randn(E, I, H) / H**0.5, "up": torch.randn(E, I, H) / H**0.5,
            "down": torch.randn(E, H, I) / I**0.5}


def _routing(T: int, K: int, E: int, repeat: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-k ids in 0..E (E is the padding id), with repeats, and fp32 weights."""
    ids = torch.randint(0, E + 1, (T, K))
    if repeat and K > 1:
        ids[0, 1] = ids[0, 0]  # token 0 names one expert twice
        ids[-1, -1] = E  # and one padding id for certain
    return ids, torch.rand(T, K)


def _build(spec: ExpertsSpec, device, options, weights) -> MarlinExperts:
    op = MarlinExperts(spec, device, options)
    op.load_weights(weights)
    return op


def _oracle(op: MarlinExperts) -> TorchExperts:
    """TorchExperts in fp32 on exactly the weights ``op`` multiplies by (unowned ones zero)."""
    spec = op.spec
    dq = op.dequantized_weights()
    full = {}
    for name, w in dq.items():
        t = torch.zeros((spec.num_experts,) + tuple(w.shape[1:]))
        t[list(spec.owned_ids)] = w.cpu()
        full[name] = t
    ref = TorchExperts(spec, "cpu", {"dtype": "fp32"})
    ref.load_weights(full)
    return ref


def _check(op: MarlinExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, device) -> torch.Tensor:
    y = op(x.to(device), ids.to(device), w.to(device)).cpu()
    assert y.dtype == x.dtype and y.shape == x.shape
    ref = _oracle(op)(x.float(), ids, w).double()
    scale = ref.abs().max().clamp_min(1e-6)
    err = (y.double() - ref).abs().max()
    assert float(err / scale) <= TOLERANCE[x.dtype], f"max error {float(err):.3g} vs scale {float(scale):.3g}"
    return y


# ------------------------------------------------------------------------------------------
# routing layout


@pytest.mark.parametrize("T,K,E,owned,block_m", [(1, 8, 16, None, 16), (3, 2, 8, (1, 4, 5), 16),
                                                 (129, 4, 8, None, 16), (40, 6, 5, (0, 2), 32), (7, 3, 4, (3,), 64),
                                                 (1, 8, 256, None, 1), (64, 8, 200, tuple(range(0, 200, 3)), 16),
                                                 (5, 7, 9, (8,), 1)])
def test_align_blocks_layout(T, K, E, owned, block_m, device):
    """The layout (a kernel up to KERNEL_MAX_PAIRS pairs, torch ops beyond) equals the torch
    one exactly, and holds every owned pair once, in order, in its expert's blocks."""
    ids = torch.randint(0, E + 1, (T, K))
    ids[0, :2] = ids[0, 0]
    owned_ids = list(range(E)) if owned is None else list(owned)
    slot_of = torch.full((E + 1,), -1, dtype=torch.int32)
    slot_of[owned_ids] = torch.arange(len(owned_ids), dtype=torch.int32)
    sorted_pair, block_expert = align_blocks(ids.to(device), slot_of.to(device), len(owned_ids), block_m)
    reference = align_blocks_torch(ids, slot_of, len(owned_ids), block_m)
    assert torch.equal(sorted_pair.cpu(), reference[0]) and torch.equal(block_expert.cpu(), reference[1])
    P = T * K
    B = num_blocks(P, len(owned_ids), block_m)
    assert sorted_pair.shape == (B * block_m,) and block_expert.shape == (B,)
    rows = reference[0].view(B, block_m)
    block_expert = reference[1]
    seen = []
    for b in range(B):
        e = int(block_expert[b])
        real = [int(p) for p in rows[b] if int(p) < P]
        if e < 0:
            assert not real
            continue
        assert real, "a used block holds at least one pair"
        assert all(int(slot_of[ids.view(-1)[p]]) == e for p in real)
        assert real == sorted(real)  # stable: original pair order within an expert
        seen += real
    expected = [p for p in range(P) if int(slot_of[ids.view(-1)[p]]) >= 0]
    assert sorted(seen) == expected  # every owned pair exactly once, nothing else


# ------------------------------------------------------------------------------------------
# parity with TorchExperts


@pytest.mark.parametrize("T", [1, 3, 16])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_formats_match_torch(T, fmt, dtype, device):
    E, H, I, K = 6, 96, 160, 3  # H, I multiples of 32, not powers of two
    spec = ExpertsSpec(E, H, I, K, owned=(0, 2, 3, 5))
    op = _build(spec, device, {"format": fmt, "group_size": 32}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H).to(dtype), ids, w, device)


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_gemv_blocks_match_torch(T, fmt, device):
    """Few pairs against many experts: the heuristic takes blocks of one row (no tl.dot) for
    bf16 and int8, blocks of 16 (tl.dot) for int4 (its GEMV: ``test_int4_paths_match_torch``)."""
    E, H, I, K = 16, 64, 96, 2
    spec = ExpertsSpec(E, H, I, K, owned=tuple(range(1, E)))
    bits = {"bf16": 16, "int8": 8, "int4": 4}[fmt]
    assert choose_config(T, K, spec.num_owned, H, I, bits, 32, 32)["BLOCK_M"] == (16 if bits == 4 else 1)
    op = _build(spec, device, {"format": fmt, "group_size": 32}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H).to(torch.bfloat16), ids, w, device)


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_block_configs_agree(fmt, device):
    """Every BLOCK_M (GEMV rows, tl.dot tiles) and BLOCK_N gives the reference result."""
    E, H, I, K, T = 4, 128, 64, 3, 5
    op = _build(ExpertsSpec(E, H, I, K), device, {"format": fmt, "group_size": 32}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    x = torch.randn(T, H)
    ref = _oracle(op)(x, ids, w)
    args = _op_args(op, x.to(device), ids.to(device), w.to(device))[:-1]
    # int4: a GEMV for BLOCK_M 1, tl.dot for BLOCK_M >= 16 (BLOCK_K: multiples of the layout unit 64)
    for bm, bn, bk_up, bk_down in ((1, 16, 64, 64), (2, 32, 128, 64), (16, 32, 128, 64), (64, 64, 128, 64)):
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K_UP": bk_up, "BLOCK_K_DOWN": bk_down, "num_warps": 4}
        if fmt == "int4" and bm == 2:
            with pytest.raises(ValueError, match="BLOCK_M 1"):
                launch(*args, "silu", config=cfg)
            continue
        y = launch(*args, "silu", config=cfg).cpu()
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()), msg=str(cfg))
    if fmt == "int4":  # BLOCK_K is a multiple of the layout unit (64: groups of 32, K a multiple of 64)
        with pytest.raises(ValueError, match="multiple of 64"):
            launch(*args, "silu", config={"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K_UP": 32, "BLOCK_K_DOWN": 32,
                                          "num_warps": 4})


@pytest.mark.parametrize("k,group,unit", [(96, 32, 32), (160, 32, 32), (128, 32, 64), (192, 64, 64), (256, 128, 128)])
def test_int4_moe_layout(k, group, unit):
    """``to_mma(fit=True)`` (the fused MoE's int4 layout) puts column ``u U + j U/4 + c`` in
    nibble j of int16 element ``u U/4 + c`` with ``U = mma_unit(G, K)``: the group itself
    when K is no multiple of 64; ``unpack`` reads it back exactly."""
    from kt_marlin.packing import mma_unit, pack_int4, to_mma, unpack

    assert mma_unit(group, k) == unit
    n = 7
    q = torch.randint(0, 16, (n, k))
    s, o = torch.rand(n, k // group), torch.randn(n, k // group)
    words = pack_int4(q, s, o, group)
    mma = to_mma(words, fit=True)
    assert mma.qweight.dtype == torch.int16 and mma.shape == (n, k)
    e = mma.qweight.to(torch.int32) & 0xFFFF
    for col in range(k):
        u, r = divmod(col, unit)
        j, c = divmod(r, unit // 4)
        assert torch.equal((e[:, u * unit // 4 + c] >> (4 * j)) & 15, q[:, col].to(torch.int32)), col
    assert torch.equal(unpack(mma), unpack(words))
    if k % max(group, 64):
        with pytest.raises(ValueError, match="multiple of 64"):
            to_mma(words)  # MarlinLinear's strict form


#: (H, I, group, BLOCK_K up, BLOCK_K down): layout units 32 (K an odd multiple of 32), 64 with two
#: groups of 32 per unit, 64 and 128 with one group per unit; several K tiles where K allows.
INT4_CASES = [(96, 160, 32, 32, 32), (128, 192, 32, 64, 64), (256, 192, 64, 128, 64), (256, 384, 128, 128, 128)]


@pytest.mark.parametrize("H,I,group,bk_up,bk_down", INT4_CASES)
@pytest.mark.parametrize("bm", [1, 16])
def test_int4_paths_match_torch(H, I, group, bk_up, bk_down, bm, device):
    """The int4 GEMV (BLOCK_M 1) and tl.dot (16) paths on every layout unit, with a token that
    names one expert twice, the padding id and an owned subset, against the fp32 reference."""
    from kt_marlin.packing import mma_unit

    E, K, T = 5, 3, 4
    spec = ExpertsSpec(E, H, I, K, owned=(0, 1, 3, 4))
    op = _build(spec, device, {"format": "int4", "group_size": group}, _weights(E, H, I))
    assert op.w13.dtype == torch.int16 and op.w13.shape == (4, 2 * I, H // 4) and op.w2.shape == (4, H, I // 4)
    assert bk_up % mma_unit(group, H) == 0 and bk_down % mma_unit(group, I) == 0
    ids, w = _routing(T, K, E)
    x = torch.randn(T, H)
    ref = _oracle(op)(x, ids, w)
    cfg = {"BLOCK_M": bm, "BLOCK_N": 16 if bm == 1 else 32, "BLOCK_K_UP": bk_up, "BLOCK_K_DOWN": bk_down,
           "num_warps": 4}
    y = launch(*_op_args(op, x.to(device), ids.to(device), w.to(device))[:-1], "silu", config=cfg).cpu()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("fmt,H,I", [("bf16", 100, 52), ("int4", 96, 224)])
def test_many_tokens(fmt, H, I, device):
    """T = 129 over a few experts: several blocks per expert, partly filled last blocks."""
    E, K, T = 4, 2, 129
    op = _build(ExpertsSpec(E, H, I, K), device, {"format": fmt, "group_size": 32}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H), ids, w, device)


@pytest.mark.parametrize("owned", [None, (1,), (0, 5, 6, 7)])
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_owned_subsets_add_up(owned, fmt, device):
    """The owned part and the complement add up to the whole layer; padding id adds zero."""
    E, H, I, K, T = 8, 64, 96, 4, 5
    weights = _weights(E, H, I)
    spec = ExpertsSpec(E, H, I, K, owned=owned)
    op = _build(spec, device, {"format": fmt, "group_size": 32}, weights)
    ids, w = _routing(T, K, E)
    x = torch.randn(T, H)
    y = _check(op, x, ids, w, device)
    if owned is not None:
        rest = tuple(e for e in range(E) if e not in owned)
        other = _build(ExpertsSpec(E, H, I, K, owned=rest), device, {"format": fmt, "group_size": 32}, weights)
        whole = _build(ExpertsSpec(E, H, I, K), device, {"format": fmt, "group_size": 32}, weights)
        both = y + other(x.to(device), ids.to(device), w.to(device)).cpu()
        torch.testing.assert_close(both, whole(x.to(device), ids.to(device), w.to(device)).cpu(),
                                   rtol=1e-5, atol=1e-5)
    all_pad = torch.full_like(ids, E)
    assert torch.equal(op(x.to(device), all_pad.to(device), w.to(device)).cpu(), torch.zeros_like(x))


@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activations(activation, device):
    E, H, I, K, T = 4, 64, 64, 2, 3
    spec = ExpertsSpec(E, H, I, K, activation=activation)
    op = _build(spec, device, {"format": "int4", "group_size": 32}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H), ids, w, device)


@pytest.mark.parametrize("group", [64, 128])
def test_dense_groups(group, device, caplog):
    E, H, I, K, T = 3, 256, 128, 2, 3
    weights = _weights(E, H, I)
    with caplog.at_level(logging.WARNING, logger="kt_marlin.experts"):
        op = _build(ExpertsSpec(E, H, I, K), device, {"format": "int4", "group_size": group}, weights)
    assert op.group == {"w13": group, "w2": group} and not op.exact
    assert "relative RMS error" in caplog.text  # the lossy conversion is reported
    dq = op.dequantized_weights()
    for name in ("gate", "up", "down"):  # within half a quantisation step of each group
        assert float((dq[name].cpu() - weights[name]).abs().max()) <= 0.08 * float(weights[name].abs().max())
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H), ids, w, device)


# ------------------------------------------------------------------------------------------
# GGUF sources


def _gguf(random_blocks, qtype, shape, name, seed):
    raw = torch.from_numpy(random_blocks(qtype, shape, seed=seed))
    return GGUFWeight(raw, qtype, shape, name=name)


def _gguf_weights(random_blocks, qtypes, E, H, I):
    return {"gate": _gguf(random_blocks, qtypes[0], (E, I, H), "gate", 1),
            "up": _gguf(random_blocks, qtypes[0], (E, I, H), "up", 2),
            "down": _gguf(random_blocks, qtypes[1], (E, H, I), "down", 3)}


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's sigmoid of large -g
@pytest.mark.parametrize("qtype,fmt", [("Q4_0", "int4"), ("Q4_K", "int4"), ("Q8_0", "int8")])
def test_gguf_exact(qtype, fmt, device, random_blocks, caplog):
    E, H, I, K, T = 4, 256, 256, 2, 3
    weights = _gguf_weights(random_blocks, (qtype, qtype), E, H, I)
    spec = ExpertsSpec(E, H, I, K, owned=(1, 3))
    with caplog.at_level(logging.WARNING, logger="kt_marlin.experts"):
        op = _build(spec, device, {"format": fmt, "group_size": 128}, weights)
    assert op.exact and op.group == {"w13": 32, "w2": 32} and not caplog.text
    dq = op.dequantized_weights()
    for name, src in weights.items():
        assert torch.equal(dq[name].cpu(), src.to_dense(torch.float32)[[1, 3]]), name
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H).to(torch.bfloat16), ids, w, device)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
def test_gguf_mixed_types(device, random_blocks, caplog):
    """Q4_K gate/up (exact, groups of 32) with a Q6_K down (quantised with group_size 128,
    reported): the two projections carry their own groups."""
    E, H, I, K, T = 2, 256, 256, 2, 2
    weights = _gguf_weights(random_blocks, ("Q4_K", "Q6_K"), E, H, I)
    with caplog.at_level(logging.WARNING, logger="kt_marlin.experts"):
        op = _build(ExpertsSpec(E, H, I, K), device, {"format": "int4"}, weights)
    assert op.group == {"w13": 32, "w2": 128} and not op.exact
    assert "down (gguf:Q6_K) to int4" in caplog.text
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H), ids, w, device)
    bf16 = _build(ExpertsSpec(E, H, I, K), device, {"format": "bf16"}, weights)
    for name, src in weights.items():  # GGUF dequantised on the device, then rounded to bf16
        # (half an ulp, 2^-8; the interpreter's cast truncates: a whole one)
        torch.testing.assert_close(bf16.dequantized_weights()[name].cpu(), src.to_dense(torch.float32),
                                   rtol=2**-7, atol=0)


def test_chunked_loading_and_mixed_sources(random_blocks, monkeypatch, caplog):
    """Loading one expert per chunk packs the same values; an exact Q4_0 gate makes the dense
    up use groups of 32 too (one group for the fused gate+up weight)."""
    E, H, I, K = 3, 64, 96, 2
    weights = {"gate": _gguf(random_blocks, "Q4_0", (E, I, H), "gate", 1),
               "up": DenseWeight(torch.randn(E, I, H)), "down": DenseWeight(torch.randn(E, H, I))}
    spec = ExpertsSpec(E, H, I, K, owned=(0, 2))
    whole = _build(spec, "cpu", {"format": "int4", "group_size": 64}, weights)
    monkeypatch.setattr(MarlinExperts, "load_chunk_bytes", 1)
    with caplog.at_level(logging.WARNING, logger="kt_marlin.experts"):
        chunked = _build(spec, "cpu", {"format": "int4", "group_size": 64}, weights)
    assert chunked.group == {"w13": 32, "w2": 32}  # down: I = 96 is no multiple of 64
    assert "not a multiple of group_size 64" in caplog.text and "up (dense) to int4" in caplog.text
    for name, w in whole.dequantized_weights().items():
        assert torch.equal(chunked.dequantized_weights()[name], w), name
    assert torch.equal(whole.dequantized_weights()["gate"], weights["gate"].to_dense()[[0, 2]])


# ------------------------------------------------------------------------------------------
# op plumbing


def test_deterministic_and_options(device):
    from ktcore.errors import BackendError

    E, H, I, K, T = 4, 64, 64, 4, 6
    op = _build(ExpertsSpec(E, H, I, K), device, {"format": "int4", "group_size": 32}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    x = torch.randn(T, H).to(device)
    assert torch.equal(op(x, ids.to(device), w.to(device)), op(x, ids.to(device).int(), w.to(device)))
    with pytest.raises(BackendError, match="format"):
        MarlinExperts(ExpertsSpec(E, H, I, K), "cpu", {"format": "int3"})
    with pytest.raises(BackendError, match="group_size"):
        MarlinExperts(ExpertsSpec(E, H, I, K), "cpu", {"group_size": 48})
    with pytest.raises(BackendError, match="unknown option"):
        MarlinExperts(ExpertsSpec(E, H, I, K), "cpu", {"dtype": "bf16"})
    with pytest.raises(BackendError, match="multiples of 32"):
        MarlinExperts(ExpertsSpec(E, 100, I, K), "cpu", {"format": "int4"})
    with pytest.raises(RuntimeError, match="load_weights"):
        MarlinExperts(ExpertsSpec(E, H, I, K), "cpu")(x, ids, w)


def _op_args(op: MarlinExperts, x, ids, w):
    return (x, ids, w, op.slot_of, op.w13, op.s13, op.o13, op.w2, op.s2, op.o2, op.bits,
            op.group["w13"], op.group["w2"], op.spec.activation)


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_compile_fullgraph_and_opcheck(fmt, device):
    E, H, I, K, T = 4, 64, 64, 2, 2
    op = _build(ExpertsSpec(E, H, I, K), device, {"format": fmt, "group_size": 32}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    x, ids, w = torch.randn(T, H, device=device), ids.to(device), w.to(device)
    compiled = torch.compile(op, fullgraph=True)
    torch.testing.assert_close(compiled(x, ids, w), op(x, ids, w), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.kt_marlin.fused_experts.default, _op_args(op, x, ids, w))


# ------------------------------------------------------------------------------------------
# GPU: larger shapes, CUDA graph capture, opcheck with bf16 weights.


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 4, 16, 64, 300])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_gpu(T, fmt, dtype):
    E, H, I, K = 32, 2048, 768, 8
    spec = ExpertsSpec(E, H, I, K, owned=tuple(range(0, E, 2)))
    op = _build(spec, "cuda", {"format": fmt}, {k: v.cuda() for k, v in _weights(E, H, I).items()})
    ids, w = _routing(T, K, E)
    _check(op, torch.randn(T, H).to(dtype), ids, w, "cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_align_blocks_gpu(dtype):
    """The routing kernel on the GPU equals the torch layout (decode sizes up to
    KERNEL_MAX_PAIRS, 1 to 384 experts, owned subsets, every block size)."""
    for T, K, E, stride, block_m in [(1, 8, 256, 1, 16), (1, 8, 256, 1, 1), (4, 8, 128, 2, 16), (16, 8, 384, 3, 1),
                                     (64, 8, 256, 1, 16), (64, 8, 256, 1, 64), (3, 6, 1, 1, 16), (100, 5, 60, 7, 32),
                                     (2, 8, 512, 1, 16)]:
        ids = torch.randint(0, E + 1, (T, K), device="cuda", dtype=dtype)
        ids[0, :2] = ids[0, 0]
        owned = list(range(0, E, stride))
        slot_of = torch.full((E + 1,), -1, dtype=torch.int32, device="cuda")
        slot_of[owned] = torch.arange(len(owned), dtype=torch.int32, device="cuda")
        got = align_blocks(ids, slot_of, len(owned), block_m)
        ref = align_blocks_torch(ids, slot_of, len(owned), block_m)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), (T, K, E, stride, block_m)


@pytest.mark.cuda
@pytest.mark.parametrize("H,I,group,bk_up,bk_down", INT4_CASES + [(2048, 768, 128, 512, 256)])
@pytest.mark.parametrize("bm", [1, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_paths_gpu(H, I, group, bk_up, bk_down, bm, dtype):
    """The int4 paths with the inline-PTX unpack (bf16 / fp16 dots), every layout unit."""
    E, K, T = 6, 4, 5
    spec = ExpertsSpec(E, H, I, K, owned=(0, 2, 3, 5))
    weights = {k: v.cuda() for k, v in _weights(E, H, I).items()}
    op = _build(spec, "cuda", {"format": "int4", "group_size": group}, weights)
    ids, w = _routing(T, K, E)
    x = torch.randn(T, H).to(dtype)
    ref = _oracle(op)(x.float(), ids, w).double()
    cfg = {"BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K_UP": bk_up, "BLOCK_K_DOWN": bk_down, "num_warps": 4}
    y = launch(*_op_args(op, x.cuda(), ids.cuda(), w.cuda())[:-1], "silu", config=cfg).cpu()
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err <= TOLERANCE[dtype], err


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_graph_capture_and_compile_gpu(fmt):
    E, H, I, K, T = 16, 1024, 512, 8, 4
    op = _build(ExpertsSpec(E, H, I, K), "cuda", {"format": fmt}, _weights(E, H, I))
    ids, w = _routing(T, K, E)
    x, ids, w = torch.randn(T, H, device="cuda", dtype=torch.bfloat16), ids.cuda(), w.cuda()
    eager = op(x, ids, w)
    torch.testing.assert_close(torch.compile(op, fullgraph=True)(x, ids, w), eager, rtol=0, atol=0)
    sx, sids, sw = x.clone(), ids.clone(), w.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(sx, sids, sw)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in forward raises
    try:
        op(sx, sids, sw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sy = op(sx, sids, sw)
    for _ in range(2):  # fresh inputs copied into the static buffers, then replayed
        x2 = torch.randn_like(x)
        ids2, w2 = (t.cuda() for t in _routing(T, K, E))
        sx.copy_(x2), sids.copy_(ids2), sw.copy_(w2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(sy, op(x2, ids2, w2))
    torch.library.opcheck(torch.ops.kt_marlin.fused_experts.default, _op_args(op, x, ids, w))
