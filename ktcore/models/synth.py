"""Deterministic random weights for any config: a ``WeightStore`` that computes its tensors.

``SyntheticWeights(config, seed)`` produces every tensor of the model on demand, alone and in
any order, bit-identically on every machine. The loader can materialise a full-size model
straight into memory from it (no tens of GB on disk), and the HF-directory and GGUF writers
stream their files from it.

Names and shapes come from the transformers skeleton on the meta device, so they always
match the architecture; routed experts are exposed stacked (``...mlp.experts.gate|up``
``[E, I, H]``, ``.down`` ``[E, H, I]``) as ``WeightStore`` requires. Buffers the checkpoint
stores (DeepSeek-V3's ``e_score_correction_bias``) are included; rotary tables are not.

Reproducibility: ``torch.randn`` is not used because its CPU kernel differs between ISA
builds (AVX2/AVX-512 vs the default path give different low bits). Values come from a
counter-based generator instead. ``(seed, name, e)`` (``e`` the expert, or none) gets a 64-bit
key from SHA-256 (``tensor_key``). Element ``i`` of that flat tensor lies in block
``i >> 20`` (``BLOCK_ELEMENTS``) at offset ``o = i & (BLOCK_ELEMENTS - 1)``; the block's two
32-bit words ``k0, k1`` come from the key and the block index by SplitMix64 in exact Python
integers (``block_key``), and the element's 32 bits are
``h = F(G(o) ^ k0, k1)``: ``G`` is Wellons' ``lowbias32`` permutation of the offset (a table
computed once per device), ``F`` multiplies, xor-shifts, xors in ``k1``, multiplies and
xor-shifts again (32-bit wrap-around integer arithmetic). Three 10-bit fields of ``h``
(bits 0-9 and 10-19 unsigned, 22-31 read as a signed number) are summed: an Irwin-Hall
variable with mean 1022.5 and standard deviation 512, bounded by +-3 sigma. Everything up to
the final scale is exact integer arithmetic in torch int32 ops (right shifts are masked, since
torch's are arithmetic; products wrap identically on every CPU and on CUDA); centring is
exact in fp32, the scale and the cast to the model dtype are single IEEE roundings. So values
never depend on threads, ISA, chunking, or the device they were computed on
(``SyntheticWeights(..., device="cuda")``).

Speed: the CPU works in chunks of ``CHUNK_ELEMENTS`` that stay in the core's cache, about
twenty in-place torch ops a chunk, spread over a thread pool (torch's own intra-op threads are
turned off meanwhile, so the pool does not oversubscribe the cores); a device works a few
blocks at a time and the results are copied to the CPU.

Scales (``TensorInfo.std``) keep a random model well conditioned: embeddings ~1, linear weights
``1/sqrt(fan_in)`` (unit gain), the projections that write into the residual stream
(``o_proj``, ``down_proj``, expert ``down``) further divided by ``sqrt(2 * layers)`` so the
residual stays O(1), norm weights ``1 + 0.05 z`` (not exactly 1, so an ignored norm weight
shows in a parity test), biases and the router correction bias ``0.05 z``, and ``lm_head``
with gain ``LOGIT_STD`` so logits spread over a few units and greedy decoding is not decided
by near-ties.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from ktcore.errors import WeightError
from ktcore.ops.weights import DenseWeight

#: Elements sharing one block key (the offset in the block is the hash's counter).
BLOCK_ELEMENTS = 1 << 20
#: Elements per CPU work chunk (any divisor of BLOCK_ELEMENTS gives the same values).
CHUNK_ELEMENTS = 1 << 17
#: Blocks per step on a device other than the CPU.
DEVICE_BLOCKS = 16
#: Standard deviation of the logits (``lm_head`` gain on a unit-RMS hidden state).
LOGIT_STD = 2.0
#: Standard deviation of the noise around 1 of norm weights, and of biases.
NORM_NOISE = 0.05
BIAS_STD = 0.05

_VERSION = "ktcore.synth/2"
_IH_MEAN = 1022.5  # mean of u0 + u1 + s2: two uniform 10-bit integers and one signed 10-bit integer
_IH_STD = 512.0  # its standard deviation: sqrt(3 * (1024**2 - 1) / 12) = 511.9998
_RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight")
#: Tensors kept in fp32 whatever the model dtype (as transformers keeps them).
_FP32_TENSORS = ("e_score_correction_bias",)
_MASK64 = (1 << 64) - 1


def _int32(value: int) -> int:
    """The 32-bit pattern ``value`` as a signed int32 (torch's int32 scalars are signed)."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# lowbias32 (C. Wellons, hash-prospector) for G; a second hash-prospector pair for F
_G_MUL = (_int32(0x7FEB352D), _int32(0x846CA68B))
_F_MUL = (_int32(0x21F0AAAD), _int32(0xD35A2D97))


@dataclass(frozen=True)
class TensorInfo:
    """One canonical tensor of the model."""

    name: str
    shape: tuple[int, ...]
    experts: int | None  # E for stacked routed experts (shape[0]), None otherwise
    std: float
    mean: float = 0.0
    fp32: bool = False  # stored in fp32 regardless of the model dtype

    def __post_init__(self) -> None:
        if any(d <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: empty shape {self.shape}")
        if self.experts is not None and self.shape[0] != self.experts:
            raise ValueError(f"{self.name}: stacked shape {self.shape} does not start with {self.experts}")


def canonical_tensors(config) -> dict[str, TensorInfo]:
    """Every canonical tensor of ``config``'s model, in skeleton order, with its init scale."""
    from ktcore.models.skeleton import build_skeleton

    model = build_skeleton(config)
    layers = int(config.num_hidden_layers)
    out: dict[str, TensorInfo] = {}
    seen: set[int] = set()  # tied tensors (lm_head = embed_tokens) are listed once, as checkpoints store them
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        persistent = [(n, b) for n, b in module.named_buffers(recurse=False)
                      if n not in module._non_persistent_buffers_set]
        for local, tensor in list(module.named_parameters(recurse=False)) + persistent:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            name = prefix + local
            if local == "gate_up_proj":  # fused [E, 2I, H] -> gate, up [E, I, H]
                experts, two_i, hidden = tensor.shape
                for part in ("gate", "up"):
                    info = TensorInfo(f"{prefix}{part}", (experts, two_i // 2, hidden), experts,
                                      1.0 / math.sqrt(hidden))
                    out[info.name] = info
            elif local == "down_proj" and tensor.dim() == 3:  # [E, H, I]
                experts, _, inter = tensor.shape
                out[f"{prefix}down"] = TensorInfo(f"{prefix}down", tuple(tensor.shape), experts,
                                                  1.0 / math.sqrt(inter) / math.sqrt(2 * layers))
            else:
                out[name] = _dense_info(name, tuple(tensor.shape), layers)
    return out


def _dense_info(name: str, shape: tuple[int, ...], layers: int) -> TensorInfo:
    fan_in = shape[-1]
    if name.endswith("embed_tokens.weight"):
        return TensorInfo(name, shape, None, 1.0)
    if name.endswith("norm.weight"):  # input_layernorm, q_norm, kv_a_layernorm, model.norm, ...
        return TensorInfo(name, shape, None, NORM_NOISE, mean=1.0)
    if name.endswith(_FP32_TENSORS):
        return TensorInfo(name, shape, None, BIAS_STD, fp32=True)
    if name.endswith(".bias") or len(shape) == 1:
        return TensorInfo(name, shape, None, BIAS_STD)
    if name == "lm_head.weight":
        return TensorInfo(name, shape, None, LOGIT_STD / math.sqrt(fan_in))
    std = 1.0 / math.sqrt(fan_in)
    if name.endswith(_RESIDUAL_OUT):
        std /= math.sqrt(2 * layers)
    return TensorInfo(name, shape, None, std)


def tensor_key(seed: int, name: str, expert: int | None) -> int:
    """The 64-bit key of tensor ``name`` (of expert ``expert``): SHA-256, stable across machines."""
    text = f"{_VERSION}|{seed}|{name}|{'' if expert is None else expert}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def block_key(key: int, block: int) -> tuple[int, int]:
    """The two 32-bit words (as signed int32) of block ``block`` of the tensor keyed ``key``.

    SplitMix64 (Steele et al.) of ``key + (block + 1) * golden``, in exact Python integers.
    """
    z = (key + (block + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return _int32(z), _int32(z >> 32)


def _fp32(value: float) -> float:
    """``value`` rounded to the nearest fp32 (the scalar the kernels multiply by)."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _xorshift_(x: torch.Tensor, tmp: torch.Tensor, shift: int) -> None:
    """``x ^= x >>> shift`` on 32-bit patterns (torch's ``>>`` is arithmetic: mask the sign copies)."""
    torch.bitwise_right_shift(x, shift, out=tmp)
    tmp.bitwise_and_((1 << (32 - shift)) - 1)
    x.bitwise_xor_(tmp)


_G_TABLES: dict[torch.device, torch.Tensor] = {}
_G_LOCK = threading.Lock()


def _offset_table(device: torch.device) -> torch.Tensor:
    """``G(o)`` for every offset of a block, int32 [BLOCK_ELEMENTS], on ``device`` (cached)."""
    with _G_LOCK:
        table = _G_TABLES.get(device)
        if table is None:
            x = torch.arange(BLOCK_ELEMENTS, dtype=torch.int32)
            tmp = torch.empty_like(x)
            _xorshift_(x, tmp, 16)
            x.mul_(_G_MUL[0])
            _xorshift_(x, tmp, 15)
            x.mul_(_G_MUL[1])
            _xorshift_(x, tmp, 16)
            table = _G_TABLES[device] = x.to(device)
        return table


def _draw(offsets: torch.Tensor, k0, k1, x: torch.Tensor, tmp: torch.Tensor, total: torch.Tensor,
          std: float, mean: float) -> torch.Tensor:
    """The fp32 values of ``offsets`` (``G`` of the element offsets) in the block keyed ``k0, k1``.

    ``k0``/``k1`` are int32 scalars, or int32 tensors broadcasting against ``offsets`` (one
    key per row). ``x``, ``tmp`` and ``total`` are int32 work tensors of the result's shape;
    the result is ``x``'s memory viewed as fp32.
    """
    torch.bitwise_xor(offsets, k0, out=x)
    x.mul_(_F_MUL[0])
    _xorshift_(x, tmp, 15)
    x.bitwise_xor_(k1)
    x.mul_(_F_MUL[1])
    _xorshift_(x, tmp, 15)
    torch.bitwise_and(x, 1023, out=total)  # bits 0-9
    torch.bitwise_right_shift(x, 10, out=tmp)
    total.add_(tmp.bitwise_and_(1023))  # bits 10-19
    total.add_(x.bitwise_right_shift_(22))  # bits 22-31, signed: -512..511
    out = x.view(torch.float32)
    out.copy_(total)  # exact
    out.sub_(_IH_MEAN)  # exact: a half-integer below 2**12
    out.mul_(_fp32(std / _IH_STD))  # the one rounding of the draw
    if mean:
        out.add_(_fp32(mean))
    return out


def fill_block_(out: torch.Tensor, key: int, block: int, std: float, mean: float = 0.0, start: int = 0
                ) -> torch.Tensor:
    """Fills the flat fp32 ``out`` [n] with elements ``start .. start + n`` of block ``block`` of
    the tensor keyed ``key`` (values times ``std`` plus ``mean``): the reference for one block."""
    n = out.numel()
    if not 0 <= start <= start + n <= BLOCK_ELEMENTS:
        raise ValueError(f"elements {start}..{start + n} are not inside one block of {BLOCK_ELEMENTS}")
    k0, k1 = block_key(key, block)
    work = torch.empty(3, n, dtype=torch.int32, device=out.device)
    offsets = _offset_table(out.device)[start:start + n]
    out.copy_(_draw(offsets, k0, k1, work[0], work[1], work[2], std, mean))
    return out


@contextlib.contextmanager
def _serial_torch_ops():
    """torch ops on one thread each while our pool runs (restored after): the pool's threads
    would otherwise each start torch's intra-op team on chunks above its grain size."""
    saved = torch.get_num_threads()
    if saved == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


class SyntheticWeights:
    """``WeightStore`` of deterministic random weights for ``config``.

    ``dtype`` is the dtype of the tensors returned (the checkpoint dtype); values are drawn in
    fp32 and rounded once. ``threads`` parallelises large tensors over chunks on the CPU (the
    result does not depend on it); default: torch's intra-op thread count. ``device`` is where
    the values are computed (``"cuda"`` on a GPU host: much faster); the tensors returned are on
    the CPU either way, bit-identical.
    """

    def __init__(self, config, seed: int = 0, dtype: torch.dtype = torch.bfloat16, *,
                 threads: int | None = None, device: str | torch.device = "cpu"):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.config = config
        self.seed = int(seed)
        self.dtype = dtype
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.source = f"synthetic {config.model_type} (seed {self.seed}, {str(dtype).removeprefix('torch.')})"
        self._tensors = canonical_tensors(config)

    # -- WeightStore ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def get(self, name: str) -> DenseWeight:
        return DenseWeight(self.tensor(name), name)

    # -- more ------------------------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise WeightError(f"{self.source}: no tensor {name!r} in this model") from None

    def dtype_of(self, name: str) -> torch.dtype:
        return torch.float32 if self.info(name).fp32 else self.dtype

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor (stacked ``[E, ...]`` for routed experts)."""
        info = self.info(name)
        out = torch.empty(info.shape, dtype=self.dtype_of(name))
        if info.experts is None:
            self._generate(info, [(None, out)])
        else:  # out[e]: [I, H] or [H, I]; expert e drawn exactly as expert() draws it
            self._generate(info, [(e, out[e]) for e in range(info.experts)])
        return out

    def expert(self, name: str, expert: int) -> torch.Tensor:
        """One routed expert of a stacked tensor: ``[I, H]`` (gate/up) or ``[H, I]`` (down)."""
        info = self.info(name)
        if info.experts is None:
            raise WeightError(f"{self.source}: {name!r} is not a routed-experts tensor")
        if not 0 <= expert < info.experts:
            raise WeightError(f"{self.source}: {name!r} has {info.experts} experts, no expert {expert}")
        out = torch.empty(info.shape[1:], dtype=self.dtype_of(name))
        self._generate(info, [(expert, out)])
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every tensor, one at a time (for writers)."""
        for name in self._tensors:
            yield name, self.tensor(name)

    def nbytes(self) -> int:
        """Bytes of all tensors at their dtypes."""
        return sum(math.prod(i.shape) * self.dtype_of(n).itemsize for n, i in self._tensors.items())

    def num_parameters(self) -> int:
        return sum(math.prod(i.shape) for i in self._tensors.values())

    def _generate(self, info: TensorInfo, parts: list[tuple[int | None, torch.Tensor]]) -> None:
        """Fills each contiguous CPU ``out`` of ``parts`` (the tensor, or experts' slices)."""
        keyed = [(tensor_key(self.seed, info.name, expert), out.view(-1)) for expert, out in parts]
        if self.device.type == "cpu":
            self._generate_cpu(info, keyed)
        else:
            self._generate_on_device(info, keyed, self.device)

    def _generate_cpu(self, info: TensorInfo, keyed: list[tuple[int, torch.Tensor]]) -> None:
        jobs = []  # (key, first element, flat destination [<= CHUNK_ELEMENTS], inside one block)
        for key, flat in keyed:
            for start in range(0, flat.numel(), CHUNK_ELEMENTS):
                jobs.append((key, start, flat[start:start + CHUNK_ELEMENTS]))
        threads = min(self.threads, len(jobs))
        with _serial_torch_ops():
            table = _offset_table(torch.device("cpu"))

            def run(worker: int) -> None:
                mine = jobs[worker::threads]
                size = max(dest.numel() for _, _, dest in mine)
                work = torch.empty(3, size, dtype=torch.int32)
                for key, start, dest in mine:
                    n = dest.numel()
                    block, offset = divmod(start, BLOCK_ELEMENTS)
                    k0, k1 = block_key(key, block)
                    dest.copy_(_draw(table[offset:offset + n], k0, k1, work[0, :n], work[1, :n], work[2, :n],
                                     info.std, info.mean))

            if threads > 1:
                with ThreadPoolExecutor(threads, thread_name_prefix="synth") as pool:
                    list(pool.map(run, range(threads)))
            else:
                run(0)

    @staticmethod
    def _generate_on_device(info: TensorInfo, keyed: list[tuple[int, torch.Tensor]], device: torch.device
                            ) -> None:
        """Computes ``DEVICE_BLOCKS`` blocks at a time on ``device`` (one key per row) and copies
        them to the CPU destinations; the same ops and values as the CPU path."""
        table = _offset_table(device)
        for key, flat in keyed:
            n = flat.numel()
            step = DEVICE_BLOCKS * BLOCK_ELEMENTS
            for start in range(0, n, step):
                count = min(step, n - start)
                first = start // BLOCK_ELEMENTS
                blocks = -(-count // BLOCK_ELEMENTS)
                width = BLOCK_ELEMENTS if blocks > 1 else count
                k0, k1 = zip(*(block_key(key, first + b) for b in range(blocks)))
                k0 = torch.tensor(k0, dtype=torch.int32).view(blocks, 1).to(device)
                k1 = torch.tensor(k1, dtype=torch.int32).view(blocks, 1).to(device)
                work = torch.empty(3, blocks, width, dtype=torch.int32, device=device)
                values = _draw(table[:width].view(1, width), k0, k1, work[0], work[1], work[2],
                               info.std, info.mean)
                flat[start:start + count].copy_(values.view(-1)[:count].to(flat.dtype))
