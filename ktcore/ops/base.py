"""What every operator implementation has in common.

An operator instance is an ``nn.Module`` built in two steps, so that a model can be laid out
before any weight is read:

1. ``Cls(spec, device, options)`` — the frozen spec of the operator (shapes, config), the
   torch device it runs on, and the backend options from the rule file. No weights yet.
2. ``instance.load_weights({name: WeightSource})`` — called once; the backend packs the
   weights into its own format on its device. Names are listed by ``weight_names()``.

After that, ``forward`` has the signature of the operator interface (see each interface
module). Backends subclass the interface class of their operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ktcore.errors import WeightError
from ktcore.ops.weights import WeightSource, as_weight


class Operator(nn.Module):
    """Base of the four operator interfaces (Linear, Experts, MLA, RoPE)."""

    #: Operator name as used in rule files ("linear", "experts", "mla", "rope").
    op_name: ClassVar[str] = ""

    def __init__(self, spec: Any, device: str | torch.device = "cpu", options: Mapping[str, Any] | None = None):
        super().__init__()
        self.spec = spec
        self.device = torch.device(device)
        self.options = dict(options or {})
        self.loaded = False

    def weight_names(self) -> tuple[str, ...]:
        """The weight names ``load_weights`` expects, each with ``expected_shape``; by default
        those of ``spec.weight_shapes()``."""
        return tuple(self.spec.weight_shapes())

    def expected_shape(self, name: str) -> tuple[int, ...]:
        shapes = self.spec.weight_shapes()
        if name not in shapes:
            raise KeyError(f"{type(self).__name__} has no weight named {name!r}")
        return shapes[name]

    def load_weights(self, weights: Mapping[str, "WeightSource | torch.Tensor"]) -> None:
        """Checks names and shapes, then hands the sources to ``pack`` (once)."""
        missing = [n for n in self.weight_names() if n not in weights]
        if missing:
            raise WeightError(f"{type(self).__name__}: missing weight(s) {', '.join(missing)}")
        unknown = [n for n in weights if n not in self.weight_names()]
        if unknown:
            raise WeightError(f"{type(self).__name__}: unexpected weight(s) {', '.join(unknown)}")
        sources = {}
        for name in self.weight_names():
            source = as_weight(weights[name], name)
            if tuple(source.shape) != self.expected_shape(name):
                label = name if source.name == "<tensor>" else source.name
                raise WeightError(
                    f"tensor {label!r}: shape {list(source.shape)} does not match the expected "
                    f"{list(self.expected_shape(name))} for {type(self).__name__}.{name}"
                )
            sources[name] = source
        self.pack(sources)
        self.loaded = True

    def pack(self, sources: Mapping[str, WeightSource]) -> None:
        """Converts the checked sources into this backend's format on ``self.device``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"spec={self.spec}, device={self.device}"
