"""A rule file as frozen dataclasses, built from located YAML with every structural error
collected (unknown keys with the closest valid key, wrong types, bad regexes and ranges,
unknown operators, split parts that name ``rest`` twice or overlap).

Checks that need the backend registry, the host's devices or a model live in
``ktcore.rules.placement``. A rule with a structural error is left out of the ``RuleFile``
the builder returns, so that the other rules can still be checked and every error reported
at once.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ktcore.backends.registry import closest
from ktcore.errors import KtError, RuleError
from ktcore.ops import OPERATORS
from ktcore.rules.layers import IndexSet, format_ranges, parse_range
from ktcore.rules.yaml_lines import LineDict, load_yaml

TOP_KEYS = ("default_device", "rules")
RULE_KEYS = ("match", "replace", "keep")
MATCH_KEYS = ("name", "class", "layers", "module")
REPLACE_KEYS = ("op", "backend", "device", "options", "split")
KEEP_KEYS = ("device",)
SPLIT_KEYS = ("experts", "backend", "device", "options")

_MODULE = re.compile(r"^[A-Za-z_0-9]+(\.[A-Za-z_0-9]+)*$")
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class RuleErrors(KtError):
    """Every error found in a rule file; ``str()`` is one ``file:line: message`` per line."""

    def __init__(self, errors: list[RuleError]):
        unique: dict[str, RuleError] = {}
        for e in errors:
            unique.setdefault(str(e), e)
        self.errors = sorted(unique.values(), key=lambda e: (e.file or "", e.line or 0))
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class Problems:
    """Collects ``RuleError``s for one file."""

    def __init__(self, file: str):
        self.file = file
        self.errors: list[RuleError] = []

    def add(self, message: str, line: int | None) -> None:
        self.errors.append(RuleError(message, self.file, line))

    def raise_if_any(self) -> None:
        if self.errors:
            raise RuleErrors(self.errors)


# -- the model -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Match:
    """Which modules a rule selects; every given key must hold."""

    line: int
    name: str | None = None  # regex, re.search on the dotted module name
    class_name: str | None = None  # exact HF class name
    layers: IndexSet | None = None  # decoder layer indices
    module: str | None = None  # dotted name after "model.layers.N."
    pattern: re.Pattern | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.name is None and self.class_name is None and self.layers is None and self.module is None:
            raise ValueError(f"match needs at least one of {', '.join(MATCH_KEYS)}")
        if self.name is not None:
            object.__setattr__(self, "pattern", re.compile(self.name))

    def matches(self, name: str, class_name: str, layer: int | None, layer_set: frozenset[int] | None) -> bool:
        """``layer_set``: the resolved ``layers`` for the model (None when not given)."""
        if self.class_name is not None and class_name != self.class_name:
            return False
        if self.layers is not None or self.module is not None:
            if layer is None or (layer_set is not None and layer not in layer_set):
                return False
            expected = f"model.layers.{layer}" + (f".{self.module}" if self.module else "")
            if name != expected:
                return False
        return self.pattern is None or self.pattern.search(name) is not None

    def describe(self) -> str:
        parts = []
        if self.name is not None:
            parts.append(f"name {self.name!r}")
        if self.class_name is not None:
            parts.append(f"class {self.class_name!r}")
        if self.layers is not None:
            parts.append(f"layers {self.layers.text}")
        if self.module is not None:
            parts.append(f"module {self.module!r}")
        return ", ".join(parts)


@dataclass(frozen=True)
class SplitPart:
    """Some experts of a layer on one backend and device."""

    experts: IndexSet  # .rest: every expert the other parts do not list
    backend: str
    device: str | None  # None: the device the module would have had (see docs/rules.md)
    options: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    line: int = 0
    key_lines: Mapping[str, int] = field(default_factory=lambda: _EMPTY, compare=False, repr=False)


@dataclass(frozen=True)
class Replace:
    """Replace the module by operator ``op`` of ``backend`` on ``device``, or ``split`` it."""

    op: str
    backend: str | None
    device: str | None
    options: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    split: tuple[SplitPart, ...] | None = None
    line: int = 0
    key_lines: Mapping[str, int] = field(default_factory=lambda: _EMPTY, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"unknown operator {self.op!r}")
        if self.split is None and self.backend is None:
            raise ValueError("replace needs a backend (or a split for op experts)")
        if self.split is not None:
            if self.op != "experts" or self.backend is not None or not self.split:
                raise ValueError("split is a non-empty list of parts for op experts, without a top-level backend")
            if sum(p.experts.rest for p in self.split) > 1:
                raise ValueError("at most one split part may be 'rest'")


@dataclass(frozen=True)
class Keep:
    """Keep the HF implementation; ``device`` (or the inherited one) for it and its subtree."""

    device: str | None
    line: int = 0
    key_lines: Mapping[str, int] = field(default_factory=lambda: _EMPTY, compare=False, repr=False)


@dataclass(frozen=True)
class Rule:
    index: int  # 1-based position in the file's rules list
    line: int
    match: Match
    action: Replace | Keep

    @property
    def replace(self) -> Replace | None:
        return self.action if isinstance(self.action, Replace) else None

    @property
    def keep(self) -> Keep | None:
        return self.action if isinstance(self.action, Keep) else None

    def can_place(self, ops: tuple[str, ...]) -> bool:
        """Keep rules apply to any module; replace rules only where their op fits."""
        return self.keep is not None or self.action.op in ops


@dataclass(frozen=True)
class RuleFile:
    file: str
    default_device: str
    rules: tuple[Rule, ...]
    default_device_line: int = 1
    rule_count: int = 0  # rules in the file, including those left out for errors

    def __post_init__(self) -> None:
        if not isinstance(self.default_device, str) or not self.default_device:
            raise ValueError("default_device must be a device string")


# -- building ------------------------------------------------------------------------------
def read_rules(path: str | Path, display: str | None = None) -> tuple[RuleFile, list[RuleError]]:
    """Reads and builds a rule file; returns it (valid rules only) and the errors found."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KtError(f"{path}: no such rule file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KtError(f"{path}: cannot read rule file: {exc}") from None
    return parse_rules(text, display or str(path))


