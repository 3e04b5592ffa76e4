"""GGUF dequantisation on the GPU: raw GGUF blocks -> fp32/fp16/bf16, bit-exact in fp32 with
``gguf.quants.dequantize``.

Two Triton kernels, specialised per GGUF type by a ``constexpr``:

- the 32-value types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): each program handles ``BLOCK``
  consecutive output values; value ``i`` lives in quant block ``i // QK`` at position
  ``i % QK`` and every byte it needs is gathered from that block (the gathers of
  neighbouring values hit the same bytes, served from L1);
- the K-quants (Q2_K..Q6_K, 256-value super-blocks): each program handles ``NB`` whole
  super-blocks as ``[NB, ...]`` tiles: every quant byte is loaded once, in contiguous
  vectorised runs, and gives its 2/4/8 values by shifts; the fp16 scales and packed
  sub-block scales are loaded once per super-block or sub-block and broadcast (gathering
  them per value made these types load- and integer-bound at ~0.45 of the copy bandwidth).

The output is written in contiguous runs.

Why the float arithmetic matches numpy bit for bit: every product the formats form (fp16
scale x small integer, and that x a 4- or 5-bit quant) fits in fp32's 24-bit mantissa, so it
is exact, and the one rounding left (the add of the min/offset, or Q6_K's single product) is
the same rounding numpy does; a fused multiply-add rounds the same exact product once too.
The cast to fp16/bf16 rounds to nearest-even, as ``torch.Tensor.to`` does.

Registered as ``torch.ops.kt_marlin.dequantize`` (``custom_op`` + ``register_fake``), so it
is opaque to ``torch.compile(fullgraph=True)`` and needs no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ktcore.ops.launch_device import on_device

#: GGUF type name -> (code used by the kernel, values per block, bytes per block).
QTYPES: dict[str, tuple[int, int, int]] = {
    "Q8_0": (0, 32, 34),
    "Q4_0": (1, 32, 18),
    "Q4_1": (2, 32, 20),
    "Q5_0": (3, 32, 22),
    "Q5_1": (4, 32, 24),
    "Q2_K": (5, 256, 84),
    "Q3_K": (6, 256, 110),
    "Q4_K": (7, 256, 144),
    "Q5_K": (8, 256, 176),
    "Q6_K": (9, 256, 210),
}

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _u8(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, offs, mask):
    """The little-endian fp16 at byte ``offs`` as fp32."""
    lo = tl.load(ptr + offs, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offs + 1, mask=mask, other=0).to(tl.uint16)
    return ((hi << 8) | lo).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_min(ptr, base, j, mask):
    """Q4_K/Q5_K: the 6-bit scale and min of sub-block ``j`` (0..7) from scales[12] at ``base``."""
    lo = j < 4
    a = _u8(ptr, base + j, mask)  # scales[j]   (j < 4)
    b = _u8(ptr, base + j + 4, mask)  # scales[j+4]
    c = _u8(ptr, base + j - 4, mask & (j >= 4))  # scales[j-4] (j >= 4)
    sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc, mn


@triton.jit
def _dequant_kernel(src, dst, n_values, QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_values
    blk = offs // QK
    i = (offs % QK).to(tl.int32)
    base = blk * TYPE_SIZE
    if QTYPE == 0:  # Q8_0: d, qs[32] int8; x = q * d
        d = _f16(src, base, mask)
        q = tl.load(src + base + 2 + i, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        y = q * d
    elif QTYPE == 1 or QTYPE == 2:  # Q4_0: d, qs[16]; Q4_1: d, m, qs[16]; value i: nibble i%16, i//16
        head = 2 if QTYPE == 1 else 4
        d = _f16(src, base, mask)
        byte = _u8(src, base + head + (i % 16), mask)
        q = (byte >> ((i // 16) * 4)) & 15
        if QTYPE == 1:
            y = d * (q - 8).to(tl.float32)
        else:
            y = d * q.to(tl.float32) + _f16(src, base + 2, mask)
    else:  # Q5_0: d, qh u32, qs[16]; Q5_1: d, m, qh, qs[16]
        head = 2 if QTYPE == 3 else 4
        d = _f16(src, base, mask)
        byte = _u8(src, base + head + 4 + (i % 16), mask)
        hbyte = _u8(src, base + head + i // 8, mask)
        q = ((byte >> ((i // 16) * 4)) & 15) | (((hbyte >> (i % 8)) & 1) << 4)
        if QTYPE == 3:
            y = d * (q - 16).to(tl.float32)
        else:
            y = d * q.to(tl.float32) + _f16(src, base + 2, mask)
    tl.store(dst + offs, y.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _kquant_kernel(src, dst, n_blocks, QTYPE: tl.constexpr, TYPE_SIZE: tl.constexpr, NB: tl.constexpr):
    """K-quants, ``NB`` whole 256-value super-blocks per program: each quant byte is loaded
    once (contiguous runs of 16 or 32 bytes, vectorised) and yields its 2, 4 or 8 values by
    shifts; the scales are loaded once per sub-block and broadcast over its values."""
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # [NB] super-blocks
    mask = blk < n_blocks
    base = blk * TYPE_SIZE
    out = blk * 256
    if QTYPE == 7 or QTYPE == 8:  # Q4_K / Q5_K: d, dmin, scales[12], (qh[32]), qs[128]; 8 sub-blocks of 32
        c = tl.arange(0, 4)[None, :, None]  # qs chunk of 32 bytes: sub-blocks 2c (low nibbles), 2c+1 (high)
        lane = tl.arange(0, 32)[None, None, :]
        b3, m3 = base[:, None, None], mask[:, None, None]  # [NB, 1, 1]
        full = tl.broadcast_to(m3, (NB, 4, 32))
        d = _f16(src, base, mask)[:, None, None]
        dmin = _f16(src, base + 2, mask)[:, None, None]
        byte = _u8(src, b3 + (16 if QTYPE == 7 else 48) + c * 32 + lane, full)  # [NB, 4, 32]
        if QTYPE == 8:
            hbyte = _u8(src, b3 + 16 + lane, tl.broadcast_to(m3, (NB, 1, 32)))  # [NB, 1, 32]
        for h in tl.static_range(2):
            j = 2 * c + h  # [1, 4, 1] sub-block
            sc, mn = _k_scale_min(src, b3 + 4, j, m3)  # [NB, 4, 1]
            q = (byte >> (4 * h)) & 15
            if QTYPE == 8:
                q = q | (((hbyte >> j) & 1) << 4)
            y = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)  # [NB, 4, 32]
            tl.store(dst + out[:, None, None] + c * 64 + h * 32 + lane, y.to(dst.dtype.element_ty), mask=full)
    else:  # Q2_K, Q3_K, Q6_K: 16 sub-blocks of 16; value half * 128 + k * 32 + g * 16 + m
        hf = tl.arange(0, 2)[None, :, None, None]
        g = tl.arange(0, 2)[None, None, :, None]
        m = tl.arange(0, 16)[None, None, None, :]
        b4, m4 = base[:, None, None, None], mask[:, None, None, None]  # [NB, 1, 1, 1]
        full = tl.broadcast_to(m4, (NB, 2, 2, 16))
        o4 = out[:, None, None, None] + hf * 128 + g * 16 + m  # [NB, 2, 2, 16] value of k = 0
        if QTYPE == 5:  # Q2_K: scales[16], qs[64], d, dmin; q = 2 bits of qs[half * 32 + i % 32]
            d = _f16(src, base + 80, mask)[:, None, None, None]
            dmin = _f16(src, base + 82, mask)[:, None, None, None]
            byte = _u8(src, b4 + 16 + hf * 32 + g * 16 + m, full)
            for k in tl.static_range(4):
                sc = _u8(src, b4 + hf * 8 + 2 * k + g, m4)  # [NB, 2, 2, 1]
                q = (byte >> (2 * k)) & 3
                y = (d * (sc & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (sc >> 4).to(tl.float32)
                tl.store(dst + o4 + k * 32, y.to(dst.dtype.element_ty), mask=full)
        elif QTYPE == 6:  # Q3_K: hmask[32], qs[64], scales[12], d
            d = _f16(src, base + 108, mask)[:, None, None, None]
            byte = _u8(src, b4 + 32 + hf * 32 + g * 16 + m, full)
            hm = _u8(src, b4 + g * 16 + m, tl.broadcast_to(m4, (NB, 1, 2, 16)))  # hmask[i % 32]
            for k in tl.static_range(4):
                j = hf * 8 + 2 * k + g  # [1, 2, 2, 1]
                low = _u8(src, b4 + 96 + j % 8, m4)
                high = _u8(src, b4 + 104 + j % 4, m4)
                sc = ((low >> ((j // 8) * 4)) & 15) | (((high >> ((j // 4) * 2)) & 3) << 4)
                ql = (byte >> (2 * k)) & 3
                hbit = ((hm >> (hf * 4 + k)) & 1) ^ 1
                y = (d * (sc - 32).to(tl.float32)) * (ql - (hbit << 2)).to(tl.float32)
                tl.store(dst + o4 + k * 32, y.to(dst.dtype.element_ty), mask=full)
        else:  # Q6_K: ql[128], qh[64], scales[16] int8, d; k = 2 * s + p
            d = _f16(src, base + 208, mask)[:, None, None, None]
            qh = _u8(src, b4 + 128 + hf * 32 + g * 16 + m, full)
            for p in tl.static_range(2):
                lbyte = _u8(src, b4 + hf * 64 + p * 32 + g * 16 + m, full)  # ql[half * 64 + i % 64]
                for s in tl.static_range(2):
                    k = 2 * s + p
                    sc = tl.load(src + b4 + 192 + hf * 8 + 2 * k + g, mask=m4, other=0)
                    sc = sc.to(tl.int8, bitcast=True).to(tl.float32)  # [NB, 2, 2, 1]
                    lo = (lbyte >> (4 * s)) & 15
                    hi = (qh >> (2 * k)) & 3
                    y = (d * sc) * ((lo | (hi << 4)) - 32).to(tl.float32)
                    tl.store(dst + o4 + k * 32, y.to(dst.dtype.element_ty), mask=full)


#: K-quant type -> (super-blocks per program, warps): within ~5% of the best point of the
#: H200 sweep for every type (bench/results/nvidia-h200_bench_dequant.md)
KQUANT_CONFIG: dict[str, tuple[int, int]] = {q: (16, 4) for q in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")}


def launch(data: torch.Tensor, out: torch.Tensor, qtype: str, config: tuple[int, int] | None = None) -> None:
    """Dequantise the GGUF blocks ``data`` (uint8, contiguous) into ``out`` (contiguous);
    ``config`` (super-blocks per program, warps) overrides ``KQUANT_CONFIG`` for K-quants."""
    code, qk, type_size = QTYPES[qtype]
    n = out.numel()
    if not n:
        return
    with on_device(data):
        if qk == 256:
            nb, warps = config or KQUANT_CONFIG[qtype]
            blocks = n // 256
            _kquant_kernel[(triton.cdiv(blocks, nb),)](data, out, blocks, QTYPE=code, TYPE_SIZE=type_size, NB=nb,
                                                       num_warps=warps)
        else:
            block = 1024
            _dequant_kernel[(triton.cdiv(n, block),)](
                data, out, n, QTYPE=code, QK=qk, TYPE_SIZE=type_size, BLOCK=block, num_warps=4)


def _dtype_code(dtype: torch.dtype) -> int:
    return _OUT_DTYPES.index(dtype)


@torch.library.custom_op("kt_marlin::dequantize", mutates_args=())
def _dequantize_op(data: torch.Tensor, qtype: str, shape: list[int], dtype_code: int) -> torch.Tensor:
    out = torch.empty(shape, dtype=_OUT_DTYPES[dtype_code], device=data.device)
    launch(data, out, qtype)
    return out


@_dequantize_op.register_fake
def _(data, qtype, shape, dtype_code):
    return data.new_empty(shape, dtype=_OUT_DTYPES[dtype_code])


def dequantize(data: torch.Tensor, qtype: str, shape: tuple[int, ...] | list[int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GGUF blocks ``data`` (uint8, any shape, contiguous) of ``qtype`` -> a tensor of torch
    ``shape`` in ``dtype`` (fp32/fp16/bf16) on ``data``'s device."""
    if qtype not in QTYPES:
        raise ValueError(f"kt_marlin.dequantize: GGUF type {qtype} is not supported (supported: {', '.join(QTYPES)})")
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"kt_marlin.dequantize: output dtype {dtype} is not fp32, fp16 or bf16")
    if data.dtype != torch.uint8:
        raise ValueError(f"kt_marlin.dequantize: data must be uint8 bytes, got {data.dtype}")
    _, qk, type_size = QTYPES[qtype]
    n = 1
    for dim in shape:
        n *= int(dim)
    if n % qk or data.numel() != n // qk * type_size:
        raise ValueError(f"kt_marlin.dequantize: {qtype} data of {data.numel()} bytes does not hold shape {list(shape)}")
    return torch.ops.kt_marlin.dequantize(data.contiguous(), qtype, [int(s) for s in shape], _dtype_code(dtype))


def dequantize_weight(weight, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> torch.Tensor:
    """A ``ktcore.ops.weights.GGUFWeight`` dequantised on ``device`` (default: where its data is)."""
    data = weight.data if device is None else weight.data.to(device)
    return dequantize(data.reshape(-1), weight.qtype, weight.shape, dtype)
