"""Placing a tiny model's modules: first match wins, layer sugar, op compatibility, keep
inheritance, replaced subtrees, splits, and rules that match nothing."""

from __future__ import annotations

import pytest

from ktcore.rules import RuleErrors, check_rules

PLANNED = "cuda:0,cuda:1,cpu"


def plan_of(path, registry, model, devices=PLANNED):
    return check_rules(path, registry, model=model, devices=devices)


def errors(path, registry, model, devices=PLANNED) -> list[str]:
    with pytest.raises(RuleErrors) as info:
        check_rules(path, registry, model=model, devices=devices)
    return [str(e) for e in info.value.errors]


def by_module(plan):
    return {p.module: p for p in plan.placements}


def test_first_matching_rule_wins(write_rules, registry, models):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {layers: 0, module: mlp.experts}
            replace: {op: experts, backend: torch, device: cuda:0}
          - match: {name: 'mlp\\.experts$'}
            replace: {op: experts, backend: quant, device: cpu}
    """)
    plan = plan_of(path, registry, models["qwen3_moe"])
    got = {p.module: (p.backend, p.device, p.rule_line) for p in plan.replacements}
    assert got == {
        "model.layers.0.mlp.experts": ("torch", "cuda:0", 3),
        "model.layers.1.mlp.experts": ("quant", "cpu", 5),
        "model.layers.2.mlp.experts": ("quant", "cpu", 5),
    }


def test_a_rule_every_match_of_which_an_earlier_rule_took_is_an_error(write_rules, registry, models):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu}
          - match: {layers: 0, module: mlp.experts}
            replace: {op: experts, backend: torch, device: cuda:0}
    """)
    [message] = errors(path, registry, models["qwen3_moe"])
    assert message.startswith(f"{path}:5: rule 2 (layers 0, module 'mlp.experts') matches no module: ")
    assert "placed by an earlier rule (model.layers.0.mlp.experts by the rule at line 3" in message
    assert "put specific rules first" in message


@pytest.mark.parametrize("match, expected", [
    ("{layers: 1-2, module: mlp.experts}", ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]),
    ("{layers: '0,2', module: mlp.experts}", ["model.layers.0.mlp.experts", "model.layers.2.mlp.experts"]),
    ("{layers: 1-, module: mlp.experts}", ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]),
    ("{layers: 50%-100%, module: mlp.experts}", ["model.layers.2.mlp.experts"]),
    ("{layers: all, module: mlp.experts}", [f"model.layers.{i}.mlp.experts" for i in range(3)]),
    ("{module: mlp.experts}", [f"model.layers.{i}.mlp.experts" for i in range(3)]),  # every layer
    ("{layers: 0-1, module: mlp.experts, class: Qwen3MoeExperts, name: 'layers\\.1\\.'}",
     ["model.layers.1.mlp.experts"]),  # AND
    # op compatibility is an implicit class filter: 'mlp' also matches the MoE block and its router
    ("{name: 'layers\\.[02]\\.mlp'}", ["model.layers.0.mlp.experts", "model.layers.2.mlp.experts"]),
])
def test_match_keys(write_rules, registry, models, match, expected):
    path = write_rules(f"default_device: cpu\nrules:\n  - match: {match}\n"
                       "    replace: {op: experts, backend: torch, device: cpu}\n")
    plan = plan_of(path, registry, models["qwen3_moe"])
    assert [p.module for p in plan.replacements] == expected


