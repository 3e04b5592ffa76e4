"""Structural errors: each names the file and the right line, with the closest valid name,
and all of them are reported together."""

from __future__ import annotations

import pytest

from ktcore.errors import KtError
from ktcore.rules import RuleErrors, check_rules, load_rules
from ktcore.rules.schema import Keep, Match, Replace, parse_rules


def errors(path, registry, **kwargs) -> list[str]:
    with pytest.raises(RuleErrors) as info:
        check_rules(path, registry, **kwargs)
    assert isinstance(info.value, KtError)
    return [str(e) for e in info.value.errors]


def one_error(path, registry, **kwargs) -> str:
    found = errors(path, registry, **kwargs)
    assert len(found) == 1, found
    return found[0]


def test_valid_file_builds_frozen_dataclasses(write_rules):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {name: '^lm_head$', class: Linear}
            replace: {op: linear, backend: torch, device: cpu, options: {dtype: bf16}}
          - match: {layers: 0-1, module: mlp.experts}
            replace:
              op: experts
              split:
                - {experts: 0-3, backend: torch, device: cpu}
                - {experts: rest, backend: torch}
          - match: {layers: 2}
            keep: {device: cpu}
    """)
    rf = load_rules(path)
    assert rf.default_device == "cpu" and rf.rule_count == 3 and [r.index for r in rf.rules] == [1, 2, 3]
    r1, r2, r3 = rf.rules
    assert (r1.line, r2.line, r3.line) == (3, 5, 11)
    assert r1.match == Match(3, name="^lm_head$", class_name="Linear")
    assert r1.replace.options == {"dtype": "bf16"} and r1.replace.device == "cpu"
    assert r2.replace.split[0].experts.text == "0-3" and r2.replace.split[1].experts.rest
    assert r2.replace.split[1].device is None  # inherits
    assert r3.keep == Keep("cpu", 12)
    with pytest.raises(Exception):
        r1.match.name = "x"  # frozen
    with pytest.raises(ValueError):
        Match(1)
    with pytest.raises(ValueError):
        Replace("mlp", "torch", "cpu")


@pytest.mark.parametrize("body, line, needles", [
    # unknown keys, with the closest valid key
    ("default_devise: cpu\nrules: []\n", 1, ["unknown key 'default_devise'", "did you mean 'default_device'"]),
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    replce: {op: linear, backend: torch}\n", 4,
     ["unknown key 'replce' in rule 1", "did you mean 'replace'"]),
    ("default_device: cpu\nrules:\n  - match: {nmae: x}\n    keep: {}\n", 3,
     ["unknown key 'nmae' in match", "did you mean 'name'"]),
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    replace:\n      op: linear\n      backend: torch\n"
     "      devce: cpu\n", 7, ["unknown key 'devce' in replace", "did you mean 'device'"]),
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    keep: {devic: cpu}\n", 4,
     ["unknown key 'devic' in keep", "did you mean 'device'"]),
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    replace:\n      op: experts\n      split:\n"
     "        - {experts: rest, backend: torch, optons: {}}\n", 7,
     ["unknown key 'optons' in split part", "did you mean 'options'"]),
    # bad regex, quoting re.error
    ("default_device: cpu\nrules:\n  - match: {name: 'model.(layers'}\n    keep: {}\n", 3,
     ["bad regex 'model.(layers'", "missing ), unterminated subpattern"]),
    # unknown operator, closest names from OPERATORS
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    replace: {op: expert, backend: torch}\n", 4,
     ["unknown operator 'expert'", "did you mean 'experts'", "operators: linear, experts, mla, rope"]),
    # structure
    ("default_device: cpu\nrules:\n  - match: {name: x}\n", 3, ["rule 1 needs 'replace' or 'keep'"]),
    ("default_device: cpu\nrules:\n  - keep: {device: cpu}\n", 3, ["rule 1 needs 'match'"]),
    ("default_device: cpu\nrules:\n  - match: {}\n    keep: {}\n", 3, ["match needs at least one of"]),
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    keep: {}\n    replace: {op: linear, backend: torch}\n",
     4, ["has both 'replace' and 'keep'"]),
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    replace: {op: linear}\n", 4, ["replace needs 'backend'"]),
    ("default_device: cpu\nrules:\n  - match: {name: 3}\n    keep: {}\n", 3, ["match.name must be a non-empty string"]),
    ("default_device: cpu\nrules:\n  - match: {layers: 1-x}\n    keep: {}\n", 3,
     ["bad match.layers", "cannot read '1-x'"]),
    ("default_device: cpu\nrules:\n  - match: {module: model.layers.1.mlp}\n    keep: {}\n", 3,
     ["part after 'model.layers.N.'"]),
    ("default_device: cpu\nrules:\n  - match: {name: x}\n    replace: {op: linear, backend: torch, options: 3}\n",
     4, ["options must be a mapping"]),
    ("default_device: cpu\nrules: {a: 1}\n", 2, ["'rules' must be a list"]),
    ("rules: []\n", 1, ["the rule file needs 'default_device'"]),
    ("default_device: cpu\n", 1, ["needs 'rules'"]),
    ("", 1, ["empty rule file"]),
    ("- a\n- b\n", 1, ["a rule file is a mapping"]),
    ("default_device: cpu\nrules:\n  - just a string\n", 3, ["rule 1 must be a mapping"]),
    ("default_device: cpu\ndefault_device: cuda\nrules: []\n", 2, ["duplicate key 'default_device'"]),
    ("default_device: cpu\nrules:\n  - match: {name: x\n", 4, ["invalid YAML"]),
])
def test_structural_errors_name_file_and_line(write_rules, registry, body, line, needles):
    path = write_rules(body)
    message = one_error(path, registry)
    assert message.startswith(f"{path}:{line}: "), message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("split, line, needles", [
    ("        - {experts: 0-3, backend: torch}\n        - {experts: rest, backend: torch}\n"
     "        - {experts: rest, backend: torch}\n", 9, ["only one split part may be 'rest'", "line 8"]),
    ("        - {experts: 0-7, backend: torch}\n        - {experts: 4-9, backend: torch}\n", 8,
     ["experts 4-7 are in two split parts", "lines 7 and 8"]),
    ("        - {experts: 'x-1', backend: torch}\n", 7, ["bad split experts"]),
    ("        - {backend: torch}\n", 7, ["split part needs 'experts'"]),
    ("        - {experts: 0-3}\n", 7, ["split part needs 'backend'"]),
])
def test_split_structure_errors(write_rules, registry, split, line, needles):
    path = write_rules("default_device: cpu\nrules:\n  - match: {module: mlp.experts}\n    replace:\n"
                       "      op: experts\n      split:\n" + split)
    message = one_error(path, registry)
    assert message.startswith(f"{path}:{line}: "), message
    for needle in needles:
        assert needle in message


def test_split_only_for_experts_and_without_top_level_backend(write_rules, registry):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {name: x}
            replace:
              op: linear
              backend: torch
              split:
                - {experts: rest, backend: torch}
    """)
    found = errors(path, registry)
    assert f"{path}:7: 'split' is only for op experts, not 'linear'" in found
    assert f"{path}:6: with 'split', give 'backend' in each part instead of in replace" in found


