"""Render a ``Plan``: the placement table (layer ranges folded) and the bytes per device.

Rows partition the model's parameters, so the per-device totals add up to the whole model:

- a replaced module is one row (one per split part) holding its whole subtree;
- a module no rule placed, whose subtree no rule touches, is one row with its whole subtree
  (``model.layers.{0-2}.input_layernorm``), unless an enclosing module's row already has it;
- a module a keep rule placed is a row (its subtree when no other rule touches it, else its
  own parameters); other modules that rules reach into only show when they hold parameters
  of their own (``all_modules`` shows every module).

Rows that differ only in the decoder layer index are folded: ``model.layers.{1-2,5}.mlp.experts``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ktcore.rules.layers import format_ranges
from ktcore.rules.placement import Placement, Plan

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
                "half": 2, "float64": 8, "double": 8, "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1}
DEFAULT_GROUP_SIZE = 128


def bytes_per_param(dtype: str) -> float:
    if dtype in _DTYPE_BYTES:
        return _DTYPE_BYTES[dtype]
    import torch

    value = getattr(torch, dtype, None)
    return value.itemsize if isinstance(value, torch.dtype) else 2


def weight_bytes(params: int, options: Mapping[str, Any], model_dtype: str) -> int:
    """Bytes ``params`` weights take under a placement's options.

    ``format: int8``: 1 byte each plus an fp16 scale per group; ``format: int4``: half a byte
    each plus an fp16 scale and an fp16 zero per group (groups of ``group_size``, default 128,
    counted over the flattened weights); ``dtype``: that dtype; else the checkpoint's dtype.
    """
    if params <= 0:
        return 0
    fmt = str(options.get("format", "")).lower()
    group = options.get("group_size", DEFAULT_GROUP_SIZE)
    group = group if isinstance(group, int) and not isinstance(group, bool) and group > 0 else DEFAULT_GROUP_SIZE
    groups = math.ceil(params / group)
    if fmt == "int8":
        return params + 2 * groups
    if fmt == "int4":
        return math.ceil(params / 2) + 4 * groups
    dtype = options.get("dtype")
    size = bytes_per_param(str(dtype)) if dtype else bytes_per_param(model_dtype)
    return int(params * size)


@dataclass(frozen=True)
class Row:
    module: str  # display name, layers folded
    modules: tuple[str, ...]
    layers: tuple[int, ...]
    class_name: str
    op: str | None
    backend: str | None
    device: str
    experts: tuple[int, ...] | None
    options: Mapping[str, Any]
    source: str
    rule_line: int | None
    params: int
    bytes: int

    @property
    def experts_text(self) -> str:
        if self.experts is not None:
            return format_ranges(self.experts)
        return "all" if self.op == "experts" else "-"

    @property
    def rule_text(self) -> str:
        if self.source == "default":
            return "default_device"
        if self.source == "inherited":
            return f"line {self.rule_line} (inherited)"
        return f"line {self.rule_line}"


def rows(plan: Plan, all_modules: bool = False) -> list[Row]:
    """The folded placement table."""
    if plan.model is None:
        return []
    modules = {m.name: m for m in plan.model.modules}
    placed = {p.module for p in plan.placements}
    ruled = {p.module for p in plan.placements if p.source in ("keep", "replace")}
    touched: dict[str, bool] = {}  # some placed descendant was placed by a rule
    for m in reversed(plan.model.modules):
        parent = _parent(m.name, modules)
        if parent is not None and m.name in placed:
            touched[parent] = touched.get(parent, False) or touched.get(m.name, False) or m.name in ruled

    def is_uniform(name: str) -> bool:
        return not touched.get(name, False)

    picked: list[tuple[Placement, int]] = []
    for p in plan.placements:
        m = modules[p.module]
        parent = _parent(p.module, modules)
        if all_modules or p.source == "replace":
            picked.append((p, p.params))
        elif is_uniform(p.module):
            if p.source == "keep" or parent is None or not is_uniform(parent) or parent not in placed:
                picked.append((p, m.param_count))
        elif p.source == "keep" or p.params > 0:
            picked.append((p, p.params))

    folded: dict[tuple, dict[str, Any]] = {}
    for p, params in picked:
        prefix = f"model.layers.{p.layer}"
        if p.layer is not None and (p.module == prefix or p.module.startswith(prefix + ".")):
            pattern = ("layers", p.module[len(prefix):])
        else:
            pattern = ("name", p.module)
        key = (pattern, p.op, p.backend, p.device, p.experts, tuple(sorted(p.options.items())), p.source,
               p.rule_line)
        entry = folded.setdefault(key, dict(placement=p, modules=[], layers=[], params=0, bytes=0))
        entry["modules"].append(p.module)
        if p.layer is not None:
            entry["layers"].append(p.layer)
        entry["params"] += params
        entry["bytes"] += weight_bytes(params, p.options, plan.model.dtype)

    out = []
    for (pattern, *_), e in folded.items():
        p = e["placement"]
        if pattern[0] == "layers":
            layers = e["layers"]
            spec = format_ranges(layers)
            name = f"model.layers.{spec}{pattern[1]}" if len(set(layers)) == 1 else f"model.layers.{{{spec}}}{pattern[1]}"
        else:
            name = pattern[1]
        out.append(Row(name, tuple(e["modules"]), tuple(sorted(set(e["layers"]))), p.class_name, p.op, p.backend,
                       p.device, p.experts, dict(p.options), p.source, p.rule_line, e["params"], e["bytes"]))
    return out


def device_totals(table: list[Row]) -> dict[str, int]:
    """Bytes per device, GPUs first."""
    totals: dict[str, int] = {}
    for row in table:
        totals[row.device] = totals.get(row.device, 0) + row.bytes
    return dict(sorted(totals.items(), key=lambda kv: _device_order(kv[0])))


def _device_order(device: str) -> tuple:
    kind, _, index = device.partition(":")
    return (kind == "cpu", kind, int(index) if index.isdigit() else 0)


def _parent(name: str, modules: Mapping[str, Any]) -> str | None:
    while "." in name:
        name = name.rsplit(".", 1)[0]
        if name in modules:
            return name
    return None


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def to_json(plan: Plan, all_modules: bool = False) -> dict[str, Any]:
    table = rows(plan, all_modules)
    totals = device_totals(table)
    model = plan.model
    return {
        "rules": plan.rules.file,
        "model": model.source if model else None,
        "dtype": model.dtype if model else None,
        "num_layers": model.num_layers if model else None,
        "default_device": plan.rules.default_device,
        "devices_checked": list(plan.devices),
        "planned_devices": plan.planned_devices,
        "probes_run": not plan.planned_devices,
        "notes": list(plan.notes),
        "rows": [
            {
                "module": r.module, "modules": list(r.modules), "layers": list(r.layers), "class": r.class_name,
                "op": r.op, "backend": r.backend, "device": r.device,
                "experts": list(r.experts) if r.experts is not None else None, "experts_text": r.experts_text,
                "options": r.options, "source": r.source, "rule_line": r.rule_line,
                "params": r.params, "bytes": r.bytes,
            }
            for r in table
        ],
        "devices": totals,
        "total_bytes": sum(totals.values()),
    }


def to_json_text(plan: Plan, all_modules: bool = False) -> str:
    return json.dumps(to_json(plan, all_modules), indent=2, default=str)


def to_text(plan: Plan, all_modules: bool = False) -> str:
    table = rows(plan, all_modules)
    model = plan.model
    lines = [f"rules: {plan.rules.file}"]
    if model is not None:
        lines.append(f"model: {model.source or '<config>'} ({model.num_layers} layers, weights {model.dtype})")
    header = ("module", "op", "backend", "device", "experts", "bytes", "rule")
    body = [(r.module, r.op or "keep", r.backend or "-", r.device, r.experts_text, human_bytes(r.bytes), r.rule_text)
            for r in table]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    for row in [header, *body]:
        cells = [cell.rjust(w) if i == 5 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    totals = device_totals(table)
    lines.append("")
    lines.append("bytes per device:")
    width = max([len(d) for d in totals] + [5])
    for device, n in totals.items():
        lines.append(f"  {device.ljust(width)}  {n:>15,}  ({human_bytes(n)})")
    total = sum(totals.values())
    lines.append(f"  {'total'.ljust(width)}  {total:>15,}  ({human_bytes(total)})")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