def test_layers_without_module_match_the_decoder_layer_itself(write_rules, registry, models):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {layers: 0%-50%}
            keep: {device: cuda:1}
    """)
    plan = plan_of(path, registry, models["qwen3_moe"])
    keeps = [p.module for p in plan.placements if p.source == "keep"]
    assert keeps == ["model.layers.0", "model.layers.1"]


def test_keep_device_is_inherited_by_unmatched_descendants(write_rules, registry, models):
    path = write_rules("""
        default_device: cuda:0
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu}
          - match: {module: self_attn, layers: 2}
            replace: {op: mla, backend: torch}
          - match: {layers: 2}
            keep: {device: cuda:1}
          - match: {layers: 2, module: mlp}
            keep: {device: cpu}
    """)
    plan = plan_of(path, registry, models["deepseek_v3"])
    at = by_module(plan)
    assert (at["model.layers.2"].device, at["model.layers.2"].source) == ("cuda:1", "keep")
    q = at["model.layers.2.input_layernorm"]
    assert (q.device, q.source, q.rule_line) == ("cuda:1", "inherited", 7)
    attn = at["model.layers.2.self_attn"]  # replace without device: the device it would have had
    assert (attn.op, attn.device) == ("mla", "cuda:1")
    assert at["model.layers.2.mlp.gate"].device == "cpu"  # the inner keep wins for its subtree
    assert at["model.layers.2.mlp.experts"].device == "cpu"
    one = at["model.layers.1.self_attn.q_a_proj"]  # outside every keep: default_device
    assert (one.device, one.source, one.rule_line) == ("cuda:0", "default", None)
    assert plan.device_of("model.layers.2.mlp.shared_experts.up_proj") == "cpu"


def test_replaced_modules_own_their_descendants(write_rules, registry, models):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {module: self_attn}
            replace: {op: mla, backend: torch, device: cpu}
          - match: {name: 'self_attn\\.(q_a|kv_b)_proj$'}
            replace: {op: linear, backend: torch, device: cpu}
    """)
    [message] = errors(path, registry, models["deepseek_v3"])
    assert message.startswith(f"{path}:5: rule 2 (name ")
    assert ("matches no module: what it matches lies inside modules replaced by earlier rules "
            "(model.layers.0.self_attn.q_a_proj is part of model.layers.0.self_attn, replaced by the rule at "
            "line 3)") in message
    # without rule 2 the linears are not placements: the mla operator owns them
    path = write_rules("default_device: cpu\nrules:\n  - match: {module: self_attn}\n"
                       "    replace: {op: mla, backend: torch, device: cpu}\n")
    plan = plan_of(path, registry, models["deepseek_v3"])
    assert plan.placements_of("model.layers.0.self_attn.q_a_proj") == ()
    assert plan.placements_of("model.layers.0.self_attn")[0].params == 18512


@pytest.mark.parametrize("match, op, hint", [
    ("{module: mlp.expert}", "experts", "(did you mean 'mlp.experts'"),
    ("{class: Qwen3MoeExpert}", "experts", "(did you mean 'Qwen3MoeExperts'"),
    ("{layers: 1, class: Qwen3MoeExperts}", "experts",
     "(layers without module matches the decoder layers model.layers.N themselves; add 'module' to select "
     "modules inside them)"),
    ("{layers: 5-9, module: mlp.experts}", "experts", "(layers 5-9 selects no layer of its 3 layers, 0-2)"),
    ("{name: '^nothing$'}", "experts", "matches no module of this model"),
    ("{module: self_attn}", "mla",
     "op 'mla' cannot replace what it matches (model.layers.0.self_attn, a Qwen3MoeAttention and 2 more); "
     "'mla' replaces no module of this model"),
    ("{module: mlp}", "experts",
     "op 'experts' cannot replace what it matches (model.layers.0.mlp, a Qwen3MoeSparseMoeBlock and 2 more); "
     "'experts' replaces Qwen3MoeExperts"),
])
def test_rule_matching_nothing_is_an_error_at_its_line(write_rules, registry, models, match, op, hint):
    path = write_rules(f"default_device: cpu\nrules:\n  - match: {{name: '^lm_head$'}}\n    keep: {{}}\n"
                       f"  - match: {match}\n    replace: {{op: {op}, backend: torch, device: cpu}}\n")
    [message] = errors(path, registry, models["qwen3_moe"])
    assert message.startswith(f"{path}:5: rule 2 (")
    assert "matches no module" in message and hint in message, message


