"""``explain``: folded rows and bytes per device, checked against numbers worked out by hand
from the tiny Qwen3-MoE config."""

from __future__ import annotations

import json
import math

import pytest

from ktcore.rules import check_rules
from ktcore.rules.explain import device_totals, human_bytes, rows, to_json, to_text, weight_bytes

# tiny qwen3_moe (ktcore.models.presets): bf16 weights
V, H, I, E, L = 512, 64, 32, 16, 3
Q_OUT, KV_OUT, HEAD = 4 * 16, 2 * 16, 16
EMBED = LM_HEAD = V * H
FINAL_NORM = H
ATTN = H * Q_OUT + 2 * H * KV_OUT + Q_OUT * H + 2 * HEAD  # q, k, v, o projections; q_norm, k_norm
ROUTER = E * H
LAYER_NORMS = 2 * H
EXPERTS = E * (2 * I * H + H * I)  # gate_up [E, 2I, H], down [E, H, I]
NON_EXPERT = EMBED + LM_HEAD + FINAL_NORM + L * (ATTN + ROUTER + LAYER_NORMS)
BF16 = 2


def plan(write_rules, registry, models, text, arch="qwen3_moe"):
    return check_rules(write_rules(text), registry, model=models[arch], devices="cuda:0,cuda:1,cpu")


def test_hand_computed_sizes_match_the_skeleton(models):
    total = sum(m.param_count for m in models["qwen3_moe"].modules if "." not in m.name)
    assert total == NON_EXPERT + L * EXPERTS == 400928


def test_gpu_plus_cpu_experts_bytes(write_rules, registry, models):
    p = plan(write_rules, registry, models, """
        default_device: cuda:0
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu}
    """)
    table = rows(p)
    assert device_totals(table) == {"cuda:0": NON_EXPERT * BF16, "cpu": L * EXPERTS * BF16}
    assert device_totals(table) == {"cuda:0": 212032, "cpu": 589824}
    named = {r.module: r for r in table}
    assert list(named) == [
        "model.embed_tokens", "model.layers.{0-2}.self_attn", "model.layers.{0-2}.mlp.experts",
        "model.layers.{0-2}.mlp.gate", "model.layers.{0-2}.input_layernorm",
        "model.layers.{0-2}.post_attention_layernorm", "model.norm", "model.rotary_emb", "lm_head",
    ]
    attn = named["model.layers.{0-2}.self_attn"]
    assert (attn.op, attn.device, attn.source, attn.layers, attn.bytes) == (None, "cuda:0", "default", (0, 1, 2),
                                                                           L * ATTN * BF16)
    experts = named["model.layers.{0-2}.mlp.experts"]
    assert (experts.op, experts.backend, experts.experts_text, experts.rule_line) == ("experts", "torch", "all", 3)
    assert len(experts.modules) == 3


def test_quantized_formats_and_dtypes(write_rules, registry, models):
    p = plan(write_rules, registry, models, """
        default_device: cuda:0
        rules:
          - match: {layers: 0, module: mlp.experts}
            replace: {op: experts, backend: quant, device: cpu, options: {format: int4}}
          - match: {module: mlp.experts}
            replace: {op: experts, backend: quant, device: cpu, options: {format: int8, group_size: 64}}
          - match: {name: '^lm_head$'}
            replace: {op: linear, backend: torch, device: cuda:0, options: {dtype: fp32}}
    """)
    int4 = EXPERTS // 2 + 4 * math.ceil(EXPERTS / 128)  # half a byte each + fp16 scale and zero per 128
    int8 = EXPERTS + 2 * math.ceil(EXPERTS / 64)  # a byte each + an fp16 scale per 64
    assert (int4, int8) == (52224, 101376)
    table = rows(p)
    assert device_totals(table) == {
        "cuda:0": (NON_EXPERT - LM_HEAD) * BF16 + LM_HEAD * 4,
        "cpu": int4 + 2 * int8,
    }
    names = [r.module for r in table]
    assert "model.layers.0.mlp.experts" in names and "model.layers.{1-2}.mlp.experts" in names


