"""Weight-only quantised matmul: ``y[T, N] = x[T, K] @ dequant(W)[N, K].T (+ b)``.

int4 weights in the ``mma`` layout of ``kt_marlin.packing`` (int16 ``[N, K/4]``), run by
``kt_marlin.int4_mma.int4_kernel`` (``y.T = W x.T`` with the unpacked weights as the register
operand of ``tl.dot``; see that module). int8 weights ``[N, K]`` (scales ``[N, K/G]``) run by
``_int8_kernel``: a dequantised ``[BLOCK_N, BLOCK_K]`` tile; for one token its products with x
add up elementwise over K and are reduced once at the end (a reduction per tile cost more
than the loads); ``tl.dot`` above; split-K partials added by ``sum`` afterwards.

int4 config: ``choose_config`` looks up ``GEMV_TABLE[(shape_class(N, K), t_bucket(T))]`` (tile
sizes, split-K waves, warps, pipeline stages); the table is the built-in ``DEFAULT_TABLE``
updated from ``kt_marlin/gemv_table.json`` when that file exists (or from the file
``$KT_MARLIN_GEMV_TABLE`` names), the ``table`` of the JSON ``bench/sweep_gemv.py`` writes.
fp32 activations use an fp32 ("ieee") dot; so do CPU tensors, which only Triton's
interpreter runs (its bf16 ``tl.dot`` multiplies the raw bits).

Registered as ``torch.ops.kt_marlin.wq_matmul`` (``custom_op`` + ``register_fake``): no host
synchronisation, fixed allocations, so it captures in CUDA graphs and compiles fullgraph.

int4 split-K counters: one zeroed int32 buffer per device, made by the first eager call
(``torch.zeros`` and a synchronisation), cut into ``_REGIONS`` regions of ``_REGION``
counters; each stream that launches gets its own region the first time, also while it is
being captured (a graph capture runs on a stream of its own: it takes a fresh region, which
is zero, and needs no memset), and the kernel leaves the counters it used zeroed. Launches
in flight at the same time on different streams never share counters; graphs captured on
one stream share its region, so replay them one at a time, and not while eager calls run
on that stream. Before any eager call on the device, when the regions are used up or when
a launch needs more than ``_REGION`` counters, a call takes a ``torch.zeros`` of its own (a
memset, captured as such).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from kt_marlin import packing
from kt_marlin.int4_mma import int4_kernel
from ktcore.ops.launch_device import on_device


@triton.jit
def _int8_kernel(x_ptr, qw_ptr, s_ptr, out_ptr, part_ptr, b_ptr, T, N, K, stride_x,
                 GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr,
                 DOT_IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_k = tl.program_id(2)
    NG: tl.constexpr = BLOCK_K // GROUP
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_n = rn < N
    mask_t = rt < T
    rn64 = rn.to(tl.int64)
    n_groups = K // GROUP
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    prods = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # one token: products, reduced once at the end
    for kt in range(pid_k, K // BLOCK_K, SPLIT_K):
        k0 = kt * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        q = tl.load(qw_ptr + rn64[:, None] * K + rk[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        rg = k0 // GROUP + tl.arange(0, NG)
        s = tl.load(s_ptr + rn64[:, None] * n_groups + rg[None, :], mask=mask_n[:, None], other=0).to(tl.float32)
        w = tl.reshape(tl.reshape(q, (BLOCK_N, NG, GROUP)) * s[:, :, None], (BLOCK_N, BLOCK_K))
        xk = tl.load(x_ptr + rt[:, None].to(tl.int64) * stride_x + rk[None, :], mask=mask_t[:, None], other=0)
        if USE_DOT:
            if DOT_IEEE:
                acc += tl.dot(xk.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(xk, tl.trans(w.to(xk.dtype)))
        else:
            prods += w * xk.to(tl.float32)
    if not USE_DOT:
        acc = tl.sum(prods, axis=1)[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=mask_n, other=0).to(tl.float32)[None, :]
        ptrs = out_ptr + rt[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])
    else:
        ptrs = part_ptr + (pid_k * T + rt[:, None]).to(tl.int64) * N + rn[None, :]
        tl.store(ptrs, acc, mask=mask_t[:, None] & mask_n[None, :])


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return _sm_count(_index(device))


_REGION = 1 << 12  # counters per stream (a split launch uses one per output tile)
_REGIONS = 64  # streams per device
_COUNTERS: dict[str, torch.Tensor] = {}  # device -> [_REGIONS * _REGION] int32, zero between launches
_SLOTS: dict[tuple[str, int], int] = {}  # (device, stream) -> its region


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """``n`` zeroed int32 split-K counters that the launch leaves zeroed (see the module doc)."""
    cuda = device.type == "cuda"
    dev = str(device)
    buf = _COUNTERS.get(dev)
    capturing = cuda and torch.cuda.is_current_stream_capturing()
    if buf is None and not capturing:
        buf = torch.zeros(_REGIONS * _REGION, dtype=torch.int32, device=device)
        if cuda:
            torch.cuda.synchronize(device)  # zeroed before any stream uses it
        _COUNTERS[dev] = buf
    key = (dev, torch.cuda.current_stream(device).cuda_stream if cuda else 0)
    if buf is not None and key not in _SLOTS:
        used = sum(d == dev for d, _ in _SLOTS)
        if used < _REGIONS:
            _SLOTS[key] = used
    slot = _SLOTS.get(key)
    if buf is None or slot is None or n > _REGION:
        return torch.zeros(n, dtype=torch.int32, device=device)
    return buf[slot * _REGION:slot * _REGION + n]


@functools.lru_cache(maxsize=None)
def _pdl_supported(device_index: int) -> bool:
    """Programmatic dependent launch: sm_90+ and a Triton that has ``launch_pdl``."""
    from triton.backends.nvidia.compiler import CUDAOptions

    return (torch.cuda.get_device_capability(device_index)[0] >= 9
            and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}))


def _block_k(k: int, unit: int, target: int) -> int:
    """The largest ``unit * 2^i <= max(target, unit)`` that divides K."""
    bk = unit
    while bk * 2 <= target and k % (bk * 2) == 0:
        bk *= 2
    return bk


def _split(tiles: int, k_tiles: int, waves: float, sms: int, max_split: int = 32) -> int:
    """Smallest power-of-two split-K giving ``tiles * split >= waves * sms`` programs."""
    split = 1
    while tiles * split < waves * sms and split * 2 <= k_tiles and split < max_split:
        split *= 2
    return split


# ------------------------------------------------------------------------------------------
# Config table for int4: (shape class, token bucket) -> tile config. Entries: BLOCK_T (tokens
# per program, >= 16: the dot's N), BLOCK_N (weight rows per program: the dot's M), BLOCK_K (a
# target: the largest unit * 2^i <= it dividing K), WAVES (split K until tiles * split >=
# WAVES * SMs; 0: never), num_warps, num_stages (software pipelining: cp.async buffers), XS
# (how the kernel gets each group's sum of x: 0 sums its x tile, 1 reads them from a
# ``[T, K/G]`` fp32 tensor torch computes before the launch, 2 a tensor-core dot with ones),
# PDL (1: programmatic dependent launch where the GPU and Triton have it) and PF (with PDL:
# K tiles per row each program has the L2 prefetch before it waits for the previous kernel).
# bench/sweep_gemv.py measures candidates on the GPU and writes {"table": {...}} with keys
# "<shape class>|<token bucket>"; copy that file to kt_marlin/gemv_table.json (or point
# $KT_MARLIN_GEMV_TABLE at it) and choose_config uses it.

N_CLASSES = ((2048, "n<=2k"), (8192, "n<=8k"), (None, "n>8k"))
K_CLASSES = ((2048, "k<=2k"), (None, "k>2k"))
T_BUCKETS = ((16, "16"), (64, "64"), (None, "prefill"))


def shape_class(n: int, k: int) -> str:
    nc = next(name for lim, name in N_CLASSES if lim is None or n <= lim)
    kc = next(name for lim, name in K_CLASSES if lim is None or k <= lim)
    return f"{nc},{kc}"


def t_bucket(t: int) -> str:
    return next(name for lim, name in T_BUCKETS if lim is None or t <= lim)


def _entry(bt, bn, bk, waves, warps, stages, xs=0, pdl=0, pf=0) -> dict:
    return dict(BLOCK_T=bt, BLOCK_N=bn, BLOCK_K=bk, WAVES=waves, num_warps=warps, num_stages=stages, XS=xs,
                PDL=pdl, PF=pf)


#: Built-in entries, the same for every shape class (the split-K rule adapts them to N): for
#: 1-16 tokens the tile that won most classes of an H200 sweep; above that untimed guesses.
_BY_T = {
    "16": _entry(16, 64, 128, 4, 4, 3, 2),
    "64": _entry(64, 64, 256, 1, 4, 3),
    "prefill": _entry(64, 64, 256, 0, 4, 3),
}
DEFAULT_TABLE = {f"{nc},{kc}|{tb}": dict(e) for _, nc in N_CLASSES for _, kc in K_CLASSES for tb, e in _BY_T.items()}
TABLE_FILE = os.path.join(os.path.dirname(__file__), "gemv_table.json")


def load_table(path: str | None = None) -> dict:
    """``DEFAULT_TABLE`` updated by the ``table`` of a ``sweep_gemv.py`` JSON (if it exists)."""
    table = {k: dict(v) for k, v in DEFAULT_TABLE.items()}
    path = path or os.environ.get("KT_MARLIN_GEMV_TABLE") or TABLE_FILE
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        for key, cfg in data.get("table", data).items():
            if key in table:
                table[key].update({k: v for k, v in cfg.items() if k in table[key]})
    return table


GEMV_TABLE = load_table()


def resolve(entry: dict, t: int, n: int, k: int, group: int, device: torch.device) -> dict:
    """A table entry made concrete for one call: BLOCK_K dividing K, BLOCK_T for T, SPLIT_K."""
    bt = max(16, min(entry["BLOCK_T"], triton.next_power_of_2(t)))
    bk = _block_k(k, packing.mma_unit(group), entry["BLOCK_K"])
    tiles = triton.cdiv(n, entry["BLOCK_N"]) * triton.cdiv(t, bt)
    split = _split(tiles, k // bk, entry["WAVES"], _sms(device)) if entry["WAVES"] else 1
    pdl = bool(entry.get("PDL", 0)) and device.type == "cuda"
    return dict(BLOCK_T=bt, BLOCK_N=entry["BLOCK_N"], BLOCK_K=bk, SPLIT_K=split,
                num_warps=entry["num_warps"], num_stages=entry["num_stages"], XS=entry.get("XS", 0),
                PDL=pdl, PF=entry.get("PF", 0) if pdl else 0)


def int8_config(t: int, n: int, k: int, group: int, device: torch.device) -> dict:
    """Tiles and split-K of the int8 kernel. One token: the best of ``bench/sweep_int8.py`` on
    the H200 (8 warps; 32-row tiles on lm_head-sized N, 256-column steps on long K: Qwen3's
    lm_head 106 µs, DeepSeek-V3's 310 µs, its o_proj 69 µs, against 149 / 398 / 129 µs with
    4 warps and 16 x 128 tiles); more tokens: a heuristic, not tuned."""
    if t == 1:
        cfg = dict(BLOCK_T=1, BLOCK_N=32 if n >= 65536 else 16, BLOCK_K=_block_k(k, group, 256 if k >= 8192 else 128),
                   num_warps=8, num_stages=2)
    elif t <= 64:
        cfg = dict(BLOCK_T=16 if t <= 16 else (32 if t <= 32 else 64), BLOCK_N=32, BLOCK_K=_block_k(k, group, 128),
                   num_warps=4)
    else:
        cfg = dict(BLOCK_T=64, BLOCK_N=64, BLOCK_K=_block_k(k, group, 64), num_warps=4)
    tiles = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(t, cfg["BLOCK_T"])
    cfg["SPLIT_K"] = _split(tiles, k // cfg["BLOCK_K"], 2, _sms(device), 16)
    return cfg


def choose_config(t: int, n: int, k: int, bits: int, group: int, device: torch.device) -> dict:
    """Tile sizes and split-K for one call (host-side, from shapes only)."""
    if bits != 4:
        return int8_config(t, n, k, group, device)
    entry = GEMV_TABLE[f"{shape_class(n, k)}|{t_bucket(t)}"]
    if device.type == "cpu":  # Triton's interpreter: fewer, larger programs run faster
        entry = dict(entry, BLOCK_N=max(entry["BLOCK_N"], 32))
    return resolve(entry, t, n, k, group, device)


def launch(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], bits: int, group: int, config: dict | None = None) -> torch.Tensor:
    """The kernel on ``x[T, K]`` (contiguous rows); ``config`` overrides the heuristic (a resolved
    config: ``BLOCK_T/N/K``, ``SPLIT_K``, ``num_warps``, ``num_stages``, int4 also optionally
    ``XS``, ``PDL``, ``PF`` and ``ASM``: False takes the integer-op unpack on the GPU too)."""
    t, k = x.shape
    n = qweight.shape[0]
    cfg = dict(config or choose_config(t, n, k, bits, group, x.device))
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    split = cfg.pop("SPLIT_K")
    unit = packing.mma_unit(group) if bits == 4 else group
    if k % cfg["BLOCK_K"] or cfg["BLOCK_K"] % unit:
        raise ValueError(f"wq_matmul: BLOCK_K={cfg['BLOCK_K']} must divide K={k} and be a multiple of {unit}")
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(t, cfg["BLOCK_T"]), split)
    dot_ieee = x.dtype == torch.float32 or x.device.type == "cpu"
    b = bias if bias is not None else scales
    part = torch.empty((split, t, n), dtype=torch.float32, device=x.device) if split > 1 else out
    if bits == 4:
        if qweight.dtype != torch.int16:
            raise ValueError("wq_matmul: int4 weights must be in the int16 mma layout (packing.to_mma)")
        cnt = _counters(grid[0] * grid[1], x.device) if split > 1 else out
        asm = cfg.pop("ASM", x.device.type == "cuda")
        cfg.setdefault("XS", 0)
        pdl, pf = bool(cfg.pop("PDL", False)), cfg.pop("PF", 0)
        pdl = pdl and x.device.type == "cuda" and _pdl_supported(_index(x.device))
        # the L2 prefetch needs 16-byte aligned rows (K / 2 bytes: K is a multiple of 64)
        pf = pf if pdl and qweight.data_ptr() % 16 == 0 else 0
        launch_opts = {"launch_pdl": True} if pdl else {}
        # XS 1: each group's sum of x, [T, K/G] fp32, for the kernel's offset term
        xs = x.unflatten(1, (k // group, group)).sum(-1, dtype=torch.float32) if cfg["XS"] == 1 else scales
        with on_device(x):
            int4_kernel[grid](x, xs, qweight, scales, offsets, b, out, part, cnt, t, n, k, k // 4, x.stride(0), split,
                              GROUP=group, MAGIC=1024 if x.dtype == torch.float16 else 128, ASM=asm and not dot_ieee,
                              DOT_IEEE=dot_ieee, HAS_BIAS=bias is not None, USE_SPLIT=split > 1, PDL=pdl, PF=pf,
                              **cfg, **launch_opts)
        return out
    with on_device(x):
        _int8_kernel[grid](x, qweight, scales, out, part, b, t, n, k, x.stride(0),
                           GROUP=group, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
                           USE_DOT=cfg["BLOCK_T"] > 1, DOT_IEEE=dot_ieee, **cfg)
    if split > 1:
        y = part.sum(0)
        if bias is not None:
            y = y + bias.float()
        out.copy_(y)
    return out


@torch.library.custom_op("kt_marlin::wq_matmul", mutates_args=())
def wq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], bits: int, group: int) -> torch.Tensor:
    """``x[T, K] @ W.T (+ bias)`` for a packed int4/int8 ``W``; returns ``[T, N]`` in x's dtype."""
    return launch(x.contiguous(), qweight, scales, offsets, bias, bits, group)


@wq_matmul.register_fake
def _(x, qweight, scales, offsets, bias, bits, group):
    return x.new_empty((x.shape[0], qweight.shape[0]))
