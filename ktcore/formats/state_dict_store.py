"""``StateDictStore``: a transformers model's own tensors seen as a ``WeightStore``.

Used to run ktcore on exactly the weights of a transformers model in memory (the parity
tests and ``kt demo``): transformers' fused experts ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` become the canonical stacked ``gate``/``up``/``down``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ktcore.errors import WeightError
from ktcore.formats.store import canonical_from_hf
from ktcore.ops.weights import DenseWeight


class StateDictStore:
    """Canonical names over a state dict (or a module's ``state_dict()``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor] | nn.Module, source: str = "<state dict>"):
        state = tensors.state_dict() if isinstance(tensors, nn.Module) else dict(tensors)
        self.source = source
        self._tensors = {name: tensor.detach() for name, tensor in canonical_from_hf(state)}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def get(self, name: str) -> DenseWeight:
        return DenseWeight(self._get(name), name)

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise WeightError(f"{self.source}: tensor {name!r} is missing") from None