def load_rules(path: str | Path) -> RuleFile:
    """A rule file with no structural error, else ``RuleErrors`` listing all of them."""
    rule_file, errors = read_rules(path)
    if errors:
        raise RuleErrors(errors)
    return rule_file


def parse_rules(text: str, file: str = "<rules>") -> tuple[RuleFile, list[RuleError]]:
    try:
        data, yaml_problems = load_yaml(text, file)
    except RuleError as exc:
        return RuleFile(file, "cpu", ()), [exc]
    p = Problems(file)
    p.errors.extend(yaml_problems)
    return _Builder(p).rule_file(data, file), p.errors


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class _Builder:
    def __init__(self, problems: Problems):
        self.p = problems

    def keys(self, mapping: LineDict, allowed: tuple[str, ...], where: str) -> bool:
        """Reports unknown keys; True when there were none."""
        ok = True
        for key in mapping:
            if key not in allowed:
                hint = closest(str(key), allowed)
                self.p.add(f"unknown key {key!r} in {where}{hint}; valid keys: {', '.join(allowed)}",
                           mapping.line_of(key))
                ok = False
        return ok

    @staticmethod
    def misspelled(mapping: LineDict, key: str) -> bool:
        """Some unknown key of ``mapping`` is a near miss of ``key`` (already reported)."""
        return any(isinstance(k, str) and k != key and difflib.get_close_matches(k, [key], cutoff=0.5)
                   for k in mapping)

    def string(self, mapping: LineDict, key: str, where: str, required: bool = False) -> tuple[bool, str | None]:
        if key not in mapping:
            if required and self.misspelled(mapping, key):
                return False, None
            if required:
                self.p.add(f"{where} needs {key!r}", mapping.line)
                return False, None
            return True, None
        value = mapping[key]
        if not isinstance(value, str) or not value.strip():
            self.p.add(f"{where}.{key} must be a non-empty string, got {_describe(value)}", mapping.line_of(key))
            return False, None
        return True, value.strip()

    def options(self, mapping: LineDict, where: str) -> tuple[bool, Mapping[str, Any], dict[str, int]]:
        if "options" not in mapping or mapping["options"] is None:
            return True, _EMPTY, {}
        value = mapping["options"]
        if not isinstance(value, dict):
            self.p.add(f"{where}.options must be a mapping of option names to values, got {_describe(value)}",
                       mapping.line_of("options"))
            return False, _EMPTY, {}
        ok = True
        for k, v in value.items():
            if not isinstance(k, str):
                self.p.add(f"option names are words, got {k!r}", value.line_of(k))
                ok = False
            elif isinstance(v, (dict, list)) or v is None:
                self.p.add(f"option {k!r} must be a single value, got {_describe(v)}", value.line_of(k))
                ok = False
        lines = {f"options.{k}": value.line_of(k) for k in value}
        return ok, MappingProxyType(dict(value)), lines

    # -- file ---------------------------------------------------------------------------
    def rule_file(self, data: Any, file: str) -> RuleFile:
        if data is None:
            self.p.add("empty rule file: expected a mapping with 'default_device' and 'rules'", 1)
            return RuleFile(file, "cpu", ())
        if not isinstance(data, dict):
            self.p.add(f"a rule file is a mapping with 'default_device' and 'rules', got {_describe(data)}",
                       getattr(data, "line", 1))
            return RuleFile(file, "cpu", ())
        self.keys(data, TOP_KEYS, "the rule file")
        ok, default_device = self.string(data, "default_device", "the rule file", required=True)
        rules: list[Rule] = []
        count = 0
        raw = data.get("rules")
        if "rules" not in data:
            if not self.misspelled(data, "rules"):
                    self.p.add("the rule file needs 'rules' (a list; it may be empty)", data.line)
        elif raw is None:
            pass  # "rules:" with nothing under it: no rules
        elif not isinstance(raw, list):
            self.p.add(f"'rules' must be a list of rules, got {_describe(raw)}", data.line_of("rules"))
        else:
            count = len(raw)
            for i, item in enumerate(raw):
                rule = self.rule(item, raw.line_of(i), i + 1)
                if rule is not None:
                    rules.append(rule)
        return RuleFile(file, default_device or "cpu", tuple(rules),
                        data.line_of("default_device"), count)

    # -- rule ---------------------------------------------------------------------------
    def rule(self, item: Any, line: int, index: int) -> Rule | None:
        if not isinstance(item, dict):
            self.p.add(f"rule {index} must be a mapping with 'match' and 'replace' or 'keep', got {_describe(item)}", line)
            return None
        clean = self.keys(item, RULE_KEYS, f"rule {index}")
        match = None
        if "match" in item:
            match = self.match(item["match"], item.line_of("match"))
        elif clean:
            self.p.add(f"rule {index} needs 'match'", line)
        action: Replace | Keep | None = None
        if "replace" in item and "keep" in item:
            self.p.add(f"rule {index} has both 'replace' and 'keep'; give one", item.line_of("keep"))
        elif "replace" in item:
            action = self.replace(item["replace"], item.line_of("replace"))
        elif "keep" in item:
            action = self.keep(item["keep"], item.line_of("keep"))
        elif clean:
            self.p.add(f"rule {index} needs 'replace' or 'keep'", line)
        if match is None or action is None or not clean:
            return None
        return Rule(index, line, match, action)

    def match(self, value: Any, line: int) -> Match | None:
        if not isinstance(value, dict):
            self.p.add(f"match must be a mapping with some of {', '.join(MATCH_KEYS)}, got {_describe(value)}", line)
            return None
        ok = self.keys(value, MATCH_KEYS, "match")
        known = [k for k in value if k in MATCH_KEYS]
        if not known:
            if ok:
                self.p.add(f"match needs at least one of {', '.join(MATCH_KEYS)}", line)
            return None
        good, name = self.string(value, "name", "match")
        ok &= good
        if name is not None:
            try:
                re.compile(name)
            except re.error as exc:
                self.p.add(f"bad regex {name!r} in match.name: {exc}", value.line_of("name"))
                ok = False
        good, class_name = self.string(value, "class", "match")
        ok &= good
        good, module = self.string(value, "module", "match")
        ok &= good
        if module is not None and not _MODULE.match(module):
            self.p.add(f"match.module {module!r} must be a dotted module name such as 'mlp.experts'",
                       value.line_of("module"))
            ok = False
        elif module is not None and module.startswith("model."):
            self.p.add(f"match.module is the part after 'model.layers.N.' (e.g. 'mlp.experts'), got {module!r}; "
                       "use 'name' for a regex on the full name", value.line_of("module"))
            ok = False
        layers = None
        if "layers" in value:
            try:
                layers = parse_range(value["layers"])
            except ValueError as exc:
                self.p.add(f"bad match.layers: {exc}", value.line_of("layers"))
                ok = False
        if not ok:
            return None
        return Match(line, name, class_name, layers, module)

    def keep(self, value: Any, line: int) -> Keep | None:
        if value is None:
            return Keep(None, line)
        if not isinstance(value, dict):
            self.p.add(f"keep must be a mapping such as {{device: cpu}}, got {_describe(value)}", line)
            return None
        ok = self.keys(value, KEEP_KEYS, "keep")
        good, device = self.string(value, "device", "keep")
        if not (ok and good):
            return None
        return Keep(device, value.line, MappingProxyType({"device": value.line_of("device")}))

    def replace(self, value: Any, line: int) -> Replace | None:
        if not isinstance(value, dict):
            self.p.add(f"replace must be a mapping with op, backend and device, got {_describe(value)}", line)
            return None
        ok = self.keys(value, REPLACE_KEYS, "replace")
        good, op = self.string(value, "op", "replace", required=True)
        ok &= good
        if op is not None and op not in OPERATORS:
            self.p.add(f"unknown operator {op!r}{closest(op, OPERATORS)}; operators: {', '.join(OPERATORS)}",
                       value.line_of("op"))
            ok = False
        lines = {k: value.line_of(k) for k in value}
        if "split" in value:
            if op is not None and op != "experts":
                self.p.add(f"'split' is only for op experts, not {op!r}", value.line_of("split"))
                ok = False
            for key in ("backend", "device", "options"):
                if key in value:
                    self.p.add(f"with 'split', give {key!r} in each part instead of in replace", value.line_of(key))
                    ok = False
            split = self.split(value["split"], value.line_of("split"))
            if not ok or split is None:
                return None
            return Replace(op, None, None, _EMPTY, split, value.line, MappingProxyType(lines))
        good, backend = self.string(value, "backend", "replace", required=True)
        ok &= good
        good, device = self.string(value, "device", "replace")
        ok &= good
        good, options, option_lines = self.options(value, "replace")
        ok &= good
        if not ok:
            return None
        lines.update(option_lines)
        return Replace(op, backend, device, options, None, value.line, MappingProxyType(lines))

    def split(self, value: Any, line: int) -> tuple[SplitPart, ...] | None:
        if not isinstance(value, list) or not value:
            self.p.add(f"split must be a non-empty list of parts {{experts, backend, device}}, got {_describe(value)}", line)
            return None
        parts: list[SplitPart] = []
        ok = True
        rest_line = None
        for i, item in enumerate(value):
            item_line = value.line_of(i)
            if not isinstance(item, dict):
                self.p.add(f"split part must be a mapping {{experts, backend, device}}, got {_describe(item)}", item_line)
                ok = False
                continue
            good = self.keys(item, SPLIT_KEYS, "split part")
            experts = None
            if "experts" not in item:
                if not self.misspelled(item, "experts"):
                    self.p.add("split part needs 'experts' (a range such as 0-31, 0%-25% or rest)", item_line)
                good = False
            else:
                try:
                    experts = parse_range(item["experts"], allow_rest=True)
                except ValueError as exc:
                    self.p.add(f"bad split experts: {exc}", item.line_of("experts"))
                    good = False
            if experts is not None and experts.rest:
                if rest_line is not None:
                    self.p.add(f"only one split part may be 'rest' (the first is at line {rest_line})",
                               item.line_of("experts"))
                    good = False
                else:
                    rest_line = item.line_of("experts")
            g, backend = self.string(item, "backend", "split part", required=True)
            good &= g
            g, device = self.string(item, "device", "split part")
            good &= g
            g, options, option_lines = self.options(item, "split part")
            good &= g
            if not good:
                ok = False
                continue
            lines = {k: item.line_of(k) for k in item}
            lines.update(option_lines)
            parts.append(SplitPart(experts, backend, device, options, item_line, MappingProxyType(lines)))
        if ok:
            ok = self.explicit_overlaps(parts)
        return tuple(parts) if ok else None

    def explicit_overlaps(self, parts: list[SplitPart]) -> bool:
        """Overlaps visible without a model (explicit indices only)."""
        seen: list[tuple[frozenset[int], int]] = []
        ok = True
        for part in parts:
            indices = None if part.experts.rest else part.experts.explicit()
            if indices is None:
                continue
            for other, other_line in seen:
                both = indices & other
                if both:
                    self.p.add(f"experts {format_ranges(both)} are in two split parts (lines {other_line} and "
                               f"{part.line})", part.key_lines.get("experts", part.line))
                    ok = False
            seen.append((indices, part.key_lines.get("experts", part.line)))
        return ok