def test_split_rows_fold_and_apportion(write_rules, registry, models):
    p = plan(write_rules, registry, models, """
        default_device: cuda:0
        rules:
          - match: {layers: '0,2', module: mlp.experts}
            replace: {op: experts, backend: torch, device: cuda:1}
          - match: {module: mlp.experts}
            replace:
              op: experts
              split:
                - {experts: 0%-25%, backend: torch, device: cuda:0}
                - {experts: rest, backend: torch, device: cpu}
    """)
    table = rows(p)
    experts = [(r.module, r.device, r.experts_text, r.bytes) for r in table if r.op == "experts"]
    assert experts == [
        ("model.layers.{0,2}.mlp.experts", "cuda:1", "all", 2 * EXPERTS * BF16),
        ("model.layers.1.mlp.experts", "cuda:0", "0-3", EXPERTS // 4 * BF16),
        ("model.layers.1.mlp.experts", "cpu", "4-15", EXPERTS * 3 // 4 * BF16),
    ]
    assert device_totals(table) == {
        "cuda:0": NON_EXPERT * BF16 + EXPERTS // 4 * BF16,
        "cuda:1": 2 * EXPERTS * BF16,
        "cpu": EXPERTS * 3 // 4 * BF16,
    }


def test_keep_rows_and_inherited_devices(write_rules, registry, models):
    p = plan(write_rules, registry, models, """
        default_device: cuda:0
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu}
          - match: {layers: 50%-100%}
            keep: {device: cuda:1}
          - match: {name: '^lm_head$'}
            keep: {device: cuda:1}
    """)
    table = rows(p)
    named = {r.module: r for r in table}
    assert (named["model.layers.2"].source, named["model.layers.2"].bytes) == ("keep", 0)
    attn = named["model.layers.2.self_attn"]
    assert (attn.device, attn.source, attn.rule_line, attn.rule_text) == ("cuda:1", "inherited", 5,
                                                                         "line 5 (inherited)")
    assert named["model.layers.{0-1}.self_attn"].device == "cuda:0"
    assert (named["lm_head"].device, named["lm_head"].bytes) == ("cuda:1", LM_HEAD * BF16)
    layer_rest = ATTN + ROUTER + LAYER_NORMS
    assert device_totals(table) == {
        "cuda:0": (EMBED + FINAL_NORM + 2 * layer_rest) * BF16,
        "cuda:1": (LM_HEAD + layer_rest) * BF16,
        "cpu": L * EXPERTS * BF16,
    }


def test_a_keep_with_nothing_else_inside_is_one_row_with_its_subtree(write_rules, registry, models):
    p = plan(write_rules, registry, models, """
        default_device: cpu
        rules:
          - match: {layers: 1}
            keep: {device: cuda:0}
    """)
    named = {r.module: r for r in rows(p)}
    assert named["model.layers.1"].bytes == (ATTN + ROUTER + LAYER_NORMS + EXPERTS) * BF16
    assert "model.layers.1.self_attn" not in named
    assert "model.layers.{0,2}" in named  # the unmatched layers, folded


def test_all_modules_shows_containers_and_keeps_totals(write_rules, registry, models):
    text = """
        default_device: cuda:0
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu}
    """
    p = plan(write_rules, registry, models, text)
    every = rows(p, all_modules=True)
    assert "model.layers.{0-2}" in [r.module for r in every] and "model.layers.{0-2}.self_attn.q_proj" in [
        r.module for r in every]
    assert device_totals(every) == device_totals(rows(p))


def test_text_and_json_have_the_same_content(write_rules, registry, models):
    p = plan(write_rules, registry, models, """
        default_device: cuda:0
        rules:
          - match: {module: mlp.experts}
            replace: {op: experts, backend: torch, device: cpu}
    """)
    text = to_text(p)
    line = next(x for x in text.splitlines() if x.startswith("model.layers.{0-2}.mlp.experts "))
    assert line.split() == ["model.layers.{0-2}.mlp.experts", "experts", "torch", "cpu", "all", "576.0", "KiB",
                            "line", "3"]
    assert "bytes per device:" in text and "589,824" in text and "212,032" in text and "801,856" in text
    assert "probes were not run" in text
    doc = json.loads(json.dumps(to_json(p)))
    assert doc["devices"] == {"cuda:0": 212032, "cpu": 589824} and doc["total_bytes"] == 801856
    assert doc["dtype"] == "bfloat16" and doc["planned_devices"] is True and doc["probes_run"] is False
    row = next(r for r in doc["rows"] if r["module"] == "model.layers.{0-2}.mlp.experts")
    assert row["modules"] == [f"model.layers.{i}.mlp.experts" for i in range(3)] and row["layers"] == [0, 1, 2]
    assert (row["op"], row["backend"], row["device"], row["rule_line"], row["bytes"]) == (
        "experts", "torch", "cpu", 3, 589824)


@pytest.mark.parametrize("options, expected", [
    ({}, 256),
    ({"dtype": "fp32"}, 512),
    ({"dtype": "fp16"}, 256),
    ({"format": "int8"}, 128 + 2),
    ({"format": "int4"}, 64 + 4),
    ({"format": "int4", "group_size": 32}, 64 + 4 * 4),
    ({"format": "something-else"}, 256),  # unknown formats are counted at the checkpoint dtype
])
def test_weight_bytes(options, expected):
    assert weight_bytes(128, options, "bfloat16") == expected


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 * 1024**3)] == ["0 B", "1023 B", "1.0 KiB", "1.5 KiB",
                                                                           "5.0 GiB"]
