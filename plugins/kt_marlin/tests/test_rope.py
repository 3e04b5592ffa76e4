"""MarlinRope against ktcore's TorchRope (itself tested against transformers): every rope type,
both layouts, partial rotary dims, GQA heads, strided inputs, per-token (dynamic) tables;
opcheck and torch.compile(fullgraph=True); on the GPU larger shapes and graph capture."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="kt-marlin's kernels need triton (pip install triton)")

from ktcore.ops.rope import RopeSpec, TorchRope  # noqa: E402

from kt_marlin.rope import MarlinRope  # noqa: E402

#: (rtol, atol) per dtype. Same fp32 tables and formulas as the reference; the kernel may
#: fuse a multiply-add (fp32: about one ulp), and for bf16 the result is one rounding of that
#: fp32 value (one bf16 ulp, 2^-8 relative, where the fp32 values straddle a rounding point;
#: Triton's interpreter truncates instead of rounding to nearest, also one ulp).
TOLERANCE = {torch.float32: (2e-6, 2e-6), torch.bfloat16: (2 ** -7, 1e-5)}

MAX_POS = 300


def make_spec(rope_type: str, rotary_dim: int, interleaved: bool) -> RopeSpec:
    extra = {
        "default": {},
        "linear": {"factor": 2.0},
        "dynamic": {"factor": 3.0, "max_position_embeddings": 64},
        "yarn": {"factor": 8.0, "original_max_position_embeddings": 64, "mscale": 0.707, "mscale_all_dim": 0.707},
        "llama3": {"factor": 8.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0},
    }[rope_type]
    return RopeSpec(rotary_dim, theta=10000.0, rope_type=rope_type, interleaved=interleaved,
                    **{"max_position_embeddings": MAX_POS, **extra})


def build_pair(spec: RopeSpec, device: str):
    """Both on ``device``: equal tables (a GPU's cos/sin or pow may differ from the CPU's by
    an ulp, which a position of a few hundred radians magnifies)."""
    options = {} if spec.rope_type == "dynamic" else {"max_positions": MAX_POS}
    return TorchRope(spec, device, options), MarlinRope(spec, device, options)


def check(got, ref, dtype):
    rtol, atol = TOLERANCE[dtype]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got.cpu(), ref.cpu(), rtol=rtol, atol=atol * float(ref.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("rope_type", ["default", "linear", "dynamic", "yarn", "llama3"])
def test_rope_types_and_layouts(rope_type, interleaved, dtype, device):
    spec = make_spec(rope_type, 16, interleaved)
    ref, ours = build_pair(spec, device)
    q = torch.randn(2, 7, 3, 16).to(dtype)  # [B, T, nH, D]
    k = torch.randn(2, 7, 1, 16).to(dtype)  # [B, T, 1, D]: MLA's shared rope key
    positions = torch.randint(0, MAX_POS, (2, 7))  # any order, anywhere in the table
    q, k, positions = q.to(device), k.to(device), positions.to(device)
    q_ref, k_ref = ref(q, k, positions)
    q_out, k_out = ours(q, k, positions)
    check(q_out, q_ref, dtype)
    check(k_out, k_ref, dtype)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("head_dim, rotary_dim", [(24, 16), (40, 10), (64, 64)])
def test_partial_rotary_and_gqa(head_dim, rotary_dim, interleaved, device):
    """Channels past rotary_dim pass through; q and k with different head counts (GQA)."""
    spec = make_spec("yarn", rotary_dim, interleaved)
    ref, ours = build_pair(spec, device)
    q = torch.randn(1, 5, 6, head_dim)
    k = torch.randn(1, 5, 2, head_dim)
    positions = torch.tensor([[0, 1, 2, 150, MAX_POS - 1]])
    q, k, positions = q.to(device), k.to(device), positions.to(device)
    q_ref, k_ref = ref(q, k, positions)
    q_out, k_out = ours(q, k, positions)
    check(q_out, q_ref, torch.float32)
    check(k_out, k_ref, torch.float32)
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("t", [1, 129])
def test_strided_views_and_lengths(t, device):
    """The rope part of a q projection is a strided view; T = 1 (decode) and 129 tokens."""
    spec = make_spec("default", 16, True)
    ref, ours = build_pair(spec, device)
    q_full = torch.randn(2, t, 4, 32, dtype=torch.bfloat16)  # [B, T, nH, Dn + Dr]
    k_full = torch.randn(2, t, 1, 48, dtype=torch.bfloat16)
    q, k = q_full[..., 16:], k_full[..., 32:]
    positions = torch.arange(t)[None].expand(2, t)  # an expanded view: stride 0 over the batch
    q_ref, k_ref = ref(q.to(device), k.to(device), positions.to(device))
    q_out, k_out = ours(q_full.to(device)[..., 16:], k_full.to(device)[..., 32:], positions.to(device))
    check(q_out, q_ref, torch.bfloat16)
    check(k_out, k_ref, torch.bfloat16)


def test_opcheck_and_compile(device):
    spec = make_spec("yarn", 16, True)
    ours = MarlinRope(spec, device, {"max_positions": MAX_POS})
    q = torch.randn(2, 3, 4, 24, device=device)
    k = torch.randn(2, 3, 1, 16, device=device)
    positions = torch.randint(0, MAX_POS, (2, 3), device=device)
    torch.library.opcheck(torch.ops.kt_marlin.rope.default,
                          (q, k, positions, ours.cos_table, ours.sin_table, True, True))
    # fullgraph: no graph break around the op (aot_eager keeps the CPU test fast)
    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(ours, fullgraph=True, backend=backend)
    for got, want in zip(compiled(q, k, positions), ours(q, k, positions)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_shape_errors():
    ours = MarlinRope(make_spec("default", 16, False), "cpu", {"max_positions": 8})
    with pytest.raises(ValueError, match="rotary_dim"):
        ours(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 16), torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="token dims"):
        ours(torch.randn(1, 2, 1, 16), torch.randn(1, 3, 1, 16), torch.zeros(1, 2, dtype=torch.int64))


# ------------------------------------------------------------------------------------------
# GPU: DeepSeek-V3 and Llama shapes, CUDA graph capture.


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_type, interleaved, heads, kv_heads, head_dim, rotary_dim", [
    ("yarn", True, 128, 1, 64, 64),  # DeepSeek-V3 q_rope / k_rope
    ("llama3", False, 32, 8, 128, 128),  # Llama 3.1
    ("dynamic", False, 28, 4, 128, 64),  # partial rotary
])
def test_large_gpu(rope_type, interleaved, heads, kv_heads, head_dim, rotary_dim, dtype):
    spec = make_spec(rope_type, rotary_dim, interleaved)
    ref, ours = build_pair(spec, "cuda")
    q = torch.randn(3, 200, heads, head_dim).to(dtype)
    k = torch.randn(3, 200, kv_heads, head_dim).to(dtype)
    positions = torch.randint(0, MAX_POS, (3, 200))
    q, k, positions = q.cuda(), k.cuda(), positions.cuda()
    q_ref, k_ref = ref(q, k, positions)
    q_out, k_out = ours(q, k, positions)
    check(q_out, q_ref, dtype)
    check(k_out, k_ref, dtype)


@pytest.mark.cuda
def test_cuda_graph_replay():
    spec = make_spec("yarn", 64, True)
    ours = MarlinRope(spec, "cuda", {"max_positions": MAX_POS})
    q = torch.randn(4, 1, 128, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    positions = torch.tensor([[5], [17], [0], [299]], device="cuda")
    ours(q, k, positions)  # compile the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out, k_out = ours(q, k, positions)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        positions.add_(step)
        graph.replay()
        q_want, k_want = ours(q, k, positions)
        assert torch.equal(q_out, q_want) and torch.equal(k_out, k_want)
