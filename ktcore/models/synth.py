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
builds (AVX2/AVX-512 vs the default path give different low bits). Each tensor is cut into
blocks of ``BLOCK_ELEMENTS``; block ``b`` of tensor ``name`` (expert ``e``) draws 30-bit
integers from a ``torch.Generator`` seeded with SHA-256 of ``(seed, name, e, b)`` (the
Mersenne Twister stream is fixed by its seed), and sums three 10-bit fields: an Irwin-Hall
variable with mean 1534.5 and standard deviation 512, bounded by +-3 sigma. Everything up to
the final scale is exact integer arithmetic; the scale and the cast are single IEEE
roundings. So values never depend on threads, ISA or block scheduling.

Scales (``TensorInfo.std``) keep a random model well conditioned: embeddings ~1, linear weights
``1/sqrt(fan_in)`` (unit gain), the projections that write into the residual stream
(``o_proj``, ``down_proj``, expert ``down``) further divided by ``sqrt(2 * layers)`` so the
residual stays O(1), norm weights ``1 + 0.05 z`` (not exactly 1, so an ignored norm weight
shows in a parity test), biases and the router correction bias ``0.05 z``, and ``lm_head``
with gain ``LOGIT_STD`` so logits spread over a few units and greedy decoding is not decided
by near-ties.
"""

from __future__ import annotations

import hashlib
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import torch

from ktcore.errors import WeightError
from ktcore.ops.weights import DenseWeight

#: Elements per independently seeded block.
BLOCK_ELEMENTS = 1 << 15
#: Standard deviation of the logits (``lm_head`` gain on a unit-RMS hidden state).
LOGIT_STD = 2.0
#: Standard deviation of the noise around 1 of norm weights, and of biases.
NORM_NOISE = 0.05
BIAS_STD = 0.05

_IH_MEAN = 1534.5  # mean of the sum of three uniform 10-bit integers
_IH_STD = 512.0  # its standard deviation: sqrt(3 * (1024**2 - 1) / 12) = 511.9998
_RESIDUAL_OUT = ("o_proj.weight", "down_proj.weight")
#: Tensors kept in fp32 whatever the model dtype (as transformers keeps them).
_FP32_TENSORS = ("e_score_correction_bias",)
_PARALLEL_MIN_BLOCKS = 8


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


def block_seed(seed: int, name: str, expert: int | None, block: int) -> int:
    """The generator seed of one block (64 bits of SHA-256; stable across machines)."""
    key = f"ktcore.synth/1|{seed}|{name}|{'' if expert is None else expert}|{block}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")


def fill_block_(out: torch.Tensor, seed: int, std: float, mean: float) -> torch.Tensor:
    """Fills the flat fp32 ``out`` [n] with the block's Irwin-Hall values times ``std`` plus ``mean``."""
    n = out.numel()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    bits = torch.empty(n, dtype=torch.int32).random_(0, 1 << 30, generator=gen)  # [n] uniform 30 bits
    total = bits & 1023
    bits >>= 10
    total += bits & 1023
    bits >>= 10
    total += bits  # the top 10 bits; total in [0, 3069], exact
    out.copy_(total)  # exact in fp32
    out.sub_(_IH_MEAN).mul_(std / _IH_STD)  # exact subtraction, one rounding
    if mean:
        out.add_(mean)
    return out


class SyntheticWeights:
    """``WeightStore`` of deterministic random weights for ``config``.

    ``dtype`` is the dtype of the tensors returned (the checkpoint dtype); values are drawn in
    fp32 and rounded once. ``threads`` parallelises large tensors over blocks (the result does
    not depend on it); default: torch's intra-op thread count.
    """

    def __init__(self, config, seed: int = 0, dtype: torch.dtype = torch.bfloat16, *,
                 threads: int | None = None):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
        self.config = config
        self.seed = int(seed)
        self.dtype = dtype
        self.threads = max(1, threads if threads is not None else torch.get_num_threads())
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
        """Fills each contiguous ``out`` of ``parts`` (the tensor, or experts' slices) block by block."""
        jobs = []  # (expert, block index, flat destination [<= BLOCK_ELEMENTS])
        for expert, out in parts:
            flat = out.view(-1)
            for b, start in enumerate(range(0, flat.numel(), BLOCK_ELEMENTS)):
                jobs.append((expert, b, flat[start:start + BLOCK_ELEMENTS]))

        def one(job) -> None:
            expert, b, dest = job
            seed = block_seed(self.seed, info.name, expert, b)
            if dest.dtype == torch.float32:
                fill_block_(dest, seed, info.std, info.mean)
            else:  # draw in fp32, then the single rounding to the model dtype
                dest.copy_(fill_block_(torch.empty(dest.numel()), seed, info.std, info.mean))

        if len(jobs) >= _PARALLEL_MIN_BLOCKS and self.threads > 1:
            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(one, jobs))
        else:
            for job in jobs:
                one(job)
