"""The HF model skeleton on the meta device: module names, classes and weight sizes.

Rules are validated and explained against this skeleton before any weight is read: building
it with transformers on the ``meta`` device costs no memory, whatever the model size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ktcore.errors import KtError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModuleInfo:
    """One module of the skeleton."""

    name: str  # dotted name, e.g. "model.layers.3.mlp.experts"
    class_name: str  # HF class name, e.g. "DeepseekV3Experts"
    layer: int | None  # decoder layer index, None outside the layers
    ops: tuple[str, ...]  # operators that can replace it ("linear", "experts", ...)
    param_count: int  # parameters held by the module and its children
    num_experts: int | None = None  # for experts modules


def load_config(path: str | Path):
    """A transformers config from a model directory or a ``config.json`` file."""
    from transformers import AutoConfig

    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise KtError(f"{path}: no config.json found (expected an HF model directory or a config.json file)")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise KtError(f"{config_file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise KtError(f"{config_file}: field 'model_type' is missing")
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError as exc:
        raise KtError(f"{config_file}: unsupported model_type {model_type!r}: {exc}") from None


def build_skeleton(config) -> nn.Module:
    """The transformers causal-LM model of ``config`` with every tensor on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def operators_for(module: nn.Module) -> tuple[str, ...]:
    """Which ktcore operators can stand in for this HF module."""
    cls = type(module).__name__
    if isinstance(module, nn.Linear):
        return ("linear",)
    if cls.endswith("Experts"):
        return ("experts",)
    if cls in ("DeepseekV3Attention", "DeepseekV2Attention"):
        return ("mla",)
    if cls.endswith("RotaryEmbedding"):
        return ("rope",)
    return ()


def inventory(model: nn.Module) -> list[ModuleInfo]:
    """Every named module of ``model`` (the root excluded), in definition order."""
    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        match = _LAYER.match(name + ".")
        count = sum(p.numel() for p in module.parameters())
        experts = getattr(module, "num_experts", None) if type(module).__name__.endswith("Experts") else None
        out.append(ModuleInfo(name, type(module).__name__, int(match.group(1)) if match else None,
                              operators_for(module), count, experts))
    return out


def config_dtype(config) -> torch.dtype:
    """The dtype the checkpoint stores (bf16 when the config does not say)."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