def test_split_places_parts_with_apportioned_params(write_rules, registry, models):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {module: mlp.experts}
            replace:
              op: experts
              split:
                - {experts: 0%-25%, backend: torch, device: cuda:0}
                - {experts: '8,10', backend: quant, device: cpu, options: {format: int4}}
                - {experts: rest, backend: torch, device: cpu}
    """)
    model = models["qwen3_moe"]
    plan = plan_of(path, registry, model)
    parts = plan.placements_of("model.layers.1.mlp.experts")
    assert [(p.backend, p.device, p.experts) for p in parts] == [
        ("torch", "cuda:0", (0, 1, 2, 3)),
        ("quant", "cpu", (8, 10)),
        ("torch", "cpu", (4, 5, 6, 7, 9, 11, 12, 13, 14, 15)),
    ]
    per_expert = 98304 // 16
    assert [p.params for p in parts] == [4 * per_expert, 2 * per_expert, 10 * per_expert]
    assert parts[1].options == {"format": "int4"}
    total = sum(m.param_count for m in model.modules if "." not in m.name)
    assert sum(p.params for p in plan.placements) == total
    assert plan.device_of("model.layers.1.mlp.experts") is None  # on several devices


def test_split_small_expert_counts_round_half_up(write_rules, registry, models):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {module: mlp.experts}
            replace:
              op: experts
              split:
                - {experts: 0%-25%, backend: torch, device: cuda:0}
                - {experts: rest, backend: torch, device: cpu}
    """)
    parts = plan_of(path, registry, models["mixtral"]).placements_of("model.layers.0.mlp.experts")
    assert [p.experts for p in parts] == [(0, 1), (2, 3, 4, 5, 6, 7)]


@pytest.mark.parametrize("parts, line, needle", [
    ("- {experts: 0%-50%, backend: torch}\n        - {experts: 25%-100%, backend: torch}", 8,
     "experts 4-7 are in two split parts (lines 7 and 8; 16 experts per layer)"),
    ("- {experts: 0-19, backend: torch}", 7,
     "split experts 0-19 go past the last expert: the model has 16 experts per layer (0-15)"),
    ("- {experts: 0-7, backend: torch}\n        - {experts: 8-11, backend: torch}", 6,
     "experts 12-15 are in no split part (16 experts per layer); add a part with 'experts: rest'"),
    ("- {experts: all, backend: torch}\n        - {experts: rest, backend: torch}", 8,
     "the 'rest' part gets no expert: the other parts cover all 16"),
    ("- {experts: 0%-1%, backend: torch}\n        - {experts: rest, backend: torch}", 7,
     "split experts 0%-1% select no expert of 16"),
])
def test_split_coverage_errors(write_rules, registry, models, parts, line, needle):
    path = write_rules("default_device: cpu\nrules:\n  - match: {module: mlp.experts}\n    replace:\n"
                       f"      op: experts\n      split:\n        {parts}\n")
    found = errors(path, registry, models["qwen3_moe"])
    assert found == [f"{path}:{line}: {needle}"]


def test_replace_without_device_must_suit_the_inherited_device(write_rules, registry, models):
    path = write_rules("""
        default_device: cuda:0
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: slowcpu}
    """)
    [message] = errors(path, registry, models["qwen3_moe"])
    assert message == (f"{path}:4: backend 'slowcpu' cannot run 'experts' on cuda:0 (the device this module "
                       "would have; give 'device' in the rule): it runs on cpu")


def test_plan_api_for_the_runtime(write_rules, registry, models):
    path = write_rules("""
        default_device: cpu
        rules:
          - match: {name: '^lm_head$'}
            replace: {op: linear, backend: torch, device: cpu, options: {dtype: fp32}}
    """)
    plan = plan_of(path, registry, models["mixtral"], devices=None)
    [lm_head] = plan.replacements
    assert (lm_head.module, lm_head.op, lm_head.backend, lm_head.device, dict(lm_head.options)) == (
        "lm_head", "linear", "torch", "cpu", {"dtype": "fp32"})
    assert lm_head.class_name == "Linear" and lm_head.experts is None and lm_head.rule_line == 3
    assert plan.module_count == len(models["mixtral"].modules)  # lm_head has no children to absorb
    assert plan.device_of("model.layers.0.mlp.experts") == "cpu"


def test_keep_without_device_shields_a_module_from_later_rules(write_rules, registry, models):
    path = write_rules("""
        default_device: cuda:0
        rules:
          - match: {layers: 0, module: mlp.experts}
            keep:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu}
    """)
    at = by_module(plan_of(path, registry, models["mixtral"]))
    kept = at["model.layers.0.mlp.experts"]
    assert (kept.op, kept.device, kept.source, kept.rule_line) == (None, "cuda:0", "keep", 3)
    assert at["model.layers.0.mlp.experts.act_fn"].device == "cuda:0"  # not replaced: its children are placed
    assert (at["model.layers.1.mlp.experts"].op, at["model.layers.1.mlp.experts"].device) == ("experts", "cpu")
