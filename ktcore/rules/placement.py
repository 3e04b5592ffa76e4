"""Check a rule file against the registry, the devices and a model; turn it into a ``Plan``.

``check_rules(rules, registry, model=None, devices=None)`` is the one entry point: it runs
every check it can (without a model only the model-independent ones), collects all errors
into one ``RuleErrors``, and otherwise returns the ``Plan``: one ``Placement`` per module of
the model that is not part of a replaced module (a split experts module has one per part).
The semantics are written down in docs/rules.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ktcore.backends.registry import Registry, closest
from ktcore.backends.spec import DEVICE_TYPES, BackendSpec
from ktcore.errors import BackendError, KtError
from ktcore.rules.layers import format_ranges
from ktcore.rules.schema import Problems, Rule, RuleFile, SplitPart, read_rules

if TYPE_CHECKING:  # skeleton imports torch; keep ``import ktcore.rules`` light
    from ktcore.models.skeleton import ModuleInfo

_EMPTY: Mapping[str, Any] = MappingProxyType({})


# -- the model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInventory:
    """What the rules are checked against: the skeleton's modules, depth and weight dtype."""

    modules: tuple[ModuleInfo, ...]
    num_layers: int
    dtype: str = "bfloat16"  # torch dtype name of the checkpoint's weights
    source: str = ""

    @classmethod
    def from_config(cls, config, source: str = "") -> "ModelInventory":
        from ktcore.models.skeleton import build_skeleton, config_dtype, inventory

        modules = tuple(inventory(build_skeleton(config)))
        layers = getattr(config, "num_hidden_layers", None)
        if layers is None:
            layers = 1 + max((m.layer for m in modules if m.layer is not None), default=-1)
        return cls(modules, int(layers), str(config_dtype(config)).removeprefix("torch."), source)


def load_model(path: str | Path) -> ModelInventory:
    """``--model``: an HF model directory or a config.json file."""
    from ktcore.models.skeleton import load_config

    return ModelInventory.from_config(load_config(path), str(path))


# -- devices -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSet:
    """The devices rules may name: this host's, or a planned list (``--devices``)."""

    cuda: frozenset[int]
    planned: bool = False

    @classmethod
    def this_host(cls) -> "DeviceSet":
        import torch

        return cls(frozenset(range(torch.cuda.device_count())))

    @classmethod
    def planned_for(cls, devices: Sequence[str] | str) -> "DeviceSet":
        """Exactly these devices (plus cpu, which every host has)."""
        if isinstance(devices, str):
            devices = [d for d in devices.split(",") if d.strip()]
        cuda = set()
        for text in devices:
            device, error = _parse_device(text.strip())
            if error:
                raise KtError(f"--devices: {error}")
            if device.startswith("cuda:"):
                cuda.add(int(device.split(":")[1]))
        return cls(frozenset(cuda), planned=True)

    def names(self) -> tuple[str, ...]:
        return ("cpu",) + tuple(f"cuda:{i}" for i in sorted(self.cuda))

    def check(self, text: str) -> tuple[str | None, str | None]:
        """``(normalised device, None)`` or ``(None, why it cannot be used)``."""
        device, error = _parse_device(text)
        if error:
            return None, error + closest(text, self.names())
        if device == "cpu":
            return device, None
        index = int(device.split(":")[1])
        if index in self.cuda:
            return device, None
        if self.planned:
            return None, f"device {device} is not visible (--devices lists {', '.join(self.names())})"
        n = len(self.cuda)
        where = f"this host has {n} CUDA device{'' if n == 1 else 's'}"
        if "CUDA_VISIBLE_DEVICES" in os.environ:
            where += f", CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
        return None, f"device {device} is not visible ({where})"


def _parse_device(text: str) -> tuple[str, str | None]:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        reason = str(exc)
        if reason.startswith("Expected one of"):
            reason = "unknown device type"
        return "", f"{text!r} is not a device torch accepts ({reason})"
    if device.type not in DEVICE_TYPES:
        return "", f"device {text!r}: ktcore places modules on {' or '.join(DEVICE_TYPES)} devices, not {device.type}"
    if device.type == "cpu":
        return "cpu", None
    return f"cuda:{device.index or 0}", None


