"""``WeightStore``: one view over a model's weight files, whatever their format.

Names are the transformers parameter names of the model (``model.layers.3.self_attn.o_proj.weight``)
with one exception: routed experts are always addressed stacked, as the Experts operator
takes them — ``model.layers.N.mlp.experts.gate`` / ``.up`` ``[E, I, H]`` and ``.down``
``[E, H, I]`` — whether the file stores them per expert (HF checkpoints), fused
(``gate_up_proj``) or stacked (GGUF ``ffn_*_exps``).

``get`` returns a ``WeightSource``: a ``DenseWeight`` for float tensors (read lazily, from a
memory map where the format allows) or a ``GGUFWeight`` holding the raw quantized blocks.
Every error names the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

import torch

from ktcore.ops.weights import WeightSource

#: Suffixes of the stacked expert names.
EXPERT_PARTS = ("gate", "up", "down")


def expert_name(layer: int, part: str, prefix: str = "model.layers") -> str:
    """Canonical stacked-expert tensor name, e.g. ``model.layers.3.mlp.experts.gate``."""
    if part not in EXPERT_PARTS:
        raise ValueError(f"expert part must be one of {EXPERT_PARTS}, got {part!r}")
    return f"{prefix}.{layer}.mlp.experts.{part}"


@runtime_checkable
class WeightStore(Protocol):
    """Read access to the tensors of one model (one or several files)."""

    #: Human-readable origin for messages ("model.gguf", "dir/ (3 safetensors shards)").
    source: str

    def names(self) -> list[str]:
        """Every tensor name, canonical as described above."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical torch shape of ``name`` without reading it."""
        ...

    def get(self, name: str) -> WeightSource:
        """The tensor; raises ``WeightError`` naming the file and tensor when it is missing."""
        ...


def canonical_from_hf(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Canonical ``(name, tensor)`` pairs of a transformers state dict.

    Fused experts ``gate_up_proj [E, 2I, H]`` become ``gate``/``up`` ``[E, I, H]``,
    ``down_proj [E, H, I]`` becomes ``down``; every other tensor keeps its name.
    """
    for name, tensor in state_dict.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            base, inter = name[: -len("gate_up_proj")], tensor.shape[1] // 2
            yield base + "gate", tensor[:, :inter]
            yield base + "up", tensor[:, inter:]
        elif name.endswith(".mlp.experts.down_proj"):
            yield name[: -len("down_proj")] + "down", tensor
        else:
            yield name, tensor