def test_all_errors_are_collected_in_line_order(write_rules, registry):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {nme: x}
            keep: {}
          - match: {name: '('}
            keep: {}
          - match: {name: y}
            replace: {op: lnear, backend: torch}
          - match: {name: z}
            replace: {op: linear, backend: trch, device: cpu}
    """)
    found = errors(path, registry)
    assert [int(e.split(":")[1]) for e in found] == [3, 5, 8, 10]
    assert "did you mean 'name'" in found[0]
    assert "bad regex" in found[1]
    assert "did you mean 'linear'" in found[2]
    assert "unknown backend 'trch'" in found[3] and "did you mean 'torch'" in found[3]
    assert str(RuleErrors([])) == ""


def test_load_rules_raises_every_structural_error(write_rules):
    path = write_rules("default_device: cpu\nrules:\n  - match: {a: 1}\n    keep: {}\n  - b\n")
    with pytest.raises(RuleErrors) as info:
        load_rules(path)
    assert len(info.value.errors) == 2
    assert str(info.value).count("\n") == 1


def test_missing_file_is_a_kt_error(tmp_path, registry):
    with pytest.raises(KtError, match="no such rule file"):
        check_rules(tmp_path / "nope.yaml", registry)


def test_parse_rules_from_text():
    rf, problems = parse_rules("default_device: cpu\nrules: []\n", "inline")
    assert problems == [] and rf.file == "inline" and rf.rules == ()
