"""GGUF dequantisation on the GPU: raw GGUF blocks -> fp32/fp16/bf16, bit-exact in fp32 with
``gguf.quants.dequantize``.

One Triton kernel, specialised per GGUF type by a ``constexpr``: each program handles
``BLOCK`` consecutive output values; value ``i`` lives in quant block ``i // QK`` at position
``i % QK`` and every byte it needs (quants, high bits, packed sub-block scales, fp16 super-
scales) is gathered from that block. The gathers of neighbouring values hit the same bytes,
so they are served from L1; the output is written in contiguous runs.

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
    elif QTYPE == 3 or QTYPE == 4:  # Q5_0: d, qh u32, qs[16]; Q5_1: d, m, qh, qs[16]
        head = 2 if QTYPE == 3 else 4
        d = _f16(src, base, mask)
        byte = _u8(src, base + head + 4 + (i % 16), mask)
        hbyte = _u8(src, base + head + i // 8, mask)
        q = ((byte >> ((i // 16) * 4)) & 15) | (((hbyte >> (i % 8)) & 1) << 4)
        if QTYPE == 3:
            y = d * (q - 16).to(tl.float32)
        else:
            y = d * q.to(tl.float32) + _f16(src, base + 2, mask)
    elif QTYPE == 5:  # Q2_K: scales[16], qs[64], d, dmin; 16 sub-blocks of 16
        d = _f16(src, base + 80, mask)
        dmin = _f16(src, base + 82, mask)
        sc = _u8(src, base + i // 16, mask)
        half = i // 128  # two halves of 128 values, 32 qs bytes each
        r = i % 128
        byte = _u8(src, base + 16 + half * 32 + (r % 32), mask)
        q = (byte >> ((r // 32) * 2)) & 3
        dl = d * (sc & 15).to(tl.float32)
        ml = dmin * (sc >> 4).to(tl.float32)
        y = dl * q.to(tl.float32) - ml
    elif QTYPE == 6:  # Q3_K: hmask[32], qs[64], scales[12], d; 16 sub-blocks of 16
        d = _f16(src, base + 108, mask)
        j = i // 16  # sub-block
        low = _u8(src, base + 96 + (j % 8), mask)
        high = _u8(src, base + 104 + (j % 4), mask)
        sc = ((low >> ((j // 8) * 4)) & 15) | (((high >> ((j // 4) * 2)) & 3) << 4)
        half = i // 128
        r = i % 128
        byte = _u8(src, base + 32 + half * 32 + (r % 32), mask)
        ql = (byte >> ((r // 32) * 2)) & 3
        hm = _u8(src, base + (i % 32), mask)
        hbit = ((hm >> (i // 32)) & 1) ^ 1
        y = (d * (sc - 32).to(tl.float32)) * (ql - (hbit << 2)).to(tl.float32)
    elif QTYPE == 7 or QTYPE == 8:  # Q4_K / Q5_K: d, dmin, scales[12], (qh[32]), qs[128]
        d = _f16(src, base, mask)
        dmin = _f16(src, base + 2, mask)
        j = i // 32
        sc, mn = _k_scale_min(src, base + 4, j, mask)
        qs0 = 16 if QTYPE == 7 else 48
        byte = _u8(src, base + qs0 + (j // 2) * 32 + (i % 32), mask)
        q = (byte >> ((j % 2) * 4)) & 15
        if QTYPE == 8:
            hbyte = _u8(src, base + 16 + (i % 32), mask)
            q = q | (((hbyte >> j) & 1) << 4)
        y = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
    else:  # Q6_K: ql[128], qh[64], scales[16] int8, d; 16 sub-blocks of 16
        d = _f16(src, base + 208, mask)
        sc = tl.load(src + base + 192 + i // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        half = i // 128
        r = i % 128
        lbyte = _u8(src, base + half * 64 + (r % 64), mask)
        ql = (lbyte >> ((r // 64) * 4)) & 15
        hbyte = _u8(src, base + 128 + half * 32 + (r % 32), mask)
        qh = (hbyte >> ((r // 32) * 2)) & 3
        y = (d * sc) * ((ql | (qh << 4)) - 32).to(tl.float32)
    tl.store(dst + offs, y.to(dst.dtype.element_ty), mask=mask)


def _dtype_code(dtype: torch.dtype) -> int:
    return _OUT_DTYPES.index(dtype)


@torch.library.custom_op("kt_marlin::dequantize", mutates_args=())
def _dequantize_op(data: torch.Tensor, qtype: str, shape: list[int], dtype_code: int) -> torch.Tensor:
    code, qk, type_size = QTYPES[qtype]
    out = torch.empty(shape, dtype=_OUT_DTYPES[dtype_code], device=data.device)
    n = out.numel()
    if n:
        block = 1024
        with torch.device(data.device):
            _dequant_kernel[(triton.cdiv(n, block),)](
                data, out, n, QTYPE=code, QK=qk, TYPE_SIZE=type_size, BLOCK=block, num_warps=4)
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
