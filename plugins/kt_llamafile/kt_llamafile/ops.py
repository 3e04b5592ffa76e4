"""``torch.library`` custom ops over the C kernels, with fake implementations, so that
``torch.compile(fullgraph=True)`` traces through them (DESIGN §3).

Both ops are pure functions of their tensor arguments: the weights travel as the raw GGUF
uint8 rows (zero-copy views of the mmapped file where the source was one), the type as its
ggml id, the thread count selects the process-wide pool of that size.

- ``kt_llamafile::linear(x[..., K], weight[N, row_bytes] u8, bias[N]?, qtype, out_features,
  threads) -> y[..., N]`` in x's dtype (computed in fp32).
- ``kt_llamafile::experts(x[T, H], topk_ids[T, K], topk_weights[T, K], gate, up, down, slot_of,
  qtypes[3], inter, act, threads) -> y[T, H]`` in x's dtype; ``slot_of[E + 1]`` int32 maps an
  expert id to its slot in the stacked gate/up/down rows, -1 where it adds zero.

``call(op, impl, *args)`` is how the modules call them: the registered op while torch.compile
traces, the implementation directly in eager mode (the dispatcher's round trip costs about
20 us per call, as much as a small GEMV).
"""

from __future__ import annotations

import torch

from kt_llamafile import _lib

_NAMES = {v: k for k, v in _lib.QTYPE_IDS.items()}


def _name(qtype: int) -> str:
    if qtype not in _NAMES:
        raise ValueError(f"kt-llamafile: unsupported ggml type id {qtype}")
    return _NAMES[qtype]


def linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, qtype: int, out_features: int,
                threads: int) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()  # [T, K]
    if weight.dtype != torch.uint8 or not weight.is_contiguous():
        raise ValueError("kt_llamafile::linear: weight must be contiguous uint8 GGUF rows")
    if weight.numel() != out_features * _lib.row_bytes(_name(qtype), k):
        raise ValueError(f"kt_llamafile::linear: {weight.numel()} weight bytes do not hold "
                         f"{out_features} rows of {k} {_name(qtype)} values")
    y = _lib.matmul(x2, weight, _name(qtype), out_features, threads)  # [T, N] fp32
    if bias is not None:
        y += bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], out_features).to(x.dtype)


linear = torch.library.custom_op("kt_llamafile::linear", linear_impl, mutates_args=(), device_types="cpu")


@linear.register_fake
def _linear_fake(x, weight, bias, qtype, out_features, threads):
    return x.new_empty((*x.shape[:-1], out_features))


def experts_desc(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, slots: torch.Tensor, qtypes: list[int],
                 hidden: int, inter: int, act: int):
    """The C ``ktl_experts_desc *`` of one layer, after checking that the rows hold every slot
    ``slots`` (contiguous int32 ``[E + 1]``, kept alive by the caller) points to."""
    slots_needed = int(slots.max()) + 1 if slots.numel() else 0
    for w, q, rows, k in ((gate, qtypes[0], inter, hidden), (up, qtypes[1], inter, hidden), (down, qtypes[2], hidden, inter)):
        if w.dtype != torch.uint8 or not w.is_contiguous():
            raise ValueError("kt_llamafile::experts: weights must be contiguous uint8 GGUF rows")
        if w.numel() < slots_needed * rows * _lib.row_bytes(_name(q), k):
            raise ValueError(f"kt_llamafile::experts: {w.numel()} weight bytes do not hold {slots_needed} experts "
                             f"of {rows} rows of {k} {_name(q)} values")
    ffi = _lib.kernels()[0]
    desc = ffi.new("ktl_experts_desc *")
    desc.qtype_gate, desc.qtype_up, desc.qtype_down = (int(q) for q in qtypes)
    desc.gate, desc.up, desc.down = _lib.ptr(gate), _lib.ptr(up), _lib.ptr(down)
    desc.num_experts = slots.numel() - 1
    desc.hidden = hidden
    desc.inter = inter
    desc.slot_of = _lib.ptr(slots, "int32_t *")
    desc.act = act
    return desc


def experts_impl(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: torch.Tensor,
            up: torch.Tensor, down: torch.Tensor, slot_of: torch.Tensor, qtypes: list[int], inter: int,
            act: int, threads: int) -> torch.Tensor:
    t, hidden = x.shape
    x32 = x.to(torch.float32).contiguous()
    ids = topk_ids.to(torch.int32).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    slots = slot_of.to(torch.int32).contiguous()
    desc = experts_desc(gate, up, down, slots, qtypes, hidden, inter, act)
    y = torch.empty((t, hidden), dtype=torch.float32)
    lib = _lib.kernels()[1]
    rc = lib.ktl_experts(_lib.pool(threads), desc, _lib.ptr(x32, "float *"), t, _lib.ptr(ids, "int32_t *"),
                         ids.shape[1] if ids.dim() == 2 else 0, _lib.ptr(weights, "float *"), _lib.ptr(y, "float *"))
    _lib.check(rc, "experts")
    return y.to(x.dtype)


experts = torch.library.custom_op("kt_llamafile::experts", experts_impl, mutates_args=(), device_types="cpu")


@experts.register_fake
def _experts_fake(x, topk_ids, topk_weights, gate, up, down, slot_of, qtypes, inter, act, threads):
    return torch.empty_like(x)


def call(op, impl, *args):
    """The custom op while compiling (what the graph records), else its implementation."""
    return op(*args) if torch.compiler.is_compiling() else impl(*args)
