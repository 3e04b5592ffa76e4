"""YAML placement rules: which operator, backend and device runs each module.

Typical use (the runtime's)::

    from ktcore.rules import check_rules, load_model
    plan = check_rules("rules/qwen3_moe-gpu.yaml", registry, model=load_model(model_dir))
    for p in plan.replacements: ...   # Placement(module, op, backend, device, options, experts, ...)

``check_rules`` raises ``RuleErrors`` (a ``KtError``) listing every problem as
``file:line: message``. See docs/rules.md for the file format and its semantics.

Modules: ``yaml_lines`` (YAML with line numbers), ``layers`` (range syntax), ``schema`` (the
file as frozen dataclasses), ``placement`` (checks and the ``Plan``), ``explain`` (tables and
bytes per device), ``shipped`` (the rule files that come with ktcore).
"""

from ktcore.rules.placement import DeviceSet, ModelInventory, Placement, Plan, check_rules, load_model
from ktcore.rules.schema import Keep, Match, Replace, Rule, RuleErrors, RuleFile, SplitPart, load_rules, parse_rules
from ktcore.rules.shipped import resolve_rule_path, shipped_rule_files

__all__ = [
    "DeviceSet", "Keep", "Match", "ModelInventory", "Placement", "Plan", "Replace", "Rule", "RuleErrors",
    "RuleFile", "SplitPart", "check_rules", "load_model", "load_rules", "parse_rules", "resolve_rule_path",
    "shipped_rule_files",
]