# -- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where one module (or one part of a split experts module) goes.

    ``op`` None means: keep the HF implementation, moving the module's own parameters and
    buffers to ``device``. ``params`` counts the parameters this placement holds: the whole
    subtree for a replaced module (its share for a split part), the module's own parameters
    otherwise. ``source`` is "replace", "keep", "inherited" (device of an enclosing keep
    rule, whose line is ``rule_line``) or "default" (the file's default_device).
    """

    module: str
    class_name: str
    layer: int | None
    op: str | None
    backend: str | None
    device: str
    options: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    experts: tuple[int, ...] | None = None  # the split part's experts; None: all
    rule_line: int | None = None
    source: str = "default"
    params: int = 0


@dataclass(frozen=True)
class Plan:
    rules: RuleFile
    model: ModelInventory | None
    placements: tuple[Placement, ...]
    devices: tuple[str, ...]  # the devices checked against
    planned_devices: bool = False  # True: --devices given, backend probes not run
    notes: tuple[str, ...] = ()
    _by_module: dict = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        index: dict[str, list[Placement]] = {}
        for p in self.placements:
            index.setdefault(p.module, []).append(p)
        object.__setattr__(self, "_by_module", index)

    @property
    def replacements(self) -> tuple[Placement, ...]:
        """Placements that swap an HF module for an operator instance."""
        return tuple(p for p in self.placements if p.op is not None)

    def placements_of(self, module: str) -> tuple[Placement, ...]:
        """Empty for modules that are part of a replaced module."""
        return tuple(self._by_module.get(module, ()))

    def device_of(self, module: str) -> str | None:
        parts = self._by_module.get(module)
        return parts[0].device if parts and len({p.device for p in parts}) == 1 else None

    @property
    def module_count(self) -> int:
        return len(self._by_module)


# -- checking ------------------------------------------------------------------------------
def check_rules(rules: RuleFile | str | Path, registry: Registry | None = None,
                model: ModelInventory | None = None, devices: Sequence[str] | str | None = None) -> Plan:
    """Validates ``rules`` and, with a ``model``, places every module.

    ``devices``: check as if exactly these devices were visible (cpu always is) and skip the
    backends' host probes; None: this host's devices and probes. Raises ``RuleErrors`` with
    every error found.
    """
    if isinstance(rules, RuleFile):
        rule_file, errors = rules, []
    else:
        rule_file, errors = read_rules(rules)
    if registry is None:
        registry = Registry.from_entry_points()
    device_set = DeviceSet.this_host() if devices is None else DeviceSet.planned_for(devices)
    p = Problems(rule_file.file)
    p.errors.extend(errors)
    checker = _Checker(rule_file, registry, device_set, p)
    checker.check_host()
    placements: list[Placement] = []
    if model is not None:
        placements = _Planner(checker, model).run()
    p.raise_if_any()
    notes = []
    if device_set.planned:
        notes.append(f"planning for devices {', '.join(device_set.names())}: backend availability probes "
                     "were not run")
    return Plan(rule_file, model, tuple(placements), device_set.names(), device_set.planned, tuple(notes))


class _Checker:
    """Model-independent checks: devices, backends, operators' options."""

    def __init__(self, rule_file: RuleFile, registry: Registry, devices: DeviceSet, problems: Problems):
        self.rules = rule_file
        self.registry = registry
        self.devices = devices
        self.p = problems
        self.specs: dict[tuple[str, str], BackendSpec] = {}
        self.normal: dict[str, str] = {}  # device string as written -> normalised

    def device(self, text: str, line: int) -> str | None:
        device, error = self.devices.check(text)
        if error:
            self.p.add(error, line)
            return None
        self.normal[text] = device
        return device

    def check_host(self) -> None:
        self.device(self.rules.default_device, self.rules.default_device_line)
        for rule in self.rules.rules:
            if rule.keep is not None:
                if rule.keep.device is not None:
                    self.device(rule.keep.device, rule.keep.key_lines.get("device", rule.keep.line))
                continue
            replace = rule.replace
            if replace.split is None:
                self.target(replace.op, replace.backend, replace.device, replace.options, replace.key_lines, replace.line)
            else:
                for part in replace.split:
                    self.target(replace.op, part.backend, part.device, part.options, part.key_lines, part.line)

    def target(self, op: str, backend: str, device: str | None, options: Mapping[str, Any],
               lines: Mapping[str, int], line: int) -> None:
        spec = None
        try:
            spec = self.registry.get(backend, op)
        except BackendError as exc:
            self.p.add(str(exc), lines.get("backend", line))
        normal = self.device(device, lines.get("device", line)) if device is not None else None
        if spec is None:
            return
        self.specs[(backend, op)] = spec
        if normal is not None:
            self.device_type(spec, normal, lines.get("device", line))
        if not self.devices.planned:
            reason = self.registry.unavailable_reason(spec)
            if reason:
                self.p.add(f"backend {backend!r} ({spec.distribution or 'unknown distribution'}) is unavailable "
                           f"on this host: {reason}", lines.get("backend", line))
        for key, value in options.items():
            option_line = lines.get(f"options.{key}", line)
            option = spec.option(key)
            if option is None:
                names = [o.name for o in spec.options]
                self.p.add(f"backend {backend!r} has no option {key!r} for {op!r}{closest(key, names)}; "
                           f"its options: {', '.join(names) or 'none'}", option_line)
                continue
            why = option.check(value)
            if why:
                self.p.add(f"backend {backend!r}: {why}", option_line)

    def device_type(self, spec: BackendSpec, device: str, line: int, inherited: str = "") -> bool:
        kind = device.split(":")[0]
        if kind in spec.devices:
            return True
        self.p.add(f"backend {spec.name!r} cannot run {spec.op!r} on {device}{inherited}: it runs on "
                   f"{', '.join(spec.devices)}", line)
        return False


class _Planner:
    """Walks the model's modules in definition order; first matching rule wins."""

    def __init__(self, checker: _Checker, model: ModelInventory):
        self.c = checker
        self.p = checker.p
        self.rules = checker.rules
        self.model = model
        self.default = checker.normal.get(self.rules.default_device, self.rules.default_device)
        self.layer_sets = {
            r.index: (r.match.layers.resolve(model.num_layers) if r.match.layers is not None else None)
            for r in self.rules.rules
        }
        self.placed = {r.index: 0 for r in self.rules.rules}
        self.owned_hits: dict[int, tuple[str, str, int]] = {}
        self.shadowed_hits: dict[int, tuple[str, int]] = {}
        self.incompatible: dict[int, list[ModuleInfo]] = {r.index: [] for r in self.rules.rules}
        names = {m.name for m in model.modules}
        self.children: dict[str, list[ModuleInfo]] = {}
        for m in model.modules:
            self.children.setdefault(self.parent(m.name, names) or "", []).append(m)
        self.names = names

    @staticmethod
    def parent(name: str, names: set[str]) -> str | None:
        while "." in name:
            name = name.rsplit(".", 1)[0]
            if name in names:
                return name
        return None

    def own_params(self, m: ModuleInfo) -> int:
        return max(0, m.param_count - sum(c.param_count for c in self.children.get(m.name, ())))

    def run(self) -> list[Placement]:
        out: list[Placement] = []
        owner: dict[str, tuple[str, int]] = {}  # module -> (replaced ancestor or itself, its rule line)
        context: dict[str, tuple[str, str, int | None]] = {}  # module -> (device, source, line)
        for m in self.model.modules:
            parent = self.parent(m.name, self.names)
            matching = [r for r in self.rules.rules
                        if r.match.matches(m.name, m.class_name, m.layer, self.layer_sets[r.index])]
            if parent is not None and parent in owner:
                owner[m.name] = owner[parent]
                for r in matching:
                    self.owned_hits.setdefault(r.index, (m.name, *owner[parent]))
                continue
            device, source, line = context.get(parent, (self.default, "default", None))
            if source == "keep":
                source = "inherited"
            winner = None
            for r in matching:
                if not r.can_place(m.ops):
                    self.incompatible[r.index].append(m)
                elif winner is None:
                    winner = r
                else:
                    self.shadowed_hits.setdefault(r.index, (m.name, winner.line))
            if winner is None:
                out.append(Placement(m.name, m.class_name, m.layer, None, None, device, rule_line=line,
                                     source=source, params=self.own_params(m)))
                context[m.name] = (device, source, line)
                continue
            self.placed[winner.index] += 1
            if winner.keep is not None:
                keep_device = winner.keep.device
                if keep_device is not None:
                    device = self.c.normal.get(keep_device, keep_device)
                out.append(Placement(m.name, m.class_name, m.layer, None, None, device, rule_line=winner.line,
                                     source="keep", params=self.own_params(m)))
                context[m.name] = (device, "keep", winner.line)
                continue
            owner[m.name] = (m.name, winner.line)
            out.extend(self.replace(m, winner, device))
        self.report_unplaced()
        return out

    def target_device(self, rule: Rule, device: str | None, inherited: str, backend: str, line: int) -> str:
        if device is not None:
            return self.c.normal.get(device, device)
        spec = self.c.specs.get((backend, rule.replace.op))
        if spec is not None:
            self.c.device_type(spec, inherited, line,
                               inherited=" (the device this module would have; give 'device' in the rule)")
        return inherited

    def replace(self, m: ModuleInfo, rule: Rule, inherited: str) -> list[Placement]:
        r = rule.replace
        if r.split is None:
            device = self.target_device(rule, r.device, inherited, r.backend, r.line)
            return [Placement(m.name, m.class_name, m.layer, r.op, r.backend, device, r.options, None,
                              rule.line, "replace", m.param_count)]
        parts = self.split(m, rule)
        if parts is None:
            return []
        out = []
        total = m.num_experts
        done = 0
        for part, experts in parts:
            device = self.target_device(rule, part.device, inherited, part.backend, part.line)
            before = m.param_count * done // total
            done += len(experts)
            out.append(Placement(m.name, m.class_name, m.layer, r.op, part.backend, device, part.options,
                                 experts, rule.line, "replace", m.param_count * done // total - before))
        return out

    def split(self, m: ModuleInfo, rule: Rule) -> list[tuple[SplitPart, tuple[int, ...]]] | None:
        r = rule.replace
        split_line = r.key_lines.get("split", r.line)
        total = m.num_experts
        if not total:
            self.p.add(f"cannot split {m.name} ({m.class_name}): its number of experts is unknown", split_line)
            return None
        ok = True
        sets: list[tuple[SplitPart, frozenset[int]]] = []
        for part in r.split:
            if part.experts.rest:
                continue
            line = part.key_lines.get("experts", part.line)
            beyond = [i for i in part.experts.beyond(total)]
            if beyond:
                self.p.add(f"split experts {part.experts.text} go past the last expert: the model has {total} "
                           f"experts per layer (0-{total - 1})", line)
                ok = False
            chosen = part.experts.resolve(total)
            if not chosen and not beyond:
                self.p.add(f"split experts {part.experts.text} select no expert of {total}", line)
                ok = False
            for other, other_set in sets:
                both = chosen & other_set
                if both:
                    other_line = other.key_lines.get("experts", other.line)
                    self.p.add(f"experts {format_ranges(both)} are in two split parts (lines {other_line} and "
                               f"{line}; {total} experts per layer)", line)
                    ok = False
            sets.append((part, chosen))
        listed = frozenset().union(*(s for _, s in sets)) if sets else frozenset()
        missing = frozenset(range(total)) - listed
        rest = next((part for part in r.split if part.experts.rest), None)
        if rest is None and missing:
            self.p.add(f"experts {format_ranges(missing)} are in no split part ({total} experts per layer); "
                       "add a part with 'experts: rest'", split_line)
            ok = False
        if rest is not None and not missing and ok:
            self.p.add(f"the 'rest' part gets no expert: the other parts cover all {total}",
                       rest.key_lines.get("experts", rest.line))
            ok = False
        if not ok:
            return None
        out = []
        for part in r.split:
            chosen = missing if part.experts.rest else next(s for q, s in sets if q is part)
            out.append((part, tuple(sorted(chosen))))
        return out

    def report_unplaced(self) -> None:
        for rule in self.rules.rules:
            if self.placed[rule.index]:
                continue
            what = f"rule {rule.index} ({rule.match.describe()})"
            reasons = []
            if rule.index in self.owned_hits:
                name, owner, line = self.owned_hits[rule.index]
                reasons.append(f"what it matches lies inside modules replaced by earlier rules ({name} is part "
                               f"of {owner}, replaced by the rule at line {line})")
            if rule.index in self.shadowed_hits:
                name, line = self.shadowed_hits[rule.index]
                reasons.append(f"every module it matches is placed by an earlier rule ({name} by the rule at line "
                               f"{line}; the first matching rule wins, so put specific rules first)")
            bad = self.incompatible[rule.index]
            if bad and rule.replace is not None:
                op = rule.replace.op
                fits = sorted({m.class_name for m in self.model.modules if op in m.ops})
                reasons.append(f"op {op!r} cannot replace what it matches ({bad[0].name}, a {bad[0].class_name}"
                               f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); "
                               f"{op!r} replaces {', '.join(fits) if fits else 'no module of this model'}")
            if reasons:
                self.p.add(f"{what} matches no module: " + "; ".join(reasons), rule.line)
            else:
                self.p.add(f"{what} matches no module of this model{self.hint(rule)}", rule.line)

    def hint(self, rule: Rule) -> str:
        match = rule.match
        n = self.model.num_layers
        if match.layers is not None:
            chosen = self.layer_sets[rule.index]
            if not chosen:
                return f" (layers {match.layers.text} selects no layer of its {n} layers, 0-{n - 1})"
            if match.module is None and (match.name is not None or match.class_name is not None):
                return (" (layers without module matches the decoder layers model.layers.N themselves; add 'module' "
                        "to select modules inside them)")
        if match.module is not None:
            suffixes = {m.name.split(".", 3)[3] for m in self.model.modules
                        if m.layer is not None and m.name.count(".") >= 3}
            if match.module not in suffixes:
                return closest(match.module, suffixes) or f" (no module named model.layers.N.{match.module})"
        if match.class_name is not None:
            classes = {m.class_name for m in self.model.modules}
            if match.class_name not in classes:
                return closest(match.class_name, classes) or f" (no module of class {match.class_name!r})"
        return ""
